import { createHash, randomUUID } from 'node:crypto';
import { SignJWT, calculateJwkThumbprint, type JWK } from 'jose';
import * as oauth from 'oauth4webapi';
import { getConfig } from './config.ts';
import { GatehouseError, errors } from './errors.ts';
import { log } from './log.ts';
import { sharedState } from './shared-state.ts';
import { TRANSACTION_TTL_SEC, decryptAtRest, encryptAtRest, getStore, shortDigest, storeCall, type SessionSecrets } from './session.ts';

/**
 * DPoP (RFC 9449), with OIDC_DPOP=true: every session has a P-256 key pair of its own, and the IdP
 * binds the session's tokens to it (`cnf.jkt`), so a token is worth nothing without a proof signed
 * by that key. The private key lives only on the server: in the store while its login is under way
 * (encrypted like the tokens, under a key named after the login's `state`), then in the session's
 * encrypted secrets. The proofs are made here — jose signs them, oauth4webapi makes the token
 * endpoint's — and nothing of them reaches the browser.
 */

const ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256' } as const;
const JWS_ALG = 'ES256';

/** A private EC JWK as WebCrypto exports it, reduced to the members that make the key. */
interface PrivateJwk {
  kty: 'EC';
  crv: 'P-256';
  x: string;
  y: string;
  d: string;
}

function isPrivateJwk(value: unknown): value is PrivateJwk {
  const jwk = value as Partial<PrivateJwk> | null;
  return typeof jwk === 'object' && jwk !== null && jwk.kty === 'EC' && jwk.crv === 'P-256' && [jwk.x, jwk.y, jwk.d].every((part) => typeof part === 'string');
}

function publicJwk(jwk: PrivateJwk): JWK {
  return { kty: jwk.kty, crv: jwk.crv, x: jwk.x, y: jwk.y };
}

/** The key pair in the form a DPoP proof needs, imported once per session and process. */
interface ReadyKey {
  /** The public `x`: tells a cached entry from the key of another record under the same id. */
  x: string;
  privateKey: CryptoKey;
  header: { alg: string; typ: string; jwk: JWK };
  /** For the token endpoint (refresh): oauth4webapi's proof maker. */
  handle: oauth.DPoPHandle;
  /** The last access token's `ath`: a session's token changes only at a refresh, its hash need not be taken per request. */
  ath?: { token: string; value: string };
}

/** Shared with every copy of this module in the process (see shared-state.ts). */
const state = sharedState('dpop', () => ({
  /** Per session id. An import costs more than the signature: a proxied call should pay only the latter. */
  keys: new Map<string, ReadyKey>(),
  /** The last `DPoP-Nonce` each server sent, by `api <origin>` or `idp <origin>`: the IdP and an API may share an origin. */
  nonces: new Map<string, string>(),
}));
const READY_KEYS_LIMIT = 10_000;
const NONCES_LIMIT = 1_000;

async function readyKey(jwk: PrivateJwk): Promise<ReadyKey> {
  const [privateKey, publicKey] = await Promise.all([
    crypto.subtle.importKey('jwk', { ...jwk, ext: false }, ALGORITHM, false, ['sign']),
    // oauth4webapi puts the public key into its proofs, so it must be extractable.
    crypto.subtle.importKey('jwk', publicJwk(jwk), ALGORITHM, true, ['verify']),
  ]);
  return {
    x: jwk.x,
    privateKey,
    header: { alg: JWS_ALG, typ: 'dpop+jwt', jwk: publicJwk(jwk) },
    handle: oauth.DPoP({}, { privateKey, publicKey }, { [oauth.modifyAssertion]: withKnownNonce }),
  };
}

/**
 * oauth4webapi keeps the nonces it hears per handle, and a handle lives for one login or one
 * session: the token endpoint's nonce is remembered for the whole process as well, so that an IdP
 * demanding nonces (Okta does, always) costs a retry once per process rather than once per grant.
 */
function withKnownNonce(_header: Record<string, unknown>, payload: Record<string, unknown>): void {
  if (payload.nonce !== undefined || typeof payload.htu !== 'string') return;
  const known = state.nonces.get(idpNonceKey(new URL(payload.htu).origin));
  if (known) payload.nonce = known;
}

