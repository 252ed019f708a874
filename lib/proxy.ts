import http from 'node:http';
import https from 'node:https';
import { Transform, type Readable } from 'node:stream';
import v8 from 'node:v8';
import vm from 'node:vm';
import { getConfig, type ApiConfig } from './config.ts';
import { GatehouseError, asGatehouseError, errorBody, errors } from './errors.ts';
import { PROXY_METHODS, checkCsrf, jsonHeaders, requestIdFrom } from './http.ts';
import { describeCause, log } from './log.ts';
import { clientCredentialsToken, idpErrorToGatehouse, IdpError } from './oidc.ts';
import { clearSessionCookieHeader, sessionFromCookieHeader, touchSession, type Session } from './session.ts';
import { getAccessToken, mayForceRefresh } from './tokens.ts';

/**
 * The proxy core, framework-free: an inbound request in, a streamed answer out. The Next route
 * handler and the Node fast-path server are both thin adapters around `forwardRequest`, so the
 * checks, the header hygiene and the token handling cannot differ between them.
 */

export interface InboundRequest {
  method: string;
  /** Path and query exactly as received, still percent-encoded. */
  rawUrl: string;
  /** Header names in lower case; repeated headers joined as Node joins them. */
  header(name: string): string | undefined;
  /** Every header as received, in order, names in any case. */
  headerPairs(): Iterable<[string, string]>;
  remoteAddress: string | undefined;
  body: Readable | null;
  /** Aborted when the browser goes away. */
  signal: AbortSignal;
}

export interface ProxyResponse {
  status: number;
  headers: Array<[string, string]>;
  body: Readable | string | null;
}

export const PROXY_PREFIX = '/api/proxy/';
const SUPPORTED_METHODS = new Set(PROXY_METHODS);
const REPLAYABLE_METHODS = new Set(['GET', 'HEAD', 'DELETE', 'OPTIONS']);
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'proxy-connection', 'http2-settings']);
/** Never forwarded upstream: the browser's credentials are for Gatehouse only. */
const REQUEST_DENYLIST = new Set(['host', 'cookie', 'authorization', 'x-csrf', 'content-length', 'forwarded', 'x-real-ip', 'x-request-id']);
const RESPONSE_DENYLIST = new Set(['set-cookie', 'set-cookie2']);

function jsonError(error: GatehouseError, extraHeaders: Array<[string, string]> = []): ProxyResponse {
  // x-gatehouse-error tells the browser client this error is Gatehouse's own, not the upstream API's JSON.
  const headers: Array<[string, string]> = [...Object.entries(jsonHeaders()), ['x-gatehouse-error', error.code], ...extraHeaders];
  if (error.clearSession) headers.push(['set-cookie', clearSessionCookieHeader()]);
  return { status: error.status, headers, body: errorBody(error) };
}

/** Names a `Connection` header lists are hop-by-hop too (RFC 9110 7.6.1). */
function connectionListed(connection: string | undefined): Set<string> {
  return new Set((connection ?? '').split(',').map((name) => name.trim().toLowerCase()).filter(Boolean));
}

function isHopByHop(name: string, listed: Set<string>): boolean {
  return HOP_BY_HOP.has(name) || name.startsWith('proxy-') || listed.has(name);
}

export function filterRequestHeaders(pairs: Iterable<[string, string]>, connection: string | undefined): Array<[string, string]> {
  const listed = connectionListed(connection);
  const kept: Array<[string, string]> = [];
  for (const [rawName, value] of pairs) {
    const name = rawName.toLowerCase();
    // Every X-Forwarded-* is replaced by Gatehouse's own: the browser's claims about them are not ours to pass on.
    if (isHopByHop(name, listed) || REQUEST_DENYLIST.has(name) || name.startsWith('x-forwarded-')) continue;
    kept.push([name, value]);
  }
  return kept;
}

export function filterResponseHeaders(rawHeaders: string[]): Array<[string, string]> {
  let connection: string | undefined;
  for (let i = 0; i < rawHeaders.length; i += 2) if (rawHeaders[i]?.toLowerCase() === 'connection') connection = rawHeaders[i + 1];
  const listed = connectionListed(connection);
  const kept: Array<[string, string]> = [];
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = (rawHeaders[i] as string).toLowerCase();
    if (isHopByHop(name, listed) || RESPONSE_DENYLIST.has(name)) continue;
    kept.push([name, rawHeaders[i + 1] as string]);
  }
  return kept;
}

