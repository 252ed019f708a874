// Token exchange (RFC 8693) end to end, against real processes: the dev IdP (oidc-provider with its
// token-exchange grant), three demo APIs that verify their own audience, real Redis and two
// Gatehouse instances (two workers each under `npm start`).
//
// Grants are counted where they happen — at the IdP (/__dev/grants) — never inside Gatehouse, and
// the tokens the APIs received are read from the APIs themselves (their /__demo/last), never
// through Gatehouse: the browser must never see one.
import { decodeJwt } from 'jose';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import {
  RedisProbe,
  TOKEN_EXCHANGE_GRANT,
  call,
  clearsSessionCookie,
  exchangeGrantsOf,
  idpGrants,
  lastBearerAt,
  refreshGrantsOf,
  revokeIdpGrants,
  signInAll,
  summarize,
  waitUntil,
  type SignedInUsers,
} from '../support/http-client.ts';

// The session's own token is due 36 s after login (or a refresh), an exchanged one 6 s after its
// exchange: an exchanged token comes due while the session's token is still fresh, and by the time
// the session's token is due, so is an exchanged token from right after login.
const ACCESS_TOKEN_TTL_SEC = 60;
const EXCHANGED_TOKEN_TTL_SEC = 30;
const REFRESH_SKEW_SEC = 24;
const FORCED_REFRESH_INTERVAL_SEC = 60;
const NO_REFRESH_TOKEN_PREFIX = 'no-rt-';

const CACHED = 'tx-cached';
const BOTH_DUE = 'tx-both-due';
const BOTH_DUE_MIXED = 'tx-both-due-mixed';
const FORCED = 'tx-forced';
const REFUSED = 'tx-refused';
const REVOKED = 'tx-revoked';
const OUTAGE = 'tx-outage';
const NO_RT = `${NO_REFRESH_TOKEN_PREFIX}tx`;
const USERS = [CACHED, BOTH_DUE, BOTH_DUE_MIXED, FORCED, REFUSED, REVOKED, OUTAGE, NO_RT];

const DEMO = '/api/proxy/demo/whoami';
// `ledger` is exchanged for, with a narrower scope; the IdP refuses exchanges for `archive`.
const LEDGER = '/api/proxy/ledger/whoami';
const ARCHIVE = '/api/proxy/archive/whoami';

let stack: Stack;
let probe: RedisProbe;
let appA: string;
let appB: string;
let ledgerUrl: string;
let cookieOf: SignedInUsers['cookieOf'];
let keyOf: SignedInUsers['keyOf'];

async function grantsOf(user: string): Promise<{ refreshed: number; exchanged: number; refusedRefresh: number; refusedExchange: number }> {
  const grants = await idpGrants(stack.issuer);
  return {
    refreshed: refreshGrantsOf(grants, user),
    exchanged: exchangeGrantsOf(grants, user),
    refusedRefresh: grants.error.refresh_token ?? 0,
    refusedExchange: grants.error[TOKEN_EXCHANGE_GRANT] ?? 0,
  };
}

/**
 * Waits until the exchanged token Gatehouse holds is due, from the token the API received: its
 * `exp` is whole seconds, Gatehouse counts from when the answer arrived, so a second more.
 */
async function waitUntilExchangedDue(token: string): Promise<void> {
  const { exp } = decodeJwt(token);
  if (!exp) throw new Error('the exchanged token has no exp');
  await waitUntil('the exchanged token to become due', exp * 1000 - REFRESH_SKEW_SEC * 1000 + 1_200);
}

