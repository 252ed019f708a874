import { createServer, request as httpRequest } from 'node:http';
import { networkInterfaces } from 'node:os';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { decodeJwt } from 'jose';
import * as oauth from 'oauth4webapi';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { confirmDevIdpLogout, loginThroughRp, loginWithDevIdp } from '../../e2e/support/headless-login.ts';
import { waitFor } from '../support/http-client.ts';
import { startDemoApi } from '../../scripts/demo-api.ts';
import type { DemoApiHandle } from '../../scripts/demo-api.ts';
import { DEV_IDP_ACR, DEV_IDP_DEFAULTS, TOKEN_EXCHANGE_GRANT, startDevIdp } from '../../scripts/dev-idp.ts';
import type { DevIdpHandle } from '../../scripts/dev-idp.ts';

const insecure = { [oauth.allowInsecureRequests]: true };
const OTHER_API = 'http://localhost:1/other-api';

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

let idp: DevIdpHandle;
let api: DemoApiHandle;
let rp: Server;
let rpUrl: string;
const backchannelLogouts: string[] = [];
let as: oauth.AuthorizationServer;
const client: oauth.Client = { client_id: DEV_IDP_DEFAULTS.clientId };
const clientAuth = oauth.ClientSecretBasic(DEV_IDP_DEFAULTS.clientSecret);

async function startAuthorization(redirectUri: string, extra: Record<string, string> = {}) {
  const codeVerifier = oauth.generateRandomCodeVerifier();
  const state = oauth.generateRandomState();
  const url = new URL(as.authorization_endpoint ?? '');
  url.search = new URLSearchParams({
    client_id: client.client_id,
    redirect_uri: redirectUri,
    response_type: 'code',
    scope: 'openid profile email offline_access api:read api:write',
    state,
    code_challenge: await oauth.calculatePKCECodeChallenge(codeVerifier),
    code_challenge_method: 'S256',
    ...extra,
  }).toString();
  return { url, codeVerifier, state };
}

async function codeFlow(username: string) {
  const redirectUri = `${rpUrl}/api/auth/callback`;
  const { url, codeVerifier, state } = await startAuthorization(redirectUri);
  const callback = await loginWithDevIdp({ authorizationUrl: url, username });
  expect(callback.searchParams.get('iss')).toBe(idp.issuer);
  const params = oauth.validateAuthResponse(as, client, callback, state);
  const res = await oauth.authorizationCodeGrantRequest(as, client, clientAuth, params, redirectUri, codeVerifier, insecure);
  return oauth.processAuthorizationCodeResponse(as, client, res);
}

const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

async function exchange(subjectToken: string, parameters: Record<string, string>, exchanger: oauth.Client = client, auth = clientAuth) {
  const res = await oauth.genericTokenEndpointRequest(as, exchanger, auth, TOKEN_EXCHANGE_GRANT, { subject_token: subjectToken, subject_token_type: ACCESS_TOKEN_TYPE, ...parameters }, insecure);
  return oauth.processGenericTokenEndpointResponse(as, exchanger, res);
}

async function refresh(refreshToken: string, parameters?: Record<string, string>) {
  const res = await oauth.refreshTokenGrantRequest(as, client, clientAuth, refreshToken, { ...insecure, additionalParameters: parameters });
  return oauth.processRefreshTokenResponse(as, client, res);
}

// A throwaway relying party, enough to prove loginThroughRp collects the RP's own cookies.
function startTinyRp(port: number): Promise<Server> {
  const pending = new Map<string, { codeVerifier: string }>();
  const server = createServer((req, res) => {
    void (async () => {
      const url = new URL(req.url ?? '/', rpUrl);
      if (url.pathname === '/api/auth/login') {
        const { url: authUrl, codeVerifier, state } = await startAuthorization(`${rpUrl}/api/auth/callback`);
        pending.set(state, { codeVerifier });
        res.writeHead(302, { location: authUrl.href, 'set-cookie': `txn=${state}; Path=/; HttpOnly` }).end();
      } else if (url.pathname === '/api/auth/callback') {
        const state = /txn=([^;]+)/.exec(req.headers.cookie ?? '')?.[1] ?? '';
        const params = oauth.validateAuthResponse(as, client, url, state);
        const tokenRes = await oauth.authorizationCodeGrantRequest(as, client, clientAuth, params, `${rpUrl}/api/auth/callback`, pending.get(state)?.codeVerifier ?? '', insecure);
        const tokens = await oauth.processAuthorizationCodeResponse(as, client, tokenRes);
        const sub = oauth.getValidatedIdTokenClaims(tokens)?.sub ?? '';
        res.writeHead(302, { location: '/', 'set-cookie': [`session=${sub}; Path=/; HttpOnly`, 'txn=; Max-Age=0; Path=/'] }).end();
      } else if (url.pathname === '/api/auth/backchannel-logout' && req.method === 'POST') {
        let body = '';
        for await (const chunk of req) body += String(chunk);
        backchannelLogouts.push(new URLSearchParams(body).get('logout_token') ?? '');
        res.writeHead(200).end();
      } else {
        res.writeHead(404).end();
      }
    })().catch((err: unknown) => res.writeHead(500).end(String(err)));
  });
  return new Promise((resolve) => server.listen(port, () => resolve(server)));
}

