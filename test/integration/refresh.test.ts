// Transparent token refresh across instances, against real processes: the dev IdP (oidc-provider,
// rotating refresh tokens, reuse of a rotated one revokes the grant), the demo API, real Redis and
// two Gatehouse instances (two cluster workers each, so four processes) on different ports.
//
// Refreshes are counted where they happen — at the IdP (/__dev/grants) — never inside Gatehouse.
// With rotation a second refresh for the same session is not just wasteful: it would replay a used
// refresh token and end the session, so "exactly one refresh_token grant" is the single-flight proof.
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultServerShape, startStack, type Stack } from '../../e2e/support/stack.ts';
import {
  RedisProbe,
  call,
  clearsSessionCookie,
  idpGrants,
  isAlive,
  processTree,
  refreshGrantsOf,
  revokeIdpGrants,
  lastBearerAt,
  signInAll,
  summarize,
  waitFor,
  waitUntil,
  type CallResult,
  type SignedInUsers,
} from '../support/http-client.ts';

// Access tokens live 40 s and are "due" 34 s before expiry: 6 s after login (or after a refresh).
// The 6 s after a refresh are the window in which a burst must finish to see exactly one refresh.
const ACCESS_TOKEN_TTL_SEC = 40;
const REFRESH_SKEW_SEC = 34;
const OIDC_TIMEOUT_MS = 1_500;
const LOCK_LEASE_MS = 3_000;
const WHOAMI = '/api/proxy/demo/whoami';

const SOLO = 'refresh-solo';
const MANY = Array.from({ length: 20 }, (_, i) => `refresh-many-${String(i).padStart(2, '0')}`);
const REVOKED = 'refresh-revoked';
const OUTAGE = 'refresh-outage';
const ORPHAN = 'refresh-orphan-lock';
const LOGGED_OUT = 'refresh-logout-elsewhere';
const REPLACED_MIDWAY = 'refresh-replaced-midway';
const USERS = [SOLO, ...MANY, REVOKED, OUTAGE, ORPHAN, LOGGED_OUT, REPLACED_MIDWAY];

let stack: Stack;
let probe: RedisProbe;
let appA: string;
let appB: string;
let cookieOf: SignedInUsers['cookieOf'];
let keyOf: SignedInUsers['keyOf'];

/** Waits until Gatehouse considers the user's stored access token due for a refresh. */
async function waitUntilDue(user: string): Promise<void> {
  const record = await probe.record(keyOf(user));
  if (!record?.accessTokenExpiresAt) throw new Error(`${user}: no stored access token expiry`);
  // +50 ms: strictly past the skew boundary on every process's clock reading.
  await waitUntil(`${user}'s token to become due`, record.accessTokenExpiresAt - REFRESH_SKEW_SEC * 1000 + 50);
}

function refreshErrors(grants: Awaited<ReturnType<typeof idpGrants>>): number {
  return grants.error.refresh_token ?? 0;
}

/**
 * After an abandoned refresh (timed out, or its owner died) the IdP may still run the buffered
 * token request once it resumes: with rotation that consumes the refresh token, the response goes
 * to a closed socket, and Gatehouse's next refresh is a replay that the IdP answers with
 * invalid_grant (revoking the grant). Whether the IdP runs or drops the half-closed request is up
 * to the IdP (observed both ways with oidc-provider), so this accepts exactly two outcomes, each
 * pinned down by the IdP's own counters:
 *  - 200: the session survived; the IdP ran exactly one refresh grant for it and refused none;
 *  - 401 session_expired (cookie cleared, key gone) only when the IdP did run the abandoned
 *    grant: exactly one successful refresh that Gatehouse never received, plus exactly one
 *    invalid_grant for the replay. Anything else (503, a stuck lock, a second refresh, a session
 *    dropped although the IdP never consumed its token) fails.
 * The call checked may also arrive after an earlier call's refresh (left running when that call was
 * told to retry, tokens.ts `answerWithin`) met the replay's invalid_grant and ended the session: it
 * must hear the same 401 session_expired from the marker that ending left.
 */
