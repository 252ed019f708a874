import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { MAX_RETURN_TO_LENGTH, safeReturnTo, sameOriginRedirect } from '../../lib/http.ts';
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

  it('is at most MAX_RETURN_TO_LENGTH characters of ASCII that JSON stores as they are, however long the input grows when normalised', () => {
    const piece = fc.constantFrom('é', '€', '😀', '中', 'a', '/', '?', '#', '%C3%A9', ' ', '"', '<', '\u2028');
    const longPath = fc.tuple(fc.array(piece, { minLength: 300, maxLength: 2100 }), fc.constantFrom('/', '/a?', '/x#')).map(([pieces, head]) => head + pieces.join(''));
    fc.assert(
      fc.property(fc.oneof(longPath, fc.string({ unit: 'grapheme', maxLength: 2100 }).map((text) => `/${text}`)), (raw) => {
        const target = safeReturnTo(raw);
        expect(target.length).toBeLessThanOrEqual(MAX_RETURN_TO_LENGTH);
        expect(JSON.stringify(target)).toHaveLength(target.length + 2);
        expect(/^[\x21-\x7e]+$/.test(target), target).toBe(true);
      }),
      { numRuns: 2000 },
    );
  });

  it('keeps the longest allowed target and refuses one character more, counted after normalisation', () => {
    const largest = `/${'é'.repeat(341)}a`;
    expect(safeReturnTo(largest)).toBe(`/${'%C3%A9'.repeat(341)}a`);
    expect(safeReturnTo(`${largest}b`)).toBe('/');
    // Fewer than MAX_RETURN_TO_LENGTH characters as typed, three times as many once encoded.
    expect(safeReturnTo(`/${'é'.repeat(400)}`)).toBe('/');
  });

  it('finds the dot-segment spelling of a protocol-relative path', () => {
    expect(safeReturnTo('/.//evil.example')).toBe('/');
    expect(safeReturnTo('/a/..//evil.example')).toBe('/');
    expect(safeReturnTo('/%2e//evil.example')).toBe('/');
  });

  it('yields a target that no layer of percent-decoding turns into one that leaves the app', () => {
    const layersOf = (target: string) => {
      const layers = [target];
      for (let layer = target; layers.length < 5; ) {
        const decoded = decodeURIComponent(layer);
        if (decoded === layer) break;
        layers.push((layer = decoded));
      }
      return layers;
    };
    fc.assert(
      fc.property(fc.oneof(hostileReturnTo, fc.webPath()), (raw) => {
        for (const layer of layersOf(safeReturnTo(raw))) {
          expect(leavesTheApp(layer), `${raw} → ${layer}`).toBe(false);
          expect(new URL(layer, APP).pathname.startsWith('//'), `${raw} → ${layer}`).toBe(false);
        }
      }),
      { numRuns: 20_000, examples: [['/x/..%2F%2Fevil.example'], ['/x/%2e%2e%2F%2Fevil.example'], ['/a/b/..%2f..%2F%2Fevil.example']] },
    );
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
