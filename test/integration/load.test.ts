// The 15-second version of `npm run bench:load`: two `npm start` instances behind nginx, one Redis,
// users each with their own login calling two APIs at once while their tokens expire three times.
// Every request answered, no refresh refused, never two grants of one session in one token lifetime.
import { describe, expect, it } from 'vitest';
import { formatReport, problemsIn, runLoad } from '../../bench/load.ts';

describe('a fleet under load (15 s)', () => {
  it('two instances behind nginx: every request answered, one refresh grant per session per expiry', async () => {
    const report = await runLoad({ virtualUsers: 40, seconds: 15, accessTokenTtlSec: 12, refreshSkewSec: 8, thinkMs: 200, loginConcurrency: 8 });
    console.log(formatReport(report));
    expect(problemsIn(report)).toEqual([]);
    // The run did what it claims: tokens expired during it, and the IdP saw the refreshes.
    expect(report.expiriesInUse).toBeGreaterThanOrEqual(report.sessions * 2);
    expect(report.refreshGrants).toBeGreaterThanOrEqual(report.expiriesInUse);
  }, 120_000);
});
