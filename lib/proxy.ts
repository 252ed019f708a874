import { isIPv6 } from 'node:net';
import diagnostics from 'node:diagnostics_channel';
import { Readable, Transform } from 'node:stream';
import { Client, Pool, type Dispatcher } from 'undici';
import { getConfig, type ApiConfig } from './config.ts';
import { dpopAuthorization, dpopNonceDemanded } from './dpop.ts';
import { GatehouseError, asGatehouseError, errorBody, errorHeaders, errors } from './errors.ts';
import { NOT_A_PAGE, PROXY_METHODS, checkCsrf, httpUrlFrom, jsonHeaders, requestIdFrom } from './http.ts';
import { describeCause, log } from './log.ts';
import { sharedState } from './shared-state.ts';
import { clientCredentialsToken, IdpError } from './oidc.ts';
import { endedSessionHeaders, holdOpen, sessionFromCookieHeader, touchSession, withoutSession, type Session, type SessionEndSeenBy } from './session.ts';
import { missingAuthentication, parseChallenges, refusesTheToken, stepUpDetails, stepUpRefusal, whenSignInTooOld, type TokenScheme } from './step-up.ts';
import { withProxyTelemetry, withUpstreamTelemetry } from './telemetry.ts';
import { getAccessToken, replaceRefusedToken, type TokenRequest } from './tokens.ts';

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
  /** Which door it came in by: `npm start`'s fast path, or Next's route. */
  via: 'fast-path' | 'route';
}

export interface ProxyResponse {
  status: number;
  headers: Array<[string, string]>;
  /** Streamed, or whole when it was small enough to read at once. */
  body: Readable | string | Uint8Array | null;
}

export const PROXY_PREFIX = '/api/proxy/';
const SUPPORTED_METHODS = new Set(PROXY_METHODS);
const REPLAYABLE_METHODS = new Set(['GET', 'HEAD', 'DELETE', 'OPTIONS']);
/** RFC 9110 §9.2.1: a call that asks the API to change nothing. */
const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);
/** Answers that carry no body by definition (RFC 9110 §6.4.1); a Web `Response` refuses to be built with one. */
const BODYLESS_STATUSES = new Set([204, 205, 304]);
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'proxy-connection', 'http2-settings']);
/**
 * Never forwarded upstream: the browser's credentials are for Gatehouse only (a DPoP proof too: only
 * Gatehouse holds a key). `expect: 100-continue` is answered by Gatehouse's own server, hop by hop.
 */
const REQUEST_DENYLIST = new Set([
  ...['host', 'cookie', 'authorization', 'dpop', 'x-csrf', 'content-length', 'forwarded', 'x-request-id', 'expect'],
  // Who the client is: Gatehouse says that in X-Forwarded-For; the browser's claims are not passed on.
  ...['x-real-ip', 'true-client-ip', 'x-client-ip', 'x-cluster-client-ip', 'fastly-client-ip'],
  ...['client-ip', 'x-originating-ip', 'x-original-forwarded-for', 'x-true-client-ip', 'wl-proxy-client-ip', 'x-proxyuser-ip'],
  // Stacks that route on these (Symfony and Zend before 2018, IIS URL Rewrite, nginx auth_request
  // set-ups) would serve the path they name instead of the one resolveUpstream checked.
  ...['x-original-url', 'x-rewrite-url', 'x-original-uri'],
  // Host overrides that frameworks and gateways honour in place of Host (for routing, allow-lists
  // and the links they write); Gatehouse's X-Forwarded-Host is the one that holds.
  ...['x-original-host', 'x-host', 'x-http-host-override'],
  // CGI turns it into HTTP_PROXY, which many HTTP clients take as their proxy (httpoxy).
  'proxy',
  // Next.js's internal ones (x-middleware-* and x-invoke-* below): see REQUEST_DENIED_PREFIXES.
  ...['x-matched-path', 'x-nextjs-data', 'next-resume', 'x-next-resume-state-length'],
  // A signed-in user as front servers assert it (Apache's REMOTE_USER is `Remote-*` below).
  'x-userinfo',
  'x-client-dn',
]);
/**
 * Every X-Forwarded-* is replaced by Gatehouse's own. The rest are what identity-aware front
 * proxies assert to the services behind them: Gatehouse is that front for its APIs, the user is who
 * the token says, and a browser's claims of the kind are not passed on. The list names the common
 * ones (a best effort: an API should believe such a header only from a front it configured).
 */
const REQUEST_DENIED_PREFIXES = [
  'x-forwarded-',
  // AWS ALB (OIDC, mTLS), Azure App Service (Easy Auth, its token store), Google IAP, Cloudflare Access.
  ...['x-amzn-oidc-', 'x-amzn-mtls-', 'x-ms-client-principal', 'x-ms-token-', 'x-goog-authenticated-user-', 'x-goog-iap-', 'cf-access-'],
  // oauth2-proxy, Pomerium, Kong, Tailscale, Grafana's auth proxy, Kubernetes' front proxy, Envoy's internal controls.
  ...['x-auth-request-', 'x-pomerium-', 'x-consumer-', 'tailscale-', 'x-webauth-', 'x-remote-', 'x-envoy-'],
  // Kong (its OAuth 2.0, OIDC and key plugins) and mod_auth_openidc (`OIDC_CLAIM_*`, `OIDC_access_token`).
  ...['x-authenticated-', 'x-credential-', 'x-id-token', 'x-access-token', 'oidc-claim-', 'oidc-access-token'],
  // TLS client certificates as nginx, Apache, HAProxy or IIS pass them on.
  ...['x-ssl-', 'ssl-client-', 'x-client-cert', 'x-client-verify', 'x-arr-clientcert'],
  // What hosting platforms add to the requests they hand a deployment: on Vercel, its OIDC
  // federation token (which cloud roles trust: AWS, GCP and Azure exchange it for the project's
  // credentials), its proxy signature and the client address it saw; Netlify's and Fly.io's
  // client addresses; Teleport's signed assertion of the user.
  ...['x-vercel-', 'x-now-', 'x-nf-', 'fly-', 'teleport-jwt-assertion'],
  // More client addresses as CDNs and clouds assert them (Cloudflare's CF-Connecting-IP and -IPv6),
  // and forward-auth proxies' users (Apache's and Authelia's Remote-*, authentik's, Vouch's).
  ...['cf-connecting-ip', 'cloudfront-viewer-', 'x-azure-', 'x-appengine-', 'remote-', 'x-authentik-', 'x-vouch-'],
  // Next.js's internal signals between its own layers: an API built on an unpatched Next skips its
  // middleware for x-middleware-subrequest (CVE-2025-29927) or acts on the others. The fast path
  // never passes through Next, so nothing else would drop them.
  ...['x-middleware-', 'x-invoke-'],
];
/**
 * Never passed to the browser. The answer arrives on the app's origin, so these would let an API
 * speak for Gatehouse or change state of the whole origin, which only Gatehouse may do.
 */
const RESPONSE_DENYLIST = new Set([
  // Replaced by Gatehouse's own (PROXIED_ANSWER_HEADERS), so that each arrives once and strict.
  'x-content-type-options',
  'x-frame-options',
  'referrer-policy',
  // Gatehouse's own signals. x-request-id: Gatehouse sends its own, exactly one (x-gatehouse-* below).
  'x-request-id',
  // The origin's cookies (the session cookie among them) and everything stored for it.
  'set-cookie',
  'set-cookie2',
  'clear-site-data',
  // Origin-wide transport policy: HSTS (max-age=0 would lift the app's own), alternative services
  // (another host or port serving the app's origin).
  'strict-transport-security',
  'alt-svc',
  // Persistent reporting policy: network-error reports about every later request to the origin,
  // sent to the API's choice of endpoint.
  'nel',
  'report-to',
  'reporting-endpoints',
  // Widens a service worker's scope to the whole origin.
  'service-worker-allowed',
  // The origin's login status as the browser records it (FedCM).
  'set-login',
  // Front servers (nginx, Apache, lighttpd) replace the answer with the internal path or file named.
  'x-accel-redirect',
  'x-sendfile',
  'x-sendfile2',
  'x-sendfile-temporary',
  'x-lighttpd-send-file',
  // A DPoP API's next nonce is for the maker of the proofs, Gatehouse (lib/dpop.ts).
  'dpop-nonce',
]);
/** On every proxied answer (the API's own CSP, if any, applies as well). */
const PROXIED_ANSWER_HEADERS = Object.entries(NOT_A_PAGE);
/** The browser client reads x-gatehouse-error as "Gatehouse says"; the whole namespace is Gatehouse's. */
const GATEHOUSE_HEADER_PREFIX = 'x-gatehouse-';

