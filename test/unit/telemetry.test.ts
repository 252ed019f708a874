import { EventEmitter } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import fc from 'fast-check';
import type { ReadableSpan } from '@opentelemetry/sdk-trace';
import { describe, expect, it, vi } from 'vitest';
import { mergeExpositions, withoutSecrets } from '../../lib/telemetry-sdk.ts';

describe('mergeExpositions', () => {
  const worker = (requests: number, seconds: number) => `# HELP target_info Target metadata
# TYPE target_info gauge
target_info{service_name="gatehouse"} 1
# HELP gatehouse_proxy_requests_total Proxied requests
# TYPE gatehouse_proxy_requests_total counter
gatehouse_proxy_requests_total{gatehouse_api="demo",http_response_status_class="2xx"} ${requests}
# HELP gatehouse_store_duration Store calls
# UNIT gatehouse_store_duration s
# TYPE gatehouse_store_duration histogram
gatehouse_store_duration_count{gatehouse_store_operation="get"} 2
gatehouse_store_duration_sum{gatehouse_store_operation="get"} ${seconds}
gatehouse_store_duration_bucket{gatehouse_store_operation="get",le="0.1"} 1
gatehouse_store_duration_bucket{gatehouse_store_operation="get",le="+Inf"} 2
`;

  it('sums counters and histograms per label set, keeps gauges, one HELP and TYPE per family', () => {
    const merged = mergeExpositions([worker(3, 0.25), worker(4, 0.5), '']);
    expect(merged).toBe(`# HELP target_info Target metadata
# TYPE target_info gauge
target_info{service_name="gatehouse"} 1
# HELP gatehouse_proxy_requests_total Proxied requests
# TYPE gatehouse_proxy_requests_total counter
gatehouse_proxy_requests_total{gatehouse_api="demo",http_response_status_class="2xx"} 7
# HELP gatehouse_store_duration Store calls
# UNIT gatehouse_store_duration s
# TYPE gatehouse_store_duration histogram
gatehouse_store_duration_count{gatehouse_store_operation="get"} 4
gatehouse_store_duration_sum{gatehouse_store_operation="get"} 0.75
gatehouse_store_duration_bucket{gatehouse_store_operation="get",le="0.1"} 2
gatehouse_store_duration_bucket{gatehouse_store_operation="get",le="+Inf"} 4
`);
  });

  it('keeps series only one worker has, under their family', () => {
    const other = `# HELP gatehouse_proxy_requests_total Proxied requests
# TYPE gatehouse_proxy_requests_total counter
gatehouse_proxy_requests_total{gatehouse_api="open",http_response_status_class="5xx"} 1
`;
    const merged = mergeExpositions([worker(1, 0.1), other]).split('\n');
    const family = merged.indexOf('# TYPE gatehouse_proxy_requests_total counter');
    expect(merged.slice(family + 1, family + 3)).toEqual([
      'gatehouse_proxy_requests_total{gatehouse_api="demo",http_response_status_class="2xx"} 1',
      'gatehouse_proxy_requests_total{gatehouse_api="open",http_response_status_class="5xx"} 1',
    ]);
  });
});

