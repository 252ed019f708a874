import { errors as joseErrors, jwtVerify, type JWTPayload, type JWTVerifyGetKey } from 'jose';

/**
 * OIDC Back-Channel Logout 1.0, section 2.6: what makes a logout token acceptable, checked against
 * a key set the caller supplies. Fetching that key set from the IdP is `lib/oidc.ts`'s job, so
 * these checks can be exercised with any local key.
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
  /** Only for tests that pin the clock. */
  currentDate?: Date;
}

export interface LogoutTokenClaims {
  sub: string | undefined;
  sid: string | undefined;
  jti: string;
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

export async function checkLogoutToken(token: string, keys: JWTVerifyGetKey, expected: LogoutTokenExpectations): Promise<LogoutTokenClaims> {
  let payload: JWTPayload;
  try {
    ({ payload } = await jwtVerify(token, keys, {
      issuer: expected.issuer,
      audience: expected.clientId,
      algorithms: expected.algorithms,
      maxTokenAge: expected.maxAgeSec,
      clockTolerance: expected.clockToleranceSec,
      requiredClaims: ['iat', 'jti'],
      currentDate: expected.currentDate,
    }));
  } catch (error) {
    if (error instanceof joseErrors.JOSEError) throw new LogoutTokenRejected('logout_token failed JWT validation', error);
    throw error;
  }
  const events = payload.events;
  if (typeof events !== 'object' || events === null || !(BACKCHANNEL_LOGOUT_EVENT in events)) {
    throw new LogoutTokenRejected('logout_token lacks the back-channel logout event');
  }
  if ('nonce' in payload) throw new LogoutTokenRejected('logout_token must not contain a nonce');
  const sub = typeof payload.sub === 'string' && payload.sub ? payload.sub : undefined;
  const sid = typeof payload.sid === 'string' && payload.sid ? payload.sid : undefined;
  if (!sub && !sid) throw new LogoutTokenRejected('logout_token names neither sid nor sub');
  const iat = payload.iat as number;
  const replayableUntil = Math.max(typeof payload.exp === 'number' ? payload.exp : 0, iat + expected.maxAgeSec) + expected.clockToleranceSec;
  return { sub, sid, jti: payload.jti as string, replayableUntil };
}
