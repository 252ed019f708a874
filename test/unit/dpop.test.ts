import { createHash } from 'node:crypto';
import { EmbeddedJWK, calculateJwkThumbprint, decodeProtectedHeader, jwtVerify, type JWK } from 'jose';
import * as oauth from 'oauth4webapi';
import { describe, expect, it } from 'vitest';
import { ConfigError, parseConfig } from '../../lib/config.ts';

const valid = {
  APP_BASE_URL: 'https://app.example.com',
  OIDC_ISSUER: 'https://idp.example.com',
  OIDC_CLIENT_ID: 'gatehouse',
  OIDC_CLIENT_SECRET: 'client-secret',
  SESSION_SECRET: 'TRetdbQ0687YrMfHsxp-ktMF3r9JJuUqRsk-Owqe',
  BFF_APIS: '{"todos":{"url":"https://api.example.com/v1"}}',
};

// lib/dpop.ts reads the configuration only where OIDC_DPOP decides (refresh); set before it loads.
Object.assign(process.env, { ...valid, SESSION_STORE: 'memory', OIDC_DPOP: 'true', BFF_APIS: '{"todos":{"url":"https://api.example.com/v1","dpop":true}}', LOG_LEVEL: 'silent' });
const { dpopAuthorization, dpopNonceDemanded, sessionDpopHandle, tokenRequestWithDpop, unboundTokenProblem } = await import('../../lib/dpop.ts');
const { filterRequestHeaders, filterResponseHeaders } = await import('../../lib/proxy.ts');

/** The one problem a start with `env` is refused for. */
function problemOf(env: Record<string, string | undefined>): string {
  const problems = (() => {
    try {
      return parseConfig(env) && [];
    } catch (error) {
      return error instanceof ConfigError ? error.problems : [String(error)];
    }
  })();
  expect(problems).toHaveLength(1);
  return problems[0] as string;
}

async function newKey(): Promise<JsonWebKey> {
  const pair = await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, true, ['sign', 'verify']);
  const { kty, crv, x, y, d } = await crypto.subtle.exportKey('jwk', pair.privateKey);
  return { kty, crv, x, y, d };
}

function secretsWith(dpopKey: JsonWebKey | undefined) {
  return { accessToken: 'at', refreshToken: 'rt', idToken: undefined, claims: {}, ...(dpopKey ? { dpopKey } : {}) };
}

async function proofOf(headers: Array<[string, string]>) {
  const proof = headers.find(([name]) => name === 'dpop')?.[1] ?? '';
  return { header: decodeProtectedHeader(proof), ...(await jwtVerify(proof, EmbeddedJWK, { typ: 'dpop+jwt', algorithms: ['ES256'] })) };
}

describe('DPoP configuration', () => {
  it('is off by default, and OIDC_DPOP is a boolean', () => {
    expect(parseConfig(valid).oidc.dpop).toBe(false);
    expect(parseConfig(valid).apis.todos?.dpop).toBe(false);
    expect(parseConfig({ ...valid, OIDC_DPOP: 'true' }).oidc.dpop).toBe(true);
    expect(problemOf({ ...valid, OIDC_DPOP: 'yes please' })).toBe('OIDC_DPOP: must be true or false');
  });

  it('an API marked dpop needs OIDC_DPOP, and a user token to bind', () => {
    const dpopApi = JSON.stringify({ todos: { url: 'https://api.example.com/v1', dpop: true } });
    expect(problemOf({ ...valid, BFF_APIS: dpopApi })).toMatch(/^BFF_APIS\.todos\.dpop: needs OIDC_DPOP=true/);
    expect(parseConfig({ ...valid, BFF_APIS: dpopApi, OIDC_DPOP: 'true' }).apis.todos?.dpop).toBe(true);
    const clientApi = JSON.stringify({ machine: { url: 'https://api.example.com/v1', auth: 'client', dpop: true } });
    expect(problemOf({ ...valid, BFF_APIS: clientApi, OIDC_DPOP: 'true' })).toMatch(/^BFF_APIS\.machine\.dpop: only for auth "user" or "user-optional"/);
    const optional = JSON.stringify({ maybe: { url: 'https://api.example.com/v1', auth: 'user-optional', dpop: true } });
    expect(parseConfig({ ...valid, BFF_APIS: optional, OIDC_DPOP: 'true' }).apis.maybe?.dpop).toBe(true);
    expect(problemOf({ ...valid, BFF_APIS: JSON.stringify({ todos: { url: 'https://api.example.com/v1', dpop: 'yes' } }) })).toMatch(/^BFF_APIS\.todos\.dpop: /);
    const exchanged = JSON.stringify({ ledger: { url: 'https://api.example.com/v1', dpop: true, tokenExchange: { audience: 'urn:ledger' } } });
    expect(problemOf({ ...valid, BFF_APIS: exchanged, OIDC_DPOP: 'true' })).toMatch(/^BFF_APIS\.ledger\.dpop: not with "tokenExchange"/);
  });

  it('dpop_jkt is Gatehouse\'s own authorization parameter', () => {
    expect(problemOf({ ...valid, OIDC_AUTHORIZATION_PARAMS: 'dpop_jkt=abc' })).toMatch(/^OIDC_AUTHORIZATION_PARAMS: must not set dpop_jkt/);
  });
});

