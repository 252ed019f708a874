import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { browserRequest, followFlow, jarFor, loginThroughRp, type CookieJars } from '../../e2e/support/headless-login.ts';
import { defaultServerShape, restartGatehouse, startStack, type Stack } from '../../e2e/support/stack.ts';
import { DEV_IDP_ACR } from '../../scripts/dev-idp.ts';
import { RedisProbe, call, idpGrants, logSoFar, refreshGrantsOf, type CallResult } from '../support/http-client.ts';
import { rawAnswer, startScriptedUpstream, type ScriptedUpstream } from '../support/scripted-upstream.ts';

/**
 * Step-up authentication (RFC 9470) end to end: the demo API's challenges, a scripted API's hostile
 * ones, BFF_APIS requirements, and step-up logins at the real oidc-provider, whose policy gives
 * `urn:gatehouse:mfa` only to a sign-in with the second factor its form asks for.
 */

const SHAPE = defaultServerShape();
const MFA = DEV_IDP_ACR.mfa;
const PWD = DEV_IDP_ACR.password;
const CODE = { otp: '123456' };
const STEP_UP_MESSAGE = 'This needs a stronger or more recent sign-in. Sign in again to continue.';

let stack: Stack;
let app: string;
let parApp: string;
let probe: RedisProbe;
let scripted: ScriptedUpstream;
/** What the scripted API answers next: a 401 with these WWW-Authenticate field values. */
let challengeFields: string[] = [];

beforeAll(async () => {
  scripted = await startScriptedUpstream((_request, socket) => {
    const headers = challengeFields.map((value): [string, string] => ['WWW-Authenticate', value]);
    socket.write(rawAnswer('HTTP/1.1 401 Unauthorized', [['Content-Type', 'application/json'], ...headers], '{"error":"from_the_api","secret":"api-said-this"}'));
  });
  stack = await startStack({
    instances: 2,
    workers: 1,
    apis: ({ apiUrl }) => ({
      demo: { url: apiUrl },
      strong: { url: apiUrl, acr: MFA },
      fresh: { url: apiUrl, maxAge: 300 },
      both: { url: apiUrl, acr: [MFA, 'urn:other:hwk'], maxAge: 300 },
      scripted: { url: scripted.url },
    }),
  });
  app = stack.apps[0]!.url;
  // The same IdP and store, pushing every authorization request (RFC 9126).
  await restartGatehouse(stack.apps[1]!, { OIDC_USE_PAR: 'true' }, 'gatehouse-par');
  parApp = stack.apps[1]!.url;
  probe = new RedisProbe(stack.keyPrefix, stack.appEnv.REDIS_URL);
});
afterAll(async () => {
  await probe?.close();
  await stack?.stop();
  await scripted?.close();
});

const cookieOf = (jars: CookieJars, origin = app) => `gatehouse=${jarFor(jars, origin).get('gatehouse')}`;

/** Signs `username` in through `origin`'s login with `query`; the browser (jars) is kept for a step-up later. */
async function signIn(username: string, { query = {}, fields, jars = new Map(), origin = app }: { query?: Record<string, string>; fields?: Record<string, string>; jars?: CookieJars; origin?: string } = {}) {
  const result = await loginThroughRp({ startUrl: `${origin}/api/auth/login?${new URLSearchParams(query)}`, username, jars, ...(fields ? { fields } : {}) });
  return { ...result, cookie: cookieOf(jars, origin) };
}

async function sessionOf(cookie: string, origin = app): Promise<Record<string, unknown>> {
  return (await call(origin, '/api/auth/session', cookie)).body as Record<string, unknown>;
}

async function demoRequests(): Promise<number> {
  return ((await (await fetch(`${stack.apiUrl}/__demo/stats`)).json()) as { requests: number }).requests;
}

function expectStepUp(result: CallResult, details: { acr_values?: string; max_age?: number }): void {
  expect(result.status).toBe(401);
  expect(result.headers.get('x-gatehouse-error')).toBe('step_up_required');
  expect(result.headers.get('content-type')).toMatch(/^application\/json/);
  expect(result.headers.get('cache-control')).toBe('no-store');
  expect(result.body).toStrictEqual({ error: 'step_up_required', message: STEP_UP_MESSAGE, ...details });
  // The session stays: its cookie is neither cleared nor replaced.
  expect(result.setCookies).toEqual([]);
}

