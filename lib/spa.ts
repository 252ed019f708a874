import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import type { SpaSource } from './config.ts';
import { log } from './log.ts';
import type { ProxyResponse } from './proxy.ts';

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

/** Paths that belong to Gatehouse or Next, never to the SPA. */
const NOT_THE_SPA = /^\/(api|_next)(\/|$)/;
/** Vite, Create React App and Angular put a content hash in built asset names: those never change. */
const HASHED_ASSET = /[.-][A-Za-z0-9_-]{8,}\.[a-z0-9]+$/;

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

/** The file under `root` that `pathname` names, or null when it would step outside it. */
export function resolveSpaFile(root: string, pathname: string): string | null {
  let decoded: string;
  try {
    decoded = decodeURIComponent(pathname);
  } catch {
    return null;
  }
  if (decoded.includes('\0') || decoded.includes('\\')) return null;
  const base = path.resolve(root);
  const file = path.resolve(base, `.${path.posix.normalize(`/${decoded}`)}`);
  const inside = base.endsWith(path.sep) ? base : `${base}${path.sep}`;
  return file === base || file.startsWith(inside) ? file : null;
}

async function fileAt(file: string | null): Promise<{ file: string; size: number } | null> {
  if (!file) return null;
  const info = await stat(file).catch(() => null);
  return info?.isFile() ? { file, size: info.size } : null;
}

export async function serveSpa(method: string, rawUrl: string, root: string, csp = DEFAULT_SPA_CSP): Promise<ProxyResponse | null> {
  if (method !== 'GET' && method !== 'HEAD') return null;
  const pathname = rawUrl.split(/[?#]/, 1)[0] ?? '/';
  if (NOT_THE_SPA.test(pathname)) return null;
  const found = pathname.endsWith('/') ? null : await fileAt(resolveSpaFile(root, pathname));
  // Anything without a file of its own and without an extension is a route of the SPA.
  const isRoute = !found && !/\.[A-Za-z0-9]+$/.test(pathname);
  const served = found ?? (isRoute ? await fileAt(path.join(path.resolve(root), 'index.html')) : null);
  if (!served) return null;
  const extension = path.extname(served.file).toLowerCase();
  const isDocument = extension === '.html';
  const headers: Array<[string, string]> = [
    ['content-type', CONTENT_TYPES[extension] ?? 'application/octet-stream'],
    ['content-length', String(served.size)],
    // index.html must be revalidated so a deploy reaches users; hashed assets can be kept for good.
    ['cache-control', !isDocument && HASHED_ASSET.test(served.file) ? 'public, max-age=31536000, immutable' : 'no-cache'],
    ['x-content-type-options', 'nosniff'],
  ];
  if (isDocument) headers.push(...documentHeaders(csp));
  return { status: 200, headers, body: method === 'HEAD' ? null : createReadStream(served.file) };
}

/** What a static host may hear from the browser: content negotiation and revalidation, never its credentials. */
const TO_SPA_ORIGIN = ['accept', 'accept-language', 'if-none-match', 'if-modified-since', 'range', 'if-range'];
/** What the browser may hear back: the file and how to cache it; never cookies or the host's own policies. */
const FROM_SPA_ORIGIN = ['content-type', 'content-length', 'content-range', 'accept-ranges', 'cache-control', 'etag', 'last-modified', 'expires'];
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
  if (file === null) return null;
  const basePath = base.pathname.endsWith('/') ? base.pathname : `${base.pathname}/`;
  const url = new URL(base.origin);
  url.pathname = basePath + file.slice(1).split('/').map(encodeURIComponent).join('/');
  return url.origin === base.origin && url.pathname.startsWith(basePath) ? url : null;
}

async function serveFromOrigin(method: string, rawUrl: string, base: URL, header: (name: string) => string | undefined, csp: string): Promise<ProxyResponse | null> {
  if (method !== 'GET' && method !== 'HEAD') return null;
  const pathname = rawUrl.split(/[?#]/, 1)[0] ?? '/';
  if (NOT_THE_SPA.test(pathname)) return null;
  const isRoute = pathname.endsWith('/') || !/\.[A-Za-z0-9]+$/.test(pathname);
  const fileUrl = isRoute ? null : resolveSpaUrl(base, pathname);
  let answer = fileUrl ? await fetchFromOrigin(fileUrl, method, header) : null;
  if (!answer || (answer.statusCode === 404 && isRoute)) {
    answer?.resume();
    if (!isRoute) return null;
    answer = await fetchFromOrigin(resolveSpaUrl(base, '/index.html') as URL, method, header);
  }
  const status = answer.statusCode ?? 502;
  if (status === 404) {
    answer.resume();
    return null;
  }
  const headers: Array<[string, string]> = [];
  for (const name of FROM_SPA_ORIGIN) {
    const value = answer.headers[name];
    if (typeof value === 'string') headers.push([name, value]);
  }
  headers.push(['x-content-type-options', 'nosniff']);
  if (String(answer.headers['content-type'] ?? '').startsWith('text/html')) headers.push(...documentHeaders(csp));
  const bodyless = method === 'HEAD' || status === 204 || status === 304;
  if (bodyless) answer.resume();
  return { status, headers, body: bodyless ? null : answer };
}

/** The SPA's answer for a request, from whichever source is configured; null when it has none. */
export async function serveSpaFrom(source: SpaSource, method: string, rawUrl: string, header: (name: string) => string | undefined): Promise<ProxyResponse | null> {
  const csp = source.contentSecurityPolicy ?? DEFAULT_SPA_CSP;
  if (source.kind === 'dir') return serveSpa(method, rawUrl, source.dir, csp);
  try {
    return await serveFromOrigin(method, rawUrl, source.url, header, csp);
  } catch (error) {
    log('warn', 'spa.origin_unavailable', { message: error instanceof Error ? error.message : String(error) });
    return { status: 502, headers: [['content-type', 'text/plain; charset=utf-8'], ['cache-control', 'no-store']], body: 'The application could not be loaded. Try again shortly.' };
  }
}
