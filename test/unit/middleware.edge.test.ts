// @vitest-environment edge-runtime
import { readFileSync } from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { NextRequest } from 'next/server';
import { describe, expect, it } from 'vitest';
import { config, middleware } from '../../middleware.ts';
import { decodableSegment, decodes, undecodablePath } from '../support/hostile-inputs.ts';

// middleware.ts is what Vercel runs on its Edge runtime. This runs it under edge-runtime (Vercel's
// emulator of that runtime's globals) with the inputs of the adapter parity suite, and checks its
// answers are the proxy core's own (status, JSON body, headers). `next start` runs the built
// middleware in Next's own copy of edge-runtime, so the integration suites on next start
// (integration-next, adapters) exercise the real bundle too.

const APP = 'https://app.example.com';
const PROXY_METHODS = 'GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS';

function request(method: string, path: string, headers: Record<string, string>): NextRequest {
  return new NextRequest(new URL(path, APP), { method, headers });
}

/** [label, method, path, headers, expected status (200 = let through) and code]. */
const cases: Array<[string, string, string, Record<string, string>, number, string | null]> = [
  ['missing X-CSRF', 'GET', '/api/proxy/demo/whoami', {}, 403, 'csrf_failed'],
  ['X-CSRF other than 1', 'GET', '/api/proxy/demo/whoami', { 'x-csrf': 'true' }, 403, 'csrf_failed'],
  ['cross-site Origin', 'POST', '/api/proxy/demo/echo', { 'x-csrf': '1', origin: 'http://evil.example' }, 403, 'csrf_failed'],
  ['Origin null', 'GET', '/api/proxy/demo/whoami', { 'x-csrf': '1', origin: 'null' }, 403, 'csrf_failed'],
  ['Sec-Fetch-Site: cross-site', 'GET', '/api/proxy/demo/whoami', { 'x-csrf': '1', 'sec-fetch-site': 'cross-site' }, 403, 'csrf_failed'],
  ['Sec-Fetch-Site: same-site', 'GET', '/api/proxy/demo/whoami', { 'x-csrf': '1', 'sec-fetch-site': 'same-site' }, 403, 'csrf_failed'],
  ['session endpoint without X-CSRF', 'GET', '/api/auth/session', {}, 403, 'csrf_failed'],
  ['PROPFIND', 'PROPFIND', '/api/proxy/demo/whoami', { 'x-csrf': '1' }, 405, 'method_not_allowed'],
  ['a same-origin SPA call', 'GET', '/api/proxy/demo/whoami', { 'x-csrf': '1', origin: APP, 'sec-fetch-site': 'same-origin' }, 200, null],
  ['a same-origin session read', 'GET', '/api/auth/session', { 'x-csrf': '1', 'sec-fetch-site': 'same-origin' }, 200, null],
];

