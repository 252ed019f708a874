// A stalled IdP must not hold the SPA's calls: a call that needs a refresh waits REFRESH_WAIT_MS for
// it — its own, or another instance's — then goes on with the token it holds while that has more
// than 5 s to run, or answers 503 idp_unavailable with Retry-After, while the grant runs on under
// the lock and its tokens are stored when the IdP answers. Real processes:
// the dev IdP (its token endpoint delayed on demand), real Redis, two Gatehouse instances.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import { RedisProbe, call, clearsSessionCookie, idpGrants, lastBearerAt, login, refreshGrantsOf, setIdpDelays, waitFor } from '../support/http-client.ts';

const ACCESS_TOKEN_TTL_SEC = 20;
const REFRESH_SKEW_SEC = 15;
// The IdP stalls for longer than a caller may wait, and answers well within its own timeout: the
// old behaviour (wait for the grant, up to OIDC_TIMEOUT_MS) would answer 200 after the stall.
const STALL_MS = 6_000;
// The default: the stack does not set it.
const REFRESH_WAIT_MS = 2_000;
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
    env: { TOKEN_REFRESH_SKEW: String(REFRESH_SKEW_SEC), OIDC_TIMEOUT_MS: '15000', REFRESH_LOCK_LEASE_MS: '20000' },
  });
  probe = new RedisProbe(stack.keyPrefix);
  [appA, appB] = stack.apps.map((app) => app.url) as [string, string];
}, 60_000);

afterAll(async () => {
  if (stack) await setIdpDelays(stack.issuer, { tokenMs: 0 }).catch(() => undefined);
  await probe?.cleanup();
  await probe?.close();
  await stack?.stop();
});

describe('a stalled IdP while tokens are due', () => {
  /**
   * Stalls the IdP's token endpoint while A refreshes and B, a moment later, waits for A; answers
   * both callers, whether the grant was still at the IdP when they answered, and (once the stall is
   * over) whether the grant was stored, with the session's own record and grant counts.
   */
  async function stalledRefresh(user: string, cookie: string, key: string) {
    const grantsBefore = refreshGrantsOf(await idpGrants(stack.issuer), user);
    const sealedBefore = (await probe.record(key))?.sealed;
    const delaysBefore = await setIdpDelays(stack.issuer, { tokenMs: STALL_MS });
    let viaA, viaB, stillStalled;
    try {
      const pendingA = call(appA, WHOAMI, cookie);
      await waitFor('the grant to reach the stalled IdP', async () => ((await setIdpDelays(stack.issuer, {})).delayed.token > delaysBefore.delayed.token ? true : undefined), 5_000, 20);
      [viaA, viaB] = await Promise.all([pendingA, call(appB, WHOAMI, cookie)]);
      // Both answers came while the IdP still held the grant: no refresh completed yet.
      stillStalled = refreshGrantsOf(await idpGrants(stack.issuer), user) === grantsBefore;
    } finally {
      await setIdpDelays(stack.issuer, { tokenMs: 0 });
    }
    // The grant the callers stopped waiting for completes and is stored; the next calls use its tokens.
    await waitFor('the stalled grant to be stored', async () => ((await probe.record(key))?.sealed !== sealedBefore ? true : undefined), STALL_MS + 5_000, 50);
    return { viaA, viaB, stillStalled, grantsBefore };
  }

  it('callers on both instances wait REFRESH_WAIT_MS, then go on with the token held, or hear 503 idp_unavailable once it is nearly spent, while the grant is still at the IdP; its tokens are stored and the session goes on with one grant each time', async () => {
    const user = 'stalled-idp';
    const cookie = await login(appA, user);
    // Both instances have fetched discovery and the demo API its keys before the stall.
    for (const app of [appA, appB]) expect(await call(app, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
    const heldToken = await lastBearerAt(stack.apiUrl);
    const key = await probe.sessionKeyOf(user);
    if (!key) throw new Error('no session key');

    // Due, with REFRESH_SKEW_SEC to run: both callers are served with the token held after their wait.
    await probe.waitUntilDue(user, REFRESH_SKEW_SEC);
    const due = await stalledRefresh(user, cookie, key);
    expect(due.stillStalled).toBe(true);
    for (const answer of [due.viaA, due.viaB]) {
      expect(answer).toMatchObject({ status: 200, body: { sub: user } });
      expect(answer.ms).toBeGreaterThanOrEqual(REFRESH_WAIT_MS - 100);
      expect(answer.ms).toBeLessThan(STALL_MS);
      expect(clearsSessionCookie(answer.setCookies)).toBe(false);
    }
    expect(await lastBearerAt(stack.apiUrl)).toBe(heldToken);
    for (const app of [appA, appB]) expect(await call(app, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
    expect(await lastBearerAt(stack.apiUrl)).not.toBe(heldToken);
    expect(refreshGrantsOf(await idpGrants(stack.issuer), user) - due.grantsBefore).toBe(1);

    // The new token left to run down to under 5 s: nothing to go on with, so "retry shortly".
    await probe.waitUntilDue(user, 5);
    const spent = await stalledRefresh(user, cookie, key);
    expect(spent.stillStalled).toBe(true);
    for (const answer of [spent.viaA, spent.viaB]) {
      expect(answer).toMatchObject({ status: 503, body: { error: 'idp_unavailable' } });
      expect(Number(answer.headers.get('retry-after'))).toBe(REFRESH_WAIT_MS / 1000);
      expect(clearsSessionCookie(answer.setCookies)).toBe(false);
    }
    for (const app of [appA, appB]) expect(await call(app, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
    expect(refreshGrantsOf(await idpGrants(stack.issuer), user) - spent.grantsBefore).toBe(1);
    const grants = await idpGrants(stack.issuer);
    expect(grants.error.refresh_token ?? 0).toBe(0);
  }, 90_000);
});
