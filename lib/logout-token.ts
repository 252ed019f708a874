import { errors as joseErrors, jwtVerify, type JWTPayload, type JWTVerifyGetKey, type ProtectedHeaderParameters } from 'jose';

/**
 * OIDC Back-Channel Logout 1.0, sections 2.4 and 2.6: what makes a logout token acceptable,
 * checked against a key set the caller supplies. Fetching that key set from the IdP is
 * `lib/oidc.ts`'s job, so these checks can be exercised with any local key.
 */

export const BACKCHANNEL_LOGOUT_EVENT = 'http://schemas.openid.net/event/backchannel-logout';

export interface LogoutTokenExpectations {
  issuer: string;
  clientId: string;
  /** Asymmetric algorithms the IdP may sign with. */
  algorithms: string[];
  /** How long after `iat` a token is still accepted. */
  maxAgeSec: number;
  clockToleranceSec: number;
  /**
   * The key set was fetched so recently that a token naming a key not in it does not get it fetched
   * again (jose's cooldown): the IdP may have rotated to that key since, so no match is no verdict.
   */
  keysMayPredateToken?: boolean;
  /** Only for tests that pin the clock. */
  currentDate?: Date;
}

export interface LogoutTokenClaims {
  sub: string | undefined;
  sid: string | undefined;
  jti: string;
  /** When the IdP issued it (NumericDate): the logout happened then, and sessions begun later are not its. */
  issuedAt: number;
  /** Until when the token could be presented again: the replay marker must live this long. */
  replayableUntil: number;
}

/** The only error `checkLogoutToken` throws: whatever is wrong with the token, it is refused. */
export class LogoutTokenRejected extends Error {
  constructor(message: string, cause?: unknown) {
    super(message, { cause });
    this.name = 'LogoutTokenRejected';
  }
}

/**
 * Explicit typing (section 4.1, RFC 8725 3.11) says `logout+jwt`; IdPs that predate it send `JWT`
 * or no `typ`, and the events and nonce checks still tell those from an ID token. Any other type
 * names another kind of token (`at+jwt` is an access token) and is refused.
 */
const ACCEPTED_TYPES = new Set(['logout+jwt', 'jwt']);

export async function checkLogoutToken(token: string, keys: JWTVerifyGetKey, expected: LogoutTokenExpectations): Promise<LogoutTokenClaims> {
  const { payload, protectedHeader } = await verifySignatureAndTimes(token, keys, expected);
  checkType(protectedHeader);
  checkAudience(payload.aud, expected.clientId);
  const { iat, exp } = checkLifetime(payload);
  checkEvents(payload.events);
  // A nonce would let the token pass for an ID token in a forged authentication response.
  if (Object.hasOwn(payload, 'nonce')) throw new LogoutTokenRejected('logout_token must not contain a nonce');
  const jti = payload.jti;
  if (typeof jti !== 'string' || !jti) throw new LogoutTokenRejected('logout_token jti is not a non-empty string');
  const { sub, sid } = readSubject(payload);
  // jose refuses the token once exp or the iat window has passed, whichever comes first.
  const replayableUntil = Math.min(exp, iat + expected.maxAgeSec) + expected.clockToleranceSec;
  return { sub, sid, jti, issuedAt: iat, replayableUntil };
}

/** Signature (given keys and algorithms only), iss, and jose's range checks of iat and exp. */
async function verifySignatureAndTimes(token: string, keys: JWTVerifyGetKey, expected: LogoutTokenExpectations) {
  try {
    return await jwtVerify(token, keys, {
      issuer: expected.issuer,
      algorithms: expected.algorithms,
      maxTokenAge: expected.maxAgeSec,
      clockTolerance: expected.clockToleranceSec,
      requiredClaims: ['iat', 'exp', 'jti'],
      currentDate: expected.currentDate,
    });
  } catch (error) {
    const undecided = error instanceof joseErrors.JWKSNoMatchingKey && expected.keysMayPredateToken;
    if (error instanceof joseErrors.JOSEError && !JWKS_UNREACHABLE.has(error.code) && !undecided) throw new LogoutTokenRejected(`logout_token failed JWT validation: ${error.code}`, error);
    throw error;
  }
}

/**
 * jose's word that the IdP's key set could not be fetched (a timeout, an answer other than 200 or
 * not JSON), which says nothing of the token: the IdP should hear a retryable failure, not a refusal.
 */
const JWKS_UNREACHABLE = new Set([joseErrors.JWKSTimeout.code, joseErrors.JOSEError.code]);

function checkType(header: ProtectedHeaderParameters): void {
  if (!Object.hasOwn(header, 'typ')) return;
  const type = typeof header.typ === 'string' ? header.typ.toLowerCase().replace(/^application\//, '') : undefined;
  if (!type || !ACCEPTED_TYPES.has(type)) throw new LogoutTokenRejected('logout_token typ names another kind of token');
}

/**
 * OIDC Core 3.1.3.7, which section 2.6 applies: we must be an audience and no untrusted party may
 * be one too. jose's `audience` option only asks for the first, so this is checked here.
 */
function checkAudience(aud: unknown, clientId: string): void {
  const only = Array.isArray(aud) && aud.length === 1 ? aud[0] : aud;
  if (only !== clientId) throw new LogoutTokenRejected('logout_token aud is not exactly this client');
}

/** jose has checked both are numbers in range; a token that expires before it was issued is malformed. */
function checkLifetime(payload: JWTPayload): { iat: number; exp: number } {
  const { iat, exp } = payload as { iat: number; exp: number };
  if (exp <= iat) throw new LogoutTokenRejected('logout_token exp is not after iat');
  return { iat, exp };
}

function isJsonObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** `events` is a JSON object whose back-channel logout member is itself a JSON object (section 2.4). */
function checkEvents(events: unknown): void {
  if (!isJsonObject(events) || !Object.hasOwn(events, BACKCHANNEL_LOGOUT_EVENT) || !isJsonObject(events[BACKCHANNEL_LOGOUT_EVENT])) {
    throw new LogoutTokenRejected('logout_token lacks the back-channel logout event object');
  }
}

/** sub and/or sid; one that is present but not a non-empty string makes the token malformed. */
function readSubject(payload: JWTPayload): { sub: string | undefined; sid: string | undefined } {
  const read = (name: 'sub' | 'sid') => {
    if (!Object.hasOwn(payload, name)) return undefined;
    const value = payload[name];
    if (typeof value !== 'string' || !value) throw new LogoutTokenRejected(`logout_token ${name} is not a non-empty string`);
    return value;
  };
  const sub = read('sub');
  const sid = read('sid');
  if (!sub && !sid) throw new LogoutTokenRejected('logout_token names neither sid nor sub');
  return { sub, sid };
}
