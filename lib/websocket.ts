import { STATUS_CODES, type IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { WebSocket, WebSocketServer } from 'ws';
import { getConfig, type ApiConfig } from './config.ts';
import { GatehouseError, asGatehouseError, errorBody, errorHeaders, errors } from './errors.ts';
import { jsonHeaders, requestIdFrom } from './http.ts';
import { describeCause, log } from './log.ts';
import { filterRequestHeaders, forwardedForChain, noteStreamedBytes, resolveUpstream } from './proxy.ts';
import { endedSessionHeaders, holdOpen, sessionFromCookieHeader, sessionHandle, touchSession, withoutSession, type HeldOpen, type SessionEndSeenBy } from './session.ts';
import { missingAuthentication, refusesTheToken, stepUpDetails, stepUpRefusal, whenSignInTooOld } from './step-up.ts';
import { getAccessToken, mayForceRefresh } from './tokens.ts';

/**
 * WebSockets through `/api/proxy/<api>/<path>`, for `npm start` (server.ts hands it the upgrades).
 * Everything is decided before the browser's socket is upgraded, and refused with a plain HTTP
 * answer: the handshake's shape, its Origin (the only CSRF defence a WebSocket has: the browser
 * API can set no header, and browsers always send Origin), the path, the API, the session. Then
 * the upstream handshake goes out with the bearer token, and only its success upgrades the
 * browser. From there two `ws` sockets relay whole messages, each direction pausing its reader
 * while the other side's writes are behind, so that Gatehouse can end the browser's socket with a
 * close frame of its own (4401) at a message boundary when the session ends.
 */

/** Sent to the browser when the socket's session ends: logout, back-channel logout, expiry, ended elsewhere. */
export const SESSION_ENDED_CLOSE_CODE = 4401;
/**
 * Sent to the browser when the sign-in grows older than the API's `maxAge` while the socket is
 * open: the session lives on, but this API needs a more recent sign-in (a new handshake is refused
 * with 401 step_up_required, as a proxied call would be).
 */
export const STEP_UP_CLOSE_CODE = 4403;
/** Per session and process: a tab that reconnects in a loop cannot pile up upstream sockets. */
export const MAX_SOCKETS_PER_SESSION = 16;
/**
 * Per user and process, over all their sessions: each socket may hold up to a message of the API's
 * `maxBodyBytes` plus the high-water mark in each direction, and signing in again is a new session.
 */
export const MAX_SOCKETS_PER_USER = 32;
/** A direction stops reading once this much of what it read waits to be written out on the other side. */
const HIGH_WATER_BYTES = 1024 * 1024;
const LOW_WATER_BYTES = 256 * 1024;
/** How long a refused handshake's socket may stay half-open before it is dropped. */
const REFUSED_LINGER_MS = 5_000;
/** Relayed as is when a peer closes abnormally (1006 cannot be sent): the browser hears 1011, the upstream 1001. */
const UPSTREAM_FAILED_CLOSE_CODE = 1011;
const BROWSER_GONE_CLOSE_CODE = 1001;
/** What an API's close frame may not pass on to the browser: the codes that speak for Gatehouse. */
const GATEHOUSE_CLOSE_CODES = new Set([SESSION_ENDED_CLOSE_CODE, STEP_UP_CLOSE_CODE]);
/** What a queued frame holds besides its payload (header, buffers, callback), counted against the high-water mark. */
const FRAME_COST_BYTES = 128;

/**
 * The one Origin a WebSocket handshake may carry: exactly one `Origin` header, equal byte for byte
 * to the app's origin as `URL.origin` serialises it (browsers serialise the same way). Anything
 * else — absent, `null`, another scheme, host or port, a suffix or prefix, a second header — is a
 * page of another origin opening a socket with the user's cookie (cross-site WebSocket hijacking).
 */
export function isAllowedOrigin(values: readonly string[], appOrigin: string): boolean {
  return values.length === 1 && values[0] === appOrigin;
}

function rawValues(request: IncomingMessage, name: string): string[] {
  const values: string[] = [];
  for (let i = 0; i < request.rawHeaders.length; i += 2) if (request.rawHeaders[i]?.toLowerCase() === name) values.push(request.rawHeaders[i + 1] as string);
  return values;
}

/** A header as one string: Node gives arrays only for a few names (set-cookie), never for these. */
function joined(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value.join(', ') : value;
}

function rawPairs(request: IncomingMessage): Array<[string, string]> {
  const pairs: Array<[string, string]> = [];
  for (let i = 0; i < request.rawHeaders.length; i += 2) pairs.push([request.rawHeaders[i] as string, request.rawHeaders[i + 1] as string]);
  return pairs;
}

/** RFC 6455 §4.2.1, as far as Gatehouse relies on it; anything else is no WebSocket handshake. */
function isWebSocketHandshake(request: IncomingMessage): boolean {
  return (
    request.method === 'GET' &&
    // Exactly as `ws` will check it when the browser's side is upgraded.
    request.headers.upgrade?.toLowerCase() === 'websocket' &&
    /^[+/0-9A-Za-z]{22}==$/.test(request.headers['sec-websocket-key'] ?? '') &&
    request.headers['sec-websocket-version'] === '13'
  );
}

/** The subprotocols the browser offers, or null when the offer is malformed (RFC 6455 §4.1: distinct tokens). */
function offeredProtocols(request: IncomingMessage): string[] | null {
  const raw = rawValues(request, 'sec-websocket-protocol');
  // Only spaces and tabs around a token, as `ws` reads the header: JavaScript's trim() would pass
  // a no-break space or a BOM, which `ws` refuses after the upstream was already asked.
  const offered = raw.flatMap((value) => value.split(',')).map((token) => token.replace(/^[ \t]+|[ \t]+$/g, ''));
  if (!raw.length) return [];
  if (offered.some((token) => !/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(token)) || new Set(offered).size !== offered.length) return null;
  return offered;
}

const invalidHandshake = () => new GatehouseError('invalid_websocket_request', 400, 'This is not a WebSocket handshake Gatehouse can pass on.');
const originRefused = () => new GatehouseError('origin_refused', 403, 'A WebSocket must be opened by the application itself (Origin must be its own).');
const notEnabled = () => new GatehouseError('websocket_not_enabled', 404, 'This API does not take WebSockets.');
const tooMany = () => new GatehouseError('too_many_websockets', 429, `At most ${MAX_SOCKETS_PER_SESSION} WebSockets per session and ${MAX_SOCKETS_PER_USER} per user.`);
const clientClosed = () => new GatehouseError('client_closed', 499, 'The client went away.');

/** A refusal before any upgrade: the JSON error body every Gatehouse error has, then the connection ends. */
function refuse(socket: Duplex, error: GatehouseError, requestId: string): void {
  if (socket.destroyed) return;
  const body = errorBody(error);
  const headers: Array<[string, string]> = [...Object.entries(jsonHeaders()), ...errorHeaders(error), ['x-request-id', requestId]];
  if (error.clearSession) headers.push(...endedSessionHeaders());
  if (error.code === 'invalid_websocket_request') headers.push(['sec-websocket-version', '13']);
  headers.push(['content-length', String(Buffer.byteLength(body))], ['connection', 'close']);
  const head = `HTTP/1.1 ${error.status} ${STATUS_CODES[error.status] ?? 'Error'}\r\n${headers.map(([name, value]) => `${name}: ${value}\r\n`).join('')}\r\n`;
  socket.end(head + body);
  // The browser closes once it has read the answer; one that does not is not waited for.
  setTimeout(() => socket.destroy(), REFUSED_LINGER_MS).unref();
}

// ---------------------------------------------------------------------------------------------
// Open sockets per session, and what ends them.

interface OpenSocket extends HeldOpen {
  sessionId: string;
  sub: string;
  requestId: string;
  api: string;
  /** Set once the socket must go (before the relay exists: at the end of the handshake). */
  ending: { code: number; reason: string } | undefined;
  /** Closes both sides; installed by the relay. */
  close?: (code: number, reason: string) => void;
  /** Cancels the close that comes when the sign-in grows older than the API's `maxAge`. */
  cancelSignInExpiry?: () => void;
  /** Unties it from its session (lib/session.ts holdOpen); set while it counts as open. */
  release?: () => void;
}

const open = new Set<OpenSocket>();
const openPerSession = new Map<string, number>();
const openPerUser = new Map<string, number>();

function countIn(counts: Map<string, number>, key: string, change: 1 | -1): void {
  const count = (counts.get(key) ?? 0) + change;
  if (count > 0) counts.set(key, count);
  else counts.delete(key);
}

function register(entry: OpenSocket): void {
  open.add(entry);
  countIn(openPerSession, entry.sessionId, 1);
  countIn(openPerUser, entry.sub, 1);
  entry.release = holdOpen(entry.sessionId, entry);
}

function unregister(entry: OpenSocket): void {
  entry.cancelSignInExpiry?.();
  if (!entry.release) return;
  entry.release();
  entry.release = undefined;
  open.delete(entry);
  countIn(openPerSession, entry.sessionId, -1);
  countIn(openPerUser, entry.sub, -1);
}

function endSocket(entry: OpenSocket, code: number, reason: string): void {
  if (entry.ending) return;
  entry.ending = { code, reason };
  entry.close?.(code, reason);
}

/** Its session ended: in this process at once, elsewhere at the next session check. */
function endWithSession(entry: OpenSocket, seenBy: SessionEndSeenBy): void {
  if (entry.ending) return;
  log('info', 'websocket.session_ended', { requestId: entry.requestId, session: sessionHandle(entry.sessionId), detectedBy: seenBy });
  endSocket(entry, SESSION_ENDED_CLOSE_CODE, 'session ended');
}

/** On shutdown: every socket gets a close frame (1001) so browsers reconnect to another worker or instance. */
export function closeAllWebSockets(): void {
  for (const entry of open) endSocket(entry, 1001, 'server restarting');
}

// ---------------------------------------------------------------------------------------------
// The handshake.

/** server.ts calls this for every upgrade request to /api/proxy/*; it never throws. */
export function handleUpgrade(request: IncomingMessage, socket: Duplex, head: Buffer): void {
  socket.on('error', (error) => log('debug', 'websocket.socket_error', describeCause(error)));
  void upgrade(request, socket, head).catch((error: unknown) => {
    log('error', 'websocket.failed', describeCause(error));
    socket.destroy();
  });
}

async function upgrade(request: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
  const started = performance.now();
  const config = getConfig();
  const requestId = requestIdFrom(joined(request.headers['x-request-id']));
  let api: ApiConfig | undefined;
  let entry: OpenSocket | undefined;
  try {
    if (!isWebSocketHandshake(request)) throw invalidHandshake();
    const site = request.headers['sec-fetch-site'];
    if (!isAllowedOrigin(rawValues(request, 'origin'), config.appBaseUrl.origin) || (site !== undefined && site !== 'same-origin')) throw originRefused();
    const resolved = resolveUpstream(request.url ?? '', config.apis);
    api = resolved.api;
    if (!api.websocket) throw notEnabled();
    const protocols = offeredProtocols(request);
    if (!protocols) throw invalidHandshake();

    const found = await sessionFromCookieHeader(request.headers.cookie, { coherentCopy: true });
    if (!found.session) throw withoutSession(found);
    // As for proxied calls, before any token is fetched: a socket this sign-in may not open costs the IdP nothing.
    const lacking = missingAuthentication({ acrValues: api.acr, maxAge: api.maxAge }, found.session.record);
    if (lacking) throw errors.stepUpRequired(stepUpDetails(lacking));
    const { sub } = found.session.record;
    if ((openPerSession.get(found.session.id) ?? 0) >= MAX_SOCKETS_PER_SESSION || (openPerUser.get(sub) ?? 0) >= MAX_SOCKETS_PER_USER) throw tooMany();
    // Counted from here, so concurrent handshakes cannot pass the limit, and a logout meanwhile is seen.
    const opening: OpenSocket = { sessionId: found.session.id, sub, requestId, api: api.name, ending: undefined, used: false, end: (seenBy) => endWithSession(opening, seenBy) };
    entry = opening;
    register(entry);
    // A logout in this process that finished between the read above and the registration told no
    // socket: its copy of the session is gone, so this reads the store.
    const still = await sessionFromCookieHeader(request.headers.cookie, { coherentCopy: true });
    if (!still.session) throw withoutSession(still);

    const credentials = await getAccessToken(found.session, { resource: api.resource });
    void touchSession(credentials.session).catch(() => undefined);
    const headers = upstreamHeaders(request, requestId);
    let attempt = await openUpstream(api, resolved.url, protocols, { ...headers, authorization: `Bearer ${credentials.token}` }, socket);
    let refreshed = credentials.refreshed;
    // As for proxied calls: a step-up is asked for before any forced refresh (a new token from the
    // same sign-in cannot meet it), and only a refusal of the token itself forces one.
    if ('refusedWith' in attempt) await refuseStepUpChallenge(attempt, { requestId, api: api.name });
    if ('refusedWith' in attempt && attempt.refusedWith === 401 && (await refusesTheToken(attempt.rawHeaders)) && (await mayForceRefresh(credentials.session))) {
      // A token that looked valid was refused (revoked, clock skew): one refresh, one retry.
      const retried = await getAccessToken(credentials.session, { resource: api.resource, rejectedToken: credentials.token });
      refreshed = true;
      attempt = await openUpstream(api, resolved.url, protocols, { ...headers, authorization: `Bearer ${retried.token}` }, socket);
      if ('refusedWith' in attempt) await refuseStepUpChallenge(attempt, { requestId, api: api.name });
    }
    if ('refusedWith' in attempt) {
      throw new GatehouseError('upstream_refused', 502, `The API refused the WebSocket (HTTP ${attempt.refusedWith}).`);
    }
    const upstream = attempt.socket;
    if (entry.ending || !socket.readable || !socket.writable) {
      // Ended during the handshake: the session's end is a 401 the SPA understands; a shutdown or a
      // browser that left needs no answer. As a handshake a moment later would hear it: a logout
      // clears the cookie, a new login's (which replaced this session) does not.
      // Resumed, it reads the API's close reply instead of holding the connection for ws's close timeout.
      upstream.resume();
      upstream.close(1000, entry.ending?.reason);
      if (entry.ending?.code !== SESSION_ENDED_CLOSE_CODE || !socket.writable) throw clientClosed();
      const current = await sessionFromCookieHeader(request.headers.cookie);
      throw current.session ? errors.unauthenticated() : withoutSession(current);
    }
    if (!acceptBrowser(request, socket, head, upstream, entry, started)) throw clientClosed();
    const { authTime } = found.session.record;
    // A socket opened in time would otherwise carry the sign-in's token for as long as it stays open.
    if (api.maxAge !== undefined && authTime !== undefined) {
      const opened = entry;
      opened.cancelSignInExpiry = whenSignInTooOld(authTime, api.maxAge, () => endSocket(opened, STEP_UP_CLOSE_CODE, 'step_up_required'));
    }
    log('info', 'websocket.open', { requestId, api: api.name, session: sessionHandle(entry.sessionId), protocol: upstream.protocol || undefined, refreshed, ms: Math.round(performance.now() - started) });
  } catch (caught) {
    if (entry) unregister(entry);
    const error = asGatehouseError(caught);
    if (error.status >= 500) log('warn', 'websocket.error', { requestId, api: api?.name, code: error.code, ...describeCause(error.cause) });
    if (error.code !== 'client_closed') refuse(socket, error, requestId);
    else socket.destroy();
    log('info', 'websocket.refused', { requestId, api: api?.name, status: error.status, code: error.code, ms: Math.round(performance.now() - started) });
  }
}

/**
 * What goes upstream: the browser's end-to-end headers under the HTTP proxy's rules (never its
 * Cookie or Authorization), without the handshake's own headers (the `ws` client makes its own
 * key, and compression is not negotiated), plus Gatehouse's forwarding headers.
 */
function upstreamHeaders(request: IncomingMessage, requestId: string): Record<string, string> {
  const config = getConfig();
  const headers: Record<string, string> = {};
  for (const [name, value] of filterRequestHeaders(rawPairs(request), request.headers.connection)) {
    // `Sec_WebSocket_Key` too: servers that read headers CGI-style take it for the real one.
    if (/^sec[-_]websocket[-_]/.test(name) || name === 'origin') continue;
    headers[name] = headers[name] === undefined ? value : `${headers[name]}, ${value}`;
  }
  headers['x-forwarded-proto'] = config.appBaseUrl.protocol.slice(0, -1);
  headers['x-forwarded-host'] = config.appBaseUrl.host;
  headers['x-request-id'] = requestId;
  const forwardedFor = forwardedForChain(joined(request.headers['x-forwarded-for']), request.socket.remoteAddress, config.trustedProxyHops);
  if (forwardedFor) headers['x-forwarded-for'] = forwardedFor;
  return headers;
}

/** A message over the API's `maxBodyBytes` closes the socket (1009); 0 would mean "no limit" to `ws`. */
function maxPayload(api: ApiConfig): number {
  return Math.max(api.maxBodyBytes, 1);
}

/**
 * How a message still arriving may be held (`ws` keeps every piece read until the message is
 * whole, and each frame of it keeps the whole read it came in): in reads of 512 bytes on average,
 * which real TCP segments far exceed, and, from the browser, in frames of 16 KiB on average
 * (browsers send a message whole or in frames of 64-128 KiB); 1008 past either. A peer dripping a
 * message a byte at a time, or in one-byte frames each padded out with pings, then holds a few
 * times `maxBodyBytes` at most, not hundreds of MB. From the API, `ws`'s server default of
 * 16,384 frames: servers fragment as they like (8 KiB frames are common).
 */
function messageLimits(api: ApiConfig, from: 'browser' | 'upstream'): { maxPayload: number; maxBufferedChunks: number; maxFragments: number } {
  const payload = maxPayload(api);
  return {
    maxPayload: payload,
    maxBufferedChunks: Math.max(1024, Math.ceil(payload / 512)),
    maxFragments: from === 'browser' ? Math.max(64, Math.ceil(payload / (16 * 1024))) : 16 * 1024,
  };
}

interface RefusedHandshake {
  refusedWith: number;
  /** Read only for a step-up challenge: nothing of the refusal but its status reaches the browser otherwise. */
  rawHeaders: string[];
}

/** An API's refusal that asks for a stronger or more recent sign-in (RFC 9470) is 401 step_up_required, as for proxied calls. */
async function refuseStepUpChallenge(refusal: RefusedHandshake, where: { requestId: string; api: string }): Promise<void> {
  const stepUp = await stepUpRefusal(refusal.refusedWith, refusal.rawHeaders, 'bearer', { ...where, websocket: true });
  if (stepUp) throw stepUp;
}

/** The upstream handshake: an open socket, the status of a refusal, or a GatehouseError. */
function openUpstream(api: ApiConfig, url: URL, protocols: string[], headers: Record<string, string>, browser: Duplex): Promise<{ socket: WebSocket } | RefusedHandshake> {
  if (browser.destroyed) return Promise.reject(clientClosed());
  return new Promise((resolve, reject) => {
    const target = new URL(url);
    target.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    // Redirects are not followed (the default): the bearer token must not follow one to another host.
    const upstream = new WebSocket(target, protocols, {
      headers,
      origin: getConfig().appBaseUrl.origin,
      perMessageDeflate: false,
      ...messageLimits(api, 'upstream'),
      autoPong: false,
    });
    let settled = false;
    const settle = (outcome: () => void) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      browser.off('close', onBrowserGone);
      outcome();
    };
    const timer = setTimeout(
      () =>
        settle(() => {
          upstream.terminate();
          reject(new GatehouseError('upstream_timeout', 504, 'The API did not answer in time.'));
        }),
      api.timeoutMs,
    );
    const onBrowserGone = () =>
      settle(() => {
        upstream.terminate();
        reject(clientClosed());
      });
    browser.once('close', onBrowserGone);
    upstream.once('open', () =>
      settle(() => {
        // Whatever the API sent with its 101 (a greeting, a ping) is read on the next tick, before
        // relay() listens: paused, it waits there instead of being emitted to no one.
        upstream.pause();
        resolve({ socket: upstream });
      }),
    );
    upstream.once('unexpected-response', (upstreamRequest, response) =>
      settle(() => {
        // Only the status is kept (and a step-up challenge read): the upstream's body and headers never reach the browser.
        response.destroy();
        upstreamRequest.destroy();
        resolve({ refusedWith: response.statusCode ?? 502, rawHeaders: response.rawHeaders });
      }),
    );
    upstream.on('error', (error) => settle(() => reject(new GatehouseError('upstream_unavailable', 502, 'The API could not be reached.', { cause: error }))));
  });
}

