import fc from 'fast-check';
import { Redis } from 'ioredis';
import { request } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { browserRequest, followFlow, jarFor, loginThroughRp, storeCookies, type CookieJars } from '../../e2e/support/headless-login.ts';
import { CLIENT_SECRET, startGatehouse, startStack, type Stack } from '../../e2e/support/stack.ts';
import { lastBearerAt, waitFor, waitUntil } from '../support/http-client.ts';
import { hostileReturnTo } from '../support/hostile-inputs.ts';
import { redeemRefreshToken, storedSecrets } from '../support/stored-session.ts';

/**
 * Login, re-login, logout and the login transaction, attacked from outside through the real IdP
 * (on another site than the app, as in production), real Redis and both server shapes.
 */

const SHAPES = ['fast', 'next'] as const;
// Shorter than the refresh skew (30 s): every proxied call refreshes, so a refresh can be made to meet an IdP fault.
const ACCESS_TOKEN_TTL_SEC = 20;

const cookieLine = (jar: Map<string, string>) => [...jar].map(([name, value]) => `${name}=${value}`).join('; ');
const spa = (cookie: string | undefined) => ({ 'x-csrf': '1', ...(cookie ? { cookie } : {}) });

describe.each(SHAPES)('login and logout on %s', (shape) => {
  let stack: Stack;
  let app: string;
  let redis: Redis;

  beforeAll(async () => {
    stack = await startStack({ server: shape, workers: 1, accessTokenTtl: ACCESS_TOKEN_TTL_SEC });
    app = stack.apps[0]!.url;
    redis = new Redis(stack.appEnv.REDIS_URL as string);
  });
  afterAll(async () => {
    redis?.disconnect();
    await stack?.stop();
  });

  const sessionKeysOf = async () => redis.keys(`${stack.keyPrefix}session:*`);

  /** A login, and the one store key it created. */
  async function loginWithKey(username: string, jars: CookieJars) {
    const before = new Set(await sessionKeysOf());
    const result = await login(username, '/', jars);
    const created = (await sessionKeysOf()).filter((key) => !before.has(key));
    expect(created).toHaveLength(1);
    return { ...result, key: created[0] as string };
  }

  /** Logs in with `jars` (reusing its IdP session, if any); returns where the callback sent the browser. */
  async function login(username: string, returnTo: string, jars: CookieJars, prompt?: 'none') {
    const query = new URLSearchParams({ returnTo, ...(prompt ? { prompt } : {}) });
    return loginThroughRp({ startUrl: `${app}/api/auth/login?${query}`, username, jars });
  }

  it('never redirects off-site after login, whatever returnTo says (generated, through the real callback)', async () => {
    const jars: CookieJars = new Map();
    const control = await login('olga', '/a/./b/../c?tab=2', jars);
    expect(control.finalUrl).toBe(`${app}/a/c?tab=2`);
    await fc.assert(
      fc.asyncProperty(hostileReturnTo, async (returnTo) => {
        const { finalUrl, callbackStatus } = await login('olga', returnTo, jars);
        expect(callbackStatus).toBe(302);
        expect(new URL(finalUrl).origin, `returnTo=${JSON.stringify(returnTo)} → ${finalUrl}`).toBe(app);
      }),
      { numRuns: 40, examples: [['/.//evil.example'], ['/a/..//evil.example'], ['/%2e//evil.example']] },
    );
  });

  it('never redirects off-site after a silent login, signed in at the IdP or not', async () => {
    const signedIn: CookieJars = new Map();
    await login('pia', '/', signedIn);
    await fc.assert(
      fc.asyncProperty(hostileReturnTo, fc.boolean(), async (returnTo, atIdp) => {
        const { finalUrl } = await login('pia', returnTo, atIdp ? signedIn : new Map(), 'none');
        const target = new URL(finalUrl);
        expect(target.origin, `returnTo=${JSON.stringify(returnTo)} → ${finalUrl}`).toBe(app);
        if (!atIdp) expect(target.searchParams.get('authError')).toBe('login_required');
      }),
      { numRuns: 30, examples: [['/.//evil.example', false], ['/.//evil.example', true]] },
    );
  });

  it('a login attempt’s cookie fits a browser’s 4096 bytes: the longest returnTo comes back after sign-in, a longer one becomes /', async () => {
    const jars: CookieJars = new Map();
    await login('rosa', '/', jars);
    // 2048 characters once normalised (`é` is `%C3%A9`), the most returnTo may hold.
    const largest = `/${'é'.repeat(341)}a`;
    const acrValues = Array.from({ length: 8 }, (_, i) => `urn:acr:${i}`.padEnd(31, 'x')).join(' ');
    const attemptCookie = async (returnTo: string) => {
      // Everything a login records at its largest: the step-up, prompt=none, the current session.
      const query = new URLSearchParams({ returnTo, acr_values: acrValues, max_age: '315360000', prompt: 'none' });
      const copy: CookieJars = new Map([[app, new Map(jarFor(jars, app))]]);
      const res = await browserRequest(new URL(`${app}/api/auth/login?${query}`), copy);
      expect(res.status).toBe(302);
      const lines = res.headers.getSetCookie().filter((line) => /^(__Host-)?gatehouse-tx-/.test(line));
      expect(lines).toHaveLength(1);
      return lines[0] as string;
    };
    for (const returnTo of [largest, `${largest}b`, `/${'é'.repeat(2000)}`]) {
      const line = await attemptCookie(returnTo);
      expect(Buffer.byteLength(line), returnTo.slice(0, 20)).toBeLessThanOrEqual(4096);
    }
    expect((await login('rosa', largest, jars)).finalUrl).toBe(`${app}/${'%C3%A9'.repeat(341)}a`);
    // One character more, or far more (which once made a 16 KB cookie no browser keeps): the login still works, and lands on /.
    expect((await login('rosa', `${largest}b`, jars)).finalUrl).toBe(`${app}/`);
    expect((await login('rosa', `/${'é'.repeat(2000)}`, jars)).finalUrl).toBe(`${app}/`);
  });

  it('a browser holds at most 4 KiB of unfinished logins, whatever page starts them: a full-size one pushes the older ones out, small ones keep three', async () => {
    // Three at full size made an 11 KiB Cookie header: past nginx's default 8 KiB, every request of that browser failed for 10 minutes.
    const acrValues = Array.from({ length: 8 }, (_, i) => `urn:acr:${i}`.padEnd(31, 'x')).join(' ');
    const jar = new Map<string, string>();
    const start = async (returnTo: string, site: string, stepUp = true) => {
      const query = new URLSearchParams({ returnTo, ...(stepUp ? { acr_values: acrValues, max_age: '315360000' } : {}) });
      const res = await request(`${app}/api/auth/login?${query}`, { headers: { accept: 'text/html', 'sec-fetch-mode': 'navigate', 'sec-fetch-site': site, ...(jar.size ? { cookie: cookieLine(jar) } : {}) } });
      await res.body.text();
      expect(res.statusCode).toBe(302);
      storeCookies(jar, [res.headers['set-cookie'] ?? []].flat());
      const attempts = [...jar].filter(([name]) => /^(__Host-)?gatehouse-tx-/.test(name));
      return { count: attempts.length, bytes: attempts.reduce((sum, [name, value]) => sum + name.length + 1 + value.length, 0) };
    };
    const longest = `/${'a'.repeat(2047)}`;
    for (const site of ['cross-site', 'same-origin', 'none', 'cross-site']) {
      const held = await start(longest, site);
      expect(held, site).toMatchObject({ count: 1 });
      expect(held.bytes, site).toBeGreaterThan(3000);
      expect(held.bytes, site).toBeLessThanOrEqual(4096);
    }
    jar.clear();
    for (let i = 1; i <= 4; i++) expect((await start(`/small/${i}`, 'same-origin', false)).count, `small ${i}`).toBe(Math.min(i, 3));
    const beside = await start(longest, 'same-origin');
    expect(beside.bytes).toBeLessThanOrEqual(4096);
    expect(beside.count).toBeGreaterThanOrEqual(1);
  });

  it('GET logout without a matching session changes nothing: 400 and no Set-Cookie', async () => {
    // A cross-site link arrives without the Strict cookie; a stale cookie leads nowhere either.
    const { rpCookies, key } = await loginWithKey('quinn', new Map());
    const live = cookieLine(rpCookies);
    const described = (await (await fetch(`${app}/api/auth/session`, { headers: spa(live) })).json()) as { logoutUrl: string };
    expect(await redis.del(key)).toBe(1);
    for (const cookie of [undefined, live]) {
      for (const sid of ['anything', new URL(described.logoutUrl, app).searchParams.get('sid') as string]) {
        // A navigation, as a browser marks one (fetch would say Sec-Fetch-Mode: cors, refused on that ground alone).
        const res = await request(`${app}/api/auth/logout?sid=${encodeURIComponent(sid)}`, { headers: { 'sec-fetch-mode': 'navigate', ...(cookie ? { cookie } : {}) } });
        expect(res.statusCode).toBe(400);
        expect(res.headers['content-type']).toMatch(/^text\/html/);
        expect(res.headers['set-cookie']).toBeUndefined();
        expect(res.headers['clear-site-data']).toBeUndefined();
        expect(await res.body.text()).toContain('<code>invalid_request</code>');
      }
    }
  });

  /**
   * Logs in again with `jars`. Login start is a same-site navigation and carries the session cookie;
   * the callback ends a cross-site redirect chain, where the browser leaves the Strict cookie off.
   */
  async function reLoginAsBrowserWouldUnderStrict(username: string, jars: CookieJars): Promise<string> {
    const start = new URL(`${app}/api/auth/login?returnTo=%2Fagain`);
    let leftApp = false;
    const callback = await followFlow(start, (next) => (leftApp ||= next.origin !== start.origin) && next.origin === start.origin, { username, jars });
    const appJar = jarFor(jars, start.origin);
    const previous = appJar.get('gatehouse');
    appJar.delete('gatehouse');
    const landed = await browserRequest(callback, jars);
    expect(landed.status).toBe(302);
    expect(landed.headers.get('location')).toBe(`${app}/again`);
    expect(appJar.get('gatehouse')).toBeTruthy();
    expect(appJar.get('gatehouse')).not.toBe(previous);
    return `gatehouse=${appJar.get('gatehouse')}`;
  }

  async function expectReplaced(oldCookie: string, newCookie: string): Promise<void> {
    // The old session authorises nothing, at once; its answers leave the (new) cookie alone.
    const proxied = await fetch(`${app}/api/proxy/demo/whoami`, { headers: spa(oldCookie) });
    expect(proxied.status).toBe(401);
    expect(proxied.headers.get('x-gatehouse-error')).toBe('session_replaced');
    expect(await proxied.json()).toMatchObject({ error: 'session_replaced' });
    expect(proxied.headers.getSetCookie()).toEqual([]);
    const described = await fetch(`${app}/api/auth/session`, { headers: spa(oldCookie) });
    expect(await described.json()).toEqual({ authenticated: false });
    expect(described.headers.getSetCookie()).toEqual([]);
    const listing = (await (await fetch(`${app}/api/auth/sessions`, { headers: spa(newCookie) })).json()) as { sessions: Array<{ current: boolean }> };
    expect(listing.sessions).toEqual([expect.objectContaining({ current: true })]);
    // The new session works, its refresh included (every call refreshes with tokens this short-lived).
    expect((await fetch(`${app}/api/proxy/demo/whoami`, { headers: spa(newCookie) })).status).toBe(200);
    expect((await fetch(`${app}/api/proxy/demo/whoami`, { headers: spa(newCookie) })).status).toBe(200);
  }

  it('a new login ends the session it replaces although the Strict cookie never reaches the callback, and revokes its refresh token', async () => {
    const first = await loginWithKey('rita', new Map());
    const oldCookie = cookieLine(first.rpCookies);
    expect((await fetch(`${app}/api/proxy/demo/whoami`, { headers: spa(oldCookie) })).status).toBe(200);
    // Read after that call: with tokens this short-lived, it rotated the refresh token.
    const { refreshToken: oldRefreshToken } = await storedSecrets(stack.appEnv.REDIS_URL as string, first.key, stack.appEnv.SESSION_SECRET as string);

    // The same browser signs in again after its IdP session ended: a new IdP session, a new grant.
    const browser: CookieJars = new Map([[app, new Map(first.rpCookies)]]);
    const newCookie = await reLoginAsBrowserWouldUnderStrict('rita', browser);
    await expectReplaced(oldCookie, newCookie);
    expect(await redeemRefreshToken(stack.issuer, stack.clientId, CLIENT_SECRET, oldRefreshToken!)).toMatchObject({ status: 400, error: 'invalid_grant' });
  });

  it('a silent re-login within the same IdP session ends the old session without revoking the grant both share', async () => {
    const jars: CookieJars = new Map();
    const first = await login('ruth', '/', jars);
    const oldCookie = cookieLine(first.rpCookies);
    const newCookie = await reLoginAsBrowserWouldUnderStrict('ruth', jars);
    await expectReplaced(oldCookie, newCookie);
  });

  it('a login whose old session ended just before (signed out from another device) marks it replaced: calls still made with the old cookie leave the new one alone', async () => {
    const first = await loginWithKey('rhea', new Map());
    const oldCookie = cookieLine(first.rpCookies);
    const elsewhere = cookieLine((await login('rhea', '/', new Map())).rpCookies);
    const signedOutElsewhere = await fetch(`${app}/api/auth/sessions`, { method: 'DELETE', headers: spa(elsewhere) });
    expect(await signedOutElsewhere.json()).toEqual({ ended: 1 });
    expect(await redis.exists(first.key)).toBe(0);

    // The first browser, not having called since, signs in again.
    const browser: CookieJars = new Map([[app, new Map(first.rpCookies)]]);
    const newCookie = await reLoginAsBrowserWouldUnderStrict('rhea', browser);
    // A call its tab made with the old cookie answers after the callback: it must not clear the new cookie by name.
    const late = await fetch(`${app}/api/proxy/demo/whoami`, { headers: spa(oldCookie) });
    expect(late.status).toBe(401);
    expect(await late.json()).toMatchObject({ error: 'session_replaced' });
    expect(late.headers.getSetCookie()).toEqual([]);
    const described = await fetch(`${app}/api/auth/session`, { headers: spa(oldCookie) });
    expect(await described.json()).toEqual({ authenticated: false });
    expect(described.headers.getSetCookie()).toEqual([]);
    expect((await fetch(`${app}/api/proxy/demo/whoami`, { headers: spa(newCookie) })).status).toBe(200);
  });

  it('keeps at most three unfinished logins per browser, and clears the attempt on every callback outcome', async () => {
    const appJar = new Map<string, string>();
    const states: string[] = [];
    for (let attempt = 0; attempt < 6; attempt++) {
      const res = await fetch(`${app}/api/auth/login`, { headers: { cookie: cookieLine(appJar) }, redirect: 'manual' });
      expect(res.status).toBe(302);
      states.push(new URL(res.headers.get('location') as string).searchParams.get('state') as string);
      for (const line of res.headers.getSetCookie()) {
        const [pair = ''] = line.split(';');
        const [name = '', value = ''] = [pair.slice(0, pair.indexOf('=')), pair.slice(pair.indexOf('=') + 1)];
        if (value) appJar.set(name, value);
        else appJar.delete(name);
      }
      const live = [...appJar.keys()].filter((name) => name.startsWith('gatehouse-tx-'));
      expect(live.length).toBeLessThanOrEqual(3);
      // The newest attempt is always among them.
      expect(live).toContain(`gatehouse-tx-${states.at(-1)!.replace(/[^A-Za-z0-9_-]/g, '').slice(0, 16)}`);
    }
    const txName = (state: string) => `gatehouse-tx-${state.replace(/[^A-Za-z0-9_-]/g, '').slice(0, 16)}`;
    const [errorState, badCodeState] = states.slice(-2) as [string, string];
    const outcomes: Array<{ query: Record<string, string>; status: number; code: string; state: string }> = [
      { query: { state: errorState, error: 'access_denied', iss: stack.issuer }, status: 400, code: 'access_denied', state: errorState },
      { query: { state: badCodeState, code: 'not-a-code', iss: stack.issuer }, status: 400, code: 'token_exchange_failed', state: badCodeState },
    ];
    for (const outcome of outcomes) {
      const res = await fetch(`${app}/api/auth/callback?${new URLSearchParams(outcome.query)}`, { headers: { cookie: cookieLine(appJar) }, redirect: 'manual' });
      expect(res.status).toBe(outcome.status);
      expect(await res.text()).toContain(`<code>${outcome.code}</code>`);
      expect(res.headers.getSetCookie()).toEqual([expect.stringMatching(new RegExp(`^${txName(outcome.state)}=;.*Max-Age=0`, 'i'))]);
    }
  });

  it("believes an IdP's error answer only with the issuer's own iss (RFC 9207), silent logins included", async () => {
    /** A login started in a fresh browser: its state and the cookie that holds the attempt. */
    const start = async (prompt?: 'none') => {
      const res = await fetch(`${app}/api/auth/login?${new URLSearchParams({ returnTo: '/orders', ...(prompt ? { prompt } : {}) })}`, { redirect: 'manual' });
      expect(res.status).toBe(302);
      const state = new URL(res.headers.get('location') as string).searchParams.get('state') as string;
      return { state, cookie: res.headers.getSetCookie().map((line) => line.split(';')[0]).join('; ') };
    };
    const callback = async (attempt: { state: string; cookie: string }, query: Record<string, string>) =>
      fetch(`${app}/api/auth/callback?${new URLSearchParams({ state: attempt.state, ...query })}`, { headers: { cookie: attempt.cookie }, redirect: 'manual' });

    // The control: the issuer's own error answer to a silent login goes back to the SPA.
    const genuine = await callback(await start('none'), { error: 'login_required', iss: stack.issuer });
    expect(genuine.status).toBe(302);
    expect(genuine.headers.get('location')).toBe(`${app}/orders?authError=login_required`);

    // Anyone else's (a mix-up, or an answer stripped of its iss) is refused, never passed on as the IdP's word.
    const notTheIssuer = fc.option(
      fc.oneof(fc.webUrl(), fc.constantFrom(`${stack.issuer}/`, stack.issuer.toUpperCase(), stack.issuer.replace('http:', 'https:'), ` ${stack.issuer}`)).filter((iss) => iss !== stack.issuer),
      { nil: undefined },
    );
    await fc.assert(
      fc.asyncProperty(notTheIssuer, fc.constantFrom('login_required', 'interaction_required', 'consent_required', 'access_denied'), fc.boolean(), async (iss, error, silent) => {
        const res = await callback(await start(silent ? 'none' : undefined), { error, ...(iss === undefined ? {} : { iss }) });
        expect(res.status, `iss=${String(iss)} error=${error} silent=${silent}`).toBe(400);
        expect(res.headers.get('location')).toBeNull();
        expect(await res.text()).toContain('<code>invalid_callback</code>');
      }),
      { numRuns: 16, examples: [[undefined, 'login_required', true], [undefined, 'access_denied', false]] },
    );
  });

  it('a silent login started by another site’s page is refused (a csrf_failed page); a prefetched login link, or a login URL loaded as anything but a page, starts nothing; none leaves an attempt behind', async () => {
    const start = (query: string, headers: Record<string, string>) => request(`${app}/api/auth/login${query}`, { headers: { accept: 'text/html', ...headers } });
    for (const site of ['cross-site', 'same-site']) {
      const res = await start('?prompt=none&returnTo=%2Fx', { 'sec-fetch-site': site, 'sec-fetch-mode': 'navigate' });
      expect(res.statusCode, site).toBe(400);
      expect(res.headers['content-type'], site).toMatch(/^text\/html/);
      expect(await res.body.text(), site).toContain('<code>csrf_failed</code>');
      expect([res.headers.location, res.headers['set-cookie']], site).toEqual([undefined, undefined]);
    }
    const prefetches: Array<Record<string, string>> = [{ 'sec-purpose': 'prefetch' }, { 'sec-purpose': 'prefetch;prerender' }, { purpose: 'prefetch' }, { 'x-moz': 'prefetch' }, { 'next-router-prefetch': '1' }];
    for (const headers of prefetches) {
      const res = await start('', headers);
      expect(res.statusCode, JSON.stringify(headers)).toBe(400);
      await res.body.text();
      expect([res.headers.location, res.headers['set-cookie']], JSON.stringify(headers)).toEqual([undefined, undefined]);
    }
    // An <img>, <script>, <iframe> or fetch() of the login URL, from any site, starts nothing; only
    // a navigation to a page does (Sec-Fetch-Dest `document`, or `empty` when a service worker
    // passes the navigation on). The Fetch standard's destinations, and any other token.
    const fetchDestinations = ['audio', 'audioworklet', 'document', 'embed', 'empty', 'font', 'frame', 'iframe', 'image', 'manifest', 'object', 'paintworklet', 'report', 'script', 'serviceworker', 'sharedworker', 'style', 'track', 'video', 'webidentity', 'worker', 'xslt'];
    const destination = fc.oneof(fc.constantFrom(...fetchDestinations), fc.stringMatching(/^[a-z-]{1,12}$/));
    await fc.assert(
      fc.asyncProperty(destination, fc.constantFrom('same-origin', 'same-site', 'cross-site', 'none'), fc.constantFrom('no-cors', 'cors', 'navigate', 'same-origin', 'websocket'), async (dest, site, mode) => {
        const res = await start('?returnTo=%2Fx', { 'sec-fetch-dest': dest, 'sec-fetch-site': site, 'sec-fetch-mode': mode });
        const body = await res.body.text();
        const what = `${dest} ${mode} ${site}`;
        if (mode === 'navigate' && (dest === 'document' || dest === 'empty')) {
          expect([res.statusCode, new URL(String(res.headers.location)).origin], what).toEqual([302, new URL(stack.issuer).origin]);
          return;
        }
        expect(res.statusCode, what).toBe(400);
        expect(body, what).toContain('<code>invalid_request</code>');
        expect([res.headers.location, res.headers['set-cookie']], what).toEqual([undefined, undefined]);
      }),
      { numRuns: 40, examples: [['image', 'same-site', 'no-cors'], ['empty', 'same-origin', 'cors'], ['iframe', 'cross-site', 'navigate'], ['empty', 'same-origin', 'navigate'], ['document', 'cross-site', 'navigate']] },
    );
    // The app's own silent login, a login from another site's link, and a client that is no browser still go to the IdP.
    for (const [query, site] of [['?prompt=none', 'same-origin'], ['?prompt=none', 'none'], ['', 'cross-site'], ['', undefined]] as const) {
      const res = await start(query, site === undefined ? {} : { 'sec-fetch-site': site, 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document' });
      await res.body.text();
      expect([res.statusCode, new URL(String(res.headers.location)).origin], `${query} ${site}`).toEqual([302, new URL(stack.issuer).origin]);
    }
  });

  it('an IdP that rate limits a refresh: calls go on with the token held and leave the IdP alone for its Retry-After; a token nearly spent gives 503 idp_unavailable with that Retry-After; the session stays', async () => {
    // Tokens live 20 s under the default 30 s skew: due from the start, and still used on a
    // transient fault while more than 5 s remain. This session's token is left to run down meanwhile.
    const nearlySpent = cookieLine((await login('sven-later', '/', new Map())).rpCookies);
    const nearlySpentBy = Date.now() + (ACCESS_TOKEN_TTL_SEC - 5) * 1000 + 100;
    const cookie = cookieLine((await login('sven', '/', new Map())).rpCookies);
    const whoami = async (as: string) => {
      const res = await fetch(`${app}/api/proxy/demo/whoami`, { headers: spa(as) });
      return { status: res.status, retryAfter: res.headers.get('retry-after'), error: res.headers.get('x-gatehouse-error'), body: await res.json(), setCookies: res.headers.getSetCookie(), token: res.ok ? await lastBearerAt(stack.apiUrl) : undefined };
    };

    await fetch(`${stack.issuer}/__dev/token-fault?status=429&retryAfter=7&count=1`, { method: 'POST' });
    const limitedAt = Date.now();
    const limited = await whoami(cookie);
    expect(limited).toMatchObject({ status: 200, body: { sub: 'sven' }, setCookies: [] });
    // Until the Retry-After is over the IdP is not asked again: any grant now would succeed and change the token.
    for (let call = 0; call < 3; call += 1) expect(await whoami(cookie)).toMatchObject({ status: 200, token: limited.token });
    expect(Date.now() - limitedAt).toBeLessThan(7_000);
    const renewed = await waitFor('the refresh after the Retry-After', async () => {
      const answer = await whoami(cookie);
      expect(answer.status).toBe(200);
      return answer.token !== limited.token ? answer : undefined;
    }, 12_000, 250);
    expect(renewed.body).toMatchObject({ sub: 'sven' });
    expect(Date.now() - limitedAt).toBeGreaterThanOrEqual(7_000);

    // With under 5 s left there is nothing to go on with: the IdP's Retry-After reaches the SPA.
    await waitUntil("the other session's token to be nearly spent", nearlySpentBy);
    await fetch(`${stack.issuer}/__dev/token-fault?status=429&retryAfter=7&count=1`, { method: 'POST' });
    expect(await whoami(nearlySpent)).toMatchObject({ status: 503, retryAfter: '7', error: 'idp_unavailable', body: { error: 'idp_unavailable' }, setCookies: [] });
    expect(await whoami(nearlySpent)).toMatchObject({ status: 200, body: { sub: 'sven-later' } });
  }, 60_000);

  it('an IdP failing the code exchange is a readable 503 page, idp_unavailable, with its Retry-After', async () => {
    const jars: CookieJars = new Map();
    const start = new URL(`${app}/api/auth/login`);
    let leftApp = false;
    const callback = await followFlow(start, (next) => (leftApp ||= next.origin !== start.origin) && next.origin === start.origin, { username: 'tara', jars });
    await fetch(`${stack.issuer}/__dev/token-fault?status=503&retryAfter=3&count=1`, { method: 'POST' });
    const res = await browserRequest(callback, jars);
    expect(res.status).toBe(503);
    expect(res.headers.get('retry-after')).toBe('3');
    expect(await res.text()).toContain('<code>idp_unavailable</code>');
    expect(jarFor(jars, start.origin).get('gatehouse')).toBeUndefined();
  });

  it('a login while the IdP cannot be reached at all is a readable 503 page, not a 500', async () => {
    const unreachable = `http://127.0.0.1:1`;
    const lonely = await startGatehouse({ name: `gatehouse-no-idp-${shape}`, server: shape, workers: 1, env: { ...stack.appEnv, OIDC_ISSUER: unreachable } });
    try {
      const res = await fetch(`${lonely.url}/api/auth/login`, { redirect: 'manual' });
      expect(res.status).toBe(503);
      const html = await res.text();
      expect(html).toContain('<code>idp_unavailable</code>');
      expect(html).not.toMatch(/\bat [\w.<>$]+ \(|node_modules|\.ts:\d+/);
    } finally {
      await lonely.process.stop();
    }
  });
});
