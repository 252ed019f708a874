import { createHash, randomBytes } from 'node:crypto';
import { expect, type APIResponse } from '@playwright/test';
import { env, test } from './support/fixtures.ts';
import { Redis } from 'ioredis';
import { CLIENT_SECRET } from './support/stack.ts';
import { browserRequest, followFlow, loginThroughRp, type CookieJars } from './support/headless-login.ts';
import { redeemRefreshToken as redeemStoredRefreshToken, storedSecrets } from '../test/support/stored-session.ts';

// The negative cases of the public contract, from outside: Playwright's request context for the
// HTTP checks, the headless IdP helper where a login is needed, and the browser for the two tabs.
// Every refusal is checked for its status and body, and for what must not happen as a result.

const app = () => env('GATEHOUSE_URL');
const idp = () => env('IDP_URL');
const demoApi = () => env('DEMO_API_URL');

// --- helpers -------------------------------------------------------------------------------------

/** Every key of this run's stack (its own Redis prefix), sorted. */
async function redisKeys(pattern = '*'): Promise<string[]> {
  const redis = new Redis(env('GATEHOUSE_REDIS_URL'), { lazyConnect: true, maxRetriesPerRequest: 1 });
  await redis.connect();
  try {
    const keys: string[] = [];
    let cursor = '0';
    do {
      const [next, batch] = await redis.scan(cursor, 'MATCH', `${env('GATEHOUSE_KEY_PREFIX')}${pattern}`, 'COUNT', 1000);
      cursor = next;
      keys.push(...batch);
    } while (cursor !== '0');
    return keys.sort();
  } finally {
    redis.disconnect();
  }
}

const sessionKeys = () => redisKeys('session:*');

/** Signs a user in headlessly; returns the session cookie's value and where the callback sent the browser. */
async function signIn(username: string, returnTo = '/', jars: CookieJars = new Map()) {
  const result = await loginThroughRp({ startUrl: `${app()}/api/auth/login?returnTo=${encodeURIComponent(returnTo)}`, username, jars });
  const cookie = result.rpCookies.get('gatehouse');
  if (!cookie) throw new Error(`no session cookie after signing in ${username}`);
  return { cookie, finalUrl: result.finalUrl, callbackStatus: result.callbackStatus, jars };
}

/** Drives a Gatehouse login through the IdP up to the callback URL, without requesting it. */
async function flowToCallback(username: string, jars: CookieJars, returnTo = '/'): Promise<URL> {
  const start = new URL(`/api/auth/login?returnTo=${encodeURIComponent(returnTo)}`, app());
  let leftApp = false;
  const callback = await followFlow(
    start,
    (next) => {
      if (next.origin !== start.origin) leftApp = true;
      return leftApp && next.origin === start.origin;
    },
    { username, jars },
  );
  expect(callback.pathname).toBe('/api/auth/callback');
  return callback;
}

const withSession = (cookie: string, extra: Record<string, string> = {}) => ({ cookie: `gatehouse=${cookie}`, 'x-csrf': '1', ...extra });

function setCookies(res: APIResponse | Response): string[] {
  if ('headersArray' in res) return res.headersArray().filter((h) => h.name.toLowerCase() === 'set-cookie').map((h) => h.value);
  return res.headers.getSetCookie();
}

const sessionCookieSet = (res: APIResponse | Response) => setCookies(res).filter((line) => /^gatehouse=[^;]+/.test(line));
const sessionCookieCleared = (res: APIResponse | Response) =>
  setCookies(res).some((line) => /^gatehouse=;/.test(line) && /;\s*Max-Age=0\b/i.test(line));

/** An API refusal: the status, `{ error, message }` as JSON, never cached, never a redirect. */
async function expectApiError(res: APIResponse, status: number, code: string): Promise<void> {
  expect(res.status(), `${res.url()} → ${await res.text()}`).toBe(status);
  expect(res.headers()['content-type']).toMatch(/^application\/json/);
  expect(res.headers()['cache-control']).toContain('no-store');
  expect(res.headers().location).toBeUndefined();
  const body = (await res.json()) as { error?: unknown; message?: unknown };
  expect(body.error).toBe(code);
  expect(typeof body.message).toBe('string');
  expect(String(body.message).length).toBeGreaterThan(0);
  expect(Object.keys(body).sort()).toEqual(['error', 'message']);
}

