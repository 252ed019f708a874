import cluster from 'node:cluster';
import http from 'node:http';
import next from 'next';
import { inboundFromNode, writeNodeResponse } from './lib/adapters.ts';
import { exitOnInvalidConfig } from './lib/config.ts';
import { GatehouseError, errorBody } from './lib/errors.ts';
import { PROXY_METHODS, jsonHeaders } from './lib/http.ts';
import { describeCause, log } from './lib/log.ts';
import { PROXY_PREFIX, forwardRequest } from './lib/proxy.ts';

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

// Every process checks the configuration before it does anything; a bad one stops here, naming the variables.
const { port, hostname, workers: workerCount, drainMs } = exitOnInvalidConfig().server;

if (cluster.isPrimary && workerCount > 1) {
  let stopping = false;
  for (let i = 0; i < workerCount; i++) cluster.fork();
  cluster.on('exit', (worker, code, signal) => {
    if (stopping) return;
    log('error', 'server.worker_died', { pid: worker.process.pid, code, signal });
    cluster.fork();
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
  await serve();
}

async function serve(): Promise<void> {
  const app = next({ dev: false, dir: import.meta.dirname, hostname, port });
  await app.prepare();
  const handleWithNext = app.getRequestHandler();
  const server = http.createServer((request, response) => {
    if (request.url?.startsWith(PROXY_PREFIX)) {
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
    void handleWithNext(request, response);
  });
  // Longer than typical load-balancer idle timeouts, so they close idle connections first.
  server.keepAliveTimeout = 65_000;
  server.listen(port, hostname, () => {
    // Printed whatever LOG_LEVEL says: operators and the test harness wait for this line.
    process.stdout.write(`Gatehouse listening on http://${hostname}:${port} (pid ${process.pid})\n`);
  });

  let draining = false;
  const drain = () => {
    if (draining) return;
    draining = true;
    // Stop accepting; in-flight requests and streams finish; keep-alive sockets go as soon as
    // they fall idle (not only those idle right now), so the process exits once the last answer is out.
    server.close(() => process.exit(0));
    setInterval(() => server.closeIdleConnections(), 100).unref();
    server.closeIdleConnections();
    setTimeout(() => process.exit(0), drainMs).unref();
  };
  process.on('SIGTERM', drain);
  process.on('SIGINT', drain);
}
