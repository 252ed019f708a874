// DPoP (RFC 9449) end to end, against real processes: the dev IdP (oidc-provider, which binds tokens
// to a proof's key and can demand nonces), the demo API (which verifies proofs with jose and
// remembers every jti it saw), real Redis and Gatehouse itself, on both server shapes.
//
// What is bound is asked of the parties that bind and check: the IdP records, per grant, the
// `dpop_jkt` its code carried and the `cnf.jkt` of the token it issued (/__dev/grants); the demo API
// counts the proofs it verified and why it refused others (/__demo/stats), and records the raw
// headers it received (/__demo/last), so the test can play the thief with them.
import net from 'node:net';
import { createHash } from 'node:crypto';
import { SignJWT, calculateJwkThumbprint, decodeJwt, decodeProtectedHeader, exportJWK, generateKeyPair, type JWK } from 'jose';
import { unsealData } from 'iron-session';
import { Client } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { browserRequest, followFlow, jarFor, type CookieJars } from '../../e2e/support/headless-login.ts';
import { defaultServerShape, restartGatehouse, startStack, type Stack } from '../../e2e/support/stack.ts';
import type { DemoDpopStats } from '../../scripts/demo-api.ts';
import type { DevIdpDpop, GrantCounters } from '../../scripts/dev-idp.ts';
import { REDIS_URL, RedisProbe, call, clearsSessionCookie, idpGrants, login, refreshGrantsOf, revokeAtDemoApi, waitUntil, type CallResult } from '../support/http-client.ts';
import { storedSecrets, type StoredSecrets } from '../support/stored-session.ts';
import { rawAnswer, startScriptedUpstream, type ScriptedUpstream } from '../support/scripted-upstream.ts';

const shape = defaultServerShape();
const stacks: Stack[] = [];
afterAll(async () => {
  await Promise.all(stacks.map((stack) => stack.stop()));
});

// --- what the parties saw -----------------------------------------------------------------------

interface DemoRecord {
  method: string;
  path: string;
  headers: Record<string, string | undefined>;
}

async function demoLast(apiUrl: string): Promise<DemoRecord> {
  return (await (await fetch(`${apiUrl}/__demo/last`)).json()) as DemoRecord;
}

async function demoStats(apiUrl: string): Promise<{ requests: number; dpop: DemoDpopStats }> {
  return (await (await fetch(`${apiUrl}/__demo/stats`)).json()) as { requests: number; dpop: DemoDpopStats };
}

/**
 * Until the demo API has seen no new request for half a second: a call a test left in flight (an
 * upload reset by its client while Gatehouse forwards it) may still arrive and be counted by the next.
 */
async function untilQuiet(apiUrl: string): Promise<void> {
  let seen = (await demoStats(apiUrl)).requests;
  for (let checks = 0; checks < 20; checks++) {
    await new Promise((resolve) => setTimeout(resolve, 500));
    const now = (await demoStats(apiUrl)).requests;
    if (now === seen) return;
    seen = now;
  }
  throw new Error('the demo API kept receiving requests for 10 s');
}

async function setDemoDpop(apiUrl: string, change: { requireNonce?: boolean; rotate?: boolean }): Promise<void> {
  const res = await fetch(`${apiUrl}/__demo/dpop`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(change) });
  expect(res.status).toBe(200);
}

async function setIdpDpop(issuer: string, change: Partial<DevIdpDpop>): Promise<void> {
  const res = await fetch(`${issuer}/__dev/dpop`, { method: 'POST', body: JSON.stringify(change) });
  expect(res.status).toBe(200);
}

function nonceRefusals(grants: GrantCounters): number {
  return grants.errorCodes.use_dpop_nonce ?? 0;
}

const sha256 = (text: string) => createHash('sha256').update(text).digest('base64url');

async function thumbprintOf(jwk: { kty: string; crv: string; x: string; y: string }): Promise<string> {
  return calculateJwkThumbprint({ kty: jwk.kty, crv: jwk.crv, x: jwk.x, y: jwk.y });
}

async function scanKeys(probe: RedisProbe, pattern: string): Promise<string[]> {
  const found: string[] = [];
  let cursor = '0';
  do {
    const [next, batch] = await probe.redis.scan(cursor, 'MATCH', `${probe.keyPrefix}${pattern}`, 'COUNT', 1000);
    cursor = next;
    found.push(...batch);
  } while (cursor !== '0');
  return found;
}

