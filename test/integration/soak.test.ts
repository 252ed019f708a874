// The 40-second version of `npm run bench:soak` (on both server shapes): one instance under residents calling
// an API while their tokens come due, users signing in and out, and SSE streams (some left early).
// Checked by bench/soak.ts's `soakProblems`: no unexpected answer, every Redis key with an expiry,
// no more session keys than live sessions at the end, no descriptors left open once it is quiet.
// Memory is reported, not judged: 40 s is V8 still sizing its heap (the 10-minute run judges it).
import { describe, expect, it } from 'vitest';
import { formatSoak, runSoak, soakProblems } from '../../bench/soak.ts';

describe('a soak (40 s)', () => {
  it('mixed traffic leaves no keys, sessions or descriptors behind', async () => {
    const report = await runSoak({ seconds: 40, residents: 30, churners: 2, streams: 4, sampleEverySec: 5, accessTokenTtlSec: 12, refreshSkewSec: 8 });
    console.log(formatSoak(report));
    expect(soakProblems(report, { strictMemory: false })).toEqual([]);
    // It did what it claims: people signed in and out, streams ran both ways, tokens were refreshed.
    expect(report.logouts).toBeGreaterThan(10);
    expect(report.streams.completed).toBeGreaterThan(10);
    expect(report.streams.left).toBeGreaterThan(5);
    expect(report.refreshGrants).toBeGreaterThanOrEqual(report.options.residents * 5);
  }, 150_000);
});
