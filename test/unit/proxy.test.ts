import { execFileSync } from 'node:child_process';
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { ApiConfig } from '../../lib/config.ts';
import { GatehouseError } from '../../lib/errors.ts';
import { OpenCalls, browserLocation, clientAddress, redirectResendsBody, filterRequestHeaders, filterResponseHeaders, forwardedForChain, keptToTheUser, resolveUpstream } from '../../lib/proxy.ts';

const api = (url: string): ApiConfig => ({ name: 'todos', url: new URL(url), auth: 'user', scope: undefined, resource: undefined, tokenExchange: undefined, timeoutMs: 1000, maxBodyBytes: 1000 });
const apis = { todos: api('https://api.example.com/v1') };

describe('resolveUpstream', () => {
  it.each([
    ['/api/proxy/todos/items', 'https://api.example.com/v1/items'],
    ['/api/proxy/todos/items/7?x=1&y=%20', 'https://api.example.com/v1/items/7?x=1&y=%20'],
    ['/api/proxy/todos', 'https://api.example.com/v1/'],
    ['/api/proxy/todos/', 'https://api.example.com/v1/'],
    ['/api/proxy/todos/a/b/', 'https://api.example.com/v1/a/b/'],
    ['/api/proxy/todos/caf%C3%A9', 'https://api.example.com/v1/caf%C3%A9'],
  ])('maps %s', (raw, expected) => {
    expect(resolveUpstream(raw, apis).url.href).toBe(expected);
  });

  it.each([
    '/api/proxy/todos/../admin',
    '/api/proxy/todos/%2e%2e/admin',
    '/api/proxy/todos/%2E%2E/admin',
    '/api/proxy/todos/.%2e/admin',
    '/api/proxy/todos/a/%2e%2e%2f%2e%2e/admin',
    '/api/proxy/todos/%252e%252e/admin',
    '/api/proxy/todos/a%2fb',
    '/api/proxy/todos/a%5cb',
    '/api/proxy/todos/a\\b',
    '/api/proxy/todos//evil.example/x',
    '/api/proxy/todos/http:%2f%2fevil.example',
    '/api/proxy/todos/https:',
    '/api/proxy/todos/user@evil.example',
    '/api/proxy/todos/a%40b',
    '/api/proxy/todos/a%00b',
    '/api/proxy/todos/a%0d%0aHost:%20evil',
    '/api/proxy/todos/%E0%A4%A',
    '/api/proxy/todos/./x',
    '/api/proxy/todos/x?a=1#frag',
    // Tomcat and Spring drop `;params` before resolving dot segments.
    '/api/proxy/todos/..;/admin',
    '/api/proxy/todos/a/..;jsessionid=1/..;/admin',
    '/api/proxy/todos/.;/x',
    '/api/proxy/todos/%2e%2e;/admin',
    '/api/proxy/todos/..%3b/admin',
    '/api/proxy/todos/%2E.%3Bx/admin',
    '/api/proxy/todos/..%253b/admin',
  ])('refuses %s with invalid_path', (raw) => {
    expect(() => resolveUpstream(raw, apis)).toThrow(expect.objectContaining({ code: 'invalid_path', status: 400 }));
  });

  it('refuses what an upstream that normalises Unicode (NFKC) or trims dots and spaces would take for a dot segment or a separator', () => {
    // Dots as other scripts write them, escaped as a browser would send them.
    const dot = fc.constantFrom('.', '%2e', '%2E', '%EF%BC%8E', '%E2%80%A4', '%EF%B9%92');
    // Spaces a Windows-style server trims, and characters nothing displays (zero-width space, soft hyphen, word joiner).
    const trimmed = fc.constantFrom('%20', '%C2%A0', '%E3%80%80', '%E2%80%8B', '%C2%AD', '%E2%81%A0');
    const segment = fc
      .tuple(fc.array(trimmed, { maxLength: 2 }), fc.array(fc.oneof(dot, fc.constant('%E2%80%A5')), { minLength: 1, maxLength: 4 }), fc.array(fc.oneof(dot, trimmed), { maxLength: 3 }), fc.constantFrom('', ';', ';x', '%3b', '%EF%BC%9Bx'))
      .map(([before, dots, after, params]) => before.join('') + dots.join('') + after.join('') + params);
    fc.assert(
      fc.property(fc.array(fc.constantFrom('a', 'b1'), { maxLength: 2 }), segment, (head, dots) => {
        expect(() => resolveUpstream(`/api/proxy/todos/${[...head, dots, 'admin'].join('/')}`, apis)).toThrow(expect.objectContaining({ code: 'invalid_path' }));
      }),
      { numRuns: 2_000, examples: [[[], '%EF%BC%8E%EF%BC%8E'], [['a'], '..%20'], [[], '...'], [[], '%E2%80%A5'], [[], '..%E2%80%8B']] },
    );
    for (const separator of ['%EF%BC%8F', '%EF%BC%BC', '%EF%BC%A0', '%EF%BC%852e']) {
      expect(() => resolveUpstream(`/api/proxy/todos/a${separator}b/x`, apis), separator).toThrow(expect.objectContaining({ code: 'invalid_path' }));
    }
    // Linear in a segment's length: a long run of dots before something else is answered at once.
    expect(resolveUpstream(`/api/proxy/todos/${'.'.repeat(50_000)}a`, apis).url.pathname.length).toBeGreaterThan(50_000);
  });

  it('answers unknown APIs with 404, including inherited property names', () => {
    for (const raw of ['/api/proxy/nope/x', '/api/proxy/__proto__/x', '/api/proxy/constructor/x']) {
      expect(() => resolveUpstream(raw, apis)).toThrow(expect.objectContaining({ code: 'unknown_api', status: 404 }));
    }
  });

  it('keeps every accepted path under the configured origin and base path', () => {
    for (const raw of ['/api/proxy/todos/evil.example', '/api/proxy/todos/x/a:b', '/api/proxy/todos/%3Fq', '/api/proxy/todos/..a', '/api/proxy/todos/~x', '/api/proxy/todos/a;v=1', '/api/proxy/todos/a.b.', '/api/proxy/todos/;x', '/api/proxy/todos/%EF%BC%8Ea']) {
      const { url } = resolveUpstream(raw, apis);
      expect(url.origin).toBe('https://api.example.com');
      expect(url.pathname.startsWith('/v1/')).toBe(true);
    }
  });
});

