import fc from 'fast-check';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { resolveSpaFile } from '../../lib/spa.ts';

const ROOT = '/srv/spa';
const PIECES = ['/', '.', '..', '%2e', '%2E', '%2f', '%2F', '%5c', '\\', '%00', '%252e', 'etc', 'passwd', 'assets', 'a.js', ';', '%'];

describe('resolveSpaFile (generated paths)', () => {
  it('never names a file outside SPA_DIR', () => {
    fc.assert(
      fc.property(fc.oneof(fc.array(fc.constantFrom(...PIECES), { maxLength: 14 }).map((parts) => `/${parts.join('')}`), fc.webPath(), fc.string()), (pathname) => {
        const file = resolveSpaFile(ROOT, pathname);
        if (file !== null) expect(file === ROOT || file.startsWith(`${ROOT}${path.sep}`), `${pathname} → ${file}`).toBe(true);
      }),
      { numRuns: 20_000 },
    );
  });

  it('keeps ordinary asset paths', () => {
    expect(resolveSpaFile(ROOT, '/assets/app-Ab12Cd34.js')).toBe('/srv/spa/assets/app-Ab12Cd34.js');
    expect(resolveSpaFile(ROOT, '/../../etc/passwd')).toBe('/srv/spa/etc/passwd');
    expect(resolveSpaFile(ROOT, '/%2e%2e/%2e%2e/etc/passwd')).toBe('/srv/spa/etc/passwd');
  });
});