const idpNonceKey = (origin: string) => `idp ${origin}`;
/**
 * An API's nonces are its own, by its name in BFF_APIS rather than its origin: two APIs on one
 * origin (a gateway in front of two resource servers) may each keep their own, and one's answers
 * must not replace the nonce the other's proofs need.
 */
const apiNonceKey = (api: string) => `api ${api}`;

function rememberNonce(key: string, nonce: string | null | undefined): void {
  // A nonce is an opaque token of the server's; a bound on its size keeps a hostile one from
  // bloating every later proof.
  if (!nonce || nonce.length > 512 || state.nonces.get(key) === nonce) return;
  if (state.nonces.size >= NONCES_LIMIT && !state.nonces.has(key)) state.nonces.delete(state.nonces.keys().next().value as string);
  state.nonces.set(key, nonce);
}

async function sessionKey(sessionId: string, jwk: PrivateJwk): Promise<ReadyKey> {
  const cached = state.keys.get(sessionId);
  if (cached?.x === jwk.x) return cached;
  const ready = await readyKey(jwk);
  if (state.keys.size >= READY_KEYS_LIMIT && !state.keys.has(sessionId)) state.keys.delete(state.keys.keys().next().value as string);
  state.keys.set(sessionId, ready);
  return ready;
}

/** The session's DPoP key for a proof, or why the call cannot be made. */
function keyOf(secrets: SessionSecrets): PrivateJwk {
  // A session from before OIDC_DPOP was turned on has no key and its token is not bound: an API
  // that wants DPoP needs a new sign-in.
  if (!isPrivateJwk(secrets.dpopKey)) throw errors.reauthenticationRequired();
  return secrets.dpopKey;
}

// --- login --------------------------------------------------------------------------------------

function loginKeyName(state: string): string {
  return `${getConfig().keyPrefix}dpop-login:{${shortDigest(state)}}`;
}

async function thumbprint(jwk: PrivateJwk): Promise<string> {
  return calculateJwkThumbprint(publicJwk(jwk), 'sha256');
}

/**
 * Login start: a new key pair for the session this login will create. The private key waits in
 * the store (encrypted) for the callback, for as long as the login's transaction lives; the
 * transaction cookie carries only the thumbprint, which goes to the IdP as `dpop_jkt`.
 */
export async function beginDpopLogin(loginState: string): Promise<string> {
  const pair = await crypto.subtle.generateKey(ALGORITHM, true, ['sign', 'verify']);
  const exported = await crypto.subtle.exportKey('jwk', pair.privateKey);
  const jwk: PrivateJwk = { kty: 'EC', crv: 'P-256', x: exported.x as string, y: exported.y as string, d: exported.d as string };
  const sealed = await encryptAtRest(jwk);
  await storeCall(() => getStore().set(loginKeyName(loginState), sealed, { ttlMs: TRANSACTION_TTL_SEC * 1000 }));
  return thumbprint(jwk);
}

export interface DpopLogin {
  /** For the session's encrypted secrets. */
  key: JsonWebKey;
  /** For the code exchange. */
  handle: oauth.DPoPHandle;
}

/** The callback: takes the login's key out of the store (whatever comes next, it is used once). */
export async function finishDpopLogin(loginState: string, expectedThumbprint: string): Promise<DpopLogin> {
  const name = loginKeyName(loginState);
  const sealed = await storeCall(() => getStore().take(name));
  const jwk = sealed === null ? null : await decryptAtRest<unknown>(sealed);
  if (!isPrivateJwk(jwk) || (await thumbprint(jwk)) !== expectedThumbprint) {
    // Expired with its transaction, lost with the store, or sealed under a key rotated out.
    throw new GatehouseError('invalid_state', 400, 'This sign-in attempt is not valid any more. Start again.', {
      cause: new Error(sealed === null ? 'the login\'s DPoP key is gone from the store' : 'the login\'s DPoP key does not match its transaction'),
    });
  }
  return { key: jwk, handle: (await readyKey(jwk)).handle };
}

// --- token endpoint -----------------------------------------------------------------------------