/**
 * The upstream URL for `/api/proxy/<api>/<rest>`: the API's base URL plus `rest`, or an error for
 * anything that could step outside that base (dot segments in any encoding, encoded slashes or
 * backslashes, empty segments, `@`, a scheme, control characters).
 */
export function resolveUpstream(rawUrl: string, apis: Record<string, ApiConfig>): { api: ApiConfig; url: URL } {
  const queryStart = rawUrl.indexOf('?');
  const rawPath = queryStart === -1 ? rawUrl : rawUrl.slice(0, queryStart);
  const query = queryStart === -1 ? '' : rawUrl.slice(queryStart);
  if (!rawPath.startsWith(PROXY_PREFIX)) throw invalidPath();
  const [apiName = '', ...segments] = rawPath.slice(PROXY_PREFIX.length).split('/');
  const api = Object.hasOwn(apis, apiName) ? apis[apiName] : undefined;
  if (!api) throw new GatehouseError('unknown_api', 404, 'No API with that name is configured.');
  for (const [index, segment] of segments.entries()) {
    let decoded: string;
    try {
      decoded = decodeURIComponent(segment);
    } catch {
      throw invalidPath();
    }
    const isEmptyAllowed = segment === '' && index === segments.length - 1;
    if ((segment === '' && !isEmptyAllowed) || decoded === '.' || decoded === '..') throw invalidPath();
    // Decoded once here, possibly again by a lenient upstream: refuse separators in either layer.
    if (/[/\\@\u0000-\u001f\u007f]|%(?:2e|2f|5c|40|00)/i.test(decoded)) throw invalidPath();
    if (index === 0 && /^[a-z][a-z0-9+.-]*:/i.test(decoded)) throw invalidPath();
  }
  if (/[\u0000-\u001f\u007f#]/.test(query)) throw invalidPath();
  const basePath = api.url.pathname.endsWith('/') ? api.url.pathname : `${api.url.pathname}/`;
  const url = new URL(api.url.origin);
  url.pathname = basePath + segments.join('/');
  url.search = query;
  if (url.origin !== api.url.origin || !url.pathname.startsWith(basePath)) throw invalidPath();
  return { api, url };
}

function invalidPath(): GatehouseError {
  return new GatehouseError('invalid_path', 400, 'The API path is not allowed.');
}

/**
 * Idle upstream connections are closed by us first: Node's agent honours an upstream's
 * `Keep-Alive: timeout=N` hint (closing a second early) only when it has an idle timeout of its
 * own, and without one it would keep sockets the upstream is about to close.
 */
const IDLE_UPSTREAM_SOCKET_MS = 30_000;
const agents = new Map<string, http.Agent>();
function agentFor(url: URL): http.Agent {
  let agent = agents.get(url.origin);
  if (!agent) {
    const options = { keepAlive: true, maxSockets: 512, maxFreeSockets: 64, scheduling: 'lifo' as const, timeout: IDLE_UPSTREAM_SOCKET_MS };
    agent = url.protocol === 'https:' ? new https.Agent(options) : new http.Agent(options);
    agents.set(url.origin, agent);
  }
  return agent;
}

interface Credentials {
  token: string | undefined;
  session: Session | null;
  staleCookie: boolean;
  refreshed: boolean;
}

const clientTokens = new Map<string, { token: string; expiresAt: number } | Promise<{ token: string; expiresAt: number }>>();

/** The BFF's own client-credentials token for an API: cached until shortly before expiry, fetched once at a time. */
async function clientToken(api: ApiConfig): Promise<string> {
  const cached = clientTokens.get(api.name);
  if (cached && !(cached instanceof Promise) && cached.expiresAt - getConfig().refresh.skewSec * 1000 > Date.now()) return cached.token;
  if (cached instanceof Promise) return (await cached).token;
  const pending = clientCredentialsToken({ scope: api.scope, resource: api.resource }).then(
    (tokens) => ({ token: tokens.accessToken, expiresAt: tokens.accessTokenExpiresAt ?? Date.now() + 60_000 }),
    (error: unknown) => {
      throw error instanceof IdpError ? idpErrorToGatehouse(error) : error;
    },
  );
  clientTokens.set(api.name, pending);
  try {
    const entry = await pending;
    clientTokens.set(api.name, entry);
    return entry.token;
  } catch (error) {
    clientTokens.delete(api.name);
    throw error;
  }
}

async function credentialsFor(api: ApiConfig, inbound: InboundRequest): Promise<Credentials> {
  if (api.auth === 'none') return { token: undefined, session: null, staleCookie: false, refreshed: false };
  if (api.auth === 'client') return { token: await clientToken(api), session: null, staleCookie: false, refreshed: false };
  // The hot path may use the store's coherent copy; the refresh path re-reads under its lock.
  const { session, stale } = await sessionFromCookieHeader(inbound.header('cookie'), { coherentCopy: true });
  if (!session) {
    if (api.auth === 'user-optional') return { token: undefined, session: null, staleCookie: stale, refreshed: false };
    throw errors.unauthenticated(stale);
  }
  const { token, session: current, refreshed } = await getAccessToken(session, { resource: api.resource });
  void touchSession(current).catch(() => undefined);
  return { token, session: current, staleCookie: false, refreshed };
}

/**
 * Every 64 KB socket read of a streamed body is a fresh off-heap buffer, freed only when V8 next
 * collects; V8 waits for about 64 MB of such memory before it does, so a large transfer would lift
 * each worker's footprint by that much. A young-generation collection every few megabytes streamed
 * (well under a millisecond each) keeps streaming memory flat; small requests never trigger one.
 */
const COLLECT_EVERY_BYTES = 8 * 1024 * 1024;
let streamedSinceCollect = 0;
let collectYoungGeneration: (() => void) | undefined;

export function noteStreamedBytes(bytes: number): void {
  streamedSinceCollect += bytes;
  if (streamedSinceCollect < COLLECT_EVERY_BYTES) return;
  streamedSinceCollect = 0;
  if (!collectYoungGeneration) {
    v8.setFlagsFromString('--expose-gc');
    const gc = vm.runInNewContext('gc') as (options: { type: 'minor' }) => void;
    collectYoungGeneration = () => gc({ type: 'minor' });
  }
  collectYoungGeneration();
}

class BodyTooLarge extends Error {}

function limitBody(body: Readable, maxBytes: number): Readable {
  let seen = 0;
  const limiter = new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      seen += chunk.length;
      noteStreamedBytes(chunk.length);
      if (seen > maxBytes) callback(new BodyTooLarge());
      else callback(null, chunk);
    },
  });
  body.on('error', (error) => limiter.destroy(error));
  return body.pipe(limiter);
}

