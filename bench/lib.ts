// Small helpers for the benchmark: tools, process trees, CPU and memory counters, wrk.
import { execFile, spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { promisify } from 'node:util';

const run = promisify(execFile);

export function log(message: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function have(command: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${command}`], { stdio: 'ignore' }).status === 0;
}

/** Installs wrk, apache2 and mod_auth_openidc from the Debian archive when (and only when) one is missing. */
export function ensureTools(): void {
  const missing: string[] = [];
  if (!have('wrk')) missing.push('wrk');
  if (!have('apache2')) missing.push('apache2');
  try {
    readFileSync('/usr/lib/apache2/modules/mod_auth_openidc.so');
  } catch {
    missing.push('libapache2-mod-auth-openidc');
  }
  aptInstall(missing);
}

const POLICY_RC_D = '/usr/sbin/policy-rc.d';

/**
 * Installs Debian packages (none when the list is empty), as root or through sudo. Debian starts a
 * service as its package is installed (nginx and apache2 on port 80); the benchmarks start their
 * own on loopback ports, so for the install a policy-rc.d that refuses every start (exit 101, the
 * mechanism invoke-rc.d documents) is put in place, unless the machine has one already.
 */
export function aptInstall(missing: string[]): void {
  if (missing.length === 0) return;
  if (!have('apt-get')) throw new Error(`missing ${missing.join(', ')} and no apt-get to install them`);
  const sudo = process.getuid?.() === 0 ? [] : ['sudo'];
  const run = (args: string[]) => spawnSync(sudo[0] ?? args[0]!, [...sudo.slice(1), ...(sudo.length ? args : args.slice(1))], { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  log(`installing ${missing.join(', ')} (apt-get)`);
  const ownPolicy = !existsSync(POLICY_RC_D);
  if (ownPolicy) run(['sh', '-c', `printf '#!/bin/sh\\nexit 101\\n' > ${POLICY_RC_D} && chmod 755 ${POLICY_RC_D}`]);
  try {
    for (const args of [['apt-get', 'update'], ['apt-get', 'install', '-y', '--no-install-recommends', ...missing]]) {
      const result = run(args);
      if (result.status !== 0) throw new Error(`${args.join(' ')} failed (${result.status})`);
    }
  } finally {
    if (ownPolicy) run(['rm', '-f', POLICY_RC_D]);
  }
}

// ---------------------------------------------------------------------------------------------
// /proc

interface ProcStat {
  pid: number;
  ppid: number;
  ticks: number;
}

function readStat(pid: number): ProcStat | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    // fields[0] is field 3 (state): ppid = field 4, utime = 14, stime = 15.
    return { pid, ppid: Number(fields[1]), ticks: Number(fields[11]) + Number(fields[12]) };
  } catch {
    return undefined;
  }
}

/** The process and all its live descendants. */
export function processTree(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = readStat(Number(entry));
    if (!stat) continue;
    const list = children.get(stat.ppid) ?? [];
    list.push(stat.pid);
    children.set(stat.ppid, list);
  }
  const tree: number[] = [];
  const queue = [root];
  while (queue.length) {
    const pid = queue.shift() as number;
    tree.push(pid);
    queue.push(...(children.get(pid) ?? []));
  }
  return tree;
}

export const CLOCK_TICKS = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;

/** utime + stime of the tree in milliseconds. */
export function cpuMs(pids: number[]): number {
  let ticks = 0;
  for (const pid of pids) ticks += readStat(pid)?.ticks ?? 0;
  return (ticks * 1000) / CLOCK_TICKS;
}

/** Sum of VmRSS of the processes, in bytes. */
export function rssBytes(pids: number[]): number {
  let total = 0;
  for (const pid of pids) {
    try {
      const match = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
      if (match) total += Number(match[1]) * 1024;
    } catch {
      // gone
    }
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// wrk

export interface WrkResult {
  requests: number;
  seconds: number;
  rps: number;
  p50Ms: number;
  p90Ms: number;
  p99Ms: number;
  non2xx: number;
  socketErrors: number;
  raw: string;
}

function toMs(value: string, unit: string): number {
  const n = Number(value);
  if (unit === 'us') return n / 1000;
  if (unit === 'ms') return n;
  if (unit === 's') return n * 1000;
  if (unit === 'm') return n * 60_000;
  throw new Error(`unknown wrk unit ${unit}`);
}

export function parseWrk(raw: string): WrkResult {
  const percentile = (p: string) => {
    const match = new RegExp(`^\\s+${p}%\\s+([\\d.]+)(us|ms|s|m)\\s*$`, 'm').exec(raw);
    if (!match) throw new Error(`wrk output without ${p}% latency:\n${raw}`);
    return toMs(match[1] as string, match[2] as string);
  };
  const total = /(\d+) requests in ([\d.]+)(us|ms|s|m)/.exec(raw);
  const rps = /Requests\/sec:\s+([\d.]+)/.exec(raw);
  if (!total || !rps) throw new Error(`unexpected wrk output:\n${raw}`);
  const socket = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(raw);
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(raw);
  return {
    requests: Number(total[1]),
    seconds: toMs(total[2] as string, total[3] as string) / 1000,
    rps: Number(rps[1]),
    p50Ms: percentile('50'),
    p90Ms: percentile('90'),
    p99Ms: percentile('99'),
    non2xx: non2xx ? Number(non2xx[1]) : 0,
    socketErrors: socket ? socket.slice(1).reduce((sum, n) => sum + Number(n), 0) : 0,
    raw,
  };
}

export async function wrk(url: string, { connections, seconds, headers }: { connections: number; seconds: number; headers: Record<string, string> }): Promise<WrkResult> {
  const threads = Math.min(2, connections);
  const args = ['-t', String(threads), '-c', String(connections), '-d', `${seconds}s`, '--timeout', '10s', '--latency'];
  for (const [name, value] of Object.entries(headers)) args.push('-H', `${name}: ${value}`);
  args.push(url);
  const { stdout } = await run('wrk', args, { timeout: (seconds + 30) * 1000, maxBuffer: 1 << 20 });
  return parseWrk(stdout);
}

// ---------------------------------------------------------------------------------------------
// Statistics

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? (sorted[mid] as number) : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2;
}

/**
 * Two legs compared round by round. The legs of one round run back to back, so they share what the
 * machine was doing then; on a shared VM whose speed drifts by tens of per cent within minutes, the
 * spread of these per-round comparisons says how far a median verdict can be trusted. Rounds that
 * either leg lacks are left out.
 */
export function perRound<T extends { round: number }>(x: T[], y: T[], compare: (a: T, b: T) => number): number[] {
  const ys = new Map(y.map((sample) => [sample.round, sample]));
  return x.flatMap((sample) => {
    const other = ys.get(sample.round);
    return other ? [compare(sample, other)] : [];
  });
}

/**
 * The samples wrk 4 takes its percentiles from: the latencies it measured plus, for each answer
 * that took at least twice the mean interval between requests on a connection, one more sample per
 * interval it was outstanding, each shorter by that interval (its `stats_correct`: the requests an
 * open-loop load would have sent meanwhile, and how long they would have waited). At -c1 with
 * 300 µs answers, one 15 ms stall adds about 50 samples, so a few stalls a second decide the p99.
 */
export function wrkCorrected(latenciesUs: number[], runtimeUs: number, connections = 1): number[] {
  const samples = [...latenciesUs];
  const perConnection = Math.floor(latenciesUs.length / connections);
  const expected = perConnection > 0 ? Math.floor(runtimeUs / perConnection) : 0;
  if (expected > 0) {
    for (const latency of latenciesUs) {
      if (latency < expected * 2) continue;
      for (let shorter = latency - expected; shorter > expected; shorter -= expected) samples.push(shorter);
    }
  }
  return samples.sort((a, b) => a - b);
}

const LATENCY_CLIENT_SOURCE = new URL('./latency.c', import.meta.url).pathname;

/** Builds bench/latency.c into `dir` (installing a C compiler from Debian's archive if none is there); returns the binary's path. */
export function buildLatencyClient(dir: string): string {
  if (!have('cc')) aptInstall(['gcc', 'libc6-dev']);
  const binary = `${dir}/latency`;
  const built = spawnSync('cc', ['-O2', '-o', binary, LATENCY_CLIENT_SOURCE], { encoding: 'utf8' });
  if (built.status !== 0) throw new Error(`cc bench/latency.c failed: ${built.stderr}`);
  return binary;
}

/** One -c1 run of bench/latency.c against `url` with wrk's request headers: every request's latency (µs) and the run's length. */
export async function closedLoopLatencies(binary: string, url: string, headers: Record<string, string>, seconds: number, requestFile: string): Promise<{ latenciesUs: number[]; runtimeUs: number }> {
  const target = new URL(url);
  const lines = [`GET ${target.pathname}${target.search} HTTP/1.1`];
  if (!Object.keys(headers).some((name) => name.toLowerCase() === 'host')) lines.push(`Host: ${target.host}`);
  for (const [name, value] of Object.entries(headers)) lines.push(`${name}: ${value}`);
  writeFileSync(requestFile, `${lines.join('\r\n')}\r\n\r\n`);
  const { stdout } = await run(binary, [target.port, String(seconds), requestFile], { timeout: (seconds + 30) * 1000, maxBuffer: 64 << 20 });
  const latenciesUs: number[] = [];
  let runtimeUs = NaN;
  for (const line of stdout.split('\n')) {
    if (line.startsWith('runtime ')) runtimeUs = Number(line.slice(8));
    else if (line) latenciesUs.push(Number(line));
  }
  return { latenciesUs, runtimeUs };
}

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[index] as number;
}

// ---------------------------------------------------------------------------------------------
// Contention: CPU the machine spent outside the benchmark's own processes (other users' builds,
// tests, browsers). Shared machines make figures noisy; the report prints how much.

/** Busy CPU time of the whole machine in ms (user+nice+system+irq+softirq+steal). */
export function machineBusyMs(): number {
  const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0, steal = 0] = fields;
  return ((user + nice + system + irq + softirq + steal) * 1000) / CLOCK_TICKS;
}

let redisPids: number[] | undefined;
export function findRedis(): number[] {
  redisPids ??= readdirSync('/proc')
    .filter((entry) => /^\d+$/.test(entry))
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'redis-server';
      } catch {
        return false;
      }
    })
    .map(Number);
  return redisPids;
}

/** CPU ms of this process, its reaped children (wrk), its live descendants and redis-server. */
export function benchFamilyMs(): number {
  const text = readFileSync('/proc/self/stat', 'utf8');
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  // utime, stime, cutime, cstime are fields 14-17.
  const self = [11, 12, 13, 14].reduce((sum, i) => sum + Number(fields[i]), 0);
  const descendants = processTree(process.pid).filter((pid) => pid !== process.pid);
  return (self * 1000) / CLOCK_TICKS + cpuMs(descendants) + cpuMs(findRedis());
}
