import { randomUUID } from 'node:crypto';
import { getConfig, type TokenExchangeTarget } from './config.ts';
import { sessionDpopHandle } from './dpop.ts';
import { GatehouseError, errors } from './errors.ts';
import { log } from './log.ts';
import { sharedState } from './shared-state.ts';
import { countRefreshDeferred, noteOnSpan, observeLockWait, observeRefresh, type RefreshKind } from './telemetry.ts';
import { exchangeErrorToGatehouse, exchangeToken, idpErrorCode, idpErrorToGatehouse, refreshTokens, revokeToken, IdpError, type TokenSet } from './oidc.ts';
import {
  endedSessionError,
  expireSessionIfUnchanged,
  forcedRefreshKey,
  getStore,
  loadSession,
  readSession,
  refreshLockKey,
  sealSessionTokens,
  sessionHandle,
  sessionKey,
  storeCall,
  writeSessionTokens,
  type Session,
  type SessionSecrets,
  servedElsewhere,
  grantKeptAtEnd,
  readLatest,
} from './session.ts';

/**
 * Access tokens for a session, refreshed transparently and never twice for one session: requests
 * in this process share one refresh, and instances coordinate through a Redis lock that only its
 * owner releases and that expires on its own if the owner dies. Losers wait for the winner's
 * result in the store instead of calling the IdP themselves.
 *
 * A session holds one access token for the login's default audience and, for APIs configured
 * with an RFC 8707 `resource`, one per resource. They all hang off one refresh token, so they all
 * share the one lock: with rotating refresh tokens, two concurrent grants would be a replay.
 *
 * APIs configured with `tokenExchange` get a token of their own by RFC 8693 token exchange, with
 * the session's own access token as the subject. Those are renewed under the same lock and rules:
 * the subject may need a refresh first, and a burst of calls must cost the IdP one exchange.
 */

export interface TokenRequest {
  /** The RFC 8707 resource the token must be restricted to; none for the default token. */
  resource?: string;
  /** RFC 8693: a token for this audience, exchanged for the session's own (config never sets both). */
  exchange?: TokenExchangeTarget;
  /** A token the upstream just refused: refresh even if it looks fresh, unless already replaced. */
  rejectedToken?: string;
}

interface HeldToken {
  token: string;
  expiresAt: number | null;
}

/** Per process, not per module copy: one refresh per session and process (see shared-state.ts). */
const inFlight = sharedState('refreshes-in-flight', () => new Map<string, Flight>());

/**
 * One refresh of one session (and resource) in this process, and what it waits on right now, so a
 * caller who stops waiting hears what is slow: the store (`store_unavailable`, e.g. Redis
 * restarting) while a store call of ours has been outstanding for a while, otherwise the IdP
 * (`idp_unavailable`): our own grant, or another instance's that we wait for.
 */
interface Flight {
  result: Promise<Session>;
  waitingOn: 'store' | 'idp';
  /** What the first caller to stop waiting heard: later callers with a token to go on with do not wait. */
  overdue?: GatehouseError;
}

const SLOW_STORE_MS = 100;

async function onStore<T>(flight: Flight, call: () => Promise<T>): Promise<T> {
  // A healthy store answers within a few ms: only a call still pending after that counts.
  const slow = setTimeout(() => (flight.waitingOn = 'store'), SLOW_STORE_MS);
  try {
    return await call();
  } finally {
    clearTimeout(slow);
    flight.waitingOn = 'idp';
  }
}
const POLL_MIN_MS = 25;
const POLL_MAX_MS = 250;

/** The session's own token: the default audience's, and the subject of every exchange. */
const SESSION_TOKEN: TokenRequest = {};

/** Audience and scope both shape an exchanged token, so both name it (the separator is no URI's or scope's). */
function exchangedTokenKey(target: TokenExchangeTarget): string {
  return `${target.audience}\u0000${target.scope ?? ''}`;
}

/** Which of the session's tokens a request is about: its key in the in-process flights. */
function tokenSlot(request: TokenRequest): string {
  if (request.exchange) return `exchange\u0000${exchangedTokenKey(request.exchange)}`;
  return request.resource ?? '';
}

function heldToken(session: Session, request: TokenRequest): HeldToken | undefined {
  const entry = request.exchange
    ? session.secrets.exchangedTokens?.[exchangedTokenKey(request.exchange)]
    : request.resource
      ? session.secrets.resourceTokens?.[request.resource]
      : { accessToken: session.secrets.accessToken, expiresAt: session.record.accessTokenExpiresAt };
  return entry ? { token: entry.accessToken, expiresAt: entry.expiresAt } : undefined;
}

