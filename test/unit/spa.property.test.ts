import fc from 'fast-check';
import { createServer } from 'node:http';
import path from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { isHashedAsset, resolveSpaFile, resolveSpaUrl, serveSpaFrom } from '../../lib/spa.ts';
import { decodableSegment, decodes, undecodablePath } from '../support/hostile-inputs.ts';

const ROOT = '/srv/spa';
const PIECES = ['/', '.', '..', '%2e', '%2E', '%2f', '%2F', '%5c', '\\', '%00', '%252e', 'etc', 'passwd', 'assets', 'a.js', ';', '%', '.env', '.git', '.well-known', 'env'];
const hostilePath = fc.oneof(fc.array(fc.constantFrom(...PIECES, '@', ':', '//', '?', '#'), { maxLength: 14 }).map((parts) => `/${parts.join('')}`), fc.webPath(), fc.string());

describe('resolveSpaFile (generated paths)', () => {
  it('never names a file outside SPA_DIR', () => {
    fc.assert(
      fc.property(hostilePath, (pathname) => {
        const file = resolveSpaFile(ROOT, pathname);
        if (file !== null) expect(file === ROOT || file.startsWith(`${ROOT}${path.sep}`), `${pathname} → ${file}`).toBe(true);
      }),
      { numRuns: 20_000 },
    );
  });

  it('never names a dotfile or anything under a dot folder, .well-known apart', () => {
    fc.assert(
      fc.property(hostilePath, (pathname) => {
        const file = resolveSpaFile(ROOT, pathname);
        if (file === null || file === ROOT) return;
        const segments = path.relative(ROOT, file).split(path.sep);
        expect(segments.some((segment) => segment.startsWith('.') && segment !== '.well-known'), `${pathname} → ${file}`).toBe(false);
      }),
      { numRuns: 20_000 },
    );
    expect(resolveSpaFile(ROOT, '/.well-known/security.txt')).toBe('/srv/spa/.well-known/security.txt');
    for (const pathname of ['/.env', '/%2eenv', '/.git/config', '/assets/.%2e/.env', '/a/.hidden/b.js']) expect(resolveSpaFile(ROOT, pathname), pathname).toBeNull();
  });

  it('keeps ordinary asset paths, and resolves dot segments inside SPA_DIR', () => {
    expect(resolveSpaFile(ROOT, '/assets/app-Ab12Cd34.js')).toBe('/srv/spa/assets/app-Ab12Cd34.js');
    expect(resolveSpaFile(ROOT, '/../../etc/passwd')).toBe('/srv/spa/etc/passwd');
    expect(resolveSpaFile(ROOT, '/%2e%2e/%2e%2e/etc/passwd')).toBe('/srv/spa/etc/passwd');
  });

  it('works under the filesystem root too (the remote origin mode resolves against /)', () => {
    expect(resolveSpaFile('/', '/index.html')).toBe('/index.html');
    expect(resolveSpaFile('/', '/%2e%2e/%2e%2e/etc/passwd')).toBe('/etc/passwd');
  });
});

describe('resolveSpaUrl (generated paths)', () => {
  it('never leaves the SPA origin or its base path', () => {
    const base = new URL('https://cdn.example.com/spa/v1/');
    fc.assert(
      fc.property(hostilePath, (pathname) => {
        const url = resolveSpaUrl(base, pathname);
        if (url !== null) {
          expect(url.origin, pathname).toBe(base.origin);
          expect(url.pathname.startsWith('/spa/v1/'), `${pathname} → ${url.href}`).toBe(true);
          expect(url.search + url.hash, pathname).toBe('');
        }
      }),
      { numRuns: 20_000 },
    );
  });
});