describe('withoutSecrets', () => {
  const span = (name: string, attributes: Record<string, unknown>) => ({ name, attributes, spanContext: () => ({ traceId: 't', spanId: 's', traceFlags: 1 }) }) as unknown as ReadableSpan;

  it("cuts the query from Next's URL attributes and span names, and keeps the span's methods", () => {
    const cleaned = withoutSecrets(span('fetch GET https://idp/x?code=abc', { 'http.target': '/api/auth/callback?code=abc&state=def', 'url.query': 'code=abc', 'http.method': 'GET', 'next.span_name': 'fetch GET https://idp/x?code=abc' }));
    expect(cleaned.name).toBe('fetch GET https://idp/x');
    expect(cleaned.attributes).toEqual({ 'http.target': '/api/auth/callback', 'http.method': 'GET', 'next.span_name': 'fetch GET https://idp/x' });
    expect(cleaned.spanContext().spanId).toBe('s');
  });

  it("cuts what follows an API's name and a session's handle from Next's URLs, whatever they hold", () => {
    const segment = fc.stringMatching(/^[A-Za-z0-9._~%!$&'()*+,;=:@-]{1,40}$/);
    fc.assert(
      fc.property(segment, fc.array(segment, { minLength: 1, maxLength: 4 }), segment, (api, rest, handle) => {
        const path = rest.join('/');
        const cleaned = withoutSecrets(span(`GET /api/proxy/${api}/${path}`, { 'http.target': `/api/proxy/${api}/${path}?q=1`, 'http.url': `http://app/api/auth/sessions/${handle}` }));
        expect(cleaned.name).toBe(`GET /api/proxy/${api}/{path}`);
        expect(cleaned.attributes).toEqual({ 'http.target': `/api/proxy/${api}/{path}`, 'http.url': 'http://app/api/auth/sessions/{handle}' });
      }),
    );
  });

  it('cuts queries, private paths, tokens, token responses, form bodies and cookies from every string a span exports, whatever text holds them', () => {
    const secret = fc.stringMatching(/^[A-Za-z0-9_-]{12,40}$/);
    const word = fc.stringMatching(/^[A-Za-z0-9 .:,()'"-]{0,20}$/);
    // How an error's text may quote a secret: in a URL's query, in a proxied path, as a JWT, after a scheme.
    const forms = {
      query: (v: string) => `https://idp.example/token?code=${v}&state=x`,
      encodedQuery: (v: string) => `https://app/api/auth/callback%3Fcode%3D${v}%26state%3Dx`,
      fragment: (v: string) => `https://app/cb#code=${v}`,
      path: (v: string) => `/api/proxy/demo/users/${v}`,
      backslashPath: (v: string) => `\\api\\proxy\\demo\\${v}`,
      session: (v: string) => `http://app/api/auth/sessions/${v}`,
      encodedSession: (v: string) => `/api/auth/sessions%2F${v}`,
      jwt: (v: string) => `eyJhbGciOiJSUzI1NiJ9.${v}.${v.slice(3)}`,
      bearer: (v: string) => `Authorization: Bearer ${v}`,
      bearerColon: (v: string) => `Bearer:${v}`,
      bearerEncoded: (v: string) => `authorization=Bearer%20${v}`,
      basic: (v: string) => `Authorization: Basic ${v}`,
      dpop: (v: string) => `dpop ${v}`,
      formBody: (v: string) => `grant_type=refresh_token&refresh_token=${v}&client_id=gatehouse`,
      tokenResponse: (v: string) => `{"access_token":"${v}","token_type":"Bearer","expires_in":300}`,
      idTokenField: (v: string) => `{ "id_token" : "${v}" }`,
      cookie: (v: string) => `Cookie: __Host-gatehouse=${v}; theme=dark`,
      setCookie: (v: string) => `set-cookie: gatehouse=${v}; Path=/; HttpOnly`,
      clientSecret: (v: string) => `client_secret=${v}`,
      // Quoted without a header name: Gatehouse's cookies by name, and any iron seal.
      bareSessionCookie: (v: string) => `failed: __Host-gatehouse=Fe26.2**${v}*x~2`,
      signOutHandle: (v: string) => `gatehouse-signout=${v}`,
      transactionCookie: (v: string) => `gatehouse-tx-abc=${v}`,
      seal: (v: string) => `could not unseal Fe26.2*1*${v}*abc*def`,
      inspected: (v: string) => `{ access_token: '${v}', expires_in: 300 }`,
      inspectedQuotedKey: (v: string) => `{ 'x-access-token': '${v}' }`,
    };
    const quoted = fc.tuple(fc.constantFrom(...(Object.keys(forms) as Array<keyof typeof forms>)), secret).map(([how, value]) => ({ text: forms[how](value), value }));
    fc.assert(
      fc.property(word, quoted, word, fc.boolean(), (before, { text, value }, after, asStatus) => {
        const message = `${before}${text}${after}`;
        const base = span('GET /api/proxy/{api}', { 'gatehouse.api': 'demo', 'some.attribute': message });
        const withError = Object.assign(base, {
          events: [{ name: 'exception', time: [0, 0], attributes: { 'exception.type': 'TypeError', 'exception.message': message, 'exception.stacktrace': `TypeError: ${message}\n    at x (file.js:1:1)` } }],
          links: [{ context: { traceId: 't', spanId: 'l', traceFlags: 1 }, attributes: { note: message } }],
          status: { code: 2, message: asStatus ? message : undefined },
        });
        const cleaned = withoutSecrets(withError);
        const exported = JSON.stringify({ name: cleaned.name, attributes: cleaned.attributes, events: cleaned.events, links: cleaned.links, status: cleaned.status });
        expect(exported).not.toContain(value);
        expect(cleaned.events[0]!.attributes!['exception.type']).toBe('TypeError');
        expect(cleaned.spanContext().spanId).toBe('s');
      }),
    );
  });

  it('keeps the text of an exception that quotes nothing private', () => {
    const base = span('fetch GET https://idp.example/jwks', {});
    const cleaned = withoutSecrets(Object.assign(base, { events: [{ name: 'exception', time: [0, 0], attributes: { 'exception.message': 'fetch failed: connect ECONNREFUSED 127.0.0.1:9' } }], status: { code: 2, message: 'fetch failed' } }));
    expect(cleaned.events[0]!.attributes).toEqual({ 'exception.message': 'fetch failed: connect ECONNREFUSED 127.0.0.1:9' });
    expect(cleaned.status.message).toBe('fetch failed');
  });

  it('passes clean spans through untouched', () => {
    const clean = span('auth.login', { 'gatehouse.outcome': 'ok' });
    expect(withoutSecrets(clean)).toBe(clean);
  });
});

/**
 * The primary's merged scrape against workers that answer as told: the cluster module is a stand-in
 * here (a worker whose metrics collection fails cannot be made on demand from outside).
 */
describe('serveClusterMetrics', () => {
  async function scrapeWith(answers: Array<string | undefined>): Promise<{ status: number; text: string }> {
    const port = await new Promise<number>((resolve) => {
      const probe = createServer().listen(0, '127.0.0.1', () => {
        const { port: free } = probe.address() as AddressInfo;
        probe.close(() => resolve(free));
      });
    });
    vi.resetModules();
    vi.unstubAllEnvs();
    delete (globalThis as Record<symbol, unknown>)[Symbol.for('gatehouse.shared-state')];
    for (const [name, value] of Object.entries({ APP_BASE_URL: 'http://localhost:3999', OIDC_ISSUER: 'http://127.0.0.1:1', OIDC_CLIENT_ID: 'gatehouse', OIDC_CLIENT_SECRET: 'secret', SESSION_SECRET: 'SeVhSpfHPcUhUQMEn0p0f7250URUfvrjNYvEPXY-', BFF_APIS: '{"demo":{"url":"https://api.example.com"}}', SESSION_STORE: 'memory', LOG_LEVEL: 'silent', METRICS_PORT: String(port) })) {
      vi.stubEnv(name, value);
    }
    const primary = new EventEmitter();
    const workers = Object.fromEntries(
      answers.map((text, index) => [
        index + 1,
        {
          isConnected: () => true,
          send: (request: { id: number }) => setImmediate(() => primary.emit('message', {}, { type: 'gatehouse:metrics', id: request.id, ...(text === undefined ? {} : { text }) })),
        },
      ]),
    );
    vi.doMock('node:cluster', () => ({ default: { workers, on: primary.on.bind(primary) } }));
    try {
      const { serveClusterMetrics } = await import('../../lib/telemetry-sdk.ts');
      await serveClusterMetrics();
      const answer = await fetch(`http://127.0.0.1:${port}/metrics`);
      return { status: answer.status, text: await answer.text() };
    } finally {
      vi.doUnmock('node:cluster');
    }
  }

  const counter = (value: number) => `# HELP calls_total Calls\n# TYPE calls_total counter\ncalls_total ${value}\n`;

  it('sums every worker’s counters', async () => {
    expect(await scrapeWith([counter(2), counter(3)])).toEqual({ status: 200, text: expect.stringContaining('calls_total 5') });
  });

  it('fails the scrape (503) when a worker could not collect, rather than serve a sum without it (a reset to Prometheus)', async () => {
    expect(await scrapeWith([counter(2), undefined])).toEqual({ status: 503, text: 'Metrics unavailable\n' });
  });
});