function isFresh(held: HeldToken | undefined, now = Date.now()): boolean {
  return held !== undefined && (held.expiresAt === null || held.expiresAt - getConfig().refresh.skewSec * 1000 > now);
}

/**
 * A token due for refresh still works until it expires. When the refresh meets a transient fault
 * (the IdP or the store away or slow), a token with more than this left when it goes out is used
 * as it is, as mod_auth_openidc and oauth2-proxy do: an outage then costs calls only once tokens
 * really expire. The margin covers the trip to the upstream and a little clock difference with it.
 */
const STILL_USABLE_FOR_MS = 5_000;

/**
 * After such a fault this process leaves that token's refresh alone for the IdP's Retry-After, but
 * at least this and at most a minute, and uses the token: otherwise every call during an outage
 * would ask the IdP again, or wait REFRESH_WAIT_MS for an IdP that stalls, before using it anyway.
 */
const MIN_REFRESH_PAUSE_MS = 5_000;
const MAX_REFRESH_PAUSE_MS = 60_000;
const MAX_REFRESH_PAUSES = 10_000;

/**
 * A pause holds for the token it was made for only: a token refreshed since is a new one. A token
 * the upstream refused (its forced refresh failed) is never used meanwhile, paused or not.
 */
interface RefreshPause {
  until: number;
  token: string;
  refused: boolean;
}

/** Per process, by refresh key (session and token slot). */
const refreshPauses = sharedState('refresh-pauses', () => ({ byKey: new Map<string, RefreshPause>(), sweptAt: 0 }));

function isTransientFault(error: unknown): error is GatehouseError {
  return error instanceof GatehouseError && (error.code === 'idp_unavailable' || error.code === 'store_unavailable');
}

function lastsToBeSent(held: HeldToken): boolean {
  return held.expiresAt === null || held.expiresAt - STILL_USABLE_FOR_MS > Date.now();
}

function pauseOf(key: string, token: string): RefreshPause | undefined {
  const pause = refreshPauses.byKey.get(key);
  if (pause === undefined) return undefined;
  if (pause.until <= Date.now()) {
    refreshPauses.byKey.delete(key);
    return undefined;
  }
  return pause.token === token ? pause : undefined;
}

/** Until when a fault's pause lasts: the IdP's Retry-After, within bounds. */
function pauseAfter(fault: GatehouseError): number {
  return Date.now() + Math.min(Math.max((fault.retryAfterSec ?? 0) * 1000, MIN_REFRESH_PAUSE_MS), MAX_REFRESH_PAUSE_MS);
}

/**
 * Records a pause; a refused token is kept from use for as long as a pause can last (it will not
 * work again), and a pause after a fault never lifts that.
 */
function pauseRefresh(key: string, token: string, until: number | 'refused'): void {
  const { byKey } = refreshPauses;
  const now = Date.now();
  const refused = until === 'refused';
  const existing = byKey.get(key);
  if (!refused && existing?.refused && existing.token === token && existing.until > now) return;
  // A sweep at most once a second: a wide outage fills this while the process is busiest.
  if (byKey.size >= MAX_REFRESH_PAUSES && now - refreshPauses.sweptAt > 1_000) {
    refreshPauses.sweptAt = now;
    for (const [other, pause] of byKey) if (pause.until <= now) byKey.delete(other);
  }
  if (byKey.size >= MAX_REFRESH_PAUSES && existing === undefined) {
    // Still full (an outage across that many sessions at once): a pause after a fault is simply not
    // kept, while a refused token takes the place of one.
    if (!refused) return;
    for (const [other, pause] of byKey) {
      if (pause.refused) continue;
      byKey.delete(other);
      break;
    }
    if (byKey.size >= MAX_REFRESH_PAUSES) return;
  }
  byKey.set(key, { until: refused ? now + MAX_REFRESH_PAUSE_MS : until, token, refused });
}

/**
 * The session as its store holds it now, read as the proxy's hot path reads it, if it still holds
 * `token`: a session ended (logout, a new login, a back-channel logout) or renewed while a call
 * waited must not have its old token sent. Undefined when the store cannot say promptly.
 */
