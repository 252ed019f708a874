// Session lifetime against real processes: idle timeout (sliding, touched at most once per touch
// interval per process), absolute timeout, the expiresAt that /api/auth/session reports, and that
// nothing — a touch, a token refresh — ever brings back a session that a logout deleted.
// Two Gatehouse instances with two workers each share one Redis, so every "touched at most once
// per interval" is per process and the store is the only shared truth.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import { RedisProbe, call, clearsSessionCookie, idpGrants, login, refreshGrantsOf, unreadBytesAt, waitFor, waitUntil, type CallResult } from '../support/http-client.ts';

const IDLE_SEC = 3;
const TOUCH_SEC = 1;
const ABSOLUTE_SEC = 9;
// Tokens are due 3 s after each refresh, so the sessions below also go through refreshes while
// they are used: a refresh must neither extend nor shorten a session's life.
const ACCESS_TOKEN_TTL_SEC = 40;
const REFRESH_SKEW_SEC = 37;
const OIDC_TIMEOUT_MS = 5_000;
const WHOAMI = '/api/proxy/demo/whoami';

let stack: Stack;
let probe: RedisProbe;
let apps: [string, string];

beforeAll(async () => {
  stack = await startStack({
    instances: 2,
    workers: 2,
    accessTokenTtl: ACCESS_TOKEN_TTL_SEC,
    env: {
      SESSION_IDLE_TIMEOUT: String(IDLE_SEC),
      SESSION_TOUCH_INTERVAL: String(TOUCH_SEC),
      SESSION_ABSOLUTE_TIMEOUT: String(ABSOLUTE_SEC),
      TOKEN_REFRESH_SKEW: String(REFRESH_SKEW_SEC),
      OIDC_TIMEOUT_MS: String(OIDC_TIMEOUT_MS),
      REFRESH_LOCK_LEASE_MS: String(OIDC_TIMEOUT_MS + 3_000),
      // The write-back test needs its caller to see the refresh's own outcome, however slow the machine.
      REFRESH_WAIT_MS: String(OIDC_TIMEOUT_MS),
    },
  });
  probe = new RedisProbe(stack.keyPrefix);
  apps = stack.apps.map((app) => app.url) as [string, string];
}, 60_000);

afterAll(async () => {
  if (stack?.idp.child.pid) {
    try {
      process.kill(stack.idp.child.pid, 'SIGCONT');
    } catch {
      // already gone
    }
  }
  await probe?.cleanup();
  await probe?.close();
  await stack?.stop();
});

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Logs in and returns the cookie, the session key and its stored record. */
async function newSession(user: string) {
  const cookie = await login(apps[0], user);
  const key = await probe.sessionKeyOf(user);
  if (!key) throw new Error(`no session key for ${user}`);
  const record = await probe.record(key);
  if (!record) throw new Error(`no session record for ${user}`);
  return { cookie, key, record };
}

/** Asserts that `key` stays absent for `windowMs`, checking every 25 ms. */
async function expectStaysAbsent(key: string, windowMs = 500): Promise<void> {
  const until = Date.now() + windowMs;
  while (Date.now() < until) {
    expect(await probe.exists(key)).toBe(false);
    await sleep(25);
  }
}

