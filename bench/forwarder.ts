// Leg (g) of `npm run bench`: the least a Node proxy can do. One worker per core (as `npm start`),
// each a bare node:http server that forwards every request to the upstream over a keep-alive agent
// and streams the answer back: no session, no token, no checks, no logging. The browser's own
// Authorization header passes through, so the upstream's bearer check holds.
import cluster from 'node:cluster';
import http from 'node:http';
import { availableParallelism } from 'node:os';

const port = Number(process.env.FORWARDER_PORT);
const upstreamPort = Number(process.env.FORWARDER_UPSTREAM_PORT);
const workers = Number(process.env.FORWARDER_WORKERS ?? availableParallelism());
if (!port || !upstreamPort) throw new Error('FORWARDER_PORT and FORWARDER_UPSTREAM_PORT are required');

if (cluster.isPrimary && workers > 1) {
  for (let i = 0; i < workers; i++) cluster.fork();
  const stop = () => {
    for (const worker of Object.values(cluster.workers ?? {})) worker?.process.kill('SIGTERM');
    process.exit(0);
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
} else {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 512, maxFreeSockets: 64, scheduling: 'lifo' });
  const prefix = '/api/proxy/bench';
  const server = http.createServer((req, res) => {
    const headers = { ...req.headers, host: `127.0.0.1:${upstreamPort}` };
    delete headers.connection;
    const path = req.url?.startsWith(prefix) ? req.url.slice(prefix.length) || '/' : (req.url ?? '/');
    const upstream = http.request({ host: '127.0.0.1', port: upstreamPort, method: req.method, path, headers, agent }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      answer.pipe(res);
    });
    upstream.on('error', () => {
      if (!res.headersSent) res.writeHead(502);
      res.end();
    });
    req.pipe(upstream);
  });
  server.keepAliveTimeout = 65_000;
  server.listen(port, '127.0.0.1', () => process.stdout.write(`bench forwarder listening on ${port} (pid ${process.pid})\n`));
  process.once('SIGTERM', () => process.exit(0));
}
