// WebSockets through /api/proxy on `npm start`, end to end: real IdP, real Redis, the demo API as
// the upstream (it verifies the bearer and records what reached it), Gatehouse's production build.
// The browser is played by `ws`'s client, which can set Cookie and Origin the way a browser sends
// them; Node's own WebSocket cannot set either.
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket, WebSocketServer } from 'ws';
import { rssBytes } from '../../bench/lib.ts';
import { freePort, startGatehouse, startStack, type Stack } from '../../e2e/support/stack.ts';
import type { DemoSocketRecord } from '../../scripts/demo-api.ts';
import { loginThroughRp, type CookieJars } from '../../e2e/support/headless-login.ts';
import { rawRequest } from '../support/raw-http.ts';
import { RedisProbe, call, clearsSessionCookie, idpGrants, login, processTree, refreshGrantsOf, waitFor } from '../support/http-client.ts';

const MiB = 1024 * 1024;
const CHECK_INTERVAL_SEC = 2;
const ACCESS_TOKEN_TTL_SEC = 40;
const REFRESH_SKEW_SEC = 35;
const SESSION_ENDED = 4401;
const STEP_UP = 4403;
const MFA = 'urn:gatehouse:mfa';
/** The `maxAge` of the `fresh` API: a socket opened right after sign-in outlives it within the test. */
const FRESH_MAX_AGE_SEC = 6;
const BACKCHANNEL_EVENT = 'http://schemas.openid.net/event/backchannel-logout';

let stack: Stack;
let app: string;
let probe: RedisProbe;
/**
 * A plain `ws` server as an API, counting the pings that reach it. It answers every ping with a
 * pong however many are still unsent, as many servers do (older `ws`, gorilla, uWS); `ws` 8 would
 * otherwise drop a connection with 60 pongs pending, and with it any test of what piles up here.
 */
let plainApi: WebSocketServer;
let pingsAtPlainApi = 0;

beforeAll(async () => {
  const closedPort = await freePort();
  // An option of ws 8.23 that @types/ws does not list yet.
  const uncapped: Record<string, unknown> = { maxPendingAutoPongs: 0 };
  plainApi = new WebSocketServer({ port: 0, host: '127.0.0.1', ...uncapped });
  await new Promise((resolve) => plainApi.once('listening', resolve));
  plainApi.on('connection', (ws) => ws.on('ping', () => (pingsAtPlainApi += 1)));
  stack = await startStack({
    workers: 1,
    accessTokenTtl: ACCESS_TOKEN_TTL_SEC,
    resourceApis: 1,
    env: { LOG_LEVEL: 'info', TOKEN_REFRESH_SKEW: String(REFRESH_SKEW_SEC), WEBSOCKET_SESSION_CHECK_INTERVAL: String(CHECK_INTERVAL_SEC) },
    apis: ({ apiUrl, resourceApiUrls }) => ({
      live: { url: apiUrl, websocket: true },
      small: { url: apiUrl, websocket: true, maxBodyBytes: 1024 },
      medium: { url: apiUrl, websocket: true, maxBodyBytes: 64 * 1024 },
      demo: { url: apiUrl },
      // The resource API wants a token for its own audience: the session's default token is refused there.
      otheraudience: { url: resourceApiUrls[0], websocket: true },
      dead: { url: `http://127.0.0.1:${closedPort}`, websocket: true },
      strong: { url: apiUrl, websocket: true, acr: MFA },
      fresh: { url: apiUrl, websocket: true, maxAge: FRESH_MAX_AGE_SEC },
      plain: { url: `http://127.0.0.1:${(plainApi.address() as net.AddressInfo).port}`, websocket: true },
    }),
  });
  app = stack.apps[0]!.url;
  probe = new RedisProbe(stack.keyPrefix);
});

afterAll(async () => {
  await probe?.close();
  await stack?.stop();
  plainApi?.close();
});

// ---------------------------------------------------------------------------------------------
// A browser's side of a socket.

interface Message {
  data: Buffer;
  binary: boolean;
}

/** An open socket as the test sees it: messages queued until read, the close once it came. */
class BrowserSocket {
  readonly ws: WebSocket;
  readonly requestId: string | undefined;
  private readonly queue: Message[] = [];
  private waiters: Array<(message: Message) => void> = [];
  closed: Promise<{ code: number; reason: string; at: number }>;

  constructor(ws: WebSocket, requestId: string | undefined) {
    this.ws = ws;
    this.requestId = requestId;
    ws.on('message', (data, binary) => {
      const message = { data: data as Buffer, binary };
      const waiter = this.waiters.shift();
      if (waiter) waiter(message);
      else this.queue.push(message);
    });
    this.closed = new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString(), at: Date.now() })));
  }

  next(timeoutMs = 5_000): Promise<Message> {
    const queued = this.queue.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no message within the time allowed')), timeoutMs);
      this.waiters.push((message) => {
        clearTimeout(timer);
        resolve(message);
      });
    });
  }

  async nextText(timeoutMs?: number): Promise<string> {
    const message = await this.next(timeoutMs);
    expect(message.binary).toBe(false);
    return message.data.toString();
  }
}

interface Refusal {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

interface ConnectOptions {
  cookie?: string;
  /** The Origin header; null sends none. Default: the app's own. */
  origin?: string | null;
  protocols?: string[];
  headers?: Record<string, string>;
  base?: string;
}

/** A WebSocket handshake as a browser on the app's page would make it: an open socket, or the refusal. */
function connect(path: string, { cookie, origin, protocols = [], headers = {}, base = app }: ConnectOptions = {}): Promise<BrowserSocket | Refusal> {
  return new Promise((resolve, reject) => {
    const url = `${base.replace(/^http/, 'ws')}${path}`;
    const allHeaders = { ...headers, ...(cookie ? { cookie } : {}) };
    const sentOrigin = origin === undefined ? base : origin;
    const ws = new WebSocket(url, protocols, { headers: allHeaders, ...(sentOrigin === null ? {} : { origin: sentOrigin }), perMessageDeflate: false });
    let requestId: string | undefined;
    ws.once('upgrade', (response) => (requestId = response.headers['x-request-id'] as string | undefined));
    ws.once('open', () => resolve(new BrowserSocket(ws, requestId)));
    ws.once('unexpected-response', (_request, response) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => (body += chunk));
      response.on('end', () => resolve({ status: response.statusCode ?? 0, headers: response.headers, body }));
      response.on('error', reject);
    });
    ws.once('error', reject);
  });
}