async function expectRecoveredUnlessIdpRanTheAbandonedGrant(user: string, before: Awaited<ReturnType<typeof idpGrants>>, result: CallResult): Promise<void> {
  const grants = await idpGrants(stack.issuer);
  const refreshed = refreshGrantsOf(grants, user) - refreshGrantsOf(before, user);
  const refused = refreshErrors(grants) - refreshErrors(before);
  const replays = (grants.errorCodes.invalid_grant ?? 0) - (before.errorCodes.invalid_grant ?? 0);
  const key = keyOf(user);
  if (result.status === 200) {
    expect(result.body).toMatchObject({ sub: user });
    expect({ refreshed, refused }).toEqual({ refreshed: 1, refused: 0 });
    expect(await probe.exists(key)).toBe(true);
  } else {
    expect(result.status).toBe(401);
    expect(result.body).toMatchObject({ error: 'session_expired' });
    expect({ refreshed, refused, replays }).toEqual({ refreshed: 1, refused: 1, replays: 1 });
    expect(clearsSessionCookie(result.setCookies)).toBe(true);
    expect(await probe.exists(key)).toBe(false);
    console.warn(`[refresh.test] ${user}: the IdP ran the abandoned refresh grant after resuming; the session ended (${String((result.body as { error?: unknown }).error)}; see the limitation noted in the test file)`);
  }
  expect(await probe.exists(probe.lockKeyFor(key))).toBe(false);
}

/** Bytes that reached connections on this local port and are not read yet: a request waiting at a frozen server. */
function unreadBytesAt(port: number): number {
  let unread = 0;
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    for (const line of readFileSync(table, 'utf8').trim().split('\n').slice(1)) {
      // sl local_address rem_address st tx_queue:rx_queue …, in hex; 01 is ESTABLISHED.
      const [, local, , state, queues] = line.trim().split(/\s+/);
      if (state === '01' && parseInt(local?.split(':').pop() ?? '', 16) === port) unread += parseInt(queues?.split(':')[1] ?? '0', 16);
    }
  }
  return unread;
}

function sigcont(pid: number): void {
  try {
    process.kill(pid, 'SIGCONT');
  } catch {
    // Already gone: nothing left to resume.
  }
}

beforeAll(async () => {
  stack = await startStack({
    instances: 2,
    workers: 2,
    accessTokenTtl: ACCESS_TOKEN_TTL_SEC,
    env: {
      TOKEN_REFRESH_SKEW: String(REFRESH_SKEW_SEC),
      OIDC_TIMEOUT_MS: String(OIDC_TIMEOUT_MS),
      REFRESH_LOCK_LEASE_MS: String(LOCK_LEASE_MS),
      // A caller waits as long as one IdP call may take (refresh-wait.test.ts holds the default).
      REFRESH_WAIT_MS: String(OIDC_TIMEOUT_MS),
    },
  });
  probe = new RedisProbe(stack.keyPrefix);
  [appA, appB] = stack.apps.map((app) => app.url) as [string, string];
  ({ cookieOf, keyOf } = await signInAll(USERS, [appA, appB], probe));
}, 60_000);

afterAll(async () => {
  // Never leave the IdP frozen, whatever failed.
  if (stack?.idp.child.pid) sigcont(stack.idp.child.pid);
  await probe?.cleanup();
  await probe?.close();
  await stack?.stop();
});