describe('header hygiene', () => {
  it('drops credentials, hop-by-hop headers and whatever Connection names on the way up', () => {
    const kept = filterRequestHeaders(
      [
        ['Cookie', 'gatehouse=sealed'],
        ['Authorization', 'Bearer stolen'],
        ['X-CSRF', '1'],
        ['Connection', 'close, X-Secret-Hop'],
        ['X-Secret-Hop', 'v'],
        ['Keep-Alive', 'timeout=5'],
        ['TE', 'trailers'],
        ['Trailer', 'X-T'],
        ['Transfer-Encoding', 'chunked'],
        ['Upgrade', 'websocket'],
        ['Proxy-Authorization', 'Basic x'],
        ['Host', 'evil.example'],
        ['X-Forwarded-For', '6.6.6.6'],
        ['Accept', 'application/json'],
        ['Range', 'bytes=0-10'],
        ['If-None-Match', '"abc"'],
        ['Content-Type', 'application/json'],
      ],
      'close, X-Secret-Hop',
    );
    expect(kept).toEqual([
      ['accept', 'application/json'],
      ['range', 'bytes=0-10'],
      ['if-none-match', '"abc"'],
      ['content-type', 'application/json'],
    ]);
  });

  it('drops Set-Cookie, Gatehouse’s own signals, origin-wide state and hop-by-hop headers on the way down, keeps end-to-end ones', async () => {
    const kept = await filterResponseHeaders([
      'Set-Cookie', 'upstream=1',
      'X-Gatehouse-Error', 'session_expired',
      'X-Request-Id', 'forged',
      'Clear-Site-Data', '"cookies"',
      'Strict-Transport-Security', 'max-age=0',
      'Alt-Svc', 'h2="evil.example:443"',
      'NEL', '{}',
      'X-Accel-Redirect', '/internal',
      'Connection', 'X-Second-Hop',
      'X-Second-Hop', 'v',
      'X-Accel-Buffering', 'no',
      'Connection', 'keep-alive, X-Hop',
      'X-Hop', 'v',
      'Keep-Alive', 'timeout=5',
      'Proxy-Authenticate', 'Basic',
      'Upgrade', 'h2c',
      'Trailer', 'X-T',
      'Transfer-Encoding', 'chunked',
      'Content-Type', 'application/json',
      'ETag', '"v1"',
      'Cache-Control', 'max-age=60',
      'Location', '/next',
      'X-Upstream', 'yes',
      'X-Upstream', 'twice',
    ]);
    expect(kept).toEqual([
      ['x-accel-buffering', 'no'],
      ['content-type', 'application/json'],
      ['etag', '"v1"'],
      ['cache-control', 'max-age=60'],
      ['location', '/next'],
      ['x-upstream', 'yes'],
      ['x-upstream', 'twice'],
    ]);
  });
});

