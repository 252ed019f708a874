// Development-only OpenID Provider for the zero-config demo, the end-to-end tests and the benchmarks.
// Never deploy this: any username/password signs in and all state lives in process memory.
import { createHash, createPublicKey, randomBytes, type JsonWebKey as NodeJwk } from 'node:crypto';
import { createServer } from 'node:http';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import { SignJWT, calculateJwkThumbprint, createLocalJWKSet, exportJWK, generateKeyPair, importJWK, jwtVerify } from 'jose';
import type { JWK, JWTPayload } from 'jose';
import Provider, { errors, interactionPolicy } from 'oidc-provider';
import type { Adapter, AdapterPayload, ClientAuthMethod, ClientMetadata, Configuration, FindAccount, InteractionResults, KoaContextWithOIDC, TokenEndpointGrantContext } from 'oidc-provider';
import { listen, readBodyUpTo, runUntilSignal } from './cli.ts';

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
  /**
   * The audiences a client may obtain by token exchange (RFC 8693); by default every API audience.
   * An API audience not listed is refused with unauthorized_client.
   */
  exchangeAudiences?: string[];
  /** Lifetime of exchanged access tokens, seconds; by default `accessTokenTtl`. */
  exchangedTokenTtl?: number;
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
  /** A broken IdP, for tests: publish this as `end_session_endpoint`, whatever it is, and run no RP-initiated logout. */
  endSessionEndpoint?: string;
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
  /** Which refresh token each of those revocations named, per account, as `revokedTokenDigest` of it: proof the right one was given back. */
  revokedRefreshTokens: Record<string, string[]>;
  /** Each account's last successful grant types in order (at most 20): proof that a refresh came before the exchange that needed it. */
  orderByAccount: Record<string, string[]>;
  /**
   * Successful grants per grant type and the client authentication they came with. oidc-provider
   * takes client_secret_basic and client_secret_post alike from a client registered for either, so
   * only this shows which one a client really used.
   */
  clientAuth: Record<string, Record<string, number>>;
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

/**
 * The dev IdP's Authentication Context Classes: a sign-in with a password, and one with a second
 * factor as well (any 6-digit code, shown only when a login asks for it with `acr_values`).
 */
export const DEV_IDP_ACR = { password: 'urn:gatehouse:pwd', mfa: 'urn:gatehouse:mfa' } as const;

/** Endpoints a test can make fail for a while: /__dev/token-fault, /__dev/par-fault (`?status=&count=&retryAfter=&error=&stall=1`). */
const FAULTY_ENDPOINTS = ['token', 'par'] as const;
type FaultyEndpoint = (typeof FAULTY_ENDPOINTS)[number];
const FAULT_PATHS: Record<FaultyEndpoint, string> = { token: '/token', par: '/request' };

/** RFC 8693: the grant type, and the one token type this IdP exchanges (and issues) by it. */
export const TOKEN_EXCHANGE_GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';
const GRANT_ORDER_KEPT = 20;

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

/** A refresh token's name in the counters: tests compare it with the one they read, no token is served. */
export function revokedTokenDigest(token: string): string {
  return createHash('sha256').update(token).digest('base64url').slice(0, 16);
}

function emptyCounters(): GrantCounters {
  return { success: {}, error: {}, errorCodes: {}, byAccount: {}, bySid: {}, refreshTimesBySid: {}, revocations: {}, revokedRefreshTokens: {}, orderByAccount: {}, clientAuth: {}, dpop: {} };
}