async function stillHolding(session: Session, request: TokenRequest, token: string): Promise<Session | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<undefined>((resolve) => (timer = setTimeout(resolve, SLOW_STORE_MS * 2, undefined)));
  const read = loadSession(session.id, { coherentCopy: true }).then(
    (loaded) => loaded.session ?? undefined,
    () => undefined,
  );
  const current = await Promise.race([read, late]).finally(() => clearTimeout(timer));
  return current && heldToken(current, request)?.token === token ? current : undefined;
}

/**
 * A usable access token for the session (and resource), refreshing first when it expires within
 * the skew. A refresh that meets a transient fault answers the token held instead while that will
 * still have STILL_USABLE_FOR_MS to run when it goes out, the store still holds it, and the
 * upstream has not refused it.
 */
export async function getAccessToken(session: Session, request: TokenRequest = SESSION_TOKEN): Promise<{ token: string; session: Session; refreshed: boolean }> {
  const held = heldToken(session, request);
  // An exchange needs no refresh token, only a subject that still works: the lock's work checks that.
  if (!session.secrets.refreshToken && !request.exchange) return { ...(await usableWithoutRefresh(session, held, request)), refreshed: false };
  const needsRefresh = request.rejectedToken ? held?.token === request.rejectedToken : !isFresh(held);
  if (held && !needsRefresh) return { token: held.token, session, refreshed: false };
  const key = refreshKey(session, request);
  // Before anything waits: no call of this session in this process falls back to a refused token.
  if (request.rejectedToken) pauseRefresh(key, request.rejectedToken, 'refused');
  const pause = held && pauseOf(key, held.token);
  const fallback = held && !request.rejectedToken && !pause?.refused && lastsToBeSent(held) ? held : undefined;
  if (fallback && pause) return { token: fallback.token, session, refreshed: false };
  // A refresh already running was begun for the token some other call held, which may be older.
  const joined = inFlight.has(key);
  const flight = refreshOnce(session, request, key);
  finishEvenIfUnanswered(flight.result);
  const { waitMs } = getConfig().refresh;
  let refreshed: Session;
  try {
    // A refresh some caller has already waited out is not waited for again by one that can do without.
    if (fallback && flight.overdue) throw flight.overdue;
    // Waited for no longer than the token held would then still be worth sending (with time to check the store).
    refreshed = await answerWithin(flight, fallback?.expiresAt ? Math.min(waitMs, fallback.expiresAt - STILL_USABLE_FOR_MS - 500 - Date.now()) : waitMs);
    // Joined a refresh another call began for an older token, which found the refused one stored
    // (by another instance) and took it as done: this call's refresh is still to be made.
    if (joined && request.rejectedToken && heldToken(refreshed, request)?.token === request.rejectedToken) refreshed = await answerWithin(refreshOnce(refreshed, request, key), waitMs);
  } catch (error) {
    if (!fallback || !isTransientFault(error)) throw error;
    const current = await stillHolding(session, request, fallback.token);
    // Judged after the store's answer: the token's time, and a refusal that came meanwhile.
    if (!current || !lastsToBeSent(fallback) || pauseOf(key, fallback.token)?.refused) throw error;
    // Counted and logged once per refresh put off, not once per call that waited on it.
    const first = pauseOf(key, fallback.token) === undefined;
    pauseRefresh(key, fallback.token, pauseAfter(error));
    noteOnSpan({ 'gatehouse.token.refresh_deferred': error.code });
    if (first) {
      countRefreshDeferred(refreshKind(request), error.code);
      log('warn', 'token.refresh_deferred', { session: sessionHandle(session.id), ...grantTarget(request), cause: error.code, expiresInSec: fallback.expiresAt === null ? undefined : Math.round((fallback.expiresAt - Date.now()) / 1000) });
    }
    return { token: fallback.token, session: current, refreshed: false };
  }
  const token = heldToken(refreshed, request);
  if (!token) throw errors.internal(new Error('refresh stored no token'));
  return { token: token.token, session: refreshed, refreshed: true };
}

/**
 * Without a refresh token a token is used to its last second: nothing is gained by ending early.
 * Past that, the session ends only once its own access token has expired; a resource token it
 * never got, or a refused token it cannot replace, fails just that call and keeps the session.
 * Answers the token with the session it came from, which is the stored one when the record had moved on.
 */