beforeAll(async () => {
  stack = await startStack({
    instances: 2,
    workers: 2,
    accessTokenTtl: ACCESS_TOKEN_TTL_SEC,
    resourceApis: 2,
    apis: ({ apiUrl, resourceApiUrls: [ledger, archive] }) => ({
      demo: { url: apiUrl },
      ledger: { url: ledger, tokenExchange: { audience: ledger, scope: 'api:read' } },
      archive: { url: archive, tokenExchange: { audience: archive } },
    }),
    idpEnv: ({ resourceApiUrls: [ledger] }) => ({
      IDP_EXCHANGE_AUDIENCES: ledger as string,
      IDP_EXCHANGED_TOKEN_TTL: String(EXCHANGED_TOKEN_TTL_SEC),
      IDP_NO_REFRESH_TOKEN_PREFIX: NO_REFRESH_TOKEN_PREFIX,
    }),
    env: {
      TOKEN_REFRESH_SKEW: String(REFRESH_SKEW_SEC),
      FORCED_REFRESH_INTERVAL: String(FORCED_REFRESH_INTERVAL_SEC),
      // Room for a refresh and an exchange in a row on a busy machine: the bound is not under test here.
      REFRESH_WAIT_MS: '5000',
    },
  });
  probe = new RedisProbe(stack.keyPrefix);
  [appA, appB] = stack.apps.map((app) => app.url) as [string, string];
  ledgerUrl = stack.resourceApiUrls[0] as string;
  ({ cookieOf, keyOf } = await signInAll(USERS, [appA, appB], probe));
  // These exchanged tokens date from now: due long before their sessions' own.
  for (const user of [BOTH_DUE, BOTH_DUE_MIXED]) expect(await call(appA, LEDGER, cookieOf(user))).toMatchObject({ status: 200, body: { sub: user } });
}, 90_000);

afterAll(async () => {
  if (stack) await fetch(`${stack.issuer}/__dev/token-fault?status=503&count=0`, { method: 'POST' }).catch(() => undefined);
  await probe?.cleanup();
  await probe?.close();
  await stack?.stop();
});

/**
 * A burst at a session whose own token and exchanged token are both due, spread over two
 * instances: 200 calls, all answered, one refresh and then one exchange with the refreshed token,
 * nothing refused by the IdP (a replayed refresh token would be).
 */
async function burstWhenBothDue(user: string, pathOf: (index: number) => string): Promise<void> {
  const cookie = cookieOf(user);
  // Warm every worker and connection, with a call that needs no token: this may run when the token is due already.
  const warmup = await Promise.all(Array.from({ length: 40 }, (_, i) => call(i % 2 === 0 ? appA : appB, '/api/auth/session', cookie)));
  expect(summarize(warmup)).toEqual({ '200': 40 });
  const before = await grantsOf(user);
  expect(before).toMatchObject({ refreshed: 0, exchanged: 1 });
  await probe.waitUntilDue(user, REFRESH_SKEW_SEC);

  const results = await Promise.all(Array.from({ length: 200 }, (_, i) => call(i % 4 < 2 ? appA : appB, pathOf(i), cookie)));

  expect(summarize(results)).toEqual({ '200': 200 });
  for (const result of results) expect(result.body).toMatchObject({ sub: user });
  const after = await grantsOf(user);
  expect({ refreshed: after.refreshed - before.refreshed, exchanged: after.exchanged - before.exchanged }).toEqual({ refreshed: 1, exchanged: 1 });
  expect({ refusedRefresh: after.refusedRefresh - before.refusedRefresh, refusedExchange: after.refusedExchange - before.refusedExchange }).toEqual({
    refusedRefresh: 0,
    refusedExchange: 0,
  });
  // The exchange came after the refresh: its subject was the refreshed token, not the one that was due.
  expect((await idpGrants(stack.issuer)).orderByAccount[user]?.slice(-2)).toEqual(['refresh_token', TOKEN_EXCHANGE_GRANT]);
  expect(await probe.exists(probe.lockKeyFor(keyOf(user)))).toBe(false);
}