describe('forwardedForChain', () => {
  it.each([
    // [inbound X-Forwarded-For, socket peer, TRUSTED_PROXY_HOPS, sent upstream]
    ['203.0.113.7', '10.0.0.2', 0, '10.0.0.2'],
    [undefined, '10.0.0.2', 0, '10.0.0.2'],
    ['203.0.113.7', undefined, 0, undefined],
    ['6.6.6.6, 203.0.113.7', '10.0.0.2', 1, '203.0.113.7, 10.0.0.2'],
    ['6.6.6.6,203.0.113.7 , 198.51.100.1', '10.0.0.2', 2, '203.0.113.7, 198.51.100.1, 10.0.0.2'],
    ['203.0.113.7', '10.0.0.2', 3, '203.0.113.7, 10.0.0.2'],
    ['203.0.113.7', undefined, 1, '203.0.113.7'],
    [' , ', undefined, 2, undefined],
  ] as const)('%s from %s with %i trusted hops → %s', (inbound, peer, hops, expected) => {
    expect(forwardedForChain(inbound, peer, hops)).toBe(expected);
  });
});

describe('clientAddress: whose count a call without a session takes', () => {
  it.each([
    // [inbound X-Forwarded-For, socket peer, TRUSTED_PROXY_HOPS, the caller]
    ['203.0.113.7', '10.0.0.2', 0, '10.0.0.2'],
    [undefined, undefined, 0, 'unknown'],
    ['6.6.6.6, 203.0.113.7', '10.0.0.2', 1, '203.0.113.7'],
    ['6.6.6.6,203.0.113.7 , 198.51.100.1', '10.0.0.2', 2, '203.0.113.7'],
    // A chain shorter than the hops trusted: the nearest address there is.
    ['203.0.113.7', '10.0.0.2', 3, '10.0.0.2'],
    [undefined, undefined, 1, 'unknown'],
    // One spelling per client: no port, IPv4 unmapped, IPv6 by its /64 (which one client holds whole).
    ['203.0.113.7:51234', undefined, 1, '203.0.113.7'],
    [undefined, '::ffff:10.0.0.2', 0, '10.0.0.2'],
    ['[2001:DB8:0:1::7]:443', undefined, 1, '2001:db8:0:1::/64'],
    [undefined, '2001:db8:0:1:aaaa:bbbb:cccc:dddd', 0, '2001:db8:0:1::/64'],
    [undefined, '2001:db8::1', 0, '2001:db8:0:0::/64'],
    [undefined, '::1', 0, '0:0:0:0::/64'],
  ] as const)('%s from %s with %i trusted hops → %s', (inbound, peer, hops, expected) => {
    expect(clientAddress(inbound, peer, hops)).toBe(expected);
  });
});

