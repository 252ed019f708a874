import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import type { GrantCounters } from '../../scripts/dev-idp.ts';
import { RedisProbe, call, clearsSessionCookie, idpGrants, lastBearerAt, login, refreshGrantsOf, setIdpDelays, waitFor } from '../support/http-client.ts';
import { randomUUID } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { startLossyRedisRelay, type LossyRedisRelay } from '../support/lossy-redis-relay.ts';
import { startPrivateRedis, type PrivateRedis } from '../support/private-redis.ts';

/**
 * Transient faults never cost a session: a Redis that stops answering (a private redis-server,
 * frozen with SIGSTOP) and an IdP that stops answering are 503s naming what failed, and the same
 * session works again once they are back. /api/health names the failing dependency.
 */

let redis: PrivateRedis;
let stack: Stack;
let app: string;
let cookie: string;

beforeAll(async () => {
  redis = await startPrivateRedis();
  stack = await startStack({ workers: 1, redisUrl: redis.url, env: { OIDC_TIMEOUT_MS: '1500', REFRESH_LOCK_LEASE_MS: '3000' } });
  app = stack.apps[0]!.url;
  cookie = await login(app, 'outage-user');
});

afterAll(async () => {
  if (stack?.idp.child.pid) process.kill(stack.idp.child.pid, 'SIGCONT');
  await stack?.stop();
  redis?.stop();
});

/** A back-channel logout token for `sub`, signed by the dev IdP's key. */
async function logoutTokenFor(sub: string): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  const signed = await fetch(`${stack.issuer}/__dev/sign`, {
    method: 'POST',
    body: JSON.stringify({ payload: { iss: stack.issuer, aud: stack.clientId, sub, iat: now, exp: now + 120, jti: `outage-${sub}-${now}`, events: { 'http://schemas.openid.net/event/backchannel-logout': {} } } }),
  });
  return ((await signed.json()) as { jws: string }).jws;
}

/** Delivers `logoutToken` as the IdP does, once per call. */
function backchannelLogoutOf(logoutToken: string): () => Promise<Response> {
  return () => fetch(`${app}/api/auth/backchannel-logout`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams({ logout_token: logoutToken }) });
}