beforeAll(async () => {
  const [apiPort, rpPort] = [await freePort(), await freePort()];
  rpUrl = `http://localhost:${rpPort}`;
  const apiUrl = `http://localhost:${apiPort}`;
  idp = await startDevIdp({ port: 0, appBaseUrl: [rpUrl, 'http://localhost:3999'], apiAudiences: [apiUrl, OTHER_API] });
  api = await startDemoApi({ port: apiPort, issuer: idp.issuer });
  rp = await startTinyRp(rpPort);
  const issuer = new URL(idp.issuer);
  as = await oauth.processDiscoveryResponse(issuer, await oauth.discoveryRequest(issuer, insecure));
});

afterAll(async () => {
  rp?.closeAllConnections();
  await new Promise((resolve) => rp?.close(resolve));
  await api?.close();
  await idp?.close();
});

describe('dev IdP + demo API', () => {
  it('advertises what Gatehouse relies on', () => {
    expect(as.authorization_response_iss_parameter_supported).toBe(true);
    expect(as.code_challenge_methods_supported).toEqual(['S256']);
    expect(as.end_session_endpoint).toBe(`${idp.issuer}/session/end`);
    expect(as.revocation_endpoint).toBeTruthy();
    expect(as.backchannel_logout_session_supported).toBe(true);
    // Step-up: a password sign-in, and one with a second factor (test/integration/step-up.test.ts).
    expect(as.acr_values_supported).toEqual([DEV_IDP_ACR.password, DEV_IDP_ACR.mfa]);
  });

  it('refuses to start in production', async () => {
    vi.stubEnv('NODE_ENV', 'production');
    try {
      await expect(startDevIdp({ port: 0 })).rejects.toThrow(/NODE_ENV=production/);
      await expect(startDemoApi({ port: 0 })).rejects.toThrow(/NODE_ENV=production/);
    } finally {
      vi.unstubAllEnvs();
    }
  });

  it('runs code flow + PKCE, calls the API, rotates refresh tokens and revokes the grant on replay', async () => {
    idp.resetGrants();
    const tokens = await codeFlow('alice');
    expect(tokens.refresh_token).toBeTruthy();
    const idClaims = oauth.getValidatedIdTokenClaims(tokens);
    expect(idClaims).toMatchObject({ sub: 'alice', name: 'Alice Example', email: 'alice@example.test' });
    const access = decodeJwt(tokens.access_token);
    expect(access).toMatchObject({ aud: api.audience, sub: 'alice', scope: 'api:read api:write' });

    const whoami = await fetch(`${api.url}/whoami?x=1`, { headers: { authorization: `Bearer ${tokens.access_token}` } });
    expect(whoami.status).toBe(200);
    expect(await whoami.json()).toMatchObject({ sub: 'alice', aud: api.audience, method: 'GET', query: { x: '1' } });
    const anonymous = await fetch(`${api.url}/whoami`);
    expect(anonymous.status).toBe(401);
    expect(anonymous.headers.get('www-authenticate')).toBe('Bearer error="invalid_token"');

    const first = tokens.refresh_token ?? '';
    const rotated = await refresh(first);
    expect(rotated.refresh_token).toBeTruthy();
    expect(rotated.refresh_token).not.toBe(first);
    expect(decodeJwt(rotated.access_token).aud).toBe(api.audience);

    const other = await refresh(rotated.refresh_token ?? '', { resource: OTHER_API });
    expect(decodeJwt(other.access_token).aud).toBe(OTHER_API);

    await expect(refresh(first)).rejects.toMatchObject({ error: 'invalid_grant' });
    // Replay detection revoked the whole grant, so even the newest refresh token is dead now.
    await expect(refresh(other.refresh_token ?? '')).rejects.toMatchObject({ error: 'invalid_grant' });

    const counters = (await (await fetch(`${idp.issuer}/__dev/grants`)).json()) as DevIdpHandle['grants'];
    expect(counters.success).toEqual({ authorization_code: 1, refresh_token: 2 });
    expect(counters.error).toEqual({ refresh_token: 2 });
    expect(counters.errorCodes).toEqual({ invalid_grant: 2 });
    expect(counters.byAccount.alice).toEqual({ authorization_code: 1, refresh_token: 2 });
    expect(idp.grants.success.refresh_token).toBe(2);
    await fetch(`${idp.issuer}/__dev/grants/reset`, { method: 'POST' });
    expect(idp.grants.success).toEqual({});
  });

  it('DPoP: binds the code and the tokens to the proof key; the demo API verifies proofs and refuses the token alone, or with a replayed proof', async () => {
    idp.resetGrants();
    const dpop = oauth.DPoP(client, await oauth.generateKeyPair('ES256'));
    const jkt = await dpop.calculateThumbprint();
    const redirectUri = `${rpUrl}/api/auth/callback`;
    const { url, codeVerifier, state } = await startAuthorization(redirectUri, { dpop_jkt: jkt });
    const params = oauth.validateAuthResponse(as, client, await loginWithDevIdp({ authorizationUrl: url, username: 'dora' }), state);
    const grant = () => oauth.authorizationCodeGrantRequest(as, client, clientAuth, params, redirectUri, codeVerifier, { ...insecure, DPoP: dpop });
    const tokens = await oauth.processAuthorizationCodeResponse(as, client, await grant());
    expect(tokens.token_type).toBe('dpop');
    expect(decodeJwt(tokens.access_token).cnf).toEqual({ jkt });
    expect(idp.grants.dpop.dora).toEqual([{ grantType: 'authorization_code', dpopJkt: jkt, jkt }]);

    const whoami = new URL('/whoami', api.url);
    const verified = await oauth.protectedResourceRequest(tokens.access_token, 'GET', whoami, new Headers(), null, { ...insecure, DPoP: dpop });
    expect(verified.status).toBe(200);
    expect(await verified.json()).toMatchObject({ sub: 'dora', dpop: { jkt }, headers: { authorization: 'DPoP [redacted]', dpop: '[redacted]' } });
    const seen = api.lastRequests[0]?.headers ?? {};
    const status = async (headers: Record<string, string>) => (await fetch(whoami, { headers })).status;
    expect(await status({ authorization: `Bearer ${tokens.access_token}` })).toBe(401);
    expect(await status({ authorization: `DPoP ${tokens.access_token}` })).toBe(401);
    expect(await status({ authorization: String(seen.authorization), dpop: String(seen.dpop) })).toBe(401);
    expect(api.stats.dpop.refused).toMatchObject({ bearer_for_bound_token: 1, no_proof: 1, replayed: 1 });

    // Nonces on demand: the IdP wants one (a new handle has none yet, and learns it from the refusal), then the API its own.
    const response = await fetch(`${idp.issuer}/__dev/dpop`, { method: 'POST', body: JSON.stringify({ requireNonce: true }) });
    expect(await response.json()).toEqual({ requireNonce: true, ignoreProofs: false });
    const fresh = oauth.DPoP(client, await oauth.generateKeyPair('ES256'));
    const refreshWith = () => oauth.refreshTokenGrantRequest(as, client, clientAuth, tokens.refresh_token as string, { ...insecure, DPoP: fresh });
    const refused = await oauth.processRefreshTokenResponse(as, client, await refreshWith()).catch((error: unknown) => error);
    expect(oauth.isDPoPNonceError(refused)).toBe(true);
    expect((await oauth.processRefreshTokenResponse(as, client, await refreshWith())).token_type).toBe('dpop');
    await fetch(`${idp.issuer}/__dev/dpop`, { method: 'POST', body: JSON.stringify({ requireNonce: false }) });
    api.dpop.requireNonce = true;
    try {
      const challenged = await oauth.protectedResourceRequest(tokens.access_token, 'GET', whoami, new Headers(), null, { ...insecure, DPoP: dpop }).catch((error: unknown) => error);
      expect(oauth.isDPoPNonceError(challenged)).toBe(true);
      expect((challenged as oauth.WWWAuthenticateChallengeError).response.headers.get('dpop-nonce')).toBe(api.dpop.nonce);
      expect((await oauth.protectedResourceRequest(tokens.access_token, 'GET', whoami, new Headers(), null, { ...insecure, DPoP: dpop })).status).toBe(200);
    } finally {
      api.dpop.requireNonce = false;
    }
  });

  it('revokes an account\'s grants on demand', async () => {
    const tokens = await codeFlow('bob');
    const res = await fetch(`${idp.issuer}/__dev/revoke-grants?sub=bob`, { method: 'POST' });
    expect(await res.json()).toEqual({ sub: 'bob', revoked: 1 });
    await expect(refresh(tokens.refresh_token ?? '')).rejects.toMatchObject({ error: 'invalid_grant' });
  });

  it('issues client_credentials tokens for a resource, with basic and post client auth', async () => {
    const basic = await oauth.processClientCredentialsResponse(as, client,
      await oauth.clientCredentialsGrantRequest(as, client, clientAuth, { resource: api.audience, scope: 'api:read' }, insecure));
    expect(decodeJwt(basic.access_token)).toMatchObject({ aud: api.audience, scope: 'api:read', client_id: client.client_id });

    const postClient: oauth.Client = { client_id: `${DEV_IDP_DEFAULTS.clientId}-post` };
    const post = await oauth.processClientCredentialsResponse(as, postClient,
      await oauth.clientCredentialsGrantRequest(as, postClient, oauth.ClientSecretPost(DEV_IDP_DEFAULTS.clientSecret), {}, insecure));
    expect(decodeJwt(post.access_token).aud).toBe(api.audience);
  });

  it('exchanges an access token it issued for one meant for another audience (RFC 8693), and refuses the rest', async () => {
    idp.resetGrants();
    const { access_token: subject } = await codeFlow('frank');
    const exchanged = await exchange(subject, { audience: OTHER_API, scope: 'api:read', requested_token_type: ACCESS_TOKEN_TYPE });
    expect(exchanged).toMatchObject({ issued_token_type: ACCESS_TOKEN_TYPE, token_type: 'bearer', scope: 'api:read', expires_in: expect.any(Number) });
    expect(exchanged.refresh_token).toBeUndefined();
    expect(exchanged.access_token).not.toBe(subject);
    expect(decodeJwt(exchanged.access_token)).toMatchObject({ aud: OTHER_API, sub: 'frank', scope: 'api:read', client_id: client.client_id });
    // Without a scope: all the subject had that the audience offers.
    expect(decodeJwt((await exchange(subject, { audience: api.audience })).access_token)).toMatchObject({ aud: api.audience, scope: 'api:read api:write' });
    expect(idp.grants.byAccount.frank).toEqual({ authorization_code: 1, [TOKEN_EXCHANGE_GRANT]: 2 });
    expect(idp.grants.orderByAccount.frank).toEqual(['authorization_code', TOKEN_EXCHANGE_GRANT, TOKEN_EXCHANGE_GRANT]);
    expect(idp.grants.clientAuth).toEqual({ authorization_code: { client_secret_basic: 1 }, [TOKEN_EXCHANGE_GRANT]: { client_secret_basic: 2 } });

    await expect(exchange(subject, { audience: OTHER_API, scope: 'api:read openid' })).rejects.toMatchObject({ error: 'invalid_scope' });
    await expect(exchange(subject, { audience: 'http://localhost:1/unknown' })).rejects.toMatchObject({ error: 'invalid_target' });
    await expect(exchange(subject, { audience: OTHER_API, subject_token_type: 'urn:ietf:params:oauth:token-type:id_token' })).rejects.toMatchObject({ error: 'invalid_request' });
    await expect(exchange(`${subject.slice(0, -4)}AAAA`, { audience: OTHER_API })).rejects.toMatchObject({ error: 'invalid_grant' });
    // Another client's token, and a token that stands for no user's grant (a client's own).
    const postClient: oauth.Client = { client_id: `${DEV_IDP_DEFAULTS.clientId}-post` };
    const postAuth = oauth.ClientSecretPost(DEV_IDP_DEFAULTS.clientSecret);
    await expect(exchange(subject, { audience: OTHER_API }, postClient, postAuth)).rejects.toMatchObject({ error: 'invalid_grant' });
    const { access_token: clientToken } = await oauth.processClientCredentialsResponse(as, postClient, await oauth.clientCredentialsGrantRequest(as, postClient, postAuth, {}, insecure));
    expect(idp.grants.clientAuth.client_credentials).toEqual({ client_secret_post: 1 });
    await expect(exchange(clientToken, { audience: OTHER_API }, postClient, postAuth)).rejects.toMatchObject({ error: 'invalid_grant' });
    // A revoked grant: the subject still verifies, but the IdP no longer stands behind it.
    await fetch(`${idp.issuer}/__dev/revoke-grants?sub=frank`, { method: 'POST' });
    await expect(exchange(subject, { audience: OTHER_API })).rejects.toMatchObject({ error: 'invalid_grant' });
    expect(idp.grants.error[TOKEN_EXCHANGE_GRANT]).toBe(7);
  });

  it('exchanges only for the audiences it is told to (unauthorized_client for the others)', async () => {
    const strict = await startDevIdp({ port: 0, appBaseUrl: rpUrl, apiAudiences: [api.audience, OTHER_API], exchangeAudiences: [OTHER_API] });
    try {
      const issuer = new URL(strict.issuer);
      const strictAs = await oauth.processDiscoveryResponse(issuer, await oauth.discoveryRequest(issuer, insecure));
      const { access_token: token } = await oauth.processClientCredentialsResponse(strictAs, client, await oauth.clientCredentialsGrantRequest(strictAs, client, clientAuth, {}, insecure));
      const res = await oauth.genericTokenEndpointRequest(strictAs, client, clientAuth, TOKEN_EXCHANGE_GRANT, { subject_token: token, subject_token_type: ACCESS_TOKEN_TYPE, audience: api.audience }, insecure);
      await expect(oauth.processGenericTokenEndpointResponse(strictAs, client, res)).rejects.toMatchObject({ error: 'unauthorized_client' });
    } finally {
      await strict.close();
    }
  });

  it('answer this machine only: not a peer on the network, nor a page whose host name was made to resolve here (DNS rebinding)', async () => {
    // The demo API has just seen a bearer token: what its introspection would hand out.
    const { access_token: token } = await oauth.processClientCredentialsResponse(as, client, await oauth.clientCredentialsGrantRequest(as, client, clientAuth, {}, insecure));
    expect((await fetch(`${api.url}/whoami`, { headers: { authorization: `Bearer ${token}` } })).status).toBe(200);
    const ask = (url: string, options: { via?: string; host?: string }) =>
      new Promise<{ status: number; body: string }>((resolve, reject) => {
        const target = new URL(url);
        const request = httpRequest({ host: options.via ?? target.hostname, port: target.port, path: target.pathname, headers: { host: options.host ?? target.host } }, (response) => {
          let body = '';
          response.setEncoding('utf8').on('data', (chunk: string) => (body += chunk));
          response.on('end', () => resolve({ status: response.statusCode ?? 0, body }));
        });
        request.on('error', reject).end();
      });
    const lan = Object.values(networkInterfaces()).flat().find((entry) => entry && !entry.internal && entry.family === 'IPv4')?.address;
    expect(lan, 'a network interface besides loopback (every CI machine has one)').toBeTruthy();
    for (const url of [`${api.url}/__demo/last`, `${idp.issuer}/.well-known/openid-configuration`]) {
      expect(await ask(url, {})).toMatchObject({ status: 200 });
      expect(await ask(url, { host: `app.localhost:${new URL(url).port}` })).toMatchObject({ status: 200 });
      for (const attempt of [{ via: lan }, { host: `evil.example:${new URL(url).port}` }, { host: 'localhost.evil.example' }]) {
        const answer = await ask(url, attempt);
        expect({ url, attempt, status: answer.status }).toEqual({ url, attempt, status: 403 });
        expect(answer.body).not.toContain(token);
      }
    }
    // The dev IdP has no WebSockets: an upgrade request is answered as an ordinary one, not left hanging.
    const upgrade = await new Promise<number>((resolve, reject) => {
      const request = httpRequest(`${idp.issuer}/.well-known/openid-configuration`, { headers: { connection: 'Upgrade', upgrade: 'websocket' }, timeout: 5_000 }, (response) => {
        response.resume();
        resolve(response.statusCode ?? 0);
      });
      request.on('upgrade', (response, socket) => {
        socket.destroy();
        resolve(response.statusCode ?? 0);
      });
      request.on('timeout', () => request.destroy(new Error('the upgrade request was left hanging')));
      request.on('error', reject).end();
    });
    expect(upgrade).toBe(200);
  });

  it('serves the demo API routes', async () => {
    const { access_token: token } = await oauth.processClientCredentialsResponse(as, client,
      await oauth.clientCredentialsGrantRequest(as, client, clientAuth, {}, insecure));
    const auth = { authorization: `Bearer ${token}` };

    const events = await fetch(`${api.url}/events?count=3&intervalMs=20`, { headers: auth });
    expect(events.headers.get('content-type')).toBe('text/event-stream');
    const data = [...(await events.text()).matchAll(/^data: (.*)$/gm)].map(([, json]) => JSON.parse(json ?? '') as { n: number });
    expect(data.map((event) => event.n)).toEqual([0, 1, 2]);

    const download = await fetch(`${api.url}/download?bytes=200000`, { headers: auth });
    expect(download.headers.get('content-length')).toBe('200000');
    expect((await download.arrayBuffer()).byteLength).toBe(200000);

    const upload = await fetch(`${api.url}/upload`, { method: 'POST', headers: auth, body: new Uint8Array(123456) });
    expect(await upload.json()).toEqual({ bytes: 123456 });

    const echo = await fetch(`${api.url}/prefix/echo/a/b`, { method: 'PATCH', headers: { ...auth, 'content-type': 'application/json' }, body: '{"k":1}' });
    expect(await echo.json()).toMatchObject({ method: 'PATCH', path: '/prefix/echo/a/b', body: { k: 1 } });

    const cookie = await fetch(`${api.url}/set-cookie`, { headers: auth });
    expect(cookie.headers.get('x-upstream')).toBe('yes');
    expect(cookie.headers.get('upgrade')).toBe('h2c');
    expect(cookie.headers.getSetCookie()[0]).toMatch(/^upstream=1/);

    const redirect = await fetch(`${api.url}/redirect`, { headers: auth, redirect: 'manual' });
    expect([redirect.status, redirect.headers.get('location')]).toEqual([302, '/echo/after-redirect']);
    expect((await fetch(`${api.url}/status/418`, { headers: auth })).status).toBe(418);
    expect(await (await fetch(`${api.url}/public/x`)).json()).toEqual({ anonymous: true });
    expect(await (await fetch(`${api.url}/public/x`, { headers: auth })).json()).toEqual({ anonymous: false, sub: client.client_id });

    const stats = async () => (await (await fetch(`${api.url}/__demo/stats`)).json()) as { requests: number; aborted: number };
    const requestsBefore = (await stats()).requests;
    const aborter = new AbortController();
    const slow = fetch(`${api.url}/slow?ms=2000`, { headers: auth, signal: aborter.signal }).catch(() => 'aborted');
    await waitFor('the slow request to arrive', async () => ((await stats()).requests > requestsBefore ? true : undefined), 2_000, 10);
    aborter.abort();
    expect(await slow).toBe('aborted');
    await waitFor('the abort to be recorded', async () => ((await stats()).aborted === 1 ? true : undefined), 2_000, 10);
    expect((await (await fetch(`${api.url}/__demo/last`)).json()).path).toBe('/slow');
  });

  it('survives a stop/resume of the IdP with its state', async () => {
    const tokens = await codeFlow('carol');
    await idp.stop();
    await expect(fetch(`${idp.issuer}/jwks`)).rejects.toThrow();
    await idp.resume();
    expect((await refresh(tokens.refresh_token ?? '')).refresh_token).toBeTruthy();
  });

  it('logs into a relying party headlessly and returns its cookies', async () => {
    const { rpCookies, finalUrl, callbackStatus } = await loginThroughRp({ startUrl: `${rpUrl}/api/auth/login`, username: 'dave' });
    expect(callbackStatus).toBe(302);
    expect(finalUrl).toBe(`${rpUrl}/`);
    expect(rpCookies.get('session')).toBe('dave');
    expect(rpCookies.has('txn')).toBe(false);
  });

  it('confirms RP-initiated logout headlessly and sends a back-channel logout token', async () => {
    const { jars } = await loginThroughRp({ startUrl: `${rpUrl}/api/auth/login`, username: 'erin' });
    const endSession = new URL(as.end_session_endpoint ?? '');
    endSession.search = new URLSearchParams({ client_id: client.client_id, post_logout_redirect_uri: `${rpUrl}/` }).toString();
    backchannelLogouts.length = 0;
    expect((await confirmDevIdpLogout({ endSessionUrl: endSession, jars })).href).toBe(`${rpUrl}/`);
    expect(backchannelLogouts).toHaveLength(1);
    expect(decodeJwt(backchannelLogouts[0] ?? '')).toMatchObject({ sub: 'erin', aud: client.client_id, sid: expect.any(String) });
  });
});