describe('middleware.ts on the Edge runtime', () => {
  it('imports nothing but next/server and edge-safe modules of ours (no node: builtins, no I/O clients)', () => {
    // vitest's edge-runtime environment swaps the globals but still resolves imports through Node,
    // so what the middleware may import is checked here from the source itself.
    const root = path.resolve(import.meta.dirname, '..', '..');
    const seen = new Set<string>();
    const external: string[] = [];
    const visit = (file: string) => {
      if (seen.has(file)) return;
      seen.add(file);
      for (const [, specifier] of readFileSync(file, 'utf8').matchAll(/^import[^'"]*['"]([^'"]+)['"]/gm)) {
        if (specifier?.startsWith('.')) visit(path.resolve(path.dirname(file), specifier));
        else external.push(specifier as string);
      }
    };
    visit(path.join(root, 'middleware.ts'));
    expect(external).toEqual(['next/server']);
    expect([...seen].map((file) => path.relative(root, file)).sort()).toEqual(['lib/errors.ts', 'lib/http.ts', 'middleware.ts']);
  });

  it.each(cases)('%s', async (_label, method, path, headers, status, code) => {
    process.env.APP_BASE_URL = APP;
    const answer = middleware(request(method, path, headers));
    if (code === null) {
      // Let through: Next's "continue" signal, no body of its own.
      expect(answer.headers.get('x-middleware-next')).toBe('1');
      return;
    }
    expect(answer.status).toBe(status);
    expect(answer.headers.get('content-type')).toBe('application/json; charset=utf-8');
    expect(answer.headers.get('cache-control')).toBe('no-store');
    expect(answer.headers.get('x-gatehouse-error')).toBe(code);
    expect(answer.headers.get('x-request-id')).toMatch(/^[0-9a-f-]{36}$/);
    if (status === 405) expect(answer.headers.get('allow')).toBe(PROXY_METHODS);
    const body = (await answer.json()) as Record<string, unknown>;
    expect(Object.keys(body).sort()).toEqual(['error', 'message']);
    expect(body.error).toBe(code);
  });
});


describe('proxied paths and session handles that do not decode (Next fails on them before any route handler)', () => {
  const refusal = async (path: string, headers: Record<string, string> = { 'x-csrf': '1' }) => {
    const answer = middleware(request('GET', path, headers));
    if (answer.headers.get('x-middleware-next') === '1') return { status: 200, code: null };
    const body = (await answer.json()) as Record<string, unknown>;
    expect(Object.keys(body).sort()).toEqual(['error', 'message']);
    expect(answer.headers.get('x-gatehouse-error')).toBe(body.error);
    return { status: answer.status, code: body.error };
  };

  it('are refused as the proxy core refuses them: 400 invalid_path for an API, 404 unknown_api for another name, 403 first without X-CSRF', async () => {
    process.env.APP_BASE_URL = APP;
    process.env.BFF_APIS = JSON.stringify({ demo: { url: 'https://api.example.com' } });
    await fc.assert(
      fc.asyncProperty(undecodablePath, async (rest) => {
        expect(await refusal(`/api/proxy/demo/${rest}`)).toEqual({ status: 400, code: 'invalid_path' });
        expect(await refusal(`/api/proxy/nope/${rest}`)).toEqual({ status: 404, code: 'unknown_api' });
        expect(await refusal(`/api/proxy/${rest}`)).toEqual({ status: 404, code: 'unknown_api' });
        expect(await refusal(`/api/proxy/demo/${rest}`, {})).toEqual({ status: 403, code: 'csrf_failed' });
        // A session's handle that does not decode is no handle of the user's, as the route handler would say.
        expect(await refusal(`/api/auth/sessions/${rest}`)).toEqual({ status: 404, code: 'not_found' });
        expect(await refusal(`/api/auth/sessions/${rest}`, {})).toEqual({ status: 403, code: 'csrf_failed' });
      }),
      { numRuns: 500 },
    );
    // `__proto__` is no API, whatever JSON.parse makes of it.
    expect(await refusal('/api/proxy/__proto__/%zz')).toEqual({ status: 404, code: 'unknown_api' });
    expect(await refusal('/api/proxy/demo/caf%C3%A9')).toEqual({ status: 200, code: null });
  });

  // The SPA's calls skip the middleware (Next would buffer their bodies, see config): the matcher
  // entry for these paths must select exactly the paths that do not decode.
  it('the matcher selects exactly the paths that do not decode', () => {
    const source = config.matcher.flatMap((entry) => (typeof entry === 'string' ? [] : [entry.source])).find((entry) => entry.startsWith('/api/proxy/:path('));
    const pattern = /^\/api\/proxy\/:path\((.*)\)$/s.exec(source ?? '')?.[1];
    expect(pattern).toBeDefined();
    const selects = new RegExp(`^(?:${pattern})$`);
    fc.assert(
      fc.property(fc.oneof(undecodablePath, fc.array(decodableSegment, { minLength: 1, maxLength: 4 }).map((segments) => segments.join('/')), fc.string({ unit: 'binary', maxLength: 12 }).map(encodeURI)), (rest) => {
        expect(selects.test(rest), rest).toBe(!decodes(rest));
      }),
      { numRuns: 5000 },
    );
    // Every pair of escaped bytes: all lead and continuation bytes, overlongs and surrogates among them.
    for (let first = 0; first < 256; first++) {
      for (let second = 0; second < 256; second++) {
        const rest = `%${first.toString(16).padStart(2, '0')}%${second.toString(16).toUpperCase().padStart(2, '0')}`;
        if (selects.test(rest) === decodes(rest)) expect.fail(`${rest}: selected ${selects.test(rest)}, decodes ${decodes(rest)}`);
      }
    }
  });
});
