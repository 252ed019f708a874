import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { realpath, stat } from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { Readable } from 'node:stream';
import type { SpaSource } from './config.ts';
import { decodes, httpUrlFrom, routedPath } from './http.ts';
import { log } from './log.ts';
import { sharedState } from './shared-state.ts';
import { endWhenBrowserStalls, mayStepOut, type ProxyResponse } from './proxy.ts';

/**
 * Serves a built SPA on the app's own origin, so the session cookie stays same-origin: from a folder
 * (SPA_DIR) or from the static host or CDN it lives on (SPA_UPSTREAM_URL). Files as they are, and
 * index.html for any other navigation (history-API routing). Framework-free like the proxy core: `npm start` calls it directly, the Next route
 * handler through a rewrite. Answers null for what it does not serve (the caller 404s or hands on).
 */

const CONTENT_TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.webmanifest': 'application/manifest+json',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.jpg': 'image/jpeg',
  '.jpeg': 'image/jpeg',
  '.gif': 'image/gif',
  '.webp': 'image/webp',
  '.avif': 'image/avif',
  '.ico': 'image/x-icon',
  '.woff': 'font/woff',
  '.woff2': 'font/woff2',
  '.txt': 'text/plain; charset=utf-8',
  '.wasm': 'application/wasm',
};

/**
 * Paths that belong to Gatehouse or Next, never to the SPA: `//api/…` and `/\api/…` too, which
 * Next reads as `/api/…`.
 */
const NOT_THE_SPA = /^[/\\]+(api|_next)([/\\]|$)/;

/** Whether Next would take the path for one of its own, as written or once Next resolves its dot segments (`/x/../api/…`). */
function notTheSpa(pathname: string): boolean {
  if (NOT_THE_SPA.test(pathname)) return true;
  const routed = routedPath(pathname);
  return routed === null || (routed !== pathname && NOT_THE_SPA.test(routed));
}

/** Vite (Rollup): eight base64url characters, in its assets directory. `assets/index-BKe-udLF.js` */
const ROLLUP_NAME = /^assets\/(?:[^/]+\/)*[^/]+-([\w-]{8})\.[a-z0-9]+$/;
/** webpack (Create React App, earlier Angular): hex. `main.3f2a9c1b.js`, `453.2c9ba7f0.chunk.js` */
const WEBPACK_NAME = /\.([0-9a-f]{8,})\.(?:chunk\.)?[a-z0-9]+$/;
/** esbuild (Angular's application builder): eight base32 capitals and digits. `main-5INURTSO.js` */
const ESBUILD_NAME = /-([A-Z2-7]{8})\.[a-z0-9]+$/;
/**
 * How people write the parts of a name: words in any of the usual cases, then perhaps a number
 * (`settings`, `SemiBold`, `iPhone12`, `PROD2024`, `logo2x`), numbers and sizes (`20240115`,
 * `1200x630`), versions (`v2`). A would-be hash whose every part (between `-` and `_`) reads so
 * is taken for a name: about 1 in 17 of Rollup's and webpack's hashes then revalidates (a 304),
 * and 1 in 4 of esbuild's (capitals, then digits), where a name taken for a hash would be kept from
 * its fixes for a year. Still taken for a hash: a capital on its own inside a part (`GoToTopX`).
 */
const WRITTEN_PART = /^(?:[a-z]+\d*x?|(?:[A-Z][a-z]+)+\d*|[a-z]+(?:[A-Z][a-z]+)+\d*|[A-Z]+\d*|\d+(?:x\d+)?|v\d+)?$/;

function looksWritten(chars: string): boolean {
  return chars.split(/[-_]/).every((part) => WRITTEN_PART.test(part));
}

/**
 * Whether the file at `relativePath` (inside SPA_DIR, `/`-separated, as the browser named it: a
 * link's name, not its target's) is named by its content hash, as the common builds write them:
 * such a file never changes, so it may be kept for good. Anything else revalidates:
 * `app-settings.json`, `apple-touch-icon.png` or a font's `Inter-SemiBold.woff2` kept for a year
 * would keep a fixed file from users for a year.
 */
export function isHashedAsset(relativePath: string): boolean {
  const hash = ROLLUP_NAME.exec(relativePath)?.[1] ?? WEBPACK_NAME.exec(relativePath)?.[1] ?? ESBUILD_NAME.exec(relativePath)?.[1];
  return hash !== undefined && !looksWritten(hash);
}

