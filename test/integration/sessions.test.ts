import { randomBytes, randomUUID } from 'node:crypto';
import { CompactEncrypt, SignJWT, generateKeyPair } from 'jose';
import { sealData } from 'iron-session';
import { Redis } from 'ioredis';
import fc from 'fast-check';
import { request } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { browserRequest, confirmDevIdpLogout, loginThroughRp, type CookieJars } from '../../e2e/support/headless-login.ts';
import { freePort, restartGatehouse, startGatehouse, startStack, type Stack } from '../../e2e/support/stack.ts';
import { revokedTokenDigest } from '../../scripts/dev-idp.ts';
import { clearsSessionCookie, idpGrants, logSoFar, refreshGrantsOf, waitFor } from '../support/http-client.ts';
import { redeemRefreshToken, storedSecrets } from '../support/stored-session.ts';
import { startTcpRelay, type RelayedConnection } from '../support/tcp-relay.ts';
import { rawUpload, requestHead } from '../support/raw-http.ts';
import { undecodablePath } from '../support/hostile-inputs.ts';

/**
 * Issue "Sessions and logout, complete", from outside: real IdP process, real Redis, the
 * production server. Forged logout tokens are signed with the IdP's own key (its dev-only
 * /__dev/sign endpoint) so each one fails exactly the check it is named after.
 */

const EVENT = 'http://schemas.openid.net/event/backchannel-logout';
let stack: Stack;
let app: string;
let redis: Redis;

const cookieHeader = (cookies: Map<string, string>) => [...cookies].map(([name, value]) => `${name}=${value}`).join('; ');

async function sessionOf(cookies: Map<string, string> | string): Promise<{ authenticated: boolean; user?: { sub: string } }> {
  const cookie = typeof cookies === 'string' ? cookies : cookieHeader(cookies);
  const response = await fetch(`${app}/api/auth/session`, { headers: { cookie, 'x-csrf': '1' } });
  expect(response.status).toBe(200);
  return (await response.json()) as { authenticated: boolean };
}

async function sessionKeys(): Promise<string[]> {
  return redis.keys(`${stack.keyPrefix}session:*`);
}

async function signWithIdp(payload: Record<string, unknown>, header: Record<string, unknown> = {}): Promise<string> {
  const response = await fetch(`${stack.issuer}/__dev/sign`, { method: 'POST', body: JSON.stringify({ payload, header }) });
  return ((await response.json()) as { jws: string }).jws;
}

function logoutClaims(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  const now = Math.floor(Date.now() / 1000);
  return { iss: stack.issuer, aud: stack.clientId, iat: now, exp: now + 120, jti: randomUUID(), events: { [EVENT]: {} }, ...overrides };
}

function postLogoutToken(token: string | URLSearchParams, contentType = 'application/x-www-form-urlencoded'): Promise<Response> {
  return fetch(`${app}/api/auth/backchannel-logout`, {
    method: 'POST',
    headers: { 'content-type': contentType },
    body: typeof token === 'string' ? new URLSearchParams({ logout_token: token }) : token,
  });
}

async function expectRefused(response: Response, name: string): Promise<void> {
  expect(response.status, name).toBe(400);
  expect(await response.json(), name).toEqual({ error: 'invalid_request', message: 'The logout token is not valid.' });
  expect(response.headers.get('cache-control'), name).toContain('no-store');
}

/**
 * A browser's top-level navigation to `path` on the app, redirects not followed. Not fetch: it says
 * `Sec-Fetch-Mode: cors` of every request, as a script's fetch in a browser does. Next answers an
 * `RSC` request without its cache-busting `_rsc` with a 307 to the same path with it: followed.
 */