/** A browser-facing failure: readable HTML with the code and a way forward; no stack, no session. */
async function expectErrorPage(res: Response, status: number, code: string, retryPath = '/api/auth/login'): Promise<void> {
  const html = await res.text();
  expect(res.status, html.slice(0, 500)).toBe(status);
  expect(res.headers.get('content-type')).toMatch(/^text\/html/);
  expect(res.headers.get('cache-control')).toContain('no-store');
  expect(html).toContain(`<code>${code}</code>`);
  expect(html).toContain(`<a href="${retryPath}">Try again</a>`);
  expect(html).not.toMatch(/\bat [\w.<>$]+ \(|node_modules|\.ts:\d+|\bError:/);
  expect(sessionCookieSet(res)).toEqual([]);
}

/** Whatever the demo API saw last, to prove a refused call never got there. */
async function lastUpstreamPath(request: import('@playwright/test').APIRequestContext): Promise<string | undefined> {
  const res = await request.get(`${demoApi()}/__demo/last`);
  if (res.status() === 404) return undefined;
  return ((await res.json()) as { path: string }).path;
}

/** The refresh token a session holds, read from Redis and decrypted with the app's secret. */
async function refreshTokenInStore(key: string): Promise<string> {
  const { refreshToken } = await storedSecrets(env('GATEHOUSE_REDIS_URL'), key, env('GATEHOUSE_SESSION_SECRET'));
  if (!refreshToken) throw new Error('the session holds no refresh token');
  return refreshToken;
}

const redeemRefreshToken = (refreshToken: string) => redeemStoredRefreshToken(idp(), env('GATEHOUSE_CLIENT_ID'), CLIENT_SECRET, refreshToken);

const probePath = () => `/echo/probe-${randomBytes(6).toString('hex')}`;

// --- login -------------------------------------------------------------------------------------

test.describe('login', () => {
  test('redirects to the IdP with a code flow request: PKCE S256, state, nonce, scope', async ({ playwright }) => {
    const http = await playwright.request.newContext({ baseURL: app() });
    const discovery = (await (await http.get(`${idp()}/.well-known/openid-configuration`)).json()) as { authorization_endpoint: string };
    const first = await http.get('/api/auth/login?returnTo=/somewhere', { maxRedirects: 0 });
    expect(first.status()).toBe(302);
    expect(first.headers()['cache-control']).toContain('no-store');
    const location = new URL(first.headers().location ?? '');
    expect(location.origin + location.pathname).toBe(discovery.authorization_endpoint);
    const params = location.searchParams;
    expect(params.get('response_type')).toBe('code');
    expect(params.get('client_id')).toBe(env('GATEHOUSE_CLIENT_ID'));
    expect(params.get('redirect_uri')).toBe(`${app()}/api/auth/callback`);
    expect(params.get('code_challenge_method')).toBe('S256');
    expect(params.get('code_challenge')).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(params.get('state')).toMatch(/^[A-Za-z0-9_-]{20,}$/);
    expect(params.get('nonce')).toMatch(/^[A-Za-z0-9_-]{20,}$/);
    expect(params.get('scope')?.split(' ')).toEqual(expect.arrayContaining(['openid', 'profile', 'offline_access']));
    // The transaction lives in a short-lived Lax cookie, not in the URL or the store.
    const tx = setCookies(first).find((line) => line.startsWith('gatehouse-tx-'));
    expect(tx).toMatch(/HttpOnly/i);
    expect(tx).toMatch(/SameSite=Lax/i);
    expect(tx).toMatch(/Path=\//);
    expect(tx).not.toMatch(/Domain=/i);
    expect(sessionCookieSet(first)).toEqual([]);

    // Every attempt has its own secrets.
    const second = new URL((await http.get('/api/auth/login', { maxRedirects: 0 })).headers().location ?? '').searchParams;
    for (const name of ['state', 'nonce', 'code_challenge']) expect(second.get(name)).not.toBe(params.get(name));
    await http.dispose();
  });

  test('an anonymous visitor starting logins writes nothing to Redis', async ({ playwright }) => {
    const before = await redisKeys();
    const http = await playwright.request.newContext({ baseURL: app() });
    for (let i = 0; i < 5; i++) {
      const res = await http.get(`/api/auth/login?returnTo=/page-${i}`, { maxRedirects: 0 });
      expect(res.status()).toBe(302);
    }
    const anonymous = await http.get('/api/auth/session', { headers: { 'x-csrf': '1' } });
    expect(await anonymous.json()).toEqual({ authenticated: false });
    await http.dispose();
    expect(await redisKeys()).toEqual(before);

    // The probe does see keys of this prefix: a completed login adds exactly one session.
    await signIn('redis-probe');
    const after = await sessionKeys();
    expect(after.filter((key) => !before.includes(key))).toHaveLength(1);
  });

  test('a returnTo that leaves the application lands on / after login', async () => {
    const jars: CookieJars = new Map();
    // A control first: a harmless path is honoured (query kept).
    const control = await signIn('carol', '/some/page?tab=2', jars);
    expect(control.finalUrl).toBe(`${app()}/some/page?tab=2`);

    const payloads = [
      'https://evil.example/steal',
      'http:evil.example',
      '//evil.example/x',
      '/\\evil.example',
      '\\\\evil.example',
      '/%2F%2Fevil.example',
      '%2F%2Fevil.example',
      '/%2fevil.example',
      '/%5Cevil.example',
      '/%252F%252Fevil.example',
      '/.//evil.example',
      '/a/..//evil.example',
      '/%09/evil.example',
      '/\t/evil.example',
      'javascript:alert(document.domain)',
      'JaVaScRiPt:alert(1)',
      ' //evil.example',
      'evil.example',
    ];
    for (const payload of payloads) {
      const { finalUrl, callbackStatus } = await signIn('carol', payload, jars);
      expect(callbackStatus, payload).toBe(302);
      expect(finalUrl, `returnTo=${JSON.stringify(payload)}`).toBe(`${app()}/`);
    }
  });

  test('several tabs may log in at once and all of them succeed', async ({ context }) => {
    const appOrigin = new URL(app()).origin;
    const callbacks: number[] = [];
    context.on('response', (res) => {
      const url = new URL(res.url());
      if (url.origin === appOrigin && url.pathname === '/api/auth/callback') callbacks.push(res.status());
    });
    const tabs = await Promise.all([context.newPage(), context.newPage(), context.newPage()]);
    // Every tab starts its own login before any of them finishes.
    for (const [index, tab] of tabs.entries()) {
      await tab.goto(`/api/auth/login?returnTo=${encodeURIComponent(`/?tab=${index}`)}`);
      await tab.waitForURL((url) => url.href.startsWith(`${idp()}/interaction/`));
      await tab.locator('input[name="login"]').fill('dave');
      await tab.locator('input[name="password"]').fill('pw');
    }
    await Promise.all(tabs.map((tab) => tab.getByRole('button', { name: 'Sign-in' }).click()));
    await Promise.all(tabs.map((tab, index) => tab.waitForURL(`${app()}/?tab=${index}`)));
    expect(callbacks).toEqual([302, 302, 302]);
    // Each later callback replaces the session the shared cookie pointed at, so a tab that asked for
    // its session in between may have seen "signed out": look again now that all have landed.
    for (const tab of tabs) {
      await tab.reload();
      await expect(tab.getByTestId('user-sub')).toHaveText('dave');
    }
    expect((await context.cookies(app())).filter((c) => c.name.startsWith('gatehouse-tx-'))).toEqual([]);
  });

  test('two tabs that finish signing in one after the other leave one session, not an unreachable second', async ({ context }) => {
    // A user of its own: the sessions list below must hold only this browser's.
    const user = `tabs-${Date.now().toString(36)}`;
    const tabs = [await context.newPage(), await context.newPage()];
    // Both start before either finishes, so neither login start saw a session to replace...
    for (const [index, tab] of tabs.entries()) {
      await tab.goto(`/api/auth/login?returnTo=${encodeURIComponent(`/?tab=${index}`)}`);
      await tab.waitForURL((url) => url.href.startsWith(`${idp()}/interaction/`));
      await tab.locator('input[name="login"]').fill(user);
      await tab.locator('input[name="password"]').fill('pw');
    }
    // ...and they finish one after the other, as a person does.
    for (const [index, tab] of tabs.entries()) {
      await tab.getByRole('button', { name: 'Sign-in' }).click();
      await tab.waitForURL(`${app()}/?tab=${index}`);
    }
    for (const tab of tabs) {
      await tab.reload();
      await expect(tab.getByTestId('user-sub')).toHaveText(user);
    }
    const listed = await tabs[0]!.evaluate(async () => (await fetch('/api/auth/sessions', { headers: { 'x-csrf': '1' } })).json());
    expect(listed).toMatchObject({ sessions: [{ current: true }] });
    expect((listed as { sessions: unknown[] }).sessions).toHaveLength(1);
    // The cookie that names the session to replace goes to the callback only, and never opens a session.
    const replaces = (await context.cookies()).filter((cookie) => cookie.name.endsWith('-replaces'));
    expect(replaces.map(({ path, httpOnly, sameSite }) => ({ path, httpOnly, sameSite }))).toEqual([{ path: '/api/auth/callback', httpOnly: true, sameSite: 'Lax' }]);
    const asSession = await fetch(`${app()}/api/auth/session`, { headers: { 'x-csrf': '1', cookie: `gatehouse=${replaces[0]!.value}` } });
    expect(await asSession.json()).toEqual({ authenticated: false });
    // Signing out leaves no cookie that names a session, the dead one included.
    const loggedOut = await tabs[0]!.evaluate(async () => (await fetch('/api/auth/logout', { method: 'POST', headers: { 'x-csrf': '1' } })).status);
    expect(loggedOut).toBe(200);
    expect((await context.cookies()).filter((cookie) => cookie.name === 'gatehouse' || cookie.name.endsWith('-replaces'))).toEqual([]);
  });
});

// --- callback ------------------------------------------------------------------------------------

test.describe('callback', () => {
  test('a wrong state is refused with a readable page and no session', async () => {
    const jars: CookieJars = new Map();
    const keysBefore = await sessionKeys();
    const callback = await flowToCallback('erin', jars);
    const forged = new URL(callback);
    forged.searchParams.set('state', randomBytes(32).toString('base64url'));
    await expectErrorPage(await browserRequest(forged, jars), 400, 'invalid_state');
    // No state at all, and no parameters at all, fare no better.
    const noState = new URL(callback);
    noState.searchParams.delete('state');
    await expectErrorPage(await browserRequest(noState, jars), 400, 'invalid_state');
    await expectErrorPage(await browserRequest(new URL('/api/auth/callback', app()), jars), 400, 'invalid_state');
    expect(await sessionKeys()).toEqual(keysBefore);

    // The forged attempts did not burn the real one.
    const genuine = await browserRequest(callback, jars);
    expect(genuine.status).toBe(302);
    expect(sessionCookieSet(genuine)).toHaveLength(1);
  });

  test('a replayed callback URL is refused (invalid_state) and creates no session', async () => {
    const jars: CookieJars = new Map();
    const callback = await flowToCallback('frank', jars);
    const txCookies = [...(jars.get(new URL(app()).origin) ?? new Map())].filter(([name]) => name.startsWith('gatehouse-tx-'));
    expect(txCookies).toHaveLength(1);

    const first = await browserRequest(callback, jars);
    expect(first.status).toBe(302);
    const [setLine] = sessionCookieSet(first);
    expect(setLine).toBeDefined();
    // The session cookie's attributes (http://localhost: no Secure, no __Host- prefix, no Domain).
    expect(setLine).toMatch(/; HttpOnly/i);
    expect(setLine).toMatch(/; SameSite=Strict/i);
    expect(setLine).toMatch(/; Path=\/(;|$)/);
    expect(setLine).not.toMatch(/; Domain=/i);
    expect(setLine).not.toMatch(/; Secure/i);
    expect(setCookies(first).some((line) => line.startsWith('__Host-'))).toBe(false);
    // The transaction cookie is cleared with the same answer.
    expect(setCookies(first).some((line) => line.startsWith(`${txCookies[0]?.[0]}=;`) && /Max-Age=0/i.test(line))).toBe(true);
    const keysAfterLogin = await sessionKeys();

    // The browser's own replay (Back button, history): the transaction is gone.
    await expectErrorPage(await browserRequest(callback, jars), 400, 'invalid_state');
    // An attacker who also kept the transaction cookie gets no session either (the code is spent).
    const replayJars: CookieJars = new Map([[new URL(app()).origin, new Map(txCookies)]]);
    const replay = await browserRequest(callback, replayJars);
    expect(replay.status).toBe(400);
    expect(await replay.text()).toContain('Try again');
    expect(sessionCookieSet(replay)).toEqual([]);
    expect(await sessionKeys()).toEqual(keysAfterLogin);
  });

  test('an error from the IdP (access_denied) is a readable 400 with no session', async () => {
    const jars: CookieJars = new Map();
    const keysBefore = await sessionKeys();
    const start = await browserRequest(new URL('/api/auth/login', app()), jars);
    const state = new URL(start.headers.get('location') ?? '').searchParams.get('state') ?? '';
    const denied = new URL('/api/auth/callback', app());
    denied.search = new URLSearchParams({ error: 'access_denied', error_description: 'The user said no', state, iss: idp() }).toString();
    await expectErrorPage(await browserRequest(denied, jars), 400, 'access_denied');
    expect(await sessionKeys()).toEqual(keysBefore);
  });

  test('a code from another login flow or another client is refused', async () => {
    const jars: CookieJars = new Map();
    const keysBefore = await sessionKeys();
    // Two Gatehouse flows in one browser; A's code is delivered with B's state (and B's PKCE verifier).
    const callbackA = await flowToCallback('gina', jars);
    const callbackB = await flowToCallback('gina', jars);
    const swapped = new URL(callbackA);
    swapped.searchParams.set('state', callbackB.searchParams.get('state') ?? '');
    await expectErrorPage(await browserRequest(swapped, jars), 400, 'token_exchange_failed');

    // A code the IdP issued to a different client (same redirect URI), slipped into Gatehouse's flow.
    const discovery = (await (await fetch(`${idp()}/.well-known/openid-configuration`)).json()) as { authorization_endpoint: string };
    const verifier = randomBytes(32).toString('base64url');
    const foreign = new URL(discovery.authorization_endpoint);
    foreign.search = new URLSearchParams({
      client_id: `${env('GATEHOUSE_CLIENT_ID')}-post`,
      response_type: 'code',
      redirect_uri: `${app()}/api/auth/callback`,
      scope: 'openid',
      state: 'foreign-state',
      nonce: 'foreign-nonce',
      code_challenge: createHash('sha256').update(verifier).digest('base64url'),
      code_challenge_method: 'S256',
    }).toString();
    const foreignCallback = await followFlow(foreign, (next) => next.origin === new URL(app()).origin, { username: 'gina', jars });
    const foreignCode = foreignCallback.searchParams.get('code');
    expect(foreignCode).toBeTruthy();
    const ours = await browserRequest(new URL('/api/auth/login', app()), jars);
    const ourState = new URL(ours.headers.get('location') ?? '').searchParams.get('state') ?? '';
    const injected = new URL('/api/auth/callback', app());
    injected.search = new URLSearchParams({ code: foreignCode ?? '', state: ourState, iss: idp() }).toString();
    await expectErrorPage(await browserRequest(injected, jars), 400, 'token_exchange_failed');

    expect(await sessionKeys()).toEqual(keysBefore);
    expect(jars.get(new URL(app()).origin)?.has('gatehouse')).toBe(false);
  });
});

// --- session ---------------------------------------------------------------------------------------

test.describe('session endpoint', () => {
  test('needs X-CSRF, is never cached and never reveals a token', async ({ request }) => {
    await expectApiError(await request.get('/api/auth/session'), 403, 'csrf_failed');

    const anonymous = await request.get('/api/auth/session', { headers: { 'x-csrf': '1' } });
    expect(anonymous.status()).toBe(200);
    expect(anonymous.headers()['cache-control']).toContain('no-store');
    expect(await anonymous.json()).toEqual({ authenticated: false });
    expect(sessionCookieCleared(anonymous)).toBe(false);

    const { cookie } = await signIn('hank');
    const forbidden = await request.get('/api/auth/session', { headers: { cookie: `gatehouse=${cookie}` } });
    await expectApiError(forbidden, 403, 'csrf_failed');

    const res = await request.get('/api/auth/session', { headers: withSession(cookie) });
    expect(res.status()).toBe(200);
    expect(res.headers()['cache-control']).toContain('no-store');
    expect(res.headers()['content-type']).toMatch(/^application\/json/);
    const text = await res.text();
    const body = JSON.parse(text) as { authenticated: boolean; user: Record<string, unknown>; expiresAt: number; logoutUrl: string };
    expect(body).toMatchObject({ authenticated: true, user: { sub: 'hank', name: 'Hank Example' } });
    expect(body.expiresAt).toBeGreaterThan(Date.now() / 1000);
    expect(body.expiresAt).toBeLessThan(Date.now() / 1000 + 8 * 24 * 3600);
    expect(body.logoutUrl).toMatch(/^\/api\/auth\/logout\?sid=[\w%-]+$/);
    expect(text).not.toMatch(/eyJ[\w-]{5,}/);
    expect(text).not.toMatch(/access_?token|refresh_?token|id_?token/i);
    // How and when the user signed in (the id_token's acr and auth_time) are no secrets.
    expect(Object.keys(body).sort()).toEqual(['acr', 'authTime', 'authenticated', 'expiresAt', 'logoutUrl', 'user']);
    expect(body).toMatchObject({ acr: 'urn:gatehouse:pwd', authTime: expect.any(Number) });
  });
});

// --- proxy ---------------------------------------------------------------------------------------

test.describe('proxy', () => {
  test('refuses forged calls (no X-CSRF, cross-site Origin, Sec-Fetch-Site) before reaching the API', async ({ request }) => {
    const { cookie } = await signIn('ivy');
    const cases: Array<[string, Record<string, string>]> = [
      ['no X-CSRF', { cookie: `gatehouse=${cookie}` }],
      ['X-CSRF with another value', withSession(cookie, { 'x-csrf': 'yes' })],
      ['cross-site Origin', withSession(cookie, { origin: 'https://evil.example' })],
      ['opaque Origin', withSession(cookie, { origin: 'null' })],
      ['same host, other port', withSession(cookie, { origin: 'http://localhost:1' })],
      ['Sec-Fetch-Site: cross-site', withSession(cookie, { 'sec-fetch-site': 'cross-site' })],
      ['Sec-Fetch-Site: same-site', withSession(cookie, { 'sec-fetch-site': 'same-site' })],
    ];
    for (const [name, headers] of cases) {
      for (const method of ['GET', 'POST'] as const) {
        const path = probePath();
        const res = await request.fetch(`/api/proxy/demo${path}`, { method, headers, data: method === 'POST' ? { x: 1 } : undefined, maxRedirects: 0 });
        await test.step(`${method} ${name}`, async () => {
          await expectApiError(res, 403, 'csrf_failed');
          expect(await lastUpstreamPath(request)).not.toBe(path);
        });
      }
    }
    // The same call made properly goes through (so the refusals above were about the headers).
    const path = probePath();
    const ok = await request.get(`/api/proxy/demo${path}`, { headers: withSession(cookie, { origin: new URL(app()).origin, 'sec-fetch-site': 'same-origin' }) });
    expect(ok.status()).toBe(200);
    expect(await lastUpstreamPath(request)).toBe(path);
  });

  test('the session endpoint applies the same origin checks', async ({ request }) => {
    const { cookie } = await signIn('ivy');
    await expectApiError(await request.get('/api/auth/session', { headers: withSession(cookie, { origin: 'https://evil.example' }) }), 403, 'csrf_failed');
    await expectApiError(await request.get('/api/auth/session', { headers: withSession(cookie, { 'sec-fetch-site': 'cross-site' }) }), 403, 'csrf_failed');
  });

  test('without a session: 401 JSON, never a redirect, and the API is not called', async ({ request }) => {
    for (const accept of ['application/json', 'text/html,application/xhtml+xml']) {
      const path = probePath();
      const res = await request.get(`/api/proxy/demo${path}`, { headers: { 'x-csrf': '1', accept }, maxRedirects: 0 });
      await expectApiError(res, 401, 'unauthenticated');
      expect(await lastUpstreamPath(request)).not.toBe(path);
    }
    // A user-optional API is still served, anonymously.
    const optional = await request.get('/api/proxy/public/anything', { headers: { 'x-csrf': '1' } });
    expect(optional.status()).toBe(200);
    expect(await optional.json()).toEqual({ anonymous: true });
  });

  test('an unknown API is a 404 JSON error', async ({ request }) => {
    const { cookie } = await signIn('jack');
    await expectApiError(await request.get('/api/proxy/nope/whoami', { headers: withSession(cookie) }), 404, 'unknown_api');
    await expectApiError(await request.get('/api/proxy/__proto__/whoami', { headers: withSession(cookie) }), 404, 'unknown_api');
  });

  test("upstream Set-Cookie and hop-by-hop headers never reach the browser; the browser's credentials never reach the API", async ({ request }) => {
    const { cookie } = await signIn('kate');
    const res = await request.get('/api/proxy/demo/set-cookie', { headers: withSession(cookie, { authorization: 'Basic YnJvd3Nlcjpzw6ljcmV0' }) });
    expect(res.status()).toBe(200);
    expect(await res.json()).toEqual({ ok: true });
    expect(setCookies(res)).toEqual([]);
    const headers = res.headers();
    expect(headers['x-upstream']).toBe('yes');
    expect(headers['proxy-authenticate']).toBeUndefined();
    expect(headers.upgrade).toBeUndefined();
    expect(headers.trailer).toBeUndefined();
    // (Keep-Alive is not checked: Node's own server adds `Keep-Alive: timeout=5` by default, the same
    // value the demo API sends, so its presence would prove nothing.)

    const last = (await (await request.get(`${demoApi()}/__demo/last`)).json()) as { path: string; headers: Record<string, string | undefined> };
    expect(last.path).toBe('/set-cookie');
    expect(last.headers.cookie).toBeUndefined();
    expect(last.headers['x-csrf']).toBeUndefined();
    expect(last.headers.authorization).toMatch(/^Bearer eyJ/);
  });

  test('a tampered cookie counts as no session and is cleared; the real session is untouched', async ({ request }) => {
    const { cookie } = await signIn('liam');
    const middle = Math.floor(cookie.length / 2);
    let at = middle;
    // Not the last character of a seal segment: its low bits are base64 padding that decoding ignores.
    while (!/[A-Za-z0-9]/.test(cookie[at] ?? '') || !/[\w-]/.test(cookie[at + 1] ?? '')) at++;
    const tampered = cookie.slice(0, at) + (cookie[at] === 'A' ? 'B' : 'A') + cookie.slice(at + 1);
    expect(tampered).not.toBe(cookie);
    expect(tampered).toHaveLength(cookie.length);

    const session = await request.get('/api/auth/session', { headers: withSession(tampered) });
    expect(session.status()).toBe(200);
    expect(await session.json()).toEqual({ authenticated: false });
    expect(sessionCookieCleared(session)).toBe(true);

    const path = probePath();
    const proxied = await request.get(`/api/proxy/demo${path}`, { headers: withSession(tampered) });
    await expectApiError(proxied, 401, 'unauthenticated');
    expect(sessionCookieCleared(proxied)).toBe(true);
    expect(await lastUpstreamPath(request)).not.toBe(path);

    // Garbage of other shapes too. (The `~2` suffix iron-session appends sits outside the seal's MAC
    // and is ignored by design, so the changes below stay inside the sealed part.)
    const [sealed = '', version = ''] = cookie.split('~');
    expect(version).toBe('2');
    const hmacStart = sealed.lastIndexOf('*') + 1;
    const flippedMac = sealed.slice(0, hmacStart) + (sealed[hmacStart] === 'A' ? 'B' : 'A') + sealed.slice(hmacStart + 1);
    for (const junk of ['x', 'Fe26.2**', `${sealed}x~2`, `${sealed.slice(0, -1)}~2`, `${flippedMac}~2`, sealed.replace('Fe26.2', 'Fe26.1')]) {
      const res = await request.get('/api/auth/session', { headers: withSession(junk) });
      expect(await res.json(), junk).toEqual({ authenticated: false });
      expect(sessionCookieCleared(res), junk).toBe(true);
    }

    const genuine = await request.get('/api/auth/session', { headers: withSession(cookie) });
    expect(await genuine.json()).toMatchObject({ authenticated: true, user: { sub: 'liam' } });
  });
});

// --- logout --------------------------------------------------------------------------------------

test.describe('logout', () => {
  test('without the right sid: 400 and nothing changes', async ({ request }) => {
    const { cookie } = await signIn('mia');
    const keys = await sessionKeys();
    const describe = async () => (await (await request.get('/api/auth/session', { headers: withSession(cookie) })).json()) as { authenticated: boolean; logoutUrl: string };
    const { logoutUrl } = await describe();
    const sid = new URL(logoutUrl, app()).searchParams.get('sid') ?? '';
    expect(sid.length).toBeGreaterThan(10);

    const wrong = [
      '/api/auth/logout',
      '/api/auth/logout?sid=',
      `/api/auth/logout?sid=${encodeURIComponent(sid.slice(0, -1))}`,
      `/api/auth/logout?sid=${encodeURIComponent(`${sid.slice(0, -1)}${sid.endsWith('A') ? 'B' : 'A'}`)}`,
      `/api/auth/logout?sid=${encodeURIComponent(sid)}x`,
    ];
    for (const path of wrong) {
      const res = await request.get(path, { headers: { cookie: `gatehouse=${cookie}` }, maxRedirects: 0 });
      await test.step(path, async () => {
        expect(res.status()).toBe(400);
        expect(res.headers()['content-type']).toMatch(/^text\/html/);
        expect(res.headers()['cache-control']).toContain('no-store');
        expect(res.headers().location).toBeUndefined();
        const html = await res.text();
        expect(html).toContain('<code>invalid_request</code>');
        expect(html).not.toMatch(/\bat [\w.<>$]+ \(|node_modules|\.ts:\d+/);
        expect(setCookies(res)).toEqual([]);
        // Nor is the browser's cache emptied by a link anyone could send.
        expect(res.headers()['clear-site-data']).toBeUndefined();
      });
    }
    // Still signed in, same session key, and the API still answers for this user.
    expect(await describe()).toMatchObject({ authenticated: true, logoutUrl });
    expect(await sessionKeys()).toEqual(keys);
    const api = await request.get('/api/proxy/demo/whoami', { headers: withSession(cookie) });
    expect(api.status()).toBe(200);
    expect(await api.json()).toMatchObject({ sub: 'mia' });
  });

  test('with the right sid: session deleted, cookie cleared, sent to the IdP end-session endpoint', async ({ request }) => {
    const before = await sessionKeys();
    const { cookie } = await signIn('noah');
    const mine = (await sessionKeys()).filter((key) => !before.includes(key));
    expect(mine).toHaveLength(1);
    const { logoutUrl } = (await (await request.get('/api/auth/session', { headers: withSession(cookie) })).json()) as { logoutUrl: string };
    const discovery = (await (await request.get(`${idp()}/.well-known/openid-configuration`)).json()) as { end_session_endpoint: string };
    const refreshToken = await refreshTokenInStore(mine[0] ?? '');

    const res = await request.get(logoutUrl, { headers: { cookie: `gatehouse=${cookie}` }, maxRedirects: 0 });
    expect(res.status()).toBe(302);
    expect(res.headers()['cache-control']).toContain('no-store');
    // The user's API answers the browser may have cached go with the session.
    expect(res.headers()['clear-site-data']).toBe('"cache"');
    expect(sessionCookieCleared(res)).toBe(true);
    // So is the cookie that names the session for the next login to end (on the callback's path).
    expect(setCookies(res).filter((line) => /^gatehouse-replaces=;/.test(line) && /;\s*Max-Age=0\b/i.test(line) && /;\s*Path=\/api\/auth\/callback\b/i.test(line))).toHaveLength(1);
    const location = new URL(res.headers().location ?? '');
    expect(location.origin + location.pathname).toBe(discovery.end_session_endpoint);
    expect(location.searchParams.get('id_token_hint')).toMatch(/^eyJ[\w-]+\.[\w-]+\.[\w-]+$/);
    expect(location.searchParams.get('post_logout_redirect_uri')).toBe(`${app()}/`);
    expect(location.searchParams.get('client_id')).toBe(env('GATEHOUSE_CLIENT_ID'));

    expect(await sessionKeys()).not.toContain(mine[0]);
    // The refresh token was revoked at the IdP: it can no longer be redeemed.
    expect(await redeemRefreshToken(refreshToken)).toEqual({ status: 400, error: 'invalid_grant' });
    // (Control: a live session's refresh token is redeemable, so the check above can fail.)
    const otherBefore = await sessionKeys();
    await signIn('noah-control');
    const other = (await sessionKeys()).filter((key) => !otherBefore.includes(key));
    expect(other).toHaveLength(1);
    expect((await redeemRefreshToken(await refreshTokenInStore(other[0] ?? ''))).status).toBe(200);
    // The old cookie is worth nothing now.
    expect(await (await request.get('/api/auth/session', { headers: withSession(cookie) })).json()).toEqual({ authenticated: false });
    await expectApiError(await request.get('/api/proxy/demo/whoami', { headers: withSession(cookie) }), 401, 'unauthenticated');
    // The same logout link again, with the dead cookie or (as a cross-site link would arrive under
    // Strict) without any: nothing to end, so nothing changes — 400 and no Set-Cookie.
    for (const headers of [{ cookie: `gatehouse=${cookie}` }, {}] as Array<Record<string, string>>) {
      const again = await request.get(logoutUrl, { headers, maxRedirects: 0 });
      expect(again.status()).toBe(400);
      expect(setCookies(again)).toEqual([]);
    }
  });

  test('in Chromium, only following the logout link signs out: the page fetching it, or prefetching it, changes nothing', async ({ page, context, request }) => {
    const { cookie } = await signIn('pia');
    await context.addCookies([{ name: 'gatehouse', value: cookie, url: app(), httpOnly: true, sameSite: 'Strict' }]);
    const signedIn = async () => ((await (await request.get('/api/auth/session', { headers: withSession(cookie) })).json()) as { authenticated: boolean }).authenticated;
    const { logoutUrl } = (await (await request.get('/api/auth/session', { headers: withSession(cookie) })).json()) as { logoutUrl: string };
    await page.goto('/');
    // A script's fetch (as Next's router fetches a <Link>'s target): Sec-Fetch-Mode: cors.
    const fetched = await page.evaluate(async (url) => (await fetch(url)).status, logoutUrl);
    expect(fetched).toBe(400);
    // A prefetch: Chromium marks it Sec-Purpose: prefetch.
    const prefetched = page.waitForResponse((response) => response.url().endsWith(logoutUrl));
    await page.evaluate((url) => {
      const link = document.createElement('link');
      link.rel = 'prefetch';
      link.href = url;
      document.head.append(link);
    }, logoutUrl);
    const prefetch = await prefetched;
    expect((await prefetch.request().allHeaders())['sec-purpose']).toMatch(/prefetch/);
    expect(prefetch.status()).toBe(400);
    expect(await signedIn()).toBe(true);
    // Following the link: the session ends, and the browser is on its way to the IdP's logout.
    const navigation = await page.goto(logoutUrl);
    expect(new URL(navigation?.url() ?? page.url()).origin).toBe(new URL(idp()).origin);
    expect(await signedIn()).toBe(false);
  });

  test('in Chromium, a POST logout gives the page only a step; the browser\'s navigation there takes the id_token to the IdP', async ({ page, context }) => {
    const { cookie } = await signIn('quin');
    await context.addCookies([{ name: 'gatehouse', value: cookie, url: app(), httpOnly: true, sameSite: 'Strict' }]);
    await page.goto('/');
    const answer = await page.evaluate(async () => {
      const response = await fetch('/api/auth/logout', { method: 'POST', headers: { 'X-CSRF': '1' } });
      return { text: await response.text(), cookies: document.cookie };
    });
    expect(answer.text).not.toMatch(/eyJ/);
    expect(answer.cookies).not.toMatch(/signout/);
    const { redirectTo } = JSON.parse(answer.text) as { redirectTo: string };
    const toIdp = page.waitForRequest((request) => request.url().startsWith(`${idp()}/session/end`));
    await page.goto(redirectTo);
    expect(new URL((await toIdp).url()).searchParams.get('id_token_hint')).toMatch(/^eyJ/);
  });

  test("in Chromium, signing out empties the browser's cache of the user's API answers", async ({ browser }) => {
    // A context of its own: Playwright turns the HTTP cache off in any context that routes requests,
    // as the shared fixture does to refuse requests that would leave the machine (counted here instead).
    const context = await browser.newContext({ baseURL: app() });
    const external: string[] = [];
    context.on('request', (request) => {
      if (!/^https?:\/\/(localhost|127\.0\.0\.1)[:/]/.test(request.url())) external.push(request.url());
    });
    const page = await context.newPage();
    const { cookie } = await signIn('rhea');
    const sessionCookie = { name: 'gatehouse', value: cookie, url: app(), httpOnly: true, sameSite: 'Strict' as const };
    await context.addCookies([sessionCookie]);
    await page.goto('/');
    const cachedAnswer = '/api/proxy/demo/cached?cc=max-age%3D600';
    // Whether the browser holds an answer for this URL and this Cookie header (`Vary: Cookie`), without asking anyone.
    const inCache = () =>
      page.evaluate(async (url) => {
        try {
          return (await fetch(url, { cache: 'only-if-cached', mode: 'same-origin', headers: { 'X-CSRF': '1' } })).status;
        } catch {
          return 'not cached';
        }
      }, cachedAnswer);
    expect(await page.evaluate(async (url) => (await fetch(url, { headers: { 'X-CSRF': '1' } })).status, cachedAnswer)).toBe(200);
    // Control: the answer is kept (private, for this cookie), so the check below can fail.
    expect(await inCache()).toBe(200);
    const signedOut = await page.evaluate(async () => (await fetch('/api/auth/logout', { method: 'POST', headers: { 'X-CSRF': '1' } })).status);
    expect(signedOut).toBe(200);
    // The same Cookie header as before (the sign-out step's cookie removed), so only the cache's own emptying can miss.
    await context.clearCookies();
    await context.addCookies([sessionCookie]);
    expect(await inCache()).toBe('not cached');
    expect(external, 'requests that left the machine').toEqual([]);
    await context.close();
  });

  test('POST logout needs X-CSRF and leaves the session alone without it', async ({ request }) => {
    const { cookie } = await signIn('olga');
    await expectApiError(await request.post('/api/auth/logout', { headers: { cookie: `gatehouse=${cookie}` } }), 403, 'csrf_failed');
    await expectApiError(await request.post('/api/auth/logout', { headers: withSession(cookie, { origin: 'https://evil.example' }) }), 403, 'csrf_failed');
    expect(await (await request.get('/api/auth/session', { headers: withSession(cookie) })).json()).toMatchObject({ authenticated: true });

    const res = await request.post('/api/auth/logout', { headers: withSession(cookie) });
    expect(res.status()).toBe(200);
    expect(res.headers()['cache-control']).toContain('no-store');
    expect(sessionCookieCleared(res)).toBe(true);
    // A same-origin step whose redirect (carrying the id_token) page scripts cannot read, with a
    // handle they cannot read either (an HttpOnly cookie, kept by this client as a browser keeps it).
    const { redirectTo } = (await res.json()) as { redirectTo: string };
    expect(redirectTo).toBe('/api/auth/logout?continue=1');
    const step = await request.get(redirectTo, { maxRedirects: 0 });
    expect(step.status()).toBe(302);
    const location = new URL(step.headers().location ?? 'about:blank');
    expect(location.origin).toBe(new URL(idp()).origin);
    expect(location.searchParams.get('id_token_hint')).toMatch(/^eyJ/);
    expect(await (await request.get('/api/auth/session', { headers: withSession(cookie) })).json()).toEqual({ authenticated: false });
  });
});
