import { errors } from './errors.ts';

/**
 * Request checks shared by middleware (edge runtime) and every route handler. Edge-safe: no Node
 * APIs, no I/O beyond reading the request handed in, no configuration parsing — callers pass the
 * application origin in.
 */

export type HeaderLookup = (name: string) => string | null | undefined;

export interface CsrfVerdict {
  ok: boolean;
  reason?: 'missing_header' | 'cross_origin' | 'cross_site';
}

/**
 * The anti-forgery rule for every API call from the SPA: a custom header (which a cross-site form
 * or a simple request cannot send without a CORS preflight we never grant) and, when the browser
 * tells us, an Origin and Sec-Fetch-Site that show the same origin.
 */
export function checkCsrf(header: HeaderLookup, appOrigin: string | undefined): CsrfVerdict {
  const site = header('sec-fetch-site');
  if (site && site !== 'same-origin' && site !== 'none') return { ok: false, reason: 'cross_site' };
  const origin = header('origin');
  if (origin && (!appOrigin || origin !== appOrigin)) return { ok: false, reason: 'cross_origin' };
  if (header('x-csrf') !== '1') return { ok: false, reason: 'missing_header' };
  return { ok: true };
}

/**
 * The path Next routes a request target (or a path) by: dot segments (`.`, `%2e` and their pairs,
 * after `/` or `\`) resolved as Next resolves them, joined to an origin, not resolved against a
 * base, so `//x/./api/…` is then a host, not a path. Most targets have no dot segment and come
 * back as they are, without their query; null when the target does not parse.
 */