async function usableWithoutRefresh(session: Session, held: HeldToken | undefined, request: TokenRequest, judgedBefore = false): Promise<{ token: string; session: Session }> {
  const now = Date.now();
  if (held && !request.rejectedToken && (held.expiresAt === null || held.expiresAt > now)) return { token: held.token, session };
  const expiresAt = session.record.accessTokenExpiresAt;
  if (expiresAt === null || expiresAt > now) throw errors.reauthenticationRequired();
  log('info', 'token.refresh', { session: sessionHandle(session.id), resource: request.resource, outcome: 'no_refresh_token' });
  const ended = await expireSessionIfUnchanged(session.id, session.record);
  if (ended) throw ended;
  if (judgedBefore) throw renewedElsewhere();
  // The record moved on since it was read (a copy a moment old, or a write elsewhere): judged once more on what is stored now.
  const stored = await storedSession(session.id);
  return usableWithoutRefresh(stored, heldToken(stored, request), request, true);
}

/**
 * A session found renewed by another instance when its tokens were judged spent (the record moved
 * on while this instance's lease had run out): it stays, and the caller retries with its new tokens.
 */
function renewedElsewhere(cause?: unknown): GatehouseError {
  return errors.idpUnavailable(cause ?? new Error('the session was renewed elsewhere meanwhile'), 1);
}

/**
 * A token in place of one an upstream refused: a forced refresh (see mayForceRefresh), or, when
 * the interval's is spent, the token another call's refresh (a call refused alongside, in any
 * instance) has stored since, read from the primary; undefined when there is neither.
 */
export async function replaceRefusedToken(session: Session, request: TokenRequest, refused: string): Promise<{ token: string; session: Session; refreshed: boolean } | undefined> {
  if (await mayForceRefresh(session, request)) return { ...(await getAccessToken(session, { ...request, rejectedToken: refused })), refreshed: true };
  const current = (await loadSession(session.id, { latest: true }).catch(() => undefined))?.session;
  const held = current ? heldToken(current, request) : undefined;
  if (!current || !held || held.token === refused || (held.expiresAt !== null && held.expiresAt <= Date.now())) return undefined;
  return { token: held.token, session: current, refreshed: false };
}

/**
 * An upstream 401 may force a refresh at most once per session per FORCED_REFRESH_INTERVAL, across
 * instances (one SET NX PX, on the 401 path only), so an API that answers 401 to everything cannot
 * drive the IdP at the browser's request rate. False, too, when there is nothing to refresh with
 * or the store cannot say: the upstream's 401 then goes back unchanged. An exchanged token can be
 * replaced without a refresh token while the session's own token lasts, so one exchange is allowed.
 */
export async function mayForceRefresh(session: Session, request: TokenRequest = SESSION_TOKEN): Promise<boolean> {
  const expiresAt = session.record.accessTokenExpiresAt;
  const subjectLasts = expiresAt === null || expiresAt > Date.now();
  if (!session.secrets.refreshToken && !(request.exchange && subjectLasts)) return false;
  const ttlMs = getConfig().refresh.forcedIntervalSec * 1000;
  return getStore()
    .set(forcedRefreshKey(session.id), '1', { ttlMs, onlyIfAbsent: true })
    .catch(() => false);
}

/** One session's one token: what refreshes in this process are shared and paused by. */
function refreshKey(session: Session, request: TokenRequest): string {
  return `${session.id}\u0000${tokenSlot(request)}`;
}

function refreshKind(request: TokenRequest): RefreshKind {
  return request.exchange ? 'exchange' : request.resource ? 'resource' : 'session';
}

function refreshOnce(session: Session, request: TokenRequest, key: string): Flight {
  const running = inFlight.get(key);
  if (running) return running;
  const flight: Flight = { result: Promise.resolve(session), waitingOn: 'idp' };
  flight.result = observeRefresh(refreshKind(request), () => refreshAcrossInstances(session, request, flight)).finally(() => inFlight.delete(key));
  inFlight.set(key, flight);
  return flight;
}

/** Done when the stored token is no longer the one we found wanting. */
function isSettled(current: Session, stale: Session, request: TokenRequest): boolean {
  const now = heldToken(current, request);
  if (request.rejectedToken) return now !== undefined && now.token !== request.rejectedToken;
  return isFresh(now) || (now !== undefined && now.token !== heldToken(stale, request)?.token);
}

async function refreshAcrossInstances(stale: Session, request: TokenRequest, flight: Flight): Promise<Session> {
  // One owner id for every attempt of this flight, so an attempt can recognise a lock it took itself.
  const owner = randomUUID();
  const waited = await observeLockWait(
    () => waitForLock(stale, request, flight, owner),
    (result) => (result === LOCK_ACQUIRED ? 'acquired' : 'settled'),
  );
  return waited === LOCK_ACQUIRED ? refreshHoldingLock(stale, request, owner, flight) : waited;
}

