import cluster, { type Worker } from 'node:cluster';
import http from 'node:http';
import { context, metrics, propagation, trace, type Attributes, type Context, type TextMapGetter, type TextMapPropagator, type TextMapSetter } from '@opentelemetry/api';
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks';
import { W3CTraceContextPropagator } from '@opentelemetry/core';
import { OTLPMetricExporter as OtlpJsonMetricExporter } from '@opentelemetry/exporter-metrics-otlp-http';
import { OTLPMetricExporter as OtlpProtoMetricExporter } from '@opentelemetry/exporter-metrics-otlp-proto';
import { PrometheusExporter, PrometheusSerializer } from '@opentelemetry/exporter-prometheus';
import { OTLPTraceExporter as OtlpJsonTraceExporter } from '@opentelemetry/exporter-trace-otlp-http';
import { OTLPTraceExporter as OtlpProtoTraceExporter } from '@opentelemetry/exporter-trace-otlp-proto';
import { detectResources, envDetector, resourceFromAttributes } from '@opentelemetry/resources';
import { MeterProvider, PeriodicExportingMetricReader, type MetricReader } from '@opentelemetry/sdk-metrics';
import {
  AlwaysOffSampler,
  AlwaysOnSampler,
  BatchSpanProcessor,
  ParentBasedSampler,
  TraceIdRatioBasedSampler,
  TracerProvider,
  type ReadableSpan,
  type Sampler,
  type SpanExporter,
} from '@opentelemetry/sdk-trace';
import { getConfig } from './config.ts';
import { describeCause, log } from './log.ts';
import { sharedState } from './shared-state.ts';
import { enableTelemetry } from './telemetry.ts';

/**
 * The OpenTelemetry SDK, wired once per process at start: `instrumentation.ts` for `next start` and
 * `next dev`, server.ts for `npm start` (whose /api/proxy fast path never enters Next). Everything
 * else speaks only `@opentelemetry/api` (lib/telemetry.ts).
 *
 * Off unless configured: traces go out when OTEL_TRACES_EXPORTER=otlp or an OTLP endpoint for
 * traces is set, metrics likewise, and the Prometheus endpoint only with METRICS_PORT.
 */

type Env = Record<string, string | undefined>;

export interface TelemetryPlan {
  traces: 'http/json' | 'http/protobuf' | undefined;
  metricsOtlp: 'http/json' | 'http/protobuf' | undefined;
  prometheus: { port: number; hostname: string } | undefined;
}

function exported(env: Env, signal: 'TRACES' | 'METRICS'): 'http/json' | 'http/protobuf' | undefined {
  const exporter = env[`OTEL_${signal}_EXPORTER`]?.trim();
  if (exporter === 'none') return undefined;
  const endpoint = env.OTEL_EXPORTER_OTLP_ENDPOINT || env[`OTEL_EXPORTER_OTLP_${signal}_ENDPOINT`];
  if (exporter !== 'otlp' && !endpoint) return undefined;
  const protocol = env[`OTEL_EXPORTER_OTLP_${signal}_PROTOCOL`] || env.OTEL_EXPORTER_OTLP_PROTOCOL || 'http/protobuf';
  return protocol === 'http/json' ? 'http/json' : 'http/protobuf';
}

/** What this process exports; the values were checked with the rest of the configuration (lib/config.ts). */
export function telemetryPlan(env: Env = process.env): TelemetryPlan {
  if (env.OTEL_SDK_DISABLED?.trim().toLowerCase() === 'true') return { traces: undefined, metricsOtlp: undefined, prometheus: undefined };
  const { port, hostname } = getConfig().metrics;
  return { traces: exported(env, 'TRACES'), metricsOtlp: exported(env, 'METRICS'), prometheus: port === undefined ? undefined : { port, hostname } };
}

function positiveNumber(value: string | undefined, fallback: number): number {
  const parsed = Number(value);
  return value && Number.isFinite(parsed) && parsed > 0 ? parsed : fallback;
}