export function routedPath(target: string): string | null {
  const pathEnd = target.search(/[?#]/);
  const path = pathEnd === -1 ? target : target.slice(0, pathEnd);
  if (!/[/\\](?:\.|%2e)/i.test(path)) return path;
  try {
    return new URL(`http://gatehouse.invalid${path}`).pathname;
  } catch {
    return null;
  }
}

const CONTROL_OR_BACKSLASH = /[\u0000-\u001f\u007f\\]/;
const PLACEHOLDER_ORIGIN = 'https://gatehouse.invalid';

/**
 * No layer of percent-decoding turns the value into something that is not a plain absolute path,
 * as written or once its dot segments are resolved (`/x/..%2F%2Fevil.example` decodes to
 * `/x/..//evil.example`, which resolves to `//evil.example`).
 */
function isPlainPathInEveryLayer(value: string): boolean {
  let layer = value;
  for (let depth = 0; depth < 4; depth++) {
    if (!layer.startsWith('/') || layer.startsWith('//') || CONTROL_OR_BACKSLASH.test(layer)) return false;
    const resolved = normalisedPath(layer);
    if (resolved === null || resolved.startsWith('//')) return false;
    let decoded: string;
    try {
      decoded = decodeURIComponent(layer);
    } catch {
      return false;
    }
    if (decoded === layer) return true;
    layer = decoded;
  }
  return false;
}

function normalisedPath(value: string): string | null {
  let url: URL;
  try {
    url = new URL(value, PLACEHOLDER_ORIGIN);
  } catch {
    return null;
  }
  return url.origin === PLACEHOLDER_ORIGIN ? url.pathname + url.search + url.hash : null;
}

/**
 * A `returnTo` that can only lead back into this application, or `/`. The decision is made on the
 * normalised target — what a browser will actually be sent to — because the parser resolves dot
 * segments: `/.//evil.example` passes every check on the raw string and normalises to the
 * protocol-relative `//evil.example`. Every percent-decoding layer is checked too, so
 * `/%2F%2Fevil.example` cannot become `//evil.example` later in someone else's hands.
 */
export function safeReturnTo(raw: string | null | undefined): string {
  if (!raw || raw.length > MAX_RETURN_TO_LENGTH || !isPlainPathInEveryLayer(raw)) return '/';
  const target = normalisedPath(raw);
  if (target === null || target.length > MAX_RETURN_TO_LENGTH || !isPlainPathInEveryLayer(target) || normalisedPath(target) !== target) return '/';
  return target;
}

/**
 * The longest `returnTo` kept, in characters of the normalised target (percent-encoded ASCII, so
 * one byte each; a non-ASCII character counts three times as `%XX` per byte): a longer one becomes
 * `/` rather than a login that silently fails. The login attempt's sealed cookie grows by 4/3 of
 * it, and browsers store no cookie over 4096 bytes; with every other field at its largest (8 ACR
 * values of 256 characters, max_age, prompt, the previous session's id, a DPoP thumbprint, a
 * 10-digit key id, the `__Host-` name and every attribute) a 2161-character one is the largest that
 * fits, so 2048 leaves room. test/unit/session.test.ts checks that sum.
 */
export const MAX_RETURN_TO_LENGTH = 2048;

/**
 * The absolute URL a login ends at: `returnTo` resolved against the app, and the app's root if that
 * would leave the app's origin whatever the stored value says (the last line of defence).
 */
export function sameOriginRedirect(returnTo: string, appBaseUrl: URL): string {
  let target: URL;
  try {
    target = new URL(safeReturnTo(returnTo), appBaseUrl);
  } catch {
    return new URL('/', appBaseUrl).href;
  }
  return target.origin === appBaseUrl.origin ? target.href : new URL('/', appBaseUrl).href;
}

export const NO_STORE = { 'cache-control': 'no-store', pragma: 'no-cache' } as const;

/**
 * On every answer of Gatehouse's own JSON and every proxied answer (lib/proxy.ts): none is meant
 * to be a page. A navigation cannot send X-CSRF, but the browser's cache (or its back/forward
 * cache) can show a navigation an answer a `fetch` stored, and an API may serve HTML or SVG its
 * users uploaded. As a page of the app's origin, where `/api/proxy` answers with the user's tokens,
 * it gets no script, no plugin, no frame around it and no type sniffing.
 */
export const NOT_A_PAGE = {
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
  // As next.config.mjs gives every answer under `next start`: the same on both shapes.
  'referrer-policy': 'same-origin',
  'content-security-policy': "default-src 'none'; frame-ancestors 'none'; sandbox",
} as const;

export function jsonHeaders(): Record<string, string> {
  return { 'content-type': 'application/json; charset=utf-8', ...NO_STORE, ...NOT_A_PAGE };
}

/** Methods the proxy forwards; anything else is a 405 (shared by middleware and the proxy core). */
export const PROXY_METHODS: readonly string[] = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'];

const SANE_REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;

/** The caller's X-Request-Id when it is sane, else a fresh one. */
export function requestIdFrom(value: string | null | undefined): string {
  return value && SANE_REQUEST_ID.test(value) ? value : crypto.randomUUID();
}

/**
 * A request body of at most `maxBytes`, else 413 `payload_too_large`: an oversized declared
 * Content-Length is refused before any byte is read, and a streamed (chunked) body as soon as it
 * passes the cap, so an unauthenticated sender cannot make us hold more than the cap in memory.
 * Web streams only, so it runs on the edge too.
 */
export async function readBodyUpTo(request: Request, maxBytes: number): Promise<Uint8Array> {
  if (Number(request.headers.get('content-length') ?? 0) > maxBytes) throw errors.payloadTooLarge();
  if (!request.body) return new Uint8Array(0);
  const reader = request.body.getReader();
  const chunks: Uint8Array[] = [];
  let length = 0;
  for (let next = await reader.read(); !next.done; next = await reader.read()) {
    length += next.value.byteLength;
    if (length > maxBytes) {
      // Release rather than cancel: cancelling destroys a Node request mid-body, and with it the
      // socket the 413 still has to go out on. Released and unread, the sender is simply not read.
      reader.releaseLock();
      throw errors.payloadTooLarge();
    }
    chunks.push(next.value);
  }
  return concatBytes(chunks, length);
}

function concatBytes(chunks: Uint8Array[], length: number): Uint8Array {
  const bytes = new Uint8Array(length);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return bytes;
}

/** `value` read against `base`, when that is an http(s) URL: undefined for no URL at all or another scheme. */
export function httpUrlFrom(value: string, base: URL): URL | undefined {
  let url: URL;
  try {
    url = new URL(value, base);
  } catch {
    return undefined;
  }
  return url.protocol === 'http:' || url.protocol === 'https:' ? url : undefined;
}

/** Whether every percent-escape in `text` decodes (UTF-8, as decodeURIComponent reads it). */
export function decodes(text: string): boolean {
  try {
    decodeURIComponent(text);
    return true;
  } catch {
    return false;
  }
}