describe('transient faults', () => {
  it('health is 200 while everything answers', async () => {
    const response = await fetch(`${app}/api/health`);
    expect(response.status).toBe(200);
    expect(await response.json()).toEqual({ status: 'ok', store: 'ok', idp: 'ok' });
  });

  it('a Redis that stops answering is a 503 store_unavailable, not a logout; the session works once it is back', async () => {
    process.kill(redis.child.pid as number, 'SIGSTOP');
    try {
      const proxied = await call(app, '/api/proxy/demo/whoami', cookie);
      expect(proxied.status).toBe(503);
      expect(proxied.body).toMatchObject({ error: 'store_unavailable' });
      expect(clearsSessionCookie(proxied.setCookies)).toBe(false);
      const session = await call(app, '/api/auth/session', cookie);
      expect(session).toMatchObject({ status: 503, body: { error: 'store_unavailable' } });
      expect(clearsSessionCookie(session.setCookies)).toBe(false);
      const health = await fetch(`${app}/api/health`);
      expect(health.status).toBe(503);
      expect(await health.json()).toMatchObject({ error: 'unhealthy', store: 'unavailable', idp: 'ok' });
      // Not ready (no session can be read), but alive: a liveness probe must not restart it for this.
      const ready = await fetch(`${app}/api/health?probe=ready`);
      expect([ready.status, await ready.json()]).toEqual([503, { error: 'unhealthy', message: 'Not ready: store unavailable.', store: 'unavailable' }]);
      const live = await fetch(`${app}/api/health?probe=live`);
      expect([live.status, await live.json()]).toEqual([200, { status: 'ok' }]);
    } finally {
      process.kill(redis.child.pid as number, 'SIGCONT');
    }
    await waitFor('the session to answer again', async () => ((await call(app, '/api/proxy/demo/whoami', cookie)).status === 200 ? true : undefined), 10_000, 100);
    expect(await call(app, '/api/auth/session', cookie)).toMatchObject({ status: 200, body: { authenticated: true, user: { sub: 'outage-user' } } });
  });

  it("a back-channel logout while the IdP's keys are out of reach is a 503 the IdP can retry (not a refusal), and its retry ends the session", async () => {
    // First in this process: the keys for logout tokens are fetched when one arrives.
    const sub = 'logout-without-idp';
    const victim = await login(app, sub);
    const deliver = backchannelLogoutOf(await logoutTokenFor(sub));
    const idp = stack.idp.child.pid as number;
    process.kill(idp, 'SIGSTOP');
    try {
      const during = await deliver();
      expect(during.status).toBe(503);
      expect(await during.json()).toMatchObject({ error: 'idp_unavailable' });
    } finally {
      process.kill(idp, 'SIGCONT');
    }
    expect((await call(app, '/api/proxy/demo/whoami', victim)).status).toBe(200);
    expect((await deliver()).status).toBe(200);
    expect(await call(app, '/api/proxy/demo/whoami', victim)).toMatchObject({ status: 401, body: { error: 'session_expired' } });
    // A token the IdP did not sign is still refused outright, with the keys at hand.
    const forged = backchannelLogoutOf(`${(await logoutTokenFor(sub)).slice(0, -4)}AAAA`);
    expect((await forged()).status).toBe(400);
  });

  it('a back-channel logout that meets a frozen Redis is a 503 the IdP can retry, and its retry of the same token ends the session', async () => {
    const sub = 'logout-during-outage';
    const victim = await login(app, sub);
    expect((await call(app, '/api/proxy/demo/whoami', victim)).status).toBe(200);
    const deliver = backchannelLogoutOf(await logoutTokenFor(sub));

    process.kill(redis.child.pid as number, 'SIGSTOP');
    try {
      const during = await deliver();
      expect(during.status).toBe(503);
      expect(await during.json()).toMatchObject({ error: 'store_unavailable' });
    } finally {
      // What this instance sent to the frozen server runs now, as after a real blip.
      process.kill(redis.child.pid as number, 'SIGCONT');
    }
    await waitFor('the store to answer again', async () => ((await fetch(`${app}/api/health`)).status === 200 ? true : undefined), 10_000, 100);
    const retried = await deliver();
    expect(retried.status).toBe(200);
    const after = await call(app, '/api/proxy/demo/whoami', victim);
    expect(after).toMatchObject({ status: 401, body: { error: 'session_expired' } });
    // Used up now: a replay of it is refused.
    expect((await deliver()).status).toBe(400);
  });

  it('a POST logout whose store takes no writes (Redis out of memory) is a 503 that leaves the session; its retry signs out', async () => {
    const victim = await login(app, 'logout-without-writes');
    const { Redis } = await import('ioredis');
    const admin = new Redis(redis.url);
    const logout = () => fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie: victim, 'x-csrf': '1' } });
    try {
      // Under noeviction a full Redis refuses every write (OOM) and still reads and deletes: the
      // way on to the IdP cannot be stored, and the session must not have been ended first.
      await admin.config('SET', 'maxmemory-policy', 'noeviction');
      await admin.config('SET', 'maxmemory', '1');
      const refused = await logout();
      expect(refused.status).toBe(503);
      expect(await refused.json()).toMatchObject({ error: 'store_unavailable' });
      expect(clearsSessionCookie(refused.headers.getSetCookie())).toBe(false);
    } finally {
      await admin.config('SET', 'maxmemory', '0');
      admin.disconnect();
    }
    expect(await call(app, '/api/auth/session', victim)).toMatchObject({ status: 200, body: { authenticated: true, user: { sub: 'logout-without-writes' } } });
    const retried = await logout();
    expect(retried.status).toBe(200);
    expect(await retried.json()).toEqual({ redirectTo: '/api/auth/logout?continue=1' });
    expect(await call(app, '/api/auth/session', victim)).toMatchObject({ status: 200, body: { authenticated: false } });
  });

  it('a flood of health requests is not one at the IdP: one discovery check at a time, its answer reused for 2 s', async () => {
    await setIdpDelays(stack.issuer, { discoveryMs: 300 });
    try {
      // A flood that found an answer still reused from an earlier check asks nothing: flood until one does ask.
      const checks = await waitFor('a flood that checks the IdP again', async () => {
        const before = (await setIdpDelays(stack.issuer, {})).delayed.discovery;
        const answers = await Promise.all(Array.from({ length: 40 }, () => fetch(`${app}/api/health`).then((res) => res.status)));
        expect(answers.every((status) => status === 200)).toBe(true);
        const asked = (await setIdpDelays(stack.issuer, {})).delayed.discovery - before;
        return asked > 0 ? asked : undefined;
      }, 10_000, 250);
      // One per copy of the auth module in the process (server.ts's and Next's bundle) at most.
      expect(checks).toBeLessThanOrEqual(2);
    } finally {
      await setIdpDelays(stack.issuer, { discoveryMs: 0 });
    }
  });

  it('an IdP that stops answering makes health 503 naming the IdP; proxied calls with a fresh token are unaffected', async () => {
    const idp = stack.idp.child.pid as number;
    process.kill(idp, 'SIGSTOP');
    try {
      // Within 2 s (and the IdP timeout) of the last check that still reached it.
      const health = await waitFor('health to say the IdP is away', async () => {
        const res = await fetch(`${app}/api/health`);
        return res.status === 503 ? res : (await res.body?.cancel(), undefined);
      }, 10_000, 200);
      expect(await health.json()).toMatchObject({ store: 'ok', idp: 'unavailable' });
      expect((await call(app, '/api/proxy/demo/whoami', cookie)).status).toBe(200);
      // Signed-in users' calls need only the store: a readiness probe keeps every instance in the balancer.
      for (const probe of ['ready', 'live']) {
        const answer = await fetch(`${app}/api/health?probe=${probe}`);
        expect([probe, answer.status, await answer.json()]).toEqual([probe, 200, probe === 'ready' ? { status: 'ok', store: 'ok' } : { status: 'ok' }]);
      }
    } finally {
      process.kill(idp, 'SIGCONT');
    }
  });
});

