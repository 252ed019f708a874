import { parseCookie, stringifySetCookie, type SetCookie } from 'cookie';
import { sealData, unsealData } from 'iron-session';
import { createHash } from 'node:crypto';
import { CompactEncrypt, compactDecrypt, base64url } from 'jose';
import { getConfig } from './config.ts';
import { asGatehouseError, errors, type GatehouseError } from './errors.ts';
import { describeCause, log } from './log.ts';
import { sharedState } from './shared-state.ts';
import { createStore, type Store } from './store/index.ts';
import { countActiveSessionsWith, observedStore } from './telemetry.ts';

/**
 * Cookie ↔ store. The browser holds only a sealed reference (the session id); everything else
 * lives in one store key per session, with the tokens encrypted so a store dump reveals none.
 */

/** The secret part of a session: encrypted at rest as one JWE. */
export interface SessionSecrets {
  accessToken: string;
  refreshToken: string | undefined;
  idToken: string | undefined;
  claims: Record<string, unknown>;
  /** Access tokens per RFC 8707 resource, for APIs that need an audience of their own. */
  resourceTokens?: Record<string, ApiToken>;
  /** Access tokens obtained by RFC 8693 token exchange, per audience and scope (see tokens.ts). */
  exchangedTokens?: Record<string, ApiToken>;
  /** With OIDC_DPOP: the private JWK (P-256) the session's tokens are bound to (lib/dpop.ts). */
  dpopKey?: JsonWebKey;
  /**
   * The session id and its record's fixed fields, as `recordBinding` digests them: set on every
   * write. Records without it (written by releases before it existed) are not read: see loadSession.
   */
  boundTo?: string;
}

/** A token the session holds for some APIs only; `expiresAt` in epoch ms, null when the IdP did not say. */
export interface ApiToken {
  accessToken: string;
  expiresAt: number | null;
}

/** What is stored under the session key. Bump `v` when the shape changes; older records end cleanly. */
export interface SessionRecord {
  v: 1;
  sub: string;
  /** The IdP's session id (`sid` claim), for back-channel logout. */
  idpSid: string | undefined;
  createdAt: number;
  absoluteExpiresAt: number;
  accessTokenExpiresAt: number | null;
  /** Proves that a logout link came from this session's own page (the `sid` query parameter). */
  logoutToken: string;
  userAgent: string | undefined;
  /**
   * How and when the user signed in, as the login's id_token says (`acr`, `auth_time` in epoch
   * seconds); absent when the IdP did not say, and in records written before step-up existed.
   */
  acr?: string;
  authTime?: number;
  sealed: string;
}

export interface Session {
  id: string;
  record: SessionRecord;
  secrets: SessionSecrets;
}

const SESSION_FORMAT_VERSION = 1;

/** A stored record as this process last read or wrote it (see openedRecords). */
interface OpenedRecord {
  raw: string;
  record: SessionRecord;
  /** Set once decrypted and found bound to this id and record. */
  secrets?: SessionSecrets;
}

/** Shared with every copy of this module in the process (see shared-state.ts). */
const state = sharedState('session', () => ({
  store: undefined as Store | undefined,
  unsealCache: new Map<string, { id: string; until: number }>(),
  loggedUnreadable: new Set<string>(),
  openedRecords: new Map<string, OpenedRecord>(),
  lastTouched: new Map<string, number>(),
}));

export function getStore(): Store {
  state.store ??= observedStore(createStore(getConfig().store), getConfig().store.kind);
  return state.store;
}

export function sessionKey(id: string): string {
  // The hash tag keeps a session and its refresh lock in one Redis Cluster slot.
  return `${getConfig().keyPrefix}session:{${id}}`;
}

export function refreshLockKey(id: string): string {
  return `${getConfig().keyPrefix}refresh-lock:{${id}}`;
}

/** Left behind for a while when a session is ended for a reason its browser should hear (see EndedBy). */
export function endedMarkerKey(id: string): string {
  return `${getConfig().keyPrefix}ended:{${id}}`;
}

/**
 * Left behind when a session was ended in favour of one that may hold the same IdP grant (see
 * fromOneIdpSession): a refresh of the ended session still at the IdP must not give its new token
 * back, which at IdPs that revoke whole grants would end the session that stays.
 */
function grantKeptKey(id: string): string {
  return `${getConfig().keyPrefix}grant-kept:{${id}}`;
}

/** Whether the session's end kept its grant for another session (see grantKeptKey). */
export async function grantKeptAtEnd(id: string): Promise<boolean> {
  return (await readLatest(grantKeptKey(id))) !== null;
}

/** A key's value from the primary, where the store may read replicas (see Store.getLatest). */
export function readLatest(key: string): Promise<string | null> {
  const store = getStore();
  return storeCall(() => (store.getLatest ? store.getLatest(key) : store.get(key)));
}

/** Present while an upstream 401 may not force another refresh of this session. */
export function forcedRefreshKey(id: string): string {
  return `${getConfig().keyPrefix}forced-refresh:{${id}}`;
}

/** A short one-way digest (SHA-256, base64url): safe to show or to use inside a key. */
export function shortDigest(value: string, length = 22): string {
  return createHash('sha256').update(value).digest('base64url').slice(0, length);
}

/** What logs and the sessions list show instead of a session id. */
export function sessionHandle(id: string): string {
  return shortDigest(id, 16);
}

/** A user's live sessions (sorted set scored by each session's expiry): "sign out everywhere". */
export function userSessionsKey(sub: string): string {
  // Hashed: `sub` and `sid` are IdP-chosen strings that could contain the braces of a hash tag.
  return `${getConfig().keyPrefix}user-sessions:{${shortDigest(sub)}}`;
}

/** Sessions per IdP session id, for back-channel logout by `sid`. */
export function idpSessionKey(idpSid: string): string {
  return `${getConfig().keyPrefix}idp-sid:{${shortDigest(idpSid)}}`;
}

/**
 * Every live session's handle (not its id), scored by its expiry like the per-user index: what
 * the `gatehouse.sessions.active` metric counts, the same number from every instance.
 */
export function activeSessionsKey(): string {
  return `${getConfig().keyPrefix}active-sessions`;
}

/** Live sessions across every instance, from the store (for the metric). */
export async function countActiveSessions(): Promise<number> {
  return getStore().indexCount(activeSessionsKey(), Date.now());
}
countActiveSessionsWith(countActiveSessions);

// ---------------------------------------------------------------------------------------------
// Sealing: iron-session for cookies, JWE (jose, dir + A256GCM) for tokens at rest.

/**
 * iron-session picks the highest numeric id to seal with. Ids derived from the secret itself stay
 * stable while the list is rotated, and sealing with a one-entry map makes the first entry win.
 */
async function secretId(secret: string): Promise<number> {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(secret)));
  return new DataView(digest.buffer).getUint32(0) + 1;
}

let passwordMaps: Promise<{ seal: Record<number, string>; unseal: Record<number, string> }> | undefined;
function cookiePasswords() {
  passwordMaps ??= (async () => {
    const { secrets } = getConfig().session;
    const ids = await Promise.all(secrets.map(secretId));
    return {
      seal: { [ids[0] as number]: secrets[0] as string },
      unseal: Object.fromEntries(ids.map((id, index) => [id, secrets[index] as string])),
    };
  })();
  return passwordMaps;
}

interface TokenKey {
  kid: string;
  key: Uint8Array;
}

