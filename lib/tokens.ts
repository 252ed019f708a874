import { createHash, randomUUID } from 'node:crypto';
import { getConfig } from './config.ts';
import { errors } from './errors.ts';
import { log } from './log.ts';
import { idpErrorToGatehouse, refreshTokens, IdpError } from './oidc.ts';
import { destroySession, getStore, readSession, refreshLockKey, storeCall, updateSessionTokens, type Session } from './session.ts';

/**
 * Access tokens for a session, refreshed transparently and never twice for one session: requests
 * in this process share one refresh, and instances coordinate through a Redis lock that only its
 * owner releases and that expires on its own if the owner dies. Losers wait for the winner's
 * result in the store instead of calling the IdP themselves.
 */

const inFlight = new Map<string, Promise<Session>>();
const POLL_MIN_MS = 25;
const POLL_MAX_MS = 250;

export function sessionHash(id: string): string {
  return createHash('sha256').update(id).digest('base64url').slice(0, 12);
}

function isFresh(session: Session, now = Date.now()): boolean {
  const expiresAt = session.record.accessTokenExpiresAt;
  return expiresAt === null || expiresAt - getConfig().refresh.skewSec * 1000 > now;
}

/**
 * A usable access token for the session, refreshing first when it expires within the skew.
 * `rejectedToken` is a token the upstream just refused: refresh even if it looks fresh, unless
 * another request already replaced it.
 */
export async function getAccessToken(session: Session, rejectedToken?: string): Promise<{ token: string; session: Session; refreshed: boolean }> {
  const needsRefresh = rejectedToken ? session.secrets.accessToken === rejectedToken : !isFresh(session);
  const expiresAt = session.record.accessTokenExpiresAt;
  // Without a refresh token there is nothing to gain by ending early: use the token to its last second.
  const lastUsable = !session.secrets.refreshToken && !rejectedToken && expiresAt !== null && expiresAt > Date.now();
  if (!needsRefresh || lastUsable) return { token: session.secrets.accessToken, session, refreshed: false };
  const refreshed = await refreshOnce(session, rejectedToken);
  return { token: refreshed.secrets.accessToken, session: refreshed, refreshed: true };
}

function refreshOnce(session: Session, rejectedToken?: string): Promise<Session> {
  const running = inFlight.get(session.id);
  if (running) return running;
  const flight = refreshAcrossInstances(session, rejectedToken).finally(() => inFlight.delete(session.id));
  inFlight.set(session.id, flight);
  return flight;
}

/** Done when the stored token is no longer the one we found wanting. */
function isSettled(current: Session, stale: Session, rejectedToken: string | undefined): boolean {
  if (rejectedToken) return current.secrets.accessToken !== rejectedToken;
  return isFresh(current) || current.secrets.accessToken !== stale.secrets.accessToken;
}

async function refreshAcrossInstances(stale: Session, rejectedToken: string | undefined): Promise<Session> {
  const { lockLeaseMs } = getConfig().refresh;
  const lockKey = refreshLockKey(stale.id);
  // A waiter gives up a little after a dead owner's lease would have run out.
  const deadline = Date.now() + lockLeaseMs + 2_000;
  let pause = POLL_MIN_MS;
  for (;;) {
    const owner = randomUUID();
    const acquired = await storeCall(() => getStore().set(lockKey, owner, { ttlMs: lockLeaseMs, onlyIfAbsent: true }));
    if (acquired) {
      try {
        return await refreshUnderLock(stale, rejectedToken);
      } finally {
        await getStore()
          .delIfEquals(lockKey, owner)
          .catch(() => undefined); // the lease expires on its own
      }
    }
    await new Promise((resolve) => setTimeout(resolve, pause));
    pause = Math.min(pause * 2, POLL_MAX_MS);
    const current = await readSession(stale.id);
    if (!current) throw errors.sessionExpired();
    if (isSettled(current, stale, rejectedToken)) return current;
    if (Date.now() > deadline) throw errors.idpUnavailable(new Error('timed out waiting for another instance to refresh'));
  }
}

async function refreshUnderLock(stale: Session, rejectedToken: string | undefined): Promise<Session> {
  // Another instance may have finished a refresh between our read and our lock.
  const current = await readSession(stale.id);
  if (!current) throw errors.sessionExpired();
  if (isSettled(current, stale, rejectedToken)) return current;

  const started = performance.now();
  const hash = sessionHash(current.id);
  const refreshToken = current.secrets.refreshToken;
  if (!refreshToken) {
    log('info', 'token.refresh', { session: hash, outcome: 'no_refresh_token', ms: 0 });
    await destroySession(current.id, current.record);
    throw errors.sessionExpired();
  }
  try {
    const tokens = await refreshTokens(refreshToken, current.record.sub);
    const secrets = {
      ...current.secrets,
      accessToken: tokens.accessToken,
      // Without rotation the IdP returns no new refresh token: keep using the old one.
      refreshToken: tokens.refreshToken ?? refreshToken,
      idToken: tokens.idToken ?? current.secrets.idToken,
    };
    const updated = await updateSessionTokens(current, secrets, tokens.accessTokenExpiresAt);
    log('info', 'token.refresh', { session: hash, outcome: updated ? 'ok' : 'session_gone', ms: Math.round(performance.now() - started) });
    if (!updated) throw errors.sessionExpired();
    return updated;
  } catch (error) {
    if (error instanceof IdpError) {
      log('warn', 'token.refresh', { session: hash, outcome: error.kind, ms: Math.round(performance.now() - started) });
      if (error.kind === 'invalid_grant') await destroySession(current.id, current.record);
      throw idpErrorToGatehouse(error);
    }
    throw error;
  }
}
