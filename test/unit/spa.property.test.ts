import fc from 'fast-check';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { resolveSpaFile, resolveSpaUrl, serveSpaFrom } from '../../lib/spa.ts';

const ROOT = '/srv/spa';
const PIECES = ['/', '.', '..', '%2e', '%2E', '%2f', '%2F', '%5c', '\\', '%00', '%252e', 'etc', 'passwd', 'assets', 'a.js', ';', '%'];
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

describe('serveSpaFrom, remote origin', () => {
  it('answers 502 with a short page when the SPA origin cannot be reached, never throws', async () => {
    const answer = await serveSpaFrom({ kind: 'origin', url: new URL('http://127.0.0.1:1/app/'), contentSecurityPolicy: undefined }, 'GET', '/orders/42', () => undefined);
    expect(answer?.status).toBe(502);
    expect(answer?.body).toBe('The application could not be loaded. Try again shortly.');
    expect(answer?.headers).toContainEqual(['cache-control', 'no-store']);
  });
});