// Both describes below run a stack whose tokens are due 10 s after each refresh.
const TTL_SEC = 60;
const SKEW_SEC = 50;

/**
 * Signs `user` in on `own`'s first app (a proxied call answers 200) and waits, reading the store at `redisUrl`, until the token
 * is due; answers the cookie, the session's lock key, the access token it holds (due, not spent), and the IdP's grant counters at that moment.
 */
async function signedInAndDue(own: Stack, redisUrl: string, user: string) {
  const cookie = await login(own.apps[0]!.url, user);
  expect((await call(own.apps[0]!.url, '/api/proxy/demo/whoami', cookie)).status).toBe(200);
  const heldToken = await lastBearerAt(own.apiUrl);
  const probe = new RedisProbe(own.keyPrefix, redisUrl);
  try {
    await probe.waitUntilDue(user, SKEW_SEC);
    const lockKey = probe.lockKeyFor((await probe.sessionKeyOf(user)) as string);
    return { cookie, lockKey, heldToken, before: await idpGrants(own.issuer) };
  } finally {
    await probe.close();
  }
}

/** Refresh grants for `user` and refused refresh grants since `before`, from the IdP's counters. */
async function refreshesSince(own: Stack, before: GrantCounters, user: string) {
  const after = await idpGrants(own.issuer);
  return { refreshed: refreshGrantsOf(after, user) - refreshGrantsOf(before, user), refused: (after.error.refresh_token ?? 0) - (before.error.refresh_token ?? 0) };
}

/**
 * The store goes away between the IdP's answer and the write-back of the rotated tokens (a Redis
 * restart or failover at the wrong moment; a frozen Redis would not do: the write queued in its
 * socket still lands when it resumes). Giving the write-back up would strand the new
 * refresh token, and the next refresh would replay the old one: a second grant here, and with an IdP
 * that detects reuse a revoked grant and a lost session (the restart-redis-aof run of
 * `npm run bench:load` saw 17 of 100). The write-back is retried instead.
 */