async function open(path: string, options: ConnectOptions): Promise<BrowserSocket> {
  const result = await connect(path, options);
  if (!(result instanceof BrowserSocket)) throw new Error(`expected an open socket, got ${result.status} ${result.body}`);
  return result;
}

async function refused(path: string, options: ConnectOptions): Promise<Refusal & { json: { error?: string; message?: string } }> {
  const result = await connect(path, options);
  if (result instanceof BrowserSocket) {
    result.ws.terminate();
    throw new Error('expected a refusal, the socket opened');
  }
  return { ...result, json: JSON.parse(result.body) as { error?: string; message?: string } };
}

async function demoSockets(): Promise<{ upgrades: number; sockets: DemoSocketRecord[] }> {
  return (await (await fetch(`${stack.apiUrl}/__demo/ws`)).json()) as { upgrades: number; sockets: DemoSocketRecord[] };
}

/** The demo API's record of the socket Gatehouse opened for `requestId`. */
async function upstreamRecord(requestId: string | undefined): Promise<DemoSocketRecord> {
  return waitFor('the upstream to record the socket', async () => (await demoSockets()).sockets.find((record) => record.headers['x-request-id'] === requestId), 2_000);
}

async function upstreamClose(requestId: string | undefined): Promise<{ code: number; reason: string }> {
  return waitFor('the upstream to see the socket close', async () => (await upstreamRecord(requestId)).closed, 5_000);
}

/** Refusals must be Gatehouse's own: its JSON error shape, its header, its request id. */
function expectGatehouseRefusal(refusal: Refusal & { json: { error?: string } }, status: number, code: string): void {
  expect({ status: refusal.status, error: refusal.json.error }).toEqual({ status, error: code });
  expect(refusal.headers['x-gatehouse-error']).toBe(code);
  expect(refusal.headers['content-type']).toMatch(/^application\/json/);
  expect(refusal.headers['x-request-id']).toEqual(expect.any(String));
}

// ---------------------------------------------------------------------------------------------