/** The proof maker for a session's refresh grants; none without OIDC_DPOP or without a key. */
export async function sessionDpopHandle(sessionId: string, secrets: SessionSecrets): Promise<oauth.DPoPHandle | undefined> {
  if (!getConfig().oidc.dpop || !isPrivateJwk(secrets.dpopKey)) return undefined;
  return (await sessionKey(sessionId, secrets.dpopKey)).handle;
}

/**
 * One token endpoint exchange (`send`, then `check` of its answer), sent once more when the IdP
 * answers `use_dpop_nonce`: the handle has picked up the nonce from that answer. Every answer's
 * `DPoP-Nonce` is remembered for the process's other handles.
 */
export async function tokenRequestWithDpop<T>(dpop: oauth.DPoPHandle | undefined, send: () => Promise<Response>, check: (response: Response) => Promise<T>): Promise<{ response: Response; result: T }> {
  for (let attempt = 1; ; attempt++) {
    const response = await send();
    if (dpop && response.url) rememberNonce(idpNonceKey(new URL(response.url).origin), response.headers.get('dpop-nonce'));
    try {
      return { response, result: await check(response) };
    } catch (error) {
      if (!dpop || attempt > 1 || !oauth.isDPoPNonceError(error)) throw error;
      log('debug', 'token.dpop_nonce', { endpoint: 'token' });
    }
  }
}

/**
 * Why tokens the IdP issued to a DPoP request are not bound, or undefined. An IdP that does not
 * do DPoP ignores the proof and issues bearer tokens: using those would silently give up what
 * OIDC_DPOP promises.
 */
export function unboundTokenProblem(result: oauth.TokenEndpointResponse, operation: string): string | undefined {
  if (result.token_type === 'dpop') return undefined;
  const problem = `${operation}: DPoP was asked for but the IdP issued token_type ${String(result.token_type).slice(0, 20)}; enable DPoP for the client at the IdP or unset OIDC_DPOP`;
  log('error', 'token.dpop_unbound', { operation, tokenType: String(result.token_type).slice(0, 20) });
  return problem;
}

// --- the proxy ----------------------------------------------------------------------------------

/**
 * `Authorization: DPoP <token>` and a fresh proof for one upstream request: `htm`, `htu` (the URL
 * without query and fragment), `ath` (the token's SHA-256), a random `jti`, `iat` now, and the
 * API's last nonce if it sent one. One signature per request; the key import is cached.
 */
export async function dpopAuthorization(sessionId: string, secrets: SessionSecrets, token: string, method: string, url: URL, api: string): Promise<Array<[string, string]>> {
  const key = await sessionKey(sessionId, keyOf(secrets));
  if (key.ath?.token !== token) key.ath = { token, value: createHash('sha256').update(token).digest('base64url') };
  const nonce = state.nonces.get(apiNonceKey(api));
  const proof = await new SignJWT({ htm: method, htu: `${url.origin}${url.pathname}`, ath: key.ath.value, ...(nonce ? { nonce } : {}) })
    .setProtectedHeader(key.header)
    // randomUUID draws from a pre-filled entropy buffer: 122 random bits without a call into the RNG per request.
    .setJti(randomUUID())
    .setIssuedAt()
    .sign(key.privateKey);
  return [
    ['authorization', `DPoP ${token}`],
    ['dpop', proof],
  ];
}

/**
 * Reads a DPoP API's answer: remembers a `DPoP-Nonce` it sent (RFC 9449 section 9: any answer may
 * carry the next one), and says whether it refused the request for want of that nonce (401 with a
 * `DPoP` challenge `error="use_dpop_nonce"`), in which case the request may go once more.
 */
export function dpopNonceDemanded(api: string, status: number, rawHeaders: string[]): boolean {
  let nonce: string | undefined;
  let challenge = '';
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = (rawHeaders[i] as string).toLowerCase();
    if (name === 'dpop-nonce') nonce = rawHeaders[i + 1];
    else if (name === 'www-authenticate') challenge += `${rawHeaders[i + 1]},`;
  }
  rememberNonce(apiNonceKey(api), nonce);
  return status === 401 && nonce !== undefined && /(?:^|[\s,])DPoP\b/i.test(challenge) && /\berror\s*=\s*"?use_dpop_nonce\b/i.test(challenge);
}