describe('resolveSpaUrl, for a host that decodes again or normalises Unicode', () => {
  /** What a lenient static host makes of a path: decoded twice, NFKC, backslashes as slashes, dot segments resolved. */
  function asALenientHostReads(pathname: string): string {
    let text = pathname;
    for (let round = 0; round < 2; round++) {
      try {
        text = decodeURIComponent(text);
      } catch {
        break;
      }
    }
    return path.posix.normalize(text.normalize('NFKC').replaceAll('\\', '/'));
  }
  const LAYERED = ['%252e', '%252E', '%252f', '%255c', '%25EF%25BC%258E', '%EF%BC%8E', '\uFF0E', '\uFF0F', '%EF%BC%8F', '\uFE52', '%2e', '..', '.', '/', 'a', '%25', '2e'];
  const layeredPath = fc.array(fc.constantFrom(...LAYERED), { maxLength: 10 }).map((parts) => `/${parts.join('')}`);

  it('never names anything such a host reads outside the base path', () => {
    const base = new URL('https://cdn.example.com/spa/v1/');
    fc.assert(
      fc.property(layeredPath, (pathname) => {
        const url = resolveSpaUrl(base, pathname);
        if (url === null) return;
        const read = asALenientHostReads(url.pathname);
        expect(read === '/spa/v1' || read.startsWith('/spa/v1/'), `${pathname} → ${url.pathname} → ${read}`).toBe(true);
      }),
      { numRuns: 20_000, examples: [['/%252e%252e/%252e%252e/private/x.js'], ['/%EF%BC%8E%EF%BC%8E/x.js']] },
    );
    // Ordinary names, a literal percent sign among them, still resolve.
    expect(resolveSpaUrl(base, '/assets/app-Ab12Cd34.js')?.pathname).toBe('/spa/v1/assets/app-Ab12Cd34.js');
    expect(resolveSpaUrl(base, '/100%25.png')?.pathname).toBe('/spa/v1/100%25.png');
  });
});

describe('serveSpaFrom, remote origin', () => {
  it('answers 502 with a short page when the SPA origin cannot be reached, never throws', async () => {
    const answer = await serveSpaFrom({ kind: 'origin', url: new URL('http://127.0.0.1:1/app/'), contentSecurityPolicy: undefined }, 'GET', '/orders/42', () => undefined, 60_000);
    expect(answer?.status).toBe(502);
    expect(answer?.body).toBe('The application could not be loaded. Try again shortly.');
    expect(answer?.headers).toContainEqual(['cache-control', 'no-store']);
  });
});

describe('serveSpaFrom, remote origin, kept per process as the host says', () => {
  const LAST_MODIFIED = 'Wed, 01 Jan 2025 00:00:00 GMT';
  const BIG = 3 * 1024 * 1024;

  /** A real static host on a port of its own (the cache is per process, keyed by URL), counting what reaches it. */
  async function host() {
    const asked: string[] = [];
    const server = createServer((req, res) => {
      const name = new URL(req.url ?? '/', 'http://x').pathname.replace('/app/', '');
      asked.push(`${req.method} ${name}${req.headers['if-modified-since'] ? ' if-modified-since' : ''}${req.headers.range ? ' range' : ''}`);
      if (name === 'lm.txt') {
        const headers = { 'content-type': 'text/plain', 'cache-control': 'no-cache', 'last-modified': LAST_MODIFIED };
        if (req.headers['if-modified-since'] === LAST_MODIFIED) return void res.writeHead(304, headers).end();
        return void res.writeHead(200, { ...headers, 'content-length': '2' }).end('lm');
      }
      if (name === 'expires.txt') {
        const now = Date.now();
        return void res.writeHead(200, { 'content-type': 'text/plain', date: new Date(now).toUTCString(), expires: new Date(now + 60_000).toUTCString(), 'content-length': '7' }).end('expires');
      }
      if (name === 'vary.txt') return void res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'max-age=60', vary: 'Accept-Language', 'content-length': '4' }).end('vary');
      if (name === 'chunked.txt') {
        // No Content-Length: sent chunked.
        res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'max-age=60' });
        res.write('chun');
        return void res.end('ked');
      }
      if (name === 'big.bin') {
        res.writeHead(200, { 'content-type': 'application/octet-stream', 'cache-control': 'max-age=60' });
        for (let sent = 0; sent < BIG; sent += 64 * 1024) res.write(Buffer.alloc(64 * 1024, 0x62));
        return void res.end();
      }
      res.writeHead(404).end();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const source = { kind: 'origin' as const, url: new URL(`http://127.0.0.1:${(server.address() as { port: number }).port}/app/`), contentSecurityPolicy: undefined };
    const get = async (file: string, headers: Record<string, string> = {}, method = 'GET') => {
      const answer = await serveSpaFrom(source, method, `/${file}`, (name) => headers[name], 60_000);
      const body = answer?.body;
      let bytes = Buffer.alloc(0);
      if (body instanceof Readable) for await (const chunk of body) bytes = Buffer.concat([bytes, chunk as Buffer]);
      else if (body) bytes = Buffer.from(body);
      return { status: answer?.status, length: bytes.length, text: bytes.length < 100 ? bytes.toString() : '', headers: new Map(answer?.headers) };
    };
    return { asked, get, close: () => new Promise((resolve) => server.close(resolve)) };
  }

  it('revalidates with Last-Modified when that is all there is, answers HEAD and If-Modified-Since from the copy, keeps by Expires, small chunked files too', async () => {
    const origin = await host();
    try {
      expect(await origin.get('lm.txt')).toMatchObject({ status: 200, text: 'lm' });
      expect(await origin.get('lm.txt', {}, 'HEAD')).toMatchObject({ status: 200, length: 0 });
      expect(await origin.get('lm.txt', { 'if-modified-since': LAST_MODIFIED })).toMatchObject({ status: 304, length: 0 });
      // no-cache: each one asks the host, with the kept copy's date, and the host's 304 is enough.
      expect(origin.asked.filter((line) => line.includes('lm.txt'))).toEqual(['GET lm.txt', 'GET lm.txt if-modified-since', 'GET lm.txt if-modified-since']);

      for (let i = 0; i < 3; i++) expect(await origin.get('expires.txt')).toMatchObject({ status: 200, text: 'expires' });
      for (let i = 0; i < 3; i++) expect(await origin.get('chunked.txt')).toMatchObject({ status: 200, text: 'chunked' });
      expect(origin.asked.filter((line) => /expires|chunked/.test(line))).toEqual(['GET expires.txt', 'GET chunked.txt']);
    } finally {
      await origin.close();
    }
  });

  it('keeps nothing that varies by what the browser sends or is over 2 MiB (passed on whole), and sends range requests on', async () => {
    const origin = await host();
    try {
      for (let i = 0; i < 2; i++) expect(await origin.get('vary.txt', { 'accept-language': i ? 'de' : 'en' })).toMatchObject({ status: 200, text: 'vary' });
      for (let i = 0; i < 2; i++) expect(await origin.get('big.bin')).toMatchObject({ status: 200, length: BIG });
      await origin.get('chunked.txt');
      await origin.get('chunked.txt', { range: 'bytes=0-1' });
      expect(origin.asked).toEqual(['GET vary.txt', 'GET vary.txt', 'GET big.bin', 'GET big.bin', 'GET chunked.txt', 'GET chunked.txt range']);
    } finally {
      await origin.close();
    }
  });
});