describe('the store away while a refresh writes back', () => {
  let ownRedis: PrivateRedis;
  let ownStack: Stack;
  let redisDir: string;
  // Due 10 s after each refresh (TTL_SEC, SKEW_SEC): the outage below must not outlast the new
  // token's freshness, or the next call would rightly refresh again.

  beforeAll(async () => {
    // Persistent, so a restart keeps the sessions, as a production Redis does.
    redisDir = mkdtempSync(path.join(tmpdir(), 'gatehouse-aof-'));
    ownRedis = await startPrivateRedis(['--appendonly', 'yes', '--appendfsync', 'always', '--dir', redisDir]);
    ownStack = await startStack({ workers: 1, redisUrl: ownRedis.url, accessTokenTtl: TTL_SEC, env: { TOKEN_REFRESH_SKEW: String(SKEW_SEC), OIDC_TIMEOUT_MS: '8000', REFRESH_LOCK_LEASE_MS: '20000' } });
  });

  afterAll(async () => {
    if (ownRedis?.child.pid) process.kill(ownRedis.child.pid, 'SIGCONT');
    if (ownStack) await setIdpDelays(ownStack.issuer, { tokenMs: 0 }).catch(() => undefined);
    await ownStack?.stop();
    ownRedis?.stop();
    rmSync(redisDir, { recursive: true, force: true });
  });

  it('the rotated tokens are stored once the store is back: one grant, no replay, the session goes on', async () => {
    const user = 'write-back-outage';
    const ownApp = ownStack.apps[0]!.url;
    const { cookie: ownCookie, before, heldToken } = await signedInAndDue(ownStack, ownRedis.url, user);
    const delays = await setIdpDelays(ownStack.issuer, { tokenMs: 600 });
    let during;
    try {
      const pending = call(ownApp, '/api/proxy/demo/whoami', ownCookie);
      // The grant is at the IdP (so the lock is held): now Redis restarts, down for 3 s, and the
      // IdP answers meanwhile, so the first write-backs are refused (connection refused).
      await waitFor('the grant to reach the IdP', async () => ((await setIdpDelays(ownStack.issuer, {})).delayed.token > delays.delayed.token ? true : undefined), 5_000, 20);
      const restarted = ownRedis.restart(3_000);
      during = await pending;
      await restarted;
    } finally {
      await setIdpDelays(ownStack.issuer, { tokenMs: 0 });
    }
    // The caller stopped waiting while the write-back waited on the store. It goes on with the token
    // the session holds (due, not spent) only if the store, back or not, still shows that token
    // within a moment; otherwise it is told the store is away. Never an end.
    if (during.status === 200) {
      expect(during.body).toMatchObject({ sub: user });
      expect(await lastBearerAt(ownStack.apiUrl)).toBe(heldToken);
    } else {
      expect(during).toMatchObject({ status: 503, body: { error: 'store_unavailable' } });
      expect(Number(during.headers.get('retry-after'))).toBeGreaterThan(0);
    }
    expect(clearsSessionCookie(during.setCookies)).toBe(false);
    // The write-back lands once the store is back: the session goes on with the rotated tokens.
    await waitFor('the rotated tokens to be used', async () => {
      expect(await call(ownApp, '/api/proxy/demo/whoami', ownCookie)).toMatchObject({ status: 200, body: { sub: user } });
      return (await lastBearerAt(ownStack.apiUrl)) !== heldToken ? true : undefined;
    }, 15_000, 200);
    expect(await refreshesSince(ownStack, before, user)).toEqual({ refreshed: 1, refused: 0 });
  }, 60_000);

  it('a lock the store refused to release is released once it is back, not left for its whole lease', async () => {
    // The IdP fails the grant (slowly, 503) while Redis restarts: the refresh ends, its release is
    // refused. Left behind, the lock (kept by the append-only file) would hold every call of this
    // session at 503 until its 20 s lease ran out, as the cluster failover load run showed.
    const user = 'release-outage';
    const ownApp = ownStack.apps[0]!.url;
    const { cookie: ownCookie, lockKey, before, heldToken } = await signedInAndDue(ownStack, ownRedis.url, user);
    await fetch(`${ownStack.issuer}/__dev/token-fault?status=503&count=1`, { method: 'POST' });
    const delays = await setIdpDelays(ownStack.issuer, { tokenMs: 1_500 });
    let during;
    try {
      const pending = call(ownApp, '/api/proxy/demo/whoami', ownCookie);
      await waitFor('the grant to reach the IdP', async () => ((await setIdpDelays(ownStack.issuer, {})).delayed.token > delays.delayed.token ? true : undefined), 5_000, 20);
      const restarted = ownRedis.restart(4_000);
      during = await pending;
      await restarted;
    } finally {
      await setIdpDelays(ownStack.issuer, { tokenMs: 0 });
    }
    // The token held (due, not spent) goes out only if the store still shows it, and the store is
    // away: "retry shortly", the session kept.
    expect(during).toMatchObject({ status: 503, body: { error: 'idp_unavailable' } });
    expect(clearsSessionCookie(during.setCookies)).toBe(false);
    const probe = new RedisProbe(ownStack.keyPrefix, ownRedis.url);
    try {
      await waitFor('the refused release to land', async () => ((await probe.exists(lockKey)) ? undefined : true), 3_000, 50);
    } finally {
      await probe.close();
    }
    // The next call refreshes at once; a lock left for its lease would hold it off for 20 s.
    expect(await call(ownApp, '/api/proxy/demo/whoami', ownCookie)).toMatchObject({ status: 200, body: { sub: user } });
    expect(await lastBearerAt(ownStack.apiUrl)).not.toBe(heldToken);
    expect(await refreshesSince(ownStack, before, user)).toEqual({ refreshed: 1, refused: 0 });
  }, 60_000);
});

