// Both adapters handed a body that broke off before anything read it, over a real Node HTTP
// server and raw sockets: the integration suites reach this only through timing they cannot force.
import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { brotliCompressSync, gzipSync } from 'node:zlib';
import { afterEach, describe, expect, it } from 'vitest';
import { webResponseFrom, writeNodeResponse } from '../../lib/adapters.ts';
import type { ProxyResponse } from '../../lib/proxy.ts';
import { openRawRequest } from '../support/raw-http.ts';

function silentBody(): Readable {
  const body = new Readable({ read() {} });
  // The proxy core always listens; without a listener the error would end the test process.
  body.on('error', () => undefined);
  return body;
}

function brokenBody(): Readable {
  return silentBody().destroy(new Error('the API went away'));
}

let server: Server | undefined;
afterEach(async () => {
  server?.closeAllConnections();
  server?.close();
  server = undefined;
});

async function serving(answer: () => ProxyResponse, around: (write: () => void) => void = (write) => write()): Promise<number> {
  server = createServer((_request, response) => {
    const ready = answer();
    // The break is over (its events emitted) before the adapter sees the body, as when the core awaited the store meanwhile.
    setTimeout(() => around(() => writeNodeResponse(ready, response)), 20);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return (server.address() as AddressInfo).port;
}

async function waitUntil(done: () => boolean): Promise<void> {
  for (let tries = 0; !done(); tries += 1) {
    if (tries > 200) throw new Error('waited 2 s in vain');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

const HEAD_1_1 = 'GET /x HTTP/1.1\r\nHost: t\r\n\r\n';
const HEAD_1_0 = 'GET /x HTTP/1.0\r\nHost: t\r\n\r\n';

describe('writeNodeResponse (npm start)', () => {
  it('a body that broke off before the adapter listened: the head goes out, then a cut chunked body (not a connection left hanging)', async () => {
    const port = await serving(() => ({ status: 207, headers: [['content-type', 'text/plain']], body: brokenBody() }));
    const answer = await openRawRequest(port, HEAD_1_1);
    expect(await answer.head).toMatch(/^HTTP\/1\.1 207 [^]*\r\ntransfer-encoding: chunked/i);
    const received = await answer.closed;
    expect(received.slice(received.indexOf('\r\n\r\n') + 4)).toBe('');
  });

  it('with a declared length: the head goes out and the connection closes short of it', async () => {
    const port = await serving(() => ({ status: 200, headers: [['content-length', '10']], body: brokenBody() }));
    const answer = await openRawRequest(port, HEAD_1_1);
    expect(await answer.head).toMatch(/^HTTP\/1\.1 200 [^]*\r\ncontent-length: 10/i);
    const received = await answer.closed;
    expect(received.slice(received.indexOf('\r\n\r\n') + 4)).toBe('');
  });

  it('an HTTP/1.0 client with no length to go by gets no head, since a head and a close would read as a whole, empty answer', async () => {
    for (const breakOff of ['before the adapter listened', 'while it waited for the first byte']) {
      const body = breakOff.startsWith('before') ? brokenBody() : silentBody();
      const port = await serving(
        () => ({ status: 200, headers: [['content-type', 'text/plain']], body }),
        (write) => {
          write();
          if (!body.destroyed) setTimeout(() => body.destroy(new Error('the API went away')), 20);
        },
      );
      const answer = await openRawRequest(port, HEAD_1_0);
      expect(await answer.closed, breakOff).toBe('');
      server?.close();
    }
  });
});

describe('webResponseFrom (next start)', () => {
  it('a body that broke off before it was read: one empty chunk (so Next sends the head), then an abort', async () => {
    const response = webResponseFrom({ status: 207, headers: [['content-type', 'text/plain']], body: brokenBody() });
    expect(response.status).toBe(207);
    const reader = response.body!.getReader();
    const first = await reader.read();
    expect({ done: first.done, length: first.value?.length }).toEqual({ done: false, length: 0 });
    await expect(reader.read()).rejects.toMatchObject({ name: 'AbortError' });
  });

  it('a body that breaks off after its first bytes: those bytes, then an abort, and no empty chunk', async () => {
    const body = new Readable({ read() {} });
    body.on('error', () => undefined);
    const response = webResponseFrom({ status: 200, headers: [], body });
    body.push(Buffer.from('first'));
    const reader = response.body!.getReader();
    expect(Buffer.from((await reader.read()).value!).toString()).toBe('first');
    body.destroy(new Error('the API went away'));
    await expect(reader.read()).rejects.toMatchObject({ name: 'AbortError' });
  });
});

describe('webResponseFrom, an encoded answer (next start undoes codings)', () => {
  it('a browser that leaves, or bytes that do not decode, end the API’s body too (else its connection and the call’s slot stay)', async () => {
    for (const coding of ['gzip', 'br', 'gzip, gzip']) {
      const body = new Readable({ read() {} });
      body.on('error', () => undefined);
      const response = webResponseFrom({ status: 200, headers: [['content-encoding', coding]], body });
      const first = coding === 'br' ? brotliCompressSync(Buffer.alloc(64 * 1024, 'a')) : gzipSync(gzipSync(Buffer.alloc(64 * 1024, 'a')));
      body.push(coding === 'gzip' ? gzipSync(Buffer.alloc(64 * 1024, 'a')) : first);
      const reader = response.body!.getReader();
      expect((await reader.read()).done, coding).toBe(false);
      await reader.cancel();
      await waitUntil(() => body.destroyed);
      expect(body.destroyed, coding).toBe(true);
    }
    const garbled = new Readable({ read() {} });
    garbled.on('error', () => undefined);
    const response = webResponseFrom({ status: 200, headers: [['content-encoding', 'gzip']], body: garbled });
    garbled.push(Buffer.from('these bytes are no gzip stream at all'));
    const reader = response.body!.getReader();
    await expect(
      (async () => {
        for (;;) if ((await reader.read()).done) return 'completed';
      })(),
    ).rejects.toMatchObject({ name: 'AbortError' });
    await waitUntil(() => garbled.destroyed);
    expect(garbled.destroyed).toBe(true);
  });
});

describe('an answer that cannot be written', () => {
  it('drops its streamed body (else the API connection and the session hold stay): both adapters', async () => {
    const forged: Array<[string, string]> = [['x-split', 'a\r\nset-cookie: x=1']];
    const body = silentBody();
    expect(() => webResponseFrom({ status: 200, headers: forged, body })).toThrow();
    expect(body.destroyed).toBe(true);

    const nodeBody = silentBody();
    let thrown: unknown;
    const port = await serving(() => ({ status: 200, headers: forged, body: nodeBody }), (write) => {
      try {
        write();
      } catch (error) {
        thrown = error;
      }
    });
    const answer = await openRawRequest(port, HEAD_1_1);
    await waitUntil(() => thrown !== undefined);
    expect(nodeBody.destroyed).toBe(true);
    answer.leave();
  });
});
