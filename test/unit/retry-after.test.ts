import { describe, expect, it } from 'vitest';
import { parseRetryAfter } from '../../lib/oidc.ts';

describe("parseRetryAfter (an IdP's Retry-After, passed on with 503 idp_unavailable)", () => {
  const now = Date.parse('2026-12-02T08:00:00Z');
  it('reads delta-seconds and HTTP dates', () => {
    expect(parseRetryAfter('7', now)).toBe(7);
    expect(parseRetryAfter('Wed, 02 Dec 2026 08:00:30 GMT', now)).toBe(30);
  });
  it('caps what an IdP may ask at 600 s and never goes below 0', () => {
    expect(parseRetryAfter('86400', now)).toBe(600);
    expect(parseRetryAfter('Wed, 02 Dec 2026 07:00:00 GMT', now)).toBe(0);
  });
  it('ignores what it cannot read', () => {
    for (const value of [undefined, null, '', 'soon', '-5', '1e3']) expect(parseRetryAfter(value, now)).toBeUndefined();
  });
});
