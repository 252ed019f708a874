import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import path from 'node:path';
import type { ProxyResponse } from './proxy.ts';

/**
 * Serves a built SPA (SPA_DIR: index.html and its assets) on the app's own origin, so the session
 * cookie stays same-origin: files as they are, and index.html for any other navigation (history-API
 * routing). Framework-free like the proxy core: `npm start` calls it directly, the Next route
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

function documentHeaders(csp: string): Array<[string, string]> {
  return [
    ['content-security-policy', csp],
    ['x-content-type-options', 'nosniff'],
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
  return file === base || file.startsWith(`${base}${path.sep}`) ? file : null;
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
  if (isDocument) headers.push(...documentHeaders(csp).filter(([name]) => name !== 'x-content-type-options'));
  return { status: 200, headers, body: method === 'HEAD' ? null : createReadStream(served.file) };
}
