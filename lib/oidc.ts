import { createRemoteJWKSet } from 'jose';
import * as oauth from 'oauth4webapi';
import { getConfig, isLoopback } from './config.ts';
import { GatehouseError, errors } from './errors.ts';
import { tokenRequestWithDpop, unboundTokenProblem } from './dpop.ts';
import { describeCause, log } from './log.ts';
import { sharedState } from './shared-state.ts';
import { checkLogoutToken, type LogoutTokenClaims } from './logout-token.ts';
import type { StepUp } from './step-up.ts';

export type { LogoutTokenClaims } from './logout-token.ts';

/**
 * The only module that talks to the identity provider. Every exchange is a request and a check of
 * its response (oauth4webapi), and every failure comes out as one of three kinds, because the
 * caller must treat them differently: `invalid_grant` ends a session, `unavailable` must not.
 */

export interface TokenSet {
  accessToken: string;
  refreshToken: string | undefined;
  idToken: string | undefined;
  /** Epoch milliseconds; null when the IdP did not say. */
  accessTokenExpiresAt: number | null;
  scope: string | undefined;
}

export interface LoginResult {
  tokens: TokenSet;
  claims: oauth.IDToken;
}

export type IdpFailureKind = 'invalid_grant' | 'unavailable' | 'rejected';

export class IdpError extends Error {
  readonly kind: IdpFailureKind;
  /** From the IdP's own `Retry-After`, when it said when to come back. */
  readonly retryAfterSec: number | undefined;
  constructor(kind: IdpFailureKind, message: string, cause?: unknown, retryAfterSec?: number) {
    super(message, { cause });
    this.name = 'IdpError';
    this.kind = kind;
    this.retryAfterSec = retryAfterSec;
  }
}

const DISCOVERY_TTL_MS = 60 * 60 * 1000;
/** Shared with every copy of this module in the process (see shared-state.ts). */
const cache = sharedState('idp', () => ({
  discovery: undefined as { value: Promise<oauth.AuthorizationServer>; at: number } | undefined,
  /** The last document read: where a sign-out sends the browser when a refetch fails (see buildEndSessionUrl). */
  lastDiscovered: undefined as oauth.AuthorizationServer | undefined,
  jwks: {} as oauth.JWKSCacheInput,
}));
/** Filled by oauth4webapi itself; one per process so the JWKS is fetched once, not per login. */
const jwksCache = cache.jwks;

function requestOptions(signal: AbortSignal = AbortSignal.timeout(getConfig().oidc.timeoutMs)) {
  return { [oauth.allowInsecureRequests]: getConfig().oidc.allowInsecureRequests, signal };
}

/**
 * Waits for `promise`, but no longer than `signal` allows. The promise itself runs on: a shared
 * discovery fetch must not fail for everyone because one caller's deadline passed.
 */
function untilAborted<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return promise;
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    if (signal.aborted) return onAbort();
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', onAbort));
  });
}

function getAuthorizationServer(signal?: AbortSignal): Promise<oauth.AuthorizationServer> {
  return untilAborted(discover(), signal);
}

function discover(): Promise<oauth.AuthorizationServer> {
  const { discovery } = cache;
  if (discovery && Date.now() - discovery.at < DISCOVERY_TTL_MS) return discovery.value;
  const issuer = getConfig().oidc.issuer;
  const value = (async () => {
    try {
      const response = await oauth.discoveryRequest(issuer, { ...requestOptions(), algorithm: 'oidc' });
      const as = await oauth.processDiscoveryResponse(issuer, response);
      const cleartext = cleartextEndpointProblem(as);
      if (cleartext) throw new IdpError('rejected', cleartext);
      cache.lastDiscovered = as;
      return as;
    } catch (error) {
      throw classify(error, 'discovery');
    }
  })();
  cache.discovery = { value, at: Date.now() };
  // A failed discovery must not be remembered, or one IdP blip would break logins for an hour.
  value.catch(() => {
    if (cache.discovery?.value === value) cache.discovery = undefined;
  });
  return value;
}

function client(): oauth.Client {
  return { client_id: getConfig().oidc.clientId };
}

let privateKey: Promise<oauth.PrivateKey> | undefined;

