import { describe, expect, it } from 'vitest';
import { percentile, perRound, wrkCorrected } from '../../bench/lib.ts';

describe('bench per-round comparison', () => {
  const sample = (round: number, rps: number) => ({ round, rps });

  it('compares each round of one leg with the same round of the other', () => {
    // The machine's speed halves and doubles between rounds; within each round the ratio is what it is.
    const fast = [sample(0, 300), sample(1, 150), sample(2, 600)];
    const apache = [sample(0, 100), sample(1, 75), sample(2, 150)];
    expect(perRound(fast, apache, (a, b) => a.rps / b.rps)).toEqual([3, 2, 4]);
  });

  it('leaves out a round that either leg lacks, whatever order the samples come in', () => {
    const x = [sample(2, 30), sample(0, 10), sample(1, 20)];
    const y = [sample(1, 10), sample(2, 10)];
    expect(perRound(x, y, (a, b) => a.rps - b.rps)).toEqual([20, 10]);
    expect(perRound([], y, (a, b) => a.rps - b.rps)).toEqual([]);
  });
});

describe("wrk's coordinated-omission correction, as the bench reproduces it", () => {
  it('adds one sample per mean interval an answer held the connection, each shorter by that interval', () => {
    // Ten requests in 1,900 µs: wrk's interval is 190 µs; only the 1,000 µs answer reaches twice that.
    const latencies = [...Array.from({ length: 9 }, () => 100), 1_000];
    expect(wrkCorrected(latencies, 1_900)).toEqual([...Array.from({ length: 9 }, () => 100), 240, 430, 620, 810, 1_000]);
  });

  it('moves the p99 of a -c1 run with rare long stalls far above that of its requests', () => {
    // 10,000 answers of 300 µs and ten 15 ms stalls: under 0.1 % of the requests, about 5 % of the samples after the correction.
    const latencies = [...Array.from({ length: 10_000 }, () => 300), ...Array.from({ length: 10 }, () => 15_000)];
    const runtime = latencies.reduce((sum, latency) => sum + latency, 0);
    expect(percentile([...latencies].sort((a, b) => a - b), 99)).toBe(300);
    expect(percentile(wrkCorrected(latencies, runtime), 99)).toBeGreaterThan(10_000);
  });

  it('leaves a run without slow answers as it is', () => {
    expect(wrkCorrected([200, 250, 300], 900)).toEqual([200, 250, 300]);
    expect(wrkCorrected([], 0)).toEqual([]);
  });
});
