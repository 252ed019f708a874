import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { expect } from '@playwright/test';
import { env, sessionCookie, signInThroughIdp, test } from './support/fixtures.ts';

// The real browser journey through the demo page: sign in at the dev IdP, call the API through the
// proxy, sign out at Gatehouse and at the IdP. The stack comes from e2e/global-setup.ts.

const SCREENSHOT = path.resolve(import.meta.dirname, '..', 'docs', 'demo.png');

test('sign in at the IdP, call the API through the proxy, sign out everywhere', async ({ page, context, request }) => {
  const appUrl = env('GATEHOUSE_URL');
  const apiUrl = env('DEMO_API_URL');
  const idp = env('IDP_URL');

  // Every request the browser makes to Gatehouse's auth endpoints, to prove there is no bounce.
  const authRequests: string[] = [];
  page.on('request', (req) => {
    const url = new URL(req.url());
    if (url.origin === new URL(appUrl).origin && url.pathname.startsWith('/api/auth/')) authRequests.push(`${req.method()} ${url.pathname}`);
  });

  await page.goto('/');
  await expect(page.getByRole('heading', { name: 'You are not signed in' })).toBeVisible();
  expect(await sessionCookie(context, appUrl)).toBeUndefined();

  // --- sign in ---------------------------------------------------------------------------------
  await page.getByTestId('login').click();
  await page.waitForURL((url) => url.href.startsWith(`${idp}/interaction/`));
  await expect(page.locator('input[name="login"]')).toBeVisible();
  await page.locator('input[name="login"]').fill('alice');
  await page.locator('input[name="password"]').fill('any-password');
  await page.getByRole('button', { name: 'Sign-in' }).click();
  await page.waitForURL((url) => url.origin === new URL(appUrl).origin && url.pathname === '/');

  // The SameSite=Strict caveat: the page reached at the end of the IdP's redirect chain shows the
  // user straight away; it does not bounce back to the login endpoint.
  await expect(page.getByTestId('user-name')).toHaveText('Alice Example');
  await expect(page.getByTestId('user-sub')).toHaveText('alice');
  expect(authRequests.filter((entry) => entry === 'GET /api/auth/login')).toHaveLength(1);
  expect(authRequests.filter((entry) => entry === 'GET /api/auth/callback')).toHaveLength(1);
  expect(page.url()).toBe(`${appUrl}/`);

  // The cookie: HttpOnly, SameSite=Strict, Path=/, host-only, not Secure over http://localhost.
  const cookie = await sessionCookie(context, appUrl);
  expect(cookie).toBeDefined();
  expect(cookie).toMatchObject({ httpOnly: true, sameSite: 'Strict', path: '/', secure: false, domain: 'localhost' });
  expect((await context.cookies()).map((c) => c.name)).not.toContain('__Host-gatehouse');
  // No login transaction cookie is left behind, and page script cannot see the session cookie.
  expect((await context.cookies(appUrl)).filter((c) => c.name.startsWith('gatehouse-tx-'))).toEqual([]);
  expect(await page.evaluate(() => document.cookie)).not.toContain('gatehouse=');

  // --- call the demo API through the proxy -------------------------------------------------------
  await page.getByTestId('call-api').click();
  const answerBox = page.getByTestId('api-answer');
  await expect(answerBox).toContainText('"sub": "alice"');
  const answer = JSON.parse((await answerBox.textContent()) ?? '') as { sub: string; aud: string | string[]; path: string; method: string };
  expect(answer.sub).toBe('alice');
  expect([answer.aud].flat()).toContain(apiUrl);
  expect(answer).toMatchObject({ method: 'GET', path: '/whoami' });

  if (process.env.UPDATE_SCREENSHOT === '1') {
    mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT });
  }

  // A JSON POST from the page itself, as the SPA would send it; the browser also tries to slip its
  // own Authorization header through, which must not reach the API.
  const posted = await page.evaluate(async () => {
    const response = await fetch('/api/proxy/demo/echo/orders/42?expand=items&n=1', {
      method: 'POST',
      headers: { 'X-CSRF': '1', 'Content-Type': 'application/json', Authorization: 'Bearer from-the-browser' },
      body: JSON.stringify({ item: 'tea', quantity: 2 }),
    });
    return { status: response.status, setCookie: response.headers.get('set-cookie'), body: (await response.json()) as Record<string, unknown> };
  });
  expect(posted.status).toBe(200);
  expect(posted.body).toMatchObject({
    sub: 'alice',
    method: 'POST',
    path: '/echo/orders/42',
    query: { expand: 'items', n: '1' },
    body: { item: 'tea', quantity: 2 },
  });
  expect([posted.body.aud].flat()).toContain(apiUrl);
  const echoedHeaders = posted.body.headers as Record<string, string | undefined>;
  expect(echoedHeaders['content-type']).toMatch(/^application\/json/);
  expect(echoedHeaders.cookie).toBeUndefined();
  expect(echoedHeaders['x-csrf']).toBeUndefined();
  expect(echoedHeaders.authorization ?? '').not.toContain('from-the-browser');

  // What reached the API, asked from outside the browser.
  const last = await request.get(`${apiUrl}/__demo/last`);
  expect(last.status()).toBe(200);
  const lastRequest = (await last.json()) as { method: string; path: string; headers: Record<string, string | undefined> };
  expect(lastRequest).toMatchObject({ method: 'POST', path: '/echo/orders/42' });
  expect(lastRequest.headers.authorization).toMatch(/^Bearer eyJ[\w-]+\.[\w-]+\.[\w-]+$/);
  expect(lastRequest.headers.authorization).not.toContain('from-the-browser');
  expect(lastRequest.headers.cookie).toBeUndefined();
  expect(lastRequest.headers['x-csrf']).toBeUndefined();

  // --- sign out --------------------------------------------------------------------------------
  const oldCookie = cookie?.value ?? '';
  const toEndSession = page.waitForRequest((request) => new URL(request.url()).origin === new URL(idp).origin);
  await page.getByTestId('logout').click();
  // Gatehouse ended its session and sent the browser to the IdP's end_session_endpoint, by way of a
  // same-origin step whose handle only the browser held: the IdP hears the id_token as the hint.
  await page.waitForURL((url) => url.origin === new URL(idp).origin);
  expect(new URL((await toEndSession).url()).searchParams.get('id_token_hint')).toMatch(/^eyJ[\w-]+\.[\w-]+\.[\w-]+$/);
  const endSession = new URL(page.url());
  expect(authRequests).toContain('POST /api/auth/logout');
  expect(await sessionCookie(context, appUrl)).toBeUndefined();
  const confirm = page.getByRole('button', { name: 'Yes, sign me out' });
  await expect(confirm).toBeVisible();
  expect(endSession.pathname).not.toBe('/');
  await confirm.click();
  await page.waitForURL(`${appUrl}/`);
  await expect(page.getByRole('heading', { name: 'You are not signed in' })).toBeVisible();

  // The old cookie, replayed from outside the browser, is refused everywhere.
  const replayHeaders = { cookie: `gatehouse=${oldCookie}`, 'x-csrf': '1' };
  const replaySession = await request.get(`${appUrl}/api/auth/session`, { headers: replayHeaders });
  expect(replaySession.status()).toBe(200);
  expect(await replaySession.json()).toEqual({ authenticated: false });
  const replayProxy = await request.get(`${appUrl}/api/proxy/demo/whoami`, { headers: replayHeaders, maxRedirects: 0 });
  expect(replayProxy.status()).toBe(401);
  expect(await replayProxy.json()).toMatchObject({ error: 'unauthenticated' });

  // The IdP session ended too: signing in again shows the IdP's login form, no silent sign-in.
  await page.getByTestId('login').click();
  await page.waitForURL((url) => url.href.startsWith(`${idp}/interaction/`));
  await expect(page.locator('input[name="login"]')).toBeVisible();
  await expect(page.getByRole('button', { name: 'Sign-in' })).toBeVisible();
});

