import { describe, expect, it } from 'vitest';
import { analyse, labeller } from '../../bench/sched.ts';

// `perf sched timehist` lines: time of the switch-out, [cpu], task, then wait time, scheduling
// delay and run time in ms. The proxy is pid 100 (threads 101, 102), the upstream pid 200.
const HEADER = ['           time    cpu  task name                       wait time  sch delay   run time', '                        [tid/pid]                          (msec)     (msec)     (msec)', '--------------- ------  ------------------------------  ---------  ---------  ---------'];
const line = (time: number, cpu: number, task: string, delayMs: number, runMs: number) => `${time.toFixed(6).padStart(15)} [${String(cpu).padStart(4, '0')}]  ${task.padEnd(30)}  0.000  ${delayMs.toFixed(3)}  ${runMs.toFixed(3)}`;
const labelOf = labeller({ proxy: [100], upstream: [200], redis: [300], bench: 400 });

describe('bench scheduling analysis', () => {
  it('charges a request-path thread’s wait for a CPU to whatever ran on that CPU meanwhile', () => {
    const text = [
      ...HEADER,
      // CPU 1: a V8 helper of the proxy runs 10.000–10.002; wrk became ready at 10.0005 and ran at 10.002.
      line(10.002, 1, 'V8Worker[101/100]', 0, 2),
      line(10.0021, 1, 'wrk[500/499]', 1.5, 0.1),
      // CPU 0: the upstream waited 0.1 ms (an ordinary wake-up), the proxy's request thread none.
      line(10.003, 0, 'MainThread[200]', 0.1, 0.2),
      line(10.004, 0, 'MainThread[100]', 0, 0.5),
      // CPU 0: the proxy's request thread waited 0.4 ms on an idle CPU (nothing ran there).
      line(10.01, 0, 'MainThread[100]', 0.4, 0.3),
      '     10.020000 [0001]  <idle>                              0.000      0.000      1.000',
    ].join('\n');
    const report = analyse(text, labelOf);
    expect(report.wakeups).toBe(4);
    expect(report.notable).toBe(2);
    expect(report.notableMs).toBeCloseTo(1.9, 6);
    const held = Object.fromEntries(report.heldBy);
    expect(held['proxy: V8Worker']).toBeCloseTo(1.5, 6);
    expect(held['no thread (CPU idle, or the host had it)']).toBeCloseTo(0.4, 6);
    expect(Object.keys(held)).toHaveLength(2);
  });

  it('labels threads by process and role', () => {
    expect(labelOf(100, 'MainThread')).toBe('proxy: request thread');
    expect(labelOf(100, 'libuv-worker')).toBe('proxy: libuv-worker');
    expect(labelOf(200, 'MainThread')).toBe('upstream: request thread');
    expect(labelOf(300, 'redis-server')).toBe('redis');
    expect(labelOf(400, 'MainThread')).toBe('the bench itself');
    expect(labelOf(999, 'kdamond.0')).toBe('other: kdamond.0');
    expect(labelOf(499, 'wrk')).toBe('wrk');
  });
});