/** The client authentication a token request came with (this IdP registers no client_secret_jwt client). */
function clientAuthUsed(ctx: KoaContextWithOIDC): string {
  if (/^basic /i.test(ctx.headers.authorization ?? '')) return 'client_secret_basic';
  if (ctx.oidc.params?.client_assertion) return 'private_key_jwt';
  if (ctx.oidc.params?.client_secret) return 'client_secret_post';
  return 'none';
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
  const exchangeAudiences = options.exchangeAudiences ?? audiences;
  const exchangedTokenTtl = options.exchangedTokenTtl ?? accessTokenTtl;
  const postClientId = options.postClientId === undefined ? `${clientId}-post` : options.postClientId;
  const state = options.state ?? createDevIdpState();
  const firstApp = appBaseUrls[0];
  if (!firstApp) throw new Error('dev IdP needs at least one appBaseUrl');

  const keys = await signingKeys();
  let counters = emptyCounters();
  /** Test-only: the next `remaining` requests to an endpoint get this answer (rate limiting, outages). */
  const faults: Partial<Record<FaultyEndpoint, { status: number; retryAfter: string | undefined; error: string | undefined; stall: boolean; remaining: number }>> = {};
  const delays: IdpDelays = { discoveryMs: 0, tokenMs: 0 };
  const dpop: DevIdpDpop = { requireNonce: options.dpopRequireNonce ?? false, ignoreProofs: false };
  const delayed = { discovery: 0, token: 0 };
  // The issuer embeds the real port, so the provider only exists once the listener is bound.
  const providerSlot: {
    handler?: (req: IncomingMessage, res: ServerResponse) => unknown;
    /** The sign-in page: true when it answered, false when the interaction is not a login (consent goes to devInteractions). */
    login?: (req: IncomingMessage, res: ServerResponse) => Promise<boolean>;
  } = {};
  const server = createServer((req, res) => {
    const endpoint = req.method === 'POST' ? FAULTY_ENDPOINTS.find((name) => req.url?.startsWith(FAULT_PATHS[name])) : undefined;
    const fault = endpoint && faults[endpoint];
    if (fault && fault.remaining > 0) {
      fault.remaining--;
      req.resume();
      // With a token delay set, a token fault comes as late as an answer would: an IdP failing slowly.
      // With an OAuth error code, the answer is that error as an IdP's JSON (an invalid_grant where none is due).
      // Stalled: a 200 whose JSON body stops after its first bytes (until the client gives up, or 30 s).
      const answer = () => {
        if (fault.stall) {
          res.writeHead(200, { 'content-type': 'application/json' });
          res.write('{"access_token":');
          const giveUp = setTimeout(() => res.destroy(), 30_000);
          res.once('close', () => clearTimeout(giveUp));
          return;
        }
        res.writeHead(fault.status, { 'content-type': fault.error ? 'application/json' : 'text/plain', ...(fault.retryAfter ? { 'retry-after': fault.retryAfter } : {}) });
        res.end(fault.error ? JSON.stringify({ error: fault.error, error_description: `fault injected by /__dev/${endpoint}-fault` }) : `fault injected by /__dev/${endpoint}-fault`);
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
    } else if (providerSlot.handler && providerSlot.login && INTERACTION_PATH.test(req.url ?? '') && (req.method === 'GET' || req.method === 'POST')) {
      const { handler, login } = providerSlot;
      login(req, res)
        .then((handled) => {
          if (!handled) handler(req, res);
        })
        .catch((err: unknown) => sendHtml(res, 500, `<p>${escapeHtml(String(err))}</p>`));
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
  const port = await listen(server, options.port ?? DEV_IDP_DEFAULTS.port, options.host, options.issuerHost ? [options.issuerHost] : []);
  const issuer = `http://${options.issuerHost ?? 'localhost'}:${port}`;
  const par = options.par ?? 'enabled';

  const client = (id: string, method: ClientAuthMethod, extra: Partial<ClientMetadata> = {}): ClientMetadata => ({
    client_id: id,
    ...(method === 'private_key_jwt' ? {} : { client_secret: clientSecret }),
    redirect_uris: appBaseUrls.map((url) => `${url}/api/auth/callback`),
    post_logout_redirect_uris: appBaseUrls.map((url) => `${url}/`),
    // Only one URI is possible per client: app instances sharing a session store only need one notice.
    backchannel_logout_uri: `${firstApp}/api/auth/backchannel-logout`,
    backchannel_logout_session_required: true,
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials', TOKEN_EXCHANGE_GRANT],
    response_types: ['code'],
    token_endpoint_auth_method: method,
    // Every id_token says how and when the user signed in (acr, auth_time), as Keycloak's do; a
    // login's own acr_values replace the default (OIDC Dynamic Client Registration, section 2).
    default_acr_values: [DEV_IDP_ACR.password],
    require_auth_time: true,
    ...(par === 'required-per-client' ? { require_pushed_authorization_requests: true } : {}),
    ...extra,
  });

  const findAccount: FindAccount = (_ctx, accountId) => ({
    accountId,
    claims: () => ({
      sub: accountId,
      name: displayName(accountId),
      preferred_username: accountId,
      email: accountId.includes('@') ? accountId : `${accountId}@example.test`,
      email_verified: true,
    }),
  });

  const configuration: Configuration = {
    adapter: mapAdapter(state.store),
    clients: [
      client(clientId, options.tokenEndpointAuthMethod ?? 'client_secret_basic'),
      // As some IdPs' do, its id_tokens say when the user signed in (auth_time) only when the request
      // asks (max_age, prompt=login), so a browser that strikes those gets none; and they name no IdP
      // session (sid), which its back-channel logout tokens still may.
      ...(postClientId ? [client(postClientId, 'client_secret_post', { require_auth_time: false, backchannel_logout_session_required: false })] : []),
      ...(options.privateKeyJwtPublicJwk
        ? [client(`${clientId}-pkjwt`, 'private_key_jwt', { jwks: { keys: [options.privateKeyJwtPublicJwk] }, token_endpoint_auth_signing_alg: 'ES256' })]
        : []),
    ],
    jwks: { keys },
    acrValues: [DEV_IDP_ACR.password, DEV_IDP_ACR.mfa],
    interactions: { policy: stepUpPolicy() },
    // The APIs judge a call by how the user signed in (RFC 9470): the access token says, as the id_token does.
    extraTokenClaims: (ctx) => {
      const { AuthorizationCode, RefreshToken } = ctx.oidc.entities;
      const source = AuthorizationCode ?? RefreshToken;
      return source?.acr ? { acr: source.acr, ...(source.authTime ? { auth_time: source.authTime } : {}) } : undefined;
    },
    cookies: { keys: state.cookieKeys },
    responseTypes: ['code'],
    scopes: ['openid', 'offline_access', 'profile', 'email'],
    claims: { openid: ['sub'], profile: ['name', 'preferred_username'], email: ['email', 'email_verified'] },
    // Access tokens are minted for the APIs (aud != userinfo), so the BFF reads the profile from the ID token.
    conformIdTokenClaims: false,
    findAccount,
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
    // Fills only what the provider leaves out: with RP-initiated logout off, the endpoint is ours to name.
    ...(options.endSessionEndpoint !== undefined ? { discovery: { end_session_endpoint: options.endSessionEndpoint } } : {}),
    features: {
      devInteractions: { enabled: true },
      revocation: { enabled: true },
      pushedAuthorizationRequests: { enabled: par !== 'disabled', requirePushedAuthorizationRequests: par === 'required' },
      // Nonces come from a secret of this process; whether a proof must carry one is the test's switch.
      dPoP: { enabled: true, nonceSecret: randomBytes(32), requireNonce: () => dpop.requireNonce },
      clientCredentials: { enabled: true },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: { enabled: options.endSessionEndpoint === undefined },
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
  registerTokenExchange(provider, {
    keys,
    audiences,
    exchangeAudiences,
    apiScope,
    ttl: exchangedTokenTtl,
    findAccount,
    // A subject whose grants were revoked (/__dev/revoke-grants, or a logout) may not be exchanged:
    // its JWT access token still verifies, but the IdP no longer stands behind it.
    liveGrantOf: (accountId, clientId) =>
      [...state.store]
        .find(([key, entry]) => key.startsWith('Grant:') && entry.expiresAt > Date.now() && entry.payload.accountId === accountId && entry.payload.clientId === clientId)?.[0]
        .slice('Grant:'.length),
  });
  providerSlot.handler = provider.callback();
  providerSlot.login = (req, res) => loginInteraction(provider, req, res);
  const tally = (ctx: KoaContextWithOIDC, outcome: 'success' | 'error', code?: string) => {
    const grantType = String(ctx.oidc.params?.grant_type ?? 'unknown');
    bump(counters[outcome], grantType);
    if (code) bump(counters.errorCodes, code);
    if (outcome !== 'success') return;
    bump((counters.clientAuth[grantType] ??= {}), clientAuthUsed(ctx));
    const { Account, RefreshToken, AuthorizationCode } = ctx.oidc.entities;
    if (Account) {
      bump((counters.byAccount[Account.accountId] ??= {}), grantType);
      const order = (counters.orderByAccount[Account.accountId] ??= []);
      order.push(grantType);
      if (order.length > GRANT_ORDER_KEPT) order.shift();
    }
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
    if (RefreshToken?.jti) (counters.revokedRefreshTokens[RefreshToken.accountId] ??= []).push(revokedTokenDigest(RefreshToken.jti));
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
      const error = url.searchParams.get('error') ?? undefined;
      if (!Number.isInteger(status) || status < 400 || status > 599 || !Number.isInteger(remaining) || (error !== undefined && !/^[a-z_]{1,64}$/.test(error))) {
        return sendJson(res, 400, { error: 'status 400-599, integer count, error an OAuth error code' });
      }
      const fault = { status, retryAfter: url.searchParams.get('retryAfter') ?? undefined, error, stall: url.searchParams.get('stall') === '1', remaining };
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
      if (!server.listening) await listen(server, port, options.host, options.issuerHost ? [options.issuerHost] : []);
    },
    async close() {
      closed = true;
      await shutdown(server);
    },
  };
}

const INTERACTION_PATH = /^\/interaction\/[\w-]+$/;
const MAX_FORM_BYTES = 16 * 1024;
/** Test-only: a login may say it happened this many seconds ago (an IdP that ignores max_age, for Gatehouse to catch). */
const MAX_BACKDATE_SEC = 24 * 3600;

/**
 * oidc-provider's login prompt, plus one check: a login that asks for the second factor's ACR
 * prompts a signed-in user to sign in again unless their IdP session already has it. (acr_values
 * alone is voluntary in OIDC Core, so oidc-provider would otherwise answer from the session.)
 */
function stepUpPolicy() {
  const policy = interactionPolicy.base();
  policy.get('login')?.checks.add(
    new interactionPolicy.Check('acr_step_up', 'a stronger sign-in was asked for', (ctx) => {
      const asked = String(ctx.oidc.params?.acr_values ?? '').split(' ');
      // Once this interaction signed the user in, its answer stands: asking again would loop.
      if (!asked.includes(DEV_IDP_ACR.mfa) || ctx.oidc.result?.login) return interactionPolicy.Check.NO_NEED_TO_PROMPT;
      return ctx.oidc.session?.acr === DEV_IDP_ACR.mfa ? interactionPolicy.Check.NO_NEED_TO_PROMPT : interactionPolicy.Check.REQUEST_PROMPT;
    }),
  );
  return policy;
}

/**
 * The sign-in page, in place of devInteractions' for the login prompt, because that one records no
 * ACR. Any login and password sign in; when the login asks for the second factor, a code field
 * appears: any 6 digits give `urn:gatehouse:mfa`, an empty field `urn:gatehouse:pwd` (an IdP may
 * answer acr_values with less, and Gatehouse must notice). Resolves false for another prompt.
 */
async function loginInteraction(provider: Provider, req: IncomingMessage, res: ServerResponse): Promise<boolean> {
  let details: Awaited<ReturnType<Provider['interactionDetails']>>;
  try {
    details = await provider.interactionDetails(req, res);
  } catch {
    // No such interaction (expired, or no cookie): oidc-provider's own error page says so.
    return false;
  }
  if (details.prompt.name !== 'login') return false;
  const { uid, params, session } = details;
  const mfaAsked = String(params.acr_values ?? '').split(' ').includes(DEV_IDP_ACR.mfa);
  const page = (status: number, notice?: string) =>
    sendHtml(res, status, loginPage({ uid, mfaAsked, login: typeof params.login_hint === 'string' ? params.login_hint : session?.accountId, notice }));
  if (req.method === 'GET') {
    page(200);
    return true;
  }
  const form = await readForm(req);
  const accountId = form?.get('login')?.trim();
  // Only a login that asked for the second factor can have it: the code field is shown for no other.
  const code = mfaAsked ? (form?.get('otp')?.trim() ?? '') : '';
  const backdate = Number(form?.get('auth_age') ?? 0);
  if (!form || !accountId || !form.get('password')) {
    page(400, 'Enter a login and a password.');
    return true;
  }
  if (code && !/^\d{6}$/.test(code)) {
    page(400, 'The code is 6 digits.');
    return true;
  }
  if (!Number.isInteger(backdate) || backdate < 0 || backdate > MAX_BACKDATE_SEC) {
    page(400, 'auth_age must be whole seconds, at most a day.');
    return true;
  }
  const login: NonNullable<InteractionResults['login']> = {
    accountId,
    acr: code ? DEV_IDP_ACR.mfa : DEV_IDP_ACR.password,
    amr: code ? ['pwd', 'otp'] : ['pwd'],
    ...(backdate ? { ts: Math.floor(Date.now() / 1000) - backdate } : {}),
  };
  await provider.interactionFinished(req, res, { login }, { mergeWithLastSubmission: false });
  return true;
}

function loginPage({ uid, mfaAsked, login, notice }: { uid: string; mfaAsked: boolean; login: string | undefined; notice: string | undefined }): string {
  const action = `/interaction/${encodeURIComponent(uid)}`;
  const code = mfaAsked
    ? `<label for="otp">Second factor: any 6-digit code (left empty, you sign in with the password only)</label>
  <input type="text" id="otp" name="otp" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9]{6}" maxlength="6" placeholder="6-digit code">`
    : '';
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Sign-in</title><style>body{font:16px/1.4 system-ui,sans-serif;margin:3rem auto;max-width:22rem;padding:0 1rem;color:#1d2330}form{display:grid;gap:.6rem}
input{font:inherit;padding:.55rem;border:1px solid #b8c0cc;border-radius:4px}label{font-size:.9rem;color:#4a5160}button{font:inherit;font-weight:600;padding:.6rem;border:0;border-radius:4px;background:#2454c7;color:#fff;cursor:pointer}
.notice{color:#a4261c}.step-up{background:#eef1f6;padding:.5rem;border-radius:4px}a{color:#4a5160;font-size:.9rem}</style></head>
<body><main><h1>Sign-in</h1>${mfaAsked ? '<p class="step-up">This application asks for a sign-in with a second factor.</p>' : ''}${notice ? `<p class="notice" role="alert">${escapeHtml(notice)}</p>` : ''}
<form autocomplete="off" action="${escapeHtml(action)}" method="post">
  <input type="hidden" name="prompt" value="login">
  <input required type="text" name="login" placeholder="Enter any login" aria-label="Login"${login ? ` value="${escapeHtml(login)}"` : ' autofocus'}>
  <input required type="password" name="password" placeholder="and password" aria-label="Password"${login ? ' autofocus' : ''}>
  ${code}
  <button type="submit">Sign-in</button>
</form>
<p><a href="${escapeHtml(`${action}/abort`)}">[ Cancel ]</a></p></main></body></html>`;
}

async function readForm(req: IncomingMessage): Promise<URLSearchParams | undefined> {
  if (!String(req.headers['content-type'] ?? '').startsWith('application/x-www-form-urlencoded')) return undefined;
  const body = await readBodyUpTo(req, MAX_FORM_BYTES);
  return body && new URLSearchParams(body.toString('utf8'));
}

const escapeHtml = (text: string) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function sendHtml(res: ServerResponse, status: number, html: string): void {
  if (res.headersSent) return void res.end();
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(html);
}

interface TokenExchangePolicy {
  keys: JWK[];
  audiences: string[];
  exchangeAudiences: string[];
  apiScope: string;
  ttl: number;
  findAccount: FindAccount;
  /** The id of a grant the account gave the client that is still in force, if any. */
  liveGrantOf: (accountId: string, clientId: string) => string | undefined;
}

type TokenExchangeParams = {
  subject_token?: string;
  subject_token_type?: string;
  requested_token_type?: string;
  audience?: string;
};

/**
 * RFC 8693 token exchange, as far as Gatehouse uses it: an access token this IdP issued to the
 * requesting client, still valid and its grant not revoked, for an access token of the same user
 * meant for one of the API audiences, with no more scope than the subject had.
 */
function registerTokenExchange(provider: Provider, policy: TokenExchangePolicy): void {
  // The subject is one of this IdP's own JWT access tokens: verified against its own public keys.
  const publicKeys = createLocalJWKSet({
    keys: policy.keys.map((jwk) => ({ ...(createPublicKey({ key: { ...jwk } as NodeJwk, format: 'jwk' }).export({ format: 'jwk' }) as JWK), kid: jwk.kid, alg: jwk.alg, use: 'sig' })),
  });
  const apiScopes = new Set(policy.apiScope.split(' '));

  async function handler(ctx: TokenEndpointGrantContext<TokenExchangeParams>): Promise<void> {
    const { params, client } = ctx.oidc;
    if (!params.subject_token) throw new errors.InvalidRequest('missing required parameter subject_token');
    if (params.subject_token_type !== ACCESS_TOKEN_TYPE) throw new errors.InvalidRequest(`subject_token_type must be ${ACCESS_TOKEN_TYPE}`);
    if (params.requested_token_type !== undefined && params.requested_token_type !== ACCESS_TOKEN_TYPE) throw new errors.InvalidRequest(`only ${ACCESS_TOKEN_TYPE} can be requested`);
    const audience = params.audience;
    if (!audience) throw new errors.InvalidRequest('missing required parameter audience');
    if (!policy.audiences.includes(audience)) throw new errors.InvalidTarget('unknown audience');
    if (!policy.exchangeAudiences.includes(audience)) throw new errors.UnauthorizedClient('the client may not exchange tokens for this audience');

    let subject: JWTPayload;
    try {
      ({ payload: subject } = await jwtVerify(params.subject_token, publicKeys, { issuer: provider.issuer, typ: 'at+jwt' }));
    } catch {
      throw new errors.InvalidGrant('subject_token is invalid or expired');
    }
    if (subject.client_id !== client.clientId) throw new errors.InvalidGrant('subject_token was issued to another client');
    const grantId = typeof subject.sub === 'string' ? policy.liveGrantOf(subject.sub, client.clientId) : undefined;
    if (!grantId || typeof subject.sub !== 'string') throw new errors.InvalidGrant('subject_token no longer stands for a grant');
    const account = await policy.findAccount(ctx, subject.sub);
    if (!account) throw new errors.InvalidGrant('subject_token names an unknown account');
    ctx.oidc.entity('Account', account);

    // Down-scoping only: what the subject had, within what the audience offers.
    const allowed = String(subject.scope ?? '').split(' ').filter((scope) => apiScopes.has(scope));
    const requested = params.scope ? params.scope.split(' ') : allowed;
    const excess = requested.filter((scope) => !allowed.includes(scope));
    if (excess.length) throw new errors.InvalidScope('requested scope exceeds the subject token', excess.join(' '));

    const token = new provider.AccessToken({ client, accountId: account.accountId, gty: 'token_exchange', grantId, scope: requested.join(' ') || undefined, expiresIn: policy.ttl });
    token.resourceServer = new provider.ResourceServer(audience, { audience, scope: policy.apiScope, accessTokenTTL: policy.ttl, accessTokenFormat: 'jwt' });
    ctx.oidc.entity('AccessToken', token);
    const value = await token.save();
    ctx.body = { access_token: value, issued_token_type: ACCESS_TOKEN_TYPE, token_type: token.tokenType, expires_in: token.expiration, scope: token.scope };
  }

  provider.registerGrantType<TokenExchangeParams>(TOKEN_EXCHANGE_GRANT, handler, ['subject_token', 'subject_token_type', 'requested_token_type', 'audience', 'scope']);
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
        exchangeAudiences: listFromEnv('IDP_EXCHANGE_AUDIENCES'),
        exchangedTokenTtl: intFromEnv('IDP_EXCHANGED_TOKEN_TTL'),
        noRefreshTokenPrefix: process.env.IDP_NO_REFRESH_TOKEN_PREFIX || undefined,
        privateKeyJwtPublicJwk: process.env.IDP_PKJWT_PUBLIC_JWK ? (JSON.parse(process.env.IDP_PKJWT_PUBLIC_JWK) as JWK) : undefined,
        par: parFromEnv(),
        dpopRequireNonce: process.env.IDP_DPOP_NONCE === 'required',
        endSessionEndpoint: process.env.IDP_END_SESSION_ENDPOINT || undefined,
      }),
    (idp) => `dev IdP listening on ${idp.issuer}`,
  );
}
