import { describe, expect, it } from 'vitest';
import { checkCsrf, readBodyUpTo, safeReturnTo } from '../../lib/http.ts';

const APP = 'https://app.example.com';
const headers = (values: Record<string, string>) => (name: string) => values[name];

describe('safeReturnTo', () => {
  const openRedirects = [
    'https://evil.example',
    'http://evil.example/path',
    '//evil.example',
    '///evil.example',
    '/\\evil.example',
    '\\\\evil.example',
    '/%2F%2Fevil.example',
    '/%2f%2fevil.example',
    '%2F%2Fevil.example',
    '/%5Cevil.example',
    '/%252F%252Fevil.example',
    'javascript:alert(1)',
    '/javascript:alert(1)\n',
    'JAVASCRIPT:alert(1)',
    'data:text/html,hi',
    '/\tevil',
    '/\u0000',
    '/%0d%0aSet-Cookie:x=1',
    ' /leading-space',
    'relative/path',
    '',
    '/' + 'a'.repeat(3000),
  ];
  it.each(openRedirects)('refuses %j', (payload) => {
    expect(safeReturnTo(payload)).toBe('/');
  });

  it.each([
    ['/', '/'],
    ['/orders', '/orders'],
    ['/orders?id=7&tab=items', '/orders?id=7&tab=items'],
    ['/a/b#section', '/a/b#section'],
    ['/search?q=caf%C3%A9', '/search?q=caf%C3%A9'],
  ])('keeps the same-origin path %j', (input, expected) => {
    expect(safeReturnTo(input)).toBe(expected);
  });

  it('falls back for a missing value', () => {
    expect(safeReturnTo(null)).toBe('/');
    expect(safeReturnTo(undefined)).toBe('/');
  });
});

describe('checkCsrf', () => {
  it('passes a same-origin call with the header', () => {
    expect(checkCsrf(headers({ 'x-csrf': '1', origin: APP, 'sec-fetch-site': 'same-origin' }), APP)).toEqual({ ok: true });
    expect(checkCsrf(headers({ 'x-csrf': '1' }), APP)).toEqual({ ok: true });
  });
  it('refuses a call without X-CSRF: 1', () => {
    expect(checkCsrf(headers({}), APP)).toEqual({ ok: false, reason: 'missing_header' });
    expect(checkCsrf(headers({ 'x-csrf': 'true' }), APP).ok).toBe(false);
  });
  it('refuses another origin even with the header', () => {
    expect(checkCsrf(headers({ 'x-csrf': '1', origin: 'https://evil.example' }), APP)).toEqual({ ok: false, reason: 'cross_origin' });
    expect(checkCsrf(headers({ 'x-csrf': '1', origin: 'null' }), APP).ok).toBe(false);
    expect(checkCsrf(headers({ 'x-csrf': '1', origin: 'https://app.example.com:8443' }), APP).ok).toBe(false);
  });
  it('refuses what the browser marks cross-site or same-site', () => {
    expect(checkCsrf(headers({ 'x-csrf': '1', 'sec-fetch-site': 'cross-site' }), APP)).toEqual({ ok: false, reason: 'cross_site' });
    expect(checkCsrf(headers({ 'x-csrf': '1', 'sec-fetch-site': 'same-site' }), APP).ok).toBe(false);
  });
});

describe('readBodyUpTo', () => {
  /** A body of endless 1 KiB chunks, produced only when read, that counts the bytes read from it. */
  function endlessBody() {
    const pulled = { bytes: 0 };
    const stream = new ReadableStream<Uint8Array>(
      {
        pull(controller) {
          pulled.bytes += 1024;
          controller.enqueue(new Uint8Array(1024));
        },
      },
      { highWaterMark: 0 },
    );
    return { stream, pulled };
  }
  const post = (body: BodyInit | null, headers: Record<string, string> = {}) =>
    new Request('https://app.example.com/api/auth/backchannel-logout', { method: 'POST', body, headers, duplex: 'half' } as RequestInit);

  it('returns a body of up to maxBytes whole', async () => {
    expect(new TextDecoder().decode(await readBodyUpTo(post('a'.repeat(4096)), 4096))).toBe('a'.repeat(4096));
    expect(await readBodyUpTo(post(null), 10)).toEqual(new Uint8Array(0));
  });

  it('refuses one byte more with 413 payload_too_large', async () => {
    await expect(readBodyUpTo(post('a'.repeat(4097)), 4096)).rejects.toMatchObject({ code: 'payload_too_large', status: 413 });
  });

  it('refuses a declared Content-Length over the cap without reading the body', async () => {
    const { stream, pulled } = endlessBody();
    await expect(readBodyUpTo(post(stream, { 'content-length': '4097' }), 4096)).rejects.toMatchObject({ code: 'payload_too_large' });
    expect(pulled.bytes).toBe(0);
  });

  it('stops reading a streamed body as soon as it passes the cap', async () => {
    const { stream, pulled } = endlessBody();
    await expect(readBodyUpTo(post(stream), 64 * 1024)).rejects.toMatchObject({ code: 'payload_too_large' });
    // Up to and including the chunk that crossed the cap, and not one more.
    expect(pulled.bytes).toBe(64 * 1024 + 1024);
  });
});
