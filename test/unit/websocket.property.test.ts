// The Origin rule of WebSocket handshakes (lib/websocket.ts), the whole defence against cross-site
// WebSocket hijacking: generated near misses of the app's origin never pass, and neither does a
// second Origin header next to the right one.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { isAllowedOrigin } from '../../lib/websocket.ts';

const RUNS = 5000;
const APP_ORIGINS = ['https://app.example.com', 'http://localhost:3000', 'https://app.example.com:8443', 'http://[::1]:3000'];

/** What a hostile origin is made of: pieces of the real one, and what parsers treat specially. */
const PIECES = [
  'https://', 'http://', 'wss://', 'ws://', 'HTTPS://', '//', 'app', '.example.com', 'example.com', 'app.example.com', 'APP', 'localhost', ':3000', ':443',
  ':8443', ':', '.', '/', '\\', '@', 'evil.example', 'evil', '%2e', '%40', ' ', '\t', ',', ';', '#', '?', 'null', '*', 'xn--pp-', 'аpp', '\u0000', '[::1]',
];

const origin = fc.constantFrom(...APP_ORIGINS);
/** The app's origin with something cut, added or swapped, or a string built from the pieces. */
const nearMiss = (appOrigin: string) =>
  fc.oneof(
    fc.tuple(fc.array(fc.constantFrom(...PIECES), { maxLength: 3 }), fc.array(fc.constantFrom(...PIECES), { maxLength: 3 })).map(([before, after]) => before.join('') + appOrigin + after.join('')),
    fc.nat({ max: appOrigin.length }).chain((cut) => fc.constantFrom(appOrigin.slice(0, cut), appOrigin.slice(cut))),
    fc.array(fc.constantFrom(...PIECES), { minLength: 1, maxLength: 8 }).map((pieces) => pieces.join('')),
    fc.string({ maxLength: 40 }),
    fc.constant(appOrigin.toUpperCase()),
  );

describe('isAllowedOrigin (generated)', () => {
  it('passes exactly one header equal to the app’s origin, nothing else', () => {
    fc.assert(
      fc.property(
        origin.chain((appOrigin) => fc.tuple(fc.constant(appOrigin), fc.array(fc.oneof(nearMiss(appOrigin), fc.constant(appOrigin)), { maxLength: 3 }))),
        ([appOrigin, values]) => {
          const expected = values.length === 1 && values[0] === appOrigin;
          expect(isAllowedOrigin(values, appOrigin)).toBe(expected);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it('never passes a near miss, alone or next to the right origin', () => {
    fc.assert(
      fc.property(
        origin.chain((appOrigin) => fc.tuple(fc.constant(appOrigin), nearMiss(appOrigin).filter((value) => value !== appOrigin))),
        ([appOrigin, hostile]) => {
          expect(isAllowedOrigin([hostile], appOrigin)).toBe(false);
          expect(isAllowedOrigin([appOrigin, hostile], appOrigin)).toBe(false);
          expect(isAllowedOrigin([hostile, appOrigin], appOrigin)).toBe(false);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it('refuses what browsers send from elsewhere', () => {
    for (const value of ['null', '', 'https://app.example.com.evil.example', 'https://evil.example', 'http://app.example.com', 'https://app.example.com/', 'https://app.example.com:443', 'https://APP.example.com']) {
      expect(isAllowedOrigin([value], 'https://app.example.com')).toBe(false);
    }
    expect(isAllowedOrigin([], 'https://app.example.com')).toBe(false);
    expect(isAllowedOrigin(['https://app.example.com'], 'https://app.example.com')).toBe(true);
  });
});