describe('the relay', () => {
  let cookie: string;
  beforeAll(async () => {
    cookie = await login(app, 'ws-user');
  });

  it('passes on what the API sends as the socket opens, in the same packet as its 101 (a greeting, as Socket.IO sends one), before any echo', async () => {
    for (const hello of ['welcome', 'x'.repeat(2_000)]) {
      const socket = await open(`/api/proxy/live/ws?hello=${hello}`, { cookie });
      expect((await socket.nextText()).length, 'the greeting').toBe(hello.length);
      socket.ws.send('after the greeting');
      expect(await socket.nextText()).toBe('after the greeting');
      socket.ws.close();
      expect((await socket.closed).code).toBe(1005);
    }
  });

  it('echoes text and binary messages through the proxy; the upstream verified the bearer and saw no browser credentials', async () => {
    const socket = await open('/api/proxy/live/ws', { cookie, protocols: ['chat.v2', 'chat.v1'], headers: { 'x-csrf': '1', 'accept-language': 'de', sec_websocket_protocol: 'smuggled', Sec_WebSocket_Key: 'smuggled' } });
    // The upstream chose the first subprotocol offered; the browser hears its choice.
    expect(socket.ws.protocol).toBe('chat.v2');
    socket.ws.send('hello through Gatehouse');
    expect(await socket.next()).toEqual({ data: Buffer.from('hello through Gatehouse'), binary: false });
    const bytes = Buffer.from([0, 1, 2, 254, 255]);
    socket.ws.send(bytes);
    expect(await socket.next()).toEqual({ data: bytes, binary: true });
    socket.ws.send('!whoami');
    expect(JSON.parse(await socket.nextText())).toMatchObject({ sub: 'ws-user', protocol: 'chat.v2', headers: { authorization: 'Bearer [redacted]' } });

    const record = await upstreamRecord(socket.requestId);
    expect(record.sub).toBe('ws-user');
    expect(record.headers.authorization).toMatch(/^Bearer [\w-]+\.[\w-]+\.[\w-]+$/);
    expect(record.headers.cookie).toBeUndefined();
    expect(record.headers['x-csrf']).toBeUndefined();
    expect(record.headers['accept-language']).toBe('de');
    expect(record.headers.origin).toBe(app);
    expect(record.headers['x-forwarded-host']).toBe(new URL(app).host);
    // Compression is not negotiated on either side.
    expect(record.headers['sec-websocket-extensions']).toBeUndefined();
    // Nor the handshake's headers spelled with underscores, which CGI-style servers read as the real ones.
    expect(Object.keys(record.headers).filter((name) => /^sec_websocket_/i.test(name))).toEqual([]);

    socket.ws.close(1000, 'bye');
    expect(await socket.closed).toMatchObject({ code: 1000, reason: 'bye' });
    expect(await upstreamClose(socket.requestId)).toEqual({ code: 1000, reason: 'bye' });
  });

  it('passes the upstream’s close code and reason to the browser', async () => {
    const socket = await open('/api/proxy/live/ws', { cookie });
    socket.ws.send('!close 4000 see you');
    expect(await socket.closed).toMatchObject({ code: 4000, reason: 'see you' });
  });

  it('an API cannot speak for Gatehouse: its close with 4401 or 4403 reaches the browser as 1011, without its reason', async () => {
    for (const code of [SESSION_ENDED, STEP_UP]) {
      const socket = await open('/api/proxy/live/ws', { cookie });
      socket.ws.send(`!close ${code} session ended, sign in again`);
      expect(await socket.closed).toMatchObject({ code: 1011, reason: '' });
    }
  });

  it('a message over the API’s maxBodyBytes closes the socket with 1009', async () => {
    const socket = await open('/api/proxy/small/ws', { cookie });
    socket.ws.send(Buffer.alloc(1000));
    expect((await socket.next()).data.length).toBe(1000);
    socket.ws.send(Buffer.alloc(2000));
    expect((await socket.closed).code).toBe(1009);
    expect((await upstreamClose(socket.requestId)).code).toBe(1009);
  });

  it('a message the browser never finishes, sent a byte at a time, or in one-byte frames, closes the socket with 1008 once it has come in more pieces than its size allows', async () => {
    const { port } = new URL(app);
    const raw = net.connect(Number(port), '127.0.0.1');
    await new Promise((resolve) => raw.once('connect', resolve));
    raw.setNoDelay(true);
    let received = Buffer.alloc(0);
    let closed = false;
    raw.on('data', (chunk: Buffer) => (received = Buffer.concat([received, chunk])));
    raw.once('close', () => (closed = true));
    raw.write(`GET /api/proxy/medium/ws HTTP/1.1\r\nHost: localhost:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\nOrigin: ${app}\r\nCookie: ${cookie}\r\n\r\n`);
    await waitFor('the 101', () => (received.includes('\r\n\r\n') ? true : undefined), 5_000);
    expect(received.toString('latin1').split('\r\n')[0]).toBe('HTTP/1.1 101 Switching Protocols');
    received = received.subarray(received.indexOf('\r\n\r\n') + 4);
    // A masked binary frame announcing 60,000 bytes (under the API's 64 KiB), then its payload one
    // byte per write: 1,024 reads at most, where `ws`'s own limit allowed 262,144.
    const header = Buffer.alloc(8);
    header[0] = 0x82;
    header[1] = 0x80 | 126;
    header.writeUInt16BE(60_000, 2);
    header.set([1, 2, 3, 4], 4);
    raw.write(header);
    let sent = 0;
    for (; !closed && received.length === 0 && sent < 59_999; sent += 1) {
      raw.write(Buffer.of(0x41));
      await new Promise(setImmediate);
    }
    await waitFor('the close frame', () => (received.length >= 4 ? true : undefined), 5_000);
    expect([received[0], received.readUInt16BE(2)]).toEqual([0x88, 1008]);
    expect(sent).toBeLessThan(59_999);
    raw.destroy();

    // One-byte frames of one message (each frame keeps the read it came in): 64 at most from a browser here.
    const fragments = await open('/api/proxy/medium/ws', { cookie });
    const mask = Buffer.from([5, 6, 7, 8]);
    const frame = (first: boolean) => Buffer.concat([Buffer.from([first ? 0x02 : 0x00, 0x80 | 1]), mask, Buffer.of(0x41 ^ 5)]);
    const socket = (fragments.ws as unknown as { _socket: net.Socket })._socket;
    socket.write(frame(true));
    for (let i = 1; i < 200; i++) socket.write(frame(false));
    expect((await fragments.closed).code).toBe(1008);
  });

  it(`at most 16 sockets per session; a closed one makes room`, async () => {
    const many = await login(app, 'ws-many');
    const sockets = await Promise.all(Array.from({ length: 16 }, () => open('/api/proxy/live/ws', { cookie: many })));
    expectGatehouseRefusal(await refused('/api/proxy/live/ws', { cookie: many }), 429, 'too_many_websockets');
    sockets[0]!.ws.close();
    await sockets[0]!.closed;
    await waitFor('a slot to be free', async () => ((await connect('/api/proxy/live/ws', { cookie: many })) instanceof BrowserSocket ? true : undefined), 2_000);
    for (const socket of sockets) socket.ws.close();
  });
});

describe('what one user can hold', () => {
  it('at most 32 sockets per user over all their sessions (signing in again is a new session); other users are not affected', async () => {
    const sessions = await Promise.all([login(app, 'ws-hoarder'), login(app, 'ws-hoarder'), login(app, 'ws-hoarder')]);
    const [first, second, third] = sessions as [string, string, string];
    const sockets = await Promise.all([...Array.from({ length: 16 }, () => open('/api/proxy/live/ws', { cookie: first })), ...Array.from({ length: 16 }, () => open('/api/proxy/live/ws', { cookie: second }))]);
    const before = (await demoSockets()).upgrades;
    const refusal = await refused('/api/proxy/live/ws', { cookie: third });
    expectGatehouseRefusal(refusal, 429, 'too_many_websockets');
    expect(refusal.json.message).toBe('At most 16 WebSockets per session and 32 per user.');
    expect((await demoSockets()).upgrades).toBe(before);
    const other = await open('/api/proxy/live/ws', { cookie: await login(app, 'ws-neighbour') });
    other.ws.close();
    sockets[0]!.ws.close();
    await sockets[0]!.closed;
    await waitFor('a slot to be free', async () => ((await connect('/api/proxy/live/ws', { cookie: third })) instanceof BrowserSocket ? true : undefined), 2_000);
    for (const socket of sockets) socket.ws.close();
  });

  describe('a side that takes nothing for PROXY_SEND_TIMEOUT_MS is cut off, and what waited for it is freed', () => {
    let slow: Awaited<ReturnType<typeof startGatehouse>>;
    let cookie: string;
    beforeAll(async () => {
      slow = await startGatehouse({ name: 'gatehouse-send-timeout', workers: 1, env: { ...stack.appEnv, PROXY_SEND_TIMEOUT_MS: '1000' } });
      cookie = await login(app, 'ws-slow-reader');
    });
    afterAll(async () => {
      await slow?.process.stop();
    });

    it('a browser that stops reading: the API hears 1001 once a second has passed with nothing taken', async () => {
      const socket = await open('/api/proxy/live/ws', { cookie, base: slow.url });
      socket.ws.pause();
      const started = Date.now();
      socket.ws.send(`!stream 64 ${MiB}`);
      expect((await upstreamClose(socket.requestId)).code).toBe(1001);
      expect(Date.now() - started).toBeGreaterThanOrEqual(1_000);
      expect((await upstreamRecord(socket.requestId)).streamed).toBeLessThan(32 * MiB);
      socket.ws.resume();
      expect((await socket.closed).code).toBe(1006);
    });

    it('an API that stops reading: the browser hears 1011', async () => {
      const socket = await open('/api/proxy/live/ws/sink?paused=1', { cookie, base: slow.url });
      const frame = Buffer.alloc(MiB, 'z');
      void (async () => {
        for (let n = 0; n < 64 && socket.ws.readyState === WebSocket.OPEN; n++) await new Promise((resolve) => socket.ws.send(frame, resolve));
      })();
      try {
        expect((await socket.closed).code).toBe(1011);
      } finally {
        await fetch(`${stack.apiUrl}/__demo/ws/resume`);
      }
    });
  });
});

