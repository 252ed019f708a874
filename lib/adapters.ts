import type { IncomingMessage, ServerResponse } from 'node:http';
import { Readable, finished, type Transform } from 'node:stream';
import { constants as zlibConstants, createBrotliDecompress, createGunzip, createInflate, createZstdDecompress } from 'node:zlib';
import { GatehouseError, errorBody, errorHeaders } from './errors.ts';
import { jsonHeaders } from './http.ts';
import { describeCause, log } from './log.ts';
import { isOurAbort, noteStreamedBytes, type InboundRequest, type ProxyResponse } from './proxy.ts';

/**
 * The two ways a request reaches the proxy core: a Web `Request` (Next route handler, Vercel) and
 * a Node `IncomingMessage` (the fast-path server). Only shape conversion lives here.
 */

const BODYLESS = new Set(['GET', 'HEAD']);

/**
 * Next (and Vercel after it) drops Content-Encoding and Content-Length from a route handler's
 * answer and may compress it again itself, so an upstream's encoded bytes would reach the browser
 * under the wrong label. The web adapter therefore asks upstreams only for codings it can undo,
 * and undoes them before Next sees the body.
 */
const DECODERS: Record<string, () => Transform> = {
  gzip: createGunzip,
  'x-gzip': createGunzip,
  deflate: createInflate,
  br: createBrotliDecompress,
  // RFC 9659 caps a zstd content coding's window at 8 MiB, as browsers hold it to: a frame may
  // otherwise make its decoder reserve up to 128 MiB.
  zstd: () => createZstdDecompress({ params: { [zlibConstants.ZSTD_d_windowLogMax]: 23 } }),
};
/**
 * Codings stacked on one answer that the web adapter undoes: every stage is a decoder with its own
 * buffers, and an API (or a user who sets an object's metadata at one) could list thousands.
 */
const MAX_STACKED_CODINGS = 2;

/**
 * Codings whose decoder holds a large window for as long as its answer is open: up to 16 MiB for
 * brotli, 8 MiB for zstd (gzip and deflate: 32 KiB). Upstreams are not asked for them: Next
 * compresses for the browser anyway. One that sends them unasked (an object store keeping an
 * uploader's encoding) is still decoded.
 */
const LARGE_WINDOW_CODINGS = new Set(['br', 'zstd']);

/** The browser's Accept-Encoding, less the codings the web adapter could not undo (`*` included) or will not ask for. */
function decodableAcceptEncoding(value: string): string {
  const kept = value
    .split(',')
    .map((token) => token.trim())
    .filter((token) => {
      const coding = token.split(';')[0]?.trim().toLowerCase() ?? '';
      return coding === 'identity' || (Object.hasOwn(DECODERS, coding) && !LARGE_WINDOW_CODINGS.has(coding));
    });
  return kept.length ? kept.join(', ') : 'identity';
}

export function inboundFromWeb(request: Request, remoteAddress: string | undefined): InboundRequest {
  const url = new URL(request.url);
  const header = (name: string) => {
    const value = request.headers.get(name);
    if (value === null) return undefined;
    return name === 'accept-encoding' ? decodableAcceptEncoding(value) : value;
  };
  return {
    method: request.method,
    rawUrl: url.pathname + url.search,
    header,
    headerPairs: () => [...request.headers].map(([name, value]): [string, string] => [name, name === 'accept-encoding' ? decodableAcceptEncoding(value) : value]),
    remoteAddress,
    via: 'route',
    body: request.body && !BODYLESS.has(request.method) ? Readable.fromWeb(request.body as import('node:stream/web').ReadableStream) : null,
    signal: request.signal,
  };
}

/** The body with every content coding undone (codings apply in the order listed), or null for codings we cannot undo. */
function decodedBody(body: Readable, contentEncoding: string, requestId: string | null): Readable | null {
  const codings = contentEncoding.split(',').map((coding) => coding.trim().toLowerCase()).filter((coding) => coding && coding !== 'identity');
  if (codings.length > MAX_STACKED_CODINGS || !codings.every((coding) => Object.hasOwn(DECODERS, coding))) return null;
  let decoded = body;
  for (const coding of codings.reverse()) {
    const stage = (DECODERS[coding] as () => Transform)();
    const source = decoded;
    let passedOn: Error | undefined;
    source.on('error', (error) => stage.destroy((passedOn = error)));
    // The upstream's own errors are the proxy core's to report; bytes that do not decode are ours.
    stage.on('error', (error) => {
      if (error !== passedOn && !isOurAbort(error)) log('warn', 'proxy.upstream_body_failed', { requestId, coding, ...describeCause(error) });
    });
    // A stage gone before its input ended (the browser left, bytes that do not decode) ends that
    // input too: pipe() would only pause it, holding the API's connection and the call's slot.
    stage.once('close', () => {
      if (!source.destroyed && !source.readableEnded) source.destroy();
    });
    // And the other way: an input destroyed without an error (an answer dropped) ends its decoder.
    source.once('close', () => {
      if (!source.readableEnded && !stage.destroyed) stage.destroy();
    });
    decoded = source.pipe(stage);
  }
  return decoded;
}

/**
 * Runs `write`, dropping a streamed body if it throws: else the API's connection, the user's
 * open-call slot and the session's hold would stay until the API ends the body.
 */
function droppingBodyOnThrow<T>(answer: ProxyResponse, write: () => T): T {
  try {
    return write();
  } catch (error) {
    if (answer.body instanceof Readable) answer.body.destroy();
    throw error;
  }
}

export function webResponseFrom(answer: ProxyResponse): Response {
  return droppingBodyOnThrow(answer, () => webResponseOf(answer));
}