async function navigate(path: string, headers: Record<string, string> = { 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document' }) {
  let url = new URL(path, app);
  for (;;) {
    const answer = await request(url, { headers });
    const text = await answer.body.text();
    const location = typeof answer.headers.location === 'string' ? answer.headers.location : undefined;
    const next = answer.statusCode === 307 && location ? new URL(location, url) : undefined;
    if (next && next.origin === url.origin && next.pathname === url.pathname && next.searchParams.has('_rsc') && !url.searchParams.has('_rsc')) {
      url = next;
      continue;
    }
    const setCookie = answer.headers['set-cookie'];
    return { status: answer.statusCode, location, headers: answer.headers, text, setCookies: setCookie === undefined ? [] : [setCookie].flat() };
  }
}

async function login(username: string, jars?: CookieJars) {
  return loginThroughRp({ startUrl: `${app}/api/auth/login`, username, jars });
}

beforeAll(async () => {
  stack = await startStack({ workers: 1 });
  app = stack.apps[0]!.url;
  redis = new Redis(stack.appEnv.REDIS_URL as string);
});

afterAll(async () => {
  redis?.disconnect();
  await stack?.stop();
});

describe('back-channel logout', () => {
  it('ends the Gatehouse session when the user signs out at the IdP, within one request', async () => {
    const session = await login('bcl-user');
    expect((await sessionOf(session.rpCookies)).authenticated).toBe(true);
    const endSession = new URL(`${stack.issuer}/session/end`);
    endSession.searchParams.set('client_id', stack.clientId);
    await confirmDevIdpLogout({ endSessionUrl: endSession, jars: session.jars });
    // oidc-provider delivers the logout token before it answers the logout form.
    const after = await fetch(`${app}/api/auth/session`, { headers: { cookie: cookieHeader(session.rpCookies), 'x-csrf': '1' } });
    // The page hears why: it was signed out at the IdP.
    expect(await after.json()).toEqual({ authenticated: false, endedBy: 'idp' });
    expect(after.headers.get('set-cookie')).toMatch(/Max-Age=0/);
    // What the browser kept of that session's API answers goes with it.
    expect(after.headers.get('clear-site-data')).toBe('"cache"');
    const proxied = await fetch(`${app}/api/proxy/demo/whoami`, { headers: { cookie: cookieHeader(session.rpCookies), 'x-csrf': '1' } });
    expect([proxied.status, proxied.headers.get('clear-site-data')]).toEqual([401, '"cache"']);
    expect(await proxied.json()).toEqual({ error: 'session_expired', message: 'You signed out at the identity provider.' });
  });

  it('refuses forged tokens with 400 invalid_request and deletes nothing', async () => {
    const victim = await login('forgery-target');
    const sub = 'forgery-target';
    const keysBefore = await sessionKeys();
    const { privateKey: attackerKey } = await generateKeyPair('RS256');
    const now = Math.floor(Date.now() / 1000);
    const replayed = logoutClaims({ sub: 'someone-else' });
    expect((await postLogoutToken(await signWithIdp(replayed))).status).toBe(200);

    const forgeries: Record<string, string> = {
      'bad signature': await new SignJWT(logoutClaims({ sub })).setProtectedHeader({ alg: 'RS256', typ: 'logout+jwt' }).sign(attackerKey),
      'alg none':
        Buffer.from(JSON.stringify({ alg: 'none', typ: 'logout+jwt' })).toString('base64url') + '.' + Buffer.from(JSON.stringify(logoutClaims({ sub }))).toString('base64url') + '.',
      'wrong aud': await signWithIdp(logoutClaims({ sub, aud: 'another-client' })),
      'wrong iss': await signWithIdp(logoutClaims({ sub, iss: 'https://evil.example' })),
      'missing events': await signWithIdp(logoutClaims({ sub, events: undefined })),
      'wrong event': await signWithIdp(logoutClaims({ sub, events: { 'http://example.com/other': {} } })),
      'with a nonce': await signWithIdp(logoutClaims({ sub, nonce: 'n' })),
      expired: await signWithIdp(logoutClaims({ sub, iat: now - 3600, exp: now - 1800 })),
      'issued too long ago': await signWithIdp(logoutClaims({ sub, iat: now - 3600, exp: now + 600 })),
      'issued in the future': await signWithIdp(logoutClaims({ sub, iat: now + 3600, exp: now + 7200 })),
      'replayed jti': await signWithIdp({ ...replayed, sub }),
      'neither sid nor sub': await signWithIdp(logoutClaims()),
      'no jti': await signWithIdp(logoutClaims({ sub, jti: undefined })),
      'not a JWT': 'garbage',
    };
    for (const [name, token] of Object.entries(forgeries)) await expectRefused(await postLogoutToken(token), name);
    const wrongType = await fetch(`${app}/api/auth/backchannel-logout`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ logout_token: forgeries['wrong aud'] }) });
    expect(wrongType.status).toBe(400);

    expect((await sessionOf(victim.rpCookies)).authenticated).toBe(true);
    expect((await sessionKeys()).sort()).toEqual(keysBefore.sort());
  });

  it('a token naming a key the IdP published after the key set was last fetched, within jose’s 30 s cooldown, is answered 503 (the IdP retries), never a final 400', async () => {
    const victim = await login('rotated-key-target');
    const rotatedKey = () => signWithIdp(logoutClaims({ sub: 'rotated-key-target' }), { kid: 'published-moments-ago' });
    // The first such token makes jose fetch the set again unless it just has; after it, it just has.
    const first = await postLogoutToken(await rotatedKey());
    expect([400, 503]).toContain(first.status);
    await first.body?.cancel();
    const retried = await postLogoutToken(await rotatedKey());
    expect([retried.status, ((await retried.json()) as { error?: string }).error]).toEqual([503, 'idp_unavailable']);
    expect((await sessionOf(victim.rpCookies)).authenticated).toBe(true);
  });

  it('refuses what sections 2.4 and 2.6 forbid beyond the JWT basics, and the session keeps working', async () => {
    const victim = await login('strict-target');
    const sub = 'strict-target';
    const keysBefore = await sessionKeys();
    const now = Math.floor(Date.now() / 1000);
    const valid = () => signWithIdp(logoutClaims({ sub }));
    const refused: Record<string, Promise<string>> = {
      'events member is a string': signWithIdp(logoutClaims({ sub, events: { [EVENT]: 'logout' } })),
      'events member is null': signWithIdp(logoutClaims({ sub, events: { [EVENT]: null } })),
      'events member is an array': signWithIdp(logoutClaims({ sub, events: { [EVENT]: [] } })),
      'events is an array': signWithIdp(logoutClaims({ sub, events: [EVENT] })),
      'events is a string': signWithIdp(logoutClaims({ sub, events: EVENT })),
      'no exp': signWithIdp(logoutClaims({ sub, exp: undefined })),
      'exp not a number': signWithIdp(logoutClaims({ sub, exp: String(now + 120) })),
      'exp before iat': signWithIdp(logoutClaims({ sub, iat: now, exp: now - 10 })),
      'typ at+jwt (an access token)': signWithIdp(logoutClaims({ sub }), { typ: 'at+jwt' }),
      'typ application/at+jwt': signWithIdp(logoutClaims({ sub }), { typ: 'application/at+jwt' }),
      'typ secevent+jwt': signWithIdp(logoutClaims({ sub }), { typ: 'secevent+jwt' }),
      'typ not a string': signWithIdp(logoutClaims({ sub }), { typ: 7 }),
      'aud with an extra audience': signWithIdp(logoutClaims({ sub, aud: [stack.clientId, 'https://other.example'] })),
      'jti not a string': signWithIdp(logoutClaims({ sub, jti: 42 })),
      'empty jti': signWithIdp(logoutClaims({ sub, jti: '' })),
      'sub not a string': signWithIdp(logoutClaims({ sub: 42, sid: 'some-idp-session' })),
    };
    for (const [name, token] of Object.entries(refused)) await expectRefused(await postLogoutToken(await token), name);
    // Two logout_token fields are ambiguous, even when each alone would be accepted.
    const twoTokens = new URLSearchParams([['logout_token', await valid()], ['logout_token', await valid()]]);
    await expectRefused(await postLogoutToken(twoTokens), 'two logout_token fields');

    expect((await sessionOf(victim.rpCookies)).authenticated).toBe(true);
    expect((await sessionKeys()).sort()).toEqual(keysBefore.sort());
  });

  it('accepts what the spec allows: typ JWT or none, a one-element aud array, a far exp with a short-lived replay marker, fractional times', async () => {
    const sub = 'nobody-logged-in';
    const now = Math.floor(Date.now() / 1000);
    const accepted: Record<string, Promise<string>> = {
      'typ JWT': signWithIdp(logoutClaims({ sub }), { typ: 'JWT' }),
      'no typ': signWithIdp(logoutClaims({ sub }), { typ: null }),
      'typ application/logout+jwt': signWithIdp(logoutClaims({ sub }), { typ: 'application/logout+jwt' }),
      'aud as a one-element array': signWithIdp(logoutClaims({ sub, aud: [stack.clientId] })),
      'exp ten years away': signWithIdp(logoutClaims({ sub, exp: now + 10 * 365 * 86400 })),
      // NumericDate allows fractions (RFC 7519 §2).
      'iat and exp with fractions': signWithIdp(logoutClaims({ sub, iat: now - 0.25, exp: now + 120.0005 })),
    };
    for (const [name, token] of Object.entries(accepted)) expect((await postLogoutToken(await token)).status, name).toBe(200);
    // Media types are case-insensitive, and may carry parameters.
    for (const type of ['Application/X-WWW-Form-URLEncoded', 'APPLICATION/X-WWW-FORM-URLENCODED; charset=UTF-8', 'application/x-www-form-urlencoded;charset=utf-8']) {
      expect((await postLogoutToken(await signWithIdp(logoutClaims({ sub })), type)).status, type).toBe(200);
    }
    for (const type of ['application/x-www-form-urlencoded-not', 'text/plain', 'multipart/form-data; boundary=x']) {
      expect((await postLogoutToken(await signWithIdp(logoutClaims({ sub })), type)).status, type).toBe(400);
    }
    // The token is refused once iat is 5 minutes old whatever exp says, so no marker needs to outlive that.
    const markers = await redis.keys(`${stack.keyPrefix}logout-jti:*`);
    const ttls = await Promise.all(markers.map((key) => redis.pttl(key)));
    for (const ttl of ttls) expect(ttl).toBeLessThanOrEqual((5 * 60 + 60) * 1000);
  });

  it('refuses a body past 64 KiB with 413 while it is still arriving, declared or chunked, and keeps working', async () => {
    const victim = await login('big-body-target');
    const port = Number(new URL(app).port);
    const total = 64 * 1024 * 1024;
    const chunk = Buffer.alloc(64 * 1024, 'a');
    const plain = function* () {
      for (let sent = 0; sent < total; sent += chunk.length) yield chunk;
    };
    const chunked = function* () {
      const frame = Buffer.concat([Buffer.from(`${chunk.length.toString(16)}\r\n`), chunk, Buffer.from('\r\n')]);
      for (let sent = 0; sent < total; sent += chunk.length) yield frame;
      yield Buffer.from('0\r\n\r\n');
    };
    const head = (framing: [string, string]) =>
      requestHead('POST', '/api/auth/backchannel-logout', [['Host', `127.0.0.1:${port}`], ['Content-Type', 'application/x-www-form-urlencoded'], framing]);

    for (const [name, upload] of [
      ['declared length', () => rawUpload(port, head(['Content-Length', String(total)]), plain())],
      ['chunked', () => rawUpload(port, head(['Transfer-Encoding', 'chunked']), chunked())],
    ] as const) {
      const { response, sentBytes, finishedSending } = await upload();
      expect(response?.status, name).toBe(413);
      expect(response?.get('x-gatehouse-error'), name).toBe('payload_too_large');
      expect(JSON.parse(response?.body ?? '{}'), name).toMatchObject({ error: 'payload_too_large' });
      // Answered while most of the body was still unsent: it was never read whole.
      expect(finishedSending, name).toBe(false);
      expect(sentBytes, name).toBeLessThan(total / 2);
    }

    expect((await sessionOf(victim.rpCookies)).authenticated).toBe(true);
    expect((await postLogoutToken(await signWithIdp(logoutClaims({ sub: 'big-body-target' })))).status).toBe(200);
    expect((await sessionOf(victim.rpCookies)).authenticated).toBe(false);
  });

  it('ends every session of a sub, or only the one session of a sid', async () => {
    const first = await login('many-sessions');
    const second = await login('many-sessions');
    const bystander = await login('bystander');
    const ok = await postLogoutToken(await signWithIdp(logoutClaims({ sub: 'many-sessions' })));
    expect(ok.status).toBe(200);
    expect(ok.headers.get('cache-control')).toContain('no-store');
    expect((await sessionOf(first.rpCookies)).authenticated).toBe(false);
    expect((await sessionOf(second.rpCookies)).authenticated).toBe(false);
    expect((await sessionOf(bystander.rpCookies)).authenticated).toBe(true);

    // A sid names one IdP session; the id_token of each login carried it.
    const a = await login('by-sid');
    const b = await login('by-sid');
    const stored = await Promise.all((await sessionKeys()).map(async (key) => JSON.parse((await redis.get(key)) ?? '{}') as { sub?: string; idpSid?: string; createdAt?: number }));
    const bySid = stored.filter((record) => record.sub === 'by-sid').sort((x, y) => (x.createdAt ?? 0) - (y.createdAt ?? 0));
    expect(bySid).toHaveLength(2);
    expect(bySid[0]?.idpSid).toBeTruthy();
    expect(bySid[0]?.idpSid).not.toBe(bySid[1]?.idpSid);
    expect((await postLogoutToken(await signWithIdp(logoutClaims({ sid: bySid[0]?.idpSid })))).status).toBe(200);
    expect((await sessionOf(a.rpCookies)).authenticated).toBe(false);
    expect((await sessionOf(b.rpCookies)).authenticated).toBe(true);
  });

  it('a token that names no sid ends only sessions begun before it was issued: one delivered late ends no sign-in that came after', async () => {
    const later = await login('late-logout');
    const now = Math.floor(Date.now() / 1000);
    // Issued 200 s ago (within the 5 minutes a token is taken), delivered now: the sign-in above came after it.
    const late = await postLogoutToken(await signWithIdp(logoutClaims({ sub: 'late-logout', iat: now - 200 })));
    expect(late.status).toBe(200);
    expect((await sessionOf(later.rpCookies)).authenticated).toBe(true);
    const timely = await postLogoutToken(await signWithIdp(logoutClaims({ sub: 'late-logout', iat: now })));
    expect(timely.status).toBe(200);
    expect((await sessionOf(later.rpCookies)).authenticated).toBe(false);
    // A session begun after the logout on a sign-in from before it (the IdP's auth_time, back-dated
    // ten minutes here) is the logout's: the IdP's clock says so, whatever Gatehouse's says.
    const reused = await loginThroughRp({ startUrl: `${app}/api/auth/login`, username: 'late-logout', fields: { auth_age: '600' } });
    const lateAgain = await postLogoutToken(await signWithIdp(logoutClaims({ sub: 'late-logout', iat: now - 200 })));
    expect(lateAgain.status).toBe(200);
    expect((await sessionOf(reused.rpCookies)).authenticated).toBe(false);
  });

  it('a token with sub and sid also ends that sub’s sessions whose id_token named no IdP session; not those of another sid or another sub', async () => {
    const named = await login('sid-less');
    // The dev IdP's -post client gets id_tokens that name no IdP session (sid), as some IdPs send.
    const mainClient = { OIDC_CLIENT_ID: stack.clientId, OIDC_CLIENT_AUTH: 'client_secret_basic' };
    await restartGatehouse(stack.apps[0]!, { OIDC_CLIENT_ID: `${stack.clientId}-post`, OIDC_CLIENT_AUTH: 'client_secret_post' }, 'gatehouse-sid-less');
    try {
      const unnamed = await login('sid-less');
      const stranger = await login('sid-less-stranger');
      const records = await Promise.all((await sessionKeys()).map(async (key) => JSON.parse((await redis.get(key)) ?? '{}') as { sub?: string; idpSid?: string }));
      expect(records.filter((record) => record.sub?.startsWith('sid-less')).map((record) => [record.sub, Boolean(record.idpSid)]).sort()).toEqual([
        ['sid-less', false],
        ['sid-less', true],
        ['sid-less-stranger', false],
      ]);
      // A sid that none of them carries: the IdP session the unnamed one may have belonged to.
      const ok = await postLogoutToken(await signWithIdp(logoutClaims({ aud: `${stack.clientId}-post`, sub: 'sid-less', sid: `ended-${randomUUID()}` })));
      expect([ok.status, await ok.text()]).toEqual([200, '']);
      expect((await sessionOf(unnamed.rpCookies)).authenticated).toBe(false);
      expect((await sessionOf(named.rpCookies)).authenticated).toBe(true);
      expect((await sessionOf(stranger.rpCookies)).authenticated).toBe(true);
    } finally {
      await restartGatehouse(stack.apps[0]!, mainClient, 'gatehouse');
    }
  });
});