describe('refused before any upgrade, with nothing sent upstream', () => {
  let cookie: string;
  beforeAll(async () => {
    cookie = await login(app, 'ws-refused');
  });

  async function expectRefusedWithoutUpstream(path: string, options: ConnectOptions, status: number, code: string): Promise<Refusal> {
    const before = (await demoSockets()).upgrades;
    const refusal = await refused(path, options);
    expectGatehouseRefusal(refusal, status, code);
    expect((await demoSockets()).upgrades).toBe(before);
    return refusal;
  }

  it('a handshake from another origin (cross-site WebSocket hijacking) → 403 origin_refused, though the cookie came along', async () => {
    const appUrl = new URL(app);
    for (const origin of ['http://evil.example', null, 'null', `${app}.evil.example`, `https://${appUrl.host}`, `http://127.0.0.1:${appUrl.port}`, `${app}/`, app.toUpperCase()]) {
      await expectRefusedWithoutUpstream('/api/proxy/live/ws', { cookie, origin }, 403, 'origin_refused');
    }
    // The right Origin but a browser that says the page is another site.
    await expectRefusedWithoutUpstream('/api/proxy/live/ws', { cookie, headers: { 'sec-fetch-site': 'cross-site' } }, 403, 'origin_refused');
  });

  it('no session cookie → 401 unauthenticated; a tampered one → 401 and the cookie is cleared', async () => {
    await expectRefusedWithoutUpstream('/api/proxy/live/ws', {}, 401, 'unauthenticated');
    // A character inside the HMAC digest: the digest's last character would not do, as its low bits are
    // base64 padding that decoding ignores (the flip went unnoticed in about one run in twenty).
    const tampered = cookie.slice(0, -6) + (cookie.at(-6) === 'A' ? 'B' : 'A') + cookie.slice(-5);
    expect(tampered).not.toBe(cookie);
    const refusal = await expectRefusedWithoutUpstream('/api/proxy/live/ws', { cookie: tampered }, 401, 'unauthenticated');
    expect(clearsSessionCookie([refusal.headers['set-cookie'] ?? []].flat())).toBe(true);
    expect(refusal.headers['clear-site-data']).toBe('"cache"');
  });

  it('an API without "websocket": true → 404 websocket_not_enabled; an unknown API → 404; escaping paths → 400 invalid_path', async () => {
    await expectRefusedWithoutUpstream('/api/proxy/demo/ws', { cookie }, 404, 'websocket_not_enabled');
    await expectRefusedWithoutUpstream('/api/proxy/nope/ws', { cookie }, 404, 'unknown_api');
    for (const path of ['/api/proxy/live/..;x/ws', '/api/proxy/live/a%2fb/ws', '/api/proxy/live/%2e%2e%3bx/ws', '/api/proxy/live//ws']) {
      await expectRefusedWithoutUpstream(path, { cookie }, 400, 'invalid_path');
    }
  });

  it('a subprotocol offer `ws` would refuse (a no-break space or a BOM around a token) → 400 invalid_websocket_request before the API is asked', async () => {
    const appUrl = new URL(app);
    for (const offer of ['chat\u00a0', 'a,\u00a0b', '\ufeffchat']) {
      const before = (await demoSockets()).upgrades;
      const handshake = [
        'GET /api/proxy/live/ws HTTP/1.1',
        `Host: ${appUrl.host}`,
        'Connection: Upgrade',
        'Upgrade: websocket',
        `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}`,
        'Sec-WebSocket-Version: 13',
        `Origin: ${app}`,
        `Cookie: ${cookie}`,
      ];
      const res = await rawRequest(Number(appUrl.port), Buffer.concat([Buffer.from(`${handshake.join('\r\n')}\r\n`), Buffer.from(`Sec-WebSocket-Protocol: ${offer}\r\n\r\n`, offer.includes('\ufeff') ? 'utf8' : 'latin1')]));
      expect(res?.status, JSON.stringify(offer)).toBe(400);
      expect(JSON.parse(res?.body ?? '{}'), JSON.stringify(offer)).toMatchObject({ error: 'invalid_websocket_request' });
      expect((await demoSockets()).upgrades, JSON.stringify(offer)).toBe(before);
    }
  });

  it('a handshake whose target only resolves into /api/proxy/ (`/api/./proxy/…`) → 400 invalid_path, not Next’s route', async () => {
    // Raw bytes: a WebSocket client resolves the dot segments before sending, as Next would after.
    const appUrl = new URL(app);
    for (const target of ['/api/./proxy/live/ws', '/api/%2e/proxy/live/ws', '/x/%2e%2e/api/proxy/live/ws', '/x/../api/proxy/live/ws']) {
      const before = (await demoSockets()).upgrades;
      const handshake = [
        `GET ${target} HTTP/1.1`,
        `Host: ${appUrl.host}`,
        'Connection: Upgrade',
        'Upgrade: websocket',
        'Sec-WebSocket-Version: 13',
        `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}`,
        `Origin: ${app}`,
        `Cookie: ${cookie}`,
        '',
        '',
      ].join('\r\n');
      const answer = await rawRequest(Number(appUrl.port), handshake);
      expect(answer?.status, target).toBe(400);
      expect(answer?.get('x-gatehouse-error'), target).toBe('invalid_path');
      expect(JSON.parse(answer?.body ?? '{}'), target).toEqual({ error: 'invalid_path', message: expect.any(String) });
      expect((await demoSockets()).upgrades, target).toBe(before);
    }
  });

  it('an upstream that refuses the handshake → 502 upstream_refused, after one forced refresh, without the upstream’s body', async () => {
    // A fresh login: its token is not due yet, so the one refresh counted is the forced one.
    const fresh = await login(app, 'ws-refused-upstream');
    const grantsBefore = refreshGrantsOf(await idpGrants(stack.issuer), 'ws-refused-upstream');
    const refusal = await refused('/api/proxy/otheraudience/ws', { cookie: fresh });
    expectGatehouseRefusal(refusal, 502, 'upstream_refused');
    expect(refusal.json.message).toContain('401');
    expect(refusal.body).not.toContain('demo-api-refusal-body');
    expect(refreshGrantsOf(await idpGrants(stack.issuer), 'ws-refused-upstream')).toBe(grantsBefore + 1);
  });

  it('an API that requires a stronger sign-in (acr in BFF_APIS) → 401 step_up_required naming it, as a proxied call is, with no token fetched', async () => {
    const grantsBefore = refreshGrantsOf(await idpGrants(stack.issuer), 'ws-refused');
    const refusal = await expectRefusedWithoutUpstream('/api/proxy/strong/ws', { cookie }, 401, 'step_up_required');
    expect(refusal.body && JSON.parse(refusal.body)).toMatchObject({ acr_values: MFA });
    // The session stays: no cookie is cleared, and an API without the requirement still opens.
    expect(clearsSessionCookie([refusal.headers['set-cookie'] ?? []].flat())).toBe(false);
    expect(refusal.headers['clear-site-data']).toBeUndefined();
    expect(refreshGrantsOf(await idpGrants(stack.issuer), 'ws-refused')).toBe(grantsBefore);
    const plain = await open('/api/proxy/live/ws', { cookie });
    plain.ws.close();
  });

  it('an upstream that refuses the handshake with a step-up challenge (RFC 9470) → 401 step_up_required naming what it asked, with no forced refresh, and the session stays', async () => {
    const fresh = await login(app, 'ws-step-up-challenge');
    const grantsBefore = refreshGrantsOf(await idpGrants(stack.issuer), 'ws-step-up-challenge');
    const upgradesBefore = (await demoSockets()).upgrades;
    const refusal = await refused('/api/proxy/live/mfa/ws', { cookie: fresh });
    expectGatehouseRefusal(refusal, 401, 'step_up_required');
    expect(refusal.json).toMatchObject({ acr_values: MFA });
    expect(refusal.body).not.toContain('A stronger sign-in is required');
    expect((await demoSockets()).upgrades).toBe(upgradesBefore + 1);
    expect(refreshGrantsOf(await idpGrants(stack.issuer), 'ws-step-up-challenge')).toBe(grantsBefore);
    expect(clearsSessionCookie([refusal.headers['set-cookie'] ?? []].flat())).toBe(false);
    const plain = await open('/api/proxy/live/ws', { cookie: fresh });
    plain.ws.close();
  });

  it('an upstream that refuses the handshake for want of a scope → 502 upstream_refused, with no forced refresh (a new token of the same grant would not have it)', async () => {
    const fresh = await login(app, 'ws-scope-refused');
    const grantsBefore = refreshGrantsOf(await idpGrants(stack.issuer), 'ws-scope-refused');
    expectGatehouseRefusal(await refused('/api/proxy/live/admin/ws', { cookie: fresh }), 502, 'upstream_refused');
    expect(refreshGrantsOf(await idpGrants(stack.issuer), 'ws-scope-refused')).toBe(grantsBefore);
  });

  it('an upstream that cannot be reached → 502 upstream_unavailable', async () => {
    expectGatehouseRefusal(await refused('/api/proxy/dead/ws', { cookie }), 502, 'upstream_unavailable');
  });
});