/** The login transaction cookie, opened with the session secret: what the browser carries, sealed. */
async function openTransactionCookie(jars: CookieJars, app: string, secret: string): Promise<Record<string, unknown>> {
  const entry = [...jarFor(jars, app)].find(([name]) => name.startsWith('gatehouse-tx-'));
  if (!entry) throw new Error('no transaction cookie');
  const id = /^Fe26\.2\*([^*]*)\*/.exec(entry[1])?.[1] ?? '';
  return unsealData<Record<string, unknown>>(entry[1], { password: { [id]: secret } });
}

/** A login up to the IdP's redirect back (not requested), with the authorization request it made. */
async function loginUntilCallback(app: string, username: string): Promise<{ authorize: URL; callback: URL; jars: CookieJars }> {
  const jars: CookieJars = new Map();
  const start = new URL(`${app}/api/auth/login`);
  let authorize: URL | undefined;
  const callback = await followFlow(
    start,
    (next) => {
      if (!authorize && next.origin !== start.origin) authorize = next;
      return authorize !== undefined && next.origin === start.origin;
    },
    { username, jars },
  );
  if (!authorize) throw new Error('the login never left the app');
  return { authorize, callback, jars };
}

async function postJson(app: string, path: string, cookie: string, body: unknown): Promise<CallResult> {
  const started = performance.now();
  const res = await fetch(`${app}${path}`, { method: 'POST', headers: { 'x-csrf': '1', cookie, 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const text = await res.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text) as unknown;
  } catch {
    // Not JSON: keep the text.
  }
  return { status: res.status, body: parsed, setCookies: res.headers.getSetCookie(), headers: res.headers, ms: performance.now() - started };
}

// --- one deployment: two instances, refresh due 6 s after each login ------------------------------

describe(`DPoP-bound sessions across two instances (${shape})`, () => {
  const ACCESS_TOKEN_TTL_SEC = 40;
  const REFRESH_SKEW_SEC = 34;
  const USER = 'dpop-user';
  const REFRESH_USER = 'dpop-refresh';
  let stack: Stack;
  let probe: RedisProbe;
  let appA: string;
  let appB: string;
  let secret: string;
  /**
   * A DPoP API that answers the first request of each connection and resets the connection when a
   * second arrives on it, unanswered: the race of its idle timeout with Gatehouse reusing it.
   */
  let keptAlive: ScriptedUpstream;
  /** Everything the browser side saw, for the scan for private key material. */
  const seen: string[] = [];
  const privateParts: string[] = [];
  let cookie: string;
  let jkt: string;
  /** A request the demo API verified, as it arrived: the thief's loot. */
  let loot: { token: string; proof: string };

  async function tracked(result: Promise<CallResult>): Promise<CallResult> {
    const done = await result;
    seen.push(JSON.stringify({ status: done.status, body: done.body, headers: [...done.headers] }));
    return done;
  }

  async function keepPrivatePartOf(user: string): Promise<StoredSecrets> {
    const key = await probe.sessionKeyOf(user);
    if (!key) throw new Error(`no session of ${user}`);
    const secrets = await storedSecrets(REDIS_URL, key, secret);
    if (!secrets.dpopKey) throw new Error(`${user}'s session holds no DPoP key`);
    privateParts.push(secrets.dpopKey.d);
    return secrets;
  }

  beforeAll(async () => {
    keptAlive = await startScriptedUpstream((request, socket) => {
      if (request.nth > 1) return void socket.resetAndDestroy();
      socket.write(rawAnswer('HTTP/1.1 200 OK', [['content-type', 'application/json'], ['keep-alive', 'timeout=60']], JSON.stringify({ connection: request.connection })));
    });
    stack = await startStack({
      instances: 2,
      workers: 2,
      accessTokenTtl: ACCESS_TOKEN_TTL_SEC,
      env: {
        OIDC_DPOP: 'true',
        TOKEN_REFRESH_SKEW: String(REFRESH_SKEW_SEC),
        OIDC_TIMEOUT_MS: '1500',
        REFRESH_LOCK_LEASE_MS: '3000',
        REFRESH_WAIT_MS: '1500',
        // Every log line there is, for the scan at the end.
        LOG_LEVEL: 'debug',
      },
      apis: ({ apiUrl }) => ({ demo: { url: apiUrl, dpop: true }, bearer: { url: apiUrl }, machine: { url: apiUrl, auth: 'client' }, keptalive: { url: keptAlive.url, dpop: true } }),
    });
    stacks.push(stack);
    probe = new RedisProbe(stack.keyPrefix);
    [appA, appB] = stack.apps.map((app) => app.url) as [string, string];
    secret = stack.appEnv.SESSION_SECRET as string;
  });

  afterAll(async () => {
    await probe?.cleanup();
    await probe?.close();
    await keptAlive?.close();
  });

  it('login names a fresh key at the IdP (dpop_jkt), keeps the private key on the server, encrypted, and the IdP binds the tokens to it', async () => {
    const { authorize, callback, jars } = await loginUntilCallback(appA, USER);
    jkt = authorize.searchParams.get('dpop_jkt') ?? '';
    expect(jkt).toMatch(/^[\w-]{43}$/);

    // While the login is under way the private key waits in the store, encrypted, for as long as the attempt lives.
    const pending = await scanKeys(probe, 'dpop-login:*');
    expect(pending).toHaveLength(1);
    const pendingRaw = (await probe.redis.get(pending[0] as string)) ?? '';
    expect(pendingRaw.split('.')).toHaveLength(5);
    expect(JSON.parse(Buffer.from(pendingRaw.split('.')[0] as string, 'base64url').toString())).toMatchObject({ alg: 'dir', enc: 'A256GCM' });
    const ttl = await probe.redis.pttl(pending[0] as string);
    expect(ttl).toBeGreaterThan(9 * 60_000);
    expect(ttl).toBeLessThanOrEqual(10 * 60_000);
    // The browser's transaction cookie carries the thumbprint only, not the key, not even sealed.
    const transaction = await openTransactionCookie(jars, appA, secret);
    expect(transaction.dpopJkt).toBe(jkt);
    expect(Object.keys(transaction).sort()).toEqual(['codeVerifier', 'dpopJkt', 'nonce', 'returnTo', 'startedAt', 'state']);

    const res = await browserRequest(callback, jars);
    seen.push(JSON.stringify([...res.headers]), await res.text());
    expect(res.status).toBe(302);
    cookie = `gatehouse=${jarFor(jars, appA).get('gatehouse')}`;
    // The callback took the key out of the store.
    expect(await probe.exists(pending[0] as string)).toBe(false);

    // The IdP: the code named the key, and the access token it issued is bound to it.
    expect((await idpGrants(stack.issuer)).dpop[USER]).toEqual([{ grantType: 'authorization_code', dpopJkt: jkt, jkt }]);
    const secrets = await keepPrivatePartOf(USER);
    expect(await thumbprintOf(secrets.dpopKey as NonNullable<StoredSecrets['dpopKey']>)).toBe(jkt);
    expect(decodeJwt(secrets.accessToken as string).cnf).toEqual({ jkt });
    // In Redis only as ciphertext: neither the pending record nor the session's holds the private part.
    const d = secrets.dpopKey?.d as string;
    expect(pendingRaw).not.toContain(d);
    expect(await probe.redis.get((await probe.sessionKeyOf(USER)) as string)).not.toContain(d);
  });

  it('uploads to the DPoP API reset by the browser while the proof is signed leave no uncaught error behind, and the server keeps serving', async () => {
    const { port, host } = new URL(appA);
    const cookie = await login(appA, 'dpop-resets');
    const logBefore = stack.apps[0]!.process.output().length;
    for (let attempt = 0; attempt < 150; attempt++) {
      const socket = net.connect(Number(port), '127.0.0.1');
      await new Promise((resolve) => socket.once('connect', resolve));
      socket.on('error', () => undefined);
      socket.write(`POST /api/proxy/demo/echo HTTP/1.1\r\nHost: ${host}\r\nCookie: ${cookie}\r\nX-CSRF: 1\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n${'x'.repeat(1024)}\r\n`);
      await new Promise((resolve) => setTimeout(resolve, attempt % 4));
      socket.resetAndDestroy();
    }
    expect((await call(appA, '/api/proxy/demo/whoami', cookie)).status).toBe(200);
    const output = stack.apps[0]!.process.output().slice(logBefore);
    expect(output).not.toMatch(/uncaught|Error: aborted|^\s+at /im);
    // The next test counts what the API verifies: none of these uploads may arrive during it.
    await untilQuiet(stack.apiUrl);
  });

  it('a proxied call to the DPoP API carries a proof made for exactly that request, and the API verifies it', async () => {
    const before = await demoStats(stack.apiUrl);
    const result = await tracked(call(appB, '/api/proxy/demo/whoami?page=2#ignored', cookie));
    expect(result.status).toBe(200);
    expect(result.body).toMatchObject({ sub: USER, dpop: { jkt }, headers: { authorization: 'DPoP [redacted]', dpop: '[redacted]' } });
    expect((await demoStats(stack.apiUrl)).dpop.verified).toBe(before.dpop.verified + 1);

    const arrived = await demoLast(stack.apiUrl);
    const [scheme, token = ''] = (arrived.headers.authorization ?? '').split(' ');
    const proof = arrived.headers.dpop ?? '';
    expect(scheme).toBe('DPoP');
    const header = decodeProtectedHeader(proof);
    expect(header).toMatchObject({ alg: 'ES256', typ: 'dpop+jwt' });
    expect(header.jwk).not.toHaveProperty('d');
    expect(await calculateJwkThumbprint(header.jwk as JWK)).toBe(jkt);
    const claims = decodeJwt(proof);
    expect(claims).toMatchObject({ htm: 'GET', htu: `${stack.apiUrl}/whoami`, ath: sha256(token) });
    expect(claims.jti).toEqual(expect.any(String));
    expect(Math.abs((claims.iat as number) - Date.now() / 1000)).toBeLessThan(30);
    expect(decodeJwt(token).cnf).toEqual({ jkt });
    loot = { token, proof };

    // Each request its own proof: another method, another jti.
    const removal = await tracked(call(appA, '/api/proxy/demo/whoami', cookie, { method: 'DELETE' }));
    expect(removal.status).toBe(200);
    const second = decodeJwt((await demoLast(stack.apiUrl)).headers.dpop ?? '');
    expect(second).toMatchObject({ htm: 'DELETE', htu: `${stack.apiUrl}/whoami` });
    expect(second.jti).not.toBe(claims.jti);
  });

  it('a token the API refuses as revoked, its nonce moved on meanwhile: one forced refresh, and the retry goes once more with the new nonce (200, nothing of it shown)', async () => {
    const user = 'dpop-revoked-then-nonce';
    const cookie = await login(appA, user);
    await setDemoDpop(stack.apiUrl, { requireNonce: true, rotate: true });
    try {
      expect((await call(appA, '/api/proxy/demo/whoami', cookie)).status).toBe(200);
      // Every token issued so far is revoked at the API; the refreshed one, issued from the next second on, is not.
      const revokedBefore = Math.floor(Date.now() / 1000) + 1;
      await revokeAtDemoApi(stack.apiUrl, revokedBefore);
      await waitUntil('the second tokens are good from', revokedBefore * 1000);
      const grantsBefore = await idpGrants(stack.issuer);
      const s0 = await demoStats(stack.apiUrl);
      const answer = await call(appA, '/api/proxy/demo/whoami', cookie);
      expect({ status: answer.status, sub: (answer.body as { sub?: string }).sub, nonce: answer.headers.get('dpop-nonce') }).toEqual({ status: 200, sub: user, nonce: null });
      const s1 = await demoStats(stack.apiUrl);
      // Revoked (the nonce moved on), the retry with the new token refused for the old nonce, once
      // more with the new one; a worker that had not met the nonce yet is refused for it once more first.
      const nonceRefusals = (s1.dpop.refused.use_dpop_nonce ?? 0) - (s0.dpop.refused.use_dpop_nonce ?? 0);
      expect({ revoked: (s1.dpop.refused.revoked ?? 0) - (s0.dpop.refused.revoked ?? 0), requests: s1.requests - s0.requests }).toEqual({ revoked: 1, requests: 2 + nonceRefusals });
      expect(nonceRefusals).toBeGreaterThanOrEqual(1);
      expect(refreshGrantsOf(await idpGrants(stack.issuer), user) - refreshGrantsOf(grantsBefore, user)).toBe(1);
    } finally {
      await setDemoDpop(stack.apiUrl, { requireNonce: false });
      await revokeAtDemoApi(stack.apiUrl, null);
    }
  });

  it('a DPoP API that asks for a stronger sign-in in its own scheme (DPoP error="insufficient_user_authentication") → 401 step_up_required, with no forced refresh', async () => {
    const user = 'dpop-step-up';
    const signedIn = await login(appA, user);
    const before = await idpGrants(stack.issuer);
    const refused = await call(appA, '/api/proxy/demo/mfa/whoami', signedIn);
    expect(refused.status).toBe(401);
    expect(refused.body).toMatchObject({ error: 'step_up_required', acr_values: 'urn:gatehouse:mfa' });
    expect(refreshGrantsOf(await idpGrants(stack.issuer), user) - refreshGrantsOf(before, user)).toBe(0);
    expect(clearsSessionCookie(refused.setCookies)).toBe(false);
  });

  it('a request sent again on a new connection (the kept-alive one reset as it was reused) carries a new proof: a server that refuses a proof it has seen accepts it', async () => {
    const signedIn = await login(appA, 'dpop-resend');
    // One connection to Gatehouse, so both calls reach the same worker and its one upstream connection.
    const browser = new Client(appA);
    try {
      for (const path of ['/first', '/second']) {
        const answer = await browser.request({ path: `/api/proxy/keptalive${path}`, method: 'GET', headers: { cookie: signedIn, 'x-csrf': '1' } });
        expect([path, answer.statusCode]).toEqual([path, 200]);
        await answer.body.dump();
      }
    } finally {
      await browser.close();
    }
    const second = keptAlive.requests.filter((request) => request.path === '/second');
    expect(second.map((request) => request.nth)).toEqual([2, 1]);
    const proofs = second.map((request) => decodeJwt(request.headers.find(([name]) => name.toLowerCase() === 'dpop')?.[1] ?? ''));
    for (const proof of proofs) expect(proof).toMatchObject({ htm: 'GET', htu: `${keptAlive.url}/second` });
    expect(proofs[1]!.jti).not.toBe(proofs[0]!.jti);
  });

  it('a stolen token is useless: as a bearer, without a proof, with the replayed proof, or with a proof of another key', async () => {
    const direct = async (headers: Record<string, string>) => (await fetch(`${stack.apiUrl}/whoami`, { headers })).status;
    const before = (await demoStats(stack.apiUrl)).dpop.refused;
    expect(await direct({ authorization: `Bearer ${loot.token}` })).toBe(401);
    expect(await direct({ authorization: `DPoP ${loot.token}` })).toBe(401);
    expect(await direct({ authorization: `DPoP ${loot.token}`, dpop: loot.proof })).toBe(401);
    const thief = await generateKeyPair('ES256');
    const ownProof = await new SignJWT({ htm: 'GET', htu: `${stack.apiUrl}/whoami`, ath: sha256(loot.token) })
      .setProtectedHeader({ alg: 'ES256', typ: 'dpop+jwt', jwk: await exportJWK(thief.publicKey) })
      .setJti(crypto.randomUUID())
      .setIssuedAt()
      .sign(thief.privateKey);
    expect(await direct({ authorization: `DPoP ${loot.token}`, dpop: ownProof })).toBe(401);
    const after = (await demoStats(stack.apiUrl)).dpop.refused;
    const delta = (reason: string) => (after[reason] ?? 0) - (before[reason] ?? 0);
    expect({ bearer: delta('bearer_for_bound_token'), noProof: delta('no_proof'), replayed: delta('replayed'), otherKey: delta('jkt') }).toEqual({
      bearer: 1,
      noProof: 1,
      replayed: 1,
      otherKey: 1,
    });
  });

  it('an API not marked dpop gets the token as a plain bearer (which this API, checking the binding, refuses); a client-credentials API as before', async () => {
    const bearer = await tracked(call(appA, '/api/proxy/bearer/whoami', cookie));
    // The upstream's own refusal, passed on: it checks cnf.jkt and will not take a bound token as a bearer.
    expect(bearer.status).toBe(401);
    expect(bearer.headers.get('x-gatehouse-error')).toBeNull();
    const arrived = await demoLast(stack.apiUrl);
    expect(arrived.headers.authorization).toMatch(/^Bearer /);
    expect(arrived.headers.dpop).toBeUndefined();

    const machine = await tracked(call(appA, '/api/proxy/machine/whoami', cookie));
    expect(machine.status).toBe(200);
    expect(machine.body).toMatchObject({ client_id: stack.clientId, dpop: null, headers: { authorization: 'Bearer [redacted]' } });
  });

  it('refresh with DPoP: one grant for 100 concurrent calls over both instances, and the new tokens are bound to the same key', async () => {
    const refreshCookie = await login(appA, REFRESH_USER);
    const key = (await probe.sessionKeyOf(REFRESH_USER)) as string;
    const boundTo = (await idpGrants(stack.issuer)).dpop[REFRESH_USER]?.[0]?.jkt;
    expect(boundTo).toMatch(/^[\w-]{43}$/);
    // Every process holds a copy of the session and a warm connection before the burst.
    const warm = await Promise.all(Array.from({ length: 40 }, (_, i) => tracked(call(i % 2 === 0 ? appA : appB, '/api/proxy/demo/whoami', refreshCookie))));
    expect(warm.map((result) => result.status)).toEqual(warm.map(() => 200));
    const before = await idpGrants(stack.issuer);
    const record = await probe.record(key);
    await waitUntil(`${REFRESH_USER}'s token to become due`, (record?.accessTokenExpiresAt ?? 0) - REFRESH_SKEW_SEC * 1000 + 50);

    const results = await Promise.all(Array.from({ length: 100 }, (_, i) => tracked(call(i % 2 === 0 ? appA : appB, '/api/proxy/demo/whoami', refreshCookie))));

    expect(results.map((result) => result.status)).toEqual(results.map(() => 200));
    for (const result of results) expect(result.body).toMatchObject({ sub: REFRESH_USER, dpop: { jkt: boundTo } });
    const after = await idpGrants(stack.issuer);
    expect(refreshGrantsOf(after, REFRESH_USER) - refreshGrantsOf(before, REFRESH_USER)).toBe(1);
    expect(after.error.refresh_token ?? 0).toBe(0);
    const bindings = after.dpop[REFRESH_USER] ?? [];
    expect(bindings.at(-1)).toEqual({ grantType: 'refresh_token', jkt: boundTo });
    expect(bindings.every((binding) => binding.jkt === boundTo)).toBe(true);
    const secrets = await keepPrivatePartOf(REFRESH_USER);
    expect(decodeJwt(secrets.accessToken as string).cnf).toEqual({ jkt: boundTo });
    expect((await probe.record(key))?.sealed).not.toBe(record?.sealed);
    expect(await probe.exists(probe.lockKeyFor(key))).toBe(false);
  });

  it('no private key material in any answer, log line or raw store value', async () => {
    expect(privateParts).toHaveLength(2);
    const outputs = [...stack.apps.map((app) => app.process.output()), stack.idp.output(), stack.api.output()];
    const raw: string[] = [];
    for (const key of await scanKeys(probe, '*')) if ((await probe.redis.type(key)) === 'string') raw.push((await probe.redis.get(key)) ?? '');
    expect(seen.length).toBeGreaterThan(140);
    expect(outputs.join('').length).toBeGreaterThan(1000);
    for (const d of privateParts) {
      expect(seen.filter((text) => text.includes(d))).toEqual([]);
      expect(outputs.filter((text) => text.includes(d))).toEqual([]);
      expect(raw.filter((text) => text.includes(d))).toEqual([]);
    }
  });
});

// --- one instance, one process, restarted per client authentication method -----------------------

describe(`DPoP with every client authentication method, server nonces, and an IdP that does not bind (${shape})`, () => {
  let stack: Stack;
  let app: Stack['apps'][number];
  let privateJwk: Record<string, unknown>;

  beforeAll(async () => {
    const { publicKey, privateKey } = await generateKeyPair('ES256', { extractable: true });
    const publicJwk = { ...(await exportJWK(publicKey)), alg: 'ES256', use: 'sig', kid: 'gatehouse-dpop' };
    privateJwk = { ...(await exportJWK(privateKey)), alg: 'ES256', kid: 'gatehouse-dpop' };
    stack = await startStack({
      workers: 1,
      accessTokenTtl: 60,
      // Every proxied call refreshes first (the skew exceeds the lifetime): each one is a grant too.
      env: { OIDC_DPOP: 'true', TOKEN_REFRESH_SKEW: '120' },
      idpEnv: { IDP_PKJWT_PUBLIC_JWK: JSON.stringify(publicJwk), IDP_DPOP_NONCE: 'required' },
      // `sibling` shares the demo API's origin, as two resource servers behind one gateway would.
      apis: ({ apiUrl }) => ({ demo: { url: apiUrl, dpop: true }, sibling: { url: `${apiUrl}/sibling`, dpop: true } }),
    });
    stacks.push(stack);
    app = stack.apps[0] as Stack['apps'][number];
  });

  /**
   * A login and a call that refreshes, on a Gatehouse process that has not met the IdP's nonce
   * yet: the code exchange is refused once (`use_dpop_nonce`) and sent again with the nonce; the
   * refresh, with another handle, already carries it. Both grants bind to the login's key.
   */
  async function exercise(user: string): Promise<void> {
    const before = await idpGrants(stack.issuer);
    const cookie = await login(app.url, user);
    const afterLogin = await idpGrants(stack.issuer);
    expect(nonceRefusals(afterLogin) - nonceRefusals(before)).toBe(1);
    const result = await call(app.url, '/api/proxy/demo/whoami', cookie);
    expect(result.status).toBe(200);
    const after = await idpGrants(stack.issuer);
    expect(refreshGrantsOf(after, user) - refreshGrantsOf(afterLogin, user)).toBe(1);
    expect(nonceRefusals(after)).toBe(nonceRefusals(afterLogin));
    const boundTo = after.dpop[user]?.[0]?.jkt;
    expect(after.dpop[user]).toEqual([
      { grantType: 'authorization_code', dpopJkt: boundTo, jkt: boundTo },
      { grantType: 'refresh_token', jkt: boundTo },
    ]);
    expect(result.body).toMatchObject({ sub: user, dpop: { jkt: boundTo } });
  }

  it('client_secret_basic', async () => {
    await exercise('dpop-basic');
  });

  it('client_secret_post', async () => {
    await restartGatehouse(app, { GATEHOUSE_WORKERS: '1', OIDC_CLIENT_ID: `${stack.clientId}-post`, OIDC_CLIENT_AUTH: 'client_secret_post' }, 'gatehouse-dpop-post');
    await exercise('dpop-post');
  });

  it('private_key_jwt', async () => {
    const { OIDC_CLIENT_SECRET: _secret, ...envWithoutSecret } = app.env;
    app.env = envWithoutSecret;
    await restartGatehouse(
      app,
      { GATEHOUSE_WORKERS: '1', OIDC_CLIENT_ID: `${stack.clientId}-pkjwt`, OIDC_CLIENT_AUTH: 'private_key_jwt', OIDC_PRIVATE_KEY: JSON.stringify(privateJwk) },
      'gatehouse-dpop-pkjwt',
    );
    await exercise('dpop-pkjwt');
  });

  it("an API's own nonce: one retry for a bodiless or a small request, none for a large one; remembered; never shown to the browser", async () => {
    const cookie = await login(app.url, 'dpop-api-nonce');
    await setDemoDpop(stack.apiUrl, { requireNonce: true, rotate: true });
    try {
      const s0 = await demoStats(stack.apiUrl);
      const first = await call(app.url, '/api/proxy/demo/whoami', cookie);
      expect(first.status).toBe(200);
      // The API names its next nonce on every answer: that is for Gatehouse, not the browser.
      expect(first.headers.get('dpop-nonce')).toBeNull();
      const s1 = await demoStats(stack.apiUrl);
      expect({ requests: s1.requests - s0.requests, nonce: (s1.dpop.refused.use_dpop_nonce ?? 0) - (s0.dpop.refused.use_dpop_nonce ?? 0) }).toEqual({ requests: 2, nonce: 1 });
      expect((await call(app.url, '/api/proxy/demo/whoami', cookie)).status).toBe(200);
      const s2 = await demoStats(stack.apiUrl);
      expect({ requests: s2.requests - s1.requests, verified: s2.dpop.verified - s1.dpop.verified }).toEqual({ requests: 1, verified: 1 });

      await setDemoDpop(stack.apiUrl, { rotate: true });
      const small = await postJson(app.url, '/api/proxy/demo/echo', cookie, { hello: 'dpop' });
      expect(small.status).toBe(200);
      expect(small.body).toMatchObject({ method: 'POST', body: { hello: 'dpop' }, dpop: { jkt: expect.any(String) } });
      const s3 = await demoStats(stack.apiUrl);
      expect({ requests: s3.requests - s2.requests, nonce: (s3.dpop.refused.use_dpop_nonce ?? 0) - (s2.dpop.refused.use_dpop_nonce ?? 0) }).toEqual({ requests: 2, nonce: 1 });

      // A body too large to keep for a resend goes once: the API's refusal reaches the browser, and the next request carries the nonce.
      await setDemoDpop(stack.apiUrl, { rotate: true });
      const large = { blob: 'x'.repeat(100 * 1024) };
      const refused = await postJson(app.url, '/api/proxy/demo/echo', cookie, large);
      expect(refused.status).toBe(401);
      expect(refused.headers.get('www-authenticate')).toMatch(/^DPoP error="use_dpop_nonce"/);
      expect(refused.headers.get('dpop-nonce')).toBeNull();
      expect((await postJson(app.url, '/api/proxy/demo/echo', cookie, large)).status).toBe(200);

      // Another API on the same origin names nonces of its own (`ownNonce`): the demo API's proofs
      // keep carrying the demo API's, so its large request (sent once) still goes through.
      const sibling = await call(app.url, '/api/proxy/sibling/whoami?ownNonce=the-siblings-own', cookie);
      expect(sibling.status).toBe(200);
      expect((await postJson(app.url, '/api/proxy/demo/echo', cookie, large)).status).toBe(200);
    } finally {
      await setDemoDpop(stack.apiUrl, { requireNonce: false });
    }
  });

  it('an IdP that stops binding: the refresh ends the session (its unbound refresh token revoked), and a login is refused with dpop_not_bound', async () => {
    const user = 'dpop-unbound';
    const cookie = await login(app.url, user);
    await setIdpDpop(stack.issuer, { ignoreProofs: true });
    try {
      const before = await idpGrants(stack.issuer);
      const ended = await call(app.url, '/api/proxy/demo/whoami', cookie);
      expect(ended.status).toBe(401);
      expect(ended.body).toMatchObject({ error: 'session_expired' });
      expect(clearsSessionCookie(ended.setCookies)).toBe(true);
      const after = await idpGrants(stack.issuer);
      expect(refreshGrantsOf(after, user) - refreshGrantsOf(before, user)).toBe(1);
      expect((after.revocations[user] ?? 0) - (before.revocations[user] ?? 0)).toBe(1);
      expect(app.process.output()).toMatch(/"event":"token\.dpop_unbound".*"operation":"refresh"/);

      const { callback, jars } = await loginUntilCallback(app.url, 'dpop-unbound-login');
      const page = await browserRequest(callback, jars);
      expect(page.status).toBe(502);
      expect(await page.text()).toContain('dpop_not_bound');
      expect(jarFor(jars, app.url).get('gatehouse')).toBeUndefined();
    } finally {
      await setIdpDpop(stack.issuer, { ignoreProofs: false });
    }
  });

  it('with OIDC_DPOP unset nothing changes (no key, no store write, no dpop_jkt, bearer tokens); turned on, such a session must sign in again for a DPoP API', async () => {
    const probe = new RedisProbe(stack.keyPrefix);
    try {
      await restartGatehouse(app, { OIDC_DPOP: '', BFF_APIS: JSON.stringify({ demo: { url: stack.apiUrl } }) }, 'gatehouse-no-dpop');
      const { authorize, callback, jars } = await loginUntilCallback(app.url, 'dpop-off');
      expect(authorize.searchParams.has('dpop_jkt')).toBe(false);
      expect(await scanKeys(probe, 'dpop-login:*')).toEqual([]);
      expect(await openTransactionCookie(jars, app.url, stack.appEnv.SESSION_SECRET as string)).not.toHaveProperty('dpopJkt');
      expect((await browserRequest(callback, jars)).status).toBe(302);
      const cookie = `gatehouse=${jarFor(jars, app.url).get('gatehouse')}`;
      const plain = await call(app.url, '/api/proxy/demo/whoami', cookie);
      expect(plain).toMatchObject({ status: 200, body: { sub: 'dpop-off', dpop: null, headers: { authorization: 'Bearer [redacted]' } } });
      expect((await idpGrants(stack.issuer)).dpop['dpop-off']).toBeUndefined();

      await restartGatehouse(app, { OIDC_DPOP: 'true', BFF_APIS: JSON.stringify({ demo: { url: stack.apiUrl, dpop: true } }) }, 'gatehouse-dpop-again');
      expect(await call(app.url, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 403, body: { error: 'reauthentication_required' } });
    } finally {
      await probe.close();
    }
  });

  it('a login whose key is gone from the store by the callback (expired, lost) is refused: invalid_state, start again', async () => {
    const probe = new RedisProbe(stack.keyPrefix);
    try {
      const { callback, jars } = await loginUntilCallback(app.url, 'dpop-lost-key');
      const pending = await scanKeys(probe, 'dpop-login:*');
      expect(pending).toHaveLength(1);
      await probe.redis.del(pending[0] as string);
      const page = await browserRequest(callback, jars);
      expect(page.status).toBe(400);
      expect(await page.text()).toContain('invalid_state');
      expect(jarFor(jars, app.url).get('gatehouse')).toBeUndefined();
    } finally {
      await probe.close();
    }
  });

  // Last: it leaves the server pushing its authorization requests.
  it('with PAR, dpop_jkt is pushed with the rest, and the code is bound to it', async () => {
    await restartGatehouse(app, { OIDC_USE_PAR: 'true' }, 'gatehouse-dpop-par');
    const { authorize, callback, jars } = await loginUntilCallback(app.url, 'dpop-par');
    expect([...authorize.searchParams.keys()].sort()).toEqual(['client_id', 'request_uri']);
    expect((await browserRequest(callback, jars)).status).toBe(302);
    const [binding] = (await idpGrants(stack.issuer)).dpop['dpop-par'] ?? [];
    expect(binding?.dpopJkt).toMatch(/^[\w-]{43}$/);
    expect(binding).toEqual({ grantType: 'authorization_code', dpopJkt: binding?.dpopJkt, jkt: binding?.dpopJkt });
    const cookie = `gatehouse=${jarFor(jars, app.url).get('gatehouse')}`;
    expect(await call(app.url, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'dpop-par', dpop: { jkt: binding?.dpopJkt } } });
  });
});