/**
 * Someone who can write to Redis (a leaked password, a shared instance, a compromised neighbour)
 * but holds neither secret: every session id is in the keys, every record's plain fields are theirs
 * to rewrite, and their own cookie names their own session.
 */
describe('a store writer without the token key', () => {
  async function signedIn(username: string): Promise<{ cookie: string; key: string }> {
    const before = new Set(await sessionKeys());
    const cookie = cookieHeader((await login(username)).rpCookies);
    const key = (await sessionKeys()).find((candidate) => !before.has(candidate));
    if (!key) throw new Error(`no new session key for ${username}`);
    return { cookie, key };
  }
  const whoami = (cookie: string) => fetch(`${app}/api/proxy/demo/whoami`, { headers: { cookie, 'x-csrf': '1' } });
  const subOf = async (response: Response) => ((await response.json()) as { sub?: string }).sub;

  /**
   * Polls until the rewrite is seen (a process may serve its coherent copy until the store's
   * invalidation arrives, a round trip later): every answer meanwhile is the session's own.
   */
  async function refusedAfterRewrite(cookie: string, ownSub: string): Promise<Response> {
    return waitFor('the rewritten session to be refused', async () => {
      const response = await whoami(cookie);
      if (response.status === 401) return response;
      expect(response.status).toBe(200);
      expect(await subOf(response)).toBe(ownSub);
      return undefined;
    }, 5_000, 20);
  }

  it("cannot move another user's tokens under their own session, nor rewrite how or when a session signed in", async () => {
    const victim = await signedIn('store-victim');
    const mallory = await signedIn('store-mallory');
    // Both work, and the server holds opened copies of both, as a busy one does.
    expect(await subOf(await whoami(victim.cookie))).toBe('store-victim');
    expect(await subOf(await whoami(mallory.cookie))).toBe('store-mallory');
    const logBefore = stack.apps[0]!.process.output().length;

    // The victim's whole record, under Mallory's key: her cookie would now lead to his tokens.
    await redis.set(mallory.key, (await redis.get(victim.key)) as string, 'KEEPTTL');
    const moved = await refusedAfterRewrite(mallory.cookie, 'store-mallory');
    const text = await moved.text();
    expect(JSON.parse(text)).toEqual({ error: 'unauthenticated', message: 'Sign in to continue.' });
    expect(text).not.toContain('store-victim');
    expect(clearsSessionCookie(moved.headers.getSetCookie())).toBe(true);
    expect(await sessionOf(mallory.cookie)).toEqual({ authenticated: false });
    expect(await redis.exists(mallory.key)).toBe(0);
    // The victim's own session is untouched.
    expect(await subOf(await whoami(victim.cookie))).toBe('store-victim');

    // The log says so once, naming no session id (the key's) and no token.
    const logged = await logSoFar(app, victim.cookie, () => stack.apps[0]!.process.output(), logBefore);
    expect(logged.match(/"event":"session\.tampered"/g)).toHaveLength(1);
    for (const key of [mallory.key, victim.key]) expect(logged).not.toContain(/\{([^}]+)\}/.exec(key)![1]);
    expect(logged).not.toMatch(/eyJ/);

    // The victim's own record, raised to a second factor signed in just now and a week longer life.
    const record = JSON.parse((await redis.get(victim.key)) as string) as { acr?: string; authTime?: number; absoluteExpiresAt: number };
    const raised = { ...record, acr: 'urn:gatehouse:dev:mfa', authTime: Math.floor(Date.now() / 1000), absoluteExpiresAt: record.absoluteExpiresAt + 7 * 86_400_000 };
    await redis.set(victim.key, JSON.stringify(raised), 'KEEPTTL');
    const rewritten = await refusedAfterRewrite(victim.cookie, 'store-victim');
    expect(await rewritten.json()).toEqual({ error: 'unauthenticated', message: 'Sign in to continue.' });
    expect(await redis.exists(victim.key)).toBe(0);
  });
});

