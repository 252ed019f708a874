// The upstream client (lib/proxy.ts `exchange`, `sendUpstreamUntraced`) from outside: raw requests
// through a real server to scripted raw upstreams, for what README.md promises about resends,
// interim answers, stalled bodies and a full connection pool. Found by an attacker's review of the
// move to undici; each failed on that first version.
import type { Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import { waitFor } from '../support/http-client.ts';
import { openRawRequest, rawRequest, requestHead, type OpenRawRequest } from '../support/raw-http.ts';
import { rawAnswer, startScriptedUpstream, type ScriptedUpstream } from '../support/scripted-upstream.ts';

let stack: Stack;
let appPort: number;
let appHost: string;
/** Resets the first connection's first request, unanswered, after reading it; answers everything else. */
let crashing: ScriptedUpstream;
/** Announces a small body (100 bytes), sends 10, and never the rest. */
let stalling: ScriptedUpstream;
/** Answers `/stream` with a chunked head and one chunk and never ends it; answers anything else at once. */
let streaming: ScriptedUpstream;
const stalledSockets = new Set<Socket>();
/** Sends an informational answer (103 Early Hints, or 102 Processing) before its final 200, as RFC 9110 §15.2 allows. */
let hinting: ScriptedUpstream;

const head = (method: string, target: string) =>
  requestHead(method, target, [
    ['Host', appHost],
    ['X-CSRF', '1'],
    ['Connection', 'close'],
  ]);

/** The answer's head within `ms`, or 'nothing' when none came. */
async function headWithin(open: OpenRawRequest, ms: number): Promise<string> {
  const timer = new Promise<string>((resolve) => setTimeout(() => resolve('nothing'), ms));
  return Promise.race([open.head.then((text) => text ?? 'closed without an answer'), timer]);
}

beforeAll(async () => {
  crashing = await startScriptedUpstream((request, socket) => {
    // The upstream read (and may have acted on) the request, then its process died: a fresh connection, reset.
    if (request.connection === 1 && request.nth === 1) return void socket.resetAndDestroy();
    socket.write(rawAnswer('HTTP/1.1 200 OK', [['content-type', 'application/json']], JSON.stringify({ connection: request.connection })));
  });
  stalling = await startScriptedUpstream((_request, socket) => {
    stalledSockets.add(socket);
    socket.on('close', () => stalledSockets.delete(socket));
    socket.write('HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\n0123456789');
  });
  streaming = await startScriptedUpstream((request, socket) => {
    if (request.path === '/stream') socket.write('HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata:\n\r\n');
    else socket.write(rawAnswer('HTTP/1.1 200 OK', [['content-type', 'text/plain']], 'quick'));
  });
  hinting = await startScriptedUpstream((request, socket) => {
    const informational = request.path === '/processing' ? 'HTTP/1.1 102 Processing\r\n\r\n' : 'HTTP/1.1 103 Early Hints\r\nlink: </app.css>; rel=preload; as=style\r\n\r\n';
    socket.write(informational + rawAnswer('HTTP/1.1 200 OK', [['content-type', 'application/json']], '{"ok":true}'));
  });
  stack = await startStack({
    workers: 1,
    // One test address fills all 512 of an API's connections here: calls without a session count
    // per address, 256 by default.
    env: { PROXY_MAX_CALLS_PER_USER: '1024' },
    apis: () => ({
      crashing: { url: crashing.url, auth: 'none' },
      hinting: { url: hinting.url, auth: 'none' },
      stalling: { url: stalling.url, auth: 'none', timeoutMs: 500 },
      streaming: { url: streaming.url, auth: 'none', timeoutMs: 500 },
    }),
  });
  const first = stack.apps[0];
  if (!first) throw new Error('no Gatehouse instance');
  appPort = Number(new URL(first.url).port);
  appHost = new URL(first.url).host;
});

afterAll(async () => {
  await stack?.stop();
  await crashing?.close();
  await hinting?.close();
  await stalling?.close();
  await streaming?.close();
});

describe('upstream exchanges', () => {
  // README: a bodiless idempotent request is sent again only when a *reused* connection breaks. A
  // fresh connection that breaks after the upstream read the request may have reached an upstream
  // that acted on it.
  it('a DELETE whose fresh upstream connection breaks after the upstream read it is not sent a second time', async () => {
    const res = await rawRequest(appPort, head('DELETE', '/api/proxy/crashing/orders/42'));
    expect(crashing.requests.map(({ line, connection }) => ({ line, connection }))).toEqual([{ line: 'DELETE /orders/42 HTTP/1.1', connection: 1 }]);
    expect(res?.status).toBe(502);
    expect(res?.get('x-gatehouse-error')).toBe('upstream_unavailable');
  });

  // An interim head (1xx) comes before the final answer (RFC 9110 §15.2): the browser gets the final one.
  it('an informational 103 Early Hints (or 102 Processing) before the final answer: the browser gets the final 200 and its body', async () => {
    for (const path of ['hinted', 'processing']) {
      const res = await rawRequest(appPort, head('GET', `/api/proxy/hinting/${path}`));
      expect({ path, status: res?.status, error: res?.get('x-gatehouse-error'), body: res?.body }).toEqual({ path, status: 200, error: undefined, body: '{"ok":true}' });
    }
  });

  // Only what arrives with the head is gathered whole: a body that stalls must not hold the head back.
  it('a small answer whose body stalls after the head: the browser hears something (its head, or 504) within a few seconds, timeoutMs being 500 ms', async () => {
    const open = await openRawRequest(appPort, head('GET', '/api/proxy/stalling/report'));
    try {
      await waitFor('the upstream to be asked', () => (stalling.requests.length > 0 ? true : undefined), 5_000, 25);
      expect(await headWithin(open, 4_000)).toMatch(/^HTTP\/1\.1 (200|504) /);
    } finally {
      open.leave();
    }
  });

  // README: 504 upstream_timeout when the API did not answer within its timeoutMs, which counts the
  // wait for one of the API's 512 connections too (event streams hold them all here).
  it('with all 512 upstream connections streaming, another call to the API is still answered (504) within timeoutMs, not queued forever', async () => {
    const streams: OpenRawRequest[] = [];
    try {
      for (let i = 0; i < 512; i++) streams.push(await openRawRequest(appPort, head('GET', `/api/proxy/streaming/stream?i=${i}`)));
      await waitFor('512 streams to be open upstream', () => (streaming.requests.length >= 512 ? true : undefined), 30_000, 50);
      const started = performance.now();
      const res = await rawRequest(appPort, head('GET', '/api/proxy/streaming/quick'), 6_000).catch((error: unknown) => error as Error);
      expect(res instanceof Error ? res.message.split('\n')[0] : res?.status).toBe(504);
      expect(performance.now() - started).toBeLessThan(3_000);
    } finally {
      for (const stream of streams) stream.leave();
    }
  }, 60_000);
});