const LOCK_ACQUIRED = Symbol('lock acquired');

/**
 * SET NX of the session's refresh lock for a full lease. "Taken" may mean taken by us: a client
 * that lost a connection mid-command sends it again once reconnected, and the resent SET NX finds
 * the lock the first one set. Compare-and-renew tells.
 */
async function takeLock(id: string, owner: string): Promise<boolean> {
  const { lockLeaseMs: ttlMs } = getConfig().refresh;
  return (await getStore().set(refreshLockKey(id), owner, { ttlMs, onlyIfAbsent: true })) || getStore().expireIfEquals(refreshLockKey(id), owner, ttlMs);
}

/** Takes the session's refresh lock, or finds the session refreshed by whoever held it meanwhile. */
async function waitForLock(stale: Session, request: TokenRequest, flight: Flight, owner: string): Promise<typeof LOCK_ACQUIRED | Session> {
  const { lockLeaseMs } = getConfig().refresh;
  // A waiter gives up a little after a dead owner's lease would have run out.
  const deadline = Date.now() + lockLeaseMs + 2_000;
  let pause = POLL_MIN_MS;
  for (;;) {
    let acquired: boolean;
    try {
      acquired = await onStore(flight, () => storeCall(() => takeLock(stale.id, owner)));
    } catch (error) {
      // The store may have taken the lock and lost only its answer (a connection cut, a master
      // killed before it replied but after its replica had the write): nobody would release it, and
      // every call of this session would wait out the whole lease. Ours to release, if it is ours.
      finishEvenIfUnanswered(releaseLock(stale.id, owner));
      throw error;
    }
    if (acquired) return LOCK_ACQUIRED;
    await new Promise((resolve) => setTimeout(resolve, pause));
    pause = Math.min(pause * 2, POLL_MAX_MS);
    const current = await onStore(flight, () => storedSession(stale.id));
    if (isSettled(current, stale, request)) return current;
    if (Date.now() > deadline) throw errors.idpUnavailable(new Error('timed out waiting for another instance to refresh'));
  }
}

/**
 * A refresh its caller stopped waiting for must still finish and store its tokens. A Node host's
 * process lives on; a serverless function (Vercel) is frozen once it has answered unless Next is
 * told about the work. So the route handler hands over Next's `after` here (importing it in this
 * file would break `npm start`, whose server.ts loads lib/ outside Next's runtime).
 */
let finishAfterResponse: ((work: Promise<unknown>) => void) | undefined;

export function finishRefreshesWith(runner: (work: Promise<unknown>) => void): void {
  finishAfterResponse = runner;
}

function finishEvenIfUnanswered(work: Promise<unknown>): void {
  try {
    finishAfterResponse?.(
      work.then(
        () => undefined,
        () => undefined,
      ),
    );
  } catch {
    // Outside a Next request scope: nothing freezes this process.
  }
}

/**
 * A caller waits REFRESH_WAIT_MS for a refresh — its own, one another request of this process
 * started, or another instance's — then hears "IdP unavailable, retry shortly", while the work
 * under the lock runs on until its own deadline. A stalled IdP that answers late still gets its
 * rotated tokens stored (giving up on the grant would strand them, and the next refresh would be a
 * replay that makes the IdP revoke the whole grant); the caller's retry then finds them.
 */
function answerWithin(flight: Flight, waitMs: number): Promise<Session> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const cause = new Error(`refresh still running (waiting on the ${flight.waitingOn})`);
      const retryAfterSec = Math.max(1, Math.ceil(waitMs / 1000));
      flight.overdue = flight.waitingOn === 'idp' ? errors.idpUnavailable(cause, retryAfterSec) : errors.storeUnavailable(cause, retryAfterSec);
      reject(flight.overdue);
    }, waitMs);
  });
  return Promise.race([flight.result, deadline]).finally(() => clearTimeout(timer));
}

/**
 * One deadline, counted from the lock's acquisition, for everything done under it: a discovery
 * refetch and the grant may each take the IdP timeout (or together the lease less a second, when
 * that is longer). The lease is renewed meanwhile, so no other instance takes over a live owner's
 * lock; the deadline is what keeps a live owner from holding it for ever.
 */
function lockedWorkMs(): number {
  const { refresh, oidc } = getConfig();
  return Math.max(2 * oidc.timeoutMs, refresh.lockLeaseMs - 1_000);
}