describe('token exchange (RFC 8693)', () => {
  let exchangedToken: string;

  it("sends the API a token of its own: its audience, the user as subject, not the session's token; the browser sees neither", async () => {
    const cookie = cookieOf(CACHED);
    const answers: Response[] = [];
    const browserCall = async (path: string) => {
      const response = await fetch(`${appA}${path}`, { headers: { cookie, 'x-csrf': '1' } });
      answers.push(response);
      return { status: response.status, text: await response.text(), headers: [...response.headers].map(([name, value]) => `${name}: ${value}`).join('\n') };
    };

    const viaDemo = await browserCall(DEMO);
    expect(viaDemo.status).toBe(200);
    const sessionToken = await lastBearerAt(stack.apiUrl);
    const viaLedger = await browserCall(LEDGER);
    expect(viaLedger.status).toBe(200);
    exchangedToken = await lastBearerAt(ledgerUrl);
    const session = await browserCall('/api/auth/session');

    // The ledger verified the token itself (signature, issuer, its own audience) and echoes the claims.
    expect(JSON.parse(viaLedger.text)).toMatchObject({ aud: ledgerUrl, sub: CACHED, scope: 'api:read', client_id: stack.clientId });
    expect(exchangedToken).not.toBe(sessionToken);
    expect(decodeJwt(sessionToken)).toMatchObject({ aud: stack.apiUrl, sub: CACHED });
    const claims = decodeJwt(exchangedToken);
    expect(claims).toMatchObject({ aud: ledgerUrl, sub: CACHED, scope: 'api:read' });
    expect((claims.exp ?? 0) - (claims.iat ?? 0)).toBe(EXCHANGED_TOKEN_TTL_SEC);
    // The session's own token would not have done: the ledger refuses its audience.
    expect((await fetch(`${ledgerUrl}/whoami`, { headers: { authorization: `Bearer ${sessionToken}` } })).status).toBe(401);

    // Nothing the browser received carries either token, whole or any of its three parts.
    const secrets = [sessionToken, exchangedToken].flatMap((token) => [token, ...token.split('.')]);
    for (const answer of [viaDemo, viaLedger, session]) {
      for (const secret of secrets) {
        expect(answer.text).not.toContain(secret);
        expect(answer.headers).not.toContain(secret);
      }
    }
    expect(answers.every((response) => response.headers.getSetCookie().length === 0)).toBe(true);
  });

  it('keeps the exchanged token in the session until it is due: many calls over both instances, one exchange', async () => {
    const results = [];
    for (let i = 0; i < 20; i++) results.push(await call(i % 2 === 0 ? appA : appB, LEDGER, cookieOf(CACHED)));
    expect(summarize(results)).toEqual({ '200': 20 });
    expect(await lastBearerAt(ledgerUrl)).toBe(exchangedToken);
    expect(await grantsOf(CACHED)).toMatchObject({ refreshed: 0, exchanged: 1 });
  });

  it('once it is due: 200 concurrent calls over two instances, exactly one re-exchange, no refresh', async () => {
    // Warm every worker and keep-alive connection first, so the burst reaches all processes at once.
    const warmup = await Promise.all(Array.from({ length: 40 }, (_, i) => call(i % 2 === 0 ? appA : appB, DEMO, cookieOf(CACHED))));
    expect(summarize(warmup)).toEqual({ '200': 40 });
    const before = await grantsOf(CACHED);
    await waitUntilExchangedDue(exchangedToken);

    const results = await Promise.all(Array.from({ length: 200 }, (_, i) => call(i % 2 === 0 ? appA : appB, LEDGER, cookieOf(CACHED))));

    expect(summarize(results)).toEqual({ '200': 200 });
    for (const result of results) expect(result.body).toMatchObject({ sub: CACHED, aud: ledgerUrl });
    const after = await grantsOf(CACHED);
    expect({ exchanged: after.exchanged - before.exchanged, refreshed: after.refreshed - before.refreshed }).toEqual({ exchanged: 1, refreshed: 0 });
    expect(after.refusedExchange).toBe(0);
    expect(await lastBearerAt(ledgerUrl)).not.toBe(exchangedToken);
    expect(await probe.exists(probe.lockKeyFor(keyOf(CACHED)))).toBe(false);
  });

  it("an upstream 401 to the exchanged token forces one re-exchange, and no more within FORCED_REFRESH_INTERVAL", async () => {
    const cookie = cookieOf(FORCED);
    expect(await call(appA, LEDGER, cookie)).toMatchObject({ status: 200, body: { sub: FORCED } });
    const first = await lastBearerAt(ledgerUrl);
    const before = await grantsOf(FORCED);
    expect(before.exchanged).toBe(1);

    // The ledger answers 401 on this route whatever the token: one re-exchange, one retry, then the 401 goes back.
    for (let i = 0; i < 6; i++) {
      const rejected = await call(i % 2 === 0 ? appA : appB, '/api/proxy/ledger/status/401', cookie);
      expect(rejected).toMatchObject({ status: 401, body: { status: 401 } });
      expect(clearsSessionCookie(rejected.setCookies)).toBe(false);
    }
    const after = await grantsOf(FORCED);
    expect({ exchanged: after.exchanged - before.exchanged, refreshed: after.refreshed - before.refreshed }).toEqual({ exchanged: 1, refreshed: 0 });
    const limitKey = keyOf(FORCED).replace(`${stack.keyPrefix}session:`, `${stack.keyPrefix}forced-refresh:`);
    expect(await probe.redis.pttl(limitKey)).toBeGreaterThan(0);

    // The re-exchanged token is the session's from now on.
    expect(await call(appB, LEDGER, cookie)).toMatchObject({ status: 200, body: { sub: FORCED } });
    expect(await lastBearerAt(ledgerUrl)).not.toBe(first);
    expect((await grantsOf(FORCED)).exchanged).toBe(after.exchanged);
  });

  it('an IdP that refuses the exchange (unauthorized_client, invalid_grant): 403 token_exchange_refused, and the session and its other APIs carry on', async () => {
    const before = await idpGrants(stack.issuer);
    const refused = await call(appA, ARCHIVE, cookieOf(REFUSED));
    expect(refused).toMatchObject({ status: 403, body: { error: 'token_exchange_refused' } });
    expect(refused.headers.get('x-gatehouse-error')).toBe('token_exchange_refused');
    expect(clearsSessionCookie(refused.setCookies)).toBe(false);
    expect(await probe.exists(keyOf(REFUSED))).toBe(true);
    expect(await call(appB, DEMO, cookieOf(REFUSED))).toMatchObject({ status: 200, body: { sub: REFUSED } });
    expect(await call(appB, LEDGER, cookieOf(REFUSED))).toMatchObject({ status: 200, body: { sub: REFUSED } });

    // The user's grant revoked at the IdP: the session's token still verifies at the APIs, but the
    // IdP will not exchange it. Only this call fails; the session's own refresh decides its fate.
    expect(await revokeIdpGrants(stack.issuer, REVOKED)).toBeGreaterThan(0);
    const revoked = await call(appB, LEDGER, cookieOf(REVOKED));
    expect(revoked).toMatchObject({ status: 403, body: { error: 'token_exchange_refused' } });
    expect(clearsSessionCookie(revoked.setCookies)).toBe(false);
    expect(await probe.exists(keyOf(REVOKED))).toBe(true);
    expect(await call(appA, DEMO, cookieOf(REVOKED))).toMatchObject({ status: 200, body: { sub: REVOKED } });

    const after = await idpGrants(stack.issuer);
    expect((after.errorCodes.unauthorized_client ?? 0) - (before.errorCodes.unauthorized_client ?? 0)).toBe(1);
    expect((after.errorCodes.invalid_grant ?? 0) - (before.errorCodes.invalid_grant ?? 0)).toBe(1);
    expect(after.error.refresh_token ?? 0).toBe(before.error.refresh_token ?? 0);
  });

  it('an IdP failing the exchange with 503: 503 idp_unavailable with its Retry-After, the session kept; the retry exchanges', async () => {
    const cookie = cookieOf(OUTAGE);
    await fetch(`${stack.issuer}/__dev/token-fault?status=503&retryAfter=7&count=1`, { method: 'POST' });
    const failed = await call(appA, LEDGER, cookie);
    expect(failed).toMatchObject({ status: 503, body: { error: 'idp_unavailable' } });
    expect(failed.headers.get('retry-after')).toBe('7');
    expect(clearsSessionCookie(failed.setCookies)).toBe(false);
    expect(await probe.exists(keyOf(OUTAGE))).toBe(true);

    expect(await call(appB, LEDGER, cookie)).toMatchObject({ status: 200, body: { sub: OUTAGE, aud: ledgerUrl } });
    expect(await grantsOf(OUTAGE)).toMatchObject({ exchanged: 1, refreshed: 0 });
  });

  it('a session without a refresh token still exchanges its token while it lasts, and a 401 still earns one re-exchange', async () => {
    const cookie = cookieOf(NO_RT);
    expect(await call(appA, LEDGER, cookie)).toMatchObject({ status: 200, body: { sub: NO_RT, aud: ledgerUrl } });
    expect((await call(appB, '/api/proxy/ledger/status/401', cookie)).status).toBe(401);
    expect(await grantsOf(NO_RT)).toMatchObject({ exchanged: 2, refreshed: 0 });
  });

  it("the session's own token due as well: the exchange refreshes it first, under the same lock — one refresh, then one exchange, no replay", async () => {
    await burstWhenBothDue(BOTH_DUE, () => LEDGER);
  });

  it('and with calls to the session\'s own API in the same burst: still one refresh and one exchange', async () => {
    await burstWhenBothDue(BOTH_DUE_MIXED, (i) => (i % 2 === 0 ? DEMO : LEDGER));
  });
});