describe('DPoP proofs for proxied calls', () => {
  it('a fresh proof per request: ES256 over the session key, htm, htu without query or fragment, ath, jti, iat; no private part', async () => {
    const key = await newKey();
    const token = 'header.payload.signature';
    const url = new URL('https://api.example.com/v1/items/7?page=2#top');
    const first = await dpopAuthorization('session-a', secretsWith(key), token, 'POST', url, 'api');
    expect(first[0]).toEqual(['authorization', `DPoP ${token}`]);
    const { header, payload } = await proofOf(first);
    expect(header).toMatchObject({ alg: 'ES256', typ: 'dpop+jwt' });
    expect(header.jwk).toEqual({ kty: 'EC', crv: 'P-256', x: key.x, y: key.y });
    expect(await calculateJwkThumbprint(header.jwk as JWK)).toBe(await calculateJwkThumbprint({ kty: 'EC', crv: 'P-256', x: key.x as string, y: key.y as string }));
    expect(payload).toMatchObject({ htm: 'POST', htu: 'https://api.example.com/v1/items/7', ath: createHash('sha256').update(token).digest('base64url') });
    expect(Math.abs((payload.iat as number) - Date.now() / 1000)).toBeLessThan(5);
    expect(payload.nonce).toBeUndefined();
    const second = await proofOf(await dpopAuthorization('session-a', secretsWith(key), token, 'POST', url, 'api'));
    expect(typeof payload.jti).toBe('string');
    expect(second.payload.jti).not.toBe(payload.jti);
    expect(JSON.stringify(first)).not.toContain(key.d);
  });

  it("neither the browser's own proof goes up, nor an API's nonce down", async () => {
    expect(filterRequestHeaders([['DPoP', 'forged.proof.jwt'], ['accept', '*/*']], undefined)).toEqual([['accept', '*/*']]);
    expect(await filterResponseHeaders(['DPoP-Nonce', 'n-1', 'Content-Type', 'application/json'])).toEqual([['content-type', 'application/json']]);
  });

  it('a session without a key (signed in before OIDC_DPOP) needs a fresh sign-in for a DPoP API', async () => {
    await expect(dpopAuthorization('session-old', secretsWith(undefined), 'token', 'GET', new URL('https://api.example.com/'), 'api')).rejects.toMatchObject({ code: 'reauthentication_required', status: 403 });
  });

  it('a new key under the same session id is never signed with the cached one', async () => {
    const [one, two] = [await newKey(), await newKey()];
    const url = new URL('https://api.example.com/x');
    await dpopAuthorization('session-b', secretsWith(one), 't', 'GET', url, 'api');
    const { header } = await proofOf(await dpopAuthorization('session-b', secretsWith(two), 't', 'GET', url, 'api'));
    expect((header.jwk as JWK).x).toBe(two.x);
  });

  it("hears an API's nonce challenge, and puts the nonce into that API's next proofs, not another's on the same origin", async () => {
    const key = await newKey();
    const url = new URL('https://nonce-api.example.com/v1/a');
    const challenge = ['WWW-Authenticate', 'DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"', 'DPoP-Nonce', 'n-1'];
    expect(dpopNonceDemanded('orders', 401, challenge)).toBe(true);
    expect((await proofOf(await dpopAuthorization('s', secretsWith(key), 't', 'GET', url, 'orders'))).payload.nonce).toBe('n-1');
    // A 200 may carry the next nonce: remembered, no retry.
    expect(dpopNonceDemanded('orders', 200, ['DPoP-Nonce', 'n-2'])).toBe(false);
    expect((await proofOf(await dpopAuthorization('s', secretsWith(key), 't', 'GET', new URL('https://nonce-api.example.com/v1/other'), 'orders'))).payload.nonce).toBe('n-2');
    // Another API has nonces of its own, on another origin or on this one (two resource servers behind one gateway).
    expect((await proofOf(await dpopAuthorization('s', secretsWith(key), 't', 'GET', new URL('https://else.example.com/'), 'else'))).payload.nonce).toBeUndefined();
    expect(dpopNonceDemanded('billing', 200, ['DPoP-Nonce', 'b-1'])).toBe(false);
    expect((await proofOf(await dpopAuthorization('s', secretsWith(key), 't', 'GET', new URL('https://nonce-api.example.com/v2/bills'), 'billing'))).payload.nonce).toBe('b-1');
    expect((await proofOf(await dpopAuthorization('s', secretsWith(key), 't', 'GET', url, 'orders'))).payload.nonce).toBe('n-2');
    // Not a nonce challenge: a 401 without a nonce to use, or one that is about the token.
    expect(dpopNonceDemanded('orders', 401, ['WWW-Authenticate', 'DPoP error="use_dpop_nonce"'])).toBe(false);
    expect(dpopNonceDemanded('orders', 401, ['WWW-Authenticate', 'DPoP error="invalid_token"', 'DPoP-Nonce', 'n-3'])).toBe(false);
  });
});