interface HeldLock {
  owner: string;
  /** Stops the IdP calls: at the work's deadline, or once the lock is found lost. */
  signal: AbortSignal;
  /** The work's deadline alone: tokens the IdP has issued are worth storing until then, lock lost or not. */
  deadline: AbortSignal;
  /** Set once a write-back has tried to take the lock again: from then on every write checks the record first. */
  retaken?: boolean;
}

/** The lock is held until the work settles, not until the caller stops waiting. */
function refreshHoldingLock(stale: Session, request: TokenRequest, owner: string, flight: Flight): Promise<Session> {
  // A lock found lost stops the work at once: another instance may hold it and be refreshing with
  // the same refresh token, and a write-back without the lock would be refused anyway.
  const lost = new AbortController();
  const stopRenewing = renewLease(stale.id, owner, () => lost.abort(new DOMException('the refresh lock was lost', 'AbortError')));
  const deadline = AbortSignal.timeout(lockedWorkMs());
  const lock = { owner, deadline, signal: AbortSignal.any([deadline, lost.signal]) };
  return refreshUnderLock(stale, request, lock, flight).finally(async () => {
    stopRenewing();
    await releaseLock(stale.id, owner);
  });
}

/**
 * A release the store refused (a restart, a failover) is tried again in the background while the
 * lease lasts: a lock left behind would make every call of this session wait out the whole lease
 * (503s for up to REFRESH_LOCK_LEASE_MS after the store is back, seen in the failover load run).
 */
async function releaseLock(id: string, owner: string): Promise<void> {
  const release = () => getStore().delIfEquals(refreshLockKey(id), owner);
  try {
    await release();
  } catch {
    const giveUpAt = Date.now() + getConfig().refresh.lockLeaseMs;
    const retry = async () => {
      for (let pause = POLL_MIN_MS; Date.now() + pause < giveUpAt; pause = Math.min(pause * 2, POLL_MAX_MS)) {
        await new Promise((resolve) => setTimeout(resolve, pause));
        try {
          await release();
          return;
        } catch {
          // Still away: the next pause, until the lease would have ended anyway.
        }
      }
    };
    finishEvenIfUnanswered(retry());
  }
}

/** Renews the lease well before it runs out, and only while it is still ours (compare-and-pexpire). */
function renewLease(id: string, owner: string, onLost: () => void): () => void {
  const { lockLeaseMs } = getConfig().refresh;
  let stopped = false;
  const timer = setInterval(() => {
    getStore()
      .expireIfEquals(refreshLockKey(id), owner, lockLeaseMs)
      .then((held) => {
        // A renewal still in flight when the work ended finds the lock released: nothing was lost.
        if (held || stopped) return;
        clearInterval(timer);
        log('warn', 'token.refresh_lock_lost', { session: sessionHandle(id) });
        onLost();
      })
      // A store blip: the next tick tries again while the lease lasts.
      .catch(() => undefined);
  }, Math.max(1, Math.floor(lockLeaseMs / 3)));
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}

/**
 * The stored session, as the refresh path must see it. A record this instance cannot read (written
 * by a newer release, or sealed under a token key it does not hold yet, during a rolling deploy) is
 * still the user's session, which other instances serve: a retryable answer, never an end that
 * clears the browser's cookie.
 */
async function storedSession(id: string): Promise<Session> {
  const loaded = await loadSession(id, { latest: true });
  if (loaded.session) return loaded.session;
  if (servedElsewhere(loaded.miss)) throw errors.sessionUnreadable(new Error('the session record cannot be read by this instance'));
  throw await endedSessionError(id);
}

async function refreshUnderLock(stale: Session, request: TokenRequest, lock: HeldLock, flight: Flight): Promise<Session> {
  // Another instance may have finished a refresh between our read and our lock.
  const current = await onStore(flight, () => storedSession(stale.id));
  if (isSettled(current, stale, request)) return current;
  if (request.exchange) return exchangeUnderLock(current, request, request.exchange, lock, flight);
  return refreshGrantUnderLock(current, request, lock, flight);
}

/** What a grant's log line says it was for: an exchange's audience or a refresh's resource, never a token. */
function grantTarget(request: TokenRequest): Record<string, unknown> {
  return request.exchange ? { audience: request.exchange.audience } : { resource: request.resource };
}

/** Outcome fields for the log line of one grant, with how long it took. */
function outcomeLog(session: Session, request: TokenRequest): (result: string) => Record<string, unknown> {
  const started = performance.now();
  return (result) => ({ session: sessionHandle(session.id), ...grantTarget(request), outcome: result, ms: Math.round(performance.now() - started) });
}

