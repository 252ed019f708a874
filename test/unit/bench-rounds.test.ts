import { describe, expect, it } from 'vitest';
import { perRound } from '../../bench/lib.ts';

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
