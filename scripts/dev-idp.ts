// Development-only OpenID Provider for the zero-config demo, the end-to-end tests and the benchmarks.
// Never deploy this: any username/password signs in and all state lives in process memory.
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import { SignJWT, calculateJwkThumbprint, exportJWK, generateKeyPair, importJWK } from 'jose';
import type { JWK, JWTPayload } from 'jose';
import Provider, { errors } from 'oidc-provider';
import type { Adapter, AdapterPayload, ClientAuthMethod, ClientMetadata, Configuration, KoaContextWithOIDC } from 'oidc-provider';
import { listen, runUntilSignal } from './cli.ts';

export interface DevIdpOptions {
  /** 0 picks a free port; the issuer then uses the real one. */
  port?: number;
  /** Listen address; by default every interface so both 127.0.0.1 and ::1 reach "localhost". */
  host?: string;
  /**
   * The issuer's host name. Tests use `127.0.0.1` with an app on `localhost`: two sites, so
   * SameSite=Strict cookies behave in the browser as they do with a real IdP elsewhere.
   */
  issuerHost?: string;
  clientId?: string;
  clientSecret?: string;
  /** Several base URLs let tests run more than one app instance against the same client. */
  appBaseUrl?: string | string[];
  tokenEndpointAuthMethod?: 'client_secret_basic' | 'client_secret_post';
  /** A second client (same secret and URLs) authenticating with client_secret_post; null disables it. */
  postClientId?: string | null;
  /** Public JWK of a third client, `${clientId}-pkjwt`, that authenticates with private_key_jwt. */
  privateKeyJwtPublicJwk?: JWK;
  accessTokenTtl?: number;
  refreshTokenTtl?: number;
  apiAudiences?: string[];
  apiScope?: string;
  /** Accounts whose name starts with this get no refresh token (sessions that cannot refresh). */
  noRefreshTokenPrefix?: string;
  /** Reuse the store and cookie keys of an earlier (closed) instance to simulate an IdP restart. */
  state?: DevIdpState;
  /**
   * Pushed authorization requests (RFC 9126). `enabled` (the default, as in oidc-provider) publishes
   * the endpoint; `required` refuses every authorization request that was not pushed and says so in
   * discovery; `required-per-client` refuses them too, through each client's registration
   * (`require_pushed_authorization_requests`), which discovery does not show; `disabled` publishes
   * no endpoint.
   */
  par?: DevIdpPar;
  /** DPoP (RFC 9449): require a server nonce in every proof from the start (also switchable at /__dev/dpop). */
  dpopRequireNonce?: boolean;
}

export const DEV_IDP_PAR_MODES = ['disabled', 'enabled', 'required', 'required-per-client'] as const;
export type DevIdpPar = (typeof DEV_IDP_PAR_MODES)[number];

export interface DevIdpState {
  readonly store: Map<string, StoredEntry>;
  readonly cookieKeys: string[];
}

export interface GrantCounters {
  success: Record<string, number>;
  error: Record<string, number>;
  errorCodes: Record<string, number>;
  byAccount: Record<string, Record<string, number>>;
  bySid: Record<string, Record<string, number>>;
  /** When each successful refresh_token grant happened (epoch ms), per IdP session: a load test's proof of one grant per expiry. */
  refreshTimesBySid: Record<string, number[]>;
  /** Grants revoked through the revocation endpoint (RFC 7009), per account. */
  revocations: Record<string, number>;
  /**
   * DPoP bindings of successful grants, per account, in order: the `dpop_jkt` the authorization
   * request named (code exchanges) and the thumbprint the issued access token is bound to (`cnf.jkt`).
   */
  dpop: Record<string, Array<{ grantType: string; dpopJkt?: string; jkt?: string }>>;
}

/** Test switches for DPoP, at /__dev/dpop. */
export interface DevIdpDpop {
  /** Every proof must carry a nonce of the IdP's (`use_dpop_nonce` otherwise). */
  requireNonce: boolean;
  /**
   * Behave as an IdP without DPoP: proofs (the `DPoP` header) and `dpop_jkt` in the query of an
   * authorization request never reach the provider, so it issues bearer tokens.
   */
  ignoreProofs: boolean;
}