async function clientAuth(): Promise<oauth.ClientAuth> {
  const { oidc } = getConfig();
  if (oidc.clientAuth === 'client_secret_post') return oauth.ClientSecretPost(oidc.clientSecret as string);
  if (oidc.clientAuth === 'client_secret_basic') return oauth.ClientSecretBasic(oidc.clientSecret as string);
  privateKey ??= importPrivateKey();
  return oauth.PrivateKeyJwt(await privateKey);
}

async function importPrivateKey(): Promise<oauth.PrivateKey> {
  const jwk = getConfig().oidc.privateKeyJwk as JsonWebKey & { kid?: string };
  const algorithm =
    jwk.kty === 'EC'
      ? { name: 'ECDSA', namedCurve: jwk.crv ?? 'P-256' }
      : jwk.kty === 'OKP'
        ? { name: 'Ed25519' }
        : { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' };
  const key = await crypto.subtle.importKey('jwk', jwk, algorithm, false, ['sign']);
  return { key, kid: jwk.kid };
}

/**
 * OIDC_PRIVATE_KEY imported as the first client assertion would import it: the configuration's own
 * check (Node's key parser) lets a few keys through that WebCrypto will not sign with.
 */
export async function privateKeyProblem(): Promise<string | undefined> {
  if (getConfig().oidc.clientAuth !== 'private_key_jwt') return undefined;
  try {
    await importPrivateKey();
    return undefined;
  } catch (error) {
    return `OIDC_PRIVATE_KEY: cannot be imported as a signing key (${error instanceof Error ? error.name : 'unknown error'}); give a complete private JWK: RSA, EC on P-256, P-384 or P-521, or Ed25519`;
  }
}

export interface AuthorizationRequest extends StepUp {
  state: string;
  nonce: string;
  codeVerifier: string;
  prompt?: string;
  /** RFC 9449 section 10: the thumbprint of the key the code's tokens must be bound to. */
  dpopJkt?: string;
}

export function newAuthorizationRequest({ prompt, acrValues, maxAge }: { prompt?: string | undefined } & StepUp = {}): AuthorizationRequest {
  return {
    state: oauth.generateRandomState(),
    nonce: oauth.generateRandomNonce(),
    codeVerifier: oauth.generateRandomCodeVerifier(),
    ...(prompt ? { prompt } : {}),
    ...(acrValues ? { acrValues } : {}),
    ...(maxAge !== undefined ? { maxAge } : {}),
  };
}

/**
 * Where the browser goes to sign in. With PAR (RFC 9126) the parameters travel server to server,
 * client authentication included, and the browser carries only `client_id` and `request_uri`: they
 * cannot be read or altered on the way, and the IdP knows the request came from this client.
 */
export async function buildAuthorizationUrl(request: AuthorizationRequest): Promise<{ url: URL; pushed: boolean }> {
  const as = await getAuthorizationServer();
  const url = browserEndpoint(as.authorization_endpoint);
  if (!url) throw new IdpError('rejected', 'The IdP has no usable authorization_endpoint (an absolute https URL)');
  const parameters = await authorizationParameters(request);
  if (!usesPushedAuthorization(as)) {
    for (const [name, value] of parameters) url.searchParams.set(name, value);
    return { url, pushed: false };
  }
  const problem = pushedAuthorizationProblem(as);
  if (problem) {
    throw new GatehouseError('par_unsupported', 502, 'Sign-in is not possible: the identity provider does not accept the sign-in request this server must send. The server log names the problem.', {
      cause: new Error(problem),
    });
  }
  url.searchParams.set('client_id', getConfig().oidc.clientId);
  url.searchParams.set('request_uri', await pushAuthorizationRequest(as, parameters));
  return { url, pushed: true };
}

async function authorizationParameters(request: AuthorizationRequest): Promise<URLSearchParams> {
  const { oidc } = getConfig();
  const parameters = new URLSearchParams({
    response_type: 'code',
    client_id: oidc.clientId,
    redirect_uri: oidc.redirectUri,
    scope: oidc.scopes,
    state: request.state,
    nonce: request.nonce,
    code_challenge: await oauth.calculatePKCECodeChallenge(request.codeVerifier),
    code_challenge_method: 'S256',
  });
  for (const [name, value] of oidc.authorizationParams) parameters.set(name, value);
  if (request.prompt) parameters.set('prompt', request.prompt);
  // A login's own step-up replaces what OIDC_AUTHORIZATION_PARAMS may set: it is what the callback checks.
  if (request.acrValues) parameters.set('acr_values', request.acrValues.join(' '));
  if (request.maxAge !== undefined) parameters.set('max_age', String(request.maxAge));
  if (request.dpopJkt) parameters.set('dpop_jkt', request.dpopJkt);
  // offline_access is only honoured with prompt=consent by some IdPs; we ask for it but cope without.
  return parameters;
}

function usesPushedAuthorization(as: oauth.AuthorizationServer): boolean {
  return getConfig().oidc.usePar || as.require_pushed_authorization_requests === true;
}

/**
 * Why no login can work with this IdP as configured, or undefined: PAR is required (by the IdP or
 * by OIDC_USE_PAR) and the IdP publishes nowhere to push to. Checked at start-up and by every login,
 * since the document may change under a running server.
 */
export function pushedAuthorizationProblem(as: oauth.AuthorizationServer, usePar = getConfig().oidc.usePar): string | undefined {
  if (as.pushed_authorization_request_endpoint) return undefined;
  if (as.require_pushed_authorization_requests === true) {
    return `OIDC_ISSUER: the IdP requires pushed authorization requests (require_pushed_authorization_requests: true) but publishes no pushed_authorization_request_endpoint (${as.issuer})`;
  }
  if (usePar) {
    return `OIDC_USE_PAR: is true, but the IdP publishes no pushed_authorization_request_endpoint; enable PAR at the IdP or unset OIDC_USE_PAR (${as.issuer})`;
  }
  return undefined;
}

/** The discovery document's endpoints that Gatehouse calls itself, with the client's credentials, codes and tokens, or whose keys it trusts. */
const SERVER_ENDPOINTS = ['token_endpoint', 'pushed_authorization_request_endpoint', 'revocation_endpoint', 'userinfo_endpoint', 'jwks_uri'] as const;

/**
 * An endpoint Gatehouse would call in clear text off this machine, named. oauth4webapi refuses http
 * endpoints, except when told to allow them, which a loopback issuer needs (a local IdP, tests) —
 * and that would then let its document send the client secret and refresh tokens to any http host.
 * jose fetches the logout tokens' keys (`jwks_uri`) over whatever scheme it is given.
 */
export function cleartextEndpointProblem(as: oauth.AuthorizationServer, allowHttp = getConfig().oidc.allowInsecureRequests): string | undefined {
  const cleartext = SERVER_ENDPOINTS.filter((name) => as[name] !== undefined && !browserEndpoint(as[name], allowHttp));
  if (cleartext.length === 0) return undefined;
  return `OIDC_ISSUER: the IdP's discovery document names ${cleartext.map((name) => `${name} ${JSON.stringify(withoutCredentials(as[name]))}`).join(', ')}, which is not an absolute https URL (nor http on loopback, for a loopback issuer); Gatehouse sends secrets and tokens only over https (${as.issuer})`;
}

/** A URL as it may be shown in a message: no user name or password, 100 characters at most. */
function withoutCredentials(value: unknown): string {
  const text = String(value);
  if (!URL.canParse(text)) return text.slice(0, 100);
  const url = new URL(text);
  url.username = '';
  url.password = '';
  return url.href.slice(0, 100);
}

/** RFC 9126 section 2: resolves to the `request_uri` that stands for `parameters` at the IdP. */
async function pushAuthorizationRequest(as: oauth.AuthorizationServer, parameters: URLSearchParams): Promise<string> {
  try {
    const response = await oauth.pushedAuthorizationRequest(as, client(), await clientAuth(), parameters, requestOptions());
    return (await oauth.processPushedAuthorizationResponse(as, client(), response)).request_uri;
  } catch (error) {
    const failure = classify(error, 'pushed authorization request');
    if (failure.kind === 'unavailable') throw idpErrorToGatehouse(failure);
    // A refusal here is a setup problem (redirect URI, client authentication, scope): the operator
    // needs the IdP's own words, which go to the log with the cause, never to the page.
    const description = error instanceof oauth.ResponseBodyError && error.error_description ? ` (${error.error_description.slice(0, 120)})` : '';
    throw new GatehouseError('idp_error', 502, 'The identity provider refused the sign-in request.', { cause: new IdpError('rejected', `${failure.message}${description}`, error) });
  }
}

const CLOCK_SKEW_SEC = 60;
const MAX_ID_TOKEN_AGE_SEC = 10 * 60;

/** oauth4webapi's verdict on an id_token whose `auth_time` is missing or older than the `max_age` asked for. */
function isAuthTimeShortfall(error: unknown): boolean {
  if (!(error instanceof oauth.OperationProcessingError)) return false;
  const cause = error.cause as { claim?: unknown; claims?: { auth_time?: unknown } } | undefined;
  if (error.code === oauth.JWT_TIMESTAMP_CHECK) return cause?.claim === 'auth_time';
  // A missing claim is named only in the message; should that wording change, this is a token_exchange_failed.
  return error.code === oauth.INVALID_RESPONSE && cause?.claims !== undefined && cause.claims.auth_time === undefined && error.message.includes('"auth_time"');
}

/**
 * A `prompt=login` the operator asks of every sign-in (`how`: the login sent it in the browser's
 * URL, or pushed it by PAR). In the URL, a browser that strikes it is signed in silently by an IdP
 * that still knows it: the id_token's `auth_time` must fall within this attempt (epoch ms `since`,
 * less the clock skew). An id_token without `auth_time` cannot show that; it passes only when the
 * request was pushed, out of the browser's reach, where honouring `prompt` is the IdP's part.
 */
function checkFreshSignIn(claims: oauth.IDToken, since: number, how: 'sent' | 'pushed'): void {
  if (claims.auth_time !== undefined) {
    if (typeof claims.auth_time === 'number' && claims.auth_time >= Math.floor(since / 1000) - CLOCK_SKEW_SEC) return;
    throw errors.stepUpFailed(new Error(`prompt=login was asked for, but the id_token's auth_time is ${typeof claims.auth_time === 'number' ? `${Math.floor(since / 1000) - claims.auth_time} s before the sign-in started` : 'no number'}`));
  }
  if (how === 'pushed') return;
  throw errors.stepUpFailed(new Error('prompt=login was asked for without PAR, and the id_token has no auth_time to show the user signed in again (set OIDC_USE_PAR=true, or have the IdP include auth_time)'));
}

/**
 * OIDC Core treats `acr_values` as a wish the IdP may not grant. A login that asked for them is a
 * step-up, and a session without one of them would meet the same refusal at the API again: such a
 * sign-in is refused here instead of recorded.
 */
function checkRequestedAcr(claims: oauth.IDToken, acrValues: string[] | undefined): void {
  if (!acrValues) return;
  if (typeof claims.acr === 'string' && acrValues.includes(claims.acr)) return;
  throw errors.stepUpFailed(new Error(`requested acr ${acrValues.join(' ')}, the id_token says ${typeof claims.acr === 'string' ? claims.acr.slice(0, 80) : 'none'}`));
}

/** What came back to the callback, once its issuer (RFC 9207) and state have been checked. */
export type CallbackAnswer = { kind: 'code'; params: URLSearchParams } | { kind: 'error'; error: string };

/**
 * An error answer gets the same issuer and state checks as a code: the IdP's word that sign-in
 * failed is only believed when it comes from the IdP this login was sent to.
 */
export async function checkCallback(callbackUrl: URL, expectedState: string): Promise<CallbackAnswer> {
  const as = await getAuthorizationServer();
  try {
    return { kind: 'code', params: oauth.validateAuthResponse(as, client(), callbackUrl.searchParams, expectedState) };
  } catch (error) {
    if (error instanceof oauth.AuthorizationResponseError) return { kind: 'error', error: error.error };
    throw new GatehouseError('invalid_callback', 400, 'The sign-in response was not valid for this sign-in attempt.', { cause: error });
  }
}

/**
 * Redeems the code of parameters that checkCallback returned, with PKCE and client authentication,
 * and validates the id_token including its signature and `iat`, and what a step-up asked for:
 * `auth_time` within `max_age` (oauth4webapi's check, with its 30 s clock tolerance), `acr` among
 * `acr_values`. Tokens of a sign-in refused for falling short are dropped, not revoked: IdPs that
 * revoke a whole grant with one token would end the session the user still has.
 */
export async function redeemAuthorizationCode(
  params: URLSearchParams,
  request: AuthorizationRequest & { startedAt: number; freshSignIn?: 'sent' | 'pushed' | undefined },
  dpop?: oauth.DPoPHandle,
): Promise<LoginResult> {
  const as = await getAuthorizationServer();
  try {
    const { oidc } = getConfig();
    const { response, result } = await tokenRequestWithDpop(
      dpop,
      async () => oauth.authorizationCodeGrantRequest(as, client(), await clientAuth(), params, oidc.redirectUri, request.codeVerifier, { ...requestOptions(), DPoP: dpop }),
      (answer) =>
        oauth.processAuthorizationCodeResponse(as, client(), answer, {
          expectedNonce: request.nonce,
          requireIdToken: true,
          ...(request.maxAge !== undefined ? { maxAge: request.maxAge } : {}),
        }),
    );
    const unbound = dpop && unboundTokenProblem(result, 'code exchange');
    if (unbound) throw new GatehouseError('dpop_not_bound', 502, 'Sign-in is not possible: the identity provider does not bind tokens to this server (DPoP). The server log names the problem.', { cause: new Error(unbound) });
    await oauth.validateApplicationLevelSignature(as, response, { ...requestOptions(), [oauth.jwksCache]: jwksCache });
    const claims = oauth.getValidatedIdTokenClaims(result);
    if (!claims) throw new IdpError('rejected', 'The token response had no id_token');
    const now = Math.floor(Date.now() / 1000);
    if (claims.iat > now + CLOCK_SKEW_SEC || claims.iat < now - MAX_ID_TOKEN_AGE_SEC) {
      throw new IdpError('rejected', 'The id_token iat is out of range');
    }
    checkRequestedAcr(claims, request.acrValues);
    if (request.freshSignIn) checkFreshSignIn(claims, request.startedAt, request.freshSignIn);
    return { tokens: toTokenSet(result), claims };
  } catch (error) {
    if (error instanceof GatehouseError && error.code === 'step_up_failed') throw error;
    if (request.maxAge !== undefined && isAuthTimeShortfall(error)) throw errors.stepUpFailed(error);
    if (error instanceof GatehouseError && error.code === 'dpop_not_bound') throw error;
    const failure = classify(error, 'code exchange');
    if (failure.kind === 'unavailable') throw idpErrorToGatehouse(failure);
    throw new GatehouseError('token_exchange_failed', 400, 'The sign-in could not be completed.', { cause: error });
  }
}

/**
 * Refresh-token grant. The caller owns the refresh lock; this only talks to the IdP and checks
 * the answer, including that a new id_token still names the same user (OIDC Core 12.2).
 * `signal` is the lock's one deadline: it bounds a discovery refetch and the grant together.
 */
export async function refreshTokens(
  refreshToken: string,
  expectedSub: string,
  extra: { resource?: string; scope?: string; signal?: AbortSignal; dpop?: oauth.DPoPHandle } = {},
): Promise<TokenSet> {
  try {
    const as = await getAuthorizationServer(extra.signal);
    const additionalParameters: Record<string, string> = {};
    if (extra.resource) additionalParameters.resource = extra.resource;
    if (extra.scope) additionalParameters.scope = extra.scope;
    const { result } = await tokenRequestWithDpop(
      extra.dpop,
      async () => oauth.refreshTokenGrantRequest(as, client(), await clientAuth(), refreshToken, { ...requestOptions(extra.signal), additionalParameters, DPoP: extra.dpop }),
      (response) => oauth.processRefreshTokenResponse(as, client(), response),
    );
    const unbound = extra.dpop && unboundTokenProblem(result, 'refresh');
    if (unbound) {
      // The session cannot go on bound, and unbound is what it must not become: it ends, and the
      // unbound refresh token is not left behind at the IdP.
      if (result.refresh_token) await revokeToken(result.refresh_token, 'refresh_token');
      throw new IdpError('invalid_grant', unbound);
    }
    const claims = oauth.getValidatedIdTokenClaims(result);
    if (claims && claims.sub !== expectedSub) throw new IdpError('invalid_grant', 'The refreshed id_token names another subject');
    return toTokenSet(result);
  } catch (error) {
    throw classify(error, 'refresh');
  }
}

export async function clientCredentialsToken(extra: { resource?: string; scope?: string }): Promise<TokenSet> {
  try {
    const as = await getAuthorizationServer();
    const parameters: Record<string, string> = {};
    if (extra.resource) parameters.resource = extra.resource;
    if (extra.scope) parameters.scope = extra.scope;
    const response = await oauth.clientCredentialsGrantRequest(as, client(), await clientAuth(), parameters, requestOptions());
    return toTokenSet(bearerOnly(await oauth.processClientCredentialsResponse(as, client(), response), 'client credentials'));
  } catch (error) {
    throw classify(error, 'client credentials');
  }
}

const TOKEN_EXCHANGE_GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

/**
 * RFC 8693 token exchange: the session's access token (the subject) for an access token the IdP
 * issues for `audience`. The caller owns the refresh lock; `signal` is its deadline. Only the
 * access token is taken from the answer: a refresh token or id_token the IdP adds is not kept, so a
 * session holds exactly one refresh token, and the exchanged token is renewed by exchanging again.
 */
export async function exchangeToken(subjectToken: string, target: { audience: string; scope?: string | undefined }, signal?: AbortSignal): Promise<TokenSet> {
  try {
    const as = await getAuthorizationServer(signal);
    const parameters: Record<string, string> = {
      subject_token: subjectToken,
      subject_token_type: ACCESS_TOKEN_TYPE,
      requested_token_type: ACCESS_TOKEN_TYPE,
      audience: target.audience,
    };
    if (target.scope) parameters.scope = target.scope;
    const response = await oauth.genericTokenEndpointRequest(as, client(), await clientAuth(), TOKEN_EXCHANGE_GRANT, parameters, requestOptions(signal));
    const result = bearerOnly(await oauth.processGenericTokenEndpointResponse(as, client(), response), 'token exchange');
    // RFC 8693 requires issued_token_type; an IdP that leaves it out is taken at its token_type (bearer, checked above).
    const issued = result.issued_token_type;
    if (issued !== undefined && issued !== ACCESS_TOKEN_TYPE) {
      throw new IdpError('rejected', `token exchange: the IdP issued ${String(issued).slice(0, 80)}, not an access token`);
    }
    return { ...toTokenSet(result), refreshToken: undefined, idToken: undefined };
  } catch (error) {
    throw classify(error, 'token exchange');
  }
}

/**
 * A failed exchange never ends the session: the subject was the session's own token, which still
 * works. An OAuth error from the IdP (invalid_grant, unauthorized_client, invalid_target, …) is its
 * policy about this API, answered 403; a slow or failing IdP is a retryable 503 as elsewhere.
 */
export function exchangeErrorToGatehouse(error: IdpError): GatehouseError {
  if (error.kind === 'unavailable') return errors.idpUnavailable(error, error.retryAfterSec);
  if (idpErrorCode(error) !== undefined) return errors.tokenExchangeRefused(error);
  return idpErrorToGatehouse(error);
}

/** The OAuth `error` code the IdP answered with, if it answered with one: safe to log (never a token). */
export function idpErrorCode(error: IdpError): string | undefined {
  return error.cause instanceof oauth.ResponseBodyError ? error.cause.error.slice(0, 64) : undefined;
}

/** RFC 7009. Best effort: a failure here must never keep a user from signing out. */
export async function revokeToken(token: string, hint: 'refresh_token' | 'access_token'): Promise<boolean> {
  try {
    const as = await getAuthorizationServer();
    if (!as.revocation_endpoint) return false;
    const response = await oauth.revocationRequest(as, client(), await clientAuth(), token, { ...requestOptions(), additionalParameters: { token_type_hint: hint } });
    await oauth.processRevocationResponse(response);
    return true;
  } catch {
    return false;
  }
}

/**
 * An endpoint of the discovery document, or undefined when it is not an absolute https URL (http on
 * loopback only, and only where the issuer itself is http on loopback): the document is the IdP's
 * word, which a broken one can fill with a relative path, a `javascript:` URL or a cleartext host.
 */
export function browserEndpoint(value: unknown, allowHttp = getConfig().oidc.allowInsecureRequests): URL | undefined {
  if (typeof value !== 'string' || !URL.canParse(value)) return undefined;
  const url = new URL(value);
  return url.protocol === 'https:' || (allowHttp && url.protocol === 'http:' && isLoopback(url)) ? url : undefined;
}

/**
 * The IdP's RP-initiated logout URL, or null when it has none or a broken one. When its discovery
 * document cannot be fetched again right now, the last one read still says where it is: landing on
 * `/` instead would leave the IdP session on, and the next "Sign in" on a shared device would get
 * in without a password. Null only when this process never read one.
 */
export async function buildEndSessionUrl(idToken: string | undefined): Promise<URL | null> {
  let as: oauth.AuthorizationServer;
  try {
    as = await getAuthorizationServer();
  } catch (error) {
    if (!cache.lastDiscovered) {
      log('warn', 'auth.end_session_endpoint_unknown', { reason: 'the discovery document cannot be fetched', ...describeCause(error) });
      return null;
    }
    as = cache.lastDiscovered;
  }
  const url = browserEndpoint(as.end_session_endpoint);
  if (!url) {
    // A sign-out still signs out here; only the IdP's own logout is skipped.
    if (as.end_session_endpoint !== undefined) log('warn', 'auth.end_session_endpoint_unusable', { reason: 'not an absolute https URL (nor http on loopback, for a loopback issuer)' });
    return null;
  }
  const { oidc } = getConfig();
  url.searchParams.set('client_id', oidc.clientId);
  url.searchParams.set('post_logout_redirect_uri', oidc.postLogoutRedirectUri);
  if (idToken) url.searchParams.set('id_token_hint', idToken);
  return url;
}

/**
 * Once per process: an access token that lives no longer than TOKEN_REFRESH_SKEW is due the moment
 * it comes, so every call for it costs the IdP a grant (one at a time per session). The operator
 * lowers the skew, or lengthens the IdP's token lifetime; nothing here can tell which was meant.
 */
let warnedOfLifetimeUnderSkew = false;

function warnIfDueOnArrival(expiresInSec: number): void {
  const { skewSec } = getConfig().refresh;
  if (warnedOfLifetimeUnderSkew || expiresInSec > skewSec) return;
  warnedOfLifetimeUnderSkew = true;
  log('warn', 'token.lifetime_under_skew', { lifetimeSec: expiresInSec, skewSec, fix: 'set TOKEN_REFRESH_SKEW below the IdP\'s access token lifetime, or lengthen that lifetime: each call now refreshes' });
}

/**
 * The client's own tokens and exchanged ones go out as bearer tokens, with no proof (oauth4webapi
 * also takes `DPoP`): a sender-constrained one would be refused by its API on every call.
 */
function bearerOnly<T extends oauth.TokenEndpointResponse>(result: T, operation: string): T {
  if (result.token_type.toLowerCase() !== 'bearer') throw new IdpError('rejected', `${operation}: the IdP issued a ${result.token_type.slice(0, 20)} token, not a bearer one`);
  return result;
}

function toTokenSet(result: oauth.TokenEndpointResponse): TokenSet {
  if (typeof result.expires_in === 'number') warnIfDueOnArrival(result.expires_in);
  return {
    accessToken: result.access_token,
    refreshToken: result.refresh_token,
    idToken: result.id_token,
    accessTokenExpiresAt: typeof result.expires_in === 'number' ? Date.now() + result.expires_in * 1000 : null,
    scope: result.scope,
  };
}

function isNetworkFailure(error: unknown): boolean {
  if (!(error instanceof Error)) return false;
  // oauth4webapi wraps a body that stalled or broke off after the status line in a parse error.
  if (error instanceof oauth.OperationProcessingError && error.code === oauth.PARSE_ERROR && error.cause instanceof Error) return isNetworkFailure(error.cause);
  return error.name === 'TimeoutError' || error.name === 'AbortError' || (error instanceof TypeError && /fetch failed|network|terminated/i.test(error.message));
}

/** The IdP's HTTP answer behind an oauth4webapi error, when there was one. */
function responseOf(error: unknown): Response | undefined {
  if (error instanceof oauth.ResponseBodyError || error instanceof oauth.WWWAuthenticateChallengeError) return error.response;
  if (error instanceof oauth.OperationProcessingError && error.cause instanceof Response) return error.cause;
  return undefined;
}

/** An IdP that is rate limiting or failing is coming back: the caller should retry, not give up. */
function isTransientStatus(status: number): boolean {
  return status === 429 || status >= 500;
}

const MAX_RETRY_AFTER_SEC = 600;

/** `Retry-After` in seconds (delta-seconds or an HTTP date), capped: an IdP cannot park clients for days. */
export function parseRetryAfter(value: string | null | undefined, now = Date.now()): number | undefined {
  if (!value) return undefined;
  const trimmed = value.trim();
  // delta-seconds, or an IMF-fixdate (RFC 9110 §10.2.3); anything else, Date.parse's guesses included, is unreadable.
  const seconds = /^\d{1,10}$/.test(trimmed) ? Number(trimmed) : / GMT$/.test(trimmed) ? Math.ceil((Date.parse(trimmed) - now) / 1000) : NaN;
  if (!Number.isFinite(seconds)) return undefined;
  return Math.min(Math.max(seconds, 0), MAX_RETRY_AFTER_SEC);
}

/** Sorts any failure of an IdP exchange into what the caller must do about it. */
function classify(error: unknown, operation: string): IdpError {
  if (error instanceof IdpError) return error;
  if (error instanceof oauth.ResponseBodyError && error.error === 'invalid_grant') return new IdpError('invalid_grant', `${operation}: invalid_grant`, error);
  const response = responseOf(error);
  if (response && isTransientStatus(response.status)) {
    return new IdpError('unavailable', `${operation}: IdP answered ${response.status}`, error, parseRetryAfter(response.headers.get('retry-after')));
  }
  if (error instanceof oauth.ResponseBodyError) return new IdpError('rejected', `${operation}: IdP answered ${error.error}`, error);
  if (isNetworkFailure(error)) return new IdpError('unavailable', `${operation}: IdP not reachable`, error);
  if (error instanceof GatehouseError) return new IdpError('rejected', error.message, error);
  return new IdpError('rejected', `${operation}: unexpected IdP response`, error);
}

export function idpErrorToGatehouse(error: IdpError): GatehouseError {
  if (error.kind === 'invalid_grant') return errors.sessionExpired(error);
  if (error.kind === 'unavailable') return errors.idpUnavailable(error, error.retryAfterSec);
  return errors.idpRefused(error);
}

/** A live discovery fetch for health and start-up checks: the cached document would hide an outage. */
export async function checkDiscovery(): Promise<oauth.AuthorizationServer> {
  const issuer = getConfig().oidc.issuer;
  const response = await oauth.discoveryRequest(issuer, { ...requestOptions(), signal: AbortSignal.timeout(3_000), algorithm: 'oidc' });
  return oauth.processDiscoveryResponse(issuer, response);
}

/**
 * For server start-up: what the IdP's discovery document says that no login could work with. An IdP
 * that cannot be reached right now is no reason to stay down (sessions and APIs work without it),
 * so then this names nothing, and the same check runs at every login instead.
 */
export async function idpStartProblems(): Promise<string[]> {
  const keyProblem = await privateKeyProblem();
  if (keyProblem) return [keyProblem];
  let as: oauth.AuthorizationServer;
  try {
    as = await checkDiscovery();
  } catch (error) {
    log('warn', 'server.idp_unchecked', { ...describeCause(error), retry: 'at the first login' });
    return [];
  }
  return [pushedAuthorizationProblem(as), cleartextEndpointProblem(as)].filter((problem) => problem !== undefined);
}

const LOGOUT_TOKEN_MAX_AGE_SEC = 5 * 60;

let logoutJwks: { uri: string; keys: ReturnType<typeof createRemoteJWKSet> } | undefined;

/**
 * OIDC Back-Channel Logout 1.0, section 2.6, against the IdP's own JWKS and metadata: asymmetric
 * algorithms only (the ones it says it signs id_tokens with). oauth4webapi has no helper for this;
 * `checkLogoutToken` does the checks with jose.
 */
export async function verifyLogoutToken(token: string): Promise<LogoutTokenClaims> {
  const as = await getAuthorizationServer();
  if (!as.jwks_uri) throw new IdpError('rejected', 'The IdP publishes no jwks_uri');
  if (logoutJwks?.uri !== as.jwks_uri) logoutJwks = { uri: as.jwks_uri, keys: createRemoteJWKSet(new URL(as.jwks_uri), { timeoutDuration: getConfig().oidc.timeoutMs }) };
  const algorithms = (as.id_token_signing_alg_values_supported ?? ['RS256']).filter((alg) => alg !== 'none' && !alg.startsWith('HS'));
  return checkLogoutToken(token, logoutJwks.keys, {
    // Read before the check: it may fetch the set, after which it is cooling down whatever it held.
    keysMayPredateToken: logoutJwks.keys.coolingDown,
    issuer: as.issuer,
    clientId: getConfig().oidc.clientId,
    algorithms,
    maxAgeSec: LOGOUT_TOKEN_MAX_AGE_SEC,
    clockToleranceSec: CLOCK_SKEW_SEC,
  });
}
