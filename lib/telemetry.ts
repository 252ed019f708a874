import { SpanKind, SpanStatusCode, context, metrics, propagation, trace, type Attributes, type Counter, type Histogram, type Span } from '@opentelemetry/api';
import { GatehouseError } from './errors.ts';
import { sharedState } from './shared-state.ts';
import type { Store } from './store/types.ts';

/**
 * Gatehouse's spans and metrics, through `@opentelemetry/api` only: which SDK (if any) records them
 * is decided once at process start (lib/telemetry-sdk.ts), which then calls `enableTelemetry`.
 *
 * Until then — and for good with the default configuration — every helper here is a property
 * check and a direct call: no span objects, no context switches, no attribute objects on the
 * proxy's hot path.
 *
 * What an attribute or a metric label may hold: API names from BFF_APIS, methods, status classes,
 * Gatehouse's own error and outcome codes, store operation names. Never a token, a cookie, a
 * session id or handle, a store key (it holds the session id), a user's claim, a path or a query:
 * secrets must not leave, and metric labels must stay few (each label set is a time series).
 */

const INSTRUMENTATION_SCOPE = 'gatehouse';

interface Instruments {
  proxyRequests: Counter;
  upstreamDuration: Histogram;
  refreshDuration: Histogram;
  refreshDeferrals: Counter;
  lockWaitDuration: Histogram;
  storeDuration: Histogram;
  storeErrors: Counter;
  logins: Counter;
  logouts: Counter;
}

/**
 * Per process, not per module copy: server.ts's lib/ and the copy inside Next's bundle both read
 * what start-up decided (see shared-state.ts).
 */
const state = sharedState('telemetry', () => ({
  tracing: false,
  metrics: false,
  instruments: undefined as Instruments | undefined,
  countActiveSessions: undefined as (() => Promise<number>) | undefined,
}));

/** How to count live sessions (lib/session.ts tells, so this module needs no store of its own). */
export function countActiveSessionsWith(count: () => Promise<number>): void {
  state.countActiveSessions = count;
}

/** Called by the SDK wiring once its providers are registered; the instruments need the meter provider. */
export function enableTelemetry(on: { tracing: boolean; metrics: boolean }): void {
  state.tracing = on.tracing;
  state.metrics = on.metrics;
  state.instruments = on.metrics ? createInstruments() : undefined;
}

export function telemetryEnabled(): boolean {
  return state.tracing || state.metrics;
}

/** Buckets in seconds, from a cached store read (sub-millisecond) to an upstream at its 30 s timeout. */
const DURATION_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

function createInstruments(): Instruments {
  const meter = metrics.getMeter(INSTRUMENTATION_SCOPE);
  const seconds = (name: string, description: string) => meter.createHistogram(name, { description, unit: 's', advice: { explicitBucketBoundaries: DURATION_BUCKETS } });
  const instruments: Instruments = {
    proxyRequests: meter.createCounter('gatehouse.proxy.requests', { description: 'Proxied requests answered, by API, method and status class (Gatehouse\'s own refusals included)' }),
    upstreamDuration: seconds('gatehouse.proxy.upstream.duration', 'Time from sending a request upstream to its answer\'s head, by API and status class ("error": no answer)'),
    refreshDuration: seconds('gatehouse.token.refresh.duration', 'Token refreshes and exchanges run by this process (lock wait included), by kind and outcome'),
    refreshDeferrals: meter.createCounter('gatehouse.token.refresh.deferred', { description: 'Refreshes (or exchanges) put off by a transient fault while the token held could still be used: the calls waiting on one went on with that token, and this process leaves its refresh alone for a while. Once per refresh, by kind and cause' }),
    lockWaitDuration: seconds('gatehouse.token.refresh.lock_wait.duration', 'Time spent getting the per-session refresh lock, by outcome (acquired, settled: another holder refreshed)'),
    storeDuration: seconds('gatehouse.store.duration', 'Session store calls, by operation'),
    storeErrors: meter.createCounter('gatehouse.store.errors', { description: 'Session store calls that failed, by operation' }),
    logins: meter.createCounter('gatehouse.auth.logins', { description: 'Completed login callbacks, by outcome (ok or the error code)' }),
    logouts: meter.createCounter('gatehouse.auth.logouts', { description: 'Logouts: a user\'s own (user), of another of their sessions (other_device), or the IdP\'s back-channel call (backchannel), by outcome' }),
  };
  // Read from the store's index of live sessions when metrics are collected (a scrape, an export):
  // the same number from every instance, so a sum across a fleet would be wrong (take the max).
  // A store that cannot answer skips the observation rather than reporting zero.
  meter.createObservableGauge('gatehouse.sessions.active', { description: 'Live sessions in the session store, across every instance' }).addCallback(async (result) => {
    const count = await state.countActiveSessions?.().catch(() => undefined);
    if (count !== undefined) result.observe(count);
  });
  return instruments;
}