/** Drives a login that the callback is expected to refuse; returns the callback's answer. */
async function refusedLogin(username: string, query: Record<string, string>, jars: CookieJars, fields: Record<string, string>, origin = app): Promise<Response> {
  const start = new URL(`${origin}/api/auth/login?${new URLSearchParams(query)}`);
  let leftApp = false;
  const callback = await followFlow(start, (next) => (leftApp ||= next.origin !== start.origin) && next.origin === start.origin, { username, jars, fields });
  return browserRequest(callback, jars);
}

describe(`step-up on ${SHAPE}`, () => {
  it('an API’s RFC 9470 challenge answers step_up_required: exact JSON and header, no forced refresh, the session stays', async () => {
    const { cookie } = await signIn('una');
    expect(await sessionOf(cookie)).toMatchObject({ authenticated: true, acr: PWD, authTime: expect.any(Number) });
    const grantsBefore = refreshGrantsOf(await idpGrants(stack.issuer), 'una');
    for (let i = 0; i < 3; i++) expectStepUp(await call(app, '/api/proxy/demo/mfa/whoami', cookie), { acr_values: MFA });
    // The API's own words (its error_description) never reach the browser.
    expect(JSON.stringify((await call(app, '/api/proxy/demo/mfa/whoami', cookie)).body)).not.toContain('A stronger or more recent sign-in is required');
    expect(refreshGrantsOf(await idpGrants(stack.issuer), 'una')).toBe(grantsBefore);
    const sessionKey = await probe.sessionKeyOf('una');
    expect(await probe.exists(sessionKey!.replace(`${stack.keyPrefix}session:`, `${stack.keyPrefix}forced-refresh:`))).toBe(false);
    expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'una' } });

    // Any other 401 is as before: passed through, after one forced refresh.
    expect(await call(app, '/api/proxy/demo/status/401', cookie)).toMatchObject({ status: 401, body: { status: 401 } });
    expect(refreshGrantsOf(await idpGrants(stack.issuer), 'una')).toBe(grantsBefore + 1);
  });

  it('passes a max_age challenge on, from a sign-in older than the API accepts', async () => {
    const { cookie } = await signIn('vera', { fields: { auth_age: '600' } });
    const { authTime } = await sessionOf(cookie);
    expect(Math.floor(Date.now() / 1000) - (authTime as number)).toBeGreaterThanOrEqual(600);
    expectStepUp(await call(app, '/api/proxy/demo/recent?maxAge=300', cookie), { max_age: 300 });
    expect(await call(app, '/api/proxy/demo/recent?maxAge=900', cookie)).toMatchObject({ status: 200, body: { sub: 'vera' } });
  });

  it('hostile WWW-Authenticate values (generated) never give a 500, and nothing of the API’s but checked values comes out', async () => {
    const { cookie } = await signIn('wren');
    const piece = fc.constantFrom('Bearer', 'DPoP', ' ', ',', '=', '"', '\\', 'error=', 'insufficient_user_authentication', 'acr_values=', 'max_age=', '"urn:a b"', '<script>', '%0d', 'é', '\u00ff', '\t', '9999999999999');
    const value = fc.oneof(
      fc.array(piece, { maxLength: 12 }).map((parts) => parts.join('')),
      fc.string({ unit: 'binary', maxLength: 30 }).map((text) => text.replace(/[\r\n\u0000]|[^\u0000-\u00ff]/g, '')),
      fc.tuple(fc.string({ maxLength: 20 }), fc.string({ maxLength: 20 })).map(
        ([acr, description]) => `Bearer error="insufficient_user_authentication", error_description="${description.replace(/["\\\r\n]/g, '')}", acr_values="${acr.replace(/["\\\r\n]/g, '')}"`,
      ),
    );
    let stepUps = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(value, { minLength: 1, maxLength: 2 }), async (values) => {
        challengeFields = values;
        const result = await call(app, '/api/proxy/scripted/anything', cookie);
        expect([401, 502], JSON.stringify(values)).toContain(result.status);
        expect(result.setCookies).toEqual([]);
        const text = JSON.stringify(result.body);
        if (result.headers.get('x-gatehouse-error') === 'step_up_required') {
          stepUps++;
          const body = result.body as Record<string, unknown>;
          expect(Object.keys(body).filter((key) => key !== 'acr_values' && key !== 'max_age')).toEqual(['error', 'message']);
          expect(body.message).toBe(STEP_UP_MESSAGE);
          if (body.acr_values !== undefined) expect(body.acr_values).toMatch(/^[A-Za-z0-9._~:/?#[\]@!$&'()*+,;=%-]+( [A-Za-z0-9._~:/?#[\]@!$&'()*+,;=%-]+)*$/);
          if (body.max_age !== undefined) expect(Number.isSafeInteger(body.max_age)).toBe(true);
          expect(text).not.toContain('api-said-this');
        } else if (result.status === 401) {
          // Not a step-up: the API's own answer, as before.
          expect(result.headers.get('x-gatehouse-error')).toBeNull();
          expect(result.body).toEqual({ error: 'from_the_api', secret: 'api-said-this' });
        } else {
          expect(result.headers.get('x-gatehouse-error')).toBe('upstream_unavailable');
        }
      }),
      {
        numRuns: 60,
        examples: [
          [['Bearer error="insufficient_user_authentication", acr_values="<script>alert(1)</script>", max_age="-1"']],
          [['Bearer error="insufficient_user_authentication", error_description="api-said-this", acr_values="gold"']],
          [['Bearer error="insufficient_user_authentication"', 'Bearer error="insufficient_user_authentication", max_age=5']],
        ],
      },
    );
    expect(stepUps).toBeGreaterThan(3);
    expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'wren' } });
  });

  it('an API that requires an acr or a maxAge in BFF_APIS refuses before the API (or the IdP) hears of the call', async () => {
    const { cookie } = await signIn('xena');
    const before = await demoRequests();
    const grantsBefore = refreshGrantsOf(await idpGrants(stack.issuer), 'xena');
    expectStepUp(await call(app, '/api/proxy/strong/whoami', cookie), { acr_values: MFA });
    expectStepUp(await call(app, '/api/proxy/both/whoami', cookie), { acr_values: `${MFA} urn:other:hwk`, max_age: 300 });
    expect(await demoRequests()).toBe(before);
    expect(refreshGrantsOf(await idpGrants(stack.issuer), 'xena')).toBe(grantsBefore);
    // A fresh password sign-in meets a maxAge alone.
    expect(await call(app, '/api/proxy/fresh/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'xena' } });

    const old = await signIn('yuri', { fields: { auth_age: '600' } });
    const beforeOld = await demoRequests();
    expectStepUp(await call(app, '/api/proxy/fresh/whoami', old.cookie), { max_age: 300 });
    expect(await demoRequests()).toBe(beforeOld);
  });

  it("a streamed answer of an API with maxAge ends once the sign-in grows older than that; the next call hears step_up_required", async () => {
    // Signed in 294 s ago (the dev IdP's form back-dates auth_time): the `fresh` API (maxAge 300) has ~6 s left.
    const { cookie } = await signIn('sten', { fields: { auth_age: '294' } });
    const { authTime } = (await sessionOf(cookie)) as { authTime: number };
    const logBefore = stack.apps[0]!.process.output().length;
    const response = await fetch(`${app}/api/proxy/fresh/events?count=600&intervalMs=100`, { headers: { cookie, 'x-csrf': '1' } });
    expect(response.status).toBe(200);
    const reader = response.body!.getReader();
    let events = 0;
    const ended = await (async () => {
      for (;;) {
        const { done, value } = await reader.read().catch(() => ({ done: true, value: undefined }));
        if (done) return Date.now();
        events += new TextDecoder().decode(value).split('data:').length - 1;
      }
    })();
    // It streamed until then, and not past it: the API would have gone on for a minute.
    expect(events).toBeGreaterThan(10);
    expect(ended).toBeGreaterThanOrEqual((authTime + 300) * 1000);
    expect(ended).toBeLessThan((authTime + 300) * 1000 + 30_000);
    expectStepUp(await call(app, '/api/proxy/fresh/whoami', cookie), { max_age: 300 });
    expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'sten' } });
    // No error, no stack trace: the stream was cut on purpose.
    const logged = stack.apps[0]!.process.output().slice(logBefore);
    expect(logged).not.toMatch(/\n\s+at |failed to pipe|"level":"error"/);
  });

  it('an answer whose head comes after the sign-in outgrew maxAge, streamed or read whole: a GET hears step_up_required, a POST keeps the status the API gave and none of the body', async () => {
    const { cookie } = await signIn('hedda', { fields: { auth_age: '292' } });
    const { authTime } = (await sessionOf(cookie)) as { authTime: number };
    // The calls start at least 2 s within the sign-in's 300 s (however slow the sign-in was); the API answers a second after those end.
    const delayMs = (authTime + 301) * 1000 - Date.now() + 1_000;
    expect(delayMs).toBeGreaterThan(4_000);
    // A stream whose first event comes with its head and the rest at once, and a small answer with
    // a length (which Gatehouse reads whole).
    const streamed = `/api/proxy/fresh/events?count=50&intervalMs=0&delayMs=${delayMs}`;
    const whole = `/api/proxy/fresh/slow?ms=${delayMs}`;
    const post = (path: string) =>
      fetch(`${app}${path}`, { method: 'POST', headers: { cookie, 'x-csrf': '1' } }).then(async (response) => {
        let bytes = 0;
        const reader = response.body!.getReader();
        const read = await (async function drain(): Promise<string> {
          const { done, value } = await reader.read();
          if (done) return 'whole';
          bytes += value.length;
          return drain();
        })().catch(() => 'cut');
        return { status: response.status, read, bytes };
      });
    const logBefore = stack.apps[0]!.process.output().length;
    const answers = await Promise.all([call(app, streamed, cookie), call(app, whole, cookie), post(streamed), post(whole)]);
    expectStepUp(answers[0], { max_age: 300 });
    expectStepUp(answers[1], { max_age: 300 });
    // The API acted on the POST: a step_up_required would invite a second one. None of its answer passes.
    expect(answers.slice(2)).toEqual([
      { status: 200, read: 'cut', bytes: 0 },
      { status: 200, read: 'cut', bytes: 0 },
    ]);
    // The stack logs warnings and errors only: none, and no stack trace, from either answer.
    const logged = await logSoFar(app, cookie, () => stack.apps[0]!.process.output(), logBefore);
    expect(logged).not.toMatch(/\n\s+at |failed to pipe|"level":"error"/);
  });

  it('a step-up login with acr_values brings the second factor’s acr: the same browser stays signed in, with a new session, and the call succeeds', async () => {
    const jars: CookieJars = new Map();
    const first = await signIn('zora', { jars });
    expectStepUp(await call(app, '/api/proxy/demo/mfa/whoami', first.cookie), { acr_values: MFA });
    const { authTime: firstAuthTime } = await sessionOf(first.cookie);

    // Same browser: its app cookie goes to the login start, and its IdP session is still signed in.
    const stepUp = await signIn('zora', { jars, query: { returnTo: '/orders?open=1', acr_values: MFA }, fields: CODE });
    expect(stepUp.finalUrl).toBe(`${app}/orders?open=1`);
    expect(stepUp.cookie).not.toBe(first.cookie);
    const described = await sessionOf(stepUp.cookie);
    expect(described).toMatchObject({ authenticated: true, acr: MFA, user: { sub: 'zora' } });
    expect(described.user).not.toHaveProperty('acr');
    expect(described.authTime as number).toBeGreaterThanOrEqual(firstAuthTime as number);

    expect(await call(app, '/api/proxy/demo/mfa/whoami', stepUp.cookie)).toMatchObject({ status: 200, body: { sub: 'zora', acr: MFA } });
    expect(await call(app, '/api/proxy/strong/whoami', stepUp.cookie)).toMatchObject({ status: 200, body: { sub: 'zora' } });
    // The session it replaced says so (the browser client retries with the new cookie), and clears nothing.
    const replaced = await call(app, '/api/proxy/demo/mfa/whoami', first.cookie);
    expect(replaced).toMatchObject({ status: 401, body: { error: 'session_replaced' } });
    expect(replaced.setCookies).toEqual([]);

    // A refreshed access token keeps the sign-in's acr (forced here by a 401 from the API).
    const grantsBefore = refreshGrantsOf(await idpGrants(stack.issuer), 'zora');
    expect((await call(app, '/api/proxy/demo/status/401', stepUp.cookie)).status).toBe(401);
    expect(refreshGrantsOf(await idpGrants(stack.issuer), 'zora')).toBe(grantsBefore + 1);
    expect(await call(app, '/api/proxy/demo/mfa/whoami', stepUp.cookie)).toMatchObject({ status: 200, body: { acr: MFA } });
  });

  it('max_age makes the IdP ask again: the new session’s auth_time is fresh', async () => {
    const jars: CookieJars = new Map();
    const first = await signIn('abel', { jars, fields: { auth_age: '120' } });
    const { authTime: oldAuthTime } = await sessionOf(first.cookie);
    const startedAt = Math.floor(Date.now() / 1000);
    // Without max_age the IdP would answer from its session (auth_time two minutes old).
    const again = await signIn('abel', { jars, query: { max_age: '60' } });
    const { authTime } = await sessionOf(again.cookie);
    expect(authTime as number).toBeGreaterThanOrEqual(startedAt);
    expect(authTime as number).toBeGreaterThan(oldAuthTime as number);
    expect(await call(app, '/api/proxy/demo/recent?maxAge=60', again.cookie)).toMatchObject({ status: 200, body: { sub: 'abel' } });
  });

  /** A signed-in browser whose next login the callback refuses: its session must come through untouched. */
  async function expectRefusedKeepingSession(username: string, query: Record<string, string>, fields: Record<string, string>): Promise<string> {
    const jars: CookieJars = new Map();
    const { cookie } = await signIn(username, { jars });
    const sessionKeys = (await probe.keys('session')).length;
    const refused = await refusedLogin(username, query, jars, fields);
    expect(refused.status).toBe(400);
    const html = await refused.text();
    expect(html).toContain('<code>step_up_failed</code>');
    expect(cookieOf(jars)).toBe(cookie);
    expect((await probe.keys('session')).length).toBe(sessionKeys);
    expect(await sessionOf(cookie)).toMatchObject({ authenticated: true, acr: PWD });
    expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: username } });
    return html;
  }

  it('a step-up finished as another user is refused with step_up_failed: the session stays its own user’s, and the other user’s new grant is revoked', async () => {
    const jars: CookieJars = new Map();
    const { cookie } = await signIn('cleo', { jars });
    // Someone else at the keyboard, and an IdP that has forgotten Cleo: only the app's cookies go on.
    const appOnly: CookieJars = new Map([[app, new Map(jarFor(jars, app))]]);
    const logBefore = stack.apps[0]!.process.output().length;
    const refused = await refusedLogin('mallory-steps-up', { returnTo: '/pay', acr_values: MFA }, appOnly, CODE);
    expect(refused.status).toBe(400);
    expect(await refused.text()).toContain('<code>step_up_failed</code>');
    expect(cookieOf(appOnly)).toBe(cookie);
    expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'cleo' } });
    expect(await sessionOf(cookie)).toMatchObject({ authenticated: true, acr: PWD, user: { sub: 'cleo' } });
    expect(stack.apps[0]!.process.output().slice(logBefore)).toMatch(/"event":"auth\.step_up_other_user"[^\n]*"revoked":true/);
    // Cleo's own step-up in that browser goes through; then a plain login as someone else switches users, as before.
    const cleoAgain: CookieJars = new Map([[app, new Map(jarFor(appOnly, app))]]);
    const stepped = await signIn('cleo', { jars: cleoAgain, query: { acr_values: MFA }, fields: CODE });
    expect(await sessionOf(stepped.cookie)).toMatchObject({ authenticated: true, acr: MFA, user: { sub: 'cleo' } });
    const switched = await signIn('mallory-switches', { jars: new Map([[app, new Map(jarFor(cleoAgain, app))]]) });
    expect(await sessionOf(switched.cookie)).toMatchObject({ authenticated: true, user: { sub: 'mallory-switches' } });
  });

  it('a step-up link followed from another site (the Strict session cookie stays behind) and finished as another user is refused too: the session its last login left in the browser stays', async () => {
    const jars: CookieJars = new Map();
    const { cookie } = await signIn('erin', { jars });
    const sessionCookie = cookie.split('=', 1)[0]!;
    // What a top-level navigation from another site carries: the Lax cookies (the last login's), not the Strict session cookie.
    const crossSite = (): CookieJars => new Map([[app, new Map([...jarFor(jars, app)].filter(([name]) => name !== sessionCookie))]]);
    expect([...jarFor(crossSite(), app).keys()]).toEqual([`${sessionCookie}-replaces`]);
    const logBefore = stack.apps[0]!.process.output().length;
    const refused = await refusedLogin('mallory-from-a-link', { returnTo: '/pay', acr_values: MFA }, crossSite(), CODE);
    expect(refused.status).toBe(400);
    expect(await refused.text()).toContain('<code>step_up_failed</code>');
    expect(await sessionOf(cookie)).toMatchObject({ authenticated: true, acr: PWD, user: { sub: 'erin' } });
    expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'erin' } });
    expect(stack.apps[0]!.process.output().slice(logBefore)).toMatch(/"event":"auth\.step_up_other_user"[^\n]*"revoked":true/);
    // Erin's own step-up from that link goes through, and replaces her session.
    const stepped = await signIn('erin', { jars: crossSite(), query: { acr_values: MFA }, fields: CODE });
    expect(await sessionOf(stepped.cookie)).toMatchObject({ authenticated: true, acr: MFA, user: { sub: 'erin' } });
    expect(await sessionOf(cookie)).toMatchObject({ authenticated: false });
  });

  it('a step-up whose session ended meanwhile (signed out in another tab) is refused too: whose it was cannot be told any more', async () => {
    const jars: CookieJars = new Map();
    const { cookie } = await signIn('dora', { jars });
    const appOnly: CookieJars = new Map([[app, new Map(jarFor(jars, app))]]);
    const started = await browserRequest(new URL(`${app}/api/auth/login?${new URLSearchParams({ acr_values: MFA })}`), appOnly);
    expect(started.status).toBe(302);
    expect((await fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie, 'x-csrf': '1' } })).status).toBe(200);
    const callback = await followFlow(new URL(started.headers.get('location') as string, app), (next) => next.origin === new URL(app).origin, { username: 'dora', jars: appOnly, fields: CODE });
    const answer = await browserRequest(callback, appOnly);
    expect(answer.status).toBe(400);
    expect(await answer.text()).toContain('The session this sign-in was to strengthen has ended.');
    expect((await sessionOf(cookieOf(appOnly))).authenticated).toBe(false);
  });

  it('a sign-in without one of the ACRs the login asked for is refused with step_up_failed; the session there was stays', async () => {
    // The IdP answers acr_values with less (the code field left empty): acr is the password's.
    const html = await expectRefusedKeepingSession('bea', { returnTo: '/x', acr_values: MFA }, {});
    // "Try again" asks for the same step-up.
    const retry = /href="(\/api\/auth\/login\?[^"]*)"/.exec(html)?.[1]?.replaceAll('&#38;', '&');
    expect(Object.fromEntries(new URLSearchParams(retry?.split('?')[1]))).toEqual({ returnTo: '/x', acr_values: MFA });
  });

  it('a sign-in older than the max_age the login asked for is refused with step_up_failed (an IdP that ignores max_age)', async () => {
    // The dev IdP's test hook: the sign-in it reports happened ten minutes ago.
    await expectRefusedKeepingSession('bob', { acr_values: MFA, max_age: '60' }, { ...CODE, auth_age: '600' });
  });

  it('malformed or repeated acr_values / max_age: a readable 400 page, nothing sent to the IdP, no login attempt recorded', async () => {
    for (const query of ['acr_values=', 'acr_values=%22gold%22', 'acr_values=%3Cscript%3E', 'acr_values=a&acr_values=b', 'max_age=', 'max_age=-1', 'max_age=1.5', 'max_age=60&max_age=61', `acr_values=${'a'.repeat(300)}`]) {
      const res = await fetch(`${app}/api/auth/login?${query}`, { redirect: 'manual' });
      expect(res.status, query).toBe(400);
      expect(res.headers.get('content-type')).toMatch(/^text\/html/);
      expect(res.headers.get('location')).toBeNull();
      expect(res.headers.getSetCookie()).toEqual([]);
      const html = await res.text();
      expect(html).toContain('<code>invalid_request</code>');
      expect(html).not.toContain('<script>');
    }
  });

  it('what OIDC_AUTHORIZATION_PARAMS asks of every sign-in holds: a link cannot lower it (400, nothing pushed), the callback refuses a sign-in short of it, a silent login cannot skip its prompt', async () => {
    // Without this, anyone holding a password could start a sign-in asking for the password ACR
    // only, and the link's values would replace the operator's MFA floor in the pushed request.
    const floorApp = stack.apps[1]!;
    await restartGatehouse(floorApp, { OIDC_USE_PAR: 'true', OIDC_AUTHORIZATION_PARAMS: `acr_values=${encodeURIComponent(MFA)}&max_age=600&prompt=login` }, 'gatehouse-floor');
    try {
      for (const query of [`acr_values=${encodeURIComponent(DEV_IDP_ACR.password)}`, `acr_values=${encodeURIComponent(`${MFA} ${DEV_IDP_ACR.password}`)}`, 'max_age=601', 'max_age=315360000']) {
        const res = await fetch(`${floorApp.url}/api/auth/login?${query}`, { redirect: 'manual' });
        expect(res.status, query).toBe(400);
        expect(res.headers.get('location'), query).toBeNull();
        expect(res.headers.getSetCookie(), query).toEqual([]);
        expect(await res.text()).toContain('<code>invalid_request</code>');
      }
      for (const query of ['', `acr_values=${encodeURIComponent(MFA)}`, 'max_age=60']) {
        const res = await fetch(`${floorApp.url}/api/auth/login?${query}`, { redirect: 'manual' });
        await res.body?.cancel();
        expect(res.status, query).toBe(302);
        expect([...new URL(res.headers.get('location') ?? 'about:blank').searchParams.keys()].sort(), query).toEqual(['client_id', 'request_uri']);
      }
      // The IdP may answer the floor with less (here the password alone, the code field left empty;
      // without PAR, a browser can also strike acr_values from the request): no session comes of it.
      const passwordOnly: CookieJars = new Map();
      const refused = await refusedLogin('fay', {}, passwordOnly, {}, floorApp.url);
      expect(refused.status).toBe(400);
      expect(await refused.text()).toContain('<code>step_up_failed</code>');
      expect(jarFor(passwordOnly, floorApp.url).get('gatehouse')).toBeUndefined();
      // Nor from a sign-in older than the floor's max_age (the dev IdP back-dates it).
      const stale = await refusedLogin('fay', {}, new Map(), { ...CODE, auth_age: '700' }, floorApp.url);
      expect(stale.status).toBe(400);
      expect(await stale.text()).toContain('<code>step_up_failed</code>');
      // The second factor, in time: a session at the floor's acr.
      const strong = await signIn('fay', { origin: floorApp.url, fields: CODE });
      expect(await sessionOf(strong.cookie, floorApp.url)).toMatchObject({ authenticated: true, acr: MFA });
      // prompt=login: a silent login would let the IdP sign the browser in without it. The SPA hears
      // login_required at once, as from an IdP, and the IdP hears nothing.
      const silent = await fetch(`${floorApp.url}/api/auth/login?prompt=none&returnTo=%2Forders`, { redirect: 'manual' });
      expect(silent.status).toBe(302);
      const back = new URL(silent.headers.get('location') ?? 'about:blank');
      expect([back.origin, back.pathname, back.searchParams.get('authError')]).toEqual([new URL(floorApp.url).origin, '/orders', 'login_required']);
    } finally {
      await restartGatehouse(floorApp, { OIDC_USE_PAR: 'true', OIDC_AUTHORIZATION_PARAMS: '' }, 'gatehouse-par');
    }
  });

  it('prompt=login in OIDC_AUTHORIZATION_PARAMS without PAR: a browser that strikes it from the IdP URL and is signed in silently gets step_up_failed and no session', async () => {
    const floorApp = stack.apps[1]!;
    /** A login at floorApp whose authorization URL the browser edits on its way to the IdP, up to its callback URL. */
    async function editedFlow(username: string, jars: CookieJars, edit: (authorize: URL) => void): Promise<URL> {
      const start = await browserRequest(new URL(`${floorApp.url}/api/auth/login?returnTo=%2Forders`), jars);
      await start.body?.cancel();
      const authorize = new URL(start.headers.get('location') ?? 'about:blank');
      expect(authorize.searchParams.get('prompt')).toBe('login');
      edit(authorize);
      return followFlow(authorize, (next) => next.origin === new URL(floorApp.url).origin, { username, jars });
    }
    const editedLogin = async (username: string, jars: CookieJars, edit: (authorize: URL) => void) => browserRequest(await editedFlow(username, jars, edit), jars);
    const strikes: Array<[string, (authorize: URL) => void]> = [
      ['struck', (authorize) => authorize.searchParams.delete('prompt')],
      ['made consent', (authorize) => authorize.searchParams.set('prompt', 'consent')],
      ['made none', (authorize) => authorize.searchParams.set('prompt', 'none')],
    ];
    // The main client's id_tokens always carry auth_time (an old one, here); the -post client's only
    // when the request asks, as some IdPs': the callback cannot tell when that user signed in.
    const clients = [
      { OIDC_AUTHORIZATION_PARAMS: 'prompt=login', OIDC_CLIENT_ID: stack.clientId, OIDC_CLIENT_AUTH: 'client_secret_basic' },
      { OIDC_AUTHORIZATION_PARAMS: 'prompt=login', OIDC_CLIENT_ID: `${stack.clientId}-post`, OIDC_CLIENT_AUTH: 'client_secret_post' },
    ];
    try {
      for (const env of clients) {
        await restartGatehouse(floorApp, { OIDC_USE_PAR: 'false', ...env }, 'gatehouse-prompt-login');
        for (const [how, edit] of strikes) {
          // The browser holds an IdP session from a sign-in ten minutes ago (the dev IdP back-dates
          // it), made through the other app, which asks for no fresh sign-in.
          const jars: CookieJars = new Map();
          await signIn('gil', { jars, fields: { auth_age: '600' } });
          const sessionKeys = (await probe.keys('session')).length;
          const refused = await editedLogin('gil', jars, edit);
          expect(refused.status, how).toBe(400);
          expect(await refused.text(), how).toContain('<code>step_up_failed</code>');
          expect(jarFor(jars, floorApp.url).get('gatehouse'), how).toBeUndefined();
          expect((await probe.keys('session')).length, how).toBe(sessionKeys);
        }
        // The attempt keeps what it was started with: a configuration without prompt=login by the
        // time it comes back (a deploy in between) does not let the struck one through.
        {
          const jars: CookieJars = new Map();
          await signIn('gil', { jars, fields: { auth_age: '600' } });
          const callback = await editedFlow('gil', jars, (authorize) => authorize.searchParams.delete('prompt'));
          await restartGatehouse(floorApp, { OIDC_USE_PAR: 'false', ...env, OIDC_AUTHORIZATION_PARAMS: '' }, 'gatehouse-prompt-login-dropped');
          const refused = await browserRequest(callback, jars);
          expect(refused.status).toBe(400);
          expect(await refused.text()).toContain('<code>step_up_failed</code>');
          await restartGatehouse(floorApp, { OIDC_USE_PAR: 'false', ...env }, 'gatehouse-prompt-login');
        }
        // As sent, the IdP asks for the password again, and the sign-in it reports is this one.
        const jars: CookieJars = new Map();
        await signIn('gil', { jars, fields: { auth_age: '600' } });
        const startedAt = Math.floor(Date.now() / 1000);
        const again = await editedLogin('gil', jars, () => {});
        expect(again.status).toBe(302);
        expect(new URL(again.headers.get('location') ?? 'about:blank').pathname).toBe('/orders');
        const described = await sessionOf(cookieOf(jars, floorApp.url), floorApp.url);
        expect(described).toMatchObject({ authenticated: true, user: { sub: 'gil' } });
        expect(described.authTime as number).toBeGreaterThanOrEqual(startedAt - 1);
      }
    } finally {
      await restartGatehouse(floorApp, { OIDC_USE_PAR: 'true', OIDC_AUTHORIZATION_PARAMS: '', OIDC_CLIENT_ID: stack.clientId, OIDC_CLIENT_AUTH: 'client_secret_basic' }, 'gatehouse-par');
    }
  });

  it('with PAR, the step-up travels in the pushed request and the IdP still asks for the second factor', async () => {
    const res = await fetch(`${parApp}/api/auth/login?acr_values=${encodeURIComponent(MFA)}`, { redirect: 'manual' });
    await res.body?.cancel();
    expect([...new URL(res.headers.get('location') ?? 'about:blank').searchParams.keys()].sort()).toEqual(['client_id', 'request_uri']);

    const jars: CookieJars = new Map();
    await signIn('cleo', { jars, origin: parApp });
    const stepUp = await signIn('cleo', { jars, origin: parApp, query: { acr_values: MFA }, fields: CODE });
    expect(await sessionOf(stepUp.cookie, parApp)).toMatchObject({ acr: MFA });
    expect(await call(parApp, '/api/proxy/strong/whoami', stepUp.cookie)).toMatchObject({ status: 200, body: { sub: 'cleo' } });
  });
});