/**
 * Why the write-back found no lock of ours: the session ended meanwhile, or the lease ran out. A
 * refresh token the IdP rotated for a session that has ended is given back (RFC 7009) rather than
 * stranded, unless its end kept the grant for a session that stays (a re-login in the same IdP
 * session replaced it): IdPs such as oidc-provider and Keycloak revoke the whole grant with one
 * token. While the session lives on, the grant is its own, and revoking would end it on those IdPs
 * (Auth0 revokes the whole rotation family too).
 */
async function writeBackRefused(current: Session, event: string, outcome: (result: string) => Record<string, unknown>, unstored?: TokenSet): Promise<GatehouseError> {
  const gone = (await readLatest(sessionKey(current.id))) === null;
  const rotated = unstored?.refreshToken !== undefined && unstored.refreshToken !== current.secrets.refreshToken ? unstored.refreshToken : undefined;
  const revoked = gone && rotated !== undefined && !(await grantKeptAtEnd(current.id)) ? await revokeToken(rotated, 'refresh_token') : false;
  log('warn', event, { ...outcome(gone ? 'session_gone' : 'lock_lost'), ...(rotated !== undefined ? { revoked } : {}) });
  return gone ? endedSessionError(current.id) : errors.idpUnavailable(new Error(`${event}: lock lost before the write-back`));
}

async function refreshGrantUnderLock(current: Session, request: TokenRequest, lock: HeldLock, flight: Flight): Promise<Session> {
  const outcome = outcomeLog(current, request);
  const refreshToken = current.secrets.refreshToken;
  if (!refreshToken) return (await usableWithoutRefresh(current, heldToken(current, request), request)).session;
  try {
    // With DPoP, the new tokens are bound to the session's key, as the login's were.
    const dpop = await sessionDpopHandle(current.id, current.secrets);
    const tokens = await refreshTokens(refreshToken, current.record.sub, { resource: request.resource, signal: lock.signal, dpop });
    const updated = await onStore(flight, () => storeTokensDespiteOutage(current, request, tokens, lock));
    if (updated) {
      log('info', 'token.refresh', outcome('ok'));
      return updated;
    }
    throw await writeBackRefused(current, 'token.refresh', outcome, tokens);
  } catch (error) {
    if (error instanceof IdpError) {
      log('warn', 'token.refresh', outcome(error.kind));
      // The refusal may come from a new login, or a logout elsewhere, that ended the session (and
      // revoked its refresh token) while this refresh was at the IdP: its browser hears that end.
      if (error.kind !== 'invalid_grant') throw idpErrorToGatehouse(error);
      const ended = await expireSessionIfUnchanged(current.id, current.record, error);
      if (ended) throw ended;
      // Renewed elsewhere while this grant was at the IdP: the caller can use those tokens.
      const renewed = await onStore(flight, () => readSession(current.id, { latest: true }));
      if (renewed && isSettled(renewed, current, request)) return renewed;
      throw renewedElsewhere(error);
    }
    throw error;
  }
}

/**
 * The subject is the session's own token, refreshed first when it is due — under this same lock,
 * so it is the session's one refresh — and otherwise used as it is, to its last second when there
 * is no refresh token. All of it shares the lock's one work deadline: a refresh that used most of
 * it is stored before the exchange starts, and a retry then only exchanges.
 */
async function exchangeUnderLock(current: Session, request: TokenRequest, target: TokenExchangeTarget, lock: HeldLock, flight: Flight): Promise<Session> {
  let subject = current;
  if (!isFresh(heldToken(current, SESSION_TOKEN))) {
    if (current.secrets.refreshToken) subject = await refreshGrantUnderLock(current, SESSION_TOKEN, lock, flight);
    else subject = (await usableWithoutRefresh(current, heldToken(current, SESSION_TOKEN), SESSION_TOKEN)).session;
  }
  const outcome = outcomeLog(subject, request);
  let tokens: TokenSet;
  try {
    tokens = await exchangeToken(subject.secrets.accessToken, target, lock.signal);
  } catch (error) {
    if (!(error instanceof IdpError)) throw error;
    // The IdP's own error code tells the operator which policy refused; the session is not touched.
    log('warn', 'token.exchange', { ...outcome(error.kind), idpError: idpErrorCode(error) });
    throw exchangeErrorToGatehouse(error);
  }
  const updated = await onStore(flight, () => storeTokensDespiteOutage(subject, request, tokens, lock));
  if (!updated) throw await writeBackRefused(subject, 'token.exchange', outcome);
  log('info', 'token.exchange', outcome('ok'));
  return updated;
}

