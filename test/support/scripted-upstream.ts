// A raw TCP "API" whose answers are written byte for byte by the test: status lines Node's own
// server refuses to write (600, 099), headers a real API should never send, answers cut mid-body.
// It records every request head it reads; request bodies are not expected (tests send bodiless
// requests) and are not parsed.
import { createServer, type Socket } from 'node:net';

export interface UpstreamRequest {
  /** The request line, e.g. `GET /forge HTTP/1.1`. */
  line: string;
  /** The request target's path, e.g. `/forge`. */
  path: string;
  /** Names lower-cased, in wire order. */
  headers: Array<[string, string]>;
  /** Which TCP connection it came on (1, 2, …) and its position on that connection (1, 2, …). */
  connection: number;
  nth: number;
}

/** Writes the answer to `request` on `socket` (or resets it, or keeps it for later). */
export type Reply = (request: UpstreamRequest, socket: Socket) => void;

export interface ScriptedUpstream {
  url: string;
  requests: UpstreamRequest[];
  close(): Promise<void>;
}

export async function startScriptedUpstream(reply: Reply): Promise<ScriptedUpstream> {
  const requests: UpstreamRequest[] = [];
  const sockets = new Set<Socket>();
  let connections = 0;
  const server = createServer((socket) => {
    const connection = ++connections;
    sockets.add(socket);
    let buffered = '';
    let nth = 0;
    socket.on('data', (chunk) => {
      buffered += chunk.toString('latin1');
      let headEnd: number;
      // A reply may reset the connection: whatever else was buffered on it was never received.
      while (!socket.destroyed && (headEnd = buffered.indexOf('\r\n\r\n')) !== -1) {
        const [line = '', ...lines] = buffered.slice(0, headEnd).split('\r\n');
        buffered = buffered.slice(headEnd + 4);
        const headers = lines.map((header): [string, string] => {
          const colon = header.indexOf(':');
          return [header.slice(0, colon).trim().toLowerCase(), header.slice(colon + 1).trim()];
        });
        const request = { line, path: line.split(' ')[1]?.split('?')[0] ?? '', headers, connection, nth: ++nth };
        requests.push(request);
        reply(request, socket);
      }
    });
    socket.on('error', () => undefined);
    socket.on('close', () => sockets.delete(socket));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as { port: number }).port}`,
    requests,
    close: () =>
      new Promise((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

/** A complete answer with a Content-Length, the connection left open for the next request. */
export function rawAnswer(statusLine: string, headers: Array<[string, string]>, body: string): string;
export function rawAnswer(statusLine: string, headers: Array<[string, string]>, body: Buffer): Buffer;
export function rawAnswer(statusLine: string, headers: Array<[string, string]>, body: string | Buffer): string | Buffer {
  const head = [statusLine, ...headers.map(([name, value]) => `${name}: ${value}`), `content-length: ${Buffer.byteLength(body)}`];
  const headText = `${head.join('\r\n')}\r\n\r\n`;
  return typeof body === 'string' ? headText + body : Buffer.concat([Buffer.from(headText, 'latin1'), body]);
}