// ---------------------------------------------------------------------------------------------
// The relay.

/** Completes the browser's handshake with the upstream's chosen subprotocol; false when the browser has gone. */
function acceptBrowser(request: IncomingMessage, socket: Duplex, head: Buffer, upstream: WebSocket, entry: OpenSocket, started: number): boolean {
  const server = new WebSocketServer({
    noServer: true,
    clientTracking: false,
    perMessageDeflate: false,
    ...messageLimits(getConfig().apis[entry.api] as ApiConfig, 'browser'),
    autoPong: false,
    // The upstream chose among the browser's offer; the browser hears that choice.
    handleProtocols: () => upstream.protocol || false,
  });
  server.on('headers', (lines) => lines.push(`X-Request-Id: ${entry.requestId}`));
  // A laptop closed mid-session: without keepalive its socket (and the upstream's) would stay open.
  (socket as Socket).setKeepAlive?.(true, 60_000);
  let accepted = false;
  server.handleUpgrade(request, socket, head, (browser) => {
    accepted = true;
    relay(browser, upstream, entry, started);
  });
  // `ws` upgrades synchronously, or drops a socket that closed meanwhile: then the upstream goes too.
  if (!accepted) upstream.terminate();
  return accepted;
}

/**
 * The close code `ws` sent a peer that broke the protocol (it reports only its own error code):
 * a message over maxPayload 1009, invalid UTF-8 1007, too many fragments 1008, anything else 1002.
 */