it('a token due for refresh is refreshed before the upstream handshake', async () => {
  const cookie = await login(app, 'ws-refresh');
  await probe.waitUntilDue('ws-refresh', REFRESH_SKEW_SEC);
  const before = refreshGrantsOf(await idpGrants(stack.issuer), 'ws-refresh');
  const socket = await open('/api/proxy/live/ws', { cookie });
  expect(refreshGrantsOf(await idpGrants(stack.issuer), 'ws-refresh')).toBe(before + 1);
  expect((await upstreamRecord(socket.requestId)).sub).toBe('ws-refresh');
  socket.ws.close();
});

describe('the session ends, the socket closes with 4401', () => {
  /** What the server logged about the session's sockets ending (LOG_LEVEL=info). */
  const endedLogLines = () =>
    stack.apps[0]!.process.output()
      .split('\n')
      .filter((line) => line.includes('"websocket.session_ended"'))
      .map((line) => JSON.parse(line) as { detectedBy: string; session: string });
  /** The handle the log names a user's session by (lib/session.ts sessionHandle), from its store key. */
  const handleOf = async (sub: string) => {
    const id = /\{(.+)\}$/.exec((await probe.sessionKeyOf(sub)) ?? '')?.[1];
    if (!id) throw new Error(`no session for ${sub}`);
    return createHash('sha256').update(id).digest('base64url').slice(0, 16);
  };
  /** That session's end lines, once the first is out (info lines leave within 200 ms, lib/log.ts). */
  const endedLogLinesOf = (handle: string) =>
    waitFor('the socket end logged', () => {
      const lines = endedLogLines().filter((line) => line.session === handle);
      return lines.length ? lines : undefined;
    }, 3_000);

  it('logout in this process closes it at once', async () => {
    const cookie = await login(app, 'ws-logout');
    const socket = await open('/api/proxy/live/ws', { cookie });
    const handle = await handleOf('ws-logout');
    const started = Date.now();
    const logout = await call(app, '/api/auth/logout', cookie, { method: 'POST' });
    expect(logout.status).toBe(200);
    const closed = await socket.closed;
    expect(closed).toMatchObject({ code: SESSION_ENDED, reason: 'session ended' });
    // Well within the session check interval, and the log says so: the logout itself closed it.
    expect(closed.at - started).toBeLessThan(1_000);
    expect(await endedLogLinesOf(handle)).toEqual([expect.objectContaining({ detectedBy: 'this_process' })]);
    expect(await upstreamClose(socket.requestId)).toEqual({ code: 1000, reason: 'session ended' });
    expectGatehouseRefusal(await refused('/api/proxy/live/ws', { cookie }), 401, 'unauthenticated');
  });

  it("a session that ends during the handshake: a logout's is refused 401 with the cookie cleared; a new login's leaves the new session's cookie alone", async () => {
    // The API takes 1.5 s over its handshake; the session ends meanwhile.
    const slowHandshake = '/api/proxy/live/ws?handshakeDelayMs=1500';
    // The session ends once the API has the handshake (and Gatehouse is waiting for its answer).
    const handshakeAtApi = async (before: number) => waitFor('the handshake to reach the API', async () => ((await demoSockets()).upgrades > before ? true : undefined), 5_000, 20);
    const cookie = await login(app, 'ws-ended-mid-handshake');
    let before = (await demoSockets()).upgrades;
    const pending = refused(slowHandshake, { cookie });
    await handshakeAtApi(before);
    expect((await call(app, '/api/auth/logout', cookie, { method: 'POST' })).status).toBe(200);
    const afterLogout = await pending;
    expectGatehouseRefusal(afterLogout, 401, 'unauthenticated');
    expect(clearsSessionCookie([afterLogout.headers['set-cookie'] ?? []].flat())).toBe(true);
    expect(afterLogout.headers['clear-site-data']).toBe('"cache"');

    // A new login in the same browser replaces the session: by the time the refusal arrives, the
    // browser holds the new session's cookie, which the refusal must not clear.
    const jars: CookieJars = new Map();
    const first = await loginThroughRp({ startUrl: `${app}/api/auth/login`, username: 'ws-replaced-mid-handshake', jars });
    const oldCookie = `gatehouse=${first.rpCookies.get('gatehouse') ?? ''}`;
    before = (await demoSockets()).upgrades;
    const racing = refused(slowHandshake, { cookie: oldCookie });
    await handshakeAtApi(before);
    const second = await loginThroughRp({ startUrl: `${app}/api/auth/login`, username: 'ws-replaced-mid-handshake', jars });
    const newCookie = `gatehouse=${second.rpCookies.get('gatehouse') ?? ''}`;
    expect(newCookie).not.toBe(oldCookie);
    const afterReplace = await racing;
    expectGatehouseRefusal(afterReplace, 401, 'session_replaced');
    expect(afterReplace.headers['set-cookie']).toBeUndefined();
    expect(afterReplace.headers['clear-site-data']).toBeUndefined();
    expect((await call(app, '/api/proxy/demo/whoami', newCookie)).status).toBe(200);
  });

  it('a back-channel logout from the IdP closes it', async () => {
    const cookie = await login(app, 'ws-backchannel');
    const socket = await open('/api/proxy/live/ws', { cookie });
    const now = Math.floor(Date.now() / 1000);
    const signed = await fetch(`${stack.issuer}/__dev/sign`, {
      method: 'POST',
      body: JSON.stringify({ payload: { iss: stack.issuer, aud: stack.clientId, iat: now, exp: now + 120, jti: randomUUID(), sub: 'ws-backchannel', events: { [BACKCHANNEL_EVENT]: {} } }, header: {} }),
    });
    const { jws } = (await signed.json()) as { jws: string };
    const started = Date.now();
    const logout = await fetch(`${app}/api/auth/backchannel-logout`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams({ logout_token: jws }) });
    expect(logout.status).toBe(200);
    const closed = await socket.closed;
    expect(closed.code).toBe(SESSION_ENDED);
    expect(closed.at - started).toBeLessThan(1_000);
  });

  it(`a session deleted elsewhere (another instance, expiry) closes it within the check interval (${CHECK_INTERVAL_SEC} s)`, async () => {
    const cookie = await login(app, 'ws-elsewhere');
    const socket = await open('/api/proxy/live/ws', { cookie });
    const key = await probe.sessionKeyOf('ws-elsewhere');
    if (!key) throw new Error('no session key');
    const handle = await handleOf('ws-elsewhere');
    const started = Date.now();
    await probe.redis.del(key);
    const closed = await socket.closed;
    expect(closed.code).toBe(SESSION_ENDED);
    expect(closed.at - started).toBeLessThan(CHECK_INTERVAL_SEC * 1000 + 1_000);
    expect(await endedLogLinesOf(handle)).toEqual([expect.objectContaining({ detectedBy: 'session_check' })]);
  });
});

