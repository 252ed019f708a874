import nextEnv from '@next/env';
import cluster from 'node:cluster';
import { existsSync, readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import next from 'next';
import { inboundFromNode, writeNodeResponse } from './lib/adapters.ts';
import { ConfigError, getConfig, type Config } from './lib/config.ts';
import { GatehouseError, errorBody } from './lib/errors.ts';
import { PROXY_METHODS, jsonHeaders, routedPath } from './lib/http.ts';
import { describeCause, log } from './lib/log.ts';
import { idpStartProblems } from './lib/oidc.ts';
import { PROXY_PREFIX, forwardRequest, serveProxyOnFastPathOnly } from './lib/proxy.ts';
import { serveSpaFrom, spaBuildProblem } from './lib/spa.ts';
import { serveClusterMetrics, startTelemetry } from './lib/telemetry-sdk.ts';
import { closeAllWebSockets, handleUpgrade } from './lib/websocket.ts';

/**
 * `npm start` on Node hosts. /api/proxy/* goes straight to the proxy core — Next's per-request
 * cost is as large as the whole proxy job — and everything else to Next's own request handler.
 * One worker per core by default; sessions live in the store, so any worker serves any request.
 */

/**
 * The fetch API cannot represent a TRACE request, and Next builds a `Request` for its routes and
 * middleware: it would answer 500 and log a stack trace instead of refusing the method.
 */
const methodNotAllowed = errorBody(new GatehouseError('method_not_allowed', 405, 'This method is not supported.'));

// `npm start` is the production server, whatever the shell says: Next's server would switch to
// production anyway, and a check run under another NODE_ENV than the workers' would pass where
// theirs fail.
(process.env as Record<string, string>).NODE_ENV = 'production';
// .env files exactly as `next start` reads them (.env.production.local, .env.local,
// .env.production, .env; the process environment wins over all of them).
const envFiles = nextEnv.loadEnvConfig(import.meta.dirname, false, { info: () => undefined, error: (...args: unknown[]) => process.stderr.write(`${args.join(' ')}\n`) }).loadedEnvFiles;

/** Everything a worker would refuse, checked once up front so a bad start ends with one message. */
async function startProblems(): Promise<{ config?: Config; problems: string[] }> {
  let config: Config;
  try {
    config = getConfig();
  } catch (error) {
    if (error instanceof ConfigError) return { problems: error.problems };
    throw error;
  }
  const problems: string[] = [];
  if (config.store.kind === 'memory' && config.server.workers > 1) {
    problems.push(
      `GATEHOUSE_WORKERS: the in-memory session store lives inside one process, so ${config.server.workers} workers would each see only the sessions they created; use GATEHOUSE_WORKERS=1 with SESSION_STORE=memory, or a shared store (REDIS_URL, Upstash)`,
    );
  }
  const distDir = process.env.NEXT_DIST_DIR || '.next';
  if (!existsSync(path.join(import.meta.dirname, distDir, 'BUILD_ID'))) {
    problems.push(`NEXT_DIST_DIR: no production build in ${distDir}/ — run \`npm run build\` first`);
  } else {
    const withSpa = builtWithSpa(path.join(import.meta.dirname, distDir));
    const spaProblem = withSpa === undefined ? `NEXT_DIST_DIR: the build in ${distDir}/ does not say whether it serves an SPA (made by an older release?) — run \`npm run build\` again` : spaBuildProblem(withSpa, config.spa, { servedBeforeNext: true });
    if (spaProblem) problems.push(spaProblem);
  }
  // Only once the variables are right: the check reads the IdP they name.
  if (!problems.length) problems.push(...(await idpStartProblems()));
  return { config, problems };
}

/**
 * Whether the build in `distDir` sends pages to the SPA route: the flag next.config.mjs sets (and
 * inlines for instrumentation.ts), as Next records the build's config. Undefined when the build
 * does not say, as one made by an older release would not.
 */
function builtWithSpa(distDir: string): boolean | undefined {
  try {
    const { config } = JSON.parse(readFileSync(path.join(distDir, 'required-server-files.json'), 'utf8')) as { config?: { env?: Record<string, unknown> } };
    const flag = config?.env?.GATEHOUSE_BUILT_WITH_SPA;
    return typeof flag === 'string' ? flag === '1' : undefined;
  } catch {
    return undefined;
  }
}

const checked = cluster.isPrimary ? await startProblems() : { config: getConfig(), problems: [] };
if (checked.problems.length || !checked.config) {
  process.stderr.write(`Gatehouse cannot start:\n${checked.problems.map((problem) => `  - ${problem}`).join('\n')}\n`);
  process.exit(1);
}
// The workers, and Next's instrumentation hook in whichever process serves, need not ask the IdP again.
process.env.GATEHOUSE_START_CHECKED = '1';
const { port, hostname, workers: workerCount, drainMs } = checked.config.server;
const { spa, proxy: proxySettings } = checked.config;
if (cluster.isPrimary && envFiles.length) log('info', 'server.env_files', { files: envFiles.map((file) => file.path) });

/**
 * V8 flags for every worker, given where it starts (Node calls setting V8 flags at run time unsafe);
 * `npm start` passes the same ones to the primary, which serves alone with GATEHOUSE_WORKERS=1.
 * - `--expose-gc`: the proxy collects streamed buffers as it goes (lib/proxy.ts `noteStreamedBytes`).
 * - A young generation fixed at 16 MB a semi-space. A worker holds Next's whole server, about 50 MB
 *   of live heap, so a full collection holds up the request it lands on for 10–20 ms, and its
 *   marking threads take both CPUs of a small machine meanwhile. V8 sizes the young generation by
 *   the load (on a 2-core, 24 GB host up to 64 MB a semi-space) and shrinks it again when traffic
 *   drops; at a few MB, a proxied request's short-lived objects are swept every ~20 ms, what
 *   outlives two sweeps (requests in flight, log lines awaiting their write) is promoted, and the
 *   old generation fills: `--trace-gc` showed a full collection every 5–6 s per worker at one
 *   request at a time after a burst. At a fixed 16 MB they die young: one in 60 s of such load
 *   against eight (docs/performance.md, "Full collections off the tail"), for up to 32 MB of semi-spaces per
 *   process. Where V8's own limit is smaller (a heap limit under 2 GB), that costs memory instead.
 * A setting of the operator's own for any of these (`--x` or `--no-x`; any semi-space size for the
 * second) is kept when they start server.ts themselves: on its command line or in NODE_OPTIONS.
 * Under `npm start`, NODE_OPTIONS cannot override them (Node lets the command line win).
 */
const SERVING_V8_FLAGS: Array<{ flags: string[]; unlessGiven: string[] }> = [
  { flags: ['--expose-gc'], unlessGiven: ['expose-gc'] },
  { flags: ['--min-semi-space-size=16', '--max-semi-space-size=16'], unlessGiven: ['min-semi-space-size', 'max-semi-space-size'] },
];

function missingServingFlags(): string[] {
  // V8 reads `--no-x`, `--nox` and `--no_x` alike, and `_` as `-`.
  const name = (flag: string) => (flag.split('=')[0] ?? '').replaceAll('_', '-').replace(/^--(no-?)?/, '');
  const given = new Set([...process.execArgv, ...nodeOptionsWords(process.env.NODE_OPTIONS ?? '')].filter((flag) => flag.startsWith('--')).map(name));
  return SERVING_V8_FLAGS.filter(({ unlessGiven }) => !unlessGiven.some((flag) => given.has(flag))).flatMap(({ flags }) => flags);
}

/**
 * NODE_OPTIONS as Node splits it: at spaces outside double quotes, which it drops (and a
 * backslash inside them keeps the next character). Only flag names are read from the words, but
 * a quoted `"--max-semi-space-size=8"` is still the operator's own setting.
 */
function nodeOptionsWords(value: string): string[] {
  const words: string[] = [];
  let word: string | undefined;
  let quoted = false;
  for (let i = 0; i < value.length; i++) {
    const char = value[i] as string;
    if (quoted && char === '\\' && i + 1 < value.length) word = (word ?? '') + value[++i];
    else if (char === '"') {
      quoted = !quoted;
      word ??= '';
    } else if (!quoted && char === ' ') {
      if (word !== undefined) words.push(word);
      word = undefined;
    } else word = (word ?? '') + char;
  }
  if (word !== undefined) words.push(word);
  return words;
}

/** A worker that cannot start tells the primary why, instead of being respawned into the same failure. */
interface StartFailure {
  type: 'gatehouse:start_failed';
  reason: string;
}

/** Workers that die this often this fast are in a loop that respawning will not end. */
const CRASH_LOOP_DEATHS = 5;
const CRASH_LOOP_WINDOW_MS = 60_000;

if (cluster.isPrimary && workerCount === 1) {
  // One worker serves from this very process, whose flags were set when it started.
  const missing = missingServingFlags();
  if (missing.length) {
    log('warn', 'server.missing_v8_flags', {
      flags: missing,
      message: `started without ${missing.join(' ')} (npm start passes them): without --expose-gc, large streamed bodies may hold up to ~64 MB until V8 collects; without the fixed young generation, full collections land on requests at low load`,
    });
  }
}

if (cluster.isPrimary && workerCount > 1) {
  let stopping = false;
  const deaths: number[] = [];
  const giveUp = (reason: string) => {
    stopping = true;
    process.stderr.write(`Gatehouse cannot start: ${reason}\n`);
    for (const worker of Object.values(cluster.workers ?? {})) worker?.process.kill('SIGTERM');
    process.exit(1);
  };
  cluster.on('message', (_worker, message: Partial<StartFailure>) => {
    if (message?.type === 'gatehouse:start_failed') giveUp(`a worker failed to start: ${message.reason ?? 'unknown reason'}`);
  });
  // Whoever started the primary, the workers get the serving flags from their own start.
  const missing = missingServingFlags();
  if (missing.length) cluster.setupPrimary({ execArgv: [...process.execArgv, ...missing] });
  for (let i = 0; i < workerCount; i++) cluster.fork();
  // METRICS_PORT is served here, from every worker's metrics merged (the workers do not listen on it).
  serveClusterMetrics().catch((error: unknown) => giveUp(error instanceof Error ? error.message : String(error)));
  cluster.on('exit', (worker, code, signal) => {
    if (stopping) return;
    log('error', 'server.worker_died', { pid: worker.process.pid, code, signal });
    const now = Date.now();
    deaths.push(now);
    while (deaths.length && (deaths[0] as number) < now - CRASH_LOOP_WINDOW_MS) deaths.shift();
    if (deaths.length >= CRASH_LOOP_DEATHS) giveUp(`${deaths.length} workers died within ${CRASH_LOOP_WINDOW_MS / 1000} s (last: code ${code}, signal ${signal}); see the log above`);
    else cluster.fork();
  });
  const stop = () => {
    if (stopping) return;
    stopping = true;
    for (const worker of Object.values(cluster.workers ?? {})) worker?.process.kill('SIGTERM');
    const exitWhenAllGone = () => {
      if (Object.keys(cluster.workers ?? {}).length === 0) process.exit(0);
    };
    cluster.on('exit', exitWhenAllGone);
    exitWhenAllGone();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  await serve().catch((error: unknown) => {
    const reason = error instanceof Error ? error.message : String(error);
    if (cluster.isWorker) process.send?.({ type: 'gatehouse:start_failed', reason } satisfies StartFailure);
    else process.stderr.write(`Gatehouse cannot start: ${reason}\n`);
    process.exit(1);
  });
}

/**
 * A request target in absolute form (`GET http://app/api/proxy/… HTTP/1.1`), which servers must
 * accept (RFC 9112 section 3.2.2), routed as its path: Next would take it to the proxy's route
 * handler, which cannot see the client's address, and the API would get no X-Forwarded-For. Any
 * scheme: Node's parser takes `ws://…` and `foo://…` targets too, and Next would route them alike.
 * Anything else that is not a path (`*`) is left as it is, for Next to refuse.
 */
const ABSOLUTE_FORM_AUTHORITY = /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*/i;

function inOriginForm(request: http.IncomingMessage): http.IncomingMessage {
  const target = request.url;
  if (target === undefined || target.startsWith('/')) return request;
  // Cut, not parsed: a URL parser would resolve dot segments that the proxy refuses in a path.
  const authority = ABSOLUTE_FORM_AUTHORITY.exec(target);
  if (authority) {
    const rest = target.slice(authority[0].length);
    request.url = rest.startsWith('/') ? rest : `/${rest}`;
  }
  return request;
}

/**
 * Whether a target is the proxy's: under /api/proxy/, or under it once dot segments are resolved
 * (`/api/./proxy/…`, `/api/x/%2e%2e/proxy/…`), as Next resolves them before routing. Such a target
 * left to Next would reach its proxy route: outside the fast path's count of a user's open calls,
 * and without the client's address for X-Forwarded-For. The proxy refuses it, as it refuses dot
 * segments anywhere in a proxied path.
 */
function isForTheProxy(request: http.IncomingMessage): boolean {
  const target = inOriginForm(request).url;
  if (target === undefined) return false;
  return target.startsWith(PROXY_PREFIX) || (routedPath(target)?.startsWith(PROXY_PREFIX) ?? false);
}

async function serve(): Promise<void> {
  // This server answers /api/proxy/ itself: Next's proxy route refuses whatever still reaches it.
  serveProxyOnFastPathOnly();
  // Before Next loads: its instrumentation hook then finds the SDK wired. A worker's metrics go to the primary.
  await startTelemetry(cluster.isWorker ? 'primary' : 'serve');
  // Next's custom server adds its own 'upgrade' listener to the server of the first request it
  // handles (for next dev's hot reload and rewrites to other origins, neither of which this server
  // has); on ours it would end every WebSocket that lib/websocket.ts is upgrading. It gets a server
  // of its own that never listens.
  const app = next({ dev: false, dir: import.meta.dirname, hostname, port, httpServer: http.createServer() });
  await app.prepare();
  const handleWithNext = app.getRequestHandler();
  // WebSocket handshakes to /api/proxy/* are upgraded (lib/websocket.ts); any other upgrade request
  // stays an ordinary request for Next, as it would be without an 'upgrade' listener.
  const server = http.createServer({ shouldUpgradeCallback: isForTheProxy }, (request, response) => {
    if (isForTheProxy(request)) {
      // A throw while writing costs this one answer, never the worker and every request it serves.
      forwardRequest(inboundFromNode(request, response))
        .then((answer) => writeNodeResponse(answer, response))
        .catch((error: unknown) => {
          log('error', 'proxy.write_failed', describeCause(error));
          response.destroy();
        });
      return;
    }
    if (request.method === 'TRACE') {
      response.writeHead(405, { ...jsonHeaders(), 'x-gatehouse-error': 'method_not_allowed', allow: PROXY_METHODS.join(', ') }).end(methodNotAllowed);
      return;
    }
    if (spa) {
      // The SPA's files and routes first; what it does not serve (Gatehouse's API, Next's assets) goes to Next.
      const header = (name: string) => {
        const value = request.headers[name];
        return Array.isArray(value) ? value.join(', ') : value;
      };
      serveSpaFrom(spa, request.method ?? 'GET', request.url ?? '/', header, proxySettings.sendTimeoutMs)
        .then((answer) => (answer ? writeNodeResponse(answer, response) : handleWithNext(request, response)))
        .catch((error: unknown) => {
          log('error', 'spa.failed', describeCause(error));
          response.destroy();
        });
      return;
    }
    void handleWithNext(request, response);
  });
  server.on('upgrade', handleUpgrade);
  // Longer than typical load-balancer idle timeouts, so they close idle connections first.
  server.keepAliveTimeout = 65_000;
  await new Promise<void>((resolve, reject) => {
    const refuse = (error: NodeJS.ErrnoException) =>
      reject(error.code === 'EADDRINUSE' ? new Error(`PORT: ${hostname}:${port} is already in use`) : error.code === 'EACCES' ? new Error(`PORT: no permission to listen on ${hostname}:${port}`) : error);
    server.once('error', refuse);
    server.listen(port, hostname, () => {
      server.off('error', refuse);
      resolve();
    });
  });
  // Printed whatever LOG_LEVEL says: operators and the test harness wait for this line.
  process.stdout.write(`Gatehouse listening on http://${hostname}:${port} (pid ${process.pid})\n`);

  let draining = false;
  const drain = () => {
    if (draining) return;
    draining = true;
    // Stop accepting; in-flight requests and streams finish; keep-alive sockets go as soon as
    // they fall idle (not only those idle right now), so the process exits once the last answer is out.
    server.close(() => process.exit(0));
    // Open WebSockets are told to go (1001), so their browsers reconnect to a server that stays.
    closeAllWebSockets();
    setInterval(() => server.closeIdleConnections(), 100).unref();
    server.closeIdleConnections();
    setTimeout(() => process.exit(0), drainMs).unref();
  };
  process.on('SIGTERM', drain);
  process.on('SIGINT', drain);
}
