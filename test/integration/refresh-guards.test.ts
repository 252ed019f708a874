// The refresh path's guards against a slow IdP, a session that cannot refresh, and an API that
// answers 401 to everything — against real processes: the dev IdP (oidc-provider, rotating
// refresh tokens, a replayed one revokes the grant), the demo APIs, real Redis and two Gatehouse
// instances. Refresh grants are counted at the IdP (/__dev/grants), never inside Gatehouse.
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startGatehouse, startStack, type Stack } from '../../e2e/support/stack.ts';
import { RedisProbe, call, clearsSessionCookie, idpGrants, login, refreshGrantsOf, revokeAtDemoApi, setIdpDelays, waitFor, waitUntil } from '../support/http-client.ts';
import { storedSecrets } from '../support/stored-session.ts';

// Tokens are due 8 s after each refresh and expire 20 s after it.
const ACCESS_TOKEN_TTL_SEC = 20;
const REFRESH_SKEW_SEC = 12;
// A lease a little longer than one IdP call, shorter than two: a refresh that needs a discovery
// refetch and a grant, both slow but each within OIDC_TIMEOUT_MS, outlasts the nominal lease.
const OIDC_TIMEOUT_MS = 2_500;
const LOCK_LEASE_MS = 3_000;
const SLOW_IDP_MS = 2_000;
const FORCED_REFRESH_INTERVAL_SEC = 3;
const NO_REFRESH_TOKEN_PREFIX = 'no-rt-';
const WHOAMI = '/api/proxy/demo/whoami';

let stack: Stack;
let probe: RedisProbe;
let appA: string;
let appB: string;

beforeAll(async () => {
  stack = await startStack({
    instances: 2,
    workers: 1,
    accessTokenTtl: ACCESS_TOKEN_TTL_SEC,
    resourceApis: 1,
    apis: ({ apiUrl, resourceApiUrls: [reports] }) => ({ demo: { url: apiUrl }, reports: { url: reports, resource: reports } }),
    idpEnv: { IDP_NO_REFRESH_TOKEN_PREFIX: NO_REFRESH_TOKEN_PREFIX },
    env: {
      TOKEN_REFRESH_SKEW: String(REFRESH_SKEW_SEC),
      OIDC_TIMEOUT_MS: String(OIDC_TIMEOUT_MS),
      REFRESH_LOCK_LEASE_MS: String(LOCK_LEASE_MS),
      FORCED_REFRESH_INTERVAL: String(FORCED_REFRESH_INTERVAL_SEC),
      // B must be able to wait out A's slow refresh here (refresh-wait.test.ts holds the short default).
      REFRESH_WAIT_MS: String(LOCK_LEASE_MS + 2 * OIDC_TIMEOUT_MS),
    },
  });
  probe = new RedisProbe(stack.keyPrefix);
  [appA, appB] = stack.apps.map((app) => app.url) as [string, string];
}, 60_000);

afterAll(async () => {
  if (stack) await setIdpDelays(stack.issuer, { discoveryMs: 0, tokenMs: 0 }).catch(() => undefined);
  await probe?.cleanup();
  await probe?.close();
  await stack?.stop();
});

/** Logs in through `app` and returns the cookie and the session key. */
async function newSession(app: string, user: string): Promise<{ cookie: string; key: string }> {
  const cookie = await login(app, user);
  const key = await probe.sessionKeyOf(user);
  if (!key) throw new Error(`no session key for ${user}`);
  return { cookie, key };
}

async function refreshesOf(user: string): Promise<{ ok: number; refused: number }> {
  const grants = await idpGrants(stack.issuer);
  return { ok: refreshGrantsOf(grants, user), refused: grants.error.refresh_token ?? 0 };
}

async function storedExpiry(key: string): Promise<number> {
  const expiresAt = (await probe.record(key))?.accessTokenExpiresAt;
  if (!expiresAt) throw new Error(`${key}: no stored access token expiry`);
  return expiresAt;
}