test('SameSite=Strict: a page reached by a cross-site navigation still shows the signed-in user', async ({ page, context }) => {
  const appUrl = env('GATEHOUSE_URL');
  await page.goto('/');
  await signInThroughIdp(page, 'sam');
  await expect(page.getByTestId('user-sub')).toHaveText('sam');

  // The IdP (127.0.0.1) is another site than the app (localhost): navigating from one of its pages
  // is what a browser does after the IdP's redirect, where the Strict cookie is left off the document request.
  const crossSite = new URL('/.well-known/openid-configuration', env('IDP_URL'));
  await page.goto(crossSite.href);

  const documentRequest = page.waitForRequest((req) => req.url() === `${appUrl}/?from=elsewhere` && req.resourceType() === 'document');
  const sessionRequest = page.waitForRequest((req) => req.url() === `${appUrl}/api/auth/session`);
  await page.evaluate((target) => window.location.assign(target), `${appUrl}/?from=elsewhere`);
  const [doc, sessionCall] = await Promise.all([documentRequest, sessionRequest]);
  const docHeaders = await doc.allHeaders();
  // The document request carried no Strict session cookie.
  expect(docHeaders.cookie ?? '').not.toContain('gatehouse=');
  // The page asks for the session with a same-origin fetch, which carries the Strict cookie.
  expect((await sessionCall.allHeaders()).cookie ?? '').toContain('gatehouse=');
  await expect(page.getByTestId('user-sub')).toHaveText('sam');
  expect(new URL(page.url()).pathname).toBe('/');
  expect(await sessionCookie(context, appUrl)).toBeDefined();
});