describe('browserLocation: where an API may send the browser', () => {
  const APP = 'https://app.example';
  const todos = apis.todos;
  const upstreamUrl = new URL('https://api.example.com/v1/items/7?x=1');
  const location = (value: string) => browserLocation(value, todos, upstreamUrl, APP);

  it.each([
    ['/v1/items/8', '/api/proxy/todos/items/8'],
    ['8?y=2#top', '/api/proxy/todos/items/8?y=2#top'],
    ['https://api.example.com/v1', '/api/proxy/todos/'],
    ['https://api.example.com/v1/a/../b', '/api/proxy/todos/b'],
    [`${APP}/api/proxy/todos/items/9`, '/api/proxy/todos/items/9'],
    ['https://files.example/f?sig=1', 'https://files.example/f?sig=1'],
    ['//files.example/f', 'https://files.example/f'],
  ])('%s → %s', (value, expected) => {
    expect(location(value)).toBe(expected);
  });

  it.each([
    `${APP}/api/auth/sessions`,
    `${APP}/api/auth/logout`,
    `${APP}/api/proxy/other/x`,
    `${APP}/api/proxy/todos`,
    `${APP}/`,
    '/v2/items',
    '/admin',
    '../../admin',
    'https://api.example.com/v10/x',
    'javascript:alert(1)',
    'data:text/html,x',
    'http://[',
  ])('%s is dropped', (value) => {
    expect(location(value)).toBeUndefined();
  });

  it('redirectResendsBody: the redirects a browser follows with the call’s body (Fetch: 307 and 308 always, 301 and 302 except after POST, never 303 nor GET or HEAD)', () => {
    const methods = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'];
    const resending = methods.flatMap((method) => [301, 302, 303, 307, 308].filter((status) => redirectResendsBody(status, method)).map((status) => `${method} ${status}`));
    expect(resending).toEqual(['POST 307', 'POST 308', 'PUT 301', 'PUT 302', 'PUT 307', 'PUT 308', 'PATCH 301', 'PATCH 302', 'PATCH 307', 'PATCH 308', 'DELETE 301', 'DELETE 302', 'DELETE 307', 'DELETE 308']);
  });

  it('sends no call body to another site: a redirect that resends it keeps its Location only when it stays on the app', () => {
    const resent = (value: string) => browserLocation(value, todos, upstreamUrl, APP, true);
    for (const value of ['https://files.example/f?sig=1', '//files.example/f', 'https://evil.example/collect', 'http://api.example.com.evil.example/x']) expect(resent(value), value).toBeUndefined();
    expect(resent('/v1/items/8')).toBe('/api/proxy/todos/items/8');
    expect(resent(`${APP}/api/proxy/todos/items/9`)).toBe('/api/proxy/todos/items/9');
  });

  // Pieces of hostile Locations: schemes, authorities (the app's, the API's, a stranger's), dot
  // segments and separators in every encoding, userinfo, whitespace.
  const PIECES = ['/', '//', '\\', '.', '..', '%2e', '%2E%2e', '%2f', '%5c', '@', ':', '?', '#', '%00', '\t', '\n', ' ', 'api', 'auth', 'proxy', 'todos', 'other', 'v1', 'v2', 'sessions', 'app.example', 'api.example.com', 'evil.example', '%40', '%252e', '\uff0f', '\u3002'];
  const HEADS = ['', '/', '//', '\\\\', 'https:', 'https://', 'http://', `${APP}/`, `${APP}/api/proxy/todos/`, 'https://api.example.com/v1/', 'https://api.example.com/', 'https://user:pw@app.example/', 'HTTPS://APP.EXAMPLE/', 'javascript:', ' /'];
  const hostileLocation = fc.tuple(fc.constantFrom(...HEADS), fc.array(fc.constantFrom(...PIECES), { maxLength: 10 })).map(([head, rest]) => head + rest.join(''));

  it('never aims the browser at the app outside this API, and whatever it keeps on the app maps back inside the API (generated)', () => {
    const request = new URL('/api/proxy/todos/items/7?x=1', APP);
    fc.assert(
      fc.property(hostileLocation, (value) => {
        const kept = location(value);
        if (kept === undefined) return;
        // What the browser does with it: resolve it against the URL of the call it made.
        const followed = new URL(kept, request);
        expect(followed.origin).not.toBe(new URL(todos.url).origin);
        if (followed.origin !== APP) return;
        expect(followed.pathname.startsWith('/api/proxy/todos/')).toBe(true);
        // Followed, it comes back to the proxy: refused there, or an address inside the API's base.
        let upstream: URL | undefined;
        try {
          upstream = resolveUpstream(followed.pathname + followed.search, apis).url;
        } catch {
          return;
        }
        expect(upstream.origin).toBe('https://api.example.com');
        expect(upstream.pathname.startsWith('/v1/')).toBe(true);
      }),
      { numRuns: 3000 },
    );
  });

  it('a target inside the API comes back to the same upstream address through the proxy (generated)', () => {
    const segment = fc.stringMatching(/^[A-Za-z0-9_~-]{1,8}$/);
    fc.assert(
      fc.property(fc.array(segment, { maxLength: 5 }), fc.stringMatching(/^[a-z0-9=&]{0,12}$/), (segments, query) => {
        const target = new URL(`https://api.example.com/v1/${segments.join('/')}${query ? `?${query}` : ''}`);
        const kept = location(target.href);
        expect(kept).toBe(`/api/proxy/todos/${segments.join('/')}${query ? `?${query}` : ''}`);
        expect(resolveUpstream(kept as string, apis).url.href).toBe(target.href);
      }),
      { numRuns: 500 },
    );
  });
});