describe("a user's sessions", () => {
  it('lists them without secrets, ends one, and signs out everywhere else', async () => {
    const laptop = await login('two-browsers');
    const phone = await login('two-browsers');
    const other = await login('someone-else-entirely');
    const headers = (cookies: Map<string, string>) => ({ cookie: cookieHeader(cookies), 'x-csrf': '1' });

    const listing = await fetch(`${app}/api/auth/sessions`, { headers: headers(laptop.rpCookies) });
    expect(listing.status).toBe(200);
    expect(listing.headers.get('cache-control')).toContain('no-store');
    const text = await listing.text();
    const { sessions } = JSON.parse(text) as { sessions: Array<{ handle: string; current: boolean; createdAt: number; lastUsedAt: number; device: string }> };
    expect(sessions).toHaveLength(2);
    expect(sessions.filter((entry) => entry.current)).toHaveLength(1);
    for (const entry of sessions) {
      expect(Object.keys(entry).sort()).toEqual(['createdAt', 'current', 'device', 'expiresAt', 'handle', 'lastUsedAt']);
      expect(entry.lastUsedAt).toBeGreaterThanOrEqual(entry.createdAt);
    }
    // No token, no sealed cookie, no raw session id (ids are 43 characters; handles are 16).
    expect(text).not.toMatch(/eyJ|[A-Za-z0-9_-]{43}/);
    for (const value of [...laptop.rpCookies.values(), ...phone.rpCookies.values()]) expect(text).not.toContain(value);

    // Without X-CSRF nothing is listed or ended.
    expect((await fetch(`${app}/api/auth/sessions`, { headers: { cookie: cookieHeader(laptop.rpCookies) } })).status).toBe(403);
    expect((await fetch(`${app}/api/auth/sessions`, { method: 'DELETE', headers: { cookie: cookieHeader(laptop.rpCookies) } })).status).toBe(403);
    expect((await sessionOf(phone.rpCookies)).authenticated).toBe(true);

    // Another user's handle is not found, and ends nothing.
    const foreign = (await (await fetch(`${app}/api/auth/sessions`, { headers: headers(other.rpCookies) })).json()) as { sessions: Array<{ handle: string }> };
    const foreignHandle = foreign.sessions[0]!.handle;
    expect((await fetch(`${app}/api/auth/sessions/${foreignHandle}`, { method: 'DELETE', headers: headers(laptop.rpCookies) })).status).toBe(404);
    expect((await sessionOf(other.rpCookies)).authenticated).toBe(true);

    const ended = await fetch(`${app}/api/auth/sessions`, { method: 'DELETE', headers: headers(laptop.rpCookies) });
    expect(await ended.json()).toEqual({ ended: 1 });
    // This browser stays signed in: its cache stays too.
    expect(ended.headers.get('clear-site-data')).toBeNull();
    // The phone hears why on its next look, and its next API call says so too.
    expect(await sessionOf(phone.rpCookies)).toEqual({ authenticated: false, endedBy: 'elsewhere' });
    const phoneCall = await fetch(`${app}/api/proxy/demo/whoami`, { headers: headers(phone.rpCookies) });
    expect(await phoneCall.json()).toEqual({ error: 'session_expired', message: 'You were signed out from another device.' });
    expect((await sessionOf(laptop.rpCookies)).authenticated).toBe(true);

    const third = await login('two-browsers');
    const again = (await (await fetch(`${app}/api/auth/sessions`, { headers: headers(laptop.rpCookies) })).json()) as { sessions: Array<{ handle: string; current: boolean }> };
    const thirdHandle = again.sessions.find((entry) => !entry.current)!.handle;
    const thirdEnded = await fetch(`${app}/api/auth/sessions/${thirdHandle}`, { method: 'DELETE', headers: headers(laptop.rpCookies) });
    expect([thirdEnded.status, thirdEnded.headers.get('clear-site-data')]).toEqual([200, null]);
    expect(await sessionOf(third.rpCookies)).toEqual({ authenticated: false, endedBy: 'elsewhere' });

    // Ending its own session by handle signs the laptop out as a logout does: both cookies cleared.
    const own = again.sessions.find((entry) => entry.current)!.handle;
    const selfEnded = await fetch(`${app}/api/auth/sessions/${own}`, { method: 'DELETE', headers: headers(laptop.rpCookies) });
    expect(selfEnded.status).toBe(200);
    expect(selfEnded.headers.get('clear-site-data')).toBe('"cache"');
    const cleared = selfEnded.headers.getSetCookie();
    expect(cleared.map((cookie) => cookie.split('=', 1)[0]).sort()).toEqual(['gatehouse', 'gatehouse-replaces']);
    for (const cookie of cleared) expect(cookie, cookie).toMatch(/=;|Max-Age=0/i);
    expect((await sessionOf(laptop.rpCookies)).authenticated).toBe(false);
  });

  it('a session this server cannot open (tokens under a key it does not hold, a newer release’s record: a rolling deploy) still ends when its user asks, by handle, "everywhere else" or signing out in its own browser: its record goes (its refresh token, unreadable here, is not given back)', async () => {
    const user = 'unreadable-elsewhere';
    const keyOf = async () => {
      const before = new Set(await sessionKeys());
      const signedIn = await login(user);
      const key = (await sessionKeys()).find((candidate) => !before.has(candidate));
      if (!key) throw new Error('no new session key');
      const handle = (await listedBy(signedIn.rpCookies)).find((entry) => entry.current)!.handle;
      return { ...signedIn, key, handle };
    };
    const listedBy = async (cookies: Map<string, string>) => ((await (await fetch(`${app}/api/auth/sessions`, { headers: { cookie: cookieHeader(cookies), 'x-csrf': '1' } })).json()) as { sessions: Array<{ handle: string; current: boolean }> }).sessions;
    const [laptop, tablet, desk, kiosk, phone] = [await keyOf(), await keyOf(), await keyOf(), await keyOf(), await keyOf()];
    const headers = { cookie: cookieHeader(phone.rpCookies), 'x-csrf': '1' };
    // The laptop's and the kiosk's tokens sealed under a token key only another release holds; the tablet's record in a newer release's format.
    const elsewhere = await new CompactEncrypt(new TextEncoder().encode('{}')).setProtectedHeader({ alg: 'dir', enc: 'A256GCM', kid: 'another-release' }).encrypt(randomBytes(32));
    for (const { key } of [laptop, kiosk]) await redis.set(key, JSON.stringify({ ...(JSON.parse((await redis.get(key)) as string) as object), sealed: elsewhere }), 'KEEPTTL');
    const ours = JSON.parse((await redis.get(tablet.key)) as string) as { v: number };
    await redis.set(tablet.key, JSON.stringify({ ...ours, v: ours.v + 1, shape: 'of a newer release' }), 'KEEPTTL');
    const logBefore = stack.apps[0]!.process.output().length;

    const byHandle = await waitFor('the rewritten record to be seen', async () => {
      if ((await sessionOf(laptop.rpCookies)).authenticated) return undefined;
      return fetch(`${app}/api/auth/sessions/${laptop.handle}`, { method: 'DELETE', headers });
    }, 5_000, 50);
    expect([byHandle.status, await byHandle.json()]).toEqual([200, { ended: 1 }]);
    expect(await redis.exists(laptop.key)).toBe(0);
    // "Sign out everywhere else": the newer release's record (not listed here) and the readable desk.
    expect((await listedBy(phone.rpCookies)).map((entry) => entry.handle)).not.toContain(tablet.handle);
    const everywhere = await fetch(`${app}/api/auth/sessions`, { method: 'DELETE', headers });
    expect([everywhere.status, await everywhere.json()]).toEqual([200, { ended: 3 }]);
    expect([await redis.exists(tablet.key), await redis.exists(desk.key), await redis.exists(kiosk.key)]).toEqual([0, 0, 0]);
    expect((await sessionOf(desk.rpCookies)).authenticated).toBe(false);
    expect((await sessionOf(phone.rpCookies)).authenticated).toBe(true);
    const unread = stack.apps[0]!.process.output().slice(logBefore).split('\n').filter((line) => line.includes('"event":"auth.logout"') && line.includes('"unread":true'));
    expect(unread).toHaveLength(3);

    // A session unreadable here, signed out in its own browser: ended, the cookie cleared, on to the IdP without a hint.
    const pc = await keyOf();
    await redis.set(pc.key, JSON.stringify({ ...(JSON.parse((await redis.get(pc.key)) as string) as object), sealed: elsewhere }), 'KEEPTTL');
    const loggedOut = await waitFor('the rewritten record to be seen', async () => {
      if ((await sessionOf(pc.rpCookies)).authenticated) return undefined;
      return fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie: cookieHeader(pc.rpCookies), 'x-csrf': '1' } });
    }, 5_000, 50);
    const { redirectTo } = (await loggedOut.json()) as { redirectTo: string };
    expect(loggedOut.status).toBe(200);
    expect(new URL(redirectTo).searchParams.has('id_token_hint')).toBe(false);
    expect(clearsSessionCookie(loggedOut.headers.getSetCookie())).toBe(true);
    expect(await redis.exists(pc.key)).toBe(0);
  });

  it('signing out with a cookie sealed under a secret this server does not hold (a rotation rolling out) is 503 with Retry-After, and the cookie stays', async () => {
    const [name] = [...(await login('unknown-secret-cookie')).rpCookies.keys()].filter((cookie) => !cookie.endsWith('-replaces'));
    const sealed = await sealData({ id: randomBytes(32).toString('base64url') }, { password: { 1: randomBytes(32).toString('base64url') } });
    const answer = await fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie: `${name}=${sealed}`, 'x-csrf': '1' } });
    expect([answer.status, answer.headers.get('retry-after'), ((await answer.json()) as { error?: string }).error, answer.headers.getSetCookie()]).toEqual([503, '5', 'store_unavailable', []]);
  });

  it('a handle that does not decode is no handle: 404 not_found as JSON (Next alone would answer a bare 500), and nothing ends', async () => {
    const owner = await login('undecodable-handles');
    const cookie = cookieHeader(owner.rpCookies);
    await fc.assert(
      fc.asyncProperty(undecodablePath, fc.constantFrom('DELETE', 'GET'), async (handle, method) => {
        const answer = await request(`${app}/api/auth/sessions/${handle}`, { method, headers: { cookie, 'x-csrf': '1' } });
        expect(answer.statusCode, handle).toBe(404);
        expect(answer.headers['content-type'], handle).toBe('application/json; charset=utf-8');
        expect(await answer.body.json(), handle).toEqual({ error: 'not_found', message: 'No such session.' });
      }),
      { numRuns: 30 },
    );
    expect((await sessionOf(owner.rpCookies)).authenticated).toBe(true);
  });
});