function jsonError(error: GatehouseError, extraHeaders: Array<[string, string]> = []): ProxyResponse {
  // x-gatehouse-error tells the browser client this error is Gatehouse's own, not the upstream API's JSON.
  const headers: Array<[string, string]> = [...Object.entries(jsonHeaders()), ...errorHeaders(error), ...extraHeaders];
  if (error.clearSession) headers.push(...endedSessionHeaders());
  return { status: error.status, headers, body: errorBody(error) };
}

/** Names a `Connection` header lists are hop-by-hop too (RFC 9110 7.6.1); repeated headers list more. */
const NONE_LISTED: ReadonlySet<string> = new Set();

function connectionListed(...connections: Array<string | undefined>): ReadonlySet<string> {
  // Nearly every request and answer has no Connection header, or one naming only keep-alive (hop by hop anyway).
  if (connections.every((connection) => connection === undefined || connection === 'keep-alive')) return NONE_LISTED;
  return new Set(connections.flatMap((connection) => (connection ?? '').split(',')).map((name) => name.trim().toLowerCase()).filter(Boolean));
}

function isHopByHop(name: string, listed: ReadonlySet<string>): boolean {
  return HOP_BY_HOP.has(name) || name.startsWith('proxy-') || listed.has(name);
}

/** Each denied prefix's first word (`x-`, `ssl-`, …), so most names an SPA sends (accept, content-type, …) are passed after a few looks. */
const DENIED_PREFIX_HEADS = [
  ...new Set(
    REQUEST_DENIED_PREFIXES.map((prefix) => {
      // A prefix without a dash would have no first word, and would never be looked at.
      if (!prefix.includes('-')) throw new Error(`REQUEST_DENIED_PREFIXES: ${prefix} has no dash`);
      return prefix.slice(0, prefix.indexOf('-') + 1);
    }),
  ),
];

function deniedByPrefix(name: string): boolean {
  return startsWithAny(name, DENIED_PREFIX_HEADS) && startsWithAny(name, REQUEST_DENIED_PREFIXES);
}

/** Per header of every proxied request: a plain loop, no string or closure made. */
function startsWithAny(name: string, prefixes: readonly string[]): boolean {
  for (const prefix of prefixes) if (name.startsWith(prefix)) return true;
  return false;
}

export function filterRequestHeaders(pairs: Iterable<[string, string]>, connection: string | undefined): Array<[string, string]> {
  const listed = connectionListed(connection);
  const kept: Array<[string, string]> = [];
  for (const [rawName, value] of pairs) {
    const name = rawName.toLowerCase();
    // CGI-style servers (PHP, IIS, WSGI) read `X_Original_URL` as `X-Original-URL`: both are checked.
    const spelled = name.includes('_') ? name.replaceAll('_', '-') : name;
    if (isHopByHop(name, listed) || (spelled !== name && isHopByHop(spelled, listed)) || REQUEST_DENYLIST.has(spelled) || deniedByPrefix(spelled)) continue;
    kept.push([name, value]);
  }
  return kept;
}

/**
 * The answer's headers the browser may see. Synchronous unless a `WWW-Authenticate` value names a
 * prompting scheme (then the challenges are parsed, which is asynchronous): the hot path pays no
 * extra turn of the event loop for the rare answer that needs it.
 */
export function filterResponseHeaders(rawHeaders: string[]): Array<[string, string]> | Promise<Array<[string, string]>> {
  const connections: string[] = [];
  for (let i = 0; i < rawHeaders.length; i += 2) if (rawHeaders[i]?.toLowerCase() === 'connection') connections.push(rawHeaders[i + 1] as string);
  const listed = connectionListed(...connections);
  // Cache rules that are only in part hop by hop (`Connection: vary` drops a `Vary: Authorization`
  // that kept `public` per token) are no rules to go by: both go, and the answer is not stored.
  const cacheRulesListed = listed.has('vary') || listed.has('cache-control');
  const kept: Array<[string, string]> = [];
  let prompting = false;
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = (rawHeaders[i] as string).toLowerCase();
    if (isHopByHop(name, listed) || RESPONSE_DENYLIST.has(name) || name.startsWith(GATEHOUSE_HEADER_PREFIX)) continue;
    if (cacheRulesListed && (name === 'vary' || name === 'cache-control')) continue;
    const value = rawHeaders[i + 1] as string;
    if (name === 'www-authenticate' && PROMPTING_SCHEME_NAMED.test(value)) prompting = true;
    kept.push([name, value]);
  }
  if (cacheRulesListed) kept.push(['cache-control', 'no-store']);
  return prompting ? withoutPromptingIn(kept) : kept;
}

async function withoutPromptingIn(headers: Array<[string, string]>): Promise<Array<[string, string]>> {
  const kept: Array<[string, string]> = [];
  for (const [name, value] of headers) {
    if (name !== 'www-authenticate' || !PROMPTING_SCHEME_NAMED.test(value)) kept.push([name, value]);
    else {
      const withoutPrompts = await withoutPromptingChallenges(value);
      if (withoutPrompts !== undefined) kept.push([name, withoutPrompts]);
    }
  }
  return kept;
}

/**
 * Challenges of these schemes make a browser show its own username-and-password dialog when a
 * fetch gets them with a 401, on the app's origin and under its name: an API (or whoever controls
 * one) could collect the user's password that way. Bearer and DPoP challenges are kept: browsers
 * ignore them, and the SPA's client may read them.
 */
const PROMPTING_SCHEMES = new Set(['basic', 'digest', 'negotiate', 'ntlm']);
/** Any value that names one somewhere, even where it is no scheme: only those are worth parsing. */
const PROMPTING_SCHEME_NAMED = /basic|digest|negotiate|ntlm/i;
/** Schemes spelled as their specifications do when a value must be written anew. */
const SCHEME_SPELLING: Record<string, string> = { bearer: 'Bearer', dpop: 'DPoP' };

/**
 * A `WWW-Authenticate` value without its prompting challenges: unchanged when it has none, the
 * other challenges written anew when it has some, undefined when nothing is left, or when it cannot
 * be read as a challenge list (a browser may read one that names such a scheme more leniently).
 */
async function withoutPromptingChallenges(value: string): Promise<string | undefined> {
  const challenges = await parseChallenges(value);
  const others = challenges.filter(({ scheme }) => !PROMPTING_SCHEMES.has(scheme));
  if (challenges.length === 0 || others.length === 0) return undefined;
  if (others.length === challenges.length) return value;
  return others
    .map(({ scheme, parameters, token68 }) => {
      const name = SCHEME_SPELLING[scheme] ?? scheme;
      if (token68 !== undefined) return `${name} ${token68}`;
      // Every value quoted: the parser has removed the quotes and escapes it was sent with.
      const pairs = Object.entries(parameters).map(([key, text]) => `${key}="${String(text).replace(/["\\]/g, '\\$&')}"`);
      return pairs.length ? `${name} ${pairs.join(', ')}` : name;
    })
    .join(', ');
}

/**
 * A segment an upstream may take for `.` or `..`: made of dots (and whitespace, which Windows-style
 * servers trim), also followed by `;params` (Tomcat and Spring strip them before resolving dot
 * segments, so `..;x` climbs a level there), or by `?` or `#` (an upstream that decodes the whole
 * target before splitting off its query sees `..?/admin` as the path `..`), in either layer of
 * encoding (`%3b`, `%3f`, `%23`: a lenient upstream decodes once more). Called with the segment's
 * compatibility form (NFKC), in which `．．`, `‥` and `﹒` are dots.
 */