/** Test-only slowness: requests to discovery or the token endpoint wait this long before the provider sees them. */
export interface IdpDelays {
  discoveryMs: number;
  tokenMs: number;
}

export interface DevIdpHandle {
  issuer: string;
  port: number;
  provider: Provider;
  state: DevIdpState;
  /** Live counters of token endpoint outcomes, also served at GET /__dev/grants. */
  readonly grants: GrantCounters;
  resetGrants(): void;
  /** Revokes every grant (and so every refresh token) of an account; resolves to how many grants. */
  revokeGrants(accountId: string): Promise<number>;
  /** Closes the listener but keeps the provider and its state: pair with resume() to simulate an outage. */
  stop(): Promise<void>;
  resume(): Promise<void>;
  close(): Promise<void>;
}

export interface StoredEntry {
  payload: AdapterPayload;
  expiresAt: number;
}

export const DEV_IDP_DEFAULTS = {
  port: 4000,
  clientId: 'gatehouse-dev',
  clientSecret: 'dev-only-secret-gatehouse-0123456789abcdef',
  appBaseUrl: 'http://localhost:3000',
  accessTokenTtl: 300,
  refreshTokenTtl: 24 * 60 * 60,
  apiAudiences: ['http://localhost:4001'],
  apiScope: 'api:read api:write',
} as const;

/** Endpoints a test can make fail for a while: /__dev/token-fault, /__dev/par-fault. */
const FAULTY_ENDPOINTS = ['token', 'par'] as const;
type FaultyEndpoint = (typeof FAULTY_ENDPOINTS)[number];
const FAULT_PATHS: Record<FaultyEndpoint, string> = { token: '/token', par: '/request' };

const GRANT_BOUND_MODELS = new Set(['AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode', 'BackchannelAuthenticationRequest']);

// One key set per process: restarts within a test keep tokens verifiable, nothing ever lands on disk.
// Thumbprint kids differ between processes, so verifiers notice a restarted CLI and refetch the JWKS.
let processKeys: Promise<JWK[]> | undefined;
function signingKeys(): Promise<JWK[]> {
  processKeys ??= Promise.all(
    (['RS256', 'ES256'] as const).map(async (alg) => {
      const { privateKey } = await generateKeyPair(alg, { extractable: true });
      const jwk = await exportJWK(privateKey);
      return { ...jwk, alg, use: 'sig', kid: await calculateJwkThumbprint(jwk) };
    }),
  );
  return processKeys;
}

export function createDevIdpState(): DevIdpState {
  return { store: new Map(), cookieKeys: [randomBytes(32).toString('base64url')] };
}

// oidc-provider's bundled memory adapter is an LRU capped at 1000 entries (benchmarks exceed that) and
// cannot list grants by account, which /__dev/revoke-grants needs.
function mapAdapter(store: Map<string, StoredEntry>) {
  const live = (key: string): StoredEntry | undefined => {
    const entry = store.get(key);
    if (entry && entry.expiresAt <= Date.now()) {
      store.delete(key);
      return undefined;
    }
    return entry;
  };
  let writes = 0;
  return (model: string): Adapter => ({
    async upsert(id, payload, expiresIn) {
      store.set(`${model}:${id}`, { payload, expiresAt: expiresIn ? Date.now() + expiresIn * 1000 : Infinity });
      if (++writes % 1000 === 0) for (const key of store.keys()) live(key);
    },
    async find(id) {
      return live(`${model}:${id}`)?.payload;
    },
    async findByUid(uid) {
      for (const [key, entry] of store) {
        if (key.startsWith(`${model}:`) && entry.payload.uid === uid) return live(key)?.payload;
      }
      return undefined;
    },
    async findByUserCode(userCode) {
      for (const [key, entry] of store) {
        if (key.startsWith(`${model}:`) && entry.payload.userCode === userCode) return live(key)?.payload;
      }
      return undefined;
    },
    async consume(id) {
      const entry = live(`${model}:${id}`);
      if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
    },
    async destroy(id) {
      store.delete(`${model}:${id}`);
    },
    async revokeByGrantId(grantId) {
      for (const [key, entry] of store) {
        if (key.startsWith(`${model}:`) && entry.payload.grantId === grantId) store.delete(key);
      }
    },
  });
}