describe('a sign-out link fetched ahead of the user', () => {
  it('a prefetch or prerender of the logout link (or of its continuation) signs nobody out: 400, the session and the step stay', async () => {
    const session = await login('prefetched');
    const cookie = cookieHeader(session.rpCookies);
    const { logoutUrl } = (await (await fetch(`${app}/api/auth/session`, { headers: { cookie, 'x-csrf': '1' } })).json()) as { logoutUrl: string };
    // Browsers mark a prefetch or prerender of a page as a navigation (Sec-Fetch-Mode: navigate) with a purpose.
    const asNavigation = { 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document' };
    const ahead: Array<Record<string, string>> = [
      { ...asNavigation, 'sec-purpose': 'prefetch' },
      { ...asNavigation, 'sec-purpose': 'prefetch;prerender' },
      { ...asNavigation, 'Sec-Purpose': 'Prefetch;anonymous-client-ip' },
      { purpose: 'prefetch' },
      { 'x-purpose': 'preview' },
      { 'x-moz': 'prefetch' },
      { 'next-router-prefetch': '1', rsc: '1' },
      // Not prefetches, but no navigation either: a script's fetch (Next's router fetches a <Link>'s target with RSC: 1).
      { rsc: '1' },
      { 'sec-fetch-mode': 'cors', 'sec-fetch-dest': 'empty' },
      { 'sec-fetch-mode': 'no-cors', 'sec-fetch-dest': 'image' },
      { 'sec-fetch-mode': 'same-origin', 'sec-fetch-dest': 'empty' },
      // A navigation, but of a frame in some page, not the user's.
      { 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'iframe' },
    ];
    for (const headers of ahead) {
      const res = await navigate(logoutUrl, { cookie, ...headers });
      expect(res.status, JSON.stringify(headers)).toBe(400);
      expect(res.setCookies, JSON.stringify(headers)).toEqual([]);
      expect(res.text).toContain('<code>invalid_request</code>');
      expect((await sessionOf(cookie)).authenticated, JSON.stringify(headers)).toBe(true);
    }
    const posted = await fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie, 'x-csrf': '1' } });
    const { redirectTo } = (await posted.json()) as { redirectTo: string };
    const signOutCookie = posted.headers.getSetCookie().find((line) => line.startsWith('gatehouse-signout='))!.split(';')[0]!;
    for (const headers of ahead) expect((await navigate(redirectTo, { cookie: signOutCookie, ...headers })).status, JSON.stringify(headers)).toBe(400);
    // The user's own navigation, as a browser marks it, still finds the step and its id_token.
    const step = await navigate(redirectTo, { ...asNavigation, 'sec-fetch-site': 'same-origin', 'sec-fetch-user': '?1', cookie: signOutCookie });
    expect(new URL(step.location ?? 'about:blank').searchParams.get('id_token_hint')).toMatch(/^eyJ/);
  });
});