describe('keptToTheUser: an answer made with the user token stays that user’s', () => {
  const headersOf = (headers: Array<[string, string]>) => Object.fromEntries(keptToTheUser(headers).map(([name, value]) => [name, value]));
  it.each<[Array<[string, string]>, Record<string, string>]>([
    [[], { 'cache-control': 'private', vary: 'Cookie' }],
    [[['cache-control', 'max-age=300']], { 'cache-control': 'private, max-age=300', vary: 'Cookie' }],
    [[['cache-control', 'max-age=300'], ['vary', 'Accept']], { 'cache-control': 'private, max-age=300', vary: 'Cookie' }],
    [[['cache-control', 'private, max-age=60']], { 'cache-control': 'private, max-age=60', vary: 'Cookie' }],
    [[['cache-control', 'no-cache'], ['vary', 'accept, COOKIE']], { 'cache-control': 'private, no-cache', vary: 'accept, COOKIE' }],
    [[['cache-control', 'max-age=300'], ['vary', '*']], { 'cache-control': 'private, max-age=300', vary: '*' }],
    // The API said others may have it (RFC 9111 §3.5): unchanged.
    [[['cache-control', 'public, max-age=60']], { 'cache-control': 'public, max-age=60' }],
    [[['cache-control', 'max-age=60, s-maxage=600'], ['cdn-cache-control', 'max-age=600']], { 'cache-control': 'max-age=60, s-maxage=600', 'cdn-cache-control': 'max-age=600' }],
    // ... but only per token: on the browser's side every user would match one user's copy.
    [[['cache-control', 'public, max-age=60'], ['vary', 'Authorization']], { 'cache-control': 'private, max-age=60', vary: 'Cookie' }],
    [[['cache-control', 's-maxage=60'], ['vary', 'Accept, DPoP']], { 'cache-control': 'private', vary: 'Cookie' }],
    // "Never serve stale" is no permission to share.
    [[['cache-control', 'max-age=0, must-revalidate']], { 'cache-control': 'private, max-age=0, must-revalidate', vary: 'Cookie' }],
    [[['cache-control', 'no-store']], { 'cache-control': 'no-store' }],
    // What a CDN would obey instead of Cache-Control goes.
    [[['cdn-cache-control', 'max-age=300'], ['surrogate-control', 'max-age=300'], ['x-accel-expires', '300'], ['cloudflare-cdn-cache-control', 'max-age=1'], ['edge-control', 'cache-maxage=1h']], { 'cache-control': 'private', vary: 'Cookie' }],
    [[['vercel-cdn-cache-control', 'max-age=3600'], ['netlify-cdn-cache-control', 'public, durable, s-maxage=60'], ['vary', '*']], { 'cache-control': 'private', vary: '*' }],
    [[['cache-control', 'no-store'], ['cdn-cache-control', 'max-age=300']], { 'cache-control': 'no-store' }],
    // Look-alikes and quoted text are not directives; a qualified private keeps only some fields private.
    [[['cache-control', 'max-age=5, x-public-ish, public-x']], { 'cache-control': 'private, max-age=5, x-public-ish, public-x', vary: 'Cookie' }],
    [[['cache-control', 'no-cache="x, public", max-age=5']], { 'cache-control': 'private, no-cache="x, public", max-age=5', vary: 'Cookie' }],
    [[['cache-control', 'private="Set-Cookie", max-age=5']], { 'cache-control': 'private, private="Set-Cookie", max-age=5', vary: 'Cookie' }],
    [[['cache-control', 'no-cache="a, no-store, \\"b"']], { 'cache-control': 'private, no-cache="a, no-store, \\"b"', vary: 'Cookie' }],
  ])('%j → %j', (headers, expected) => {
    expect(headersOf(headers)).toEqual(expected);
  });

  it('is not stored when the API names its cache rules in Connection (a proxy drops those, and what is left could say "share it")', async () => {
    const anyCase = (text: string) => fc.array(fc.boolean(), { minLength: text.length, maxLength: text.length }).map((upper) => [...text].map((c, i) => (upper[i] ? c.toUpperCase() : c)).join(''));
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom('public, max-age=60', 's-maxage=600', 'max-age=60, s-maxage=10', 'public', 'no-store'),
        fc.constantFrom('Authorization', 'Accept, Authorization', 'DPoP'),
        fc.subarray(['keep-alive', 'x-other', 'close'], { minLength: 0 }),
        fc.oneof(anyCase('vary'), anyCase('cache-control')),
        async (cacheControl, vary, others, listed) => {
          const raw = ['Cache-Control', cacheControl, 'Vary', vary, 'Connection', [...others, listed].join(', '), 'Content-Type', 'application/json'];
          const filtered = await filterResponseHeaders(raw);
          const sent = Object.fromEntries(keptToTheUser(filtered));
          expect(sent['cache-control'], JSON.stringify(raw)).toBe('no-store');
          expect(sent.vary).toBeUndefined();
          // Without the user's token too: no rules left would let caches guess (a Last-Modified).
          expect(Object.fromEntries(filtered.map(([name, value]) => [name, value]))['cache-control']).toBe('no-store');
        },
      ),
      { numRuns: 200 },
    );
  });

  it('keeps every other header and its order; several Cache-Control fields are one list', () => {
    expect(keptToTheUser([['content-type', 'application/json'], ['cache-control', 'max-age=1'], ['etag', '"a"']])).toEqual([
      ['content-type', 'application/json'],
      ['etag', '"a"'],
      ['cache-control', 'private, max-age=1'],
      ['vary', 'Cookie'],
    ]);
    expect(keptToTheUser([['cache-control', 'max-age=1'], ['etag', '"a"'], ['cache-control', 'no-transform']])).toEqual([
      ['etag', '"a"'],
      ['cache-control', 'private, max-age=1, no-transform'],
      ['vary', 'Cookie'],
    ]);
    expect(keptToTheUser([['cache-control', 'max-age=1'], ['cache-control', 'public']])).toEqual([
      ['cache-control', 'max-age=1'],
      ['cache-control', 'public'],
    ]);
  });
});