function samplerFrom(env: Env): Sampler {
  const ratio = () => new TraceIdRatioBasedSampler(env.OTEL_TRACES_SAMPLER_ARG ? Number(env.OTEL_TRACES_SAMPLER_ARG) : 1);
  switch (env.OTEL_TRACES_SAMPLER?.trim()) {
    case 'always_on':
      return new AlwaysOnSampler();
    case 'always_off':
      return new AlwaysOffSampler();
    case 'traceidratio':
      return ratio();
    case 'parentbased_always_off':
      return new ParentBasedSampler({ root: new AlwaysOffSampler() });
    case 'parentbased_traceidratio':
      return new ParentBasedSampler({ root: ratio() });
    default:
      return new ParentBasedSampler({ root: new AlwaysOnSampler() });
  }
}

/**
 * Injects W3C trace context upstream, and extracts none from inbound requests: a browser's
 * `traceparent` is whatever the browser says, and honouring it would let any client pick its trace
 * ids and force its requests to be sampled. Every request Gatehouse serves starts a trace of its own.
 * (Next's own request spans extract through the global propagator too, so this holds for both shapes.)
 */
class InjectOnlyTraceContext implements TextMapPropagator {
  readonly #w3c = new W3CTraceContextPropagator();
  inject(carrier: Context, target: unknown, setter: TextMapSetter): void {
    this.#w3c.inject(carrier, target, setter);
  }
  extract(active: Context, _carrier: unknown, _getter: TextMapGetter): Context {
    return active;
  }
  fields(): string[] {
    return this.#w3c.fields();
  }
}

/**
 * Span attributes that may carry a URL: kept without its query (Next's own spans record
 * `http.target`, and copy every span's name, a fetch's full URL included, into `next.span_name`).
 */
const URL_ATTRIBUTES = new Set(['http.target', 'http.url', 'url.full', 'next.page', 'next.span_name']);
const DROPPED_ATTRIBUTES = new Set(['url.query']);

/**
 * Gatehouse's own spans never record a URL, but Next's request and fetch spans do, query included
 * (in attributes and in fetch spans' names): the login callback's `code` and `state`, a logout
 * link's `sid`. Those queries are cut before any span leaves the process, and so are the parts of
 * a path that name a user's data or session: what follows an API's name under /api/proxy/ (ids,
 * whatever the SPA asks for) and a session's handle under /api/auth/sessions/. Next also records
 * the exceptions it sees (an `exception` event with the error's message and stack, and the message
 * as the span's status): free text that may quote a URL, a token response, a form body, a cookie
 * or an Authorization header. Every string a span exports (its name, attributes, events, links and
 * status) is cleaned as such text too (scrubbedText). A span with nothing to cut goes out as it is.
 */
export function withoutSecrets(span: ReadableSpan): ReadableSpan {
  const name = scrubbedText(scrubbedUrl(span.name));
  const attributes = scrubbedAttributes(span.attributes);
  const events = span.events?.map((event) => {
    const eventName = scrubbedText(event.name);
    const eventAttributes = event.attributes && scrubbedAttributes(event.attributes);
    return eventName === event.name && eventAttributes === event.attributes ? event : { ...event, name: eventName, attributes: eventAttributes };
  });
  const links = span.links?.map((link) => {
    const linkAttributes = link.attributes && scrubbedAttributes(link.attributes);
    return linkAttributes === link.attributes ? link : { ...link, attributes: linkAttributes };
  });
  const message = span.status?.message && scrubbedText(span.status.message);
  const unchanged =
    name === span.name &&
    attributes === span.attributes &&
    (events ?? []).every((event, i) => event === span.events[i]) &&
    (links ?? []).every((link, i) => link === span.links[i]) &&
    message === span.status?.message;
  if (unchanged) return span;
  const cleaned: Partial<ReadableSpan> = {
    name,
    attributes,
    ...(events && { events }),
    ...(links && { links }),
    ...(message !== span.status?.message && { status: { ...span.status, message } }),
  };
  // The span's methods (spanContext(), …) stay reachable through the prototype.
  return Object.assign(Object.create(span) as ReadableSpan, cleaned);
}