describe('ending sessions that share an IdP session', () => {
  it('ending, from this browser, a session of the same IdP session keeps the grant they share (this session still refreshes); one of another IdP session is revoked', async () => {
    const headers = (cookies: Map<string, string>) => ({ cookie: cookieHeader(cookies), 'x-csrf': '1' });
    const idpOrigin = new URL(stack.issuer).origin;
    for (const how of ['everywhere else', 'by handle']) {
      const user = `one-idp-session-${how.replace(' ', '-')}`;
      // Two sessions of one IdP session: the second browser holds only the first's IdP cookies (as
      // the orphan of two callbacks racing in one browser would be). A third on another device.
      const first = await login(user);
      const second = await login(user, new Map([[idpOrigin, new Map(first.jars.get(idpOrigin))]]));
      const elsewhere = await login(user);
      const stored = await Promise.all((await sessionKeys()).map(async (key) => JSON.parse((await redis.get(key)) ?? '{}') as { sub?: string; idpSid?: string }));
      const sids = stored.filter((record) => record.sub === user).map((record) => record.idpSid);
      expect(sids, how).toHaveLength(3);
      expect(new Set(sids).size, how).toBe(2);
      const revocations = (await idpGrants(stack.issuer)).revocations[user] ?? 0;
      if (how === 'everywhere else') {
        expect(await (await fetch(`${app}/api/auth/sessions`, { method: 'DELETE', headers: headers(second.rpCookies) })).json(), how).toEqual({ ended: 2 });
      } else {
        const { sessions } = (await (await fetch(`${app}/api/auth/sessions`, { headers: headers(second.rpCookies) })).json()) as { sessions: Array<{ handle: string; current: boolean }> };
        for (const { handle } of sessions.filter((entry) => !entry.current)) {
          expect((await fetch(`${app}/api/auth/sessions/${handle}`, { method: 'DELETE', headers: headers(second.rpCookies) })).status, how).toBe(200);
        }
      }
      expect((await sessionOf(first.rpCookies)).authenticated, how).toBe(false);
      expect((await sessionOf(elsewhere.rpCookies)).authenticated, how).toBe(false);
      // The other device's grant is revoked at the IdP; the shared one is not.
      expect((await idpGrants(stack.issuer)).revocations[user] ?? 0, how).toBe(revocations + 1);
      // The API refuses the token once: Gatehouse refreshes and retries, with the grant the ended session shared.
      const refreshes = refreshGrantsOf(await idpGrants(stack.issuer), user);
      await (await fetch(`${app}/api/proxy/demo/status/401`, { headers: headers(second.rpCookies) })).body?.cancel();
      expect(refreshGrantsOf(await idpGrants(stack.issuer), user), how).toBe(refreshes + 1);
      const after = await fetch(`${app}/api/proxy/demo/whoami`, { headers: headers(second.rpCookies) });
      expect([after.status, ((await after.json()) as { sub?: string }).sub], how).toEqual([200, user]);
    }
  });
});

/** The store key of `user`'s one session. */
async function sessionKeyOf(user: string): Promise<string> {
  const keys = await sessionKeys();
  const records = await Promise.all(keys.map(async (key) => JSON.parse((await redis.get(key)) ?? '{}') as { sub?: string }));
  const [key, ...more] = keys.filter((_, index) => records[index]!.sub === user);
  if (!key || more.length > 0) throw new Error(`${user} has ${more.length + (key ? 1 : 0)} sessions, not one`);
  return key;
}

/**
 * A second Gatehouse instance whose store traffic passes a relay that keeps back the first
 * command `holds` picks (and all that follows on its connection) until `release()`: a fault no
 * real part makes on demand, one command held between a read and a write.
 */
async function instanceWithHeldStoreCommand(holds: (chunk: Buffer) => boolean) {
  let held: { connection: RelayedConnection; chunks: Buffer[]; released?: true } | undefined;
  let reached!: () => void;
  const holding = new Promise<void>((resolve) => (reached = resolve));
  const redisUrl = new URL(stack.appEnv.REDIS_URL as string);
  const relayPort = await freePort();
  const relay = await startTcpRelay(relayPort, { host: redisUrl.hostname, port: Number(redisUrl.port || 6379) }, {
    fromClient(chunk, connection) {
      if (held?.connection === connection && !held.released) return void held.chunks.push(chunk), false;
      if (held || !holds(chunk)) return true;
      held = { connection, chunks: [chunk] };
      reached();
      return false;
    },
  });
  redisUrl.port = String(relayPort);
  const instance = await startGatehouse({ name: 'gatehouse-relayed', workers: 1, env: { ...stack.apps[0]!.env, REDIS_URL: redisUrl.href } }).catch(async (error: unknown) => {
    await relay.close();
    throw error;
  });
  return {
    url: instance.url,
    output: () => instance.process.output(),
    holding,
    release() {
      held!.released = true;
      for (const chunk of held!.chunks) held!.connection.upstream.write(chunk);
    },
    async stop() {
      await instance.process.stop();
      await relay.close();
    },
  };
}

describe('a logout racing a refresh', () => {
  it('gives back at the IdP the refresh token the session held when it was deleted, not the one read before a refresh rotated it', async () => {
    const user = 'logout-racing-refresh';
    const session = await login(user);
    const headers = { cookie: cookieHeader(session.rpCookies), 'x-csrf': '1' };
    const key = await sessionKeyOf(user);
    const secretsOf = () => storedSecrets(stack.appEnv.REDIS_URL as string, key, stack.appEnv.SESSION_SECRET as string);
    const { refreshToken: readByLogout } = await secretsOf();

    // Another instance, whose deletion of the session is held.
    const other = await instanceWithHeldStoreCommand((chunk) => /\r\n(get)?del\r\n|\r\neval(sha)?\r\n/i.test(chunk.toString('latin1')) && chunk.includes(key));
    try {
      const logout = fetch(`${other.url}/api/auth/logout`, { method: 'POST', headers });
      await Promise.race([other.holding, logout.then((answer) => Promise.reject(new Error(`the logout answered ${answer.status} without deleting the session`)))]);
      // Meanwhile the first instance refreshes: the API refuses the token once, Gatehouse renews it.
      const refreshes = refreshGrantsOf(await idpGrants(stack.issuer), user);
      await (await fetch(`${app}/api/proxy/demo/status/401`, { headers })).body?.cancel();
      expect(refreshGrantsOf(await idpGrants(stack.issuer), user)).toBe(refreshes + 1);
      const { refreshToken: rotated } = await secretsOf();
      expect(rotated).not.toBe(readByLogout);
      other.release();
      const loggedOut = await logout;
      expect(loggedOut.status).toBe(200);
      // The browser goes on to the IdP's logout, as it would (no step left behind in the store).
      const signOutCookie = loggedOut.headers.getSetCookie().find((line) => line.startsWith('gatehouse-signout='))!.split(';')[0]!;
      const { redirectTo } = (await loggedOut.json()) as { redirectTo: string };
      expect((await navigate(redirectTo, { 'sec-fetch-mode': 'navigate', cookie: signOutCookie })).status).toBe(302);
      expect(await redis.exists(key)).toBe(0);
      expect((await idpGrants(stack.issuer)).revokedRefreshTokens[user]).toEqual([revokedTokenDigest(rotated!)]);
      expect(await redeemRefreshToken(stack.issuer, stack.clientId, stack.appEnv.OIDC_CLIENT_SECRET as string, rotated!)).toMatchObject({ status: 400, error: 'invalid_grant' });
    } finally {
      await other.stop();
    }
  });
});

describe('a re-login racing a refresh', () => {
  it('a re-login in the same IdP session keeps the grant: the refresh it overtook is refused its write-back and gives nothing back, and the new session refreshes on that grant', async () => {
    const user = 'relogin-racing-refresh';
    const first = await login(user);
    const headers = { cookie: cookieHeader(first.rpCookies), 'x-csrf': '1' };
    const key = await sessionKeyOf(user);
    const lockKey = key.replace('session:{', 'refresh-lock:{');

    // Another instance, whose refresh's write-back (the one command naming the session and its
    // lock) is held after the IdP answered.
    const other = await instanceWithHeldStoreCommand((chunk) => chunk.includes(key) && chunk.includes(lockKey));
    try {
      const refreshes = refreshGrantsOf(await idpGrants(stack.issuer), user);
      // The API refuses the token once: the relayed instance refreshes, and its write-back is held.
      const overtaken = fetch(`${other.url}/api/proxy/demo/status/401`, { headers });
      await Promise.race([other.holding, overtaken.then((answer) => Promise.reject(new Error(`the call answered ${answer.status} without writing back a refresh`)))]);
      expect(refreshGrantsOf(await idpGrants(stack.issuer), user)).toBe(refreshes + 1);

      // Meanwhile the user signs in again in this browser, within the same IdP session.
      const second = await login(user, first.jars);
      expect(await sessionKeyOf(user)).not.toBe(key);

      other.release();
      const refused = await overtaken;
      expect([refused.status, ((await refused.json()) as { error?: string }).error]).toEqual([401, 'session_replaced']);
      const refusal = await waitFor('the refused write-back logged', () => other.output().split('\n').find((line) => line.includes('"event":"token.refresh"') && line.includes('"level":"warn"')));
      expect(JSON.parse(refusal)).toMatchObject({ outcome: 'session_gone', revoked: false });
      expect((await idpGrants(stack.issuer)).revokedRefreshTokens[user]).toBeUndefined();

      // The grant the two sessions shared still refreshes the new one.
      const newHeaders = { cookie: cookieHeader(second.rpCookies), 'x-csrf': '1' };
      const before = refreshGrantsOf(await idpGrants(stack.issuer), user);
      await (await fetch(`${app}/api/proxy/demo/status/401`, { headers: newHeaders })).body?.cancel();
      expect(refreshGrantsOf(await idpGrants(stack.issuer), user)).toBe(before + 1);
      const after = await fetch(`${app}/api/proxy/demo/whoami`, { headers: newHeaders });
      expect([after.status, ((await after.json()) as { sub?: string }).sub]).toEqual([200, user]);
    } finally {
      await other.stop();
    }
  });
});