describe.concurrent('idle and absolute timeouts', () => {
  it('idle timeout: a session in use outlives the idle timeout; left alone, it ends one idle timeout after its last use', async ({ expect }) => {
    const { cookie, key, record } = await newSession('lifetime-idle');
    expect(record.absoluteExpiresAt - record.createdAt).toBe(ABSOLUTE_SEC * 1000);
    // Use it (over all four processes) for 1.5 s longer than the idle timeout.
    const useUntil = record.createdAt + IDLE_SEC * 1000 + 1_500;
    const results: CallResult[] = [];
    let lastUseEnded = 0;
    for (let i = 0; Date.now() < useUntil; i++) {
      results.push(await call(apps[i % 2] as string, WHOAMI, cookie));
      lastUseEnded = Date.now();
      await sleep(200);
    }
    expect(results.map((result) => result.status).filter((status) => status !== 200)).toEqual([]);
    expect(results.length).toBeGreaterThan(10);
    // The last touch happened at most one touch interval before the last use.
    const ttl = await probe.redis.pttl(key);
    expect(ttl).toBeGreaterThan((IDLE_SEC - TOUCH_SEC) * 1000 - 500);
    expect(ttl).toBeLessThanOrEqual(IDLE_SEC * 1000);

    // Left alone (only read-only EXISTS from here, which does not touch): it ends on its own.
    const goneAt = await waitFor('the idle session key to expire', async () => ((await probe.exists(key)) ? undefined : Date.now()), IDLE_SEC * 1000 + 2_000, 20);
    expect(goneAt - lastUseEnded).toBeGreaterThanOrEqual((IDLE_SEC - TOUCH_SEC) * 1000 - 500);
    expect(goneAt - lastUseEnded).toBeLessThanOrEqual(IDLE_SEC * 1000 + 500);
    // It was the idle timeout, well before the absolute end.
    expect(goneAt).toBeLessThan(record.absoluteExpiresAt - 500);

    const proxied = await call(apps[1], WHOAMI, cookie);
    expect(proxied.status).toBe(401);
    expect(proxied.body).toMatchObject({ error: 'unauthenticated' });
    expect(clearsSessionCookie(proxied.setCookies)).toBe(true);
    const described = await call(apps[0], '/api/auth/session', cookie);
    expect(described.body).toEqual({ authenticated: false });
    expect(clearsSessionCookie(described.setCookies)).toBe(true);
    expect(await probe.exists(key)).toBe(false);
  });

  it('absolute timeout: a session in constant use ends on time, not earlier and not later', async ({ expect }) => {
    const { cookie, key, record } = await newSession('lifetime-absolute');
    expect(record.absoluteExpiresAt - record.createdAt).toBe(ABSOLUTE_SEC * 1000);
    const end = record.absoluteExpiresAt;
    const results: Array<{ startedAt: number; result: CallResult }> = [];
    for (let i = 0; Date.now() < end + 3_000; i++) {
      const startedAt = Date.now();
      const result = await call(apps[i % 2] as string, WHOAMI, cookie);
      results.push({ startedAt, result });
      if (result.status !== 200) break;
      await sleep(200);
    }
    const firstFailure = results.findIndex(({ result }) => result.status !== 200);
    expect(firstFailure).toBeGreaterThan(20);
    const failed = results[firstFailure];
    if (!failed) throw new Error('the session never ended');
    expect(failed.result.status).toBe(401);
    expect(clearsSessionCookie(failed.result.setCookies)).toBe(true);
    // Used until the end: the last success started shortly before the absolute end...
    const lastSuccess = results[firstFailure - 1];
    expect(lastSuccess?.startedAt).toBeGreaterThan(end - 1_000);
    // ...and the first refusal came no earlier than the end (small clock/rounding slack) and promptly after it.
    expect(failed.startedAt + failed.result.ms).toBeGreaterThanOrEqual(end - 50);
    expect(failed.startedAt).toBeLessThan(end + 1_000);
    expect(await probe.exists(key)).toBe(false);
    const described = await call(apps[1], '/api/auth/session', cookie);
    expect(described.body).toEqual({ authenticated: false });
  });

  it('/api/auth/session reports expiresAt = min(now + idle timeout, absolute end), matching the store', async ({ expect }) => {
    const { cookie, key, record } = await newSession('lifetime-expires-at');
    const describeAt = async (app: string) => {
      const before = Date.now();
      const result = await call(app, '/api/auth/session', cookie);
      const after = Date.now();
      expect(result.status).toBe(200);
      const body = result.body as { authenticated: boolean; expiresAt: number; user: { sub?: string } };
      expect(body.authenticated).toBe(true);
      expect(Number.isInteger(body.expiresAt)).toBe(true);
      return { before, after, expiresAtMs: body.expiresAt * 1000, ttl: await probe.redis.pttl(key), ttlReadAt: Date.now() };
    };

    // Early in the session the idle timeout decides (expiresAt is in whole seconds, floored).
    const early = await describeAt(apps[0]);
    expect(early.expiresAtMs).toBeGreaterThan(early.before + IDLE_SEC * 1000 - 1_000);
    expect(early.expiresAtMs).toBeLessThanOrEqual(early.after + IDLE_SEC * 1000);
    expect(early.expiresAtMs).toBeLessThan(record.absoluteExpiresAt);
    // The store agrees: the key expires when the answer says.
    expect(Math.abs(early.ttlReadAt + early.ttl - early.expiresAtMs)).toBeLessThan(1_000 + 100);

    // Keep it alive (each call slides the idle expiry) until the absolute end is nearer than the idle timeout.
    const nearEnd = record.absoluteExpiresAt - IDLE_SEC * 1000 + 500;
    for (let i = 0; Date.now() < nearEnd; i++) {
      await describeAt(apps[i % 2] as string);
      await sleep(Math.min(1_000, Math.max(0, nearEnd - Date.now())));
    }
    const late = await describeAt(apps[1]);
    expect(late.expiresAtMs).toBe(Math.floor(record.absoluteExpiresAt / 1000) * 1000);
    expect(Math.abs(late.ttlReadAt + late.ttl - record.absoluteExpiresAt)).toBeLessThan(100);
  });
});

