import { randomUUID } from 'node:crypto';
import { getConfig } from './config.ts';
import { errors } from './errors.ts';
import { log } from './log.ts';
import { idpErrorToGatehouse, refreshTokens, IdpError } from './oidc.ts';
import { destroySession, getStore, readSession, refreshLockKey, sessionHandle, storeCall, updateSessionTokens, type Session, type SessionSecrets } from './session.ts';

/**
 * Access tokens for a session, refreshed transparently and never twice for one session: requests
 * in this process share one refresh, and instances coordinate through a Redis lock that only its
 * owner releases and that expires on its own if the owner dies. Losers wait for the winner's
 * result in the store instead of calling the IdP themselves.
 *
 * A session holds one access token for the login's default audience and, for APIs configured
 * with an RFC 8707 `resource`, one per resource. They all hang off one refresh token, so they all
 * share the one lock: with rotating refresh tokens, two concurrent grants would be a replay.
 */

export interface TokenRequest {
  /** The RFC 8707 resource the token must be restricted to; none for the default token. */
  resource?: string;
  /** A token the upstream just refused: refresh even if it looks fresh, unless already replaced. */
  rejectedToken?: string;
}

interface HeldToken {
  token: string;
  expiresAt: number | null;
}

const inFlight = new Map<string, Promise<Session>>();
const POLL_MIN_MS = 25;
const POLL_MAX_MS = 250;

function heldToken(session: Session, resource: string | undefined): HeldToken | undefined {
  if (!resource) return { token: session.secrets.accessToken, expiresAt: session.record.accessTokenExpiresAt };
  const entry = session.secrets.resourceTokens?.[resource];
  return entry ? { token: entry.accessToken, expiresAt: entry.expiresAt } : undefined;
}

function isFresh(held: HeldToken | undefined, now = Date.now()): boolean {
  return held !== undefined && (held.expiresAt === null || held.expiresAt - getConfig().refresh.skewSec * 1000 > now);
}

/** A usable access token for the session (and resource), refreshing first when it expires within the skew. */
export async function getAccessToken(session: Session, request: TokenRequest = {}): Promise<{ token: string; session: Session; refreshed: boolean }> {
  const held = heldToken(session, request.resource);
  const needsRefresh = request.rejectedToken ? held?.token === request.rejectedToken : !isFresh(held);
  // Without a refresh token there is nothing to gain by ending early: use the token to its last second.
  const lastUsable = !session.secrets.refreshToken && !request.rejectedToken && held?.expiresAt != null && held.expiresAt > Date.now();
  if (held && (!needsRefresh || lastUsable)) return { token: held.token, session, refreshed: false };
  const refreshed = await refreshOnce(session, request);
  const token = heldToken(refreshed, request.resource);
  if (!token) throw errors.internal(new Error('refresh stored no token'));
  return { token: token.token, session: refreshed, refreshed: true };
}

function refreshOnce(session: Session, request: TokenRequest): Promise<Session> {
  const key = `${session.id}\u0000${request.resource ?? ''}`;
  const running = inFlight.get(key);
  if (running) return running;
  const flight = refreshAcrossInstances(session, request).finally(() => inFlight.delete(key));
  inFlight.set(key, flight);
  return flight;
}

/** Done when the stored token is no longer the one we found wanting. */
function isSettled(current: Session, stale: Session, request: TokenRequest): boolean {
  const now = heldToken(current, request.resource);
  if (request.rejectedToken) return now !== undefined && now.token !== request.rejectedToken;
  return isFresh(now) || (now !== undefined && now.token !== heldToken(stale, request.resource)?.token);
}