describe('logout for SPAs and silent login', () => {
  it('POST /api/auth/logout needs X-CSRF, then ends the session and hands back a same-origin step to the end-session URL, never the id_token', async () => {
    const session = await login('spa-logout');
    const refused = await fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie: cookieHeader(session.rpCookies) } });
    expect([refused.status, refused.headers.get('clear-site-data')]).toEqual([403, null]);
    expect((await sessionOf(session.rpCookies)).authenticated).toBe(true);
    const response = await fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie: cookieHeader(session.rpCookies), 'x-csrf': '1' } });
    expect(response.status).toBe(200);
    // The user's API answers the browser may have cached go with the session.
    expect(response.headers.get('clear-site-data')).toBe('"cache"');
    const answer = await response.text();
    // Page scripts read this answer: no JWT in it, nor in its headers.
    expect(`${answer} ${[...response.headers].join(' ')}`).not.toMatch(/eyJ/);
    const { redirectTo } = JSON.parse(answer) as { redirectTo: string };
    expect(redirectTo).toBe('/api/auth/logout?continue=1');
    // The step's handle is the browser's alone: HttpOnly (no script reads it), Strict, named like the session cookie.
    const handleCookie = response.headers.getSetCookie().find((line) => line.startsWith('gatehouse-signout='));
    expect(handleCookie).toMatch(/^gatehouse-signout=[\w-]{43}; Max-Age=300; Path=\/; HttpOnly; SameSite=Strict$/);
    const signOutCookie = handleCookie!.split(';')[0]!;
    const [storedKey] = await redis.keys(`${stack.keyPrefix}logout-continue:*`);
    const stored = await redis.get(storedKey!);
    expect(await redis.pttl(storedKey!)).toBeGreaterThan(4 * 60_000);
    const endSession = (location: string | undefined) => {
      const target = new URL(location ?? 'about:blank');
      expect(target.origin + target.pathname).toBe(`${stack.issuer}/session/end`);
      expect(target.searchParams.get('post_logout_redirect_uri')).toBe(`${app}/`);
      expect(target.searchParams.get('client_id')).toBe(stack.clientId);
      return target.searchParams.get('id_token_hint');
    };
    // Anyone else who asks (a script that sent the step's URL home, another browser) gets the IdP's
    // logout without the id_token: the IdP asks the user to confirm.
    const stranger = await navigate(redirectTo);
    expect(stranger.status).toBe(302);
    expect(endSession(stranger.location)).toBeNull();
    // The browser's navigation there (the session cookie is gone by then) goes on with the id_token, once.
    const step = await navigate(redirectTo, { 'sec-fetch-mode': 'navigate', cookie: signOutCookie });
    expect(step.status).toBe(302);
    expect(step.headers['cache-control']).toContain('no-store');
    expect(step.setCookies).toEqual(['gatehouse-signout=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict']);
    const idToken = endSession(step.location);
    expect(idToken).toMatch(/^eyJ/);
    // It waited in the store encrypted, as tokens do.
    expect(stored).not.toContain(idToken!.split('.')[1]);
    const again = await navigate(redirectTo, { 'sec-fetch-mode': 'navigate', cookie: signOutCookie });
    expect([again.status, endSession(again.location)]).toEqual([302, null]);
    // Once even when asked at the same moment (a double click, a retrying front proxy): of ten, one hint.
    const racing = await login('spa-logout-race');
    const racingLogout = await fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie: cookieHeader(racing.rpCookies), 'x-csrf': '1' } });
    const racingHandle = racingLogout.headers.getSetCookie().find((line) => line.startsWith('gatehouse-signout='))!.split(';')[0]!;
    const steps = await Promise.all(Array.from({ length: 10 }, () => navigate(redirectTo, { 'sec-fetch-mode': 'navigate', cookie: racingHandle })));
    expect(steps.map((answer) => endSession(answer.location)).filter(Boolean)).toHaveLength(1);
    expect(await redis.keys(`${stack.keyPrefix}logout-continue:*`)).toEqual([]);
    await fc.assert(
      fc.asyncProperty(fc.oneof(fc.stringMatching(/^[\w-]{43}$/), fc.stringMatching(/^[!#-+\--:<-~]{0,80}$/)), async (handle) => {
        const forged = await navigate(redirectTo, { 'sec-fetch-mode': 'navigate', cookie: `gatehouse-signout=${handle}` });
        expect([forged.status, endSession(forged.location)]).toEqual([302, null]);
      }),
      { numRuns: 30 },
    );
    expect(response.headers.get('set-cookie')).toMatch(/Max-Age=0/);
    // Both cookies that name a session are cleared, each on its own path.
    const cleared = response.headers.getSetCookie().filter((line) => /^[^=]+=;/.test(line) && /;\s*Max-Age=0\b/i.test(line));
    expect(cleared.map((line) => [line.split('=')[0], /;\s*Path=([^;]+)/i.exec(line)?.[1]])).toEqual([
      ['gatehouse', '/'],
      ['gatehouse-replaces', '/api/auth/callback'],
    ]);
    expect((await sessionOf(session.rpCookies)).authenticated).toBe(false);
  });

  it('prompt=none returns to returnTo with authError instead of showing the IdP, and signs in silently when the IdP session exists', async () => {
    const jars: CookieJars = new Map();
    let url = new URL(`${app}/api/auth/login?prompt=none&returnTo=${encodeURIComponent('/orders?tab=1')}`);
    const visited: string[] = [];
    for (let step = 0; step < 10; step++) {
      const response = await browserRequest(url, jars);
      await response.body?.cancel();
      visited.push(url.href);
      const location = response.headers.get('location');
      if (!location) break;
      url = new URL(location, url);
      if (url.origin === app && !url.pathname.startsWith('/api/')) break;
    }
    expect(url.pathname + url.search).toBe('/orders?tab=1&authError=login_required');
    expect(visited.some((step) => step.includes('/interaction/'))).toBe(false);

    // After a real login at the IdP, the same silent request comes back signed in.
    await loginThroughRp({ startUrl: `${app}/api/auth/login`, username: 'silent-user', jars });
    url = new URL(`${app}/api/auth/login?prompt=none&returnTo=/welcome`);
    for (let step = 0; step < 10; step++) {
      const response = await browserRequest(url, jars);
      await response.body?.cancel();
      const location = response.headers.get('location');
      if (!location) break;
      url = new URL(location, url);
      if (url.origin === app && !url.pathname.startsWith('/api/')) break;
    }
    expect(url.pathname + url.search).toBe('/welcome');
    const cookies = jars.get(new URL(app).origin) ?? new Map<string, string>();
    expect(await sessionOf(cookies)).toMatchObject({ authenticated: true, user: { sub: 'silent-user' } });
  });
});