function protocolFailureCode(error: Error): number | undefined {
  const code = (error as NodeJS.ErrnoException).code;
  if (typeof code !== 'string' || !code.startsWith('WS_ERR_')) return undefined;
  if (code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH' || code === 'WS_ERR_UNSUPPORTED_DATA_PAYLOAD_LENGTH') return 1009;
  if (code === 'WS_ERR_INVALID_UTF8') return 1007;
  if (code === 'WS_ERR_TOO_MANY_BUFFERED_PARTS') return 1008;
  return 1002;
}

/**
 * A close code as the other side may be sent it; undefined is a close frame without one (1005
 * received). `failure`: the code Gatehouse closed a peer with for breaking the protocol, which the
 * other side hears too.
 */
function relayedCloseCode(code: number, from: 'browser' | 'upstream', failure: number | undefined): number | undefined {
  if (failure !== undefined) return failure;
  if (code === 1005) return undefined;
  // 1006: the peer's connection ended without a close frame, a code that may not be sent.
  if (code === 1006) return from === 'upstream' ? UPSTREAM_FAILED_CLOSE_CODE : BROWSER_GONE_CLOSE_CODE;
  // Gatehouse's own codes tell the SPA its session ended or needs a step-up: an API cannot say that.
  if (from === 'upstream' && GATEHOUSE_CLOSE_CODES.has(code)) return UPSTREAM_FAILED_CLOSE_CODE;
  return code;
}

function relay(browser: WebSocket, upstream: WebSocket, entry: OpenSocket, started: number): void {
  const bytes = { up: 0, down: 0 };
  const sides = { browser, upstream };
  let closedFirst: 'browser' | 'upstream' | 'gatehouse' | undefined;
  let closeCode: number | undefined;
  let stillOpen = 2;

  const forward = (from: 'browser' | 'upstream', to: 'browser' | 'upstream', direction: 'up' | 'down') => {
    const source = sides[from];
    const target = sides[to];
    let waiting = 0;
    let failure: number | undefined;
    /**
     * Armed while `source` is paused: a side that does not take what waits for it down to the low
     * mark within sendTimeoutMs is cut off, as a proxied answer is. Node counts a write done only
     * once all of it is, so a message that takes longer than that to deliver ends the socket too.
     */
    let stalled: NodeJS.Timeout | undefined;
    const cutOffSlowReader = () => {
      log('warn', 'websocket.send_timeout', { requestId: entry.requestId, api: entry.api, side: to, waitingBytes: waiting });
      // A close frame would queue behind what it does not read; its close event ends the other side.
      target.terminate();
    };
    /**
     * Every frame written to `target` counts until the kernel has taken it (its callback), control
     * frames and empty messages included, each with FRAME_COST_BYTES for what it holds besides its
     * payload: otherwise pings that the other side answers into a socket nobody reads would pile
     * up pongs here without end. Past the high-water mark the source is not read any more.
     */
    const write = (payloadBytes: number, send: (sent: () => void) => void) => {
      const cost = payloadBytes + FRAME_COST_BYTES;
      waiting += cost;
      if (waiting > HIGH_WATER_BYTES) {
        source.pause();
        stalled ??= setTimeout(cutOffSlowReader, getConfig().proxy.sendTimeoutMs).unref();
      }
      send(() => {
        waiting -= cost;
        if (waiting <= LOW_WATER_BYTES && source.isPaused) {
          source.resume();
          clearTimeout(stalled);
          stalled = undefined;
        }
      });
    };
    source.on('message', (data, isBinary) => {
      if (entry.ending || target.readyState !== WebSocket.OPEN) return;
      // binaryType is `nodebuffer` (the default): every message, fragmented or not, is one Buffer.
      const message = data as Buffer;
      bytes[direction] += message.length;
      noteStreamedBytes(message.length);
      if (direction === 'up') entry.used = true;
      write(message.length, (sent) => target.send(message, { binary: isBinary }, sent));
    });
    // Heartbeats go end to end, so each side's liveness check sees the other side, not Gatehouse.
    source.on('ping', (data) => target.readyState === WebSocket.OPEN && write(data.length, (sent) => target.ping(data, undefined, sent)));
    source.on('pong', (data) => target.readyState === WebSocket.OPEN && write(data.length, (sent) => target.pong(data, undefined, sent)));
    source.on('error', (error) => {
      failure ??= protocolFailureCode(error);
      log('debug', 'websocket.peer_error', { requestId: entry.requestId, side: from, ...describeCause(error) });
    });
    source.on('close', (code, reason) => {
      clearTimeout(stalled);
      if (!closedFirst) {
        closedFirst = entry.ending ? 'gatehouse' : from;
        closeCode = entry.ending ? entry.ending.code : (failure ?? code);
      }
      if (!entry.ending && target.readyState === WebSocket.OPEN) {
        const relayed = relayedCloseCode(code, from, failure);
        if (relayed === undefined) target.close();
        else target.close(relayed, relayed === code ? reason : undefined);
      }
      if (--stillOpen === 0) {
        unregister(entry);
        log('info', 'websocket.closed', {
          requestId: entry.requestId,
          api: entry.api,
          session: sessionHandle(entry.sessionId),
          closedBy: closedFirst,
          code: closeCode,
          bytesUp: bytes.up,
          bytesDown: bytes.down,
          ms: Math.round(performance.now() - started),
        });
      }
    });
  };
  forward('browser', 'upstream', 'up');
  forward('upstream', 'browser', 'down');

  entry.close = (code, reason) => {
    // Messages still queued go out first; nothing read after this is passed on.
    browser.close(code, reason);
    // Gatehouse's own codes are for the browser; the API hears a normal close with the reason.
    upstream.close(code === SESSION_ENDED_CLOSE_CODE || code === STEP_UP_CLOSE_CODE ? 1000 : code, reason);
  };
  // Paused since its handshake (openUpstream): now every message it sent meanwhile has a listener.
  upstream.resume();
}