async function refreshAcrossInstances(stale: Session, request: TokenRequest): Promise<Session> {
  const { lockLeaseMs } = getConfig().refresh;
  const lockKey = refreshLockKey(stale.id);
  // A waiter gives up a little after a dead owner's lease would have run out.
  const deadline = Date.now() + lockLeaseMs + 2_000;
  let pause = POLL_MIN_MS;
  for (;;) {
    const owner = randomUUID();
    const acquired = await storeCall(() => getStore().set(lockKey, owner, { ttlMs: lockLeaseMs, onlyIfAbsent: true }));
    if (acquired) {
      // The lock is held until the grant settles, not until the caller stops waiting; a failed
      // release is harmless, the lease expires on its own.
      const grant = refreshUnderLock(stale, request).finally(() => getStore().delIfEquals(lockKey, owner).catch(() => undefined));
      return answerWithin(grant, getConfig().oidc.timeoutMs);
    }
    await new Promise((resolve) => setTimeout(resolve, pause));
    pause = Math.min(pause * 2, POLL_MAX_MS);
    const current = await readSession(stale.id);
    if (!current) throw errors.sessionExpired();
    if (isSettled(current, stale, request)) return current;
    if (Date.now() > deadline) throw errors.idpUnavailable(new Error('timed out waiting for another instance to refresh'));
  }
}

/**
 * The caller hears "IdP unavailable" after the usual IdP timeout, but the grant itself runs on
 * until just before the lease ends. A stalled IdP that answers late still gets its rotated tokens
 * stored; giving up on the request would strand them, and the next refresh would be a replay that
 * makes the IdP revoke the whole grant.
 */
function answerWithin(grant: Promise<Session>, timeoutMs: number): Promise<Session> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(errors.idpUnavailable(new Error('refresh still running'))), timeoutMs);
  });
  return Promise.race([grant, deadline]).finally(() => clearTimeout(timer));
}

function grantTimeoutMs(): number {
  const { refresh, oidc } = getConfig();
  return Math.max(oidc.timeoutMs, refresh.lockLeaseMs - 1_000);
}

async function refreshUnderLock(stale: Session, request: TokenRequest): Promise<Session> {
  // Another instance may have finished a refresh between our read and our lock.
  const current = await readSession(stale.id);
  if (!current) throw errors.sessionExpired();
  if (isSettled(current, stale, request)) return current;

  const started = performance.now();
  const outcome = (result: string) => ({ session: sessionHandle(current.id), resource: request.resource, outcome: result, ms: Math.round(performance.now() - started) });
  const refreshToken = current.secrets.refreshToken;
  if (!refreshToken) {
    log('info', 'token.refresh', outcome('no_refresh_token'));
    await destroySession(current.id, current.record);
    throw errors.sessionExpired();
  }
  try {
    const tokens = await refreshTokens(refreshToken, current.record.sub, { resource: request.resource, timeoutMs: grantTimeoutMs() });
    const secrets: SessionSecrets = {
      ...current.secrets,
      // Without rotation the IdP returns no new refresh token: keep using the old one.
      refreshToken: tokens.refreshToken ?? refreshToken,
      idToken: tokens.idToken ?? current.secrets.idToken,
    };
    let accessTokenExpiresAt = current.record.accessTokenExpiresAt;
    if (request.resource) {
      secrets.resourceTokens = { ...secrets.resourceTokens, [request.resource]: { accessToken: tokens.accessToken, expiresAt: tokens.accessTokenExpiresAt } };
    } else {
      secrets.accessToken = tokens.accessToken;
      accessTokenExpiresAt = tokens.accessTokenExpiresAt;
    }
    const updated = await updateSessionTokens(current, secrets, accessTokenExpiresAt);
    log('info', 'token.refresh', outcome(updated ? 'ok' : 'session_gone'));
    if (!updated) throw errors.sessionExpired();
    return updated;
  } catch (error) {
    if (error instanceof IdpError) {
      log('warn', 'token.refresh', outcome(error.kind));
      if (error.kind === 'invalid_grant') await destroySession(current.id, current.record);
      throw idpErrorToGatehouse(error);
    }
    throw error;
  }
}