function displayName(accountId: string): string {
  const first = accountId.split(/[@._-]/)[0] || accountId;
  return `${first.charAt(0).toUpperCase()}${first.slice(1)} Example`;
}

function emptyCounters(): GrantCounters {
  return { success: {}, error: {}, errorCodes: {}, byAccount: {}, bySid: {}, refreshTimesBySid: {}, revocations: {}, dpop: {} };
}

function bump(table: Record<string, number>, key: string): void {
  table[key] = (table[key] ?? 0) + 1;
}

function shutdown(server: Server): Promise<void> {
  return new Promise((resolve) => {
    if (!server.listening) return resolve();
    server.close(() => resolve());
    // Keep-alive sockets would otherwise keep serving, which defeats simulating an outage.
    server.closeAllConnections();
  });
}

export async function startDevIdp(options: DevIdpOptions = {}): Promise<DevIdpHandle> {
  if (process.env.NODE_ENV === 'production') {
    throw new Error('dev IdP refuses to start with NODE_ENV=production: it signs anyone in with any password');
  }
  const clientId = options.clientId ?? DEV_IDP_DEFAULTS.clientId;
  const clientSecret = options.clientSecret ?? DEV_IDP_DEFAULTS.clientSecret;
  const appBaseUrls = [options.appBaseUrl ?? DEV_IDP_DEFAULTS.appBaseUrl].flat().map((url) => url.replace(/\/+$/, ''));
  const accessTokenTtl = options.accessTokenTtl ?? DEV_IDP_DEFAULTS.accessTokenTtl;
  const refreshTokenTtl = options.refreshTokenTtl ?? DEV_IDP_DEFAULTS.refreshTokenTtl;
  const audiences = options.apiAudiences ?? [...DEV_IDP_DEFAULTS.apiAudiences];
  const apiScope = options.apiScope ?? DEV_IDP_DEFAULTS.apiScope;
  const postClientId = options.postClientId === undefined ? `${clientId}-post` : options.postClientId;
  const state = options.state ?? createDevIdpState();
  const firstApp = appBaseUrls[0];
  if (!firstApp) throw new Error('dev IdP needs at least one appBaseUrl');

  const keys = await signingKeys();
  let counters = emptyCounters();
  /** Test-only: the next `remaining` requests to an endpoint get this answer (rate limiting, outages). */
  const faults: Partial<Record<FaultyEndpoint, { status: number; retryAfter: string | undefined; remaining: number }>> = {};
  const delays: IdpDelays = { discoveryMs: 0, tokenMs: 0 };
  const dpop: DevIdpDpop = { requireNonce: options.dpopRequireNonce ?? false, ignoreProofs: false };
  const delayed = { discovery: 0, token: 0 };
  // The issuer embeds the real port, so the provider only exists once the listener is bound.
  const providerSlot: { handler?: (req: IncomingMessage, res: ServerResponse) => unknown } = {};
  const server = createServer((req, res) => {
    const endpoint = req.method === 'POST' ? FAULTY_ENDPOINTS.find((name) => req.url?.startsWith(FAULT_PATHS[name])) : undefined;
    const fault = endpoint && faults[endpoint];
    if (fault && fault.remaining > 0) {
      fault.remaining--;
      req.resume();
      // With a token delay set, a token fault comes as late as an answer would: an IdP failing slowly.
      const answer = () => {
        res.writeHead(fault.status, { 'content-type': 'text/plain', ...(fault.retryAfter ? { 'retry-after': fault.retryAfter } : {}) });
        res.end(`fault injected by /__dev/${endpoint}-fault`);
      };
      if (endpoint === 'token' && delays.tokenMs > 0) {
        delayed.token++;
        setTimeout(answer, delays.tokenMs);
      } else answer();
      return;
    }
    if (dpop.ignoreProofs) withoutDpop(req);
    if (req.url?.startsWith('/__dev/')) {
      devRoute(req, res).catch((err: unknown) => sendJson(res, 500, { error: String(err) }));
    } else if (providerSlot.handler) {
      withoutWebFonts(res);
      const handler = providerSlot.handler;
      const delayMs = delayFor(req);
      if (delayMs > 0) setTimeout(() => handler(req, res), delayMs);
      else handler(req, res);
    } else {
      sendJson(res, 503, { error: 'starting' });
    }
  });

  // A slow IdP, for tests: the request reaches the provider late, and is then handled in full.
  function delayFor(req: IncomingMessage): number {
    const path = req.url?.split('?')[0];
    if (path === '/.well-known/openid-configuration' && delays.discoveryMs > 0) {
      delayed.discovery++;
      return delays.discoveryMs;
    }
    if (path === '/token' && req.method === 'POST' && delays.tokenMs > 0) {
      delayed.token++;
      return delays.tokenMs;
    }
    return 0;
  }
  const port = await listen(server, options.port ?? DEV_IDP_DEFAULTS.port, options.host);
  const issuer = `http://${options.issuerHost ?? 'localhost'}:${port}`;
  const par = options.par ?? 'enabled';

  const client = (id: string, method: ClientAuthMethod, extra: Partial<ClientMetadata> = {}): ClientMetadata => ({
    ...extra,
    client_id: id,
    ...(method === 'private_key_jwt' ? {} : { client_secret: clientSecret }),
    redirect_uris: appBaseUrls.map((url) => `${url}/api/auth/callback`),
    post_logout_redirect_uris: appBaseUrls.map((url) => `${url}/`),
    // Only one URI is possible per client: app instances sharing a session store only need one notice.
    backchannel_logout_uri: `${firstApp}/api/auth/backchannel-logout`,
    backchannel_logout_session_required: true,
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    response_types: ['code'],
    token_endpoint_auth_method: method,
    ...(par === 'required-per-client' ? { require_pushed_authorization_requests: true } : {}),
  });

  const configuration: Configuration = {
    adapter: mapAdapter(state.store),
    clients: [
      client(clientId, options.tokenEndpointAuthMethod ?? 'client_secret_basic'),
      ...(postClientId ? [client(postClientId, 'client_secret_post')] : []),
      ...(options.privateKeyJwtPublicJwk
        ? [client(`${clientId}-pkjwt`, 'private_key_jwt', { jwks: { keys: [options.privateKeyJwtPublicJwk] }, token_endpoint_auth_signing_alg: 'ES256' })]
        : []),
    ],
    jwks: { keys },
    cookies: { keys: state.cookieKeys },
    responseTypes: ['code'],
    scopes: ['openid', 'offline_access', 'profile', 'email'],
    claims: { openid: ['sub'], profile: ['name', 'preferred_username'], email: ['email', 'email_verified'] },
    // Access tokens are minted for the APIs (aud != userinfo), so the BFF reads the profile from the ID token.
    conformIdTokenClaims: false,
    findAccount: (_ctx, accountId) => ({
      accountId,
      claims: () => ({
        sub: accountId,
        name: displayName(accountId),
        preferred_username: accountId,
        email: accountId.includes('@') ? accountId : `${accountId}@example.test`,
        email_verified: true,
      }),
    }),
    // oidc-provider's SSRF guard refuses loopback addresses, but the back-channel logout target of the
    // demo is localhost: drop its dispatcher (only for outgoing calls of this dev IdP).
    fetch: (input, init) => {
      const { dispatcher: _guard, ...rest } = (init ?? {}) as RequestInit & { dispatcher?: unknown };
      return fetch(input, rest);
    },
    pkce: { required: () => true },
    rotateRefreshToken: true,
    issueRefreshToken: (_ctx, c, source) =>
      c.grantTypeAllowed('refresh_token') && !(options.noRefreshTokenPrefix && source.accountId?.startsWith(options.noRefreshTokenPrefix)),
    // A first-party client: record consent for whatever was asked so users only ever see the login form.
    loadExistingGrant: async (ctx) => {
      const { oidc } = ctx;
      if (!oidc.session || !oidc.client || !oidc.session.accountId) return undefined;
      const grantId = oidc.result?.consent?.grantId ?? oidc.session.grantIdFor(oidc.client.clientId);
      const grant = (grantId ? await oidc.provider.Grant.find(grantId) : undefined)
        ?? new oidc.provider.Grant({ clientId: oidc.client.clientId, accountId: oidc.session.accountId });
      grant.addOIDCScope([...oidc.requestParamOIDCScopes].join(' '));
      for (const [indicator, resourceServer] of Object.entries(oidc.resourceServers ?? {})) {
        grant.addResourceScope(indicator, resourceServer.scope);
      }
      await grant.save();
      return grant;
    },
    ttl: {
      AuthorizationCode: 60,
      IdToken: 3600,
      Interaction: 600,
      AccessToken: accessTokenTtl,
      ClientCredentials: accessTokenTtl,
      RefreshToken: refreshTokenTtl,
      Grant: refreshTokenTtl,
      Session: refreshTokenTtl,
    },
    features: {
      devInteractions: { enabled: true },
      revocation: { enabled: true },
      pushedAuthorizationRequests: { enabled: par !== 'disabled', requirePushedAuthorizationRequests: par === 'required' },
      // Nonces come from a secret of this process; whether a proof must carry one is the test's switch.
      dPoP: { enabled: true, nonceSecret: randomBytes(32), requireNonce: () => dpop.requireNonce },
      clientCredentials: { enabled: true },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // Authorization requests get every API so a later refresh may target any of them with `resource`;
        // when one must be picked (token endpoint), the first configured API wins.
        defaultResource: (ctx, _client, oneOf) => {
          if (oneOf) return audiences.find((aud) => oneOf.includes(aud)) ?? oneOf[0];
          return ctx.oidc.route === 'token' ? audiences[0] : audiences;
        },
        // Without this the code exchange (openid scope, no `resource`) would yield an opaque userinfo token.
        useGrantedResource: () => true,
        getResourceServerInfo: (_ctx, indicator) => {
          if (!audiences.includes(indicator)) throw new errors.InvalidTarget();
          return { scope: apiScope, audience: indicator, accessTokenTTL: accessTokenTtl, accessTokenFormat: 'jwt' };
        },
      },
    },
  };

  let provider: Provider;
  try {
    provider = new Provider(issuer, configuration);
  } catch (err) {
    await shutdown(server);
    throw err;
  }
  providerSlot.handler = provider.callback();
  const tally = (ctx: KoaContextWithOIDC, outcome: 'success' | 'error', code?: string) => {
    const grantType = String(ctx.oidc.params?.grant_type ?? 'unknown');
    bump(counters[outcome], grantType);
    if (code) bump(counters.errorCodes, code);
    if (outcome !== 'success') return;
    const { Account, RefreshToken, AuthorizationCode } = ctx.oidc.entities;
    if (Account) bump((counters.byAccount[Account.accountId] ??= {}), grantType);
    const sid = RefreshToken?.sid ?? AuthorizationCode?.sid;
    if (sid) bump((counters.bySid[sid] ??= {}), grantType);
    if (sid && grantType === 'refresh_token') (counters.refreshTimesBySid[sid] ??= []).push(Date.now());
    const { AccessToken } = ctx.oidc.entities;
    const binding = { dpopJkt: AuthorizationCode?.dpopJkt, jkt: AccessToken?.jkt };
    if (Account && (binding.dpopJkt || binding.jkt)) (counters.dpop[Account.accountId] ??= []).push({ grantType, ...binding });
  };
  provider.on('grant.success', (ctx) => tally(ctx, 'success'));
  provider.on('grant.error', (ctx, err) => tally(ctx, 'error', err.error));
  provider.on('grant.revoked', (ctx) => {
    // Replay detection at the token endpoint revokes grants too; only RFC 7009 revocations count here.
    if (ctx.oidc.route !== 'revocation') return;
    const { RefreshToken, AccessToken } = ctx.oidc.entities;
    bump(counters.revocations, RefreshToken?.accountId ?? AccessToken?.accountId ?? 'unknown');
  });

  async function revokeGrants(accountId: string): Promise<number> {
    const grantIds = [...state.store]
      .filter(([key, entry]) => key.startsWith('Grant:') && entry.payload.accountId === accountId)
      .map(([key]) => key.slice('Grant:'.length));
    for (const grantId of grantIds) {
      state.store.delete(`Grant:${grantId}`);
      for (const [key, entry] of state.store) {
        const model = key.slice(0, key.indexOf(':'));
        if (GRANT_BOUND_MODELS.has(model) && entry.payload.grantId === grantId) state.store.delete(key);
      }
    }
    return grantIds.length;
  }

  async function devRoute(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', issuer);
    if (req.method === 'GET' && url.pathname === '/__dev/grants') return sendJson(res, 200, counters);
    if (req.method === 'POST' && url.pathname === '/__dev/grants/reset') {
      counters = emptyCounters();
      return sendJson(res, 200, counters);
    }
    if (url.pathname === '/__dev/dpop') {
      if (req.method === 'POST') Object.assign(dpop, await readDpopSwitches(req));
      return sendJson(res, 200, dpop);
    }
    if (url.pathname === '/__dev/delays') {
      if (req.method === 'POST') Object.assign(delays, await readDelays(req));
      return sendJson(res, 200, { ...delays, delayed });
    }
    if (req.method === 'POST' && url.pathname === '/__dev/sign') {
      // Test-only: signs any claims with the IdP's own RS256 key, so tests can forge logout tokens
      // that pass the signature check and fail exactly the check under test.
      const chunks: Buffer[] = [];
      for await (const chunk of req) chunks.push(chunk as Buffer);
      const { payload, header } = JSON.parse(Buffer.concat(chunks).toString()) as { payload: JWTPayload; header?: Record<string, unknown> };
      const rsa = keys.find((key) => key.alg === 'RS256') as JWK;
      // JSON has no undefined: a header member set to null is left out (e.g. a token with no typ).
      const protectedHeader = Object.fromEntries(Object.entries({ alg: 'RS256', kid: rsa.kid, typ: 'logout+jwt', ...header }).filter(([, value]) => value !== null));
      const jws = await new SignJWT(payload)
        .setProtectedHeader(protectedHeader as { alg: string })
        .sign(await importJWK(rsa, 'RS256'));
      return sendJson(res, 200, { jws });
    }
    const faulty = FAULTY_ENDPOINTS.find((name) => url.pathname === `/__dev/${name}-fault`);
    if (req.method === 'POST' && faulty) {
      const status = Number(url.searchParams.get('status') ?? 429);
      const remaining = Number(url.searchParams.get('count') ?? 1);
      if (!Number.isInteger(status) || status < 400 || status > 599 || !Number.isInteger(remaining)) return sendJson(res, 400, { error: 'status 400-599, integer count' });
      const fault = { status, retryAfter: url.searchParams.get('retryAfter') ?? undefined, remaining };
      faults[faulty] = fault;
      return sendJson(res, 200, fault);
    }
    if (req.method === 'POST' && url.pathname === '/__dev/revoke-grants') {
      const sub = url.searchParams.get('sub');
      if (!sub) return sendJson(res, 400, { error: 'sub query parameter required' });
      return sendJson(res, 200, { sub, revoked: await revokeGrants(sub) });
    }
    sendJson(res, 404, { error: 'not_found' });
  }

  let closed = false;
  return {
    issuer,
    port,
    provider,
    state,
    get grants() {
      return counters;
    },
    resetGrants() {
      counters = emptyCounters();
    },
    revokeGrants,
    stop: () => shutdown(server),
    async resume() {
      if (closed) throw new Error('dev IdP was closed; start a new one with { state } instead');
      if (!server.listening) await listen(server, port, options.host);
    },
    async close() {
      closed = true;
      await shutdown(server);
    },
  };
}