function isDotSegment(compatible: string): boolean {
  if (!compatible.includes('.')) return false;
  const paramsAt = compatible.search(/[;?#]|%(?:3b|3f|23)/i);
  const name = paramsAt === -1 ? compatible : compatible.slice(0, paramsAt);
  // Linear tests: one pattern for all could backtrack quadratically on a long run of dots.
  return name.includes('.') && /^[.\s]+$/.test(name);
}

const NON_ASCII = /[^\u0000-\u007f]/;
const IGNORABLE = /\p{Default_Ignorable_Code_Point}/gu;

/**
 * What an upstream that normalises Unicode sees: `／` is a slash and `．` a dot there. Characters
 * nothing displays (zero-width space, soft hyphen) go too: NFKC keeps them, and a case-folding
 * normaliser (NFKC_Casefold) would drop them from `..\u200b`.
 */
function compatibleForm(text: string): string {
  return NON_ASCII.test(text) ? text.normalize('NFKC').replace(IGNORABLE, '') : text;
}

/**
 * Whether a path segment, decoded once, could step out of a base path on a server that decodes it
 * again or normalises Unicode: a dot segment or a separator in either layer (`@` too in the second), e.g.
 * `%252e%252e`, or `%25EF%25BC%258E`, which is `．`, a dot once normalised.
 */
export function mayStepOut(decoded: string): boolean {
  const compatible = compatibleForm(decoded);
  if (isDotSegment(compatible) || /[/\\]|%(?:2e|2f|5c)/i.test(compatible)) return true;
  if (!decoded.includes('%')) return false;
  const twice = compatibleForm(decodedOnceMore(decoded));
  return isDotSegment(twice) || /[/\\@]/.test(twice);
}

/** As a lenient upstream decodes a second time: what does not decode stays as it is. */
function decodedOnceMore(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

/**
 * The upstream URL for `/api/proxy/<api>/<rest>`: the API's base URL plus `rest`, or an error for
 * anything that could step outside that base (dot segments in any encoding, with or without
 * `;params`, encoded slashes or backslashes, empty segments, `@`, a scheme, control characters).
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
    if ((segment === '' && !isEmptyAllowed) || mayStepOut(decoded)) throw invalidPath();
    // Nor an authority (`@`, in either layer) or a control character (`%00` the only one looked for in the second).
    if (/[@\u0000-\u001f\u007f]|%(?:40|00)/i.test(compatibleForm(decoded))) throw invalidPath();
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

/**
 * Where an API's `Location` may send the browser. A browser follows the redirect of a proxied call
 * on the app's own origin with the SPA's method, body, cookie and `X-CSRF`: passed on unchanged, an
 * API (or whoever controls one) could aim the user's session at Gatehouse's own endpoints
 * (`DELETE /api/auth/sessions`, `POST /api/auth/logout`), at another API with that API's token, or
 * at any page of the app. So, resolved against the URL the API answered:
 * - inside the API's base URL: the same resource through the proxy, `/api/proxy/<api>/<rest>`;
 * - on the app's origin: kept only within this API's own `/api/proxy/<api>/`;
 * - another origin (a signed download link, the API's login page): passed on as an absolute URL,
 *   except where the browser would send the call's body there again (`resendsBody`, see
 *   redirectResendsBody), which would hand the SPA's data to another site;
 * - the API's own origin outside its base (unreachable through Gatehouse, often an internal host
 *   name), another scheme, or no URL at all: undefined, and the header is dropped.
 */
export function browserLocation(value: string, api: ApiConfig, upstreamUrl: URL, appOrigin: string, resendsBody = false): string | undefined {
  const target = httpUrlFrom(value, upstreamUrl);
  if (!target) return undefined;
  const throughProxy = `${PROXY_PREFIX}${api.name}/`;
  const basePath = api.url.pathname.endsWith('/') ? api.url.pathname : `${api.url.pathname}/`;
  if (target.origin === api.url.origin && (target.pathname.startsWith(basePath) || `${target.pathname}/` === basePath)) {
    return `${throughProxy}${target.pathname.slice(basePath.length)}${target.search}${target.hash}`;
  }
  if (target.origin === appOrigin) return target.pathname.startsWith(throughProxy) ? `${target.pathname}${target.search}${target.hash}` : undefined;
  if (target.origin === api.url.origin || resendsBody) return undefined;
  return target.href;
}

/**
 * Whether a browser following this redirect sends the call's body again (Fetch, "HTTP-redirect
 * fetch"): always for 307 and 308, for 301 and 302 too except after a POST (which becomes a GET
 * without body), never for 303 or a GET or HEAD.
 */
export function redirectResendsBody(status: number, method: string): boolean {
  if (method === 'GET' || method === 'HEAD' || status === 303) return false;
  if (status === 307 || status === 308) return true;
  return (status === 301 || status === 302) && method !== 'POST';
}

/** The answer's `Location` headers as the browser may follow them (browserLocation); the rest untouched. */
function withBrowserLocations(headers: Array<[string, string]>, api: ApiConfig, upstreamUrl: URL, appOrigin: string, requestId: string, resendsBody: boolean): Array<[string, string]> {
  if (!headers.some(([name]) => name === 'location')) return headers;
  const kept: Array<[string, string]> = [];
  for (const [name, value] of headers) {
    if (name !== 'location') kept.push([name, value]);
    else {
      const location = browserLocation(value, api, upstreamUrl, appOrigin, resendsBody);
      // The value itself is not logged: it may carry a signature or a token of the API's.
      if (location === undefined) log('warn', 'proxy.location_dropped', { requestId, api: api.name });
      else kept.push([name, location]);
    }
  }
  return kept;
}

/**
 * Fields that caches in front of Gatehouse obey instead of Cache-Control (RFC 9213's CDN-Cache-Control,
 * Varnish's, Fastly's and Akamai's, nginx's `proxy_cache`, and each CDN's own `<name>-CDN-Cache-Control`:
 * Cloudflare's, Vercel's, Netlify's): an API may set them for its own CDN, and they would let the
 * app's CDN keep a user's answer whatever Cache-Control says.
 */
const CDN_CACHE_FIELDS = new Set(['cdn-cache-control', 'surrogate-control', 'edge-control', 'x-accel-expires']);
const isCdnCacheField = (name: string) => CDN_CACHE_FIELDS.has(name) || name.endsWith('-cdn-cache-control');

interface CacheDirective {
  name: string;
  /** Has a value: a qualified `private="Set-Cookie"` keeps only those fields private, not the answer. */
  qualified: boolean;
  text: string;
}

/** A Cache-Control list's directives, split at commas outside quoted values (RFC 9111 §5.2). */
function cacheDirectives(value: string): CacheDirective[] {
  const directives: CacheDirective[] = [];
  let start = 0;
  let quoted = false;
  for (let i = 0; i <= value.length; i++) {
    const char = value[i];
    if (quoted && char === '\\') i++;
    else if (char === '"') quoted = !quoted;
    else if (i === value.length || (char === ',' && !quoted)) {
      const text = value.slice(start, i).trim();
      if (text) directives.push({ name: (text.split('=')[0] as string).trim().toLowerCase(), qualified: text.includes('='), text });
      start = i + 1;
    }
  }
  return directives;
}

/**
 * The page's JavaScript may read every header of an answer but Set-Cookie, so an API that echoes
 * the token it was sent in one (a debug header, an error description) would hand it to any script
 * on the page: such a header is dropped. Its body cannot be judged this way (README.md).
 */
function withoutEchoedToken(headers: Array<[string, string]>, token: string, context: { requestId: string; api: string }): Array<[string, string]> {
  if (!headers.some(([, value]) => value.includes(token))) return headers;
  log('warn', 'proxy.token_echo_dropped', { ...context, headers: [...new Set(headers.filter(([, value]) => value.includes(token)).map(([name]) => name))] });
  return headers.filter(([, value]) => !value.includes(token));
}

/**
 * An answer made with the user's token is that user's. Upstream, `Authorization` kept shared caches
 * from storing it unless the API said `public` or `s-maxage` (RFC 9111 §3.5; its `must-revalidate`
 * is not taken as a permission here, since APIs send it to mean "never stale"), and an API that
 * varies by `Authorization` or `DPoP` shares it per token only. On the browser's side the request
 * carries only a cookie, so a CDN in front of Gatehouse could serve it to the next user by URL,
 * and the browser's own cache could give it to whoever signs in next in that browser. So it goes
 * out `private` and varying by `Cookie`, without the fields a CDN would obey instead.
 */
export function keptToTheUser(headers: Array<[string, string]>): Array<[string, string]> {
  // One pass, and no copies in the usual case: this runs on every proxied answer with a user's token.
  let cacheControl = '';
  let vary = '';
  let cdnFields = false;
  for (const [name, value] of headers) {
    if (name === 'cache-control') cacheControl = cacheControl ? `${cacheControl}, ${value}` : value;
    else if (name === 'vary') vary = vary ? `${vary}, ${value}` : value;
    else if (isCdnCacheField(name)) cdnFields = true;
  }
  const varies = vary ? new Set(vary.split(',').map((field) => field.trim().toLowerCase())) : undefined;
  const directives = cacheControl ? cacheDirectives(cacheControl) : [];
  const named = (name: string) => directives.some((directive) => directive.name === name);
  const sharedPerToken = varies?.has('authorization') || varies?.has('dpop');
  if ((named('public') || named('s-maxage')) && !sharedPerToken) return headers;
  const kept = cdnFields || cacheControl ? headers.filter(([name]) => name !== 'cache-control' && !isCdnCacheField(name)) : headers;
  if (named('no-store')) {
    if (cacheControl) kept.push(['cache-control', cacheControl]);
    return kept;
  }
  // The permissions to share go, and a plain `private`, which now leads the list.
  const replaced = (directive: CacheDirective) => directive.name === 'public' || directive.name === 's-maxage' || (directive.name === 'private' && !directive.qualified);
  const rest = directives.filter((directive) => !replaced(directive)).map(({ text }) => text);
  kept.push(['cache-control', ['private', ...rest].join(', ')]);
  if (!varies?.has('*') && !varies?.has('cookie')) kept.push(['vary', 'Cookie']);
  return kept;
}

/** An end Gatehouse caused (the browser left, a deadline of ours), not a failure of the API's. */
export function isOurAbort(error: Error): boolean {
  return error.name === 'AbortError' || (error instanceof GatehouseError && error.code === 'client_closed');
}

/** Why Gatehouse cuts an answer of the API's, as its abort says. */
const STREAM_CUT_BECAUSE = {
  session_ended: 'the session ended',
  step_up_required: 'the sign-in grew older than the API allows',
} as const;

/** A body that sends nothing and then breaks off, as a browser that left would end it. */
function brokenOffAtFirstRead(why: string): Readable {
  return new Readable({
    read() {
      this.destroy(new DOMException(why, 'AbortError'));
    },
  });
}

function clientClosed(): GatehouseError {
  return new GatehouseError('client_closed', 499, 'The client went away.');
}

function invalidPath(): GatehouseError {
  return new GatehouseError('invalid_path', 400, 'The API path is not allowed.');
}

/**
 * Upstream calls go through undici, one connection pool per API origin: Node's own HTTP client
 * (ClientRequest and its agent) was the largest part of the fast path's own CPU time. Idle
 * connections are closed by us first: at most after 30 s, and a second before an upstream's own
 * `Keep-Alive: timeout=N` would close them.
 */
const IDLE_UPSTREAM_SOCKET_MS = 30_000;
const POOL_OPTIONS = {
  // PROXY_MAX_CALLS_PER_USER defaults to half of this: no one user can hold all of it.
  connections: 512,
  keepAliveTimeout: IDLE_UPSTREAM_SOCKET_MS,
  keepAliveMaxTimeout: IDLE_UPSTREAM_SOCKET_MS,
  keepAliveTimeoutThreshold: 1_000,
  // Each API's timeoutMs bounds the wait for the answer's head (per request, below); a body may
  // stream for as long as it has something to say (server-sent events).
  bodyTimeout: 0,
};
const pools = sharedState('upstream-pools', () => new Map<string, Pool>());
function poolFor(url: URL): Pool {
  let pool = pools.get(url.origin);
  if (!pool) {
    pool = new Pool(url.origin, POOL_OPTIONS);
    pools.set(url.origin, pool);
  }
  return pool;
}

interface Credentials {
  token: string | undefined;
  session: Session | null;
  staleCookie: boolean;
  refreshed: boolean;
}

/**
 * `renewAt`: within TOKEN_REFRESH_SKEW of its end, or half way through a lifetime shorter than the
 * skew (each call would be a grant otherwise, and anyone may make them).
 */
type ClientTokenEntry = { token: string; renewAt: number };

const clientTokens = sharedState('client-tokens', () => new Map<string, ClientTokenEntry | Promise<ClientTokenEntry>>());

/**
 * After a failed client-credentials grant, this process's next waits this long, or as long as the
 * IdP's `Retry-After` asks: anyone may call a `client` API, and their calls must not become a grant
 * each at an IdP that is failing or refusing (it might then rate-limit the client's logins too).
 */
const CLIENT_GRANT_BACKOFF_MS = 5_000;
const clientGrantFailures = sharedState('client-grant-failures', () => new Map<string, { kind: IdpError['kind']; until: number }>());

/**
 * The BFF's own grant failing says nothing about the user's session: an `invalid_grant` there is the
 * IdP refusing the client, never a session's end (which would clear the caller's cookie). Either
 * answer says when the next grant will be tried.
 */
function clientGrantError(failed: { kind: IdpError['kind']; until: number }, cause: unknown): GatehouseError {
  const retryAfterSec = Math.max(1, Math.ceil((failed.until - Date.now()) / 1000));
  return failed.kind === 'unavailable' ? errors.idpUnavailable(cause, retryAfterSec) : errors.idpRefused(cause, retryAfterSec);
}

/** One client-credentials grant, a failure recorded so the process's next grant waits (see CLIENT_GRANT_BACKOFF_MS). */
function clientGrant(api: ApiConfig): Promise<ClientTokenEntry> {
  const failed = clientGrantFailures.get(api.name);
  if (failed && failed.until > Date.now()) return Promise.reject(clientGrantError(failed, new Error(`no client grant until ${new Date(failed.until).toISOString()}: the last one failed (${failed.kind})`)));
  return clientCredentialsToken({ scope: api.scope, resource: api.resource }).then(
    (tokens) => {
      clientGrantFailures.delete(api.name);
      const issuedAt = Date.now();
      const expiresAt = tokens.accessTokenExpiresAt ?? issuedAt + 60_000;
      return { token: tokens.accessToken, renewAt: Math.max(expiresAt - getConfig().refresh.skewSec * 1000, issuedAt + (expiresAt - issuedAt) / 2) };
    },
    (error: unknown) => {
      if (!(error instanceof IdpError)) throw error;
      const failure = { kind: error.kind, until: Date.now() + Math.max(CLIENT_GRANT_BACKOFF_MS, (error.retryAfterSec ?? 0) * 1000) };
      clientGrantFailures.set(api.name, failure);
      throw clientGrantError(failure, error);
    },
  );
}

/** The BFF's own client-credentials token for an API: cached until its `renewAt`, fetched once at a time. */
async function clientToken(api: ApiConfig): Promise<string> {
  const cached = clientTokens.get(api.name);
  if (cached && !(cached instanceof Promise) && cached.renewAt > Date.now()) return cached.token;
  if (cached instanceof Promise) return (await cached).token;
  const pending = clientGrant(api);
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

/** Per process, by API: when an upstream 401 last had this process replace its client token, and the replacement under way. */
const clientTokenReplacements = sharedState('client-token-replacements', () => new Map<string, { at: number; pending?: Promise<string | undefined> }>());

/**
 * An upstream that refuses the BFF's own token (revoked, or signed with a key the IdP has rotated
 * away) would otherwise get it until it expires, an hour with many IdPs. One new grant replaces it,
 * but anyone may call a `client` API, so at most once per FORCED_REFRESH_INTERVAL per API and
 * process; the refused token serves everyone else until the new one is there, and stays if the
 * grant fails. The token to retry with, or undefined to pass the upstream's 401 on.
 */
async function replacementClientToken(api: ApiConfig, refused: string): Promise<string | undefined> {
  const cached = clientTokens.get(api.name);
  // Already replaced, or being fetched, by another call: the retry takes that.
  if (cached instanceof Promise) return cached.then(({ token }) => token, () => undefined);
  if (cached !== undefined && cached.token !== refused) return cached.token;
  const last = clientTokenReplacements.get(api.name);
  if (last?.pending) return last.pending;
  if (last && Date.now() - last.at < getConfig().refresh.forcedIntervalSec * 1000) return undefined;
  const replacement: { at: number; pending?: Promise<string | undefined> } = { at: Date.now() };
  replacement.pending = clientGrant(api).then(
    (entry) => {
      // Unless a grant of the expiry path got there first.
      if (clientTokens.get(api.name) === cached) clientTokens.set(api.name, entry);
      return entry.token;
    },
    () => undefined,
  ).finally(() => delete replacement.pending);
  clientTokenReplacements.set(api.name, replacement);
  return replacement.pending;
}

/** Which of the session's tokens an API gets: the session's own, its resource's, or an exchanged one. */
function tokenRequestFor(api: ApiConfig): TokenRequest {
  return { resource: api.resource, exchange: api.tokenExchange };
}

async function credentialsFor(api: ApiConfig, inbound: InboundRequest, requestId: string): Promise<Credentials> {
  if (api.auth === 'none') return { token: undefined, session: null, staleCookie: false, refreshed: false };
  if (api.auth === 'client') return { token: await clientToken(api), session: null, staleCookie: false, refreshed: false };
  // The hot path may use the store's coherent copy; the refresh path re-reads under its lock.
  const found = await sessionFromCookieHeader(inbound.header('cookie'), { coherentCopy: true });
  const { session } = found;
  if (!session) {
    if (api.auth === 'user-optional' && !found.newerRelease) return { token: undefined, session: null, staleCookie: found.stale, refreshed: false };
    throw withoutSession(found);
  }
  // Before any token is fetched or refreshed: a call this sign-in may not make costs the IdP nothing.
  const lacking = missingAuthentication({ acrValues: api.acr, maxAge: api.maxAge }, session.record);
  if (lacking) {
    log('info', 'proxy.step_up_required', { requestId, api: api.name, from: 'config' });
    throw errors.stepUpRequired(stepUpDetails(lacking));
  }
  const { token, session: current, refreshed } = await getAccessToken(session, tokenRequestFor(api));
  void touchSession(current).catch(() => undefined);
  return { token, session: current, staleCookie: false, refreshed };
}

/**
 * Every 64 KB socket read of a streamed body is a fresh off-heap buffer, freed only when V8 next
 * collects; V8 waits for about 64 MB of such memory before it does, so a large transfer would lift
 * each worker's footprint by that much. A young-generation collection every few megabytes streamed
 * (well under a millisecond each) keeps streaming memory flat; small requests never trigger one.
 * The collector is V8's `gc`, there only when the process was started with `--expose-gc`
 * (`npm start`, its workers and `npm run start:next` are; Node documents flipping V8 flags after
 * start-up as unsafe, so nothing here does). Without it, streams still work and memory settles
 * higher.
 */
const COLLECT_EVERY_BYTES = 8 * 1024 * 1024;
let streamedSinceCollect = 0;

export function noteStreamedBytes(bytes: number): void {
  streamedSinceCollect += bytes;
  if (streamedSinceCollect < COLLECT_EVERY_BYTES) return;
  streamedSinceCollect = 0;
  globalThis.gc?.({ type: 'minor' });
}

class BodyTooLarge extends Error {}

/** The largest body a DPoP API's nonce challenge can have sent again (it is read whole before it goes). */
const RESENDABLE_BODY_BYTES = 64 * 1024;

async function readWhole(body: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  try {
    for await (const chunk of body) chunks.push(chunk as Buffer);
  } catch (error) {
    throw error instanceof BodyTooLarge ? errors.payloadTooLarge('The request body is too large for this API.') : clientClosed();
  }
  return Buffer.concat(chunks);
}

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
  // Until undici takes the stream (for a DPoP API, only once the request's proof is signed), a
  // browser that resets the upload would leave this error with no listener: an uncaught exception.
  // The stream stays errored, so undici still fails the request when it reads it.
  limiter.on('error', () => undefined);
  return body.pipe(limiter);
}

interface UpstreamAnswer {
  status: number;
  /** Names and values in turn, as Node's `rawHeaders` (names in lower case). */
  rawHeaders: string[];
  /** Streamed, or whole when small (SMALL_ANSWER_BYTES). */
  body: Readable | Buffer;
}

/**
 * An answer this small with a declared length is read whole and written with its head in one go:
 * streaming it would cost more (a stream, its events, a second write) than it takes to arrive.
 */
const SMALL_ANSWER_BYTES = 64 * 1024;

/**
 * A kept-alive connection can be closed by the upstream just as a request goes out on it (its
 * idle timeout fired first). That request never reached the upstream's application, so a bodiless
 * request of an idempotent method is sent once more, on a connection of its own, instead of
 * failing. Only on a reused connection: a fresh one that breaks may have reached an upstream that
 * acted on the request (and crashed), which must not get it twice.
 */
const STALE_CONNECTION_CODES = new Set(['UND_ERR_SOCKET', 'ECONNRESET', 'EPIPE']);

/** Why an exchange failed, with what the resend decision needs to know. */
class ExchangeFailed extends Error {
  /** The request went out on a connection that had carried an earlier one. */
  readonly reusedConnection: boolean;
  /** The answer had begun: the upstream acted on the request. */
  readonly answerBegun: boolean;

  constructor(cause: unknown, reusedConnection: boolean, answerBegun: boolean) {
    super('upstream exchange failed', { cause });
    this.reusedConnection = reusedConnection;
    this.answerBegun = answerBegun;
  }
}

/**
 * Which connections have carried a request, to tell a reused one from a fresh one. undici calls
 * `onRequestStart` and publishes `sendHeaders` (with the socket) in one synchronous step as it
 * writes a request, so the exchange starting is always the one the socket is reported for.
 */
const connectionUses = new WeakMap<object, number>();
let startingExchange: { reusedConnection: boolean } | undefined;
diagnostics.subscribe('undici:client:sendHeaders', (message) => {
  const { socket } = message as { socket: object };
  const uses = connectionUses.get(socket) ?? 0;
  connectionUses.set(socket, uses + 1);
  if (startingExchange) startingExchange.reusedConnection = uses > 0;
  startingExchange = undefined;
});

function flatHeaders(headers: Record<string, string | string[] | undefined>): string[] {
  const flat: string[] = [];
  for (const name in headers) {
    const value = headers[name];
    if (typeof value === 'string') flat.push(name, value);
    else if (value) for (const each of value) flat.push(name, each);
  }
  return flat;
}

function upstreamTimeout(): GatehouseError {
  return new GatehouseError('upstream_timeout', 504, 'The API did not answer in time.');
}

function upstreamError(error: unknown, signal: AbortSignal): GatehouseError {
  if (signal.aborted) return clientClosed();
  const cause = error instanceof ExchangeFailed ? error.cause : error;
  if (cause instanceof GatehouseError) return cause;
  if (cause instanceof BodyTooLarge) return errors.payloadTooLarge('The request body is too large for this API.');
  return new GatehouseError('upstream_unavailable', 502, 'The API could not be reached.', { cause });
}

function ignoreError(): void {}

/**
 * Lets go of an answer's body that will not be passed on. An answer no one will read is drained, so that its connection can serve the next call, unless
 * it is long or slow: a large, endless or trickling body (an API's 401 with an event stream behind
 * it) would hold its connection outside any call's bounds, so past these it is dropped instead.
 */
const DRAINED_AT_MOST_BYTES = 64 * 1024;
const DRAINED_AT_MOST_MS = 5_000;

function discard(body: Readable | Buffer): void {
  if (!(body instanceof Readable) || body.readableEnded || body.destroyed) return;
  let drained = 0;
  const timer = setTimeout(() => body.destroy(), DRAINED_AT_MOST_MS);
  body.once('close', () => clearTimeout(timer));
  body.on('data', (chunk: Buffer) => {
    drained += chunk.length;
    if (drained > DRAINED_AT_MOST_BYTES) body.destroy();
  });
  body.resume();
}

/**
 * One exchange through undici's dispatcher, with a handler of our own rather than its promise
 * API: that one's body stream kept every answer reachable long enough to be promoted out of V8's
 * young generation, which made each scavenge cost ~10 ms (the p99 at -c1) and the old generation
 * grow by tens of MB a second.
 *
 * - `timeoutMs` runs from dispatch to the answer's head, so it also bounds the wait for a free
 *   connection when the pool is full; a request abandoned in the queue is aborted when it starts.
 * - Interim answers (1xx: Early Hints, Processing) are skipped; the final one is passed on.
 * - A small answer (declared length ≤ SMALL_ANSWER_BYTES) that arrives with its head, in the same
 *   read, is gathered and passed on whole; any other streams with backpressure, so a body that
 *   stalls never holds back the head. A body dropped by its reader (the browser left) aborts the
 *   upstream request.
 */
function exchange(dispatcher: Dispatcher, options: Dispatcher.DispatchOptions, timeoutMs: number, signal: AbortSignal): Promise<UpstreamAnswer> {
  return new Promise((resolve, reject) => {
    const attempt = { reusedConnection: false };
    let controller: Dispatcher.DispatchController | undefined;
    let status = 0;
    let rawHeaders: string[] = [];
    let whole: Buffer[] | undefined;
    let stream: Readable | undefined;
    let ended = false;
    let settled = false;
    const fail = (error: unknown) => {
      if (settled) return;
      settled = true;
      clearTimeout(deadline);
      signal.removeEventListener('abort', onAbort);
      reject(new ExchangeFailed(error, attempt.reusedConnection, status !== 0));
    };
    const onAbort = () => {
      controller?.abort(clientClosed());
      fail(clientClosed());
    };
    const deadline = setTimeout(() => {
      controller?.abort(upstreamTimeout());
      fail(upstreamTimeout());
    }, timeoutMs);
    signal.addEventListener('abort', onAbort, { once: true });
    const streamFrom = (started: Dispatcher.DispatchController, gathered: Buffer[]) => {
      const body = new Readable({
        read: () => started.resume(),
        destroy: (error, callback) => {
          if (!ended) started.abort(error ?? clientClosed());
          signal.removeEventListener('abort', onAbort);
          callback(error);
        },
      });
      // From birth: a body discarded (a retry, a step-up refusal) or not yet passed on (a forced
      // refresh's store round trip) may break or be aborted meanwhile, and an 'error' nobody
      // listens to would end the process. Whoever passes the body on reports its errors.
      body.on('error', ignoreError);
      for (const chunk of gathered) body.push(chunk);
      stream = body;
      whole = undefined;
      settled = true;
      resolve({ status, rawHeaders, body });
    };
    // undici may refuse a request before any handler call (a header it will not send): a failure
    // like any other, which must not leave the deadline and the abort listener behind.
    try {
      dispatcher.dispatch(options, {
        onRequestStart(started) {
          controller = started;
          startingExchange = attempt;
          // Abandoned while it waited for a connection (deadline, or the browser left).
          if (settled || signal.aborted) started.abort(signal.aborted ? clientClosed() : upstreamTimeout());
        },
        onResponseStart(started, statusCode, headers) {
          if (statusCode < 200) return;
          status = statusCode;
          clearTimeout(deadline);
          rawHeaders = flatHeaders(headers);
          const length = headers['content-length'];
          if (typeof length === 'string' && Number(length) <= SMALL_ANSWER_BYTES) {
            whole = [];
            // Whatever came in the same read as the head has been handed over by now; the rest streams.
            process.nextTick(() => {
              if (whole && !ended && !settled) streamFrom(started, whole);
            });
            return;
          }
          streamFrom(started, []);
        },
        onResponseData(started, chunk) {
          if (whole) whole.push(chunk);
          else if (stream && !stream.push(chunk)) started.pause();
        },
        onResponseEnd() {
          ended = true;
          if (whole && !settled) {
            settled = true;
            signal.removeEventListener('abort', onAbort);
            resolve({ status, rawHeaders, body: whole.length === 1 ? (whole[0] as Buffer) : Buffer.concat(whole) });
          } else {
            signal.removeEventListener('abort', onAbort);
            stream?.push(null);
          }
        },
        onResponseError(_started, error) {
          ended = true;
          if (stream) {
            signal.removeEventListener('abort', onAbort);
            stream.destroy(error);
          } else fail(error);
        },
      });
    } catch (error) {
      fail(error);
    }
  });
}

/** A client span (its context sent upstream as `traceparent`) and the upstream latency, when telemetry is on. */
const sendUpstream = withUpstreamTelemetry(sendUpstreamUntraced);

async function sendUpstreamUntraced(
  api: ApiConfig,
  url: URL,
  method: string,
  headers: Array<[string, string]>,
  body: Readable | null,
  signal: AbortSignal,
  /** A DPoP API's `authorization` and `dpop` for a resend: its server may refuse a proof it has seen (RFC 9449 section 11.1). */
  reauthorize?: () => Promise<Array<[string, string]>>,
): Promise<UpstreamAnswer> {
  // The browser may have left while its session or token was read: nothing must go upstream on
  // behalf of a browser that is gone.
  if (signal.aborted) throw clientClosed();
  // The deadline is exchange()'s own; undici's would not count the wait for a connection.
  const options: Dispatcher.DispatchOptions = { path: url.pathname + url.search, method: method as Dispatcher.HttpMethod, headers: headers.flat(), body, headersTimeout: 0 };
  try {
    return await exchange(poolFor(url), options, api.timeoutMs, signal);
  } catch (error) {
    const failed = error instanceof ExchangeFailed ? error : undefined;
    const code = (failed?.cause as { code?: unknown } | undefined)?.code;
    const stale = failed?.reusedConnection === true && !failed.answerBegun && typeof code === 'string' && STALE_CONNECTION_CODES.has(code);
    if (!stale || body !== null || !REPLAYABLE_METHODS.has(method) || signal.aborted) throw upstreamError(error, signal);
    log('debug', 'proxy.resend', { api: api.name, causeCode: code });
    // A one-off connection: the pool may hold more that the upstream closed the same way.
    const oneOff = new Client(url.origin, POOL_OPTIONS);
    try {
      const resent = reauthorize ? { ...options, headers: [...headers.filter(([name]) => name !== 'authorization' && name !== 'dpop'), ...(await reauthorize())].flat() } : options;
      return await exchange(oneOff, resent, api.timeoutMs, signal);
    } catch (again) {
      throw upstreamError(again, signal);
    } finally {
      // Closes once the answer has been read (or at once, after a failure).
      void oneOff.close().catch(() => undefined);
    }
  }
}

/**
 * Statuses both adapters can pass on: Node's writeHead throws below 100 (a crash of the worker),
 * a Fetch `Response` (the Next adapter) throws outside 200–599. A 1xx is an interim answer
 * (RFC 9110 §15.2) that Node's client handles itself; one that arrives as final (a 101 without
 * an upgrade) is no answer a browser's fetch could take either.
 */
function isFinalStatus(status: number): boolean {
  return status >= 200 && status <= 599;
}

/**
 * Whose count a call without a session takes: the address the outermost trusted proxy saw the
 * caller come from (the socket's peer without trusted proxies), one spelling per client: no port,
 * IPv4 unmapped, and IPv6 by its /64, which one client holds whole. Unknown (one count for all)
 * under `next start` without TRUSTED_PROXY_HOPS, where the peer is not seen.
 */
export function clientAddress(inbound: string | undefined, peer: string | undefined, trustedHops: number): string {
  const entries = (inbound ?? '').split(',').map((entry) => entry.trim()).filter(Boolean);
  const address = trustedHops <= 0 ? peer : (entries[entries.length - trustedHops] ?? peer);
  return address === undefined ? 'unknown' : addressBucket(address);
}

function addressBucket(raw: string): string {
  let address = raw.trim().toLowerCase();
  const bracketed = /^\[([^\]]+)\](?::\d+)?$/.exec(address);
  if (bracketed) address = bracketed[1] as string;
  else if (/^[\d.]+:\d+$/.test(address)) address = address.slice(0, address.lastIndexOf(':'));
  address = address.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/, '');
  if (isIPv6(address)) {
    const [head = '', tail] = address.split('::');
    const front = head ? head.split(':') : [];
    const back = tail ? tail.split(':') : [];
    const groups = tail === undefined ? front : [...front, ...Array<string>(8 - front.length - back.length).fill('0'), ...back];
    return `${groups.slice(0, 4).map((group) => group.replace(/^0+(?=.)/, '')).join(':')}::/64`;
  }
  return address;
}

/**
 * The X-Forwarded-For sent upstream. Only the last `trustedHops` entries were appended by reverse
 * proxies we run; anything before them is whatever the browser claimed. The socket peer comes
 * last; the Next adapter is never told it (`undefined`), so there only the trusted entries go.
 */
export function forwardedForChain(inbound: string | undefined, peer: string | undefined, trustedHops: number): string | undefined {
  const entries = (inbound ?? '').split(',').map((entry) => entry.trim()).filter(Boolean);
  const chain = trustedHops > 0 ? entries.slice(-trustedHops) : [];
  if (peer) chain.push(peer);
  return chain.length ? chain.join(', ') : undefined;
}

/**
 * An upstream 401 that asks for a stronger or fresher sign-in (RFC 9470) becomes Gatehouse's own
 * `step_up_required`, which the browser client understands: the session stays, and no refresh is
 * forced. Only a call that carried the user's token can be answered by the user signing in again;
 * any other 401 goes on as the upstream sent it.
 */
async function refuseStepUpChallenge(answer: UpstreamAnswer, credentials: Credentials, scheme: TokenScheme, where: { requestId: string; api: string }): Promise<void> {
  if (answer.status !== 401 || !credentials.session || !credentials.token) return;
  const refusal = await stepUpRefusal(answer.status, answer.rawHeaders, scheme, where);
  if (!refusal) return;
  discard(answer.body);
  throw refusal;
}

/**
 * Set where the fast path serves /api/proxy/ (`npm start`, server.ts): a call that reaches Next's
 * route there came by a spelling of its path that only Next resolves, around the fast path's
 * bounds (server.ts sends every target that resolves under /api/proxy/ to the fast path; this
 * holds should Next's router ever resolve more than that).
 */
const routeSuperseded = sharedState('proxy-route-superseded', () => ({ value: false }));

export function serveProxyOnFastPathOnly(): void {
  routeSuperseded.value = true;
}

/**
 * Calls of each user open in this process. Every call holds a connection of its API's pool until
 * its answer is over: without a bound, one user whose browser opens hundreds of calls and reads
 * none of their answers would hold the whole pool, and everyone's calls to that API would wait.
 * Counted per user, not per session, so that signing in again gives no more of it. (Per module
 * copy: under `npm start` only the fast path's serves calls, see serveProxyOnFastPathOnly.)
 *
 * A user's count stays in the map at zero when their last call ends; zeros are cleared only once
 * `sweepAt` users (10,000 unless told) are in it, or twice as many as the last sweep left.
 * Deleting the last entry of a long-lived Map makes V8 give it a new backing table, and every
 * replaced table keeps a link to its successor (for iterators still on it), so a map that went
 * from one entry to none on every call chained a new table per call to the first one that had
 * been promoted: with a user's calls one at a time, about 1 MB a second moved out of the young
 * generation, and a full collection every 10 to 20 seconds stalled the worker's calls for 10 to
 * 20 ms (bench -c1, docs/performance.md, "The -c1 tail").
 */
export class OpenCalls {
  readonly #open = new Map<string, number>();
  readonly #sweepAt: number;
  #nextSweep: number;
  constructor(sweepAt = 10_000) {
    this.#sweepAt = sweepAt;
    this.#nextSweep = sweepAt;
  }

  /** Takes one of `sub`'s `limit` slots (429 when none is left); the function returned gives it back, once. */
  hold(sub: string, limit: number): () => void {
    const open = this.#open.get(sub);
    if (open !== undefined && open >= limit) throw new GatehouseError('too_many_calls', 429, `At most ${limit} calls of one user (or, without a session, of one address) may be open at once.`, { retryAfterSec: 1 });
    if (open === undefined && this.#open.size >= this.#nextSweep) this.#sweep();
    this.#open.set(sub, (open ?? 0) + 1);
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      this.#open.set(sub, Math.max(0, (this.#open.get(sub) ?? 1) - 1));
    };
  }

  /** Users with a count, open calls or not (what the map holds). */
  get users(): number {
    return this.#open.size;
  }

  /** Next one once the map has doubled: users who all hold calls cost a sweep per new user otherwise. */
  #sweep(): void {
    for (const [sub, open] of this.#open) if (open === 0) this.#open.delete(sub);
    this.#nextSweep = Math.max(this.#sweepAt, this.#open.size * 2);
  }
}

const openCalls = new OpenCalls();

/**
 * Ends a streamed answer that waits longer than `timeoutMs` for the browser to take more of it (as
 * nginx's send_timeout does): a browser that stops reading holds its API connection otherwise for
 * as long as the API keeps sending (or an SPA_DIR file open, for as long as it stays). Both
 * adapters pause the body while the browser's side is full. An answer with nothing to send (an
 * idle event stream) is never paused, so it is never timed.
 */
export function endWhenBrowserStalls(body: Readable, timeoutMs: number, event: 'proxy.send_timeout' | 'spa.send_timeout', where: Record<string, string>): void {
  let timer: NodeJS.Timeout | undefined;
  const disarm = () => {
    clearTimeout(timer);
    timer = undefined;
  };
  body.on('pause', () => {
    timer ??= setTimeout(() => {
      log('warn', event, { ...where, ms: timeoutMs });
      // An abort, as a browser that left would cause: Next logs any other error as a failed pipe, with its stack.
      body.destroy(new DOMException('the browser took no more of the answer', 'AbortError'));
    }, timeoutMs);
  });
  body.on('resume', disarm);
  body.once('close', disarm);
}

/**
 * The whole proxy: checks, credentials, one upstream exchange; once more for a DPoP nonce the API
 * names, and again after a 401 earns one refresh, for a request that can go again.
 */
export const forwardRequest = withProxyTelemetry(forward, () => getConfig().apis);

async function forward(inbound: InboundRequest): Promise<ProxyResponse> {
  const started = performance.now();
  const config = getConfig();
  const requestId = requestIdFrom(inbound.header('x-request-id'));
  let apiName: string | undefined;
  let refreshed = false;
  let result: ProxyResponse;
  let releaseCall: (() => void) | undefined;
  try {
    if (inbound.via === 'route' && routeSuperseded.value) {
      log('warn', 'proxy.route_bypass', { requestId });
      throw invalidPath();
    }
    const verdict = checkCsrf((name) => inbound.header(name), config.appBaseUrl.origin);
    if (!verdict.ok) throw errors.csrf();
    const method = inbound.method.toUpperCase();
    if (!SUPPORTED_METHODS.has(method)) {
      throw new GatehouseError('method_not_allowed', 405, 'This method is not supported by the proxy.');
    }
    const { api, url } = resolveUpstream(inbound.rawUrl, config.apis);
    apiName = api.name;
    const declaredLength = Number(inbound.header('content-length') ?? 0);
    if (declaredLength > api.maxBodyBytes) throw errors.payloadTooLarge('The request body is too large for this API.');
    const hasBody = inbound.body !== null && (declaredLength > 0 || inbound.header('transfer-encoding') !== undefined);

    let credentials = await credentialsFor(api, inbound, requestId);
    refreshed = credentials.refreshed;
    // The session's end, seen while the call is open: before the answer comes it holds the answer
    // back; once a stream flows, it cuts it.
    let endedWithSession: SessionEndSeenBy | undefined;
    let cutWithSession: (() => void) | undefined;
    if (credentials.session) {
      const releaseSlot = openCalls.hold(credentials.session.record.sub, config.proxy.maxCallsPerUser);
      const releaseHold = holdOpen(credentials.session.id, {
        end(seenBy) {
          endedWithSession ??= seenBy;
          cutWithSession?.();
        },
      });
      releaseCall = () => {
        releaseSlot();
        releaseHold();
      };
    } else {
      // Without a session (`none`, `client`, `user-optional` APIs) anyone may call: such calls count
      // per client address, else the API origin's connections were anyone's to take from users.
      releaseCall = openCalls.hold(`\u0000address ${clientAddress(inbound.header('x-forwarded-for'), inbound.remoteAddress, config.trustedProxyHops)}`, config.proxy.maxCallsPerUser);
    }
    const headers = filterRequestHeaders(inbound.headerPairs(), inbound.header('connection'));
    headers.push(
      ['host', url.host],
      ['x-forwarded-proto', config.appBaseUrl.protocol.slice(0, -1)],
      ['x-forwarded-host', config.appBaseUrl.host],
      ['x-request-id', requestId],
    );
    const forwardedFor = forwardedForChain(inbound.header('x-forwarded-for'), inbound.remoteAddress, config.trustedProxyHops);
    if (forwardedFor) headers.push(['x-forwarded-for', forwardedFor]);
    if (hasBody && declaredLength > 0) headers.push(['content-length', String(declaredLength)]);
    const streamed = hasBody && inbound.body ? limitBody(inbound.body, api.maxBodyBytes) : null;
    // A DPoP API may refuse a request for want of its nonce: a small body, read whole first, can go again.
    const kept = api.dpop && streamed && declaredLength > 0 && declaredLength <= RESENDABLE_BODY_BYTES ? await readWhole(streamed) : undefined;
    const body = kept ? Readable.from([kept]) : streamed;
    // A DPoP API gets the token as `DPoP`, with a proof made for this one request (a new one for a resend).
    const dpopSession = api.dpop ? credentials.session : null;
    const proofFor = dpopSession ? (token: string) => dpopAuthorization(dpopSession.id, dpopSession.secrets, token, method, url, api.name) : undefined;
    const send = async (token: string | undefined, sent: Readable | null) => {
      if (!token) return sendUpstream(api, url, method, headers, sent, inbound.signal);
      if (!proofFor) return sendUpstream(api, url, method, [...headers, ['authorization', `Bearer ${token}`]], sent, inbound.signal);
      return sendUpstream(api, url, method, [...headers, ...(await proofFor(token))], sent, inbound.signal, () => proofFor(token));
    };

    let nonceDemanded = false;
    /** One exchange; when a DPoP API names the nonce it wants (having not acted), once more with it if the body can go again. */
    const sendWithNonce = async (first: Readable | null, canResend: boolean) => {
      const sent = await send(credentials.token, first);
      nonceDemanded = api.dpop === true && credentials.token !== undefined && dpopNonceDemanded(api.name, sent.status, sent.rawHeaders);
      if (!nonceDemanded || !canResend) return sent;
      discard(sent.body);
      const resent = await send(credentials.token, kept ? Readable.from([kept]) : null);
      nonceDemanded = dpopNonceDemanded(api.name, resent.status, resent.rawHeaders);
      return resent;
    };

    let answer = await sendWithNonce(body, !hasBody || kept !== undefined);
    const scheme: TokenScheme = proofFor ? 'dpop' : 'bearer';
    // Asked before any forced refresh: a new token from the same sign-in cannot meet a step-up.
    await refuseStepUpChallenge(answer, credentials, scheme, { requestId, api: api.name });
    // The token looked valid but was refused (revoked, clock skew): a new one (refresh, exchange or
    // client grant), and one retry. Replaced whether or not this request can go again: a write is
    // not sent twice and its 401 goes back (checked against the token it was sent with), but the
    // SPA's retry of it then carries the new token.
    const refusedToken = answer.status === 401 && !nonceDemanded && (await refusesTheToken(answer.rawHeaders, scheme)) ? credentials.token : undefined;
    let replacement: { token: string; session: Session | null; refreshed?: boolean } | undefined;
    if (refusedToken !== undefined && api.auth === 'client') {
      const token = await replacementClientToken(api, refusedToken);
      if (token !== undefined) replacement = { token, session: null };
    } else if (refusedToken !== undefined && credentials.session) {
      replacement = await replaceRefusedToken(credentials.session, tokenRequestFor(api), refusedToken).catch((error: unknown) => {
        discard(answer.body);
        throw error;
      });
      if (replacement?.refreshed) refreshed = true;
    }
    if (replacement && !hasBody && REPLAYABLE_METHODS.has(method)) {
      discard(answer.body);
      credentials = { ...credentials, token: replacement.token, session: replacement.session };
      answer = await sendWithNonce(null, true);
      await refuseStepUpChallenge(answer, credentials, scheme, { requestId, api: api.name });
    }
    if (!isFinalStatus(answer.status)) {
      if (answer.body instanceof Readable) answer.body.destroy();
      throw new GatehouseError('upstream_unavailable', 502, 'The API sent an answer that cannot be passed on.', { cause: new Error(`upstream status ${answer.status}`) });
    }
    const filtered = filterResponseHeaders(answer.rawHeaders);
    const resendsBody = redirectResendsBody(answer.status, method);
    let responseHeaders = withBrowserLocations(Array.isArray(filtered) ? filtered : await filtered, api, url, config.appBaseUrl.origin, requestId, resendsBody);
    if (credentials.session && credentials.token) responseHeaders = keptToTheUser(responseHeaders);
    if (credentials.token) responseHeaders = withoutEchoedToken(responseHeaders, credentials.token, { requestId, api: api.name });
    responseHeaders.push(['x-request-id', requestId], ...PROXIED_ANSWER_HEADERS);
    if (credentials.staleCookie) responseHeaders.push(...endedSessionHeaders());
    const bodyless = method === 'HEAD' || BODYLESS_STATUSES.has(answer.status);
    if (bodyless) discard(answer.body);
    let answerBody = answer.body;
    let cutAtOnce = false;
    const authTime = credentials.session?.record.authTime;
    if (!bodyless && answerBody !== null) {
      // The answer came after the session ended, or after the sign-in outgrew maxAge (a long poll,
      // read whole or streamed): none of it may pass. A safe call can be made again (after a login
      // or a step-up), so it hears that now; an unsafe one the API has acted on keeps its status,
      // since an error would invite a second attempt, and its body breaks off before its first
      // byte (the adapters still send the head).
      const lacking = api.maxAge !== undefined && authTime !== undefined ? missingAuthentication({ maxAge: api.maxAge }, { authTime }) : undefined;
      if (endedWithSession || lacking) {
        if (answerBody instanceof Readable) answerBody.destroy();
        if (SAFE_METHODS.has(method) && lacking && !endedWithSession) {
          log('info', 'proxy.step_up_required', { requestId, api: api.name, from: 'deadline' });
          throw errors.stepUpRequired(stepUpDetails(lacking));
        }
        if (SAFE_METHODS.has(method)) {
          // As a call made a moment later would hear: a logout clears the cookie, a new login's does not.
          log('info', 'proxy.session_ended', { requestId, api: api.name, detectedBy: endedWithSession });
          const found = await sessionFromCookieHeader(inbound.header('cookie'));
          throw found.session ? errors.unauthenticated() : withoutSession(found);
        }
        const reason = endedWithSession ? 'session_ended' : 'step_up_required';
        log('info', 'proxy.stream_ended', { requestId, api: api.name, reason });
        answerBody = brokenOffAtFirstRead(STREAM_CUT_BECAUSE[reason]);
        cutAtOnce = true;
      }
    }
    if (!bodyless && answerBody instanceof Readable) {
      // The head is out by then; the browser sees its answer cut, and the operator hears why once.
      // An abort is ours (the browser left, a sign-in grew too old), not the API's.
      answerBody.once('error', (error: Error) => {
        if (!isOurAbort(error)) log('warn', 'proxy.upstream_body_failed', { requestId, api: api.name, ...describeCause(error) });
      });
      const flowing = answerBody;
      // A streamed answer (server-sent events, a long download) that began in time ends with the
      // sign-in's recency, and with the session (a logout, a back-channel logout). An abort, as a
      // browser that left would cause: Next logs any other error as a failed pipe, with its stack.
      const endStream = (reason: keyof typeof STREAM_CUT_BECAUSE, extra?: { detectedBy: string }) => {
        if (flowing.destroyed) return;
        log('info', 'proxy.stream_ended', { requestId, api: api.name, reason, ...extra });
        flowing.destroy(new DOMException(STREAM_CUT_BECAUSE[reason], 'AbortError'));
      };
      if (!cutAtOnce) {
        if (api.maxAge !== undefined && authTime !== undefined) {
          flowing.once('close', whenSignInTooOld(authTime, api.maxAge, () => endStream('step_up_required')));
        }
        cutWithSession = () => endStream('session_ended', endedWithSession && { detectedBy: endedWithSession });
      }
      endWhenBrowserStalls(answerBody, config.proxy.sendTimeoutMs, 'proxy.send_timeout', { requestId, api: api.name });
      // The call is open until its answer is over, however that ends (it may have broken off already).
      if (releaseCall && !answerBody.closed) {
        answerBody.once('close', releaseCall);
        releaseCall = undefined;
      }
    }
    result = { status: answer.status, headers: responseHeaders, body: bodyless ? null : answerBody };
  } catch (caught) {
    const error = asGatehouseError(caught);
    if (error.status >= 500) log('warn', 'proxy.error', { requestId, api: apiName, code: error.code, ...describeCause(error.cause) });
    const extra: Array<[string, string]> = [['x-request-id', requestId]];
    if (error.code === 'method_not_allowed') extra.push(['allow', PROXY_METHODS.join(', ')]);
    result = jsonError(error, extra);
  }
  releaseCall?.();
  log('info', 'proxy.request', { requestId, method: inbound.method, api: apiName, status: result.status, ms: Math.round(performance.now() - started), refreshed });
  return result;
}