/**
 * The page's own protection: scripts, styles and connections from this origin only (the SPA talks
 * to /api/* on it), no framing, no plugins. An SPA that needs more sets SPA_CONTENT_SECURITY_POLICY.
 */
export const DEFAULT_SPA_CSP =
  "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'; object-src 'none'";

/** What index.html adds to the headers every served file carries (nosniff among them). */
function documentHeaders(csp: string): Array<[string, string]> {
  return [
    ['content-security-policy', csp],
    ['referrer-policy', 'same-origin'],
    ['x-frame-options', 'DENY'],
    ['cross-origin-opener-policy', 'same-origin'],
  ];
}

/**
 * Files whose answer is the app's page: its own policy (SPA_CONTENT_SECURITY_POLICY) and framing rules.
 * Scripts get no policy of their own: a worker takes its policy from its script's answer.
 * Every other file runs, should a browser be sent to it directly (an SVG or XML with a script in
 * it, an HTML file under another type), in a sandbox without scripts, so nothing among the
 * files can act on this origin, where `/api/proxy/*` answers with the user's tokens.
 */
const DOCUMENT_TYPES = new Set(['text/html', 'application/xhtml+xml']);
const SCRIPT_TYPES = new Set(['text/javascript', 'application/javascript', 'application/x-javascript', 'text/ecmascript', 'application/ecmascript']);
// No page of another site may frame them either (a clickjacking backdrop on this origin), as none may frame the page.
const FILE_CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; frame-ancestors 'none'; sandbox";

function protectionFor(contentType: string | undefined, csp: string): Array<[string, string]> {
  const type = (contentType ?? '').split(';', 1)[0]!.trim().toLowerCase();
  if (DOCUMENT_TYPES.has(type)) return documentHeaders(csp);
  if (SCRIPT_TYPES.has(type)) return [];
  return [['content-security-policy', FILE_CSP]];
}

/**
 * The file under `root` that `pathname` names, or null when it would step outside it or name a
 * dotfile (`.env`, `.git/…`: build tools leave them beside what they build), `.well-known` apart.
 */
export function resolveSpaFile(root: string, pathname: string): string | null {
  let decoded: string;
  try {
    decoded = decodeURIComponent(pathname);
  } catch {
    return null;
  }
  if (decoded.includes('\0') || decoded.includes('\\')) return null;
  const normalized = path.posix.normalize(`/${decoded}`);
  if (namesDotfile(normalized.split('/'))) return null;
  const base = path.resolve(root);
  const file = path.resolve(base, `.${normalized}`);
  return isWithin(base, file) ? file : null;
}

/** Checked on the path asked for and on the file a link leads to: `config.json -> .env` is a dotfile too. */
function namesDotfile(segments: string[]): boolean {
  return segments.some((segment) => segment.startsWith('.') && segment !== '.well-known');
}

function isWithin(base: string, file: string): boolean {
  return file === base || file.startsWith(base.endsWith(path.sep) ? base : `${base}${path.sep}`);
}

/**
 * The file to read for `file`, with every symbolic link resolved, when that is still a file under
 * the root's own real place: a link in the build that points elsewhere (`etc -> /etc`) is not
 * followed out of it. The root is resolved each time, so a deploy that swaps a `current` link is seen.
 */
interface SpaFile {
  file: string;
  size: number;
  modifiedMs: number;
  /** What changes whenever the file's content could have: a new content hash is due. */
  version: string;
}

async function fileAt(root: string, file: string | null): Promise<SpaFile | null> {
  if (!file) return null;
  const [real, realRoot] = await Promise.all([realpath(file).catch(() => null), realpath(root).catch(() => null)]);
  if (!real || !realRoot || !isWithin(realRoot, real) || namesDotfile(path.relative(realRoot, real).split(path.sep))) return null;
  const info = await stat(real).catch(() => null);
  return info?.isFile() ? { file: real, size: info.size, modifiedMs: info.mtimeMs, version: `${info.dev}:${info.ino}:${info.size}:${info.mtimeMs}:${info.ctimeMs}` } : null;
}

/**
 * A file's ETag: a hash of its content, as reproducible builds give a changed file its old size
 * and time (a new index.html differs only in asset names of the same length). Hashed once per
 * version of the file and process (inode and change time included, which no build tool sets), the
 * last 1,000 kept.
 */
