// A raw-socket HTTP/1.1 client for tests whose point is the exact bytes on the wire: duplicate
// headers, CR/LF in values, `..` segments and oversized heads that fetch would normalise or refuse.
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';

export interface RawResponse {
  status: number;
  /** In wire order, names lower-cased. */
  headers: Array<[string, string]>;
  body: string;
  /** The body's bytes as received (still content-encoded, if it was). */
  bytes: Buffer;
  get(name: string): string | undefined;
  all(name: string): string[];
}

/**
 * Writes `request` byte for byte to 127.0.0.1:`port` and parses one HTTP/1.1 answer. Resolves
 * `null` when the server closes the connection without answering at all.
 */
export function rawRequest(port: number, request: string | Buffer, timeoutMs = 10_000): Promise<RawResponse | null> {
  // The answer to a HEAD announces a length but carries no body.
  const bodiless = (typeof request === 'string' ? request : request.toString('latin1', 0, 5)).startsWith('HEAD ');
  return exchange(port, timeoutMs, (socket) => socket.write(request), bodiless);
}

export interface UploadOutcome {
  response: RawResponse | null;
  /** Body bytes handed to the socket before the answer arrived. */
  sentBytes: number;
  /** Whether every body byte had been handed over by then. */
  finishedSending: boolean;
}

/**
 * Writes `head`, then `body` chunk by chunk, waiting for the socket to drain between chunks, and
 * stops as soon as an answer arrives. A server that refuses the body without reading it answers
 * while most of it is still unsent; one that reads it all can only answer once all was sent.
 */
export async function rawUpload(port: number, head: string, body: Iterable<Buffer>, timeoutMs = 60_000): Promise<UploadOutcome> {
  let sentBytes = 0;
  let finishedSending = false;
  const response = await exchange(port, timeoutMs, (socket, answered) => {
    socket.write(head);
    void (async () => {
      const chunks = body[Symbol.iterator]();
      for (let next = chunks.next(); !next.done && !answered() && !socket.destroyed; ) {
        sentBytes += next.value.length;
        const flushed = socket.write(next.value);
        next = chunks.next();
        finishedSending = next.done === true;
        // Yield either way, so an answer that arrived is parsed before the next chunk goes out.
        await (flushed ? new Promise(setImmediate) : drainedOrClosed(socket));
      }
    })();
  });
  return { response, sentBytes, finishedSending };
}

function drainedOrClosed(socket: Socket): Promise<void> {
  return new Promise((resume) => {
    const done = () => {
      socket.off('drain', done).off('close', done);
      resume();
    };
    socket.on('drain', done).on('close', done);
  });
}

function exchange(port: number, timeoutMs: number, send: (socket: Socket, answered: () => boolean) => void, bodiless = false): Promise<RawResponse | null> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    let buffer = Buffer.alloc(0);
    let done = false;
    const finish = (result: RawResponse | null, error?: Error) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      if (error) reject(error);
      else resolve(result);
    };
    const timer = setTimeout(() => finish(null, new Error(`raw request got no complete answer within ${timeoutMs} ms:\n${buffer.toString('latin1').slice(0, 500)}`)), timeoutMs);
    const tryParse = (ended: boolean) => {
      const headEnd = buffer.indexOf('\r\n\r\n');
      if (headEnd === -1) {
        if (ended) finish(null);
        return;
      }
      const [statusLine = '', ...lines] = buffer.subarray(0, headEnd).toString('latin1').split('\r\n');
      const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine)?.[1]);
      const headers: Array<[string, string]> = lines.map((line) => {
        const colon = line.indexOf(':');
        return [line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim()];
      });
      const get = (name: string) => headers.find(([key]) => key === name)?.[1];
      let rest = buffer.subarray(headEnd + 4);
      let body: Buffer | undefined;
      const length = get('content-length');
      if (bodiless || status === 204 || status === 205 || status === 304) body = Buffer.alloc(0);
      else if (length !== undefined) {
        if (rest.length >= Number(length)) body = rest.subarray(0, Number(length));
      } else if (/chunked/i.test(get('transfer-encoding') ?? '')) {
        const parts: Buffer[] = [];
        for (;;) {
          const lineEnd = rest.indexOf('\r\n');
          if (lineEnd === -1) break;
          const size = Number.parseInt(rest.subarray(0, lineEnd).toString('latin1'), 16);
          if (size === 0) {
            body = Buffer.concat(parts);
            break;
          }
          if (rest.length < lineEnd + 2 + size + 2) break;
          parts.push(rest.subarray(lineEnd + 2, lineEnd + 2 + size));
          rest = rest.subarray(lineEnd + 2 + size + 2);
        }
      } else if (ended) body = rest;
      if (body === undefined) {
        if (ended) finish(null, new Error(`connection closed mid-answer:\n${buffer.toString('latin1').slice(0, 500)}`));
        return;
      }
      finish({ status, headers, body: body.toString('utf8'), bytes: body, get, all: (name) => headers.filter(([key]) => key === name).map(([, value]) => value) });
    };
    socket.on('data', (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      tryParse(false);
    });
    socket.on('end', () => tryParse(true));
    socket.on('close', () => tryParse(true));
    // A reset after a rejected request is an answer too ("closed without answering").
    socket.on('error', () => tryParse(true));
    send(socket, () => done);
  });
}

/**
 * A request head with CRLF line ends and exactly the given headers in the given order (no Host or
 * Connection added: callers decide, since some tests send those on purpose), followed by `body`.
 */
export function requestHead(method: string, target: string, headers: Array<[string, string]>, body = ''): string {
  return `${method} ${target} HTTP/1.1\r\n${headers.map(([name, value]) => `${name}: ${value}\r\n`).join('')}\r\n${body}`;
}

export interface OpenRawRequest {
  /** The client's port, to find this connection in the kernel's socket table. */
  localPort: number;
  /** The answer's head (status line and headers), or null if the connection closed before one came. */
  head: Promise<string | null>;
  /** Everything received, once the connection has closed. */
  closed: Promise<string>;
  /** The browser leaves: the connection is closed from this side. */
  leave(): void;
}

/** Sends `request` and keeps the connection, for tests that act while the answer is pending or streaming. */
export async function openRawRequest(port: number, request: string): Promise<OpenRawRequest> {
  const socket = connect(port, '127.0.0.1');
  await once(socket, 'connect');
  let received = '';
  let onHead: (head: string | null) => void = () => undefined;
  const head = new Promise<string | null>((resolve) => (onHead = resolve));
  socket.on('data', (chunk: Buffer) => {
    received += chunk.toString('latin1');
    const end = received.indexOf('\r\n\r\n');
    if (end !== -1) onHead(received.slice(0, end));
  });
  // A reset is one more way for the connection to end; `closed` says what arrived before it.
  socket.on('error', () => undefined);
  const closed = new Promise<string>((resolve) =>
    socket.once('close', () => {
      onHead(null);
      resolve(received);
    }),
  );
  socket.write(request);
  return { localPort: socket.localPort as number, head, closed, leave: () => socket.destroy() };
}