/**
 * The lock taken, its answer lost: Redis executed the SET NX, the connection dropped before the
 * reply (a master killed after its replica had the write does this; the cluster failover load run
 * left sessions answering 503 for the rest of a 25 s lease that way). The client resends the
 * command once reconnected and is told "taken" — by itself. Nobody would release that lock.
 */
describe('a refresh lock whose answer was lost', () => {
  let ownRedis: PrivateRedis;
  let relay: LossyRedisRelay;
  let ownStack: Stack;

  beforeAll(async () => {
    ownRedis = await startPrivateRedis();
    relay = await startLossyRedisRelay(ownRedis.url);
    ownStack = await startStack({ workers: 1, redisUrl: relay.url, accessTokenTtl: TTL_SEC, env: { TOKEN_REFRESH_SKEW: String(SKEW_SEC), OIDC_TIMEOUT_MS: '8000', REFRESH_LOCK_LEASE_MS: '20000' } });
  });

  afterAll(async () => {
    await ownStack?.stop();
    await relay?.close();
    ownRedis?.stop();
  });

  it('is recognised as ours: the session refreshes within seconds, not after the 20 s lease', async () => {
    const user = 'lost-lock-answer';
    const ownApp = ownStack.apps[0]!.url;
    const { cookie: ownCookie, before } = await signedInAndDue(ownStack, ownRedis.url, user);
    const cut = relay.loseAnswerTo('refresh-lock:');
    const first = await call(ownApp, '/api/proxy/demo/whoami', ownCookie);
    await cut;
    expect([200, 503]).toContain(first.status);
    expect(clearsSessionCookie(first.setCookies)).toBe(false);
    const cutAt = Date.now();
    await waitFor('the session to answer 200 again', async () => ((await call(ownApp, '/api/proxy/demo/whoami', ownCookie)).status === 200 ? true : undefined), 5_000, 200);
    expect(Date.now() - cutAt).toBeLessThan(5_000);
    expect(await refreshesSince(ownStack, before, user)).toEqual({ refreshed: 1, refused: 0 });
  }, 60_000);
});

