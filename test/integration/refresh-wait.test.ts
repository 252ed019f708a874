// A stalled IdP must not hold the SPA's calls: a call that needs a refresh waits REFRESH_WAIT_MS for
// it — its own, or another instance's — then answers 503 idp_unavailable with Retry-After, while
// the grant runs on under the lock and its tokens are stored when the IdP answers. Real processes:
// the dev IdP (its token endpoint delayed on demand), real Redis, two Gatehouse instances.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import { RedisProbe, call, clearsSessionCookie, idpGrants, login, refreshGrantsOf, setIdpDelays, waitFor } from '../support/http-client.ts';

const ACCESS_TOKEN_TTL_SEC = 20;
const REFRESH_SKEW_SEC = 15;
// The IdP stalls for longer than a caller may wait, and answers well within its own timeout: the
// old behaviour (wait for the grant, up to OIDC_TIMEOUT_MS) would answer 200 after the stall.
const STALL_MS = 6_000;
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
  it('callers on both instances hear 503 idp_unavailable while the grant is still at the IdP; its tokens are stored and the session goes on with one grant', async () => {
    const user = 'stalled-idp';
    const cookie = await login(appA, user);
    // Both instances have fetched discovery and the demo API its keys before the stall.
    for (const app of [appA, appB]) expect(await call(app, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
    const key = await probe.sessionKeyOf(user);
    if (!key) throw new Error('no session key');
    await probe.waitUntilDue(user, REFRESH_SKEW_SEC);
    const grantsBefore = refreshGrantsOf(await idpGrants(stack.issuer), user);
    const sealedBefore = (await probe.record(key))?.sealed;
    const delaysBefore = await setIdpDelays(stack.issuer, { tokenMs: STALL_MS });

    let viaA, viaB, stillStalled;
    try {
      // A takes the lock and asks the IdP; B, a moment later, waits for A.
      const pendingA = call(appA, WHOAMI, cookie);
      await waitFor('the grant to reach the stalled IdP', async () => ((await setIdpDelays(stack.issuer, {})).delayed.token > delaysBefore.delayed.token ? true : undefined), 5_000, 20);
      [viaA, viaB] = await Promise.all([pendingA, call(appB, WHOAMI, cookie)]);
      // Both answers came while the IdP still held the grant: no refresh completed yet.
      stillStalled = refreshGrantsOf(await idpGrants(stack.issuer), user) === grantsBefore;
    } finally {
      await setIdpDelays(stack.issuer, { tokenMs: 0 });
    }
    expect(stillStalled).toBe(true);
    for (const answer of [viaA, viaB]) {
      expect(answer).toMatchObject({ status: 503, body: { error: 'idp_unavailable' } });
      expect(Number(answer.headers.get('retry-after'))).toBeGreaterThan(0);
      expect(clearsSessionCookie(answer.setCookies)).toBe(false);
    }

    // The grant the callers stopped waiting for completes and is stored; retries find its tokens.
    await waitFor('the stalled grant to be stored', async () => ((await probe.record(key))?.sealed !== sealedBefore ? true : undefined), STALL_MS + 5_000, 50);
    for (const app of [appA, appB]) expect(await call(app, WHOAMI, cookie)).toMatchObject({ status: 200, body: { sub: user } });
    expect(refreshGrantsOf(await idpGrants(stack.issuer), user) - grantsBefore).toBe(1);
    const grants = await idpGrants(stack.issuer);
    expect(grants.error.refresh_token ?? 0).toBe(0);
  }, 60_000);
});