interface UpstreamAnswer {
  status: number;
  rawHeaders: string[];
  body: http.IncomingMessage;
}

/**
 * A kept-alive connection can be closed by the upstream just as a request goes out on it (its
 * idle timeout fired first). That request never reached the upstream's application, so a bodiless
 * request of an idempotent method is sent once more on a new connection instead of failing.
 */
const STALE_CONNECTION_CODES = new Set(['ECONNRESET', 'EPIPE']);

function sendUpstream(
  api: ApiConfig,
  url: URL,
  method: string,
  headers: Array<[string, string]>,
  body: Readable | null,
  signal: AbortSignal,
): Promise<UpstreamAnswer> {
  return new Promise((resolve, reject) => {
    const transport = url.protocol === 'https:' ? https : http;
    const mayResend = body === null && REPLAYABLE_METHODS.has(method);
    let request: http.ClientRequest;
    const timer = setTimeout(() => request.destroy(new GatehouseError('upstream_timeout', 504, 'The API did not answer in time.')), api.timeoutMs);
    const onAbort = () => request.destroy(new GatehouseError('client_closed', 499, 'The client went away.'));
    signal.addEventListener('abort', onAbort, { once: true });

    const send = (onFreshConnection: boolean) => {
      // agent: false is a one-off connection: the pool may hold more sockets closed the same way.
      request = transport.request(url, { method, headers: headers.flat(), agent: onFreshConnection ? false : agentFor(url) });
      request.on('response', (response) => {
        clearTimeout(timer);
        // From here on the browser's disconnect aborts the upstream body too.
        response.on('close', () => signal.removeEventListener('abort', onAbort));
        resolve({ status: response.statusCode ?? 502, rawHeaders: response.rawHeaders, body: response });
      });
      request.on('error', (error) => {
        const code = (error as NodeJS.ErrnoException).code;
        if (!onFreshConnection && mayResend && request.reusedSocket && code && STALE_CONNECTION_CODES.has(code) && !signal.aborted) {
          log('debug', 'proxy.resend', { api: api.name, causeCode: code });
          return send(true);
        }
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        if (error instanceof GatehouseError) reject(error);
        else if (error instanceof BodyTooLarge) reject(new GatehouseError('payload_too_large', 413, 'The request body is too large for this API.'));
        else reject(new GatehouseError('upstream_unavailable', 502, 'The API could not be reached.', { cause: error }));
      });
      if (body) {
        body.on('error', (error) => request.destroy(error));
        body.pipe(request);
      } else request.end();
    };
    send(false);
  });
}