describe('isHashedAsset: what may be cached for good', () => {
  it('knows the hashed names Vite, esbuild (Angular) and webpack (Create React App) write', () => {
    for (const name of [
      // examples/vite-react's own build.
      'assets/index-BKe-udLF.js',
      'assets/index-C4zeRPqy.css',
      'assets/index-Bx3a9_fK.js',
      'assets/fonts/inter-Q2w3E4r5.woff2',
      'main-5INURTSO.js',
      'chunk-5VRVH7LZ.js',
      'static/js/main.8e3f9a1b.js',
      'static/js/453.2c9ba7f0.chunk.js',
      'static/css/main.0f1e2d3c.css',
      'main.a1b2c3d4e5f6a7b8.js',
    ]) {
      expect(isHashedAsset(name), name).toBe(true);
    }
  });

  it('keeps written names revalidated: words, numbers, sizes, dates and versions, however combined', () => {
    for (const name of [
      'index.html', 'robots.txt', 'apple-touch-icon.png', 'firebase-messaging-sw.js', 'app-settings.json', 'runtime-settings.json', 'sw-register.js',
      'theme-variables.css', 'custom-elements.js', 'android-chrome-192x192.png', 'fonts/Inter-SemiBold.woff2', 'config.20240101.json', 'README-SETTINGS.txt',
      'assets/apple-touch-icon.png', 'assets/app-settings.json', 'assets-Ab12Cd34.js', 'assets/fonts/Inter-SemiBold.woff2', 'assets/fonts/OpenSans-SemiBold.ttf',
      'assets/icons/icon-Settings.svg', 'assets/img/og-image-1200x630.png', 'assets/img/bg-1280x720.jpg', 'assets/logo-white-v2.svg', 'assets/img/photo-20240115.jpg',
      'assets/config/env-PROD2024.json', 'REPORT24-BUDGET25.pdf', 'assets/flags/flag-en-us-12.png', 'assets/img/logo-Dark2024.png', 'assets/img/icon-Dark_128.png', 'assets/img/logo-HiRes_64.png', 'assets/img/city-NewYork2.jpg', 'assets/img/iPhone12-x.png', 'assets/img/icon-iPhone12.png', 'main.decade2024.js', 'static/js/cafe1234.chunk.js',
    ]) {
      expect(isHashedAsset(name), name).toBe(false);
    }
    // Each part one kind of thing a person writes. Not covered, as it passes for a hash: a capital
    // on its own inside a part (`GoToTopX`).
    const part = fc.oneof(
      fc.stringMatching(/^[a-z]{1,12}$/),
      fc.stringMatching(/^[A-Z][a-z]{0,11}$/),
      fc.stringMatching(/^(?:[A-Z][a-z]{1,5}){2}$/),
      fc.stringMatching(/^[A-Z]{1,10}$/),
      fc.stringMatching(/^\d{1,8}$/),
      fc.stringMatching(/^\d{2,4}x\d{2,4}$/),
      fc.stringMatching(/^v\d{1,3}$/),
      fc.stringMatching(/^[a-z]{1,8}\d{1,4}x?$/),
      fc.stringMatching(/^[A-Z]{1,8}\d{1,4}$/),
      fc.stringMatching(/^[A-Z][a-z]{1,7}\d{1,4}$/),
      fc.stringMatching(/^[a-z]{1,4}(?:[A-Z][a-z]{1,5}){1,2}\d{0,2}$/),
    );
    const name = fc.tuple(
      fc.constantFrom('', 'assets/', 'assets/fonts/', 'assets/img/', 'static/js/', 'media/'),
      fc.array(fc.tuple(part, fc.constantFrom('-', '.', '_')), { minLength: 1, maxLength: 4 }),
      fc.constantFrom('js', 'css', 'json', 'png', 'svg', 'woff2', 'webmanifest'),
    );
    fc.assert(
      fc.property(name, ([folder, parts, extension]) => {
        const file = `${folder}${parts.map(([text, joint], i) => (i === parts.length - 1 ? text : text + joint)).join('')}.${extension}`;
        expect(isHashedAsset(file), file).toBe(false);
      }),
      { numRuns: 20_000 },
    );
  });

  it('most hashes from those builds count, and a hash taken for a word only revalidates', () => {
    const of = (alphabet: string, length: number) => fc.array(fc.constantFrom(...alphabet), { minLength: length, maxLength: length }).map((chars) => chars.join(''));
    const base64url = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
    // Seeded: fast-check's samples lean to repeated characters, so each share is fixed, not drawn anew.
    const counted = (arbitrary: fc.Arbitrary<string>, numRuns: number) => {
      const names = fc.sample(arbitrary, { numRuns, seed: 17 });
      return names.filter(isHashedAsset).length / names.length;
    };
    // Rollup's: those that read as written words (about 1 in 17) revalidate.
    expect(counted(of(base64url, 8).map((hash) => `assets/index-${hash}.js`), 2_000)).toBeGreaterThan(0.85);
    // esbuild's: those that are capitals, then digits (about 1 in 4), revalidate.
    expect(counted(of('ABCDEFGHIJKLMNOPQRSTUVWXYZ234567', 8).map((hash) => `main-${hash}.js`), 2_000)).toBeGreaterThan(0.6);
    // webpack's hex: those that read as a word then a number (about 1 in 17 at eight characters) revalidate.
    expect(counted(of('0123456789abcdef', 8).map((hash) => `static/js/453.${hash}.chunk.js`), 2_000)).toBeGreaterThan(0.85);
    expect(counted(of('0123456789abcdef', 20).map((hash) => `main.${hash}.js`), 500)).toBeGreaterThan(0.95);
  });
});

