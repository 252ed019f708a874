// What one browser may hold of the proxy, from outside: PROXY_MAX_CALLS_PER_USER (calls of one
// user open at once, over all their sessions) and PROXY_SEND_TIMEOUT_MS (how long an answer waits for the browser to take
// more of it). Without them one signed-in browser that opens calls and reads none of their answers
// holds its API's whole connection pool, and everyone's calls to that API wait (an attacker's review).
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultServerShape, startStack, type Stack } from '../../e2e/support/stack.ts';
import { logSoFar, login, serverHoldsConnection, waitFor } from '../support/http-client.ts';
import { requestHead } from '../support/raw-http.ts';

const MAX_CALLS = 3;
const SEND_TIMEOUT_MS = 1_000;

let stack: Stack;
let app: string;
let appPort: number;
let cookie: string;
/** The same user signed in again: a second session. */
let secondCookie: string;
let otherCookie: string;

beforeAll(async () => {
  stack = await startStack({
    workers: 1,
    env: { PROXY_MAX_CALLS_PER_USER: String(MAX_CALLS), PROXY_SEND_TIMEOUT_MS: String(SEND_TIMEOUT_MS) },
    // `machine` takes calls without a session (the BFF's own token): anyone can make them.
    apis: ({ apiUrl }) => ({ demo: { url: apiUrl }, machine: { url: apiUrl, auth: 'client' } }),
  });
  app = stack.apps[0]!.url;
  appPort = Number(new URL(app).port);
  cookie = await login(app, 'limits-user');
  secondCookie = await login(app, 'limits-user');
  otherCookie = await login(app, 'limits-other-user');
});

afterAll(async () => {
  await stack?.stop();
});

const demoStats = async () => (await (await fetch(`${stack.apiUrl}/__demo/stats`)).json()) as { downloadsCut: number };
const call = (path: string, from = cookie, init: RequestInit = {}) => fetch(`${app}${path}`, { ...init, headers: { cookie: from, 'x-csrf': '1' } });

/** An event stream that stays open (one event a minute) until `leave` is called. */
async function openStream(from = cookie): Promise<{ status: number; response: Response; leave: () => void }> {
  const controller = new AbortController();
  const response = await call('/api/proxy/demo/events?count=100&intervalMs=60000', from, { signal: controller.signal });
  // Its body is left unread, and the response kept: undici cancels the body of a response that is
  // collected, which would end the call.
  return { status: response.status, response, leave: () => controller.abort() };
}

/** A raw connection asking for a download, reading its answer only when told to. */
async function download(bytes: number): Promise<{ socket: Socket; received: () => number; head: Promise<string> }> {
  const socket = connect(appPort, '127.0.0.1');
  await once(socket, 'connect');
  let received = 0;
  let text = '';
  const head = new Promise<string>((resolve) => {
    socket.on('data', (chunk: Buffer) => {
      received += chunk.length;
      if (text.length < 4096) {
        text += chunk.toString('latin1', 0, Math.min(chunk.length, 4096));
        if (text.includes('\r\n\r\n')) resolve(text.slice(0, text.indexOf('\r\n\r\n')));
      }
    });
  });
  socket.on('error', () => undefined);
  socket.write(requestHead('GET', `/api/proxy/demo/download?bytes=${bytes}`, [['Host', new URL(app).host], ['Cookie', cookie], ['X-CSRF', '1']]));
  return { socket, received: () => received, head };
}

describe('calls of one user open at once', () => {
  it(`are at most PROXY_MAX_CALLS_PER_USER over all their sessions: the next hears 429 too_many_calls, other users do not, and every way a call ends frees its place`, async () => {
    const streams = [await openStream(), await openStream(secondCookie), await openStream()];
    expect(streams.map((stream) => stream.status)).toEqual([200, 200, 200]);

    const refused = await call('/api/proxy/demo/whoami');
    expect(refused.status).toBe(429);
    expect(await refused.json()).toEqual({ error: 'too_many_calls', message: `At most ${MAX_CALLS} calls of one user (or, without a session, of one address) may be open at once.` });
    expect(refused.headers.get('retry-after')).toBe('1');
    expect(refused.headers.get('x-gatehouse-error')).toBe('too_many_calls');
    // Signing in again gives no more of it.
    expect((await call('/api/proxy/demo/whoami', secondCookie)).status).toBe(429);
    // Another user's calls are not counted against this one.
    expect((await call('/api/proxy/demo/whoami', otherCookie)).status).toBe(200);

    // The browser leaving a stream frees its place.
    streams[0]!.leave();
    await waitFor('a place to be freed', async () => ((await call('/api/proxy/demo/whoami')).status === 200 ? true : undefined), 5_000, 50);
    for (const stream of streams) stream.leave();

    // Answers that end every other way (whole, bodiless, HEAD, an API's error) leave nothing
    // counted: afterwards three streams open again, and no fourth.
    await waitFor('every stream to be let go', async () => {
      const probes = await Promise.all([openStream(), openStream(), openStream()]);
      for (const probe of probes) probe.leave();
      return probes.every((probe) => probe.status === 200) ? true : undefined;
    }, 5_000, 50);
    for (let round = 0; round < 4; round++) {
      for (const path of ['/api/proxy/demo/whoami', '/api/proxy/demo/status/204', '/api/proxy/demo/status/503', '/api/proxy/demo/download?bytes=2000000']) {
        const response = await call(path);
        await response.arrayBuffer();
      }
      expect((await call('/api/proxy/demo/whoami', cookie, { method: 'HEAD' })).status).toBe(200);
    }
    const again = [await openStream(), await openStream(), await openStream()];
    expect(again.map((stream) => stream.status)).toEqual([200, 200, 200]);
    expect((await call('/api/proxy/demo/whoami')).status).toBe(429);
    for (const stream of again) stream.leave();
  });
});