/**
 * oidc-provider's built-in pages @import a web font from Google: the demo must work offline and
 * should not tell a third party who opens it. The import is blanked with spaces of the same
 * length, so the Content-Length oidc-provider already set stays right.
 */
const WEB_FONT_IMPORT = /@import url\(https:\/\/fonts\.googleapis\.com\/[^)]*\);/g;

function withoutWebFonts(res: ServerResponse): void {
  const end = res.end.bind(res) as (...args: unknown[]) => ServerResponse;
  res.end = ((chunk?: unknown, ...rest: unknown[]) => {
    const html = String(res.getHeader('content-type') ?? '').startsWith('text/html');
    if (html && (typeof chunk === 'string' || Buffer.isBuffer(chunk))) {
      const text = Buffer.isBuffer(chunk) ? chunk.toString('utf8') : chunk;
      const blanked = text.replace(WEB_FONT_IMPORT, (match) => ' '.repeat(Buffer.byteLength(match)));
      return end(Buffer.isBuffer(chunk) ? Buffer.from(blanked, 'utf8') : blanked, ...rest);
    }
    return end(chunk, ...rest);
  }) as ServerResponse['end'];
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString() || '{}') as Record<string, unknown>;
}

async function readDelays(req: IncomingMessage): Promise<Partial<IdpDelays>> {
  const body = await readJson(req);
  const picked: Partial<IdpDelays> = {};
  for (const name of ['discoveryMs', 'tokenMs'] as const) {
    const value = body[name];
    if (value === undefined) continue;
    if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > 60_000) throw new Error(`${name} must be an integer from 0 to 60000`);
    picked[name] = value;
  }
  return picked;
}

