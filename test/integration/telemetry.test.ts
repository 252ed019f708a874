import { spawn } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT, defaultServerShape, freePort, startGatehouse, startStack, type Stack } from '../../e2e/support/stack.ts';
import { RedisProbe, call, login, processTree, waitFor } from '../support/http-client.ts';
import { storedSecrets } from '../support/stored-session.ts';
import { startOtlpCollector, type CollectedBody, type OtlpCollector } from '../support/otlp-collector.ts';

/**
 * OpenTelemetry end to end, on the server shape of the vitest project: a real Gatehouse exports its
 * spans and metrics over OTLP (http/json) to a little collector here and serves Prometheus text on
 * METRICS_PORT, after a scripted login, a proxied call that refreshes first, and a logout. Then every
 * attribute, label and the whole exposition are searched for the session's secrets.
 */

const SHAPE = defaultServerShape();
// npm start runs a worker per core: two here, so the Prometheus view must merge them.
const WORKERS = 2;
const USER = 'otel-user';
const BROWSER_TRACE_ID = 'b'.repeat(32);

interface OtlpAttribute {
  key: string;
  value: { stringValue?: string; intValue?: string | number; boolValue?: boolean; doubleValue?: number; arrayValue?: unknown };
}

interface OtlpSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  kind: number;
  attributes?: OtlpAttribute[];
}


interface TraceBody {
  resourceSpans?: Array<{ resource?: { attributes?: OtlpAttribute[] }; scopeSpans?: Array<{ spans?: OtlpSpan[] }> }>;
}

function spansIn(bodies: CollectedBody[]): OtlpSpan[] {
  return bodies
    .filter((entry) => entry.path === '/v1/traces')
    .flatMap((entry) => (entry.body as TraceBody).resourceSpans ?? [])
    .flatMap((resource) => resource.scopeSpans ?? [])
    .flatMap((scope) => scope.spans ?? []);
}

function attribute(span: OtlpSpan, key: string): unknown {
  const value = span.attributes?.find((entry) => entry.key === key)?.value;
  return value?.stringValue ?? (value?.intValue !== undefined ? Number(value.intValue) : value?.boolValue);
}

/** Every string anywhere in an OTLP body (attribute keys and values, names, resource): what a secret could hide in. */
function stringsIn(value: unknown, found: string[] = []): string[] {
  if (typeof value === 'string') found.push(value);
  else if (Array.isArray(value)) for (const item of value) stringsIn(item, found);
  else if (value && typeof value === 'object') for (const item of Object.values(value)) stringsIn(item, found);
  return found;
}

/** The value of one sample of the exposition, by metric name and the labels it must carry. */
function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (Object.entries(labels).every(([key, value]) => line.includes(`${key}="${value}"`))) return Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return undefined;
}

let stack: Stack;
let app: string;
let collector: OtlpCollector;
let metricsPort: number;
let probe: RedisProbe;

beforeAll(async () => {
  collector = await startOtlpCollector();
  metricsPort = await freePort();
  stack = await startStack({
    workers: WORKERS,
    // Always due (60 s tokens, refreshed 120 s early): the call to `demo` refreshes; `open` needs no token.
    accessTokenTtl: 60,
    apis: ({ apiUrl }) => ({ demo: { url: apiUrl }, open: { url: `${apiUrl}/public`, auth: 'none' } }),
    env: {
      TOKEN_REFRESH_SKEW: '120',
      METRICS_PORT: String(metricsPort),
      OTEL_EXPORTER_OTLP_ENDPOINT: collector.url,
      OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json',
      OTEL_BSP_SCHEDULE_DELAY: '100',
      OTEL_METRIC_EXPORT_INTERVAL: '300',
      OTEL_SERVICE_NAME: 'gatehouse-test',
    },
  });
  app = stack.apps[0]!.url;
  probe = new RedisProbe(stack.keyPrefix);
});

afterAll(async () => {
  await stack?.stop();
  collector?.close();
  await probe?.cleanup();
  await probe?.close();
});