test('signing in again ends the session it replaces at once, though the IdP is on another site and the Strict cookie never reaches the callback', async ({ page, context, request }) => {
  const appUrl = env('GATEHOUSE_URL');
  // This suite runs the IdP on another site (127.0.0.1) than the app (localhost): the callback is the
  // end of a cross-site redirect chain, so the browser leaves the Strict session cookie off it.
  expect(new URL(env('IDP_URL')).hostname).not.toBe(new URL(appUrl).hostname);
  await page.goto('/');
  await signInThroughIdp(page, 'bob');
  await expect(page.getByTestId('user-name')).toHaveText('Bob Example');
  const first = (await sessionCookie(context, appUrl))?.value;
  expect(first).toBeTruthy();

  const callbackCookies: string[] = [];
  page.on('request', (req) => {
    if (req.url().startsWith(`${appUrl}/api/auth/callback`)) void req.allHeaders().then((headers) => callbackCookies.push(headers.cookie ?? ''));
  });
  // Log in again while still holding the first session's cookie, after the IdP session ended: the
  // IdP shows its form, and its submission starts the redirect chain back on the IdP's site.
  await context.clearCookies({ domain: new URL(env('IDP_URL')).hostname });
  await page.goto('/api/auth/login?returnTo=%2F%3Fagain%3D1');
  await page.waitForURL((url) => url.href.startsWith(`${env('IDP_URL')}/interaction/`));
  await page.locator('input[name="login"]').fill('bob');
  await page.locator('input[name="password"]').fill('any-password');
  await page.getByRole('button', { name: 'Sign-in' }).click();
  await page.waitForURL(`${appUrl}/?again=1`);
  await expect(page.getByTestId('user-name')).toHaveText('Bob Example');
  const second = (await sessionCookie(context, appUrl))?.value;
  expect(second).toBeTruthy();
  expect(second).not.toBe(first);
  expect(callbackCookies).toHaveLength(1);
  expect(callbackCookies[0]).not.toContain('gatehouse=');

  const newSession = await request.get(`${appUrl}/api/auth/session`, { headers: { cookie: `gatehouse=${second}`, 'x-csrf': '1' } });
  expect(await newSession.json()).toMatchObject({ authenticated: true, user: { sub: 'bob' } });
  const listing = await request.get(`${appUrl}/api/auth/sessions`, { headers: { cookie: `gatehouse=${second}`, 'x-csrf': '1' } });
  const { sessions } = (await listing.json()) as { sessions: Array<{ current: boolean }> };
  expect(sessions.filter((entry) => !entry.current)).toHaveLength(0);
  // The replaced session authorises nothing any more, and its answers leave the browser's cookie alone.
  const oldSession = await request.get(`${appUrl}/api/auth/session`, { headers: { cookie: `gatehouse=${first}`, 'x-csrf': '1' } });
  expect(await oldSession.json()).toEqual({ authenticated: false });
  expect(oldSession.headersArray().filter((header) => header.name.toLowerCase() === 'set-cookie')).toEqual([]);
  const oldProxy = await request.get(`${appUrl}/api/proxy/demo/whoami`, { headers: { cookie: `gatehouse=${first}`, 'x-csrf': '1' } });
  expect(oldProxy.status()).toBe(401);
  expect(await oldProxy.json()).toMatchObject({ error: 'session_replaced' });
  await expect(page.getByTestId('user-sub')).toHaveText('bob');
});