/** /api/proxy/<api>/<anything> and /api/auth/sessions/<handle>, wherever they appear in a value. */
const PRIVATE_PATH = /(\/api\/proxy\/[^/?#\s]+\/|\/api\/auth\/sessions\/)[^?#\s]+/;

/** What stands for the private part of such a path: `{path}` after an API's name, `{handle}` after /sessions/. */
function placeholder(_match: string, prefix: string): string {
  return `${prefix}${/proxy/i.test(prefix) ? '{path}' : '{handle}'}`;
}

function scrubbedUrl(value: string): string {
  return value
    .split('?', 1)[0]!
    .replace(PRIVATE_PATH, placeholder);
}

/** The same paths in free text, with `\\` or `%2F` for any slash. */
const PRIVATE_PATHS_IN_TEXT = /((?:\/|\\|%2f)api(?:\/|\\|%2f)proxy(?:\/|\\|%2f)[^/\\?#\s%]+(?:\/|\\|%2f)|(?:\/|\\|%2f)api(?:\/|\\|%2f)auth(?:\/|\\|%2f)sessions(?:\/|\\|%2f))[^?#\s'"`<>]+/gi;
/** Names of fields, parameters and cookies whose values are never exported. */
const SENSITIVE_NAME = /token|secret|code|state|sid|session|nonce|assertion|password|verifier|credential|cookie|auth|gatehouse/i;

/**
 * Free text (an error's message or stack, any string attribute): cut are a query wherever one
 * starts (`?` or `%3F`), a fragment after a URL, private paths, JWTs and JWEs (`eyJ…`), iron
 * seals (`Fe26.2*…`, every Gatehouse cookie's value), what follows `Bearer`, `DPoP` or `Basic`, a
 * Cookie or Set-Cookie header's value, and the value of any `name=value`, JSON `"name": "value"`
 * or inspected `name: 'value'` whose name sounds like a credential (SENSITIVE_NAME; Gatehouse's
 * cookies are all named `gatehouse…`).
 * Every pattern is bounded or anchored on a fixed character, so a long hostile message costs
 * linear time. Opaque tokens quoted bare cannot be told from other words; Gatehouse's own errors
 * never quote one.
 */
function scrubbedText(value: string): string {
  if (!/[?#%=:"/\\*]|eyJ|bearer|dpop|basic/i.test(value)) return value;
  return value
    .replace(/eyJ[A-Za-z0-9_.-]*/g, '[token]')
    .replace(/Fe26\.2\*[^\s'"`<>;,&]*/g, '[sealed]')
    .replace(/(Bearer|DPoP|Basic)(?:\s+|\s*[:=]\s*|%20|\+)[^\s'"`<>,;&]+/gi, '$1 [token]')
    .replace(/((?:set-)?cookie\s*[:=]\s*)[^\r\n]*/gi, '$1[cookie]')
    .replace(/"([\w.-]{1,64})"(\s*:\s*)"(?:[^"\\]|\\.)*"/g, (match, key: string, colon: string) => (SENSITIVE_NAME.test(key) ? `"${key}"${colon}"[redacted]"` : match))
    // A value ends where inspect's would (before `,`, `}`, `]`, a line's end): a quote inside other
    // text ("TypeError: '{ 'x-token': …") must not pair with the next key's and hide it.
    .replace(/('?)\b([\w.-]{1,64})\1(\s*:\s*)'(?:[^'\\\n]|\\.)*'(?=[ \t]*(?:[,}\]\n]|$))/g, (match, quote: string, key: string, colon: string) => (SENSITIVE_NAME.test(key) ? `${quote}${key}${quote}${colon}'[redacted]'` : match))
    .replace(/\b([\w.-]{1,64})=[^&\s'"`<>;,]*/g, (match, key: string) => (SENSITIVE_NAME.test(key) ? `${key}=[redacted]` : match))
    .replace(/(?:\?|%3[fF])[^\s'"`<>]*/g, '')
    .replace(/(?<=[\w/.~%-])#[^\s'"`<>]*/g, '')
    .replace(PRIVATE_PATHS_IN_TEXT, placeholder);
}

/** URL attributes lose their query first; strings are cleaned as text. The same object when nothing changes. */
function scrubbedAttributes(attributes: Attributes): Attributes {
  let scrubbed: Attributes | undefined;
  for (const [key, value] of Object.entries(attributes)) {
    let next: typeof value | undefined = value;
    if (DROPPED_ATTRIBUTES.has(key)) next = undefined;
    else if (typeof value === 'string') next = scrubbedText(URL_ATTRIBUTES.has(key) ? scrubbedUrl(value) : value);
    else if (Array.isArray(value)) {
      const items = value.map((item) => (typeof item === 'string' ? scrubbedText(item) : item));
      if (items.some((item, i) => item !== value[i])) next = items as typeof value;
    }
    if (next === value) continue;
    scrubbed ??= { ...attributes };
    if (next === undefined) delete scrubbed[key];
    else scrubbed[key] = next;
  }
  return scrubbed ?? attributes;
}

function redacting(exporter: SpanExporter): SpanExporter {
  return {
    export: (spans, done) => exporter.export(spans.map(withoutSecrets), done),
    shutdown: () => exporter.shutdown(),
    forceFlush: () => exporter.forceFlush?.() ?? Promise.resolve(),
  };
}

const PROMETHEUS_OPTIONS = { withoutScopeInfo: true } as const;

interface Started {
  prometheus: PrometheusExporter | undefined;
  flush: () => Promise<void>;
}

const sdk = sharedState('telemetry-sdk', () => ({ started: undefined as Started | undefined }));

/**
 * Registers the providers this process needs and turns lib/telemetry.ts on. `metricsEndpoint`:
 * `serve` listens on METRICS_PORT itself (one process serves everything), `primary` answers the
 * cluster primary's requests for this worker's metrics instead. Runs once per process; a second
 * call (Next's instrumentation hook inside `npm start`) changes nothing.
 */
export async function startTelemetry(metricsEndpoint: 'serve' | 'primary'): Promise<void> {
  if (sdk.started) return;
  const plan = telemetryPlan();
  const env = process.env;
  sdk.started = { prometheus: undefined, flush: () => Promise.resolve() };
  if (!plan.traces && !plan.metricsOtlp && !plan.prometheus) return;
  // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (the env detector) win over the default name.
  const resource = resourceFromAttributes({ 'service.name': 'gatehouse' }).merge(detectResources({ detectors: [envDetector] }));
  const flushes: Array<() => Promise<void>> = [];
  if (plan.traces) {
    const exporter = plan.traces === 'http/json' ? new OtlpJsonTraceExporter() : new OtlpProtoTraceExporter();
    const provider = new TracerProvider({
      resource,
      sampler: samplerFrom(env),
      spanProcessors: [new BatchSpanProcessor({ exporter: redacting(exporter), scheduledDelayMillis: positiveNumber(env.OTEL_BSP_SCHEDULE_DELAY, 5_000) })],
    });
    context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
    propagation.setGlobalPropagator(new InjectOnlyTraceContext());
    trace.setGlobalTracerProvider(provider);
    flushes.push(() => provider.forceFlush());
  }
  const readers: MetricReader[] = [];
  if (plan.metricsOtlp) {
    const exporter = plan.metricsOtlp === 'http/json' ? new OtlpJsonMetricExporter() : new OtlpProtoMetricExporter();
    readers.push(new PeriodicExportingMetricReader({ exporter, exportIntervalMillis: positiveNumber(env.OTEL_METRIC_EXPORT_INTERVAL, 60_000) }));
  }
  let prometheus: PrometheusExporter | undefined;
  if (plan.prometheus) {
    // The exporter's own server would answer every path on any host it is given; ours below answers /metrics only.
    prometheus = new PrometheusExporter({ ...PROMETHEUS_OPTIONS, preventServerStart: true });
    readers.push(prometheus);
  }
  if (readers.length) {
    const provider = new MeterProvider({ resource, readers });
    metrics.setGlobalMeterProvider(provider);
    flushes.push(() => provider.forceFlush());
  }
  enableTelemetry({ tracing: Boolean(plan.traces), metrics: readers.length > 0 });
  sdk.started = { prometheus, flush: () => Promise.all(flushes.map((flush) => flush())).then(() => undefined) };
  // Best effort: what the batch holds when the process is told to stop goes out with the drain.
  // A listener of ours must not be what keeps SIGTERM from ending a process that had no other.
  process.once('SIGTERM', () => {
    const flushed = sdk.started?.flush().catch(() => undefined);
    if (process.listenerCount('SIGTERM') === 0) void flushed?.finally(() => process.exit(143));
  });
  if (plan.prometheus && prometheus) {
    if (metricsEndpoint === 'serve') await serveMetrics(plan.prometheus, () => ownExposition());
    else answerPrimary();
  }
  log('info', 'telemetry.started', { traces: plan.traces ?? 'off', metrics: plan.metricsOtlp ?? 'off', prometheus: plan.prometheus ? `${plan.prometheus.hostname}:${plan.prometheus.port}` : 'off' });
}

/** This process's metrics in the Prometheus text format. */
async function ownExposition(): Promise<string> {
  const exporter = sdk.started?.prometheus;
  if (!exporter) return '';
  const { resourceMetrics } = await exporter.collect();
  return new PrometheusSerializer(undefined, false, undefined, false, PROMETHEUS_OPTIONS.withoutScopeInfo).serialize(resourceMetrics);
}

/** The scrape endpoint: GET /metrics on its own port and host, nothing else. */
function serveMetrics(where: { port: number; hostname: string }, exposition: () => Promise<string>): Promise<void> {
  const server = http.createServer((request, response) => {
    if (request.method !== 'GET' || request.url?.split('?', 1)[0] !== '/metrics') {
      response.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' }).end('Not found\n');
      return;
    }
    exposition().then(
      (text) => response.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8', 'cache-control': 'no-store' }).end(text),
      (error: unknown) => {
        log('error', 'telemetry.metrics_failed', describeCause(error));
        response.writeHead(503, { 'content-type': 'text/plain; charset=utf-8' }).end('Metrics unavailable\n');
      },
    );
  });
  // Never holds the process open: the app's own server and drain decide when it ends.
  server.unref();
  return new Promise((resolve, reject) => {
    server.once('error', (error: NodeJS.ErrnoException) =>
      reject(new Error(error.code === 'EADDRINUSE' ? `METRICS_PORT: ${where.hostname}:${where.port} is already in use` : `METRICS_PORT: cannot listen on ${where.hostname}:${where.port} (${error.code ?? error.message})`)),
    );
    server.listen(where.port, where.hostname, () => resolve());
  });
}

// --- npm start with several workers --------------------------------------------------------------

interface MetricsRequest {
  type: 'gatehouse:metrics';
  id: number;
}

interface MetricsAnswer extends MetricsRequest {
  /** Absent when the worker could not collect its metrics. */
  text?: string;
}

function isMetricsMessage(message: unknown): message is MetricsRequest {
  return typeof message === 'object' && message !== null && (message as { type?: unknown }).type === 'gatehouse:metrics';
}

/** A worker: hands its own metrics to the primary, which serves the merged view. */
function answerPrimary(): void {
  process.on('message', (message: unknown) => {
    if (!isMetricsMessage(message)) return;
    void ownExposition().then(
      (text) => process.send?.({ type: 'gatehouse:metrics', id: message.id, text } satisfies MetricsAnswer),
      () => process.send?.({ type: 'gatehouse:metrics', id: message.id } satisfies MetricsAnswer),
    );
  });
}

const WORKER_ANSWER_MS = 2_000;

/**
 * The cluster primary of `npm start`: listens on METRICS_PORT (the workers do not) and answers a
 * scrape with every worker's metrics merged into one exposition, as if one process had counted
 * them all. A worker that does not answer in time, or cannot collect, fails the scrape (503) rather
 * than letting its counters vanish from the sum, which Prometheus would read as a reset and then a burst.
 */
export async function serveClusterMetrics(): Promise<void> {
  const plan = telemetryPlan();
  if (!plan.prometheus) return;
  let nextId = 0;
  const pending = new Map<number, { texts: string[]; expected: number; done: (texts: string[]) => void; fail: (why: string) => void }>();
  cluster.on('message', (_worker: Worker, message: unknown) => {
    if (!isMetricsMessage(message)) return;
    const scrape = pending.get(message.id);
    if (!scrape) return;
    const { text } = message as MetricsAnswer;
    if (typeof text !== 'string') return scrape.fail('a worker could not collect its metrics');
    scrape.texts.push(text);
    if (scrape.texts.length === scrape.expected) scrape.done(scrape.texts);
  });
  const gather = () =>
    new Promise<string>((resolve, reject) => {
      const workers = Object.values(cluster.workers ?? {}).filter((worker): worker is Worker => worker?.isConnected() ?? false);
      const id = nextId++;
      const texts: string[] = [];
      const settle = () => {
        clearTimeout(timer);
        pending.delete(id);
      };
      const timer = setTimeout(() => {
        settle();
        reject(new Error(`only ${texts.length} of ${workers.length} workers answered within ${WORKER_ANSWER_MS} ms`));
      }, WORKER_ANSWER_MS);
      pending.set(id, {
        texts,
        expected: workers.length,
        done: () => {
          settle();
          resolve(mergeExpositions(texts));
        },
        fail: (why) => {
          settle();
          reject(new Error(why));
        },
      });
      for (const worker of workers) worker.send({ type: 'gatehouse:metrics', id } satisfies MetricsRequest);
    });
  await serveMetrics(plan.prometheus, gather);
  log('info', 'telemetry.started', { prometheus: `${plan.prometheus.hostname}:${plan.prometheus.port}`, merged: 'workers' });
}

interface Family {
  header: string[];
  type: string;
  series: Map<string, number>;
}

/**
 * Merges Prometheus text expositions of identical processes into one: a sample of the same name
 * and labels is summed (counters, histogram buckets, sums and counts), except a gauge's, whose
 * largest value is kept (`target_info` and `gatehouse_sessions_active`, the same number from every worker). Each family
 * keeps one HELP and TYPE, its samples together, as the format requires.
 */
export function mergeExpositions(texts: string[]): string {
  const families = new Map<string, Family>();
  for (const text of texts) {
    let current: Family | undefined;
    for (const line of text.split('\n')) {
      if (!line.trim()) continue;
      const meta = /^# (HELP|TYPE|UNIT) (\S+)(?: (.*))?$/.exec(line);
      if (meta) {
        const [, kind, name = '', rest = ''] = meta;
        current = families.get(name);
        if (!current) families.set(name, (current = { header: [], type: 'untyped', series: new Map() }));
        if (!current.header.some((seen) => seen.startsWith(`# ${kind} `))) current.header.push(line);
        if (kind === 'TYPE') current.type = rest.trim();
        continue;
      }
      if (line.startsWith('#')) continue;
      const split = line.lastIndexOf(' ');
      const key = line.slice(0, split);
      const value = Number(line.slice(split + 1));
      if (!current) families.set(key, (current = { header: [], type: 'untyped', series: new Map() }));
      const before = current.series.get(key);
      current.series.set(key, before === undefined ? value : current.type === 'gauge' ? Math.max(before, value) : before + value);
    }
  }
  const lines: string[] = [];
  for (const family of families.values()) {
    lines.push(...family.header);
    for (const [key, value] of family.series) lines.push(`${key} ${formatValue(value)}`);
  }
  return lines.length ? `${lines.join('\n')}\n` : '';
}

function formatValue(value: number): string {
  if (Number.isNaN(value)) return 'NaN';
  if (value === Infinity) return '+Inf';
  if (value === -Infinity) return '-Inf';
  return String(value);
}