describe('secret rotation across deploys', () => {
  it('a session sealed with secret A survives "B,A" and ends with "B" alone', async () => {
    const current = stack.apps[0]!;
    const secretA = current.env.SESSION_SECRET as string;
    const secretB = randomBytes(32).toString('base64url');
    const session = await login('rotation-user');
    const cookie = cookieHeader(session.rpCookies);

    const redeploy = async (secret: string) => {
      await restartGatehouse(current, { SESSION_SECRET: secret }, 'gatehouse-redeployed');
    };
    await redeploy(`${secretB},${secretA}`);
    expect(await sessionOf(cookie)).toMatchObject({ authenticated: true, user: { sub: 'rotation-user' } });
    const proxied = await fetch(`${app}/api/proxy/demo/whoami`, { headers: { cookie, 'x-csrf': '1' } });
    expect(proxied.status).toBe(200);

    // A session created now is sealed, and its tokens encrypted, under B.
    const sealedWithB = cookieHeader((await login('rolling-user')).rpCookies);
    const proxiedWithB = await fetch(`${app}/api/proxy/demo/whoami`, { headers: { cookie: sealedWithB, 'x-csrf': '1' } });
    expect(proxiedWithB.status).toBe(200);

    // Instances of the fleet that lack B (not yet redeployed, or given B for cookies but not for
    // tokens) cannot read it: no session for that request, but nothing deleted and no cookie cleared
    // (a secret or key missing here may be one removed on purpose: retrying would not help).
    const behindEnvs: Array<Record<string, string>> = [{ SESSION_SECRET: secretA }, { SESSION_SECRET: `${secretA},${secretB}`, TOKEN_ENCRYPTION_KEY: secretA }];
    for (const behindEnv of behindEnvs) {
      const behind = await startGatehouse({ name: 'gatehouse-behind', workers: 1, env: { ...current.env, ...behindEnv } });
      try {
        const described = await fetch(`${behind.url}/api/auth/session`, { headers: { cookie: sealedWithB, 'x-csrf': '1' } });
        expect(await described.json()).toEqual({ authenticated: false });
        expect(described.headers.getSetCookie()).toEqual([]);
        const proxied = await fetch(`${behind.url}/api/proxy/demo/whoami`, { headers: { cookie: sealedWithB, 'x-csrf': '1' } });
        expect(proxied.status).toBe(401);
        expect(proxied.headers.getSetCookie()).toEqual([]);
      } finally {
        await behind.process.stop();
      }
      expect(await sessionOf(sealedWithB)).toMatchObject({ authenticated: true, user: { sub: 'rolling-user' } });
    }

    await redeploy(secretB);
    const ended = await fetch(`${app}/api/auth/session`, { headers: { cookie, 'x-csrf': '1' } });
    expect(await ended.json()).toEqual({ authenticated: false });
    // Sealed under a secret this deployment does not have: it could be another instance's, so it is left alone.
    expect(ended.headers.getSetCookie()).toEqual([]);
    expect(await sessionOf(sealedWithB)).toMatchObject({ authenticated: true, user: { sub: 'rolling-user' } });

    // New sessions work under B alone.
    const fresh = await login('rotation-user');
    expect((await sessionOf(fresh.rpCookies)).authenticated).toBe(true);
  });
});

describe('a record of a newer release, during a rolling deploy', () => {
  it('is not read here, nor taken for a signed-out user: 503 with Retry-After on every path, the record and the cookie left as they are, until its user signs out', async () => {
    const user = 'newer-release-user';
    const session = await login(user);
    const cookie = cookieHeader(session.rpCookies);
    const [key] = (await Promise.all((await sessionKeys()).map(async (k) => [k, (await redis.get(k)) ?? ''] as const))).filter(([, raw]) => raw.includes(`"sub":"${user}"`)).map(([k]) => k);
    const ours = (await redis.get(key!))!;
    const newer = JSON.stringify({ ...(JSON.parse(ours) as { v: number }), v: (JSON.parse(ours) as { v: number }).v + 1, shape: 'of a newer release' });
    await redis.set(key!, newer, 'KEEPTTL');
    for (const [path, init] of [
      ['/api/auth/session', {}],
      ['/api/proxy/demo/whoami', {}],
      ['/api/proxy/demo/echo', { method: 'POST', body: '{}' }],
      // An API that takes anonymous calls is not called anonymously for a user whose session lives on.
      ['/api/proxy/public/x', {}],
      ['/api/auth/sessions', {}],
    ] as const) {
      const answer = await fetch(`${app}${path}`, { ...init, headers: { cookie, 'x-csrf': '1', 'content-type': 'application/json' } });
      expect([path, answer.status, answer.headers.get('retry-after'), ((await answer.json()) as { error?: string }).error]).toEqual([path, 503, '5', 'store_unavailable']);
      expect(answer.headers.getSetCookie(), path).toEqual([]);
    }
    const { logoutToken } = JSON.parse(newer) as { logoutToken: string };
    const followed = await navigate(`/api/auth/logout?sid=${encodeURIComponent(logoutToken)}`, { 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document', cookie });
    expect([followed.status, followed.setCookies]).toEqual([503, []]);
    expect(followed.text).toMatch(/<html/i);
    expect(await redis.get(key!)).toBe(newer);
    // Back in a form this release reads (the newer instance's refresh would be): the session was never ended.
    await redis.set(key!, ours, 'KEEPTTL');
    expect(await sessionOf(cookie)).toMatchObject({ authenticated: true, user: { sub: user } });
    // Its user signing out here ends it, though: the record goes, and the cookie with it.
    await redis.set(key!, newer, 'KEEPTTL');
    await waitFor('the newer record to be seen', async () => ((await fetch(`${app}/api/auth/session`, { headers: { cookie, 'x-csrf': '1' } })).status === 503 ? true : undefined), 5_000, 50);
    const loggedOut = await fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie, 'x-csrf': '1' } });
    expect(loggedOut.status).toBe(200);
    expect(clearsSessionCookie(loggedOut.headers.getSetCookie())).toBe(true);
    expect(await redis.exists(key!)).toBe(0);
  });
});

describe.each([
  ['a relative end_session_endpoint', '/session/end'],
  ['a javascript: end_session_endpoint', 'javascript:alert(document.domain)'],
])('an IdP that publishes %s', (_, endSessionEndpoint) => {
  let broken: Stack;
  let brokenApp: string;

  beforeAll(async () => {
    broken = await startStack({ workers: 1, idpEnv: { IDP_END_SESSION_ENDPOINT: endSessionEndpoint } });
    brokenApp = broken.apps[0]!.url;
  });

  afterAll(async () => {
    await broken?.stop();
  });

  it("signing out still signs out here (session ended, cookie and cache cleared) and lands on /, the IdP's logout skipped with a warning", async () => {
    const signedIn = async (cookie: string) => ((await (await fetch(`${brokenApp}/api/auth/session`, { headers: { cookie, 'x-csrf': '1' } })).json()) as { authenticated: boolean; logoutUrl: string });
    const posting = cookieHeader((await loginThroughRp({ startUrl: `${brokenApp}/api/auth/login`, username: 'broken-idp-post' })).rpCookies);
    const posted = await fetch(`${brokenApp}/api/auth/logout`, { method: 'POST', headers: { cookie: posting, 'x-csrf': '1' } });
    expect([posted.status, await posted.json()]).toEqual([200, { redirectTo: '/' }]);
    expect(posted.headers.get('clear-site-data')).toBe('"cache"');
    expect(clearsSessionCookie(posted.headers.getSetCookie())).toBe(true);
    expect((await signedIn(posting)).authenticated).toBe(false);

    const following = cookieHeader((await loginThroughRp({ startUrl: `${brokenApp}/api/auth/login`, username: 'broken-idp-get' })).rpCookies);
    const { logoutUrl } = await signedIn(following);
    const followed = await request(new URL(logoutUrl, brokenApp), { headers: { cookie: following, 'sec-fetch-mode': 'navigate', 'sec-fetch-dest': 'document' } });
    await followed.body.dump();
    expect([followed.statusCode, followed.headers.location, followed.headers['clear-site-data']]).toEqual([302, '/', '"cache"']);
    expect(clearsSessionCookie([followed.headers['set-cookie'] ?? []].flat())).toBe(true);
    expect((await signedIn(following)).authenticated).toBe(false);
    expect(broken.apps[0]!.process.output()).toContain('"event":"auth.end_session_endpoint_unusable"');
  });
});