/**
 * Once the IdP has answered, only the new refresh token works (with rotation): a write-back the
 * store refuses for a moment — a Redis restart or failover — is tried again until the lock's work
 * deadline instead of given up, which would strand the new token and make the session's next
 * refresh a replay that the IdP answers by revoking the whole grant. The session is sealed once, so
 * every attempt writes the same bytes and a write that landed with its answer lost is known as ours.
 */
async function storeTokensDespiteOutage(current: Session, request: TokenRequest, tokens: TokenSet, lock: HeldLock): Promise<Session | null> {
  const next = await withNewTokens(current, request, tokens);
  for (let pause = 100; ; pause = Math.min(pause * 2, 1_000)) {
    try {
      return await storeTokens(current, next, lock);
    } catch (error) {
      if (!(error instanceof GatehouseError && error.code === 'store_unavailable') || lock.deadline.aborted) {
        log('error', request.exchange ? 'token.exchange' : 'token.refresh', { session: sessionHandle(current.id), ...grantTarget(request), outcome: 'write_back_failed' });
        throw error;
      }
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
  }
}

/** The session with the IdP's answer in it, sealed. */
function withNewTokens(current: Session, request: TokenRequest, tokens: TokenSet): Promise<Session> {
  const secrets: SessionSecrets = {
    ...current.secrets,
    // Without rotation the IdP returns no new refresh token: keep using the old one.
    refreshToken: tokens.refreshToken ?? current.secrets.refreshToken,
    idToken: tokens.idToken ?? current.secrets.idToken,
  };
  let accessTokenExpiresAt = current.record.accessTokenExpiresAt;
  if (request.exchange) {
    secrets.exchangedTokens = { ...secrets.exchangedTokens, [exchangedTokenKey(request.exchange)]: { accessToken: tokens.accessToken, expiresAt: tokens.accessTokenExpiresAt } };
  } else if (request.resource) {
    secrets.resourceTokens = { ...secrets.resourceTokens, [request.resource]: { accessToken: tokens.accessToken, expiresAt: tokens.accessTokenExpiresAt } };
  } else {
    secrets.accessToken = tokens.accessToken;
    accessTokenExpiresAt = tokens.accessTokenExpiresAt;
  }
  return sealSessionTokens(current, secrets, accessTokenExpiresAt);
}

/** Writes `next` over `current`, only while the lock is ours (or retaken); null otherwise. */
async function storeTokens(current: Session, next: Session, lock: HeldLock): Promise<Session | null> {
  if (!lock.retaken) {
    const written = await writeSessionTokens(next, lock.owner);
    if (written) return written;
  }
  return writeRetakingLock(current, next, lock);
}

/**
 * A write-back refused because the lock is gone: the store lost it (a failover before the key
 * reached the replica, a restart) while the tokens were at the IdP or the store was away. Giving
 * up would strand the refresh token the IdP has just rotated, and the session would end at its next
 * refresh. So the owner takes the lock again (or finds it still its own, from an earlier attempt
 * whose answer was lost), and writes only while the record is the one this refresh read: only a
 * lock holder writes, so an unchanged record means nobody refreshed meanwhile. A record that is
 * `next` already is an earlier attempt's write that landed. A lock another owner holds, a record
 * gone or moved on: the lock goes back and the write-back stays refused.
 */
async function writeRetakingLock(current: Session, next: Session, lock: HeldLock): Promise<Session | null> {
  const { id } = current;
  // Set before asking: a SET whose answer is lost may still land, and a retry must then check too.
  lock.retaken = true;
  const landed = async () => (await readSession(id, { latest: true }))?.record.sealed === next.record.sealed;
  // Asked before the lock: once the lease of a write that landed unanswered has run out, another
  // instance may hold the lock, and the tokens in the record are these (never to be revoked).
  if (await landed()) return next;
  if (!(await storeCall(() => takeLock(id, lock.owner)))) return null;
  const stored = (await readSession(id, { latest: true }))?.record.sealed;
  if (stored === next.record.sealed) return next;
  if (stored === current.record.sealed) {
    log('warn', 'token.refresh_lock_retaken', { session: sessionHandle(id) });
    return writeSessionTokens(next, lock.owner);
  }
  await releaseLock(id, lock.owner);
  return null;
}