it(`an API with maxAge: the socket closes with ${STEP_UP} once the sign-in is older, the session stays, and a new handshake is refused with step_up_required`, async () => {
  const cookie = await login(app, 'ws-fresh');
  const { body: described } = await call(app, '/api/auth/session', cookie);
  const authTime = (described as { authTime: number }).authTime;
  expect(authTime).toEqual(expect.any(Number));
  const socket = await open('/api/proxy/fresh/ws', { cookie });
  socket.ws.send('still fresh');
  expect(await socket.nextText()).toBe('still fresh');
  const closed = await socket.closed;
  expect(closed).toMatchObject({ code: STEP_UP, reason: 'step_up_required' });
  // Not before the sign-in was too old (the server's clock and this one are the same machine's).
  expect(closed.at).toBeGreaterThanOrEqual((authTime + FRESH_MAX_AGE_SEC) * 1000);
  expect(await upstreamClose(socket.requestId)).toEqual({ code: 1000, reason: 'step_up_required' });
  expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'ws-fresh' } });
  const refusal = await refused('/api/proxy/fresh/ws', { cookie });
  expectGatehouseRefusal(refusal, 401, 'step_up_required');
  expect(JSON.parse(refusal.body)).toMatchObject({ max_age: FRESH_MAX_AGE_SEC });
  // A socket of the same session to an API without maxAge stays open meanwhile.
  const plain = await open('/api/proxy/live/ws', { cookie });
  plain.ws.send('ok');
  expect(await plain.nextText()).toBe('ok');
  plain.ws.close();
});