describe('an IdP whose token answer stalls after its status line', () => {
  let ownStack: Stack;

  beforeAll(async () => {
    // Every call is due for a refresh (the skew outlasts the token); a refresh gets about 2 s (its
    // lock's lease, less a margin), any other IdP call OIDC_TIMEOUT_MS.
    ownStack = await startStack({
      workers: 1,
      accessTokenTtl: 60,
      apis: ({ apiUrl }) => ({ demo: { url: apiUrl }, machine: { url: apiUrl, auth: 'client' } }),
      env: { TOKEN_REFRESH_SKEW: '120', OIDC_TIMEOUT_MS: '1000', REFRESH_LOCK_LEASE_MS: '3000' },
    });
  });

  afterAll(async () => {
    await ownStack?.stop();
  });

  it('is an IdP not answering (503 idp_unavailable, retryable), not a refusal; the session is kept and refreshes once the IdP answers', async () => {
    const ownApp = ownStack.apps[0]!.url;
    const user = 'stalled-token-answer';
    const ownCookie = await login(ownApp, user);
    // The login's token is due at once (the skew outlasts it), and has a minute to run.
    expect((await call(ownApp, '/api/proxy/demo/whoami', ownCookie)).status).toBe(200);
    const heldToken = await lastBearerAt(ownStack.apiUrl);
    const before = await idpGrants(ownStack.issuer);
    // A 200 whose body stops after `{"access_token":`: what a proxy cutting the answer, or an IdP hanging mid-write, looks like.
    await fetch(`${ownStack.issuer}/__dev/token-fault?stall=1&count=1`, { method: 'POST' });
    const stalled = await call(ownApp, '/api/proxy/demo/whoami', ownCookie);
    // Not a refusal (502 idp_error, which no held token would outlive): an outage, so the call goes
    // on with the token the session holds (due, not spent), and the session is kept.
    expect(stalled).toMatchObject({ status: 200, body: { sub: user } });
    expect(await lastBearerAt(ownStack.apiUrl)).toBe(heldToken);
    expect(clearsSessionCookie(stalled.setCookies)).toBe(false);
    // Once the pause after the fault is over, the session refreshes: one grant, nothing refused.
    await waitFor('the session to refresh once the IdP answers', async () => {
      expect(await call(ownApp, '/api/proxy/demo/whoami', ownCookie)).toMatchObject({ status: 200, body: { sub: user } });
      return (await lastBearerAt(ownStack.apiUrl)) !== heldToken ? true : undefined;
    }, 8_000, 100);
    expect(await refreshesSince(ownStack, before, user)).toEqual({ refreshed: 1, refused: 0 });

    // The BFF's own grant, under OIDC_TIMEOUT_MS: the same stall is a 503 with a Retry-After, never "refused".
    await fetch(`${ownStack.issuer}/__dev/token-fault?stall=1&count=1`, { method: 'POST' });
    const machine = await call(ownApp, '/api/proxy/machine/whoami', ownCookie);
    expect(machine).toMatchObject({ status: 503, body: { error: 'idp_unavailable' } });
    expect(Number(machine.headers.get('retry-after'))).toBeGreaterThan(0);
    expect(clearsSessionCookie(machine.setCookies)).toBe(false);
  }, 30_000);

  it('a session signed out while its call waited on the IdP never has its token sent, though the token had time to run', async () => {
    const ownApp = ownStack.apps[0]!.url;
    const user = 'ended-while-waiting';
    const ownCookie = await login(ownApp, user);
    // Refreshed once: the token held now has a minute to run, and is due at once (the skew outlasts it).
    expect((await call(ownApp, '/api/proxy/demo/whoami', ownCookie)).status).toBe(200);
    const probe = `ended-${randomUUID()}`;
    const delays = await setIdpDelays(ownStack.issuer, { tokenMs: 3_000 });
    let waited;
    try {
      const pending = call(ownApp, `/api/proxy/demo/whoami?probe=${probe}`, ownCookie);
      await waitFor('the grant to reach the IdP', async () => ((await setIdpDelays(ownStack.issuer, {})).delayed.token > delays.delayed.token ? true : undefined), 5_000, 20);
      const signedOut = await fetch(`${ownApp}/api/auth/logout`, { method: 'POST', headers: { cookie: ownCookie, 'x-csrf': '1' } });
      expect(signedOut.status).toBe(200);
      waited = await pending;
    } finally {
      await setIdpDelays(ownStack.issuer, { tokenMs: 0 });
    }
    expect(waited).toMatchObject({ status: 503, body: { error: 'idp_unavailable' } });
    const last = (await (await fetch(`${ownStack.apiUrl}/__demo/last`)).json()) as { query?: Record<string, string> };
    expect(last.query?.probe).not.toBe(probe);
    expect((await call(ownApp, '/api/proxy/demo/whoami', ownCookie)).status).toBe(401);
  }, 30_000);
});