describe('calls without a session', () => {
  it(`${defaultServerShape() === 'next' ? 'next start warns at start-up that they share one count per process without TRUSTED_PROXY_HOPS (a route handler is never told the socket’s peer)' : 'npm start, which counts them by the socket’s peer, gives no such warning'}`, () => {
    const warned = stack.apps[0]!.process.output().includes('"event":"server.anonymous_calls_share_one_count"');
    expect(warned).toBe(defaultServerShape() === 'next');
  });

  it('count per client address, as one user’s do: the next hears 429 too_many_calls, and users’ own calls are not held back', async () => {
    const controllers: AbortController[] = [];
    const anonymous = async (path: string) => {
      const controller = new AbortController();
      controllers.push(controller);
      return fetch(`${app}${path}`, { headers: { 'x-csrf': '1' }, signal: controller.signal });
    };
    try {
      const streams = [];
      for (let i = 0; i < MAX_CALLS; i++) streams.push(await anonymous('/api/proxy/machine/events?count=100&intervalMs=60000'));
      expect(streams.map((stream) => stream.status)).toEqual(Array(MAX_CALLS).fill(200));
      const refused = await anonymous('/api/proxy/machine/whoami');
      expect(refused.status).toBe(429);
      expect(await refused.json()).toMatchObject({ error: 'too_many_calls' });
      expect((await call('/api/proxy/demo/whoami', otherCookie)).status).toBe(200);
    } finally {
      for (const controller of controllers) controller.abort();
    }
    await waitFor('the places to be freed', async () => {
      const answer = await fetch(`${app}/api/proxy/machine/whoami`, { headers: { 'x-csrf': '1' } });
      await answer.arrayBuffer();
      return answer.status === 200 ? true : undefined;
    }, 5_000, 50);
  });
});

describe('an answer the browser stops taking', () => {
  it('ends after PROXY_SEND_TIMEOUT_MS, and says so in the log', async () => {
    const logBefore = stack.apps[0]!.process.output().length;
    const cutBefore = (await demoStats()).downloadsCut;
    const stalled = await download(512 * 1024 * 1024);
    expect(await stalled.head).toMatch(/^HTTP\/1\.1 200/);
    stalled.socket.pause();
    const localPort = stalled.socket.localPort as number;
    // The API's connection is let go: the demo API sees its download cut.
    await waitFor('the API to see its answer cut', async () => ((await demoStats()).downloadsCut > cutBefore ? true : undefined), 15_000, 100);
    if (defaultServerShape() === 'fast') {
      // npm start also closes the browser's connection. Under next start Next waits for the
      // browser to drain what it wrote before it reads on and finds the answer ended: the
      // connection stays until the browser leaves, holding no API connection and no call's place.
      await waitFor('the server to end the stalled answer', () => (serverHoldsConnection(appPort, localPort) ? undefined : true), 5_000, 100);
    }
    stalled.socket.destroy();
    expect(stalled.received()).toBeLessThan(512 * 1024 * 1024);
    const logged = await logSoFar(app, cookie, () => stack.apps[0]!.process.output(), logBefore);
    expect(logged).toMatch(/"event":"proxy\.send_timeout".*"api":"demo"/);
    // Its place among the session's calls is free again.
    await waitFor('the place to be freed', async () => {
      const probes = await Promise.all([openStream(), openStream(), openStream()]);
      for (const probe of probes) probe.leave();
      return probes.every((probe) => probe.status === 200) ? true : undefined;
    }, 5_000, 50);
  });

  it('is never cut while the browser keeps taking it, however often it pauses for less than the timeout', async () => {
    const logBefore = stack.apps[0]!.process.output().length;
    const bytes = 256 * 1024 * 1024;
    const steady = await download(bytes);
    const head = await steady.head;
    expect(head).toMatch(/^HTTP\/1\.1 200/);
    const total = head.length + 4 + bytes;
    // Reads in bursts of 20 ms with 600 ms between them: each pause is shorter than the timeout,
    // and the answer takes many of them, longer than the timeout in all.
    let pauses = 0;
    const started = Date.now();
    while (steady.received() < total) {
      if (steady.socket.destroyed) throw new Error(`cut after ${steady.received()} of ${total} bytes`);
      steady.socket.resume();
      await new Promise((resolve) => setTimeout(resolve, 20));
      steady.socket.pause();
      if (steady.received() >= total) break;
      pauses += 1;
      await new Promise((resolve) => setTimeout(resolve, 600));
      if (Date.now() - started > 45_000) throw new Error(`only ${steady.received()} of ${total} bytes in 45 s`);
    }
    steady.socket.destroy();
    expect(pauses * 600).toBeGreaterThan(2 * SEND_TIMEOUT_MS);
    const logged = await logSoFar(app, cookie, () => stack.apps[0]!.process.output(), logBefore);
    expect(logged).not.toContain('proxy.send_timeout');
  }, 60_000);
});
