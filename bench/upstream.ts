// A deliberately cheap upstream API for the benchmark. Several copies share one port (SO_REUSEPORT),
// each with a control port of its own for its counters.
//
//   any GET            → small JSON (the throughput legs hit /whoami)
//   GET  /download?bytes=N → N bytes, streamed in 64 KiB chunks with backpressure
//   POST/PUT anything  → the body is counted and discarded, the answer says how many bytes arrived
//
// Every request without `authorization: Bearer <something>` (or `DPoP <something>` with a `DPoP`
// proof beside it) is counted: the bench fails the run if any arrived, because a proxy that forgets
// the token would otherwise look fast. DPoP proofs are counted, not verified: this upstream is the floor.
import { createServer } from 'node:http';

const port = Number(process.env.BENCH_UPSTREAM_PORT);
const controlPort = Number(process.env.BENCH_UPSTREAM_CONTROL_PORT);
if (!port || !controlPort) throw new Error('BENCH_UPSTREAM_PORT and BENCH_UPSTREAM_CONTROL_PORT are required');

const counters = { requests: 0, missingBearer: 0, dpopProofs: 0, bytesIn: 0, bytesOut: 0, tokens: new Set<string>() };
const TRACK_TOKENS = process.env.BENCH_UPSTREAM_TRACK_TOKENS === '1';
const SMALL = Buffer.from('{"ok":true,"sub":"bench"}');
const CHUNK = Buffer.alloc(64 * 1024, 0x61);
const SMALL_HEADERS = { 'content-type': 'application/json', 'content-length': String(SMALL.length) };

const server = createServer((req, res) => {
  counters.requests += 1;
  const auth = req.headers.authorization;
  const proof = typeof req.headers.dpop === 'string' && req.headers.dpop.length > 0;
  if (proof) counters.dpopProofs += 1;
  const scheme = auth?.startsWith('Bearer ') ? 'Bearer ' : auth?.startsWith('DPoP ') && proof ? 'DPoP ' : undefined;
  if (!auth || !scheme || auth.length <= scheme.length) counters.missingBearer += 1;
  else if (TRACK_TOKENS) counters.tokens.add(auth.slice(scheme.length));
  const url = req.url ?? '/';
  if (req.method === 'POST' || req.method === 'PUT') {
    let bytes = 0;
    req.on('data', (chunk: Buffer) => (bytes += chunk.length));
    req.on('end', () => {
      counters.bytesIn += bytes;
      const body = JSON.stringify({ bytes });
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)) });
      res.end(body);
    });
    return;
  }
  if (url.startsWith('/download')) {
    let remaining = Number(new URL(url, 'http://x').searchParams.get('bytes') ?? 0);
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(remaining) });
    const pump = () => {
      while (remaining > 0) {
        const piece = remaining >= CHUNK.length ? CHUNK : CHUNK.subarray(0, remaining);
        remaining -= piece.length;
        counters.bytesOut += piece.length;
        if (!res.write(piece)) return void res.once('drain', pump);
      }
      res.end();
    };
    pump();
    return;
  }
  res.writeHead(200, SMALL_HEADERS);
  res.end(SMALL);
});
server.keepAliveTimeout = 65_000;
server.listen({ port, host: '127.0.0.1', reusePort: true }, () => {
  process.stdout.write(`bench upstream listening on ${port} (pid ${process.pid})\n`);
});

const control = createServer((req, res) => {
  if (req.url === '/reset' && req.method === 'POST') {
    counters.requests = counters.missingBearer = counters.dpopProofs = counters.bytesIn = counters.bytesOut = 0;
    counters.tokens.clear();
  }
  res.writeHead(200, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ ...counters, tokens: counters.tokens.size, pid: process.pid }));
});
control.listen(controlPort, '127.0.0.1');

const stop = () => {
  server.close();
  control.close();
  server.closeAllConnections();
  process.exit(0);
};
process.once('SIGTERM', stop);
process.once('SIGINT', stop);
