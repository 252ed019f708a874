import { NextResponse, type NextRequest } from 'next/server';
import { PROXY_METHODS, checkCsrf, jsonHeaders, requestIdFrom } from './lib/http.ts';

/**
 * The edge gate: rejects forged API calls before any I/O happens. It is an early exit only; every
 * route handler enforces the same rules itself, because middleware can be bypassed (CVE-2025-29927).
 * Its answers look exactly like the proxy core's, so the SPA cannot tell which one refused.
 */
export function middleware(request: NextRequest): NextResponse {
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
  return NextResponse.next();
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
    '/api/auth/session',
    '/api/auth/sessions/:path*',
  ],
};
