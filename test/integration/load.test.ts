// The 15-second versions of `npm run bench:load`: two `npm start` instances behind nginx, one
// Redis, users each with their own login calling two APIs at once while their tokens expire again
// and again — first with nothing going wrong, then with each fault the bench injects (the cluster
// failover on a Redis Cluster of 3 masters and 3 replicas started for it), every run
// checked by bench/load.ts's `problemsIn` for what the fault may cost and nothing more.
import { describe, expect, it } from 'vitest';
import { formatReport, problemsIn, runLoad, type Fault } from '../../bench/load.ts';

const SHORT = { virtualUsers: 30, seconds: 15, accessTokenTtlSec: 12, refreshSkewSec: 8, thinkMs: 200, loginConcurrency: 8 };

describe('a fleet under load (15 s)', () => {
  it('two instances behind nginx: every request answered, one refresh grant per session per expiry', async () => {
    const report = await runLoad(SHORT);
    console.log(formatReport(report));
    expect(problemsIn(report)).toEqual([]);
    // The run did what it claims: tokens expired during it, and the IdP saw the refreshes.
    expect(report.expiriesInUse).toBeGreaterThanOrEqual(report.sessions * 2);
    expect(report.refreshGrants).toBeGreaterThanOrEqual(report.expiriesInUse);
  }, 120_000);

  it.each<Fault['kind']>(['stall-idp', 'kill-instance', 'restart-redis-aof', 'restart-redis', 'reset-upstream', 'failover-cluster'])('with %s for 5 s: only what that fault may cost', async (kind) => {
    const report = await runLoad({ ...SHORT, fault: { kind, atSec: 5, forSec: 5 } });
    console.log(formatReport(report));
    expect(problemsIn(report)).toEqual([]);
    // The fault was felt (or, for an instance the balancer routed around, at least happened). A
    // frozen IdP may cost no call at all: each session falls due during it (every 4 s), its first
    // call waits REFRESH_WAIT_MS and goes on with the token held, which outlasts the freeze.
    expect(report.faultWindow).toBeDefined();
    if (kind === 'stall-idp') expect(report.failureLog.length + report.answersOverOneSecond).toBeGreaterThanOrEqual(report.sessions);
    else if (kind !== 'kill-instance') expect(report.failureLog.length).toBeGreaterThan(0);
    if (kind === 'failover-cluster') {
      // Sessions both on and off the failed shard, or "no one elsewhere noticed" would prove nothing.
      expect(report.failover?.usersOnFailedShard.length).toBeGreaterThan(0);
      expect(report.failover?.usersOnFailedShard.length).toBeLessThan(report.sessions);
      expect(report.failover?.failoverMs).toBeLessThan(report.options.fault?.forSec as number * 1000);
    }
  }, 120_000);
});