describe('no resurrection after logout', () => {
  it('a session deleted by a concurrent logout never reappears, whatever requests were in flight', async () => {
    const { cookie, key } = await newSession('lifetime-logout-plain');
    expect((await call(apps[1], WHOAMI, cookie)).status).toBe(200);

    // Requests racing a real logout: each may see the session or not, none may bring it back.
    const racing = Array.from({ length: 60 }, (_, i) =>
      call(apps[i % 2] as string, i % 3 === 0 ? '/api/auth/session' : WHOAMI, cookie),
    );
    const logout = call(apps[0], '/api/auth/logout', cookie, { method: 'POST' });
    const [logoutResult, ...raced] = await Promise.all([logout, ...racing]);
    expect(logoutResult.status).toBe(200);
    expect(clearsSessionCookie(logoutResult.setCookies)).toBe(true);
    for (const result of raced) expect([200, 401]).toContain(result.status);
    await expectStaysAbsent(key);

    // Afterwards every call is refused on both instances and still nothing is written.
    const after = await Promise.all(Array.from({ length: 20 }, (_, i) => call(apps[i % 2] as string, i % 2 ? WHOAMI : '/api/auth/session', cookie)));
    for (const [i, result] of after.entries()) {
      if (i % 2) expect(result).toMatchObject({ status: 401, body: { error: 'unauthenticated' } });
      else expect(result).toMatchObject({ status: 200, body: { authenticated: false } });
    }
    await expectStaysAbsent(key);
  });

  it('a refresh that completes after the session was deleted does not write it back, and revokes the refresh token it got', async () => {
    const user = 'lifetime-logout-refresh';
    const { cookie, key, record } = await newSession(user);
    const lockKey = probe.lockKeyFor(key);
    const idpPid = stack.idp.child.pid as number;
    const idpPort = Number(new URL(stack.issuer).port);
    // Until the token is due, keep the session from idling out (the session endpoint touches it
    // but never refreshes tokens).
    const dueAt = (record.accessTokenExpiresAt ?? 0) - REFRESH_SKEW_SEC * 1000 + 50;
    while (Date.now() < dueAt) {
      expect((await call(apps[1], '/api/auth/session', cookie)).body).toMatchObject({ authenticated: true });
      await waitUntil(`${user}'s token to become due (or the next keep-alive)`, Math.min(dueAt, Date.now() + 800));
    }
    const before = await idpGrants(stack.issuer);

    // Freeze the IdP so the refresh is provably in flight when the session is deleted.
    process.kill(idpPid, 'SIGSTOP');
    let result: CallResult;
    try {
      const pending = call(apps[0], WHOAMI, cookie);
      // Under its lock the refresh reads the session once more before asking the IdP; deleting the
      // session before that read would test the earlier check, not the write-back. So wait until
      // the token request sits unread in the frozen IdP's socket — by then the lock must be held.
      await waitFor('the token request to reach the frozen IdP', () => (unreadBytesAt(idpPort) > 0 ? true : undefined), OIDC_TIMEOUT_MS - 1_000, 10);
      expect(await probe.exists(lockKey)).toBe(true);
      expect(await probe.redis.del(key)).toBe(1); // the concurrent logout
      process.kill(idpPid, 'SIGCONT');
      result = await pending;
    } finally {
      process.kill(idpPid, 'SIGCONT');
    }

    // The IdP did issue new tokens (well within OIDC_TIMEOUT_MS), and Gatehouse refused to store them.
    const grants = await idpGrants(stack.issuer);
    expect(refreshGrantsOf(grants, user) - refreshGrantsOf(before, user)).toBe(1);
    expect(result).toMatchObject({ status: 401, body: { error: 'session_expired' } });
    expect(clearsSessionCookie(result.setCookies)).toBe(true);
    expect(await probe.exists(lockKey)).toBe(false);
    await expectStaysAbsent(key);
    // The rotated refresh token it could not store is revoked at the IdP (RFC 7009), not stranded.
    const revocations = async () => ((await idpGrants(stack.issuer)).revocations[user] ?? 0) - (before.revocations[user] ?? 0);
    const revoked = await waitFor('the IdP to see the new refresh token revoked', async () => {
      const count = await revocations();
      return count > 0 ? count : undefined;
    }, OIDC_TIMEOUT_MS);
    expect(revoked).toBe(1);
    const again = await call(apps[1], WHOAMI, cookie);
    expect(again.status).toBe(401);
    await expectStaysAbsent(key, 200);
  });
});