const contentTags = sharedState('spa-content-tags', () => new Map<string, Promise<string>>());
function contentTag(served: SpaFile): Promise<string> {
  const key = `${served.file}\u0000${served.version}`;
  const known = contentTags.get(key);
  if (known) return known;
  // Kept while it is computed: a burst of requests for a large file after a deploy reads it once.
  const tag = hashOf(served.file);
  if (contentTags.size >= 1_000) contentTags.delete(contentTags.keys().next().value as string);
  contentTags.set(key, tag);
  tag.catch(() => contentTags.get(key) === tag && contentTags.delete(key));
  return tag;
}

async function hashOf(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return `"${hash.digest('base64url').slice(0, 22)}"`;
}

/**
 * Whether the browser asked for a page to show (a navigation), not for a file a page needs: such a
 * request for a path that names no file gets index.html even when the path looks like a file's
 * (`/users/jane.doe`, `/release/1.2`), while a missing script or image stays a 404.
 */
function isNavigation(header: (name: string) => string | undefined): boolean {
  const mode = header('sec-fetch-mode');
  if (mode !== undefined) return mode === 'navigate';
  return (header('accept') ?? '').includes('text/html');
}

/** Whether the path's last segment looks like a file's name: without a file of its own, such a path is a route only for a navigation. */
function hasExtension(pathname: string): boolean {
  return /\.[A-Za-z0-9]+$/.test(pathname);
}

/** On index.html served for a path with an extension (a navigation only): what caches must key it by. */
const FALLBACK_VARY: [string, string] = ['vary', 'Sec-Fetch-Mode, Accept'];