let tokenKeys: Promise<TokenKey[]> | undefined;
function getTokenKeys(): Promise<TokenKey[]> {
  tokenKeys ??= Promise.all(
    getConfig().session.tokenKeys.map(async (secret) => {
      const material = await crypto.subtle.importKey('raw', new TextEncoder().encode(secret), 'HKDF', false, ['deriveBits']);
      const bits = await crypto.subtle.deriveBits(
        { name: 'HKDF', hash: 'SHA-256', salt: new TextEncoder().encode('gatehouse'), info: new TextEncoder().encode('token encryption v1') },
        material,
        256,
      );
      const key = new Uint8Array(bits);
      const kid = base64url.encode(new Uint8Array(await crypto.subtle.digest('SHA-256', key))).slice(0, 12);
      return { kid, key };
    }),
  );
  return tokenKeys;
}

export function encryptSecrets(secrets: SessionSecrets): Promise<string> {
  return encryptAtRest(secrets);
}

/** Null when no configured key opens it (the key was rotated out): that session has ended. */
export function decryptSecrets(sealed: string): Promise<SessionSecrets | null> {
  return decryptAtRest<SessionSecrets>(sealed);
}

/** Any JSON value encrypted under the token keys, for secrets kept in the store outside a session. */
export async function encryptAtRest(value: unknown): Promise<string> {
  const [current] = await getTokenKeys();
  if (!current) throw new Error('no token encryption key');
  return new CompactEncrypt(new TextEncoder().encode(JSON.stringify(value)))
    .setProtectedHeader({ alg: 'dir', enc: 'A256GCM', kid: current.kid })
    .encrypt(current.key);
}