describe('idle timeout and shutdown', () => {
  // A second instance on the same store whose sessions idle out after 4 s: the stack's cookie works
  // there too (same secret and key prefix).
  const IDLE_SEC = 4;
  let idle: Awaited<ReturnType<typeof startGatehouse>>;
  beforeAll(async () => {
    idle = await startGatehouse({ name: 'gatehouse-idle', workers: 1, env: { ...stack.appEnv, SESSION_IDLE_TIMEOUT: String(IDLE_SEC), SESSION_TOUCH_INTERVAL: '1' } });
  });
  afterAll(async () => {
    await idle?.process.stop();
  });

  it('messages from the browser keep the session from idling out; a silent socket closes with it', async () => {
    const chatty = await login(app, 'ws-chatty');
    const silent = await login(app, 'ws-silent');
    const talking = await open('/api/proxy/live/ws', { cookie: chatty, base: idle.url });
    const quiet = await open('/api/proxy/live/ws', { cookie: silent, base: idle.url });
    const started = Date.now();
    const ticker = setInterval(() => talking.ws.send('still here'), 500);
    try {
      const closed = await quiet.closed;
      expect(closed.code).toBe(SESSION_ENDED);
      // The handshake set the idle timeout; nothing touched it since.
      expect(closed.at - started).toBeLessThan((IDLE_SEC + CHECK_INTERVAL_SEC + 1) * 1000);
      // Twice the idle timeout later the chatty one is still open and its session alive.
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, 2 * IDLE_SEC * 1000 - (Date.now() - started))));
      expect(talking.ws.readyState).toBe(WebSocket.OPEN);
      expect(await call(app, '/api/auth/session', chatty)).toMatchObject({ status: 200, body: { authenticated: true } });
    } finally {
      clearInterval(ticker);
    }
  });

  it('SIGTERM closes open sockets with 1001, so browsers reconnect elsewhere', async () => {
    const cookie = await login(app, 'ws-shutdown');
    const socket = await open('/api/proxy/live/ws', { cookie, base: idle.url });
    const stopping = idle.process.stop();
    expect(await socket.closed).toMatchObject({ code: 1001, reason: 'server restarting' });
    await stopping;
  });
});

