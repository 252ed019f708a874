import { NextResponse, type NextRequest } from 'next/server';
import { PROXY_METHODS, checkCsrf, decodes, jsonHeaders, requestIdFrom } from './lib/http.ts';

/**
 * The edge gate: rejects forged API calls before any I/O happens. It is an early exit only; every
 * route handler enforces the same rules itself, because middleware can be bypassed (CVE-2025-29927).
 * Its answers look exactly like the proxy core's, so the SPA cannot tell which one refused.
 */
export function middleware(request: NextRequest): NextResponse {
  // The SPA's route is where next.config.mjs rewrites the SPA's paths; asked for by its own name it
  // would serve index.html under /api, where a mistyped API path must get JSON. This runs on the
  // path as the browser sent it, before the rewrite.
  if (namesTheSpaRoute(request.nextUrl.pathname)) return refuse(request, 404, 'not_found', 'Nothing here.');
  // `next start` upgrades nothing on /api/proxy: it drops a middleware answer to a WebSocket
  // handshake and would leave the browser waiting, but ends the connection at once when routing
  // finds the proxy's route. So the handshake goes on to routing (it never reaches the route
  // handler that way, and if it did, the handler refuses it: no X-CSRF). README, "WebSockets".
  if (request.nextUrl.pathname.startsWith('/api/proxy/') && request.headers.get('upgrade')?.toLowerCase() === 'websocket') return NextResponse.next();
  const appOrigin = process.env.APP_BASE_URL ? new URL(process.env.APP_BASE_URL).origin : request.nextUrl.origin;
  if (!checkCsrf((name) => request.headers.get(name), appOrigin).ok) {
    return refuse(request, 403, 'csrf_failed', 'This request must come from the application itself (X-CSRF: 1, same origin).');
  }
  // Next only routes the methods a route handler exports; answer the others as the proxy core would.
  if (request.nextUrl.pathname.startsWith('/api/proxy/') && !PROXY_METHODS.includes(request.method)) {
    return refuse(request, 405, 'method_not_allowed', 'This method is not supported by the proxy.', { allow: PROXY_METHODS.join(', ') });
  }
  const undecodable = undecodablePath(request.nextUrl.pathname);
  if (undecodable) return refuse(request, ...undecodable);
  return NextResponse.next();
}

/**
 * A path with a percent-escape that does not decode (`%zz`, a lone `%`, bytes that are no UTF-8)
 * fails inside Next, which decodes a dynamic route's segments before its handler runs, with a
 * bare 500. Here such a path gets the answer its handler would give a name it does not know: for
 * a proxied path what `npm start`'s proxy core answers (lib/proxy.ts, resolveUpstream), 404
 * `unknown_api` for a name that is no API, else 400 `invalid_path`; for a session's handle, 404
 * `not_found`, as for any handle that is not one of the user's sessions.
 */
function undecodablePath(pathname: string): [number, string, string] | undefined {
  const proxied = pathname.startsWith('/api/proxy/');
  if (!proxied && !pathname.startsWith('/api/auth/sessions/')) return undefined;
  if (decodes(pathname)) return undefined;
  if (!proxied) return [404, 'not_found', 'No such session.'];
  const apiName = pathname.slice('/api/proxy/'.length).split('/')[0] ?? '';
  let known = false;
  try {
    // The proxy core looks the name up as it came, undecoded; BFF_APIS is read, not validated, here.
    const apis: unknown = JSON.parse(process.env.BFF_APIS ?? '{}');
    known = typeof apis === 'object' && apis !== null && Object.hasOwn(apis, apiName);
  } catch {
    // An unreadable BFF_APIS names no API; the path is refused either way.
  }
  return known ? [400, 'invalid_path', 'The API path is not allowed.'] : [404, 'unknown_api', 'No API with that name is configured.'];
}

const SPA_ROUTE = /^\/api\/spa(\/|$)/;

/** As written or decoded: Next routes `/api/%73pa/…` by its decoded segments, to the SPA's route. */
function namesTheSpaRoute(pathname: string): boolean {
  if (SPA_ROUTE.test(pathname)) return true;
  if (!pathname.includes('%')) return false;
  try {
    return SPA_ROUTE.test(decodeURIComponent(pathname));
  } catch {
    return false;
  }
}

function refuse(request: NextRequest, status: number, code: string, message: string, extra: Record<string, string> = {}): NextResponse {
  return new NextResponse(JSON.stringify({ error: code, message }), {
    status,
    headers: { ...jsonHeaders(), 'x-gatehouse-error': code, 'x-request-id': requestIdFrom(request.headers.get('x-request-id')), ...extra },
  });
}

/**
 * On /api/proxy/* the gate runs only for requests that cannot be the SPA's (no `X-CSRF: 1`), so it
 * still turns forged calls away before a function starts. The SPA's own calls skip it: Next buffers
 * the body of every request its middleware sees (a copy for the middleware, cut at 10 MiB with
 * only a logged warning), which would truncate uploads and hold them in memory, and the middleware
 * sandbox costs every proxied call. The proxy core repeats every check, this one included.
 */
export const config = {
  matcher: [
    { source: '/api/proxy/:path*', missing: [{ type: 'header', key: 'x-csrf', value: '1' }] },
    // A path that does not decode (the complement of percent-encoded UTF-8 as decodeURIComponent
    // reads it), with X-CSRF too: Next would fail on it before any route handler (see above).
    // Next tries a matcher on the decoded path as well, and `100%25%20off` decodes to `100% off`,
    // which does not decode again: an upload to such a path, sent by the SPA with X-CSRF, comes here
    // too. So no request whose body Next would cut comes here: none with more than 7 digits of
    // Content-Length (Next keeps 10 MiB), none chunked. Such a request with a path that really
    // does not decode gets Next's bare 500, with nothing forwarded.
    {
      missing: [
        { type: 'header', key: 'transfer-encoding' },
        { type: 'header', key: 'content-length', value: '[0-9]{8,}' },
      ],
      source: '/api/proxy/:path((?!(?:[^%]|%[0-7][0-9a-fA-F]|%[cC][2-9a-fA-F]%[89abAB][0-9a-fA-F]|%[dD][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[eE]0%[abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[eE][1-9a-cA-CefEF]%[89abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[eE][dD]%[89][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[fF]0%[9abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[fF][1-3]%[89abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[fF]4%8[0-9a-fA-F]%[89abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F])*$).*)',
    },
    '/api/auth/session',
    '/api/auth/sessions/:path*',
    '/api/spa/:path*',
  ],
};