describe(`telemetry (${SHAPE})`, () => {
  it('spans and metrics of a login, a refresh, proxied calls and a logout, and no secret in any of them', async () => {
    const cookie = await login(app, USER);
    const sessionKey = await probe.sessionKeyOf(USER);
    if (!sessionKey) throw new Error('no session stored');
    const before = await storedSecrets(stack.appEnv.REDIS_URL as string, sessionKey, stack.appEnv.SESSION_SECRET as string);
    const described = await call(app, '/api/auth/session', cookie);
    const { logoutUrl } = described.body as { logoutUrl: string };

    // A browser's own traceparent is not trusted: the trace starts at Gatehouse.
    const first = await fetch(`${app}/api/proxy/demo/whoami?private=1`, {
      headers: { cookie, 'x-csrf': '1', traceparent: `00-${BROWSER_TRACE_ID}-${'c'.repeat(16)}-01` },
    });
    expect(first.status).toBe(200);
    await first.text();
    const upstreamSaw = ((await (await fetch(`${stack.apiUrl}/__demo/last`)).json()) as { headers: Record<string, string> }).headers;
    // Six more at once, on as many connections, so both workers are likely to count some.
    const more = await Promise.all(Array.from({ length: 6 }, () => fetch(`${app}/api/proxy/open/status`, { headers: { 'x-csrf': '1', connection: 'close' } })));
    for (const answer of more) {
      expect(answer.status).toBe(200);
      await answer.text();
    }
    const after = await storedSecrets(stack.appEnv.REDIS_URL as string, sessionKey, stack.appEnv.SESSION_SECRET as string);
    expect(after.accessToken).not.toBe(before.accessToken);
    // Live sessions, read from the store's index: this run's one session, the same from every worker.
    const activeSessions = async () => sample(await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text(), 'gatehouse_sessions_active', {});
    expect(await activeSessions()).toBe(1);
    expect((await fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie, 'x-csrf': '1' } })).status).toBe(200);
    expect(await activeSessions()).toBe(0);

    // --- spans ---
    const spans = await waitFor(
      'every span to be exported',
      () => {
        const all = spansIn(collector.bodies);
        const names = new Set(all.map((span) => span.name));
        const proxied = all.filter((span) => span.name === 'GET /api/proxy/{api}').length;
        return proxied >= 7 && ['auth.login', 'auth.callback', 'token.refresh', 'token.refresh.lock_wait', 'GET'].every((name) => names.has(name)) ? all : undefined;
      },
      15_000,
    );
    const byId = new Map(spans.map((span) => [span.spanId, span]));
    const one = (name: string) => {
      const found = spans.filter((span) => span.name === name);
      expect(found, name).toHaveLength(1);
      return found[0]!;
    };
    const refresh = one('token.refresh');
    const lockWait = one('token.refresh.lock_wait');
    const server = byId.get(refresh.parentSpanId ?? '');
    expect(server?.name).toBe('GET /api/proxy/{api}');
    expect(server?.kind).toBe(2); // SERVER
    expect(attribute(server!, 'gatehouse.api')).toBe('demo');
    expect(attribute(server!, 'http.response.status_code')).toBe(200);
    expect(lockWait.parentSpanId).toBe(refresh.spanId);
    expect(attribute(lockWait, 'gatehouse.outcome')).toBe('acquired');
    // The lock's SET NX is a store span under the lock wait; the refreshed tokens' write-back one under the refresh.
    expect(spans.some((span) => span.name === 'store.set' && span.parentSpanId === lockWait.spanId)).toBe(true);
    expect(spans.some((span) => span.name === 'store.replaceIfHeld' && span.parentSpanId === refresh.spanId)).toBe(true);
    const client = spans.find((span) => span.name === 'GET' && span.parentSpanId === server!.spanId);
    expect(client?.kind).toBe(3); // CLIENT
    expect(attribute(client!, 'http.response.status_code')).toBe(200);
    // The upstream got our context, not the browser's.
    expect(upstreamSaw.traceparent).toBe(`00-${server!.traceId}-${client!.spanId}-01`);
    expect(server!.traceId).not.toBe(BROWSER_TRACE_ID);
    expect(spans.filter((span) => span.name === 'GET /api/proxy/{api}')).toHaveLength(7);
    expect(spans.filter((span) => span.name === 'GET /api/proxy/{api}' && attribute(span, 'gatehouse.api') === 'open')).toHaveLength(6);
    // The session is created in a store call inside the callback's span.
    const callback = one('auth.callback');
    expect(attribute(callback, 'gatehouse.outcome')).toBe('ok');
    expect(spans.some((span) => span.name === 'store.set' && span.parentSpanId === callback.spanId)).toBe(true);
    one('auth.login');

    // --- Prometheus, merged over the workers ---
    const metrics = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
    expect(metrics.status).toBe(200);
    expect(metrics.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const text = await metrics.text();
    const types = text.split('\n').filter((line) => line.startsWith('# TYPE '));
    expect(new Set(types).size, 'one TYPE line per family').toBe(types.length);
    const samples = text.split('\n').filter((line) => line && !line.startsWith('#'));
    const seriesKeys = samples.map((line) => line.slice(0, line.lastIndexOf(' ')));
    expect(new Set(seriesKeys).size, 'each series once').toBe(seriesKeys.length);
    expect(sample(text, 'gatehouse_proxy_requests_total', { gatehouse_api: 'demo', http_request_method: 'GET', http_response_status_class: '2xx' })).toBe(1);
    expect(sample(text, 'gatehouse_proxy_requests_total', { gatehouse_api: 'open', http_request_method: 'GET', http_response_status_class: '2xx' })).toBe(6);
    expect(sample(text, 'gatehouse_proxy_upstream_duration_count', { gatehouse_api: 'demo', http_response_status_class: '2xx' })).toBe(1);
    expect(sample(text, 'gatehouse_proxy_upstream_duration_count', { gatehouse_api: 'open', http_response_status_class: '2xx' })).toBe(6);
    expect(sample(text, 'gatehouse_token_refresh_duration_count', { gatehouse_token_kind: 'session', gatehouse_outcome: 'ok' })).toBe(1);
    expect(sample(text, 'gatehouse_token_refresh_lock_wait_duration_count', { gatehouse_outcome: 'acquired' })).toBe(1);
    expect(sample(text, 'gatehouse_store_duration_count', { gatehouse_store_operation: 'replaceIfHeld' })).toBe(1);
    expect(sample(text, 'gatehouse_store_duration_count', { gatehouse_store_operation: 'get' })).toBeGreaterThan(0);
    expect(sample(text, 'gatehouse_store_errors_total', {}) ?? 0).toBe(0);
    expect(sample(text, 'gatehouse_auth_logins_total', { gatehouse_outcome: 'ok' })).toBe(1);
    expect(sample(text, 'gatehouse_auth_logouts_total', { 'gatehouse_logout_kind': 'user', gatehouse_outcome: 'ok' })).toBe(1);
    expect(sample(text, 'target_info', { service_name: 'gatehouse-test' })).toBe(1);

    // --- OTLP metrics reach the collector too ---
    await waitFor('metrics over OTLP', () => (stringsIn(collector.bodies.filter((entry) => entry.path === '/v1/metrics')).includes('gatehouse.proxy.requests') ? true : undefined), 10_000);

    // --- no secret anywhere ---
    const sessionId = /\{(.+)\}$/.exec(sessionKey)?.[1] as string;
    const secrets = {
      cookie: cookie.slice(cookie.indexOf('=') + 1),
      sessionId,
      sub: USER,
      email: `${USER}@example.test`,
      logoutToken: new URL(logoutUrl, app).searchParams.get('sid') as string,
      accessTokenBefore: before.accessToken as string,
      refreshTokenBefore: before.refreshToken as string,
      accessTokenAfter: after.accessToken as string,
      refreshTokenAfter: after.refreshToken as string,
    };
    for (const [what, secret] of Object.entries(secrets)) expect(secret, what).toBeTruthy();
    const exported = [...stringsIn(collector.bodies), text];
    for (const [what, secret] of Object.entries(secrets)) {
      expect(exported.filter((value) => value.includes(secret)), `${what} in telemetry`).toEqual([]);
    }
    expect(exported.filter((value) => /eyJ[A-Za-z0-9_-]{10,}/.test(value)), 'a JWT in telemetry').toEqual([]);
    // No query string either (the callback's code and state, the proxied call's `private=1`).
    expect(exported.filter((value) => /[?&](code|state|sid|private)=/.test(value)), 'a query in telemetry').toEqual([]);
  });

  it('the metrics endpoint answers on METRICS_PORT only: never on the public port, and /metrics alone', async () => {
    expect((await fetch(`${app}/metrics`)).status).toBe(404);
    expect((await fetch(`http://127.0.0.1:${metricsPort}/`)).status).toBe(404);
    expect((await fetch(`http://127.0.0.1:${metricsPort}/metrics`, { method: 'POST' })).status).toBe(404);
  });

  it('a refresh put off by an IdP outage: the call goes on with the token held, and the deferral is counted by kind and cause and marked on its span', async () => {
    const user = `${USER}-outage`;
    const cookie = await login(app, user);
    const sessionKey = await probe.sessionKeyOf(user);
    if (!sessionKey) throw new Error('no session stored');
    const stored = async () => (await storedSecrets(stack.appEnv.REDIS_URL as string, sessionKey, stack.appEnv.SESSION_SECRET as string)).accessToken;
    const held = await stored();
    const scrape = async () => (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    const deferred = (text: string) => sample(text, 'gatehouse_token_refresh_deferred_total', { gatehouse_token_kind: 'session', gatehouse_outcome: 'idp_unavailable' }) ?? 0;
    const failedRefreshes = (text: string) => sample(text, 'gatehouse_token_refresh_duration_count', { gatehouse_token_kind: 'session', gatehouse_outcome: 'idp_unavailable' }) ?? 0;
    const before = await scrape();

    // The token is always due here (60 s tokens, 120 s skew): this call's refresh meets the fault.
    expect((await fetch(`${stack.issuer}/__dev/token-fault?status=503&count=1`, { method: 'POST' })).status).toBe(200);
    const answer = await fetch(`${app}/api/proxy/demo/whoami`, { headers: { cookie, 'x-csrf': '1' } });
    expect(answer.status).toBe(200);
    expect(await answer.json()).toMatchObject({ sub: user });
    expect(await stored(), 'no refresh happened').toBe(held);

    const after = await scrape();
    expect(deferred(after) - deferred(before)).toBe(1);
    expect(failedRefreshes(after) - failedRefreshes(before)).toBe(1);
    const span = await waitFor('the deferred call’s span', () => spansIn(collector.bodies).find((candidate) => attribute(candidate, 'gatehouse.token.refresh_deferred') !== undefined), 10_000);
    expect(span.name).toBe('GET /api/proxy/{api}');
    expect(attribute(span, 'gatehouse.token.refresh_deferred')).toBe('idp_unavailable');
    expect(attribute(span, 'http.response.status_code')).toBe(200);
    expect((await fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie, 'x-csrf': '1' } })).status).toBe(200);
  });

  it('off by default: without METRICS_PORT or OTEL_* nothing but the public port listens', async () => {
    const plain = Object.fromEntries(Object.entries(stack.appEnv).filter(([name]) => name !== 'METRICS_PORT' && !name.startsWith('OTEL_')));
    const started = await startGatehouse({ name: 'gatehouse-plain', workers: WORKERS, env: plain });
    try {
      if (SHAPE === 'next') await fetch(`${started.url}/api/health`); // next start runs its instrumentation hook on the way
      const pids = new Set(processTree(started.process.child.pid as number).map(String));
      const listening = execFileSync('ss', ['-ltnpH'], { encoding: 'utf8' })
        .split('\n')
        .filter((line) => [...line.matchAll(/pid=(\d+)/g)].some((match) => pids.has(match[1] as string)))
        .map((line) => Number(/:(\d+)\s/.exec(line)?.[1]));
      expect([...new Set(listening)]).toEqual([Number(new URL(started.url).port)]);
      expect(started.process.output()).not.toContain('telemetry.started');
    } finally {
      await started.process.stop();
    }
  });

  it.each([
    ['not a port', 'http', /METRICS_PORT: must be a port number/],
    ['the public port', 'same', /METRICS_PORT: must differ from PORT/],
  ])('a bad METRICS_PORT (%s) stops the start, naming the variable', async (_what, value, message) => {
    const port = await freePort();
    const env = { ...stack.appEnv, APP_BASE_URL: `http://localhost:${port}`, PORT: String(port), HOSTNAME: '127.0.0.1', GATEHOUSE_WORKERS: '1', METRICS_PORT: value === 'same' ? String(port) : value };
    const args = SHAPE === 'next' ? ['node_modules/next/dist/bin/next', 'start', '-p', String(port), '-H', '127.0.0.1'] : ['server.ts'];
    const child = spawn(process.execPath, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    // next start only reads its configuration on its instrumentation hook, after "Ready".
    const code = await new Promise<number | null>((resolve) => {
      const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
      child.once('close', (exitCode) => {
        clearTimeout(timer);
        resolve(exitCode);
      });
    });
    expect(output).toMatch(message);
    expect(code).toBe(1);
  });
});