/** Waits until the IdP holds a token request it was told to delay, counted from `before`. */
async function tokenRequestsDelayedSince(before: number): Promise<void> {
  const arrived = async () => ((await setIdpDelays(stack.issuer, {})).delayed.token > before ? true : undefined);
  await waitFor('a token request to reach the IdP', arrived, OIDC_TIMEOUT_MS, 5);
}

// Must stay first: it needs instance A's proxy to fetch the discovery document for the first time.
describe('a refresh slower than the lock lease', () => {
  it('slow discovery + slow grant: the owner keeps its lock past the nominal lease, a second instance waits for it, one grant, no replay', async () => {
    const user = 'slow-idp';
    const { cookie, key } = await newSession(appB, user);
    // The demo API fetches the IdP's discovery document on its first call: not during the delays.
    expect(await call(appB, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
    const lockKey = probe.lockKeyFor(key);
    const recordBefore = await probe.record(key);
    await waitUntil(`${user}'s token to become due`, (await storedExpiry(key)) - REFRESH_SKEW_SEC * 1000 + 50);
    const before = await refreshesOf(user);
    const delaysBefore = await setIdpDelays(stack.issuer, { discoveryMs: SLOW_IDP_MS, tokenMs: SLOW_IDP_MS });

    let lockHeldAfterLease: boolean;
    let viaA, viaB;
    try {
      const pendingA = call(appA, WHOAMI, cookie);
      const lockSeenAt = await waitFor('instance A to take the refresh lock', async () => ((await probe.exists(lockKey)) ? Date.now() : undefined), OIDC_TIMEOUT_MS, 10);
      // A is still busy (slow discovery, then a slow grant) when its nominal lease runs out.
      await waitUntil('the nominal lease to run out', lockSeenAt + LOCK_LEASE_MS + 100);
      lockHeldAfterLease = await probe.exists(lockKey);
      viaB = await call(appB, WHOAMI, cookie);
      viaA = await pendingA;
      // Whoever still holds the lock is done only once it lets go; the IdP's counters are final then.
      await waitFor('the refresh lock to be released', async () => ((await probe.exists(lockKey)) ? undefined : true), 4 * OIDC_TIMEOUT_MS + 2 * SLOW_IDP_MS, 25);
    } finally {
      await setIdpDelays(stack.issuer, { discoveryMs: 0, tokenMs: 0 });
    }
    const delaysAfter = await setIdpDelays(stack.issuer, {});
    const after = await refreshesOf(user);

    // A refetched discovery and waited on the slow token endpoint; B never went to the IdP. One
    // token request in all: a second one would replay the refresh token A's request rotated.
    expect(delaysAfter.delayed.discovery - delaysBefore.delayed.discovery).toBe(1);
    expect(delaysAfter.delayed.token - delaysBefore.delayed.token).toBe(1);
    // Exactly one refresh grant, and no replay refused.
    expect({ ok: after.ok - before.ok, refused: after.refused - before.refused }).toEqual({ ok: 1, refused: 0 });
    expect(viaB).toMatchObject({ status: 200, body: { sub: user } });
    expect(clearsSessionCookie(viaA.setCookies)).toBe(false);
    expect([200, 503]).toContain(viaA.status);
    expect(lockHeldAfterLease).toBe(true);
    // The session survives with the new tokens.
    const recordAfter = await probe.record(key);
    expect(recordAfter?.sealed).not.toBe(recordBefore?.sealed);
    expect(await call(appA, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
  });
});

describe('a refresh whose lock lapses while its grant is at the IdP', () => {
  it('another instance renews the session meanwhile: the late refusal of the replaced refresh token ends nothing', async () => {
    // A's token request waits at the IdP (before the IdP looks at it) for less than A's first lease
    // renewal (LOCK_LEASE_MS / 3), so A usually hears the IdP's answer before it notices the lapse.
    const lateGrantMs = 800;
    const user = 'lapsed-lock';
    const { cookie, key } = await newSession(appB, user);
    expect(await call(appA, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
    const lockKey = probe.lockKeyFor(key);
    await waitUntil(`${user}'s token to become due`, (await storedExpiry(key)) - REFRESH_SKEW_SEC * 1000 + 50);
    const before = await refreshesOf(user);
    const delaysBefore = await setIdpDelays(stack.issuer, { tokenMs: lateGrantMs });

    let viaA, viaB;
    try {
      const pendingA = call(appA, WHOAMI, cookie);
      await tokenRequestsDelayedSince(delaysBefore.delayed.token);
      await setIdpDelays(stack.issuer, { tokenMs: 0 });
      // A's lease lapses, as after a long pause or a partition from the store, and B takes over:
      // B's grant with the same refresh token reaches the IdP first and rotates it.
      await probe.redis.del(lockKey);
      viaB = await call(appB, WHOAMI, cookie);
      viaA = await pendingA;
      await waitFor('the refresh lock to be released', async () => ((await probe.exists(lockKey)) ? undefined : true), 2 * OIDC_TIMEOUT_MS, 25);
    } finally {
      await setIdpDelays(stack.issuer, { tokenMs: 0 });
    }
    const after = await refreshesOf(user);

    expect(viaB).toMatchObject({ status: 200, body: { sub: user } });
    // The IdP ran B's grant, then refused A's as a replay of the token B's grant rotated.
    expect({ ok: after.ok - before.ok, refused: after.refused - before.refused }).toEqual({ ok: 1, refused: 1 });
    // A answers with B's renewed tokens, or (had it noticed the lapse first) with the token it
    // held, still good for a while; it never ends the session B has just renewed.
    expect(viaA).toMatchObject({ status: 200, body: { sub: user } });
    expect(clearsSessionCookie(viaA.setCookies)).toBe(false);
    expect(await probe.exists(key)).toBe(true);
    expect(await call(appA, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
  });

  it('an owner that finds its lock taken stops waiting on the IdP at once and goes on with the token it holds, the session kept', async () => {
    const slowGrantMs = 2 * LOCK_LEASE_MS;
    const user = 'lock-taken';
    const { cookie, key } = await newSession(appB, user);
    const lockKey = probe.lockKeyFor(key);
    await waitUntil(`${user}'s token to become due`, (await storedExpiry(key)) - REFRESH_SKEW_SEC * 1000 + 50);
    const delaysBefore = await setIdpDelays(stack.issuer, { tokenMs: slowGrantMs });
    let viaA;
    try {
      const pendingA = call(appA, WHOAMI, cookie);
      await tokenRequestsDelayedSince(delaysBefore.delayed.token);
      // Another owner holds the lock now, as after a lapsed lease.
      await probe.redis.set(lockKey, 'successor', 'PX', LOCK_LEASE_MS);
      viaA = await pendingA;
    } finally {
      await setIdpDelays(stack.issuer, { tokenMs: 0 });
    }
    // Due, not spent: the token it held still had REFRESH_SKEW_SEC to run.
    expect(viaA).toMatchObject({ status: 200, body: { sub: user } });
    // Its next renewal (every third of the lease) noticed; without that it would wait for the IdP's
    // answer until the lock's work deadline (2 × OIDC_TIMEOUT_MS here), past REFRESH_WAIT_MS.
    expect(viaA.ms).toBeLessThan(LOCK_LEASE_MS);
    expect(clearsSessionCookie(viaA.setCookies)).toBe(false);
    expect(await probe.redis.get(lockKey)).toBe('successor');
    expect(await probe.exists(key)).toBe(true);
  });
});

describe('a refresh lock the store loses while its grant is at the IdP (a failover before the key reached the replica)', () => {
  it('found at the write-back: the owner takes the lock again and stores its grant, the record being the one it read', async () => {
    const user = 'lock-lost';
    const secretsOf = (key: string) => storedSecrets(stack.appEnv.REDIS_URL as string, key, stack.appEnv.SESSION_SECRET as string);
    const { cookie, key } = await newSession(appB, user);
    const lockKey = probe.lockKeyFor(key);
    await waitUntil(`${user}'s token to become due`, (await storedExpiry(key)) - REFRESH_SKEW_SEC * 1000 + 50);
    const refreshTokenBefore = (await secretsOf(key)).refreshToken;
    const before = await refreshesOf(user);
    // Answered well before A's first lease renewal (every LOCK_LEASE_MS / 3).
    const delaysBefore = await setIdpDelays(stack.issuer, { tokenMs: LOCK_LEASE_MS / 6 });
    let viaA;
    try {
      const pendingA = call(appA, WHOAMI, cookie);
      await tokenRequestsDelayedSince(delaysBefore.delayed.token);
      await setIdpDelays(stack.issuer, { tokenMs: 0 });
      expect(await probe.redis.del(lockKey)).toBe(1);
      viaA = await pendingA;
    } finally {
      await setIdpDelays(stack.issuer, { tokenMs: 0 });
    }
    const after = await refreshesOf(user);

    expect(viaA).toMatchObject({ status: 200, body: { sub: user } });
    expect({ ok: after.ok - before.ok, refused: after.refused - before.refused }).toEqual({ ok: 1, refused: 0 });
    // The rotated refresh token is the one stored: the session's next refresh is no replay.
    const stored = await secretsOf(key);
    expect(stored.refreshToken).toBeTruthy();
    expect(stored.refreshToken).not.toBe(refreshTokenBefore);
    expect(await probe.exists(lockKey)).toBe(false);
    expect(await call(appB, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
  });
});

describe('a token key rotated with its steps merged (README, "Rotating secrets")', () => {
  it('an instance that waited on a refresh whose record it cannot read answers 503 store_unavailable and keeps the cookie; the session lives on', async () => {
    // B seals with a new key and still opens A's; A holds only the old key, as before its redeploy.
    const oldKey = stack.appEnv.TOKEN_ENCRYPTION_KEY ?? stack.appEnv.SESSION_SECRET;
    const rotated = await startGatehouse({ name: 'gatehouse-rotated', workers: 1, env: { ...stack.appEnv, TOKEN_ENCRYPTION_KEY: `${randomBytes(30).toString('base64url')},${oldKey}` } });
    try {
      const user = 'mid-rotation';
      const { cookie, key } = await newSession(appA, user);
      expect(await call(appA, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
      await waitUntil(`${user}'s token to become due`, (await storedExpiry(key)) - REFRESH_SKEW_SEC * 1000 + 50);
      const delaysBefore = await setIdpDelays(stack.issuer, { tokenMs: SLOW_IDP_MS });
      let viaA;
      let viaRotated;
      try {
        // The rotated instance refreshes (its grant held at the IdP); A finds the token due, waits on its lock, then reads what it wrote.
        const pendingRotated = call(rotated.url, WHOAMI, cookie);
        await tokenRequestsDelayedSince(delaysBefore.delayed.token);
        viaA = await call(appA, WHOAMI, cookie);
        viaRotated = await pendingRotated;
      } finally {
        await setIdpDelays(stack.issuer, { tokenMs: 0 });
      }
      expect(viaRotated).toMatchObject({ status: 200, body: { sub: user } });
      // The token A held is no longer the stored one, and A cannot read what is: "retry shortly", never an end.
      expect({ status: viaA.status, error: (viaA.body as { error?: string }).error, clears: clearsSessionCookie(viaA.setCookies) }).toEqual({ status: 503, error: 'store_unavailable', clears: false });
      expect(await probe.record(key)).toBeTruthy();
      expect(await call(rotated.url, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
    } finally {
      await rotated.process.stop();
    }
  });
});

describe('a session without a refresh token', () => {
  it('an API that needs its own audience answers 403 reauthentication_required and an upstream 401 passes through, both keeping the session; it ends when its access token expires', async () => {
    const user = `${NO_REFRESH_TOKEN_PREFIX}user`;
    const { cookie, key } = await newSession(appA, user);
    expect(await call(appA, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });

    const reports = await call(appA, '/api/proxy/reports/whoami', cookie);
    expect(reports).toMatchObject({ status: 403, body: { error: 'reauthentication_required' } });
    expect(clearsSessionCookie(reports.setCookies)).toBe(false);
    expect(await probe.exists(key)).toBe(true);

    // The upstream's own 401, unchanged: there is nothing to refresh with.
    const rejected = await call(appB, '/api/proxy/demo/status/401', cookie);
    expect(rejected).toMatchObject({ status: 401, body: { status: 401 } });
    expect(clearsSessionCookie(rejected.setCookies)).toBe(false);
    expect(await probe.exists(key)).toBe(true);

    // Used to its last second, also after it is due...
    const expiresAt = await storedExpiry(key);
    await waitUntil(`${user}'s token to become due`, expiresAt - REFRESH_SKEW_SEC * 1000 + 50);
    expect(await call(appB, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
    // ...and then the session ends.
    await waitUntil(`${user}'s token to expire`, expiresAt + 50);
    const ended = await call(appA, WHOAMI, cookie);
    expect(ended).toMatchObject({ status: 401, body: { error: 'session_expired' } });
    expect(clearsSessionCookie(ended.setCookies)).toBe(true);
    expect(await probe.exists(key)).toBe(false);
    expect((await refreshesOf(user)).ok).toBe(0);
    // A tab that calls later with the same cookie hears the same, on either instance.
    expect(await call(appB, WHOAMI, cookie)).toMatchObject({ status: 401, body: { error: 'session_expired' } });
    expect(await call(appA, '/api/auth/session', cookie)).toMatchObject({ status: 200, body: { authenticated: false, endedBy: 'expired' } });
  });
});

describe('forced refreshes', () => {
  it('only a 401 that refuses the token itself (no challenge, no error, invalid_token) spends one: a challenge that asks for a scope or a DPoP proof passes through, the budget kept', async () => {
    const challenged = (challenge: string) => `/api/proxy/demo/status/401?challenge=${encodeURIComponent(challenge)}`;
    const cases = [
      ['Bearer error="insufficient_scope", scope="admin"', 0],
      // Another scheme's words are not about the Bearer token that went: the token is refused.
      ['DPoP algs="ES256", error="invalid_dpop_proof"', 1],
      ['Bearer error="invalid_token", error_description="revoked"', 1],
      ['Bearer realm="api"', 1],
    ] as const;
    for (const [index, [challenge, refreshes]] of cases.entries()) {
      const user = `challenged-401-${index}`;
      const { cookie, key } = await newSession(appA, user);
      const limitKey = key.replace(`${stack.keyPrefix}session:`, `${stack.keyPrefix}forced-refresh:`);
      const before = await refreshesOf(user);
      const rejected = await call(appA, challenged(challenge), cookie);
      expect(rejected, challenge).toMatchObject({ status: 401, body: { status: 401 } });
      expect((await refreshesOf(user)).ok - before.ok, challenge).toBe(refreshes);
      expect(await probe.exists(limitKey), challenge).toBe(refreshes === 1);
    }
  });

  it('a write whose token the API refuses is not sent again: its 401 goes back, but the token is replaced, so the SPA’s retry carries the new one', async () => {
    const secretsOf = (key: string) => storedSecrets(stack.appEnv.REDIS_URL as string, key, stack.appEnv.SESSION_SECRET as string);
    const requestsAtApi = async () => ((await (await fetch(`${stack.apiUrl}/__demo/stats`)).json()) as { requests: number }).requests;
    for (const method of ['POST', 'PUT', 'PATCH', 'DELETE']) {
      const user = `refused-write-${method.toLowerCase()}`;
      const { cookie, key } = await newSession(appA, user);
      const tokenBefore = (await secretsOf(key)).accessToken;
      const before = await refreshesOf(user);
      const requestsBefore = await requestsAtApi();
      const refused = await fetch(`${appA}/api/proxy/demo/status/401?challenge=${encodeURIComponent('Bearer error="invalid_token"')}`, {
        method,
        headers: { cookie, 'x-csrf': '1', 'content-type': 'application/json' },
        body: JSON.stringify({ order: 42 }),
      });
      expect([refused.status, await refused.json()], method).toEqual([401, { status: 401 }]);
      expect(await requestsAtApi(), `${method} went once`).toBe(requestsBefore + 1);
      expect((await refreshesOf(user)).ok - before.ok, method).toBe(1);
      const tokenAfter = (await secretsOf(key)).accessToken;
      expect(tokenAfter, method).not.toBe(tokenBefore);
      expect((await call(appB, WHOAMI, cookie)).status, method).toBe(200);
    }
  });

  it('a read refused alongside a write whose refusal spent the interval’s forced refresh goes again, in the other instance, with the token that refresh stored', async () => {
    const user = 'refused-read-and-write';
    const { cookie } = await newSession(appA, user);
    const before = await refreshesOf(user);
    // Every token issued so far is revoked at the API; the refreshed one, from the next second on, is not.
    const revokedBefore = Math.floor(Date.now() / 1000) + 1;
    await revokeAtDemoApi(stack.apiUrl, revokedBefore);
    try {
      await waitUntil('the second tokens are good from', revokedBefore * 1000);
      // The API holds the read's refusal; the write's comes at once, spends the forced refresh and
      // stores a new token; only then is the read refused.
      const read = call(appB, `${WHOAMI}?holdRefusal=the-read`, cookie);
      const lastAtApi = async () => ((await (await fetch(`${stack.apiUrl}/__demo/last`)).json()) as { query?: Record<string, string> }).query ?? {};
      await waitFor('the read to reach the API', async () => ((await lastAtApi()).holdRefusal ? true : undefined), 5_000, 20);
      const write = await fetch(`${appA}/api/proxy/demo/echo`, { method: 'POST', headers: { cookie, 'x-csrf': '1', 'content-type': 'application/json' }, body: '{}' });
      expect(write.status).toBe(401);
      expect((await fetch(`${stack.apiUrl}/__demo/release?id=the-read`, { method: 'POST' })).status).toBe(200);
      expect(await read).toMatchObject({ status: 200, body: { sub: user } });
      expect((await refreshesOf(user)).ok - before.ok).toBe(1);
    } finally {
      await revokeAtDemoApi(stack.apiUrl, null);
    }
  });

  it('an API that always answers 401: at most one forced refresh per session per FORCED_REFRESH_INTERVAL across instances, every 401 passed through', async () => {
    const user = 'always-401';
    const { cookie, key } = await newSession(appA, user);
    const limitKey = key.replace(`${stack.keyPrefix}session:`, `${stack.keyPrefix}forced-refresh:`);
    const before = await refreshesOf(user);

    for (let i = 0; i < 6; i++) {
      const rejected = await call(i % 2 === 0 ? appA : appB, '/api/proxy/demo/status/401', cookie);
      expect(rejected).toMatchObject({ status: 401, body: { status: 401 } });
      expect(clearsSessionCookie(rejected.setCookies)).toBe(false);
    }
    expect((await refreshesOf(user)).ok - before.ok).toBe(1);
    const limitTtl = await probe.redis.pttl(limitKey);
    expect(limitTtl).toBeGreaterThan(0);
    expect(limitTtl).toBeLessThanOrEqual(FORCED_REFRESH_INTERVAL_SEC * 1000);

    // Once the interval is over, the next 401 may force one refresh again.
    await waitFor('the forced-refresh interval to end', async () => ((await probe.exists(limitKey)) ? undefined : true), FORCED_REFRESH_INTERVAL_SEC * 1000 + 2_000);
    expect((await call(appB, '/api/proxy/demo/status/401', cookie)).status).toBe(401);
    expect((await refreshesOf(user)).ok - before.ok).toBe(2);
    expect(await call(appA, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
    expect((await refreshesOf(user)).refused).toBe(before.refused);
  });
});