describe('the SPA rewrite of next.config.mjs (next start)', () => {
  it('takes exactly the paths that decode and are not /api or /_next; its pattern is the middleware matcher’s, negated', async () => {
    const nextConfig = await import('../../next.config.mjs');
    const { config: middlewareConfig } = await import('../../middleware.ts');
    const previous = process.env.SPA_DIR;
    process.env.SPA_DIR = '.test-tmp/spa';
    try {
      const rewrites = await nextConfig.default.rewrites();
      const source = 'beforeFiles' in rewrites ? (rewrites.beforeFiles?.[0]?.source ?? '') : '';
      const pattern = /^\/:path\((.*)\)$/s.exec(source)?.[1];
      expect(pattern).toBeDefined();
      const takes = new RegExp(`^(?:${pattern})$`);
      fc.assert(
        fc.property(fc.oneof(undecodablePath, fc.array(decodableSegment, { minLength: 1, maxLength: 4 }).map((segments) => segments.join('/')), fc.string({ unit: 'binary', maxLength: 12 }).map(encodeURI)), (rest) => {
          expect(takes.test(rest), rest).toBe(decodes(rest));
          expect(takes.test(`api/${rest}`), rest).toBe(false);
        }),
        { numRuns: 3000 },
      );
      const undecodableMatcher = middlewareConfig.matcher.flatMap((entry) => (typeof entry === 'string' ? [] : [entry.source])).find((entry) => entry.startsWith('/api/proxy/:path('));
      expect(undecodableMatcher).toBe(`/api/proxy/:path((?!${nextConfig.DECODABLE}*$).*)`);
    } finally {
      if (previous === undefined) delete process.env.SPA_DIR;
      else process.env.SPA_DIR = previous;
    }
  });
});