describe('transparent token refresh across two instances', () => {
  it('200 concurrent requests for one due session: all succeed, the IdP sees exactly one refresh', async () => {
    // Warm every worker and keep-alive connection while the token is still fresh, so the burst
    // below reaches all four processes at the same moment instead of trickling in behind a
    // first, slower request (which would let a broken lock go unnoticed).
    const warmup = await Promise.all(Array.from({ length: 40 }, (_, i) => call(i % 2 === 0 ? appA : appB, WHOAMI, cookieOf(SOLO))));
    expect(summarize(warmup)).toEqual({ '200': 40 });
    const before = await idpGrants(stack.issuer);
    expect(refreshGrantsOf(before, SOLO)).toBe(0);
    const recordBefore = await probe.record(keyOf(SOLO));
    await waitUntilDue(SOLO);

    const results = await Promise.all(
      Array.from({ length: 200 }, (_, i) => call(i % 2 === 0 ? appA : appB, WHOAMI, cookieOf(SOLO))),
    );

    expect(summarize(results)).toEqual({ '200': 200 });
    for (const result of results) expect(result.body).toMatchObject({ sub: SOLO });
    const after = await idpGrants(stack.issuer);
    expect(refreshGrantsOf(after, SOLO)).toBe(1);
    expect(refreshErrors(after)).toBe(refreshErrors(before));
    expect(refreshErrors(after)).toBe(0);
    // The new token is in the store, and nobody still holds the lock.
    const recordAfter = await probe.record(keyOf(SOLO));
    expect(recordAfter?.accessTokenExpiresAt).toBeGreaterThan(recordBefore?.accessTokenExpiresAt ?? Infinity);
    expect(recordAfter?.sealed).not.toBe(recordBefore?.sealed);
    expect(await probe.exists(probe.lockKeyFor(keyOf(SOLO)))).toBe(false);
  });

  it('20 due sessions at once, 10 requests each over both instances: exactly one refresh per session', async () => {
    const before = await idpGrants(stack.issuer);
    for (const user of MANY) expect(refreshGrantsOf(before, user)).toBe(0);
    for (const user of MANY) await waitUntilDue(user);

    const results = await Promise.all(
      MANY.flatMap((user) => Array.from({ length: 10 }, (_, i) => call(i % 2 === 0 ? appA : appB, WHOAMI, cookieOf(user)).then((result) => ({ user, result })))),
    );

    expect(summarize(results.map(({ result }) => result))).toEqual({ '200': 200 });
    for (const { user, result } of results) expect(result.body).toMatchObject({ sub: user });
    const after = await idpGrants(stack.issuer);
    expect(Object.fromEntries(MANY.map((user) => [user, refreshGrantsOf(after, user)]))).toEqual(Object.fromEntries(MANY.map((user) => [user, 1])));
    expect(refreshErrors(after)).toBe(0);
  });

  it('a refresh token revoked at the IdP ends the session: 401 session_expired, cookie cleared, key gone', async () => {
    const key = keyOf(REVOKED);
    expect(await probe.exists(key)).toBe(true);
    expect(await revokeIdpGrants(stack.issuer, REVOKED)).toBeGreaterThan(0);
    await waitUntilDue(REVOKED);

    const result = await call(appB, WHOAMI, cookieOf(REVOKED));

    expect(result.status).toBe(401);
    expect(result.body).toMatchObject({ error: 'session_expired' });
    expect(clearsSessionCookie(result.setCookies)).toBe(true);
    expect(await probe.exists(key)).toBe(false);
    expect(await probe.exists(probe.lockKeyFor(key))).toBe(false);
    // The IdP refused exactly that one grant; Gatehouse did not retry it.
    const grants = await idpGrants(stack.issuer);
    expect(grants.errorCodes.invalid_grant).toBe(1);
    // And the session stays ended on the other instance too, saying why to every request that still
    // carries the cookie (a call that was in flight, another tab), not only to the first.
    const again = await call(appA, '/api/auth/session', cookieOf(REVOKED));
    expect(again.body).toEqual({ authenticated: false, endedBy: 'expired' });
    expect(clearsSessionCookie(again.setCookies)).toBe(true);
    for (const app of [appA, appB]) {
      const later = await call(app, WHOAMI, cookieOf(REVOKED));
      expect(later).toMatchObject({ status: 401, body: { error: 'session_expired', message: 'Your session has ended. Sign in again.' } });
      expect(clearsSessionCookie(later.setCookies)).toBe(true);
    }
    // No second refusal: the later calls were answered from the marker, not by asking the IdP again.
    expect((await idpGrants(stack.issuer)).errorCodes.invalid_grant).toBe(1);
  });

  it('an IdP outage during a refresh: after REFRESH_WAIT_MS the call goes through with the token the session holds, the session kept; when the IdP answers late, its tokens are kept and used', async () => {
    const key = keyOf(OUTAGE);
    const idpPid = stack.idp.child.pid as number;
    // The token the session holds (a call refreshes it first if it is already due), and its due moment.
    expect((await call(appA, WHOAMI, cookieOf(OUTAGE))).status).toBe(200);
    const heldToken = await lastBearerAt(stack.apiUrl);
    await waitUntilDue(OUTAGE);
    const before = await idpGrants(stack.issuer);

    // Frozen, not closed: the listening socket stays, so connects succeed and nothing answers —
    // the nastiest kind of outage (no fast "connection refused").
    process.kill(idpPid, 'SIGSTOP');
    let during: CallResult;
    try {
      during = await call(appA, WHOAMI, cookieOf(OUTAGE));
    } finally {
      process.kill(idpPid, 'SIGCONT');
    }

    expect(during).toMatchObject({ status: 200, body: { sub: OUTAGE } });
    // Due, not spent: the token still had about REFRESH_SKEW_SEC to run.
    expect(await lastBearerAt(stack.apiUrl)).toBe(heldToken);
    expect(clearsSessionCookie(during.setCookies)).toBe(false);
    // It waited for the refresh as long as REFRESH_WAIT_MS allows, then used the token it holds.
    expect(during.ms).toBeGreaterThanOrEqual(OIDC_TIMEOUT_MS - 100);
    expect(during.ms).toBeLessThan(OIDC_TIMEOUT_MS + 1_500);
    expect(await probe.exists(key)).toBe(true);

    // The grant outlived the caller's wait: it kept the lock and waited for the resumed IdP, so the
    // rotated tokens were stored rather than stranded, and the session carries on with them.
    const after = await call(appB, WHOAMI, cookieOf(OUTAGE));
    expect(after).toMatchObject({ status: 200, body: { sub: OUTAGE } });
    expect(after.ms).toBeLessThan(LOCK_LEASE_MS);
    expect(await lastBearerAt(stack.apiUrl)).not.toBe(heldToken);
    const grants = await idpGrants(stack.issuer);
    expect({ refreshed: refreshGrantsOf(grants, OUTAGE) - refreshGrantsOf(before, OUTAGE), refused: refreshErrors(grants) - refreshErrors(before) }).toEqual({ refreshed: 1, refused: 0 });
    expect(await probe.exists(probe.lockKeyFor(key))).toBe(false);
  });

  // Must stay the last test: it kills instance A for good.
  it('a logout on one instance is seen at once by every process of the other, which answered from its coherent copy until then', async () => {
    const cookie = cookieOf(LOGGED_OUT);
    // Several connections at once, twice, so both of B's workers hold a copy of the session.
    for (let round = 0; round < 2; round++) {
      const warm = await Promise.all(Array.from({ length: 8 }, () => call(appB, WHOAMI, cookie)));
      expect(summarize(warm)).toEqual({ '200': 8 });
    }
    const logout = await call(appA, '/api/auth/logout', cookie, { method: 'POST' });
    expect(logout.status).toBe(200);
    expect(await probe.exists(keyOf(LOGGED_OUT))).toBe(false);

    const after = await Promise.all(Array.from({ length: 8 }, () => call(appB, WHOAMI, cookie)));
    expect(summarize(after)).toEqual({ '401 unauthenticated': 8 });
    for (const result of after) expect(clearsSessionCookie(result.setCookies)).toBe(true);
  });

  it('a session a new login replaces while its refresh is at the IdP: the refused refresh answers session_replaced and leaves the new cookie and the marker alone', async () => {
    const key = keyOf(REPLACED_MIDWAY);
    const markerKey = key.replace(`${stack.keyPrefix}session:`, `${stack.keyPrefix}ended:`);
    await waitUntilDue(REPLACED_MIDWAY);
    // What the new login's callback does to the old refresh token (revoked), done up front: the
    // IdP will refuse the refresh that is about to start.
    expect(await revokeIdpGrants(stack.issuer, REPLACED_MIDWAY)).toBeGreaterThan(0);
    const before = await idpGrants(stack.issuer);
    const idpPid = stack.idp.child.pid as number;
    process.kill(idpPid, 'SIGSTOP');
    let result: CallResult;
    try {
      const pending = call(appA, WHOAMI, cookieOf(REPLACED_MIDWAY));
      // Past its re-read under the lock: the token request sits unread in the frozen IdP's socket...
      await waitFor('the refresh request to reach the IdP', () => (unreadBytesAt(Number(new URL(stack.issuer).port)) > 0 ? true : undefined), OIDC_TIMEOUT_MS - 500, 10);
      // ...when the callback of a new login in the same browser ends the session (lib/session.ts replaceSession).
      await probe.redis.multi().set(markerKey, 'replaced', 'PX', 60_000).del(key).exec();
      process.kill(idpPid, 'SIGCONT');
      result = await pending;
    } finally {
      sigcont(idpPid);
    }
    // The browser already holds the new session's cookie: the answer must not clear it.
    expect(result.status).toBe(401);
    expect(result.body).toMatchObject({ error: 'session_replaced' });
    expect(clearsSessionCookie(result.setCookies)).toBe(false);
    expect(await probe.redis.get(markerKey)).toBe('replaced');
    // The IdP did refuse it (the path this checks), once.
    const after = await idpGrants(stack.issuer);
    expect((after.errorCodes.invalid_grant ?? 0) - (before.errorCodes.invalid_grant ?? 0)).toBe(1);
    expect(await call(appB, WHOAMI, cookieOf(REPLACED_MIDWAY))).toMatchObject({ status: 401, body: { error: 'session_replaced' } });
    expect(await probe.exists(probe.lockKeyFor(key))).toBe(false);
    await probe.redis.del(markerKey);
  });

  it('an instance killed while holding the refresh lock: the other instance takes over after the lease, within the bound', async () => {
    // Design: the IdP is frozen *before* A's refresh starts, so A's token request is at most sitting
    // unread in the IdP's socket buffer when A dies. The kernel then closes A's sockets (FIN), and
    // the resumed IdP drops the half-closed request without running the grant; A's refresh token is
    // therefore never consumed, and B's refresh with that same token is legitimate. That makes the
    // strict outcome — B answers 200 after the lease, the IdP sees exactly one successful refresh
    // and no replay — a meaningful assertion about what Gatehouse controls (the lease, the waiters'
    // bound, no stale lock). Had the IdP processed the dead owner's grant, B would get
    // invalid_grant (a real-world limitation of rotation without a reuse grace period) and the
    // refresh counters below would say so explicitly.
    const key = keyOf(ORPHAN);
    const lockKey = probe.lockKeyFor(key);
    const idpPid = stack.idp.child.pid as number;
    const appAProcess = stack.apps[0]?.process.child;
    if (!appAProcess?.pid) throw new Error('instance A has no pid');
    await waitUntilDue(ORPHAN);
    const before = await idpGrants(stack.issuer);

    process.kill(idpPid, 'SIGSTOP');
    let lockTtlAtTakeover: number;
    let lockSeenAt: number;
    try {
      const viaA = call(appA, WHOAMI, cookieOf(ORPHAN)).then(
        (result) => ({ ok: true as const, result }),
        (error: unknown) => ({ ok: false as const, error }),
      );
      lockSeenAt = await waitFor('instance A to take the refresh lock', async () => ((await probe.exists(lockKey)) ? Date.now() : undefined), OIDC_TIMEOUT_MS - 500, 10);

      // npm start: the primary first, so it cannot fork replacements, then its two workers; next
      // start: its own process tree.
      const pids = processTree(appAProcess.pid);
      if (defaultServerShape() === 'fast') expect(pids.length).toBe(3);
      else expect(pids.length).toBeGreaterThanOrEqual(1);
      for (const pid of pids) process.kill(pid, 'SIGKILL');
      const outcomeA = await viaA;
      // A died before answering (its own timeout would have been a 503 at OIDC_TIMEOUT_MS).
      expect(outcomeA.ok).toBe(false);
      await waitFor('instance A to be gone', () => (pids.every((pid) => !isAlive(pid)) ? true : undefined), 5_000);
      // The dead owner's lock is still there: only its lease can end it.
      lockTtlAtTakeover = await probe.redis.pttl(lockKey);
      expect(lockTtlAtTakeover).toBeGreaterThan(0);
    } finally {
      process.kill(idpPid, 'SIGCONT');
    }
    const firstViaB = await call(appB, WHOAMI, cookieOf(ORPHAN));

    // B never breaks a lock whose lease still runs: while it runs, B's caller waits REFRESH_WAIT_MS
    // and is then served with the token the session holds (due, not spent; the session kept); a
    // call that got more waited for the lease to run out. Either way no request hangs past the bound.
    expect(firstViaB).toMatchObject({ status: 200, body: { sub: ORPHAN } });
    expect(clearsSessionCookie(firstViaB.setCookies)).toBe(false);
    expect(firstViaB.ms).toBeLessThan(OIDC_TIMEOUT_MS + 1_000);
    // Once the dead owner's lease has run out, B takes over: at once on a worker that has not met
    // the lock, within the Retry-After of its wait (REFRESH_WAIT_MS, rounded up) on the one that has.
    await waitFor("the dead owner's lease to run out", async () => ((await probe.exists(lockKey)) ? undefined : true), LOCK_LEASE_MS + 1_000, 25);
    const pauseMs = Math.ceil(OIDC_TIMEOUT_MS / 1000) * 1000;
    const viaB = await waitFor('B to refresh the session', async () => {
      const result = await call(appB, WHOAMI, cookieOf(ORPHAN));
      const refreshed = refreshGrantsOf(await idpGrants(stack.issuer), ORPHAN) > refreshGrantsOf(before, ORPHAN);
      return result.status !== 200 || refreshed ? result : undefined;
    }, pauseMs + 1_000, 100);
    expect(Date.now() - lockSeenAt).toBeLessThan(LOCK_LEASE_MS + 3_000 + OIDC_TIMEOUT_MS + pauseMs);
    await expectRecoveredUnlessIdpRanTheAbandonedGrant(ORPHAN, before, viaB);
    if (viaB.status === 200) {
      // The refreshed session keeps working on the surviving instance.
      expect((await call(appB, WHOAMI, cookieOf(ORPHAN))).status).toBe(200);
    }
  });
});