describe('backpressure and memory: 50 MB of frames each way, to a reader that does not read at first', () => {
  // The receiving side reads nothing until the sender has stalled (no progress for half a second)
  // or finished. With backpressure the sender stalls once socket buffers are full; without it, it
  // finishes, and the relay holds the whole stream. Memory is then judged as in proxy.test.ts: V8
  // frees buffers in its own time, so by how much the peak RSS of the Gatehouse process tree
  // (sampled every 20 ms) grows from a first transfer to a second, twice as large one, once a
  // warm-up transfer has brought the process to its steady state. A relay that held the streams
  // would grow by ≥ 50 MB there.
  const GROWTH_LIMIT = 25 * MiB;
  /** Kernel socket buffers on two connections and the relay's own high-water mark fit well within this. */
  const AHEAD_LIMIT = 32 * MiB;
  const FRAME = MiB;
  let cookie: string;

  async function peakRssDuring<T>(work: () => Promise<T>): Promise<{ peak: number; result: T }> {
    const pids = () => processTree(stack.apps[0]!.process.child.pid as number);
    let peak = rssBytes(pids());
    const sampler = setInterval(() => (peak = Math.max(peak, rssBytes(pids()))), 20);
    try {
      const result = await work();
      return { peak: Math.max(peak, rssBytes(pids())), result };
    } finally {
      clearInterval(sampler);
    }
  }

  /** Polls the bytes a sender has written out until it stalls or reaches `total`; answers how far it got. */
  async function untilStalledOrDone(progress: () => Promise<number> | number, total: number): Promise<number> {
    let last = -1;
    let since = Date.now();
    for (;;) {
      const now = await progress();
      if (now >= total) return now;
      if (now !== last) [last, since] = [now, Date.now()];
      else if (Date.now() - since >= 500) return now;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** `frames` MiB from the upstream to a browser that reads only once the upstream has stalled or finished. */
  const download = (frames: number) => async () => {
    const socket = await open('/api/proxy/live/ws', { cookie });
    socket.ws.pause();
    socket.ws.send(`!stream ${frames} ${FRAME}`);
    const ahead = await untilStalledOrDone(async () => (await upstreamRecord(socket.requestId)).streamed, frames * FRAME);
    socket.ws.resume();
    let received = 0;
    for (;;) {
      const message = await socket.next(30_000);
      if (!message.binary) {
        expect(message.data.toString()).toBe(`!streamed ${frames * FRAME}`);
        break;
      }
      received += message.data.length;
    }
    socket.ws.close();
    return { received, ahead };
  };

  /** `frames` MiB from the browser to an upstream that reads only once the browser has stalled or finished. */
  const upload = (frames: number) => async () => {
    const socket = await open('/api/proxy/live/ws/sink?paused=1', { cookie });
    const frame = Buffer.alloc(FRAME, 'z');
    let written = 0;
    // The test's own client writes as fast as its socket takes it: only Gatehouse can slow it down.
    const sending = (async () => {
      for (let n = 0; n < frames; n++) {
        await new Promise((resolve) => socket.ws.send(frame, resolve));
        written += frame.length;
      }
    })();
    const ahead = await untilStalledOrDone(() => written, frames * FRAME);
    expect((await fetch(`${stack.apiUrl}/__demo/ws/resume`)).status).toBe(200);
    await sending;
    socket.ws.send('!count');
    const counted = await socket.nextText(30_000);
    socket.ws.close();
    return { counted, ahead };
  };

  /**
   * `pings` pings of 125 bytes from a client that never reads: the API answers each with a pong
   * that can only pile up towards it. Written as raw masked frames, 25 to a write, as fast as the
   * socket takes them (a `ws` client throttles itself). Answers how many the API received before
   * the flow stalled or all had arrived.
   */
  const pingFlood = (pings: number) => async () => {
    const { port } = new URL(app);
    const raw = net.connect(Number(port), '127.0.0.1');
    await new Promise((resolve) => raw.once('connect', resolve));
    raw.write(`GET /api/proxy/plain/ws HTTP/1.1\r\nHost: localhost:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\nOrigin: ${app}\r\nCookie: ${cookie}\r\n\r\n`);
    const head = (await new Promise<Buffer>((resolve) => raw.once('data', resolve))).toString();
    expect(head.split('\r\n')[0]).toBe('HTTP/1.1 101 Switching Protocols');
    raw.pause();
    const mask = [1, 2, 3, 4];
    const frame = Buffer.from([0x89, 0x80 | 125, ...mask, ...Buffer.alloc(125, 'p').map((byte, i) => byte ^ (mask[i % 4] as number))]);
    const batch = Buffer.concat(Array.from({ length: 25 }, () => frame));
    void (async () => {
      for (let sent = 0; sent < pings && !raw.destroyed; sent += 25) {
        if (!raw.write(batch)) await new Promise((resolve) => raw.once('drain', resolve));
      }
    })();
    const before = pingsAtPlainApi;
    const received = await untilStalledOrDone(() => pingsAtPlainApi - before, pings);
    raw.destroy();
    return received;
  };

  beforeAll(async () => {
    cookie = await login(app, 'ws-bulk');
    expect((await download(50)()).received).toBe(50 * FRAME);
  });

  it('pings from a browser that reads none of the pongs: they count against the same high-water mark, and memory stays flat', async () => {
    const first = await peakRssDuring(pingFlood(20_000));
    const second = await peakRssDuring(pingFlood(500_000));
    expect(second.result, 'pings the API answered').toBeGreaterThan(20_000);
    expect(second.peak - first.peak, `peak RSS ${first.peak} B over 20,000 pings, ${second.peak} B over ${second.result} answered`).toBeLessThan(GROWTH_LIMIT);
  });

  it('upstream → browser', async () => {
    const first = await peakRssDuring(download(50));
    expect(first.result.received).toBe(50 * FRAME);
    const second = await peakRssDuring(download(100));
    expect(second.result.received).toBe(100 * FRAME);
    expect(first.result.ahead, 'bytes the upstream wrote while the browser read nothing').toBeLessThan(AHEAD_LIMIT);
    expect(second.result.ahead, 'bytes the upstream wrote while the browser read nothing').toBeLessThan(AHEAD_LIMIT);
    expect(second.peak - first.peak, `peak RSS ${first.peak} B over 50 MB, ${second.peak} B over 100 MB`).toBeLessThan(GROWTH_LIMIT);
  });

  it('browser → upstream', async () => {
    const first = await peakRssDuring(upload(50));
    expect(first.result.counted).toBe(`!counted ${50 * FRAME}`);
    const second = await peakRssDuring(upload(100));
    expect(second.result.counted).toBe(`!counted ${100 * FRAME}`);
    expect(first.result.ahead, 'bytes the browser wrote while the upstream read nothing').toBeLessThan(AHEAD_LIMIT);
    expect(second.result.ahead, 'bytes the browser wrote while the upstream read nothing').toBeLessThan(AHEAD_LIMIT);
    expect(second.peak - first.peak, `peak RSS ${first.peak} B over 50 MB, ${second.peak} B over 100 MB`).toBeLessThan(GROWTH_LIMIT);
  });
});

describe('under `next start`', () => {
  it('a WebSocket handshake to /api/proxy is not upgraded: the connection ends at once, with nothing sent upstream', async () => {
    const cookie = await login(app, 'ws-next');
    const nextApp = await startGatehouse({ name: 'gatehouse-next', server: 'next', env: stack.appEnv });
    try {
      const port = Number(new URL(nextApp.url).port);
      const before = (await demoSockets()).upgrades;
      const started = Date.now();
      const answer = await new Promise<string>((resolve, reject) => {
        const socket = net.connect(port, '127.0.0.1', () =>
          socket.write(
            `GET /api/proxy/live/ws HTTP/1.1\r\nHost: ${new URL(nextApp.url).host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
              `Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: ${nextApp.url}\r\nCookie: ${cookie}\r\n\r\n`,
          ),
        );
        let received = '';
        socket.setEncoding('utf8');
        socket.on('data', (chunk: string) => (received += chunk));
        socket.on('close', () => resolve(received));
        socket.on('error', reject);
        setTimeout(() => reject(new Error(`still open after 5 s (received ${JSON.stringify(received)})`)), 5_000).unref();
      });
      expect(answer).toBe('');
      expect(Date.now() - started).toBeLessThan(3_000);
      expect((await demoSockets()).upgrades).toBe(before);
    } finally {
      await nextApp.process.stop();
    }
  });
});