function tracer() {
  return trace.getTracer(INSTRUMENTATION_SCOPE);
}

/** "2xx", "4xx": the only form a status takes in a metric label. */
export function statusClass(status: number): string {
  return `${Math.floor(status / 100)}xx`;
}

/** A failure as an outcome label: Gatehouse's own code (a closed set), or just the error's class. */
export function outcomeOf(error: unknown): string {
  if (error instanceof GatehouseError) return error.code;
  return error instanceof Error ? error.name : 'unknown';
}

function seconds(startedMs: number): number {
  return (performance.now() - startedMs) / 1000;
}

function markFailed(span: Span, error: unknown): void {
  // Neither recordException nor the message: causes may quote an IdP's or a store's answer.
  span.setAttribute('error.type', outcomeOf(error));
  span.setStatus({ code: SpanStatusCode.ERROR });
}

/** Runs `work` in a span of its own (the parent of whatever it calls), when tracing is on. */
export function inSpan<T>(name: string, attributes: Attributes, work: () => Promise<T>, kind: SpanKind = SpanKind.INTERNAL): Promise<T> {
  if (!state.tracing) return work();
  return tracer().startActiveSpan(name, { kind, attributes }, async (span) => {
    try {
      return await work();
    } catch (error) {
      markFailed(span, error);
      throw error;
    } finally {
      span.end();
    }
  });
}

/** Adds attributes (outcome codes) to the span `work` runs in, if there is one. */
export function noteOnSpan(attributes: Attributes): void {
  if (state.tracing) trace.getActiveSpan()?.setAttributes(attributes);
}

// --- proxy ---------------------------------------------------------------------------------------

/**
 * The API name of a proxied path, for labels: only a configured name, so a browser cannot mint
 * label values (a time series each) by calling made-up APIs.
 */
function apiLabel(rawUrl: string, apis: Readonly<Record<string, unknown>>): string {
  const name = rawUrl.slice('/api/proxy/'.length).split(/[/?]/, 1)[0] ?? '';
  return Object.hasOwn(apis, name) ? name : 'unknown';
}

/**
 * Wraps the whole proxied request: a server span (the parent of the token, store and upstream
 * spans) and the request counter, counted when the answer's head is ready.
 */
export function withProxyTelemetry<In extends { method: string; rawUrl: string }, Out extends { status: number }>(
  forward: (inbound: In) => Promise<Out>,
  apis: () => Readonly<Record<string, unknown>>,
): (inbound: In) => Promise<Out> {
  return (inbound) => (telemetryEnabled() ? forwardObserved(forward, inbound, apis) : forward(inbound));
}

async function forwardObserved<In extends { method: string; rawUrl: string }, Out extends { status: number }>(
  forward: (inbound: In) => Promise<Out>,
  inbound: In,
  apis: () => Readonly<Record<string, unknown>>,
): Promise<Out> {
  const api = apiLabel(inbound.rawUrl, apis());
  const method = knownMethod(inbound.method);
  const attributes = { 'http.request.method': method, 'gatehouse.api': api, 'http.route': '/api/proxy/{api}/{path}' };
  const answer = await inSpan(
    `${method} /api/proxy/{api}`,
    attributes,
    async () => {
      const result = await forward(inbound);
      noteOnSpan({ 'http.response.status_code': result.status });
      return result;
    },
    SpanKind.SERVER,
  );
  state.instruments?.proxyRequests.add(1, { 'gatehouse.api': api, 'http.request.method': method, 'http.response.status_class': statusClass(answer.status) });
  return answer;
}

