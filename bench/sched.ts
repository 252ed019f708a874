// `BENCH_SCHED=1 npm run bench`: where the -c1 latency tail comes from. While wrk -c1 runs against a
// leg, `perf sched record` logs every context switch on the machine. Each time a thread on the
// request's path (wrk, the proxy's request thread, the upstream's, Redis) was ready to run but had to
// wait for a CPU, whatever held that CPU meanwhile is charged with the wait. At -c1 the requests go
// one at a time, so such waits are what the tail is made of; the report says who caused them.
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

/** Waits shorter than this are the ordinary cost of a wake-up; longer ones show in the tail. */
const NOTABLE_WAIT_MS = 0.25;

export interface SchedReport {
  /** Times a path thread was switched in (each follows a wake-up at -c1). */
  wakeups: number;
  /** Of those, how many waited longer than NOTABLE_WAIT_MS for a CPU, and how long in all. */
  notable: number;
  notableMs: number;
  /** Who held the CPU during those waits, in ms, largest first. */
  heldBy: Array<[string, number]>;
}

export function perfAvailable(): boolean {
  return spawnSync('perf', ['--version'], { stdio: 'ignore' }).status === 0;
}

/** Records context switches on every CPU for `seconds`; resolves with the analysis. */
export async function recordSched(seconds: number, labelOf: (pid: number, thread: string) => string): Promise<SchedReport> {
  const dir = mkdtempSync(path.join(tmpdir(), 'gatehouse-bench-sched-'));
  const data = path.join(dir, 'sched.data');
  try {
    await new Promise<void>((resolve, reject) => {
      const perf = spawn('perf', ['sched', 'record', '-a', '-o', data, '--', 'sleep', String(seconds)], { stdio: 'ignore' });
      perf.once('error', reject);
      perf.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`perf sched record exited ${code}`))));
    });
    const timehist = spawnSync('perf', ['sched', 'timehist', '-i', data], { encoding: 'utf8', maxBuffer: 512 * 1024 * 1024 });
    if (timehist.status !== 0) throw new Error(`perf sched timehist exited ${timehist.status}: ${timehist.stderr.slice(0, 300)}`);
    return analyse(timehist.stdout, labelOf);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

interface Run {
  cpu: string;
  label: string;
  /** When the thread started running, and when it was switched out (seconds). */
  start: number;
  end: number;
  /** How long it had been ready to run before it got the CPU (seconds). */
  waited: number;
}

const NO_THREAD = 'no thread (CPU idle, or the host had it)';
const ON_PATH = new Set(['wrk', 'redis', 'upstream: request thread', 'proxy: request thread']);

/**
 * `perf sched timehist` prints one line per switch-out: time, [cpu], name[tid/pid] (or name[pid]),
 * then wait time, scheduling delay and run time in ms.
 */
export function analyse(text: string, labelOf: (pid: number, thread: string) => string): SchedReport {
  const byCpu = new Map<string, Run[]>();
  for (const line of text.split('\n')) {
    const match = /^\s*([\d.]+)\s+\[(\d+)\]\s+(.+?)\[(\d+)(?:\/(\d+))?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$/.exec(line);
    if (!match) continue;
    const [, time, cpu, name, first, second, , delay, ran] = match as unknown as string[];
    if ((name as string).startsWith('<idle>')) continue;
    const pid = Number(second ?? first);
    const end = Number(time);
    const run: Run = { cpu: cpu as string, label: labelOf(pid, (name as string).trim()), start: end - Number(ran) / 1000, end, waited: Number(delay) / 1000 };
    const list = byCpu.get(run.cpu) ?? [];
    list.push(run);
    byCpu.set(run.cpu, list);
  }
  const held = new Map<string, number>();
  let wakeups = 0;
  let notable = 0;
  let notableMs = 0;
  for (const [, list] of byCpu) {
    for (let i = 0; i < list.length; i++) {
      const run = list[i] as Run;
      if (!ON_PATH.has(run.label)) continue;
      wakeups += 1;
      if (run.waited * 1000 <= NOTABLE_WAIT_MS) continue;
      notable += 1;
      notableMs += run.waited * 1000;
      const from = run.start - run.waited;
      let charged = 0;
      for (let j = i - 1; j >= 0; j--) {
        const other = list[j] as Run;
        if (other.end <= from) break;
        const overlap = Math.min(other.end, run.start) - Math.max(other.start, from);
        if (overlap <= 0) continue;
        held.set(other.label, (held.get(other.label) ?? 0) + overlap * 1000);
        charged += overlap;
      }
      // No thread of this machine ran: the virtual CPU was waking from idle, or the host had it.
      if (run.waited > charged) held.set(NO_THREAD, (held.get(NO_THREAD) ?? 0) + (run.waited - charged) * 1000);
    }
  }
  return { wakeups, notable, notableMs, heldBy: [...held].sort((a, b) => b[1] - a[1]) };
}

/**
 * A label for a thread: which part of the bench it belongs to and, for Node processes, whether it
 * is the thread requests run on or one of V8's or libuv's helpers.
 */
export function labeller(parts: { proxy: number[]; upstream: number[]; redis: number[]; bench?: number }): (pid: number, thread: string) => string {
  const proxy = new Set(parts.proxy);
  const upstream = new Set(parts.upstream);
  const redis = new Set(parts.redis);
  // One label per kind of thread: kworker/0:1 and kworker/1:2, memfd:sealed-91 and the like.
  const kind = (thread: string) => thread.replace(/[:/].*$/, '');
  const role = (thread: string) => (thread === 'MainThread' || thread === 'node' || thread === 'apache2' ? 'request thread' : kind(thread));
  return (pid, thread) => {
    if (thread === 'wrk') return 'wrk';
    if (redis.has(pid)) return 'redis';
    if (pid === parts.bench) return 'the bench itself';
    if (proxy.has(pid)) return `proxy: ${role(thread)}`;
    if (upstream.has(pid)) return `upstream: ${role(thread)}`;
    return `other: ${kind(thread)}`;
  };
}

export function formatSched(leg: string, requests: number, report: SchedReport): string {
  const held = report.heldBy
    .slice(0, 6)
    .map(([label, ms]) => `${label} ${ms.toFixed(1)} ms`)
    .join(', ');
  return `| ${leg} | ${requests} | ${report.wakeups} | ${report.notable} | ${report.notableMs.toFixed(1)} | ${held || '—'} |`;
}
