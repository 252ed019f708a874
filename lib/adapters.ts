import type { IncomingMessage, ServerResponse } from 'node:http';
import { Readable } from 'node:stream';
import { noteStreamedBytes, type InboundRequest, type ProxyResponse } from './proxy.ts';

/**
 * The two ways a request reaches the proxy core: a Web `Request` (Next route handler, Vercel) and
 * a Node `IncomingMessage` (the fast-path server). Only shape conversion lives here.
 */

const BODYLESS = new Set(['GET', 'HEAD']);

export function inboundFromWeb(request: Request, remoteAddress: string | undefined): InboundRequest {
  const url = new URL(request.url);
  return {
    method: request.method,
    rawUrl: url.pathname + url.search,
    header: (name) => request.headers.get(name) ?? undefined,
    headerPairs: () => request.headers.entries(),
    remoteAddress,
    body: request.body && !BODYLESS.has(request.method) ? Readable.fromWeb(request.body as import('node:stream/web').ReadableStream) : null,
    signal: request.signal,
  };
}

/** Bodies this small, with a declared length, are read whole: a web stream costs more per chunk than they take to arrive. */
const SMALL_BODY_BYTES = 64 * 1024;

export async function webResponseFrom(answer: ProxyResponse): Promise<Response> {
  const headers = new Headers();
  for (const [name, value] of answer.headers) headers.append(name, value);
  let body: BodyInit | null;
  if (answer.body === null || typeof answer.body === 'string') body = answer.body;
  else if (Number(headers.get('content-length') ?? Infinity) <= SMALL_BODY_BYTES) body = Buffer.concat(await answer.body.toArray());
  else body = Readable.toWeb(answer.body) as unknown as ReadableStream<Uint8Array>;
  return new Response(body, { status: answer.status, headers });
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
    headerPairs: function* () {
      const raw = request.rawHeaders;
      for (let i = 0; i < raw.length; i += 2) yield [raw[i] as string, raw[i + 1] as string];
    },
    remoteAddress: request.socket.remoteAddress,
    body: BODYLESS.has(request.method ?? 'GET') ? null : request,
    signal: controller.signal,
  };
}

/** Only large bodies are counted; a small one is over before it could matter. */
const LARGE_BODY_BYTES = 1024 * 1024;

export function writeNodeResponse(answer: ProxyResponse, response: ServerResponse): void {
  const headers: Record<string, string | string[]> = {};
  for (const [name, value] of answer.headers) {
    const existing = headers[name];
    headers[name] = existing === undefined ? value : Array.isArray(existing) ? [...existing, value] : [existing, value];
  }
  response.writeHead(answer.status, headers);
  if (answer.body === null || typeof answer.body === 'string') {
    response.end(answer.body ?? undefined);
    return;
  }
  // pipe() keeps backpressure. (stream.pipeline would too, but it builds an AbortController and a
  // DOMException per response, which showed in the hot-path profile.) Teardown is ours: a browser
  // that leaves drops the upstream body, an upstream that breaks mid-body cuts the response.
  const body = answer.body;
  const declaredLength = answer.headers.find(([name]) => name === 'content-length')?.[1];
  if (declaredLength === undefined || Number(declaredLength) >= LARGE_BODY_BYTES) body.on('data', (chunk: Buffer) => noteStreamedBytes(chunk.length));
  body.once('error', () => response.destroy());
  response.once('close', () => {
    if (!body.readableEnded) body.destroy();
  });
  body.pipe(response);
}
