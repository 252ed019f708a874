import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { safeReturnTo, sameOriginRedirect } from '../../lib/http.ts';
import { hostileReturnTo } from '../support/hostile-inputs.ts';

const APP = 'https://app.example.com';

function leavesTheApp(target: string): boolean {
  return new URL(target, APP).origin !== APP;
}

describe('safeReturnTo (generated inputs)', () => {
  it('never yields a target that leaves the app once a browser resolves it', () => {
    fc.assert(
      fc.property(fc.oneof(hostileReturnTo, fc.string(), fc.webUrl(), fc.webPath()), (raw) => {
        const target = safeReturnTo(raw);
        expect(target.startsWith('/')).toBe(true);
        expect(target.startsWith('//') || target.startsWith('/\\')).toBe(false);
        expect(leavesTheApp(target)).toBe(false);
        // Deciding twice changes nothing: the answer is already in its final, normalised form.
        expect(safeReturnTo(target)).toBe(target);
      }),
      { numRuns: 20_000 },
    );
  });

  it('finds the dot-segment spelling of a protocol-relative path', () => {
    expect(safeReturnTo('/.//evil.example')).toBe('/');
    expect(safeReturnTo('/a/..//evil.example')).toBe('/');
    expect(safeReturnTo('/%2e//evil.example')).toBe('/');
  });

  it('keeps ordinary paths with dot segments, normalised', () => {
    expect(safeReturnTo('/a/./b/../c?x=1#y')).toBe('/a/c?x=1#y');
  });
});

describe('sameOriginRedirect', () => {
  it('is the app origin whatever string it is given', () => {
    fc.assert(
      fc.property(fc.oneof(hostileReturnTo, fc.string(), fc.webUrl()), (stored) => {
        expect(new URL(sameOriginRedirect(stored, new URL(APP))).origin).toBe(APP);
      }),
      { numRuns: 20_000 },
    );
  });
});