describe('DPoP at the token endpoint', () => {
  const as: oauth.AuthorizationServer = { issuer: 'https://idp.example.com', token_endpoint: 'https://idp.example.com/token' };
  const client: oauth.Client = { client_id: 'gatehouse' };

  /** A token endpoint that wants a nonce: answers `use_dpop_nonce` to a proof without its nonce. */
  function scriptedTokenEndpoint(nonce: string) {
    const proofs: JWTPayloadLike[] = [];
    const fetchFn = async (url: string, init: RequestInit) => {
      const proof = new Headers(init.headers).get('dpop') ?? '';
      const { payload } = await jwtVerify(proof, EmbeddedJWK, { typ: 'dpop+jwt' });
      proofs.push(payload);
      const answer =
        payload.nonce === nonce
          ? new Response(JSON.stringify({ access_token: 'bound', token_type: 'DPoP', expires_in: 60 }), { status: 200, headers: { 'content-type': 'application/json', 'dpop-nonce': nonce } })
          : new Response(JSON.stringify({ error: 'use_dpop_nonce' }), { status: 400, headers: { 'content-type': 'application/json', 'dpop-nonce': nonce } });
      Object.defineProperty(answer, 'url', { value: url });
      return answer;
    };
    return { proofs, fetchFn };
  }

  type JWTPayloadLike = Record<string, unknown>;

  it('retries once with the nonce the IdP names, and later handles of the process send it from the start', async () => {
    const endpoint = scriptedTokenEndpoint('idp-nonce-1');
    const grant = async (sessionId: string) => {
      const dpop = await sessionDpopHandle(sessionId, secretsWith(await newKey()));
      return tokenRequestWithDpop(
        dpop,
        () => oauth.refreshTokenGrantRequest(as, client, oauth.None(), 'rt', { DPoP: dpop, [oauth.customFetch]: endpoint.fetchFn }),
        (response) => oauth.processRefreshTokenResponse(as, client, response),
      );
    };
    expect((await grant('s1')).result).toMatchObject({ access_token: 'bound', token_type: 'dpop' });
    expect(endpoint.proofs.map((proof) => proof.nonce)).toEqual([undefined, 'idp-nonce-1']);
    await grant('s2');
    expect(endpoint.proofs.map((proof) => proof.nonce)).toEqual([undefined, 'idp-nonce-1', 'idp-nonce-1']);
  });

  it('does not retry twice, and never without DPoP', async () => {
    const stubborn = async (url: string) => {
      const answer = new Response(JSON.stringify({ error: 'use_dpop_nonce' }), { status: 400, headers: { 'content-type': 'application/json', 'dpop-nonce': 'other' } });
      Object.defineProperty(answer, 'url', { value: url });
      return answer;
    };
    let sent = 0;
    const counting = async (url: string) => {
      sent++;
      return stubborn(url);
    };
    const dpop = await sessionDpopHandle('s3', secretsWith(await newKey()));
    const attempt = (handle: oauth.DPoPHandle | undefined) =>
      tokenRequestWithDpop(
        handle,
        () => oauth.refreshTokenGrantRequest(as, client, oauth.None(), 'rt', { DPoP: handle, [oauth.customFetch]: counting }),
        (response) => oauth.processRefreshTokenResponse(as, client, response),
      );
    await expect(attempt(dpop)).rejects.toBeInstanceOf(oauth.ResponseBodyError);
    expect(sent).toBe(2);
    await expect(attempt(undefined)).rejects.toBeInstanceOf(oauth.ResponseBodyError);
    expect(sent).toBe(3);
  });

  it('names tokens that came back unbound', () => {
    expect(unboundTokenProblem({ access_token: 'x', token_type: 'dpop' }, 'refresh')).toBeUndefined();
    expect(unboundTokenProblem({ access_token: 'x', token_type: 'bearer' }, 'refresh')).toMatch(/^refresh: DPoP was asked for but the IdP issued token_type bearer/);
  });

  it('no handle for a session without a key', async () => {
    expect(await sessionDpopHandle('s4', secretsWith(undefined))).toBeUndefined();
  });
});