/** The whole proxy: checks, credentials, one upstream exchange (two when a 401 earns one refresh). */
export async function forwardRequest(inbound: InboundRequest): Promise<ProxyResponse> {
  const started = performance.now();
  const config = getConfig();
  const requestId = requestIdFrom(inbound.header('x-request-id'));
  let apiName: string | undefined;
  let refreshed = false;
  let result: ProxyResponse;
  try {
    const verdict = checkCsrf((name) => inbound.header(name), config.appBaseUrl.origin);
    if (!verdict.ok) throw errors.csrf();
    const method = inbound.method.toUpperCase();
    if (!SUPPORTED_METHODS.has(method)) {
      throw new GatehouseError('method_not_allowed', 405, 'This method is not supported by the proxy.');
    }
    const { api, url } = resolveUpstream(inbound.rawUrl, config.apis);
    apiName = api.name;
    const declaredLength = Number(inbound.header('content-length') ?? 0);
    if (declaredLength > api.maxBodyBytes) throw new GatehouseError('payload_too_large', 413, 'The request body is too large for this API.');
    const hasBody = inbound.body !== null && (declaredLength > 0 || inbound.header('transfer-encoding') !== undefined);

    let credentials = await credentialsFor(api, inbound);
    refreshed = credentials.refreshed;
    const headers = filterRequestHeaders(inbound.headerPairs(), inbound.header('connection'));
    const forwardedFor = inbound.header('x-forwarded-for');
    headers.push(
      ['host', url.host],
      ['x-forwarded-for', [forwardedFor, inbound.remoteAddress].filter(Boolean).join(', ')],
      ['x-forwarded-proto', config.appBaseUrl.protocol.slice(0, -1)],
      ['x-forwarded-host', config.appBaseUrl.host],
      ['x-request-id', requestId],
    );
    if (hasBody && declaredLength > 0) headers.push(['content-length', String(declaredLength)]);
    const body = hasBody && inbound.body ? limitBody(inbound.body, api.maxBodyBytes) : null;
    const withToken = (token: string | undefined) => (token ? [...headers, ['authorization', `Bearer ${token}`] as [string, string]] : headers);

    let answer = await sendUpstream(api, url, method, withToken(credentials.token), body, inbound.signal);
    const mayRetry =
      answer.status === 401 && credentials.session && credentials.token && !hasBody && REPLAYABLE_METHODS.has(method) && (await mayForceRefresh(credentials.session));
    if (mayRetry && credentials.session && credentials.token) {
      // The token looked valid but was refused (revoked, clock skew): one refresh, one retry.
      answer.body.resume();
      const retried = await getAccessToken(credentials.session, { resource: api.resource, rejectedToken: credentials.token });
      credentials = { ...credentials, token: retried.token, session: retried.session };
      refreshed = true;
      answer = await sendUpstream(api, url, method, withToken(credentials.token), null, inbound.signal);
    }
    const responseHeaders = filterResponseHeaders(answer.rawHeaders);
    responseHeaders.push(['x-request-id', requestId]);
    if (credentials.staleCookie) responseHeaders.push(['set-cookie', clearSessionCookieHeader()]);
    result = { status: answer.status, headers: responseHeaders, body: method === 'HEAD' ? (answer.body.resume(), null) : answer.body };
  } catch (caught) {
    const error = asGatehouseError(caught);
    if (error.status >= 500) log('warn', 'proxy.error', { requestId, api: apiName, code: error.code, ...describeCause(error.cause) });
    const extra: Array<[string, string]> = [['x-request-id', requestId]];
    if (error.code === 'method_not_allowed') extra.push(['allow', PROXY_METHODS.join(', ')]);
    result = jsonError(error, extra);
  }
  log('info', 'proxy.request', { requestId, method: inbound.method, api: apiName, status: result.status, ms: Math.round(performance.now() - started), refreshed });
  return result;
}