/** Whether the browser's validators match (RFC 9110 section 13.1.2: weak comparison for If-None-Match; If-Modified-Since only without it). */
function browserHolds(validators: { etag?: string | undefined; lastModified?: string | undefined }, header: (name: string) => string | undefined): boolean {
  const ifNoneMatch = header('if-none-match');
  if (ifNoneMatch !== undefined) {
    const weak = (tag: string) => tag.trim().replace(/^W\//, '');
    const { etag } = validators;
    return etag !== undefined && ifNoneMatch.split(',').some((tag) => tag.trim() === '*' || weak(tag) === weak(etag));
  }
  const since = header('if-modified-since');
  const { lastModified } = validators;
  // Exactly the date last sent, as nginx does by default: a file rewritten within the same second,
  // or rolled back to an older one, has another date and is sent whole.
  return since !== undefined && lastModified !== undefined && Date.parse(lastModified) === Date.parse(since);
}

export async function serveSpa(method: string, rawUrl: string, root: string, csp = DEFAULT_SPA_CSP, header: (name: string) => string | undefined = () => undefined): Promise<ProxyResponse | null> {
  if (method !== 'GET' && method !== 'HEAD') return null;
  const pathname = rawUrl.split(/[?#]/, 1)[0] ?? '/';
  // A path that does not decode is no file and no route: a 404, as under `next start`.
  if (notTheSpa(pathname) || !decodes(pathname)) return null;
  const requested = pathname.endsWith('/') ? null : resolveSpaFile(root, pathname);
  const found = await fileAt(root, requested);
  // Anything without a file of its own and without an extension is a route of the SPA, and so is any navigation.
  const isRoute = !found && (!hasExtension(pathname) || isNavigation(header));
  const served = found ?? (isRoute ? await fileAt(root, path.join(path.resolve(root), 'index.html')) : null);
  if (!served) return null;
  const extension = path.extname(served.file).toLowerCase();
  const isDocument = extension === '.html';
  const contentType = CONTENT_TYPES[extension] ?? 'application/octet-stream';
  const validators = { etag: await contentTag(served), lastModified: new Date(served.modifiedMs).toUTCString() };
  const headers: Array<[string, string]> = [
    ['content-type', contentType],
    // index.html must be revalidated so a deploy reaches users; hashed assets can be kept for good.
    ['cache-control', found && requested && !isDocument && isHashedAsset(path.relative(path.resolve(root), requested).split(path.sep).join('/')) ? 'public, max-age=31536000, immutable' : 'no-cache'],
    ['etag', validators.etag],
    ['last-modified', validators.lastModified],
    ['x-content-type-options', 'nosniff'],
    ...protectionFor(contentType, csp),
    // The page for a path that looks like a file's depends on what asked for it (a navigation or a page's script).
    ...(!found && hasExtension(pathname) ? [FALLBACK_VARY] : []),
  ];
  if (browserHolds(validators, header)) return { status: 304, headers, body: null };
  return { status: 200, headers: [['content-length', String(served.size)], ...headers], body: method === 'HEAD' ? null : createReadStream(served.file) };
}

/** What a static host may hear from the browser: content negotiation and revalidation, never its credentials. */
const TO_SPA_ORIGIN = ['accept', 'accept-language', 'if-none-match', 'if-modified-since', 'range', 'if-range'];
/** What the browser may hear back: the file and how to cache it; never cookies or the host's own policies. */
const FROM_SPA_ORIGIN = ['content-type', 'content-length', 'content-encoding', 'content-language', 'content-range', 'accept-ranges', 'cache-control', 'vary', 'etag', 'last-modified', 'expires', 'age'];
const SPA_ORIGIN_TIMEOUT_MS = 10_000;

function fetchFromOrigin(url: URL, method: string, header: (name: string) => string | undefined): Promise<http.IncomingMessage> {
  const headers: Record<string, string> = {};
  for (const name of TO_SPA_ORIGIN) {
    const value = header(name);
    if (value !== undefined) headers[name] = value;
  }
  return new Promise((resolve, reject) => {
    // No Accept-Encoding: the host answers uncompressed, and Next or a front proxy compresses for the browser.
    const request = (url.protocol === 'https:' ? https : http).request(url, { method, headers, timeout: SPA_ORIGIN_TIMEOUT_MS }, resolve);
    request.on('timeout', () => request.destroy(new Error('the SPA origin did not answer in time')));
    request.on('error', reject);
    request.end();
  });
}

/** The URL under the SPA origin's base path that `pathname` names, or null when it would step outside it. */
export function resolveSpaUrl(base: URL, pathname: string): URL | null {
  const file = resolveSpaFile('/', pathname);
  // A host may decode what it is sent once more, or normalise Unicode: held to the proxy's rule.
  if (file === null || file.split('/').some(mayStepOut)) return null;
  const basePath = base.pathname.endsWith('/') ? base.pathname : `${base.pathname}/`;
  const url = new URL(base.origin);
  url.pathname = basePath + file.slice(1).split('/').map(encodeURIComponent).join('/');
  return url.origin === base.origin && url.pathname.startsWith(basePath) ? url : null;
}

/** An answer of the SPA origin: its status, its headers (one value each), its body. */
interface OriginAnswer {
  status: number;
  headers: Record<string, string>;
  body: Readable | Buffer | null;
}

function fromIncoming(answer: http.IncomingMessage): OriginAnswer {
  const headers: Record<string, string> = {};
  for (const [name, value] of Object.entries(answer.headers)) if (typeof value === 'string') headers[name] = value;
  return { status: answer.statusCode ?? 502, headers, body: answer };
}

/**
 * The origin's files, kept per process as HTTP says a shared cache may (RFC 9111): without it
 * every page load and asset of every user is a request to the static host. Only whole `200`s of
 * GET, up to 2 MiB (declared, or read when sent chunked), that the host does not mark `no-store` or `private` and
 * that vary by nothing Gatehouse sends; fresh for `s-maxage`, `max-age` or `Expires` less their
 * `Age`, then revalidated with their `ETag` (`If-None-Match`) or `Last-Modified`. `no-cache` (what
 * index.html usually says) means a revalidation each time: a `304` with no body instead of the file.
 * Range requests go to the host as they are. At most 32 MiB and 512 files, least recently used out.
 */
interface CachedFile {
  headers: Record<string, string>;
  body: Buffer;
  /** Epoch ms until which it is served without asking the host. */
  freshUntil: number;
  /** Epoch ms it was received (or last revalidated), less the age the host said it already had. */
  bornAt: number;
}
const MAX_CACHED_FILE_BYTES = 2 * 1024 * 1024;
const MAX_CACHE_BYTES = 32 * 1024 * 1024;
const MAX_CACHED_FILES = 512;
const originCache = sharedState('spa-origin-cache', () => ({ files: new Map<string, CachedFile>(), bytes: 0 }));
/** Headers that say how to cache, taken from a revalidation's `304` (RFC 9111 section 4.3.4). */
const REVALIDATION_HEADERS = ['cache-control', 'expires', 'etag', 'last-modified', 'date', 'age'];

function directives(cacheControl: string | undefined): Map<string, string> {
  const found = new Map<string, string>();
  for (const part of (cacheControl ?? '').split(',')) {
    const [name = '', value = ''] = part.split('=', 2).map((text) => text.trim());
    if (name) found.set(name.toLowerCase(), value.replace(/^"|"$/g, ''));
  }
  return found;
}

/** Seconds, or undefined when the value is no delta-seconds. */
function deltaSeconds(value: string | undefined): number | undefined {
  return value !== undefined && /^\d{1,10}$/.test(value) ? Number(value) : undefined;
}

/** Whether the host lets a shared cache keep the answer at all. */
function mayKeep(headers: Record<string, string>): boolean {
  const control = directives(headers['cache-control']);
  if (control.has('no-store') || control.has('private')) return false;
  const vary = (headers.vary ?? '').split(',').map((name) => name.trim().toLowerCase()).filter(Boolean);
  // Gatehouse asks without Accept-Encoding; any other Vary would make one copy wrong for some browser.
  return vary.every((name) => name === 'accept-encoding');
}

/** The cache entry for a `200`, or undefined when the answer may not or need not be kept. */
function cacheEntryFor(headers: Record<string, string>, body: Buffer, now: number): CachedFile | undefined {
  if (!mayKeep(headers)) return undefined;
  const control = directives(headers['cache-control']);
  const age = deltaSeconds(headers.age) ?? 0;
  const bornAt = now - age * 1000;
  let lifetimeSec = control.has('no-cache') ? 0 : (deltaSeconds(control.get('s-maxage')) ?? deltaSeconds(control.get('max-age')));
  if (lifetimeSec === undefined && headers.expires !== undefined) {
    const expires = Date.parse(headers.expires);
    const date = headers.date !== undefined ? Date.parse(headers.date) : now;
    lifetimeSec = Number.isNaN(expires) || Number.isNaN(date) ? 0 : Math.max(0, (expires - date) / 1000);
  }
  const freshUntil = bornAt + (lifetimeSec ?? 0) * 1000;
  // Stale at once and nothing to revalidate with: keeping it would save no request.
  if (freshUntil <= now && headers.etag === undefined && headers['last-modified'] === undefined) return undefined;
  return { headers, body, freshUntil, bornAt };
}

function remember(key: string, entry: CachedFile | undefined): void {
  forget(key);
  if (!entry) return;
  const { files } = originCache;
  files.set(key, entry);
  originCache.bytes += entry.body.length;
  for (const [oldest, file] of files) {
    if (originCache.bytes <= MAX_CACHE_BYTES && files.size <= MAX_CACHED_FILES) break;
    files.delete(oldest);
    originCache.bytes -= file.body.length;
  }
}

function forget(key: string): void {
  const entry = originCache.files.get(key);
  if (!entry) return;
  originCache.files.delete(key);
  originCache.bytes -= entry.body.length;
}

function answerFromCache(entry: CachedFile, method: string, header: (name: string) => string | undefined, now: number): OriginAnswer {
  // The browser hears how long the file has been kept, so it does not count the host's max-age from now.
  const headers: Record<string, string> = { ...entry.headers, age: String(Math.max(0, Math.floor((now - entry.bornAt) / 1000))) };
  if (browserHolds({ etag: entry.headers.etag, lastModified: entry.headers['last-modified'] }, header)) {
    const { 'content-length': _length, ...rest } = headers;
    return { status: 304, headers: rest, body: null };
  }
  return { status: 200, headers, body: method === 'HEAD' ? null : entry.body };
}

/** The whole body when it is at most `maxBytes`, else a stream of all of it (what was read first included). */
async function readUpTo(answer: http.IncomingMessage, maxBytes: number): Promise<Buffer | Readable> {
  const chunks: Buffer[] = [];
  let size = 0;
  const iterator: AsyncIterator<Buffer> = answer[Symbol.asyncIterator]();
  for (let next = await iterator.next(); !next.done; next = await iterator.next()) {
    chunks.push(next.value);
    size += next.value.length;
    if (size > maxBytes) {
      const rest = async function* () {
        yield* chunks;
        for (let more = await iterator.next(); !more.done; more = await iterator.next()) yield more.value;
      };
      return Readable.from(rest(), { objectMode: false });
    }
  }
  return Buffer.concat(chunks);
}

/** A whole, keepable `200` from the host is kept; anything else passes through as it came. */
async function keepIfCacheable(key: string, answer: http.IncomingMessage, method: string, header: (name: string) => string | undefined): Promise<OriginAnswer> {
  const received = fromIncoming(answer);
  const declared = deltaSeconds(received.headers['content-length']);
  if (method !== 'GET' || received.status !== 200 || !mayKeep(received.headers) || (declared !== undefined && declared > MAX_CACHED_FILE_BYTES)) {
    if (received.status !== 304) forget(key);
    return received;
  }
  // A host may send a file without a declared length (chunked): kept if it turns out small enough.
  const body = await readUpTo(answer, MAX_CACHED_FILE_BYTES);
  const now = Date.now();
  const entry = body instanceof Readable ? undefined : cacheEntryFor(received.headers, body, now);
  if (!entry) {
    forget(key);
    return { ...received, body };
  }
  remember(key, entry);
  return answerFromCache(entry, method, header, now);
}

/** The file at `url`: from the cache when it is fresh there, revalidated when it is not, else from the host. */
async function fetchFile(url: URL, method: string, header: (name: string) => string | undefined): Promise<OriginAnswer> {
  if (header('range') !== undefined) return fromIncoming(await fetchFromOrigin(url, method, header));
  const key = url.href;
  const entry = originCache.files.get(key);
  const now = Date.now();
  if (entry && entry.freshUntil > now) {
    // Most recently used last: eviction starts at the front.
    originCache.files.delete(key);
    originCache.files.set(key, entry);
    return answerFromCache(entry, method, header, now);
  }
  if (entry) {
    // Our own validators, never the browser's: the host's 304 must be about the copy kept here.
    const validators: Record<string, string | undefined> = { 'if-none-match': entry.headers.etag, 'if-modified-since': entry.headers['last-modified'] };
    const answer = await fetchFromOrigin(url, 'GET', (name) => (name in validators ? validators[name] : header(name)));
    if (answer.statusCode !== 304) {
      const got = await keepIfCacheable(key, answer, 'GET', header);
      if (method !== 'HEAD') return got;
      if (got.body instanceof Readable) got.body.resume();
      return { ...got, body: null };
    }
    answer.resume();
    const refreshed = { ...entry.headers };
    for (const name of REVALIDATION_HEADERS) if (typeof answer.headers[name] === 'string') refreshed[name] = answer.headers[name];
    const renewed = cacheEntryFor(refreshed, entry.body, Date.now());
    remember(key, renewed);
    return answerFromCache(renewed ?? { ...entry, headers: refreshed }, method, header, Date.now());
  }
  if (method !== 'GET') return fromIncoming(await fetchFromOrigin(url, method, header));
  // A miss asks for the whole file, so it can be kept, and answers the browser's validators itself.
  const answer = await fetchFromOrigin(url, method, (name) => (name === 'if-none-match' || name === 'if-modified-since' ? undefined : header(name)));
  return keepIfCacheable(key, answer, method, header);
}

/**
 * Where a redirect of the host sends the browser, on this origin: a place under the host's base
 * path becomes the same path here (the host redirecting `/app/index.html` to `/app/`, or adding a
 * trailing slash); another site's address passes as it is. Anything else (the host outside its
 * base, Gatehouse's own paths, another scheme) is dropped, with the status kept.
 */
function locationOnThisOrigin(location: string, requested: URL, base: URL): string | undefined {
  const target = httpUrlFrom(location, requested);
  if (!target) return undefined;
  if (target.origin !== base.origin) return target.href;
  const basePath = base.pathname.endsWith('/') ? base.pathname : `${base.pathname}/`;
  if (!target.pathname.startsWith(basePath)) return undefined;
  const here = `/${target.pathname.slice(basePath.length)}`;
  // `/app//evil.example/x` would come out as `//evil.example/x`: another site, for a browser.
  return notTheSpa(here) || /^[/\\]{2}|^\/\\/.test(here) ? undefined : `${here}${target.search}${target.hash}`;
}

async function serveFromOrigin(method: string, rawUrl: string, base: URL, header: (name: string) => string | undefined, csp: string): Promise<ProxyResponse | null> {
  if (method !== 'GET' && method !== 'HEAD') return null;
  const pathname = rawUrl.split(/[?#]/, 1)[0] ?? '/';
  if (notTheSpa(pathname) || !decodes(pathname)) return null;
  const looksLikeRoute = pathname.endsWith('/') || !hasExtension(pathname);
  const isRoute = looksLikeRoute || isNavigation(header);
  let fetched = looksLikeRoute ? null : resolveSpaUrl(base, pathname);
  let answer = fetched ? await fetchFile(fetched, method, header) : null;
  // index.html for a path that looks like a file's: only because a navigation asked for it.
  let pageForAFilePath = false;
  if (!answer || (answer.status === 404 && isRoute)) {
    if (answer?.body instanceof Readable) answer.body.resume();
    if (!isRoute) return null;
    pageForAFilePath = !looksLikeRoute;
    fetched = resolveSpaUrl(base, '/index.html') as URL;
    answer = await fetchFile(fetched, method, header);
  }
  const { status } = answer;
  if (status === 404) {
    if (answer.body instanceof Readable) answer.body.resume();
    return null;
  }
  const headers: Array<[string, string]> = [];
  for (const name of FROM_SPA_ORIGIN) {
    const value = answer.headers[name];
    if (value !== undefined) headers.push([name, value]);
  }
  const location = status >= 300 && status < 400 && answer.headers.location !== undefined ? locationOnThisOrigin(answer.headers.location, fetched ?? base, base) : undefined;
  if (location !== undefined) headers.push(['location', location]);
  if (pageForAFilePath) {
    const varies = headers.findIndex(([name]) => name === 'vary');
    if (varies === -1) headers.push(FALLBACK_VARY);
    else headers[varies] = ['vary', `${headers[varies]![1]}, ${FALLBACK_VARY[1]}`];
  }
  headers.push(['x-content-type-options', 'nosniff'], ...protectionFor(answer.headers['content-type'], csp));
  const bodyless = method === 'HEAD' || status === 204 || status === 304;
  if (bodyless && answer.body instanceof Readable) answer.body.resume();
  return { status, headers, body: bodyless ? null : answer.body };
}

/**
 * Whether the build and the settings at run time agree on serving an SPA: Next compiles the rewrite
 * that sends every page to the SPA route into the build. Built with it and run without, every page
 * is a 404; built without it and run with it under `next start` or on Vercel, the app's own pages
 * are served instead of the SPA (`npm start` serves the SPA before Next, which needs no rewrite).
 */
export function spaBuildProblem(builtWithSpa: boolean, spa: SpaSource | undefined, { servedBeforeNext }: { servedBeforeNext: boolean }): string | undefined {
  if (builtWithSpa && !spa) {
    return 'SPA_DIR: the build was made with SPA_DIR or SPA_UPSTREAM_URL (every page goes to the SPA route), but neither is set now: set the same here, or build again without it';
  }
  if (!builtWithSpa && spa && !servedBeforeNext) {
    const variable = spa.kind === 'dir' ? 'SPA_DIR' : 'SPA_UPSTREAM_URL';
    return `${variable}: next start serves the SPA through a rewrite that Next compiles into the build, and the build was made without it: set ${variable} for \`npm run build\` too`;
  }
  return undefined;
}

/**
 * The SPA's answer for a request, from whichever source is configured; null when it has none.
 * `sendTimeoutMs` (PROXY_SEND_TIMEOUT_MS) ends a file's answer the browser stops taking, which
 * would hold the file open and its buffers for as long as the connection stays. (An SPA host's
 * answer ends by itself: its request times out while the browser's side holds it paused.)
 */
export async function serveSpaFrom(source: SpaSource, method: string, rawUrl: string, header: (name: string) => string | undefined, sendTimeoutMs: number): Promise<ProxyResponse | null> {
  const csp = source.contentSecurityPolicy ?? DEFAULT_SPA_CSP;
  if (source.kind === 'dir') {
    const answer = await serveSpa(method, rawUrl, source.dir, csp, header);
    if (answer?.body instanceof Readable) endWhenBrowserStalls(answer.body, sendTimeoutMs, 'spa.send_timeout', {});
    return answer;
  }
  try {
    return await serveFromOrigin(method, rawUrl, source.url, header, csp);
  } catch (error) {
    log('warn', 'spa.origin_unavailable', { message: error instanceof Error ? error.message : String(error) });
    return { status: 502, headers: [['content-type', 'text/plain; charset=utf-8'], ['cache-control', 'no-store']], body: 'The application could not be loaded. Try again shortly.' };
  }
}