const KNOWN_METHODS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS']);

/** Any other method is one label value, `_OTHER`, as OpenTelemetry's HTTP conventions say. */
function knownMethod(method: string): string {
  const upper = method.toUpperCase();
  return KNOWN_METHODS.has(upper) ? upper : '_OTHER';
}

/** The two W3C headers a browser may have sent: replaced by ours when tracing, never both. */
const TRACE_HEADERS = new Set(['traceparent', 'tracestate']);

/**
 * Wraps the function that sends one request upstream: a client span whose context goes upstream
 * as `traceparent`, and the upstream latency (to the answer's head) by API and status class.
 */
export function withUpstreamTelemetry<Api extends { name: string }, Rest extends unknown[], Out extends { status: number }>(
  send: (api: Api, url: URL, method: string, headers: Array<[string, string]>, ...rest: Rest) => Promise<Out>,
): (api: Api, url: URL, method: string, headers: Array<[string, string]>, ...rest: Rest) => Promise<Out> {
  return (api, url, method, headers, ...rest) => {
    if (!telemetryEnabled()) return send(api, url, method, headers, ...rest);
    const started = performance.now();
    const record = (outcome: string) => state.instruments?.upstreamDuration.record(seconds(started), { 'gatehouse.api': api.name, 'http.response.status_class': outcome });
    const sent = state.tracing ? sendTraced(send, api, url, method, headers, rest) : send(api, url, method, headers, ...rest);
    return sent.then(
      (answer) => {
        record(statusClass(answer.status));
        return answer;
      },
      (error: unknown) => {
        record('error');
        throw error;
      },
    );
  };
}

function sendTraced<Api extends { name: string }, Rest extends unknown[], Out extends { status: number }>(
  send: (api: Api, url: URL, method: string, headers: Array<[string, string]>, ...rest: Rest) => Promise<Out>,
  api: Api,
  url: URL,
  method: string,
  headers: Array<[string, string]>,
  rest: Rest,
): Promise<Out> {
  const span = tracer().startSpan(`${knownMethod(method)}`, {
    kind: SpanKind.CLIENT,
    // The API's configured host, not the path: paths carry ids, queries carry anything.
    attributes: { 'http.request.method': knownMethod(method), 'gatehouse.api': api.name, 'server.address': url.hostname, 'url.scheme': url.protocol.slice(0, -1) },
  });
  const carrier: Record<string, string> = {};
  propagation.inject(trace.setSpan(context.active(), span), carrier);
  const traced: Array<[string, string]> = headers.filter(([name]) => !TRACE_HEADERS.has(name));
  for (const [name, value] of Object.entries(carrier)) traced.push([name, value]);
  return send(api, url, method, traced, ...rest).then(
    (answer) => {
      span.setAttribute('http.response.status_code', answer.status);
      if (answer.status >= 500) span.setStatus({ code: SpanStatusCode.ERROR });
      span.end();
      return answer;
    },
    (error: unknown) => {
      markFailed(span, error);
      span.end();
      throw error;
    },
  );
}

// --- refresh -------------------------------------------------------------------------------------

/** Which of a session's tokens a refresh is for; resources and audiences are not named (they are many). */
export type RefreshKind = 'session' | 'resource' | 'exchange';

/** One refresh (or exchange) run by this process: a span with its lock wait inside, and its duration by outcome. */
export function observeRefresh<T>(kind: RefreshKind, work: () => Promise<T>): Promise<T> {
  if (!telemetryEnabled()) return work();
  const started = performance.now();
  const record = (outcome: string) => state.instruments?.refreshDuration.record(seconds(started), { 'gatehouse.token.kind': kind, 'gatehouse.outcome': outcome });
  return inSpan(kind === 'exchange' ? 'token.exchange' : 'token.refresh', { 'gatehouse.token.kind': kind }, work).then(
    (result) => {
      record('ok');
      return result;
    },
    (error: unknown) => {
      record(outcomeOf(error));
      throw error;
    },
  );
}