async function readDpopSwitches(req: IncomingMessage): Promise<Partial<DevIdpDpop>> {
  const body = await readJson(req);
  const picked: Partial<DevIdpDpop> = {};
  for (const name of ['requireNonce', 'ignoreProofs'] as const) {
    const value = body[name];
    if (value === undefined) continue;
    if (typeof value !== 'boolean') throw new Error(`${name} must be true or false`);
    picked[name] = value;
  }
  return picked;
}

/** An IdP without DPoP, as far as the provider can tell: no proof header, no `dpop_jkt` in an authorization URL. */
function withoutDpop(req: IncomingMessage): void {
  delete req.headers.dpop;
  if (!req.url?.includes('dpop_jkt')) return;
  const url = new URL(req.url, 'http://idp.invalid');
  url.searchParams.delete('dpop_jkt');
  req.url = `${url.pathname}${url.search}`;
}

function intFromEnv(name: string): number | undefined {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return undefined;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) throw new Error(`${name} must be a non-negative integer, got "${raw}"`);
  return value;
}

/** IDP_PAR for the CLI, and for `npm run dev` (scripts/dev.ts). */
export function parFromEnv(name = 'IDP_PAR'): DevIdpPar | undefined {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return undefined;
  if (!(DEV_IDP_PAR_MODES as readonly string[]).includes(raw)) throw new Error(`${name} must be one of ${DEV_IDP_PAR_MODES.join(', ')}, got "${raw}"`);
  return raw as DevIdpPar;
}