/** Null when no configured key opens it. */
export async function decryptAtRest<T>(sealed: string): Promise<T | null> {
  const keys = await getTokenKeys();
  try {
    const { plaintext } = await compactDecrypt(sealed, (header) => {
      const match = keys.find((candidate) => candidate.kid === header.kid);
      if (!match) throw new Error('unknown token key');
      return match.key;
    });
    return JSON.parse(new TextDecoder().decode(plaintext)) as T;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// The session cookie.

function readCookie(cookieHeader: string | null | undefined, name: string): string | undefined {
  if (!cookieHeader) return undefined;
  return parseCookie(cookieHeader)[name];
}

const ISSUED_SEAL = /^Fe26\.2\*([^*~]*)\*[^~]+~2$/;
const unsealCache = state.unsealCache;
const UNSEAL_CACHE_LIMIT = 10_000;
const UNSEAL_CACHE_MS = 5 * 60 * 1000;

/**
 * `unknown_key`: sealed under a password id this instance does not have — a secret rotated out, or
 * one a newer instance already seals with during a rolling rotation. Clearing such a cookie could
 * sign the user out of the instances that can read it, so it is only "no session" here.
 */
type UnsealedCookie = { kind: 'id'; id: string } | { kind: 'invalid' } | { kind: 'unknown_key' };

/** A session id as randomToken() makes them: 32 bytes, base64url. */
const SESSION_ID_PATTERN = /^[A-Za-z0-9_-]{43}$/;

/**
 * The session id sealed in a cookie value, or why there is none. Unsealing costs two HMACs and a
 * decryption, so a verified value is remembered for a while: the key is the exact sealed string,
 * which only someone holding that cookie can present.
 */
async function unsealCookieValue(cookieValue: string): Promise<UnsealedCookie> {
  // iron-session's `~<version>` suffix sits outside the seal's MAC: accept only the form we issue.
  const issued = ISSUED_SEAL.exec(cookieValue);
  if (!issued) return { kind: 'invalid' };
  const now = Date.now();
  const cached = unsealCache.get(cookieValue);
  if (cached && cached.until > now) return { kind: 'id', id: cached.id };
  const { unseal } = await cookiePasswords();
  if (!Object.hasOwn(unseal, issued[1] as string)) return { kind: 'unknown_key' };
  let data: { id?: unknown };
  try {
    data = await unsealData<{ id?: unknown }>(cookieValue, { password: unseal, ttl: sealTtlSec() });
  } catch {
    // iron-session re-throws malformed input it does not recognise; for us that is just "no session".
    return { kind: 'invalid' };
  }
  if (typeof data.id !== 'string' || !SESSION_ID_PATTERN.test(data.id)) return { kind: 'invalid' };
  if (unsealCache.size >= UNSEAL_CACHE_LIMIT) unsealCache.delete(unsealCache.keys().next().value as string);
  unsealCache.set(cookieValue, { id: data.id, until: now + UNSEAL_CACHE_MS });
  return { kind: 'id', id: data.id };
}

export async function unsealSessionId(cookieValue: string): Promise<string | null> {
  const unsealed = await unsealCookieValue(cookieValue);
  return unsealed.kind === 'id' ? unsealed.id : null;
}

/** The seal outlives the cookie, so a browser never presents a cookie whose seal has expired. */
function sealTtlSec(): number {
  return getConfig().session.absoluteTimeoutSec + 120;
}

export async function sessionCookieHeader(id: string): Promise<string> {
  const { session, secureCookies } = getConfig();
  const { seal } = await cookiePasswords();
  const value = await sealData({ id }, { password: seal, ttl: sealTtlSec() });
  return serializeCookie(session.cookieName, value, {
    httpOnly: true,
    secure: secureCookies,
    sameSite: session.sameSite,
    path: '/',
    maxAge: session.absoluteTimeoutSec,
  });
}

export function clearSessionCookieHeader(): string {
  const { session, secureCookies } = getConfig();
  return serializeCookie(session.cookieName, '', { httpOnly: true, secure: secureCookies, sameSite: session.sameSite, path: '/', maxAge: 0 });
}

/**
 * Sent wherever a session ends for this browser (a logout, or a cookie found naming a session that
 * ended: expired, signed out elsewhere or at the IdP). Proxied answers may be cached (`private`,
 * varying by `Cookie`, so never served to the next session), but would stay on a shared
 * computer's disk after its user left; this empties the origin's HTTP cache (browsers honour it on
 * https and on localhost).
 */
const CLEAR_CACHE: [string, string] = ['clear-site-data', '"cache"'];

/** The answer's headers that end a dead session for this browser: its cookie, and what the browser kept of its answers. */
export function endedSessionHeaders(): Array<[string, string]> {
  return [['set-cookie', clearSessionCookieHeader()], CLEAR_CACHE];
}

/**
 * Under SameSite=Strict the callback never sees the session cookie, so a login that started before
 * another tab's login finished cannot know the session it replaces. Each callback therefore leaves
 * a Lax cookie, sent to the callback only, naming the session it created: the next login to finish
 * in this browser ends that session. Order-safe: the cookie reaches a callback only after the
 * browser applied the answer that set it, together with that answer's session cookie, which this
 * callback's answer then overwrites. It is sealed in another shape than the session cookie, so it
 * never opens a session, and all it can do is name a session for a completed login to end.
 */
function replacesCookieName(): string {
  return `${getConfig().session.cookieName.replace(/^__Host-/, '__Secure-')}-replaces`;
}

function replacesCookie(value: string, maxAge: number): string {
  return serializeCookie(replacesCookieName(), value, { httpOnly: true, secure: getConfig().secureCookies, sameSite: 'lax', path: new URL(getConfig().oidc.redirectUri).pathname, maxAge });
}

export async function replacesCookieHeader(id: string): Promise<string> {
  const { seal } = await cookiePasswords();
  return replacesCookie(await sealData({ replaces: id }, { password: seal, ttl: sealTtlSec() }), getConfig().session.absoluteTimeoutSec);
}

/** A signed-out browser keeps no cookie naming a session, not even a dead one, nor what it cached of the session's answers. */
export function signedOutHeaders(): Array<[string, string]> {
  return [['set-cookie', clearSessionCookieHeader()], ['set-cookie', replacesCookie('', 0)], CLEAR_CACHE];
}

/**
 * The handle of a POST logout's way on to the IdP (lib/auth.ts), for the browser's own next
 * navigation only: HttpOnly, so the page's scripts (which read the POST's answer) never hold it,
 * and Strict. Named like the session cookie (`__Host-` on https), so no sibling subdomain can plant
 * one ahead of it; `__Host-` needs `Path=/`.
 */
function signOutCookieName(): string {
  return `${getConfig().session.cookieName}-signout`;
}

export function signOutCookieHeader(handle: string, maxAgeSec: number): string {
  return serializeCookie(signOutCookieName(), handle, { httpOnly: true, secure: getConfig().secureCookies, sameSite: 'strict', path: '/', maxAge: maxAgeSec });
}

export function signOutHandleFromCookie(cookieHeader: string | null | undefined): string | undefined {
  return readCookie(cookieHeader, signOutCookieName());
}

/** The session the last login finished in this browser created (see replacesCookieHeader), if any. */
export async function sessionIdToReplace(cookieHeader: string | null | undefined): Promise<string | null> {
  const value = readCookie(cookieHeader, replacesCookieName());
  if (!value) return null;
  try {
    const { unseal } = await cookiePasswords();
    const data = await unsealData<{ replaces?: unknown }>(value, { password: unseal, ttl: sealTtlSec() });
    return typeof data.replaces === 'string' && SESSION_ID_PATTERN.test(data.replaces) ? data.replaces : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------
// Records.

function serializeCookie(name: string, value: string, attributes: Omit<SetCookie, 'name' | 'value'>): string {
  return stringifySetCookie({ name, value, ...attributes });
}

function randomToken(bytes = 32): string {
  return base64url.encode(crypto.getRandomValues(new Uint8Array(bytes)));
}

/** `acr` and `auth_time` describe the sign-in, not the user: the session keeps them on its record. */
const PROTOCOL_CLAIMS = new Set(['iss', 'aud', 'exp', 'iat', 'nbf', 'nonce', 'at_hash', 'c_hash', 's_hash', 'auth_time', 'acr', 'azp', 'sid', 'jti']);

/** The id_token claims worth showing the SPA: who the user is, not protocol bookkeeping. */
export function userClaims(claims: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(claims).filter(([name]) => !PROTOCOL_CLAIMS.has(name)));
}

export interface NewSession {
  sub: string;
  idpSid: string | undefined;
  secrets: SessionSecrets;
  accessTokenExpiresAt: number | null;
  userAgent: string | undefined;
  /** The id_token's `acr` and `auth_time`, when it has them. */
  acr?: string | undefined;
  authTime?: number | undefined;
}

/** Always a fresh id: a session never survives or adopts an id from before the login (fixation). */
export async function createSession(input: NewSession): Promise<Session> {
  const { session } = getConfig();
  const now = Date.now();
  const id = randomToken();
  const fields: Omit<SessionRecord, 'sealed'> = {
    v: SESSION_FORMAT_VERSION,
    sub: input.sub,
    idpSid: input.idpSid,
    createdAt: now,
    absoluteExpiresAt: now + session.absoluteTimeoutSec * 1000,
    accessTokenExpiresAt: input.accessTokenExpiresAt,
    logoutToken: randomToken(16),
    userAgent: input.userAgent?.slice(0, 256),
    ...(input.acr !== undefined ? { acr: input.acr } : {}),
    ...(input.authTime !== undefined ? { authTime: input.authTime } : {}),
  };
  const record: SessionRecord = { ...fields, sealed: await encryptSecrets({ ...input.secrets, boundTo: recordBinding(id, fields) }) };
  const stored = JSON.stringify(record);
  const written = await storeCall(() => getStore().set(sessionKey(id), stored, { ttlMs: session.idleTimeoutSec * 1000, onlyIfAbsent: true }));
  // A SET sent again (ioredis after a reconnect, a REST client's retry) finds what its first send wrote.
  if (!written && (await storeCall(() => getStore().get(sessionKey(id)))) !== stored) throw errors.internal(new Error('session id collision'));
  lastTouched.set(id, now);
  rememberOpened(id, record, input.secrets);
  const created = { id, record, secrets: input.secrets };
  await indexSession(created, sessionExpiresAt(record, now));
  return created;
}

async function indexSession(session: Session, expiresAtMs: number): Promise<void> {
  const keyTtlMs = getConfig().session.absoluteTimeoutSec * 1000;
  const { sub, idpSid } = session.record;
  await storeCall(() =>
    Promise.all([
      getStore().indexAdd(userSessionsKey(sub), session.id, expiresAtMs, keyTtlMs),
      idpSid ? getStore().indexAdd(idpSessionKey(idpSid), session.id, expiresAtMs, keyTtlMs) : undefined,
      getStore().indexAdd(activeSessionsKey(), sessionHandle(session.id), expiresAtMs, keyTtlMs),
    ]),
  );
}

/** Store failures are transient by nature: they become a retryable 503, never a logout. */
export async function storeCall<T>(operation: () => Promise<T>): Promise<T> {
  try {
    return await operation();
  } catch (error) {
    throw errors.storeUnavailable(error);
  }
}

/**
 * Opened records per session id, valid only while the stored text is byte for byte the same: the
 * hot path reads the same text (the store's coherent copy) on every call, and records are never
 * changed in place, so a refresh or logout can never leave a stale entry served. Saves a parse, a
 * base64 decode and an AES-GCM decryption on every proxied request.
 */
const openedRecords = state.openedRecords;
const OPENED_RECORDS_LIMIT = 10_000;

function openedRecord(id: string, raw: string): OpenedRecord | null {
  const cached = openedRecords.get(id);
  if (cached?.raw === raw) return cached;
  const record = parseRecord(raw);
  if (!record) {
    openedRecords.delete(id);
    return null;
  }
  return remember(id, { raw, record });
}

function remember(id: string, opened: OpenedRecord): OpenedRecord {
  if (openedRecords.size >= OPENED_RECORDS_LIMIT && !openedRecords.has(id)) openedRecords.delete(openedRecords.keys().next().value as string);
  openedRecords.set(id, opened);
  return opened;
}

/** A record this process has just written, with its secrets: the next read need not decrypt them. */
function rememberOpened(id: string, record: SessionRecord, secrets: SessionSecrets): void {
  remember(id, { raw: JSON.stringify(record), record, secrets });
}

/**
 * One digest of a session's id and of the record fields set once at its creation, sealed with its
 * tokens. The record's plain fields and the key it is stored under are otherwise open to anyone
 * who can write to the store: without it, such a writer could move another user's encrypted tokens
 * under their own session id (whose cookie they hold) and call APIs as that user, or raise a
 * session's `acr`, `authTime` or absolute end to get past step-up and lifetime limits. The access
 * token's expiry stays out: a refresh by a release before this one rewrites it and carries the old
 * digest along.
 */
function recordBinding(id: string, record: Omit<SessionRecord, 'sealed'>): string {
  const { v, sub, idpSid, createdAt, absoluteExpiresAt, logoutToken, userAgent, acr, authTime } = record;
  return shortDigest(JSON.stringify([id, v, sub, idpSid ?? null, createdAt, absoluteExpiresAt, logoutToken, userAgent ?? null, acr ?? null, authTime ?? null]), 43);
}

function parseRecord(raw: string): SessionRecord | null {
  try {
    const record = JSON.parse(raw) as Partial<SessionRecord>;
    if (record.v !== SESSION_FORMAT_VERSION || typeof record.sealed !== 'string' || typeof record.sub !== 'string') return null;
    return record as SessionRecord;
  } catch {
    return null;
  }
}

/**
 * How old a per-process copy of a session record may be when the store serves one (Redis with
 * client tracking). A logout or refresh elsewhere drops the copy within a round trip; this bounds
 * the staleness only if the invalidation connection is silently cut.
 */
const SESSION_COPY_MAX_AGE_MS = 1_000;

/**
 * Why a cookie's session cannot be used: `gone` (never existed, ended, expired: the cookie may be
 * cleared), `replaced` (a new login in this browser ended it moments ago: the browser already holds
 * the new cookie, which an answer clearing the cookie by name would destroy), `unreadable` (a record
 * this instance cannot open: under a token key it does not have, unbound, of an older or unknown
 * format; another instance or release may read it, so it is neither deleted nor its cookie cleared,
 * and this request has no session), `newer_release` (the same, for a record a newer release wrote:
 * during its rolling deploy the instances already on it serve the session, so retry).
 */
export type SessionMiss = 'gone' | 'replaced' | 'unreadable' | 'newer_release' | 'ended_elsewhere' | 'ended_at_idp' | 'ended_expired';

/** Whether a miss is a record that some instance may still open, and so must be left alone: ended by nobody, its cookie kept. */
export function servedElsewhere(miss: SessionMiss | undefined): boolean {
  return miss === 'unreadable' || miss === 'newer_release';
}

/** Whether stored text is a session record of a format newer than this release's. */
function newerFormat(raw: string): boolean {
  try {
    const { v } = JSON.parse(raw) as { v?: unknown };
    return typeof v === 'number' && v > SESSION_FORMAT_VERSION;
  } catch {
    return false;
  }
}

/**
 * Why a session was ended by someone other than its browser: a new login in the same browser
 * (`replaced`), "sign out everywhere else" or ending it from the sessions list on another device
 * (`elsewhere`), a logout at the IdP (`idp`, back-channel), the IdP refusing its refresh token or
 * its last token running out without one (`expired`). The marker lets every request that still
 * carries the cookie (a call that was in flight, another tab) hear the same reason as the first.
 */
export type EndedBy = 'replaced' | 'elsewhere' | 'idp' | 'expired';

const MISS_BY_MARKER: Record<string, SessionMiss> = { replaced: 'replaced', elsewhere: 'ended_elsewhere', idp: 'ended_at_idp', expired: 'ended_expired' };
const ENDED_BY_MISS: Partial<Record<SessionMiss, Exclude<EndedBy, 'replaced'>>> = { ended_elsewhere: 'elsewhere', ended_at_idp: 'idp', ended_expired: 'expired' };

/** Why a session that is not in the store is gone, from the marker its end left (`gone` when none). */
async function endedMiss(id: string, latest = false): Promise<SessionMiss> {
  const marker = latest ? await readLatest(endedMarkerKey(id)) : await storeCall(() => getStore().get(endedMarkerKey(id)));
  return marker !== null && Object.hasOwn(MISS_BY_MARKER, marker) ? (MISS_BY_MARKER[marker] as SessionMiss) : 'gone';
}

const loggedUnreadable = state.loggedUnreadable;
const LOGGED_UNREADABLE_LIMIT = 10_000;

/** One warning per record and process: a fleet mid-deploy would otherwise log on every request. */
function warnUnreadable(id: string, reason: string): void {
  const handle = sessionHandle(id);
  if (loggedUnreadable.has(handle)) return;
  if (loggedUnreadable.size >= LOGGED_UNREADABLE_LIMIT) loggedUnreadable.clear();
  loggedUnreadable.add(handle);
  log('warn', 'session.unreadable', { session: handle, reason });
}

/**
 * The session behind an id, or why there is none. Only a record that has passed its absolute end by
 * our own clock is deleted here; what this instance cannot read is left for those that can.
 * `coherentCopy` lets the store answer from its coherent per-process copy: right for the proxy's hot
 * path, never for the refresh path, which must see the latest refresh token: `latest` has it read
 * from the primary where the store may read replicas.
 */
export async function loadSession(id: string, { coherentCopy = false, latest = false } = {}): Promise<{ session: Session; miss?: undefined } | { session: null; miss: SessionMiss }> {
  const store = getStore();
  const key = sessionKey(id);
  const raw = latest ? await readLatest(key) : await storeCall(() => (coherentCopy && store.getCoherent ? store.getCoherent(key, SESSION_COPY_MAX_AGE_MS) : store.get(key)));
  if (raw === null) {
    // Ended elsewhere: this process's decrypted copy of its tokens goes too.
    forgetCopies(id);
    return { session: null, miss: await endedMiss(id) };
  }
  const opened = openedRecord(id, raw);
  if (!opened) {
    const newer = newerFormat(raw);
    warnUnreadable(id, newer ? 'newer_format' : 'unknown_format');
    return { session: null, miss: newer ? 'newer_release' : 'unreadable' };
  }
  const { record } = opened;
  if (record.absoluteExpiresAt <= Date.now()) {
    await destroySession(id, record);
    return { session: null, miss: 'gone' };
  }
  if (opened.secrets) return { session: { id, record, secrets: opened.secrets } };
  const secrets = await decryptSecrets(record.sealed);
  if (!secrets) {
    warnUnreadable(id, 'unknown_token_key');
    return { session: null, miss: 'unreadable' };
  }
  if (secrets.boundTo === undefined) {
    // Written by a release before records were bound, or any other value sealed under the token
    // key (a DPoP login's key pair) put where a session's secrets go: such a record cannot show
    // that its fields and its key are its own, so any store writer could have made it. Left for
    // the release that wrote it, as during a rolling deploy; once every instance runs this one,
    // its user signs in again.
    warnUnreadable(id, 'unbound');
    return { session: null, miss: 'unreadable' };
  }
  if (secrets.boundTo !== recordBinding(id, record)) {
    // Written by someone holding the store but not the token key: nobody's session. Its index
    // entries are left to expire, since its `sub` and `idpSid` may be as forged as the rest.
    log('warn', 'session.tampered', { session: sessionHandle(id) });
    await destroySession(id);
    return { session: null, miss: 'gone' };
  }
  opened.secrets = secrets;
  return { session: { id, record, secrets } };
}

export async function readSession(id: string, options: { coherentCopy?: boolean; latest?: boolean } = {}): Promise<Session | null> {
  return (await loadSession(id, options)).session;
}

const lastTouched = state.lastTouched;
const TOUCH_MEMORY_LIMIT = 50_000;

/** When the session ends if nothing else happens: idle timeout from now, capped by the absolute end. */
export function sessionExpiresAt(record: SessionRecord, now = Date.now()): number {
  return Math.min(record.absoluteExpiresAt, now + getConfig().session.idleTimeoutSec * 1000);
}

/**
 * Slides the idle expiry, at most once per touch interval per session and process, so the hot
 * path does not write to the store on every call. PEXPIRE never recreates a deleted session.
 */
export async function touchSession(session: Session, force = false): Promise<void> {
  const now = Date.now();
  const { touchIntervalSec } = getConfig().session;
  const previous = lastTouched.get(session.id);
  if (!force && previous !== undefined && now - previous < touchIntervalSec * 1000) return;
  if (lastTouched.size >= TOUCH_MEMORY_LIMIT) lastTouched.delete(lastTouched.keys().next().value as string);
  lastTouched.set(session.id, now);
  const expiresAt = sessionExpiresAt(session.record, now);
  if (expiresAt <= now) {
    await destroySession(session.id, session.record);
    return;
  }
  try {
    const extended = await storeCall(() => getStore().expire(sessionKey(session.id), expiresAt - now));
    if (!extended) return;
    // The index score doubles as "last used" (expiry minus idle timeout) for the sessions list.
    await indexSession(session, expiresAt);
  } catch (error) {
    // The next call tries again: indexes left behind the record's expiry would hide the session
    // from a back-channel logout and from "sign out everywhere" once their entries expire.
    if (lastTouched.get(session.id) === now) lastTouched.delete(session.id);
    throw error;
  }
  // A logout between the PEXPIRE and these index writes removed the entries they re-add (the
  // indexes may live on other Cluster slots, so the two cannot be one transaction): an ended
  // session would stay counted as active and listed for back-channel logout until its expiry.
  if ((await storeCall(() => getStore().get(sessionKey(session.id)))) === null) {
    await storeCall(() => getStore().indexRemove(activeSessionsKey(), sessionHandle(session.id)));
    await removeFromIndexes(session.id, session.record);
  }
}

/** The session with new tokens, encrypted: what `writeSessionTokens` stores, the same bytes however often it is tried. */
export async function sealSessionTokens(session: Session, secrets: SessionSecrets, accessTokenExpiresAt: number | null): Promise<Session> {
  const fields = { ...session.record, accessTokenExpiresAt };
  return { id: session.id, record: { ...fields, sealed: await encryptSecrets({ ...secrets, boundTo: recordBinding(session.id, fields) }) }, secrets };
}

/**
 * Writes a sealed session over the stored one, in one atomic step with a check that the refresh
 * lock is still `lockOwner`'s. Null when the session was deleted meanwhile (no resurrection) or
 * the lock was lost (its lease ran out and another instance may be refreshing).
 */
export async function writeSessionTokens(next: Session, lockOwner: string): Promise<Session | null> {
  const written = await storeCall(() => getStore().replaceIfHeld(sessionKey(next.id), JSON.stringify(next.record), refreshLockKey(next.id), lockOwner));
  if (!written) return null;
  rememberOpened(next.id, next.record, next.secrets);
  return next;
}

/**
 * How long a replaced session's marker lives. Other tabs may be mid-request with the old cookie;
 * the marker lets their answers say "replaced" (401, cookie left alone) instead of "gone" (which
 * clears the cookie by name — by then, the new session's cookie).
 */
export const REPLACED_SESSION_MARKER_MS = 60_000;
/** Long enough for a tab left open to hear why it was signed out when it next asks. */
const ENDED_ELSEWHERE_MARKER_MS = 60 * 60 * 1000;

/** Ends a session that a new login in the same browser replaces: at once, leaving only a marker. */
export async function replaceSession(session: Session, grantKept = false): Promise<string | null> {
  return endSessionBecause(session.id, session.record, 'replaced', grantKept);
}

/**
 * Deletes the session and leaves a marker saying why, for its browser's next request, and whether
 * its grant was kept for a session that stays (see grantKeptKey). Returns as destroySession.
 */
export async function endSessionBecause(id: string, record: SessionRecord | undefined, why: Exclude<EndedBy, 'expired'>, grantKept = false): Promise<string | null> {
  const ttlMs = why === 'replaced' ? REPLACED_SESSION_MARKER_MS : ENDED_ELSEWHERE_MARKER_MS;
  await storeCall(() =>
    Promise.all([getStore().set(endedMarkerKey(id), why, { ttlMs }), grantKept ? getStore().set(grantKeptKey(id), '1', { ttlMs: ENDED_ELSEWHERE_MARKER_MS }) : undefined]),
  );
  return destroySession(id, record);
}

/**
 * Ends a session whose tokens ran out (its refresh token refused, or its access token expired with
 * none) and returns what its browser hears — but only while its stored record is still `record`,
 * the one whose tokens were judged. An instance whose refresh lease ran out (a long pause, a store
 * partition) can hear `invalid_grant` for a refresh token another instance has already replaced;
 * ending the session then would sign out a user whose session that instance just renewed. `null`
 * when the record moved on: the caller reads it again.
 *
 * The `expired` marker never overwrites another: a refresh refused because a new login, a logout
 * elsewhere or at the IdP had just ended the session (revoking its refresh token) keeps that end's
 * word, above all `replaced`, whose browser already holds the new session's cookie.
 */
export async function expireSessionIfUnchanged(id: string, record: SessionRecord, cause?: unknown): Promise<GatehouseError | null> {
  const store = getStore();
  const endedAlready = () => {
    // This process's decrypted copy of its tokens goes with it.
    forgetCopies(id);
    return endedSessionError(id, cause);
  };
  const raw = await storeCall(() => store.get(sessionKey(id)));
  if (raw === null) return endedAlready();
  if (parseRecord(raw)?.sealed !== record.sealed) return null;
  // The marker goes first, so a request that finds the record gone also finds why.
  const marked = await storeCall(() => store.set(endedMarkerKey(id), 'expired', { ttlMs: ENDED_ELSEWHERE_MARKER_MS, onlyIfAbsent: true }));
  if (!(await storeCall(() => store.delIfEquals(sessionKey(id), raw)))) {
    // Ended between the read and the delete (another instance judged the same tokens spent, or a
    // new login or a logout ended it): the marker, ours or the one that end wrote over it, says why.
    if ((await storeCall(() => store.get(sessionKey(id)))) === null) return endedAlready();
    // Renewed meanwhile: the session lives on, so it must not carry our marker.
    if (marked) await storeCall(() => store.delIfEquals(endedMarkerKey(id), 'expired'));
    return null;
  }
  await forgetEndedSession(id, record);
  // Read back rather than assumed: a new login may have written `replaced` over ours meanwhile,
  // and its browser must then keep the new session's cookie.
  return endedSessionError(id, cause);
}

/**
 * What the browser of a session found gone, where it was expected, hears: the marker its end left
 * says. `cause` is what ran the tokens out, for the log of an `expired` end.
 */
export async function endedSessionError(id: string, cause?: unknown): Promise<GatehouseError> {
  // Asked where the session's end was found (the primary): a lagging replica may hold the record's
  // deletion but not yet its marker, and a `replaced` heard as `expired` clears the new session's cookie.
  const miss = await endedMiss(id, true);
  if (miss === 'replaced') return errors.sessionReplaced();
  const endedBy = ENDED_BY_MISS[miss];
  return endedBy && endedBy !== 'expired' ? errors.sessionEnded(endedBy) : errors.sessionExpired(cause);
}

async function removeFromIndexes(id: string, record: SessionRecord): Promise<void> {
  await storeCall(() =>
    Promise.all([
      getStore().indexRemove(userSessionsKey(record.sub), id),
      record.idpSid ? getStore().indexRemove(idpSessionKey(record.idpSid), id) : undefined,
    ]),
  );
}

/**
 * Told the id of every session this process ends, whichever copy of this module ends it (Next's
 * bundle serves logout, server.ts holds the WebSockets that lib/websocket.ts closes).
 */
const endedListeners = sharedState('session-ended-listeners', () => new Set<(id: string) => void>());

export function onSessionEnded(listener: (id: string) => void): void {
  endedListeners.add(listener);
}

// What a session holds open (WebSockets, streamed answers) ends with it.

export type SessionEndSeenBy = 'this_process' | 'session_check';

export interface HeldOpen {
  /** Ends it once its session has ended; called again at each check while it is still closing. */
  end(seenBy: SessionEndSeenBy): void;
  /** The browser used it since the last check: the session is in use, which slides its idle timeout. */
  used?: boolean;
}

/** One held thing, linked into its session's list. */
interface HeldLink {
  held: HeldOpen;
  prev: HeldLink | undefined;
  next: HeldLink | undefined;
}

/** What a released link holds instead: nothing to end. */
const RELEASED: HeldOpen = { end() {} };

/**
 * What each session holds open, by session id: a linked list per session, and a session's entry
 * stays once its last held thing is released, until the next check sweeps it. Every proxied call
 * holds and releases, and a Map or Set that has reached V8's old generation rehashes into a new
 * table there each time it empties: some 50 bytes a call straight into the old generation, which
 * at one call at a time brought a full collection (a 10–20 ms pause of the worker) every 20–60 s
 * (bench, -c1). Links are born young and die young; a released one lets go of everything, since
 * one that had reached the old generation (a long stream's) would otherwise keep its neighbours,
 * and through them every later call, alive until the next full collection.
 */
const heldOpen = new Map<string, { first: HeldLink | undefined }>();
let heldCheckTimer: NodeJS.Timeout | undefined;
let checkingHeld = false;
let hearingEnds = false;

/**
 * Ties `held` (a WebSocket, a proxied call and its streamed answer) to session `id` until the
 * returned release is called. Ends this process sees (logout, back-channel logout, replacement)
 * end it at once; ends elsewhere (another worker or instance, the idle timeout) at the next check:
 * one store read per session with something held open, every WEBSOCKET_SESSION_CHECK_INTERVAL.
 */
export function holdOpen(id: string, held: HeldOpen): () => void {
  if (!hearingEnds) {
    hearingEnds = true;
    onSessionEnded((ended) => endHeldOpen(ended, 'this_process'));
  }
  let entry = heldOpen.get(id);
  if (!entry) heldOpen.set(id, (entry = { first: undefined }));
  const link: HeldLink = { held, prev: undefined, next: entry.first };
  if (entry.first) entry.first.prev = link;
  entry.first = link;
  // Stopped by the first check that finds nothing held, not by each release: every proxied call
  // with a session is held while it is open, and a timer per call would cost the hot path.
  heldCheckTimer ??= setInterval(() => void checkHeldSessions(), getConfig().websocket.sessionCheckIntervalSec * 1000).unref();
  return () => {
    if (link.held === RELEASED) return;
    if (link.prev) link.prev.next = link.next;
    else entry.first = link.next;
    if (link.next) link.next.prev = link.prev;
    link.held = RELEASED;
    link.prev = link.next = undefined;
  };
}

/** What a session holds now (a copy: ending one may release others, which then end nothing). */
function heldBy(id: string): HeldLink[] {
  const links: HeldLink[] = [];
  for (let link = heldOpen.get(id)?.first; link; link = link.next) links.push(link);
  return links;
}

function endHeldOpen(id: string, seenBy: SessionEndSeenBy): void {
  for (const link of heldBy(id)) {
    // One that fails must not keep the others open.
    try {
      link.held.end(seenBy);
    } catch (error) {
      log('error', 'session.end_held_failed', describeCause(error));
    }
  }
}

async function checkHeldSessions(): Promise<void> {
  for (const [id, entry] of heldOpen) if (!entry.first) heldOpen.delete(id);
  if (heldOpen.size === 0 && heldCheckTimer) {
    clearInterval(heldCheckTimer);
    heldCheckTimer = undefined;
  }
  if (checkingHeld) return;
  checkingHeld = true;
  try {
    for (const id of [...heldOpen.keys()]) {
      const links = heldBy(id);
      if (!links.length) continue;
      const used = links.some(({ held }) => held.used);
      for (const { held } of links) if (held.used) held.used = false;
      let loaded: Awaited<ReturnType<typeof loadSession>>;
      try {
        loaded = await loadSession(id, { coherentCopy: true });
      } catch (error) {
        // A store outage ends no session: what it holds stays open and the next check asks again.
        log('warn', 'session.check_failed', { session: sessionHandle(id), ...describeCause(asGatehouseError(error).cause) });
        continue;
      }
      if (loaded.session) {
        if (used) await touchSession(loaded.session).catch(() => undefined);
      } else if (!servedElsewhere(loaded.miss)) {
        // A record another release or key can open: the session lives on.
        endHeldOpen(id, 'session_check');
      }
    }
  } finally {
    checkingHeld = false;
  }
}

function forgetCopies(id: string): void {
  lastTouched.delete(id);
  openedRecords.delete(id);
}

/**
 * Deletes the session; with its record at hand, its index entries go too (otherwise they expire on
 * their own). Returns the stored text it deleted, null when the session was gone already.
 */
export async function destroySession(id: string, record?: SessionRecord): Promise<string | null> {
  return (await forgetEndedSession(id, record, () => getStore().take(sessionKey(id)))) ?? null;
}

/**
 * The refresh token to give back at the IdP once `session` has been ended, given the record its
 * end deleted: a refresh by another request that landed between reading the session and ending it
 * rotated the token, and the one read is then spent while the new one would stay valid unheld.
 */
export async function refreshTokenAtEnd(session: Session, deleted: string | null): Promise<string | undefined> {
  const record = deleted === null ? null : parseRecord(deleted);
  if (!record || record.sealed === session.record.sealed) return session.secrets.refreshToken;
  const secrets = await decryptSecrets(record.sealed);
  // Only the same session's record, refreshed: anything else is not what the caller ended.
  if (!secrets || secrets.boundTo !== recordBinding(session.id, record)) return session.secrets.refreshToken;
  return secrets.refreshToken ?? session.secrets.refreshToken;
}

/** What a session's end leaves to clean up, with the deletion of its record unless that is done already. */
async function forgetEndedSession<T>(id: string, record: SessionRecord | undefined, deleteRecord?: () => Promise<T>): Promise<T | undefined> {
  forgetCopies(id);
  const [deleted] = await storeCall(() => Promise.all([deleteRecord?.(), getStore().indexRemove(activeSessionsKey(), sessionHandle(id))]));
  for (const listener of endedListeners) {
    // What listens is a side matter: the session has ended whatever it does.
    try {
      listener(id);
    } catch (error) {
      log('error', 'session.ended_listener_failed', describeCause(error));
    }
  }
  if (record) await removeFromIndexes(id, record);
  return deleted;
}

/** Who signed in, and in which IdP session: what tells whether two sessions share an IdP grant. */
export type SignIn = { sub: string; idpSid?: string | undefined };

/**
 * Whether `ended` comes from the IdP session that `survivor`, a session that stays, comes from:
 * IdPs such as oidc-provider and Keycloak revoke the whole grant with one refresh token, and such
 * sessions share it. An IdP that names no session (`sid`) for the survivor cannot tell them apart.
 */
export function fromOneIdpSession(ended: SignIn, survivor: SignIn): boolean {
  return ended.sub === survivor.sub && (survivor.idpSid === undefined || ended.idpSid === survivor.idpSid);
}

export interface SessionSummary {
  handle: string;
  createdAt: number;
  lastUsedAt: number;
  expiresAt: number;
  userAgent: string | undefined;
  current: boolean;
}

/**
 * The user's live sessions, newest first, and the ids of those whose record this release cannot
 * read (a newer one's, during a rolling deploy: not listed, but not to be taken for ended).
 * Entries whose session is gone are pruned on the way.
 */
export async function listUserSessions(current: Session): Promise<{ sessions: Array<SessionSummary & { id: string }>; unreadableIds: string[] }> {
  const now = Date.now();
  const idleMs = getConfig().session.idleTimeoutSec * 1000;
  const indexKey = userSessionsKey(current.record.sub);
  const entries = await storeCall(() => getStore().indexMembers(indexKey, now));
  const unreadableIds: string[] = [];
  const summaries = await Promise.all(
    entries.map(async ({ member: id, expiresAtMs }) => {
      // A read replica may not have a session created a moment ago: its entry goes only if the primary agrees.
      const raw = (await storeCall(() => getStore().get(sessionKey(id)))) ?? (await readLatest(sessionKey(id)));
      const record = raw === null ? null : parseRecord(raw);
      if (raw !== null && !record) {
        unreadableIds.push(id);
        return null;
      }
      if (!record || record.sub !== current.record.sub) {
        await storeCall(() => getStore().indexRemove(indexKey, id));
        return null;
      }
      return {
        id,
        handle: sessionHandle(id),
        createdAt: record.createdAt,
        lastUsedAt: Math.max(record.createdAt, Math.min(now, expiresAtMs - idleMs)),
        expiresAt: expiresAtMs,
        userAgent: record.userAgent,
        current: id === current.id,
      };
    }),
  );
  return { sessions: summaries.filter((entry) => entry !== null).sort((a, b) => b.createdAt - a.createdAt), unreadableIds };
}

/** How much later than a logout token's `iat` a session may have begun and still be the token's. */
const LOGOUT_CLOCK_SKEW_MS = 60_000;

/**
 * Ends every session that an IdP back-channel logout names: by its `sid`, or all of a `sub`'s. A
 * token with both also ends the sub's sessions whose id_token named no IdP session: some IdPs put
 * `sid` in logout tokens but not in id_tokens, and such a session may be the one that ended there.
 * A token that names no session by `sid` ends only sessions begun before it was issued (`issuedAt`,
 * epoch ms): one delivered late, or retried, must not end a sign-in that came after the logout.
 */
export async function destroySessionsFor(target: { sub?: string; idpSid?: string }, issuedAt: number): Promise<number> {
  // Gatehouse's clock says when the session began, the IdP's when its user signed in (auth_time):
  // either one before the logout makes it the logout's, and a record that says neither is ended too.
  const cutoff = issuedAt + LOGOUT_CLOCK_SKEW_MS;
  const begunBefore = (record: SessionRecord | null) => record === null || !(record.createdAt > cutoff) || (record.authTime !== undefined && record.authTime * 1000 <= cutoff);
  if (target.idpSid === undefined) return destroyIndexed(userSessionsKey(target.sub as string), target.sub, begunBefore);
  let ended = await destroyIndexed(idpSessionKey(target.idpSid), target.sub, () => true);
  // A record already gone may have had any sid: it is left to the pass that names it.
  if (target.sub) ended += await destroyIndexed(userSessionsKey(target.sub), target.sub, (record) => record !== null && record.idpSid === undefined && begunBefore(record));
  return ended;
}

/** Ends the sessions of an index that `chosen` picks (`null`: the record is gone), each of `sub`'s only when given. */
async function destroyIndexed(indexKey: string, sub: string | undefined, chosen: (record: SessionRecord | null) => boolean): Promise<number> {
  const entries = await storeCall(() => getStore().indexMembers(indexKey, Date.now()));
  let ended = 0;
  for (const { member: id } of entries) {
    const raw = await storeCall(() => getStore().get(sessionKey(id)));
    const record = raw === null ? null : parseRecord(raw);
    // With both claims present, a session must match both (the spec's sid is scoped to the sub).
    if ((record && sub && record.sub !== sub) || !chosen(record)) continue;
    if (record) ended++;
    await endSessionBecause(id, record ?? undefined, 'idp');
    await storeCall(() => getStore().indexRemove(indexKey, id));
  }
  return ended;
}

/** The session id sealed in the request's session cookie, without asking the store. */
export async function sessionIdFromCookieHeader(cookieHeader: string | null | undefined): Promise<string | null> {
  const value = readCookie(cookieHeader, getConfig().session.cookieName);
  return value ? unsealSessionId(value) : null;
}

export interface CookieSession {
  session: Session | null;
  /** A cookie was sent that leads nowhere (tampered, or its session is gone): clear it. */
  stale: boolean;
  /** The session was replaced by a new login in this browser moments ago: leave the cookie alone. */
  replaced: boolean;
  /** The session was ended from another device, at the IdP, or by its tokens' end: the browser should hear why. */
  endedBy?: Exclude<EndedBy, 'replaced'>;
  /** The session is stored in a newer release's form (see SessionMiss): retry, it lives on elsewhere. */
  newerRelease?: true;
  /**
   * No session here, but one may live on where it can be read: a cookie sealed under a secret this
   * instance does not have (no `sessionId`), or a record it cannot open (`unreadable` or
   * `newer_release`), which only its user's own sign-out may end here.
   */
  unreadable?: { sessionId?: string };
}

/** What a request whose cookie leads to no session hears: a newer release's or replaced (retry), ended (and how), or signed out. */
export function withoutSession({ stale, replaced, endedBy, newerRelease }: CookieSession): GatehouseError {
  if (newerRelease) return errors.sessionUnreadable();
  return replaced ? errors.sessionReplaced() : endedBy ? errors.sessionEnded(endedBy) : errors.unauthenticated(stale);
}

/** The session a request's cookie leads to, and what to do about the cookie when there is none. */
export async function sessionFromCookieHeader(cookieHeader: string | null | undefined, { coherentCopy = false, latest = false } = {}): Promise<CookieSession> {
  const value = readCookie(cookieHeader, getConfig().session.cookieName);
  if (!value) return { session: null, stale: false, replaced: false };
  const unsealed = await unsealCookieValue(value);
  if (unsealed.kind !== 'id') return { session: null, stale: unsealed.kind === 'invalid', replaced: false, ...(unsealed.kind === 'unknown_key' ? { unreadable: {} } : {}) };
  const loaded = await loadSession(unsealed.id, { coherentCopy, latest });
  const endedBy = loaded.miss === undefined ? undefined : ENDED_BY_MISS[loaded.miss];
  return {
    session: loaded.session,
    stale: loaded.miss === 'gone' || endedBy !== undefined,
    replaced: loaded.miss === 'replaced',
    ...(endedBy ? { endedBy } : {}),
    ...(loaded.miss === 'newer_release' ? { newerRelease: true as const } : {}),
    ...(servedElsewhere(loaded.miss) ? { unreadable: { sessionId: unsealed.id } } : {}),
  };
}

// ---------------------------------------------------------------------------------------------
// The login transaction: a short-lived sealed cookie per login attempt, so several tabs can log
// in at once and an anonymous visitor costs the store nothing.

export interface LoginTransaction {
  state: string;
  nonce: string;
  codeVerifier: string;
  returnTo: string;
  prompt?: string;
  /** What this login asked the IdP for (step-up): the callback refuses a sign-in that does not bring it. */
  acrValues?: string[];
  maxAge?: number;
  /** Epoch ms; the oldest attempts are dropped first when a browser piles them up. */
  startedAt: number;
  /**
   * The browser's session when the login started. Login start is a same-site navigation, so the
   * Strict session cookie arrives there; the callback ends a cross-site redirect chain and does not
   * see it. Recording it here lets the callback end the session this login replaces.
   */
  previousSessionId?: string;
  /**
   * The login link itself asked for a stronger or more recent sign-in (not only the operator's
   * floor): the callback then holds it to the user of `previousSessionId`.
   */
  stepUp?: true;
  /**
   * With OIDC_DPOP: the thumbprint of the key this login's tokens are bound to (sent as `dpop_jkt`).
   * The private key itself never leaves the server: it waits in the store (lib/dpop.ts).
   */
  dpopJkt?: string;
  /**
   * OIDC_AUTHORIZATION_PARAMS asked this login for `prompt=login`, sent in the browser's URL or
   * pushed by PAR: the callback holds the sign-in to it (lib/oidc.ts checkFreshSignIn), as this
   * attempt was made, whatever the configuration says by the time it returns.
   */
  freshSignIn?: 'sent' | 'pushed';
}

export const TRANSACTION_TTL_SEC = 10 * 60;
/** Each attempt is a cookie of up to ~3 KB: a handful left unfinished would make every request too large (431). */
export const MAX_LIVE_TRANSACTIONS = 3;
/**
 * And all of them together at most this many bytes (`name=value`): any page can start logins in a
 * browser (a link, a popup, the app's own client sent to a long URL), and three at full size make a
 * Cookie header past the 8 KiB that front proxies such as nginx take by default, every request of
 * that browser to the app failing until they expire. One attempt at full size always fits.
 */
export const MAX_TRANSACTION_COOKIE_BYTES = 4096;
const TRANSACTION_COOKIE_STEM = 'gatehouse-tx-';

function transactionCookiePrefix(): string {
  return `${getConfig().secureCookies ? '__Host-' : ''}${TRANSACTION_COOKIE_STEM}`;
}

function transactionCookieName(state: string): string {
  // Derived from state so the callback finds the right one among concurrent logins.
  const suffix = state.replace(/[^A-Za-z0-9_-]/g, '').slice(0, 16);
  return `${transactionCookiePrefix()}${suffix}`;
}

function clearCookieHeader(name: string): string {
  return serializeCookie(name, '', { httpOnly: true, secure: getConfig().secureCookies, sameSite: 'lax', path: '/', maxAge: 0 });
}

export async function transactionCookieHeader(transaction: LoginTransaction): Promise<string> {
  const { seal } = await cookiePasswords();
  const value = await sealData(transaction, { password: seal, ttl: TRANSACTION_TTL_SEC + 60 });
  return serializeCookie(transactionCookieName(transaction.state), value, {
    httpOnly: true,
    secure: getConfig().secureCookies,
    // Lax, not Strict: the IdP's redirect back to the callback is a cross-site navigation.
    sameSite: 'lax',
    path: '/',
    maxAge: TRANSACTION_TTL_SEC,
  });
}

async function openTransaction(value: string): Promise<LoginTransaction | null> {
  try {
    const { unseal } = await cookiePasswords();
    const data = await unsealData<Partial<LoginTransaction>>(value, { password: unseal, ttl: TRANSACTION_TTL_SEC + 60 });
    if (typeof data.state !== 'string' || typeof data.nonce !== 'string' || typeof data.codeVerifier !== 'string' || typeof data.returnTo !== 'string') return null;
    if (typeof data.startedAt !== 'number') return null;
    if (data.acrValues !== undefined && !(Array.isArray(data.acrValues) && data.acrValues.every((value) => typeof value === 'string'))) return null;
    if (data.maxAge !== undefined && typeof data.maxAge !== 'number') return null;
    if (data.freshSignIn !== undefined && data.freshSignIn !== 'sent' && data.freshSignIn !== 'pushed') return null;
    return data as LoginTransaction;
  } catch {
    return null;
  }
}

export async function readTransaction(cookieHeader: string | null | undefined, state: string | null): Promise<LoginTransaction | null> {
  if (!state) return null;
  const value = readCookie(cookieHeader, transactionCookieName(state));
  if (!value) return null;
  const transaction = await openTransaction(value);
  // The cookie's name is derived from state, so also insist the sealed state is the one presented.
  return transaction?.state === state ? transaction : null;
}

/** Clears the transaction cookie of `state` if the browser sent one (whatever the callback's outcome). */
export function clearTransactionCookieHeaders(cookieHeader: string | null | undefined, state: string | null): string[] {
  if (!state) return [];
  const name = transactionCookieName(state);
  return readCookie(cookieHeader, name) === undefined ? [] : [clearCookieHeader(name)];
}

/**
 * Clearing headers for the transaction cookies a new login (its cookie `adding`, if it sets one)
 * must not add to: unreadable ones, then the oldest, until with the new one at most
 * `MAX_LIVE_TRANSACTIONS` live in the browser, in at most `MAX_TRANSACTION_COOKIE_BYTES`.
 */
export async function transactionCookiesToDrop(cookieHeader: string | null | undefined, adding?: string): Promise<string[]> {
  if (!cookieHeader) return [];
  const prefix = transactionCookiePrefix();
  const present = Object.entries(parseCookie(cookieHeader)).filter((entry): entry is [string, string] => entry[0].startsWith(prefix) && entry[1] !== undefined);
  const newBytes = adding === undefined ? 0 : (adding.split(';', 1)[0] ?? '').length;
  const bytes = (name: string, value: string) => name.length + 1 + value.length;
  const total = present.reduce((sum, [name, value]) => sum + bytes(name, value), newBytes);
  const count = present.length + (adding === undefined ? 0 : 1);
  if (count <= MAX_LIVE_TRANSACTIONS && total <= MAX_TRANSACTION_COOKIE_BYTES) return [];
  const opened = await Promise.all(present.map(async ([name, value]) => ({ name, size: bytes(name, value), startedAt: (await openTransaction(value))?.startedAt ?? -Infinity })));
  opened.sort((a, b) => b.startedAt - a.startedAt);
  let keptCount = adding === undefined ? 0 : 1;
  let keptBytes = newBytes;
  const dropped: string[] = [];
  for (const attempt of opened) {
    if (attempt.startedAt > -Infinity && keptCount < MAX_LIVE_TRANSACTIONS && keptBytes + attempt.size <= MAX_TRANSACTION_COOKIE_BYTES) {
      keptCount += 1;
      keptBytes += attempt.size;
    } else {
      dropped.push(clearCookieHeader(attempt.name));
    }
  }
  return dropped;
}