/**
 * A refresh put off by a transient fault (`cause`: a Gatehouse error code) while calls go on with
 * the token held: the session is fine, but its tokens are not being renewed.
 */
export function countRefreshDeferred(kind: RefreshKind, cause: string): void {
  state.instruments?.refreshDeferrals.add(1, { 'gatehouse.token.kind': kind, 'gatehouse.outcome': cause });
}

/** The wait for the per-session refresh lock: `acquired`, or `settled` (another holder refreshed). */
export function observeLockWait<T>(work: () => Promise<T>, outcome: (result: T) => 'acquired' | 'settled'): Promise<T> {
  if (!telemetryEnabled()) return work();
  const started = performance.now();
  const record = (label: string) => state.instruments?.lockWaitDuration.record(seconds(started), { 'gatehouse.outcome': label });
  return inSpan('token.refresh.lock_wait', {}, async () => {
    const result = await work();
    noteOnSpan({ 'gatehouse.outcome': outcome(result) });
    return result;
  }).then(
    (result) => {
      record(outcome(result));
      return result;
    },
    (error: unknown) => {
      record(outcomeOf(error));
      throw error;
    },
  );
}

// --- store ---------------------------------------------------------------------------------------

const STORE_OPERATIONS = [
  'get',
  'getCoherent',
  'getLatest',
  'set',
  'replace',
  'expire',
  'take',
  'delIfEquals',
  'expireIfEquals',
  'replaceIfHeld',
  'indexAdd',
  'indexMembers',
  'indexRemove',
  'indexCount',
  'ping',
] as const satisfies ReadonlyArray<keyof Store>;

/**
 * The store with every call timed and failures counted, by operation; a span per call only inside
 * a span of Gatehouse's own (a login, a refresh, a proxied request), so background calls (lease
 * renewals, health checks) do not each start a trace. Keys never become attributes: they hold the
 * session id. With telemetry off the store is returned as it is.
 */
export function observedStore(store: Store, system: string): Store {
  if (!telemetryEnabled()) return store;
  const observed: Store = Object.create(store) as Store;
  for (const operation of STORE_OPERATIONS) {
    const original = store[operation];
    if (typeof original !== 'function') continue;
    // One generic wrapper for thirteen signatures: the arguments pass through untouched.
    const call = original as (...args: unknown[]) => Promise<unknown>;
    Object.defineProperty(observed, operation, {
      value: (...args: unknown[]) => observeStoreCall(system, operation, () => call.apply(store, args)),
    });
  }
  return observed;
}

function observeStoreCall<T>(system: string, operation: string, call: () => Promise<T>): Promise<T> {
  const started = performance.now();
  const labels = { 'gatehouse.store.operation': operation };
  const parent = state.tracing ? trace.getActiveSpan() : undefined;
  const done = parent?.isRecording()
    ? inSpan(`store.${operation}`, { 'db.system.name': system, 'db.operation.name': operation }, call, SpanKind.CLIENT)
    : call();
  return done.then(
    (result) => {
      state.instruments?.storeDuration.record(seconds(started), labels);
      return result;
    },
    (error: unknown) => {
      state.instruments?.storeDuration.record(seconds(started), labels);
      state.instruments?.storeErrors.add(1, labels);
      throw error;
    },
  );
}

// --- auth ----------------------------------------------------------------------------------------

export function countLogin(outcome: string): void {
  state.instruments?.logins.add(1, { 'gatehouse.outcome': outcome });
}

export function countLogout(kind: 'user' | 'other_device' | 'backchannel', outcome: 'ok' | 'refused' | 'failed'): void {
  state.instruments?.logouts.add(1, { 'gatehouse.logout.kind': kind, 'gatehouse.outcome': outcome });
}
