import { NextResponse, type NextRequest } from 'next/server';
import { checkCsrf, jsonHeaders } from './lib/http.ts';

/**
 * The edge gate: rejects forged API calls before any I/O happens. It is an early exit only; every
 * route handler enforces the same rule itself, because middleware can be bypassed (CVE-2025-29927).
 */
export function middleware(request: NextRequest): NextResponse {
  const appOrigin = process.env.APP_BASE_URL ? new URL(process.env.APP_BASE_URL).origin : request.nextUrl.origin;
  const verdict = checkCsrf((name) => request.headers.get(name), appOrigin);
  if (verdict.ok) return NextResponse.next();
  return new NextResponse(JSON.stringify({ error: 'csrf_failed', message: 'This request must come from the application itself (X-CSRF: 1, same origin).' }), {
    status: 403,
    headers: { ...jsonHeaders(), 'x-gatehouse-error': 'csrf_failed' },
  });
}

export const config = {
  matcher: ['/api/proxy/:path*', '/api/auth/session', '/api/auth/sessions/:path*'],
};