describe('OpenCalls', () => {
  it("caps a user's open calls, gives a slot back once per call, and counts users apart", () => {
    const calls = new OpenCalls();
    const held = [calls.hold('alice', 2), calls.hold('alice', 2)];
    expect(() => calls.hold('alice', 2)).toThrow(expect.objectContaining({ code: 'too_many_calls', status: 429 }) as GatehouseError);
    const bob = calls.hold('bob', 2);
    held[0]!();
    held[0]!(); // a second release of the same call frees nothing more
    calls.hold('alice', 2);
    expect(() => calls.hold('alice', 2)).toThrow(GatehouseError);
    bob();
    expect(calls.users).toBe(2);
  });

  it('clears users with no open call once the map reaches its sweep size, and keeps the others', () => {
    const calls = new OpenCalls(3);
    calls.hold('a', 1)();
    const stillOpen = calls.hold('b', 1);
    calls.hold('c', 1)();
    expect(calls.users).toBe(3);
    calls.hold('d', 1);
    expect(calls.users).toBe(2); // b (open) and d
    expect(() => calls.hold('b', 1)).toThrow(GatehouseError);
    stillOpen();
    calls.hold('b', 1);
  });

  it('sweeps again only once the map has doubled, so users who all hold calls do not cost a sweep each', () => {
    const calls = new OpenCalls(4);
    const releaseA = calls.hold('a', 1);
    for (const sub of ['b', 'c', 'd', 'e']) calls.hold(sub, 1); // e: a sweep that frees nothing; the next waits for 8
    releaseA();
    for (const sub of ['f', 'g', 'h']) calls.hold(sub, 1);
    expect(calls.users).toBe(8); // a's zero is still there: no sweep below 8
    calls.hold('i', 1);
    expect(calls.users).toBe(8); // the sweep at 8 cleared a, then i came in
  });

  it("one user's calls in sequence promote nothing out of the young generation (no full collections)", () => {
    // In a process of its own, with npm start's young-generation size and `gc` to settle the heap.
    const script = `
      import v8 from 'node:v8';
      import { PerformanceObserver, constants } from 'node:perf_hooks';
      import { OpenCalls } from ${JSON.stringify(path.resolve('lib/proxy.ts'))};
      const calls = new OpenCalls();
      calls.hold('warm-up', 32)();
      globalThis.gc(); globalThis.gc(); // the map and its table now live in the old generation, as a server's do
      let full = 0;
      new PerformanceObserver((list) => { for (const entry of list.getEntries()) if (entry.detail.kind === constants.NODE_PERFORMANCE_GC_MAJOR) full++; }).observe({ entryTypes: ['gc'] });
      const oldSpace = () => v8.getHeapSpaceStatistics().find((space) => space.space_name === 'old_space').space_used_size;
      const before = oldSpace();
      let kept = 0;
      for (let round = 0; round < 200; round++) {
        for (let i = 0; i < 5000; i++) {
          const release = calls.hold('user', 32);
          kept += [i, { i }].length; // what a call allocates besides, so that scavenges run
          release();
        }
        await new Promise((resolve) => setImmediate(resolve));
      }
      globalThis.gc({ type: 'minor' }); globalThis.gc({ type: 'minor' });
      await new Promise((resolve) => setTimeout(resolve, 20));
      console.log(JSON.stringify({ grownBytes: oldSpace() - before, full, kept }));
    `;
    const output = execFileSync(process.execPath, ['--expose-gc', '--min-semi-space-size=16', '--max-semi-space-size=16', '--input-type=module', '-e', script], { encoding: 'utf8', timeout: 60_000 });
    const { grownBytes, full } = JSON.parse(output) as { grownBytes: number; full: number };
    expect(full, 'full collections during a million calls').toBe(0);
    expect(grownBytes, 'old generation growth').toBeLessThan(1 << 20);
  });
});
