import http from 'node:http';
import { connect } from 'node:net';
import type { Duplex } from 'node:stream';
import { listen } from './cli.ts';

/**
 * `npm run dev` with SPA_DEV_URL: one origin for the SPA's own dev server (Vite, the Angular CLI…)
 * and Gatehouse. /api/* and Next's own paths go to `next dev`; everything else — pages, modules,
 * the dev server's hot-reload WebSocket — to the SPA's dev server. Development only: no checks of
 * its own, every request is Gatehouse's or the dev server's to judge.
 */

const TO_NEXT = /^\/(api|_next|__nextjs)(\/|$|\?)/;

function targetFor(url: string | undefined, next: URL, spa: URL): URL {
  return TO_NEXT.test(url ?? '/') ? next : spa;
}

function forward(request: http.IncomingMessage, response: http.ServerResponse, target: URL): void {
  const upstream = http.request({ host: target.hostname, port: target.port, method: request.method, path: request.url, headers: request.headers }, (answer) => {
    response.writeHead(answer.statusCode ?? 502, answer.rawHeaders);
    answer.pipe(response);
  });
  upstream.on('error', () => {
    if (!response.headersSent) response.writeHead(502, { 'content-type': 'text/plain; charset=utf-8' }).end(`Nothing answers at ${target.origin} (is the dev server running?)`);
    else response.destroy();
  });
  request.pipe(upstream);
}

/** A WebSocket (hot reload) is a raw TCP tunnel once the handshake is through: pass the head on and splice the sockets. */
function tunnel(request: http.IncomingMessage, socket: Duplex, head: Buffer, target: URL): void {
  const upstream = connect(Number(target.port), target.hostname, () => {
    const lines = [`${request.method} ${request.url} HTTP/${request.httpVersion}`];
    for (let i = 0; i < request.rawHeaders.length; i += 2) lines.push(`${request.rawHeaders[i]}: ${request.rawHeaders[i + 1]}`);
    upstream.write(`${lines.join('\r\n')}\r\n\r\n`);
    if (head.length) upstream.write(head);
    upstream.pipe(socket).pipe(upstream);
  });
  const close = () => {
    upstream.destroy();
    socket.destroy();
  };
  upstream.on('error', close);
  socket.on('error', close);
}

/** `appHost`: the host name the app is reached by, besides the names of this machine (APP_BASE_URL's). */
export async function startDevFront(port: number, next: URL, spa: URL, appHost?: string): Promise<{ close(): Promise<void> }> {
  const server = http.createServer((request, response) => forward(request, response, targetFor(request.url, next, spa)));
  server.on('upgrade', (request, socket, head) => tunnel(request, socket, head, targetFor(request.url, next, spa)));
  await listen(server, port, undefined, appHost ? [appHost] : []);
  return {
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