function listFromEnv(name: string): string[] | undefined {
  const list = process.env[name]?.split(',').map((item) => item.trim()).filter(Boolean);
  return list?.length ? list : undefined;
}

if (import.meta.main) {
  await runUntilSignal(
    () =>
      startDevIdp({
        port: intFromEnv('IDP_PORT'),
        host: process.env.IDP_HOST || undefined,
        issuerHost: process.env.IDP_ISSUER_HOST || undefined,
        clientId: process.env.IDP_CLIENT_ID || undefined,
        clientSecret: process.env.IDP_CLIENT_SECRET || undefined,
        appBaseUrl: listFromEnv('IDP_APP_BASE_URLS'),
        tokenEndpointAuthMethod: process.env.IDP_TOKEN_AUTH_METHOD === 'client_secret_post' ? 'client_secret_post' : undefined,
        accessTokenTtl: intFromEnv('IDP_ACCESS_TOKEN_TTL'),
        refreshTokenTtl: intFromEnv('IDP_REFRESH_TOKEN_TTL'),
        apiAudiences: listFromEnv('IDP_API_AUDIENCES'),
        noRefreshTokenPrefix: process.env.IDP_NO_REFRESH_TOKEN_PREFIX || undefined,
        privateKeyJwtPublicJwk: process.env.IDP_PKJWT_PUBLIC_JWK ? (JSON.parse(process.env.IDP_PKJWT_PUBLIC_JWK) as JWK) : undefined,
        par: parFromEnv(),
        dpopRequireNonce: process.env.IDP_DPOP_NONCE === 'required',
      }),
    (idp) => `dev IdP listening on ${idp.issuer}`,
  );
}