function webResponseOf(answer: ProxyResponse): Response {
  const headers = new Headers();
  for (const [name, value] of answer.headers) headers.append(name, value);
  const contentEncoding = headers.get('content-encoding');
  // A body read whole may still be encoded: it is undone like a streamed one.
  let upstreamBody = answer.body instanceof Uint8Array && contentEncoding !== null ? Readable.from([answer.body]) : answer.body;
  if (contentEncoding !== null && upstreamBody instanceof Readable) {
    const decoded = decodedBody(upstreamBody, contentEncoding, headers.get('x-request-id'));
    if (!decoded) {
      upstreamBody.destroy();
      const error = new GatehouseError('upstream_unavailable', 502, 'The API answered in an encoding that cannot be passed on.');
      return new Response(errorBody(error), { status: error.status, headers: [...Object.entries(jsonHeaders()), ...errorHeaders(error), ['x-request-id', headers.get('x-request-id') ?? '']] });
    }
    upstreamBody = decoded;
    headers.delete('content-encoding');
    headers.delete('content-length');
  }
  let body: BodyInit | null;
  if (upstreamBody === null || typeof upstreamBody === 'string' || upstreamBody instanceof Uint8Array) body = upstreamBody as BodyInit | null;
  else body = webStreamOf(upstreamBody);
  return new Response(body, { status: answer.status, headers });
}

/**
 * A streamed body as Next reads it, with backpressure (read one chunk, wait for the next pull).
 * The upstream breaking off mid-body (logged by the proxy core) reaches Next as an abort, as a
 * browser leaving would: any other error Next logs as a failed pipe, with its stack.
 */
function webStreamOf(body: Readable): ReadableStream<Uint8Array> {
  let settled = false;
  let started = false;
  let brokeOffBeforeItStarted: DOMException | undefined;
  return new ReadableStream<Uint8Array>({
    start(controller) {
      body.on('data', (chunk: Buffer) => {
        if (settled) return;
        started = true;
        controller.enqueue(chunk);
        if ((controller.desiredSize ?? 0) <= 0) body.pause();
      });
      // Its end, an error, or a destroy before the end (also one that came before this stream did).
      finished(body, { writable: false }, (error) => {
        if (settled) return;
        settled = true;
        if (!error) return controller.close();
        const brokeOff = new DOMException("The API's answer broke off.", 'AbortError');
        if (started) return controller.error(brokeOff);
        // Next sends the head with the first chunk: an empty one sends it, and the break follows
        // once that was taken, so the browser hears the status and a cut body as `npm start` gives.
        brokeOffBeforeItStarted = brokeOff;
        controller.enqueue(new Uint8Array(0));
      });
      body.pause();
    },
    pull(controller) {
      if (brokeOffBeforeItStarted) controller.error(brokeOffBeforeItStarted);
      else body.resume();
    },
    cancel() {
      settled = true;
      body.destroy();
    },
  });
}

export function inboundFromNode(request: IncomingMessage, response: ServerResponse): InboundRequest {
  const controller = new AbortController();
  // The response closing before it finished means the browser went away: stop the upstream too.
  response.once('close', () => {
    if (!response.writableFinished) controller.abort();
  });
  return {
    method: request.method ?? 'GET',
    rawUrl: request.url ?? '/',
    header: (name) => {
      const value = request.headers[name];
      return Array.isArray(value) ? value.join(', ') : value;
    },
    // An array, not a generator: a generator per request made V8 promote every request's objects
    // out of the young generation (scavenges of ~10 ms, the -c1 p99 tail, an old generation
    // growing by tens of MB a second); measured with --trace-gc on the fast path.
    headerPairs: () => {
      const raw = request.rawHeaders;
      const pairs: Array<[string, string]> = [];
      for (let i = 0; i < raw.length; i += 2) pairs.push([raw[i] as string, raw[i + 1] as string]);
      return pairs;
    },
    remoteAddress: request.socket.remoteAddress,
    via: 'fast-path',
    body: BODYLESS.has(request.method ?? 'GET') ? null : request,
    signal: controller.signal,
  };
}

/** Only large bodies are counted; a small one is over before it could matter. */
const LARGE_BODY_BYTES = 1024 * 1024;

export function writeNodeResponse(answer: ProxyResponse, response: ServerResponse): void {
  // Names and values in turn: Node takes repeated names (Set-Cookie) that way too.
  droppingBodyOnThrow(answer, () => response.writeHead(answer.status, answer.headers.flat()));
  if (answer.body === null || typeof answer.body === 'string' || answer.body instanceof Uint8Array) {
    response.end(answer.body ?? undefined);
    return;
  }
  // pipe() keeps backpressure. (stream.pipeline would too, but it builds an AbortController and a
  // DOMException per response, which showed in the hot-path profile.) Teardown is ours: a browser
  // that leaves drops the upstream body, an upstream that breaks mid-body cuts the response.
  const body = answer.body;
  const declaredLength = answer.headers.find(([name]) => name === 'content-length')?.[1];
  if (declaredLength === undefined || Number(declaredLength) >= LARGE_BODY_BYTES) body.on('data', (chunk: Buffer) => noteStreamedBytes(chunk.length));
  const cut = () => {
    // A body that breaks off before its first byte still owes the browser the API's status (this
    // sends the head if it still waits for that byte, and nothing otherwise); except where the
    // answer's end is the connection's (HTTP/1.0, no length), since there a head and a close
    // would read as a whole, empty answer.
    if (response.chunkedEncoding || declaredLength !== undefined) response.flushHeaders();
    response.destroy();
  };
  body.once('error', cut);
  // Broken off before this listener came: pipe() would wait on it forever. (stream.finished covers
  // both, with more listeners and closures on every proxied answer.)
  if (body.destroyed) return cut();
  response.once('close', () => {
    if (!body.readableEnded) body.destroy();
  });
  body.pipe(response);
}
