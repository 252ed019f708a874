// `npm run bench`: Gatehouse against the upstream directly and against Apache httpd + mod_auth_openidc,
// with real logins, one IdP, one upstream and one Redis for every leg. See bench/README.md.
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { Socket } from 'node:net';
import { availableParallelism, cpus, tmpdir } from 'node:os';
import path from 'node:path';
import { CLIENT_ID, CLIENT_SECRET, ROOT, freePort, npmStartArgs, startProcess, type RunningProcess } from '../e2e/support/stack.ts';
import { startApache, type RunningApache } from './apache.ts';
import { aptInstall, benchFamilyMs, buildLatencyClient, closedLoopLatencies, cpuMs, ensureTools, findRedis, machineBusyMs, log, median, percentile, perRound, processTree, rssBytes, sleep, wrk, wrkCorrected, type WrkResult } from './lib.ts';
import { benchLogin } from './login.ts';
import { formatSummary, newestProfile, summarise } from './profile.ts';
import { formatSched, labeller, perfAvailable, recordSched } from './sched.ts';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const SECONDS = Number(process.env.BENCH_SECONDS ?? 5);
const CONCURRENCIES = (process.env.BENCH_CONCURRENCY ?? '1,32,128').split(',').map(Number);
const STREAM_BYTES = 100 * 1024 * 1024;
/**
 * Long enough for V8 to have optimised the hot path: after 3 s, BENCH_SCHED=1 still caught the
 * Gatehouse workers' compiler threads taking a CPU from wrk and the upstream during the first -c1
 * round (about 100 ms of their waits in 4 s), which a server that has run for a while does not do.
 */
const WARM_UP_SECONDS = 10;
const STORM_TTL = 60;
const STORM_SKEW = 52; // the token becomes due TTL - SKEW = 8 s after login
const STORM_SECONDS = 13; // one expiry inside; the next would be due ~16 s after login
const PROFILE = process.env.BENCH_PROFILE !== '0';
/**
 * `dpop`: only the DPoP comparison (the fast path with and without DPoP), for a quick check of its cost.
 * `fast`: only the throughput rounds of (a), (b), (d) and (g), for a quick check of the fast path.
 */
const ONLY = process.env.BENCH_ONLY;
/** `BENCH_SCHED=1`: after the rounds, who makes the -c1 tail (bench/sched.ts; needs perf). */
const SCHED = process.env.BENCH_SCHED === '1';
const SCHED_SECONDS = 4;
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const DIST_DIR = process.env.NEXT_DIST_DIR || '.next';
const WORKERS = availableParallelism();

type LegId = 'a' | 'b' | 'c' | 'd' | 'e' | 'f' | 'g';
interface Leg {
  id: LegId;
  title: string;
  url: string;
  headers: Record<string, string>;
  /** Root pid of the process tree whose CPU counts as "the proxy" (for (a): the upstream). */
  pids: () => number[];
}

interface Sample {
  /** Which of the interleaved rounds it was measured in (0 for the warm-up and one-off runs). */
  round: number;
  wrk: WrkResult;
  cpuMs: number;
  /** Cores' worth of CPU used by processes outside the benchmark during the run. */
  foreignCores: number;
  /** -c1 only: the same leg right after, through bench/latency.c (no correction), and those samples as wrk would report them. */
  perRequest?: PerRequest;
}

interface PerRequest {
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** The p99 of the same latencies after wrk's coordinated-omission correction. */
  wrkP99Ms: number;
  /**
   * Answers slower than STALL_US, per 10,000 requests and per second: the correction makes wrk's
   * p99 a measure of the second figure, so a leg that answers twice as often meets the machine's
   * stalls twice as often per second even when each request is as likely to meet one.
   */
  stallsPer10k: number;
  stallsPerSecond: number;
}

const STALL_US = 2_000;

/** Legs whose -c1 latency the targets compare. */
const PER_REQUEST_LEGS = new Set(['a', 'b', 'd', 'g']);
let latencyClient: { binary: string; dir: string } | undefined;

/** One run of bench/latency.c on a leg (see PerRequest); the upstream must see every request with its bearer. */
async function perRequestLatency(leg: Leg, seconds: number, upstream: Upstream): Promise<PerRequest | undefined> {
  if (!latencyClient) {
    const dir = mkdtempSync(path.join(tmpdir(), 'gatehouse-bench-latency-'));
    cleanups.push(async () => rmSync(dir, { recursive: true, force: true }));
    latencyClient = { binary: buildLatencyClient(dir), dir };
  }
  await upstream.reset();
  let measured: { latenciesUs: number[]; runtimeUs: number };
  try {
    measured = await closedLoopLatencies(latencyClient.binary, leg.url, leg.headers, seconds, path.join(latencyClient.dir, `request-${leg.id}`));
  } catch (error) {
    fail(`(${leg.id}) per-request latency client: ${error instanceof Error ? error.message : String(error)}`);
    return undefined;
  }
  await sleep(100);
  const seen = await upstream.stats();
  if (seen.missingBearer > 0 || seen.requests < measured.latenciesUs.length || measured.latenciesUs.length === 0) {
    fail(`(${leg.id}) per-request latency client: ${measured.latenciesUs.length} answers, ${seen.requests} upstream requests, ${seen.missingBearer} without a bearer`);
    return undefined;
  }
  const sorted = [...measured.latenciesUs].sort((a, b) => a - b);
  const stalls = sorted.filter((us) => us > STALL_US).length;
  const ms = (us: number) => us / 1000;
  return {
    p50Ms: ms(percentile(sorted, 50)),
    p99Ms: ms(percentile(sorted, 99)),
    maxMs: ms(sorted.at(-1) as number),
    wrkP99Ms: ms(percentile(wrkCorrected(measured.latenciesUs, measured.runtimeUs), 99)),
    stallsPer10k: (stalls / sorted.length) * 10_000,
    stallsPerSecond: stalls / (measured.runtimeUs / 1e6),
  };
}

const failures: string[] = [];
const started = Date.now();
const cleanups: Array<() => Promise<void>> = [];

function fail(message: string): void {
  failures.push(message);
  log(`FAIL: ${message}`);
}

async function cleanup(): Promise<void> {
  for (const stop of cleanups.splice(0).reverse()) await stop().catch(() => undefined);
}

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    void cleanup().finally(() => process.exit(130));
  });
}

// ---------------------------------------------------------------------------------------------
// Preconditions

function ensureBuild(): void {
  if (existsSync(path.join(ROOT, DIST_DIR, 'BUILD_ID')) && process.env.BENCH_BUILD !== '1') return;
  log(`building into ${DIST_DIR} (npm run build)`);
  const result = spawnSync('npm', ['run', 'build'], { cwd: ROOT, stdio: 'inherit', env: { ...process.env, NEXT_DIST_DIR: DIST_DIR } });
  if (result.status !== 0) throw new Error('npm run build failed');
}

const FLOOR_DIR = 'bench/next-floor';

/**
 * Leg (e), the framework's floor: a bare Next app (bench/next-floor) forwarding with no auth. Built
 * with webpack because Turbopack takes the repository root (the lock file's folder) as its project
 * root and would bundle Gatehouse's own middleware and instrumentation into it.
 */
function ensureFloorBuild(): void {
  if (existsSync(path.join(ROOT, FLOOR_DIR, '.next', 'BUILD_ID')) && process.env.BENCH_BUILD !== '1') return;
  log(`building the floor app (${FLOOR_DIR})`);
  const result = spawnSync('node_modules/.bin/next', ['build', '--webpack', FLOOR_DIR], { cwd: ROOT, stdio: 'inherit' });
  if (result.status !== 0) throw new Error('building the floor app failed');
}

/** Leg (g): a bare node:http forwarder, no auth, one worker per core like `npm start` (bench/forwarder.ts). */
async function startForwarder(port: number, upstreamPort: number): Promise<RunningProcess> {
  const ready = (output: string) => (output.match(/forwarder listening/g) ?? []).length >= WORKERS;
  const proc = await startProcess(`forwarder:${port}`, ['bench/forwarder.ts'], { FORWARDER_PORT: String(port), FORWARDER_UPSTREAM_PORT: String(upstreamPort), FORWARDER_WORKERS: String(WORKERS) }, ready);
  cleanups.push(() => proc.stop());
  return proc;
}

async function startFloor(port: number, upstreamPort: number): Promise<RunningProcess> {
  const proc = await startProcess(`next-floor:${port}`, ['node_modules/next/dist/bin/next', 'start', FLOOR_DIR, '-p', String(port), '-H', '127.0.0.1'], { NODE_ENV: 'production', UPSTREAM_URL: `http://127.0.0.1:${upstreamPort}` }, /Ready in/);
  cleanups.push(() => proc.stop());
  return proc;
}

function redisHostPort(): string {
  const url = new URL(REDIS_URL);
  return `${url.hostname}:${url.port || 6379}`;
}

async function ensureRedis(): Promise<void> {
  const [host, port] = redisHostPort().split(':') as [string, string];
  const reply = await new Promise<string>((resolve, reject) => {
    const socket = new Socket();
    socket.setTimeout(2_000, () => socket.destroy(new Error('timeout')));
    socket.once('error', reject);
    socket.connect(Number(port), host, () => socket.write('PING\r\n'));
    socket.once('data', (data) => {
      resolve(data.toString());
      socket.end();
    });
  }).catch((error: unknown) => `error: ${String(error)}`);
  if (!reply.startsWith('+PONG')) throw new Error(`Redis at ${REDIS_URL} does not answer PING (${reply.trim()}); start redis-server first`);
}

// ---------------------------------------------------------------------------------------------
// Processes

async function startIdp(port: number, appUrls: string[], audience: string, ttl: number): Promise<RunningProcess> {
  const idp = await startProcess(
    `dev-idp:${port}`,
    ['scripts/dev-idp.ts'],
    {
      NODE_ENV: 'development',
      IDP_PORT: String(port),
      IDP_CLIENT_ID: CLIENT_ID,
      IDP_CLIENT_SECRET: CLIENT_SECRET,
      IDP_APP_BASE_URLS: appUrls.join(','),
      IDP_API_AUDIENCES: audience,
      IDP_ACCESS_TOKEN_TTL: String(ttl),
    },
    /dev IdP listening/,
  );
  cleanups.push(() => idp.stop());
  return idp;
}

interface UpstreamStats {
  requests: number;
  missingBearer: number;
  dpopProofs: number;
  bytesIn: number;
  bytesOut: number;
}

interface Upstream {
  port: number;
  pids: () => number[];
  stats(): Promise<UpstreamStats>;
  reset(): Promise<void>;
}

async function startUpstream(copies: number): Promise<Upstream> {
  const port = await freePort();
  const controls = await Promise.all(Array.from({ length: copies }, freePort));
  const procs: RunningProcess[] = [];
  for (const control of controls) {
    const proc = await startProcess(`upstream:${control}`, ['bench/upstream.ts'], { BENCH_UPSTREAM_PORT: String(port), BENCH_UPSTREAM_CONTROL_PORT: String(control) }, /listening/);
    procs.push(proc);
    cleanups.push(() => proc.stop());
  }
  const call = async (control: number, reset: boolean) => {
    const res = await fetch(`http://127.0.0.1:${control}/${reset ? 'reset' : ''}`, { method: reset ? 'POST' : 'GET' });
    return (await res.json()) as UpstreamStats;
  };
  return {
    port,
    pids: () => procs.map((proc) => proc.child.pid as number),
    async stats() {
      const all = await Promise.all(controls.map((control) => call(control, false)));
      return all.reduce((sum, s) => ({
        requests: sum.requests + s.requests,
        missingBearer: sum.missingBearer + s.missingBearer,
        dpopProofs: sum.dpopProofs + s.dpopProofs,
        bytesIn: sum.bytesIn + s.bytesIn,
        bytesOut: sum.bytesOut + s.bytesOut,
      }));
    },
    async reset() {
      await Promise.all(controls.map((control) => call(control, true)));
    },
  };
}

function gatehouseEnv(issuer: string, upstreamPort: number, port: number, extra: Record<string, string> = {}): Record<string, string> {
  return {
    NODE_ENV: 'production',
    NEXT_DIST_DIR: DIST_DIR,
    OIDC_ISSUER: issuer,
    OIDC_CLIENT_ID: CLIENT_ID,
    OIDC_CLIENT_SECRET: CLIENT_SECRET,
    OIDC_SCOPES: 'openid profile email offline_access api:read api:write',
    SESSION_SECRET: randomBytes(32).toString('base64url'),
    REDIS_URL,
    REDIS_KEY_PREFIX: `gh-bench-${randomBytes(4).toString('hex')}:`,
    BFF_APIS: JSON.stringify({ bench: { url: `http://127.0.0.1:${upstreamPort}`, maxBodyBytes: 256 * 1024 * 1024, timeoutMs: 120_000 } }),
    APP_BASE_URL: `http://localhost:${port}`,
    PORT: String(port),
    HOSTNAME: '127.0.0.1',
    GATEHOUSE_WORKERS: String(WORKERS),
    // LOG_LEVEL stays at its default (info: one line per proxied request), as users run it.
    ...extra,
  };
}

async function startGatehouse(kind: 'fast' | 'next', env: Record<string, string>, nodeFlags: string[] = []): Promise<RunningProcess> {
  const workers = Number(env.GATEHOUSE_WORKERS);
  // As `npm start` and `npm run start:next` start them (see server.ts for npm start's V8 flags).
  const args = kind === 'next' ? ['--expose-gc', 'node_modules/next/dist/bin/next', 'start', '-p', env.PORT as string, '-H', '127.0.0.1'] : [...nodeFlags, ...npmStartArgs()];
  const ready = kind === 'next' ? /Ready in/ : (output: string) => (output.match(/Gatehouse listening/g) ?? []).length >= workers;
  // Its log goes to a file, as Apache's access log does in leg (d) and a service's output does in
  // production: read line by line by this process, it would take CPU from the cores being measured.
  const logDir = mkdtempSync(path.join(tmpdir(), 'gatehouse-bench-log-'));
  const proc = await startProcess(`gatehouse-${kind}:${env.PORT}`, args, env, ready, undefined, undefined, path.join(logDir, 'output.log'));
  cleanups.push(async () => {
    await proc.stop();
    rmSync(logDir, { recursive: true, force: true });
  });
  return proc;
}

// ---------------------------------------------------------------------------------------------
// Load

/** Host names the origin the cookie was issued for: mod_auth_openidc refuses a cookie "played" against another host. */
function proxyHeaders(cookie: string, port: number): Record<string, string> {
  return { Host: `localhost:${port}`, 'X-CSRF': '1', Cookie: cookie };
}

/** One wrk run of a leg; checks every answer was 2xx and every request reached the upstream with a bearer. */
async function measure(leg: Leg, connections: number, seconds: number, upstream: Upstream, round = 0): Promise<Sample | undefined> {
  await upstream.reset();
  const pids = leg.pids();
  const cpuBefore = cpuMs(pids);
  const busyBefore = machineBusyMs();
  const familyBefore = benchFamilyMs();
  const t0 = Date.now();
  const result = await wrk(leg.url, { connections, seconds, headers: leg.headers });
  const cpu = cpuMs(pids) - cpuBefore;
  const foreignCores = Math.max(0, machineBusyMs() - busyBefore - (benchFamilyMs() - familyBefore)) / (Date.now() - t0);
  await sleep(100);
  const seen = await upstream.stats();
  const where = `(${leg.id}) ${leg.title} -c${connections}`;
  const problems: string[] = [];
  if (result.non2xx > 0) problems.push(`${result.non2xx} non-2xx answers`);
  if (result.socketErrors > 0) problems.push(`${result.socketErrors} socket errors`);
  if (seen.missingBearer > 0) problems.push(`${seen.missingBearer} upstream requests without a bearer token`);
  if (leg.id === 'f' && seen.dpopProofs < seen.requests) problems.push(`${seen.requests - seen.dpopProofs} upstream requests without a DPoP proof`);
  // A redirect to the IdP is a 3xx that wrk counts as success: it never reaches the upstream.
  if (seen.requests < result.requests) problems.push(`wrk completed ${result.requests} requests but only ${seen.requests} reached the upstream`);
  if (result.requests === 0) problems.push('no request completed');
  for (const problem of problems) fail(`${where}: ${problem}`);
  const ok = problems.length === 0;
  return ok ? { round, wrk: result, cpuMs: cpu, foreignCores } : undefined;
}

async function checkOnce(leg: Leg, upstream: Upstream): Promise<void> {
  await upstream.reset();
  const url = new URL(leg.url);
  const res = await new Promise<{ status: number; body: string }>((resolve, reject) => {
    http
      .get({ host: url.hostname, port: url.port, path: url.pathname, headers: leg.headers }, (answer) => {
        let body = '';
        answer.on('data', (chunk: Buffer) => (body += chunk));
        answer.on('end', () => resolve({ status: answer.statusCode ?? 0, body }));
      })
      .on('error', reject);
  });
  const body = res.body;
  const seen = await upstream.stats();
  if (res.status !== 200 || seen.missingBearer !== 0 || seen.requests !== 1 || (leg.id === 'f') !== (seen.dpopProofs === 1)) {
    throw new Error(`(${leg.id}) ${leg.title}: smoke request answered ${res.status} ${body.slice(0, 200)}; upstream saw ${JSON.stringify(seen)}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Streaming

interface StreamResult {
  direction: 'download' | 'upload';
  bytes: number;
  seconds: number;
  rssBefore: number;
  rssPeak: number;
  rssAfter: number;
}

async function streamCheck(base: string, cookie: string, pids: () => number[], direction: 'download' | 'upload'): Promise<StreamResult> {
  await sleep(500);
  const tree = pids();
  const rssBefore = rssBytes(tree);
  let rssPeak = rssBefore;
  const sampler = setInterval(() => (rssPeak = Math.max(rssPeak, rssBytes(tree))), 50);
  const t0 = performance.now();
  const url = new URL(direction === 'download' ? `/api/proxy/bench/download?bytes=${STREAM_BYTES}` : '/api/proxy/bench/upload', base);
  let bytes: number;
  try {
    bytes = await new Promise<number>((resolve, reject) => {
      const req = http.request(
        { host: '127.0.0.1', port: url.port, path: url.pathname + url.search, method: direction === 'download' ? 'GET' : 'POST', headers: { host: `localhost:${url.port}`, 'x-csrf': '1', cookie } },
        (res) => {
          let received = 0;
          let text = '';
          res.on('data', (chunk: Buffer) => {
            received += chunk.length;
            if (direction === 'upload') text += chunk.toString();
          });
          res.on('end', () => {
            if (res.statusCode !== 200) return reject(new Error(`${direction}: HTTP ${res.statusCode} ${text.slice(0, 200)}`));
            resolve(direction === 'download' ? received : Number((JSON.parse(text) as { bytes: number }).bytes));
          });
          res.on('error', reject);
        },
      );
      req.on('error', reject);
      req.setTimeout(120_000, () => req.destroy(new Error(`${direction} timed out`)));
      if (direction === 'download') return void req.end();
      // Chunked upload with backpressure: the client never holds more than one chunk either.
      const chunk = Buffer.alloc(64 * 1024, 0x62);
      let sent = 0;
      const pump = () => {
        while (sent < STREAM_BYTES) {
          sent += chunk.length;
          if (!req.write(chunk)) return void req.once('drain', pump);
        }
        req.end();
      };
      pump();
    });
  } finally {
    clearInterval(sampler);
  }
  const seconds = (performance.now() - t0) / 1000;
  await sleep(300);
  return { direction, bytes, seconds, rssBefore, rssPeak, rssAfter: rssBytes(tree) };
}

// ---------------------------------------------------------------------------------------------
// Refresh storm

interface StormResult {
  target: string;
  requests: number;
  errors: number;
  refreshGrants: number;
  refreshErrors: number;
  errorCodes: string;
  expected: number;
  stormP50: number;
  stormP99: number;
  stormMax: number;
  outsideP50: number;
  outsideP99: number;
  missingBearer: number;
}

async function grantCounts(issuer: string): Promise<{ success: Record<string, number>; error: Record<string, number>; errorCodes: Record<string, number>; byAccount: Record<string, Record<string, number>> }> {
  return (await (await fetch(`${issuer}/__dev/grants`)).json()) as never;
}

/** -c32 against `url` for STORM_SECONDS from the login, across the moment the access token becomes due. */
async function storm(target: string, issuer: string, base: string, loginUrl: string, username: string, url: string, extraHeaders: Record<string, string>, upstream: Upstream): Promise<StormResult> {
  const before = await grantCounts(issuer);
  const { cookieHeader, loggedInAt } = await benchLogin(loginUrl, username);
  const due = loggedInAt + (STORM_TTL - STORM_SKEW) * 1000;
  await upstream.reset();
  const agent = new http.Agent({ keepAlive: true, maxSockets: 32 });
  const target_ = new URL(url, base);
  const records: Array<{ start: number; ms: number; ok: boolean }> = [];
  const end = loggedInAt + STORM_SECONDS * 1000;
  const one = () =>
    new Promise<void>((resolve) => {
      const start = Date.now();
      const t0 = performance.now();
      const req = http.get({ host: '127.0.0.1', port: target_.port, path: target_.pathname, agent, headers: { host: `localhost:${target_.port}`, 'x-csrf': '1', cookie: cookieHeader, ...extraHeaders } }, (res) => {
        res.resume();
        res.on('end', () => {
          records.push({ start, ms: performance.now() - t0, ok: res.statusCode === 200 });
          resolve();
        });
      });
      req.on('error', () => {
        records.push({ start, ms: performance.now() - t0, ok: false });
        resolve();
      });
      req.setTimeout(10_000, () => req.destroy());
    });
  await Promise.all(
    Array.from({ length: 32 }, async () => {
      while (Date.now() < end) await one();
    }),
  );
  agent.destroy();
  await sleep(300);
  const after = await grantCounts(issuer);
  const seen = await upstream.stats();
  const account = (counts: typeof before) => counts.byAccount[username]?.refresh_token ?? 0;
  // The storm: requests started from the moment the token became due until one second later.
  const inStorm = records.filter((r) => r.start >= due && r.start < due + 1_000).map((r) => r.ms).sort((a, b) => a - b);
  const outside = records.filter((r) => r.start < due || r.start >= due + 1_000).map((r) => r.ms).sort((a, b) => a - b);
  return {
    target,
    requests: records.length,
    errors: records.filter((r) => !r.ok).length,
    refreshGrants: account(after) - account(before),
    refreshErrors: (after.error.refresh_token ?? 0) - (before.error.refresh_token ?? 0),
    errorCodes: Object.entries(after.errorCodes)
      .map(([code, n]) => [code, n - (before.errorCodes[code] ?? 0)] as const)
      .filter(([, n]) => n > 0)
      .map(([code, n]) => `${code} ×${n}`)
      .join(', '),
    expected: 1,
    stormP50: percentile(inStorm, 50),
    stormP99: percentile(inStorm, 99),
    stormMax: inStorm.at(-1) ?? NaN,
    outsideP50: percentile(outside, 50),
    outsideP99: percentile(outside, 99),
    missingBearer: seen.missingBearer,
  };
}

// ---------------------------------------------------------------------------------------------
// DPoP

/**
 * What DPoP costs on the proxied path: leg (b), the fast path presenting a bearer, next to leg (f),
 * the same build and shape against the same upstream with OIDC_DPOP=true and the API marked
 * `dpop` (`Authorization: DPoP` and a fresh ES256 proof per request), in interleaved rounds of the
 * same run. Returns the report's lines.
 */
async function dpopCost(bearer: Leg, issuer: string, port: number, upstream: Upstream): Promise<string[]> {
  const env = gatehouseEnv(issuer, upstream.port, port, {
    OIDC_DPOP: 'true',
    BFF_APIS: JSON.stringify({ bench: { url: `http://127.0.0.1:${upstream.port}`, maxBodyBytes: 256 * 1024 * 1024, timeoutMs: 120_000, dpop: true } }),
  });
  const proc = await startGatehouse('fast', env);
  try {
    const login = await benchLogin(`http://localhost:${port}/api/auth/login`, 'bench-dpop');
    const dpop: Leg = {
      id: 'f',
      title: 'Gatehouse npm start, DPoP API',
      url: `http://127.0.0.1:${port}/api/proxy/bench/whoami`,
      headers: proxyHeaders(login.cookieHeader, port),
      pids: () => processTree(proc.child.pid as number),
    };
    await checkOnce(dpop, upstream);
    log('DPoP: warm-up, then (b) and (f) interleaved');
    await measure(dpop, 32, 3, upstream);
    const samples = new Map<string, Sample[]>();
    for (let round = 0; round < ROUNDS; round++) {
      for (const connections of CONCURRENCIES) {
        for (const leg of round % 2 === 0 ? [bearer, dpop] : [dpop, bearer]) {
          const sample = await measure(leg, connections, SECONDS, upstream, round);
          log(`DPoP round ${round + 1}/${ROUNDS} (${leg.id}) -c${connections}: ${sample ? `${fmt(sample.wrk.rps)} req/s, p50 ${sample.wrk.p50Ms} ms` : 'FAILED'}`);
          if (sample) samples.set(`${leg.id}:${connections}`, [...(samples.get(`${leg.id}:${connections}`) ?? []), sample]);
        }
      }
    }
    const stat = (id: LegId, c: number) => {
      const list = samples.get(`${id}:${c}`) ?? [];
      const requests = list.reduce((sum, s) => sum + s.wrk.requests, 0);
      return {
        complete: list.length === ROUNDS,
        rps: median(list.map((s) => s.wrk.rps)),
        p50: median(list.map((s) => s.wrk.p50Ms)),
        cpuUs: (list.reduce((sum, s) => sum + s.cpuMs, 0) * 1000) / requests,
        foreign: median(list.map((s) => s.foreignCores)),
      };
    };
    const lines = [
      `DPoP on the proxied path: (b) bearer against (f) \`Authorization: DPoP\` with a fresh ES256 proof per request, same build, same upstream, ${ROUNDS} interleaved rounds × ${SECONDS} s, medians.`,
      '',
      '| -c | (b) bearer req/s | (f) DPoP req/s | (f)/(b) req/s | (b) p50 ms | (f) p50 ms | (b) CPU µs/req | (f) CPU µs/req | DPoP CPU µs/req | other load (cores) |',
      '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ];
    for (const c of CONCURRENCIES) {
      const [b, f] = [stat('b', c), stat('f', c)];
      if (!b.complete || !f.complete) {
        lines.push(`| ${c} | FAILED | | | | | | | | |`);
        continue;
      }
      lines.push(`| ${c} | ${fmt(b.rps)} | ${fmt(f.rps)} | ${times(f.rps / b.rps)}× | ${fmt(b.p50, 2)} | ${fmt(f.p50, 2)} | ${fmt(b.cpuUs)} | ${fmt(f.cpuUs)} | ${fmt(f.cpuUs - b.cpuUs)} | ${Math.max(b.foreign, f.foreign).toFixed(2)} |`);
    }
    return lines;
  } finally {
    await proc.stop();
  }
}

/** BENCH_ONLY=dpop: the upstream, one IdP, (b) and (f), and nothing else. */
async function mainDpopOnly(): Promise<void> {
  aptInstall(spawnSync('sh', ['-c', 'command -v wrk'], { stdio: 'ignore' }).status === 0 ? [] : ['wrk']);
  await ensureRedis();
  ensureBuild();
  const [idpPort, fastPort, dpopPort] = await Promise.all([freePort(), freePort(), freePort()]);
  const upstream = await startUpstream(2);
  const idp = await startIdp(idpPort, [`http://localhost:${fastPort}`, `http://localhost:${dpopPort}`], `http://127.0.0.1:${upstream.port}`, 3600);
  const issuer = `http://localhost:${idpPort}`;
  const fast = await startGatehouse('fast', gatehouseEnv(issuer, upstream.port, fastPort));
  const login = await benchLogin(`http://localhost:${fastPort}/api/auth/login`, 'bench-fast');
  const bearer: Leg = { id: 'b', title: 'Gatehouse npm start (fast path)', url: `http://127.0.0.1:${fastPort}/api/proxy/bench/whoami`, headers: proxyHeaders(login.cookieHeader, fastPort), pids: () => processTree(fast.child.pid as number) };
  await checkOnce(bearer, upstream);
  await measure(bearer, 32, 3, upstream);
  const lines = await dpopCost(bearer, issuer, dpopPort, upstream);
  await fast.stop();
  await idp.stop();
  if (failures.length) lines.push('', '**Run FAILED:**', ...failures.map((f) => `- ${f}`));
  const markdown = `### DPoP cost — ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC\n\n${cpus()[0]?.model.trim() ?? 'unknown CPU'}, ${availableParallelism()} cores shared by wrk, the upstream, Gatehouse and Redis; Node ${process.version}; Gatehouse ${WORKERS} workers.\n\n${lines.join('\n')}\n`;
  mkdirSync(path.join(import.meta.dirname, 'results'), { recursive: true });
  writeFileSync(path.join(import.meta.dirname, 'results', 'dpop.md'), markdown);
  process.stdout.write(`\n${markdown}`);
  if (failures.length) process.exitCode = 1;
}

// ---------------------------------------------------------------------------------------------
// Reporting

const fmt = (n: number, digits = 0) => (Number.isFinite(n) ? n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits }) : 'n/a');
/**
 * Ratios to two decimals, never rounded across a target: one shown as 3.00 has met "at least 3×"
 * (2.996 shows as 2.99), one shown as 1.40 has met "at most 1.4×" (1.404 shows as 1.41).
 */
const times = (n: number) => fmt(Math.floor(n * 100) / 100, 2);
const timesUp = (n: number) => fmt(Math.ceil(n * 100) / 100, 2);
const mb = (bytes: number) => `${(bytes / 1024 / 1024).toFixed(1)} MB`;

function version(command: string, args: string[]): string {
  const result = spawnSync(command, args, { encoding: 'utf8' });
  return `${result.stdout}${result.stderr}`.trim().split('\n')[0] ?? '?';
}

async function main(): Promise<void> {
  ensureTools();
  if (SCHED && !perfAvailable()) aptInstall(['linux-perf']);
  await ensureRedis();
  ensureBuild();
  if (ONLY !== 'fast') ensureFloorBuild();

  const legsTitle: Record<LegId, string> = {
    a: 'upstream directly',
    b: 'Gatehouse npm start (fast path)',
    c: 'Gatehouse next start (route handler)',
    d: 'Apache + mod_auth_openidc',
    e: 'bare Next route handler, no auth (floor)',
    f: 'Gatehouse npm start, DPoP API',
    g: 'bare node:http forwarder, no auth',
  };
  const quick = ONLY === 'fast';
  const [idpPort, fastPort, nextPort, apachePort, profilePort, floorPort, dpopPort, forwarderPort] = await Promise.all([freePort(), freePort(), freePort(), freePort(), freePort(), freePort(), freePort(), freePort()]);
  const fastUrl = `http://localhost:${fastPort}`;
  const nextUrl = `http://localhost:${nextPort}`;
  const profileUrl = `http://localhost:${profilePort}`;
  const apacheUrl = `http://localhost:${apachePort}`;

  log('starting upstream (2 processes), dev IdP, Gatehouse (npm start, next start) and Apache');
  const upstream = await startUpstream(2);
  const audience = `http://127.0.0.1:${upstream.port}`;
  const idp = await startIdp(idpPort, [fastUrl, nextUrl, apacheUrl, profileUrl, `http://localhost:${dpopPort}`], audience, 3600);
  const issuer = `http://localhost:${idpPort}`;
  const fast = await startGatehouse('fast', gatehouseEnv(issuer, upstream.port, fastPort));
  const nextServer = quick ? undefined : await startGatehouse('next', gatehouseEnv(issuer, upstream.port, nextPort));
  const floor = quick ? undefined : await startFloor(floorPort, upstream.port);
  const forwarder = await startForwarder(forwarderPort, upstream.port);
  let apache: RunningApache | undefined = await startApache({
    port: apachePort,
    issuer,
    clientId: CLIENT_ID,
    clientSecret: CLIENT_SECRET,
    upstreamPort: upstream.port,
    redis: redisHostPort(),
    refreshSkewSec: 30,
  });
  cleanups.push(() => apache?.stop() ?? Promise.resolve());

  log('logging in (dev IdP form) on each relying party');
  const fastLogin = await benchLogin(`${fastUrl}/api/auth/login`, 'bench-fast');
  const nextLogin = quick ? undefined : await benchLogin(`${nextUrl}/api/auth/login`, 'bench-next');
  const apacheLogin = await benchLogin(`${apacheUrl}/api/proxy/bench/whoami`, 'bench-apache');

  const proxyPath = '/api/proxy/bench/whoami';
  const legs: Leg[] = [
    { id: 'a', title: legsTitle.a, url: `http://127.0.0.1:${upstream.port}/whoami`, headers: { 'X-CSRF': '1', Authorization: 'Bearer direct-leg' }, pids: () => upstream.pids().flatMap(processTree) },
    { id: 'b', title: legsTitle.b, url: `http://127.0.0.1:${fastPort}${proxyPath}`, headers: proxyHeaders(fastLogin.cookieHeader, fastPort), pids: () => processTree(fast.child.pid as number) },
    ...(nextServer && nextLogin ? [{ id: 'c' as const, title: legsTitle.c, url: `http://127.0.0.1:${nextPort}${proxyPath}`, headers: proxyHeaders(nextLogin.cookieHeader, nextPort), pids: () => processTree(nextServer.child.pid as number) }] : []),
    { id: 'd', title: legsTitle.d, url: `http://127.0.0.1:${apachePort}${proxyPath}`, headers: proxyHeaders(apacheLogin.cookieHeader, apachePort), pids: () => processTree((apache as RunningApache).pid) },
    // The browser's own Authorization header is passed along: the upstream's bearer check holds without any session work.
    ...(floor ? [{ id: 'e' as const, title: legsTitle.e, url: `http://127.0.0.1:${floorPort}${proxyPath}`, headers: { 'X-CSRF': '1', Authorization: 'Bearer floor-leg' }, pids: () => processTree(floor.child.pid as number) }] : []),
    { id: 'g', title: legsTitle.g, url: `http://127.0.0.1:${forwarderPort}${proxyPath}`, headers: { 'X-CSRF': '1', Authorization: 'Bearer forwarder-leg' }, pids: () => processTree(forwarder.child.pid as number) },
  ];
  for (const leg of legs) await checkOnce(leg, upstream);

  const fastRssStart = rssBytes(legs[1]!.pids());
  log(`warm-up: each leg -c32 for ${WARM_UP_SECONDS} s (fast path RSS now ${mb(fastRssStart)})`);
  for (const leg of legs) await measure(leg, 32, WARM_UP_SECONDS, upstream);

  const samples = new Map<string, Sample[]>();
  for (let round = 0; round < ROUNDS; round++) {
    for (const connections of CONCURRENCIES) {
      // Rotate the order every round so no leg always runs right after the same neighbour.
      const order = legs.map((_, i) => legs[(i + round) % legs.length] as Leg);
      for (const leg of order) {
        const sample = await measure(leg, connections, SECONDS, upstream, round);
        if (sample && connections === 1 && PER_REQUEST_LEGS.has(leg.id)) sample.perRequest = await perRequestLatency(leg, SECONDS, upstream);
        const perRequest = sample?.perRequest ? `; per request p99 ${fmt(sample.perRequest.p99Ms, 2)} ms, max ${fmt(sample.perRequest.maxMs, 1)} ms (wrk would say ${fmt(sample.perRequest.wrkP99Ms, 2)})` : '';
        log(`round ${round + 1}/${ROUNDS} (${leg.id}) -c${connections}: ${sample ? `${fmt(sample.wrk.rps)} req/s, p50 ${sample.wrk.p50Ms} ms, p99 ${sample.wrk.p99Ms} ms, other load ${sample.foreignCores.toFixed(2)} cores${perRequest}` : 'FAILED'}`);
        if (sample) samples.set(`${leg.id}:${connections}`, [...(samples.get(`${leg.id}:${connections}`) ?? []), sample]);
      }
    }
  }
  const fastRssEnd = rssBytes(legs[1]!.pids());

  const schedLines: string[] = [];
  if (SCHED && !perfAvailable()) fail('BENCH_SCHED=1 needs perf (Debian package linux-perf), and it did not install');
  else if (SCHED) {
    log(`scheduling at -c1: perf sched over ${SCHED_SECONDS} s of wrk -c1 on each leg`);
    for (const leg of legs.filter((candidate) => ['a', 'b', 'd', 'g'].includes(candidate.id))) {
      const labelOf = labeller({ proxy: leg.id === 'a' ? [] : leg.pids(), upstream: upstream.pids().flatMap(processTree), redis: findRedis(), bench: process.pid });
      const load = wrk(leg.url, { connections: 1, seconds: SCHED_SECONDS + 2, headers: leg.headers });
      await sleep(1000);
      const report = await recordSched(SCHED_SECONDS, labelOf);
      const result = await load;
      schedLines.push(formatSched(`(${leg.id}) ${leg.title}`, Math.round((result.requests * SCHED_SECONDS) / result.seconds), report));
    }
  }

  const streams: StreamResult[] = [];
  if (!quick) log('streaming 100 MB each way through (b)');
  for (const direction of quick ? [] : (['download', 'upload'] as const)) {
    await upstream.reset();
    try {
      const result = await streamCheck(fastUrl, fastLogin.cookieHeader, legs[1]!.pids, direction);
      const seen = await upstream.stats();
      if (result.bytes !== STREAM_BYTES) fail(`${direction}: ${result.bytes} bytes arrived instead of ${STREAM_BYTES}`);
      if (seen.missingBearer > 0) fail(`${direction}: upstream request without a bearer token`);
      streams.push(result);
    } catch (error) {
      fail(`${direction} through (b): ${String(error)}`);
    }
  }

  // Free the CPU for the DPoP comparison, the profile and the storm.
  await nextServer?.stop();
  await apache.stop();
  await forwarder.stop();
  let dpopLines: string[] = [];
  if (!quick) {
    log('DPoP: (b) against the same fast path presenting DPoP-bound tokens with a proof per request');
    dpopLines = await dpopCost(legs[1]!, issuer, dpopPort, upstream);
  }
  await fast.stop();

  let profileText = '';
  if (quick ? process.env.BENCH_PROFILE === '1' : PROFILE) {
    log('CPU profile: one fast-path worker (GATEHOUSE_WORKERS=1, --cpu-prof) under wrk -c32 for 5 s');
    const dir = mkdtempSync(path.join(tmpdir(), 'gatehouse-bench-prof-'));
    const profiled = await startGatehouse('fast', gatehouseEnv(issuer, upstream.port, profilePort, { GATEHOUSE_WORKERS: '1' }), ['--cpu-prof', '--cpu-prof-dir', dir]);
    const login = await benchLogin(`${profileUrl}/api/auth/login`, 'bench-profile');
    const leg: Leg = { id: 'b', title: 'profiled fast path', url: `http://127.0.0.1:${profilePort}${proxyPath}`, headers: proxyHeaders(login.cookieHeader, profilePort), pids: () => processTree(profiled.child.pid as number) };
    await measure(leg, 32, 2, upstream);
    const sample = await measure(leg, 32, 5, upstream);
    await profiled.stop();
    try {
      profileText = `wrk -c32 against the profiled worker: ${fmt(sample?.wrk.rps ?? NaN)} req/s (profiler on)\n\n` + formatSummary(summarise(newestProfile(dir), 20));
      mkdirSync(path.join(import.meta.dirname, 'results'), { recursive: true });
      writeFileSync(path.join(import.meta.dirname, 'results', 'latest.cpuprofile'), readFileSync(newestProfile(dir)));
    } catch (error) {
      profileText = `no profile written: ${String(error)}`;
    }
    rmSync(dir, { recursive: true, force: true });
  }

  await idp.stop();
  const storms: StormResult[] = [];
  if (!quick) await stormRounds();

  async function stormRounds(): Promise<void> {
  log(`refresh storm: access-token TTL ${STORM_TTL} s, refresh skew ${STORM_SKEW} s (due ${STORM_TTL - STORM_SKEW} s after login), -c32 for ${STORM_SECONDS} s`);
  const [stormIdpPort, stormFastPort, stormApachePort] = await Promise.all([freePort(), freePort(), freePort()]);
  const stormFastUrl = `http://localhost:${stormFastPort}`;
  const stormApacheUrl = `http://localhost:${stormApachePort}`;
  const stormIdp = await startIdp(stormIdpPort, [stormFastUrl, stormApacheUrl], audience, STORM_TTL);
  const stormIssuer = `http://localhost:${stormIdpPort}`;
  const stormFast = await startGatehouse('fast', gatehouseEnv(stormIssuer, upstream.port, stormFastPort, { TOKEN_REFRESH_SKEW: String(STORM_SKEW) }));
  storms.push(await storm('(b) Gatehouse npm start', stormIssuer, stormFastUrl, `${stormFastUrl}/api/auth/login`, 'storm-gatehouse', proxyPath, {}, upstream));
  await stormFast.stop();
  const gh = storms[0] as StormResult;
  if (gh.refreshGrants !== gh.expected) fail(`refresh storm: Gatehouse sent ${gh.refreshGrants} refresh_token grants for one expiry (expected exactly 1)`);
  if (gh.errors > 0) fail(`refresh storm: ${gh.errors} Gatehouse requests failed`);
  if (gh.missingBearer > 0) fail(`refresh storm: ${gh.missingBearer} upstream requests without a bearer`);
  if (process.env.BENCH_APACHE_STORM !== '0') {
    apache = await startApache({ port: stormApachePort, issuer: stormIssuer, clientId: CLIENT_ID, clientSecret: CLIENT_SECRET, upstreamPort: upstream.port, redis: redisHostPort(), refreshSkewSec: STORM_SKEW });
    // Informational only: mod_auth_openidc has no per-session refresh lock.
    storms.push(await storm('(d) Apache + mod_auth_openidc', stormIssuer, stormApacheUrl, `${stormApacheUrl}${proxyPath}`, 'storm-apache', proxyPath, {}, upstream));
    await apache.stop();
  }
  await stormIdp.stop();
  }
  await cleanup();

  // -------------------------------------------------------------------------------------------
  const stat = (id: LegId, c: number) => {
    const list = samples.get(`${id}:${c}`) ?? [];
    const complete = list.length === ROUNDS;
    const requests = list.reduce((sum, s) => sum + s.wrk.requests, 0);
    return {
      complete,
      rps: median(list.map((s) => s.wrk.rps)),
      min: Math.min(...list.map((s) => s.wrk.rps)),
      max: Math.max(...list.map((s) => s.wrk.rps)),
      p50: median(list.map((s) => s.wrk.p50Ms)),
      p99: median(list.map((s) => s.wrk.p99Ms)),
      cpuUs: (list.reduce((sum, s) => sum + s.cpuMs, 0) * 1000) / requests,
      foreign: median(list.map((s) => s.foreignCores)),
    };
  };
  const lines: string[] = [];
  const cpu = cpus()[0]?.model.trim() ?? 'unknown CPU';
  lines.push(`### Benchmark — ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC`);
  lines.push('');
  lines.push(
    `${cpu}, ${availableParallelism()} cores (wrk, upstream, proxy and Redis share them); Node ${process.version}; ${version('apache2', ['-v'])}; mod_auth_openidc ${version('dpkg-query', ['-W', '-f=${Version}', 'libapache2-mod-auth-openidc'])}; ${version('wrk', ['-v'])}.`,
  );
  lines.push(
    `${ROUNDS} interleaved rounds × ${SECONDS} s per leg and concurrency (wrk -t2, -t1 at -c1, keep-alive), medians over rounds; CPU = utime+stime of the proxy's process tree (for (a): the upstream's) per request; GET /api/proxy/bench/whoami with a real session; Gatehouse ${WORKERS} workers, Apache mpm_event 2 × 128 threads, same Redis for both session stores.`,
  );
  lines.push('');
  const allSamples = [...samples.values()].flat();
  const foreign = median(allSamples.map((s) => s.foreignCores));
  const foreignMax = Math.max(...allSamples.map((s) => s.foreignCores));
  lines.push(
    `Other processes on the machine used a median ${foreign.toFixed(2)} cores (max ${foreignMax.toFixed(2)}) during the runs${foreign > 0.2 ? ' — **the machine was shared; treat the figures as noisy**' : ''}.`,
  );
  lines.push('');
  lines.push('| Leg | -c | req/s (median) | req/s (min–max) | p50 ms | p99 ms | CPU µs/req | other load (cores) |');
  lines.push('|---|---:|---:|---:|---:|---:|---:|---:|');
  for (const leg of legs) {
    for (const c of CONCURRENCIES) {
      const s = stat(leg.id, c);
      if (!s.complete) {
        lines.push(`| (${leg.id}) ${leg.title} | ${c} | FAILED | | | | | |`);
        continue;
      }
      lines.push(`| (${leg.id}) ${leg.title} | ${c} | ${fmt(s.rps)} | ${fmt(s.min)}–${fmt(s.max)} | ${fmt(s.p50, 2)} | ${fmt(s.p99, 2)} | ${fmt(s.cpuUs)} | ${s.foreign.toFixed(2)} |`);
    }
  }
  lines.push('');
  const ratio = (x: LegId, y: LegId, c: number) => {
    const a = stat(x, c);
    const b = stat(y, c);
    return a.complete && b.complete ? a.rps / b.rps : NaN;
  };
  const roundSamples = (id: LegId, c: number) => samples.get(`${id}:${c}`) ?? [];
  const roundRatios = (x: LegId, y: LegId, c: number) => perRound(roundSamples(x, c), roundSamples(y, c), (a, b) => a.wrk.rps / b.wrk.rps);
  const range = (values: number[]) => (values.length ? `${times(Math.min(...values))}–${times(Math.max(...values))}` : 'n/a');
  lines.push(`| Ratio (req/s): median, and the lowest–highest of single rounds | ${CONCURRENCIES.map((c) => `-c${c}`).join(' | ')} |`);
  lines.push(`|---|${CONCURRENCIES.map(() => '---:').join('|')}|`);
  const ratios = [['b', 'd', '(b)/(d) fast path vs Apache'], ['b', 'g', '(b)/(g) fast path vs the bare forwarder'], ['g', 'd', '(g)/(d) the bare forwarder vs Apache: what a proxy doing nothing reaches'], ['c', 'd', '(c)/(d) next start vs Apache'], ['c', 'e', '(c)/(e) next start vs the bare route handler'], ['b', 'a', '(b)/(a) fast path vs direct']] as const;
  for (const [x, y, label] of ratios.filter(([x, y]) => legs.some((leg) => leg.id === x) && legs.some((leg) => leg.id === y))) {
    lines.push(`| ${label} | ${CONCURRENCIES.map((c) => `${times(ratio(x, y, c))}× (${range(roundRatios(x, y, c))})`).join(' | ')} |`);
  }
  lines.push('');
  lines.push(
    'The legs of one round run back to back, so a single round compares them on the same machine state; the medians over rounds can pair a fast minute of one leg with a slow minute of another. A verdict whose single rounds fall on both sides of its target is within this machine\'s noise.',
  );
  lines.push('');
  const c1 = CONCURRENCIES.includes(1);
  /** A -c1 per-request figure (bench/latency.c) of one leg, median over the rounds that measured it. */
  const perRequestMedian = (id: LegId, pick: (value: PerRequest) => number) => median(roundSamples(id, 1).flatMap((sample) => (sample.perRequest ? [pick(sample.perRequest)] : [])));
  const added = (id: LegId) => stat(id, 1).p50 - stat('a', 1).p50;
  const addedP99 = (id: LegId) => stat(id, 1).p99 - stat('a', 1).p99;
  if (c1) {
    const shown = legs.filter((leg) => leg.id !== 'a');
    lines.push(`Added latency at -c1 (minus the direct call's), p50: ${shown.map((leg) => `(${leg.id}) ${fmt(added(leg.id), 2)} ms`).join(', ')}; p99: ${shown.map((leg) => `(${leg.id}) ${fmt(addedP99(leg.id), 2)} ms`).join(', ')}.`);
    const measuredPerRequest = legs.filter((leg) => roundSamples(leg.id, 1).some((sample) => sample.perRequest));
    if (measuredPerRequest.length) {
      lines.push('');
      lines.push(
        `wrk's percentiles include its coordinated-omission correction (bench/README.md): at -c1 its p99 says how much of the run was spent in stalls, more than how slow 1 % of the requests were. ` +
          `Per request, without it (bench/latency.c, one keep-alive connection like wrk -c1, on each leg right after its wrk run; medians over rounds), p50 / p99 / max: ` +
          `${measuredPerRequest.map((leg) => `(${leg.id}) ${fmt(perRequestMedian(leg.id, (v) => v.p50Ms), 2)} / ${fmt(perRequestMedian(leg.id, (v) => v.p99Ms), 2)} / ${fmt(perRequestMedian(leg.id, (v) => v.maxMs), 1)} ms`).join(', ')}; ` +
          `the same samples through wrk's correction give a p99 of ${measuredPerRequest.map((leg) => `(${leg.id}) ${fmt(perRequestMedian(leg.id, (v) => v.wrkP99Ms), 2)} ms`).join(', ')}. ` +
          `Answers over ${STALL_US / 1000} ms, per 10,000 requests and per second: ${measuredPerRequest.map((leg) => `(${leg.id}) ${fmt(perRequestMedian(leg.id, (v) => v.stallsPer10k), 1)} and ${fmt(perRequestMedian(leg.id, (v) => v.stallsPerSecond), 1)}`).join(', ')}.`,
      );
    }
  }
  lines.push(`Gatehouse fast-path RSS (primary + ${WORKERS} workers): ${mb(fastRssStart)} before the load, ${mb(fastRssEnd)} after all rounds.`);
  lines.push('');
  if (schedLines.length) {
    lines.push(`Scheduling at -c1 (perf sched over ${SCHED_SECONDS} s of a wrk -c1 run per leg): wake-ups of request-path threads (wrk, the proxy's request threads, the upstream's, Redis), those that waited over 0.25 ms for a CPU, and what held the CPU meanwhile.`);
    lines.push('');
    lines.push('| Leg | requests | path wake-ups | waits > 0.25 ms | waited (ms) | CPU held by |');
    lines.push('|---|---:|---:|---:|---:|---|');
    lines.push(...schedLines);
    lines.push('');
  }
  if (!quick) {
  lines.push(...dpopLines);
  lines.push('');
  lines.push('| Streaming through (b) | bytes | MB/s | RSS before | RSS peak | growth | after |');
  lines.push('|---|---:|---:|---:|---:|---:|---:|');
  for (const s of streams) {
    lines.push(`| ${s.direction} | ${fmt(s.bytes)} | ${fmt(s.bytes / 1024 / 1024 / s.seconds)} | ${mb(s.rssBefore)} | ${mb(s.rssPeak)} | ${mb(s.rssPeak - s.rssBefore)} | ${mb(s.rssAfter)} |`);
  }
  lines.push('');
  lines.push(`Refresh storm: access-token TTL ${STORM_TTL} s, refresh ${STORM_SKEW} s before expiry (due ${STORM_TTL - STORM_SKEW} s after login), one session, 32 concurrent clients for ${STORM_SECONDS} s from the login; "storm" = requests started within 1 s after the token became due.`);
  lines.push('');
  lines.push('| Storm | requests | refresh grants (expected) | refresh grant errors | failed requests | storm p50 / p99 / max ms | outside p50 / p99 ms |');
  lines.push('|---|---:|---:|---:|---:|---:|---:|');
  for (const s of storms) {
    lines.push(`| ${s.target} | ${fmt(s.requests)} | ${s.refreshGrants} (${s.expected}) | ${s.refreshErrors}${s.errorCodes ? ` (${s.errorCodes})` : ''} | ${s.errors} | ${fmt(s.stormP50, 1)} / ${fmt(s.stormP99, 1)} / ${fmt(s.stormMax, 1)} | ${fmt(s.outsideP50, 1)} / ${fmt(s.outsideP99, 1)} |`);
  }
  lines.push('');
  }
  const targets: string[] = [];
  const verdict = (ok: boolean) => (ok ? 'PASS' : 'FAIL');
  /** How many single rounds meet a target, for the verdict's line. */
  const rounds = (values: number[], meets: (value: number) => boolean) => `${values.filter(meets).length} of ${values.length} rounds`;
  for (const c of [32, 128].filter((c) => CONCURRENCIES.includes(c))) {
    const vsApache = roundRatios('b', 'd', c);
    const vsForwarder = roundRatios('b', 'g', c);
    targets.push(
      `- (b) ≥ 3× (d) at -c${c}: ${verdict(ratio('b', 'd', c) >= 3)} (${times(ratio('b', 'd', c))}×; ${rounds(vsApache, (r) => r >= 3)}); (b) ≥ 0.6× (g): ${verdict(ratio('b', 'g', c) >= 0.6)} (${times(ratio('b', 'g', c))}×; ${rounds(vsForwarder, (r) => r >= 0.6)})`,
    );
  }
  for (const c of quick ? [] : [32, 128].filter((c) => CONCURRENCIES.includes(c))) {
    const cpuRatio = stat('c', c).cpuUs / stat('e', c).cpuUs;
    targets.push(`- (c) ≥ 0.75× (e) at -c${c}: ${verdict(ratio('c', 'e', c) >= 0.75)} (${times(ratio('c', 'e', c))}×); CPU per request (c) ≤ 1.4× (e): ${verdict(cpuRatio <= 1.4)} (${timesUp(cpuRatio)}×)`);
  }
  if (c1) {
    // Within a round the direct call's latency is subtracted from both, so comparing added latencies is comparing latencies.
    const medianRounds = perRound(roundSamples('b', 1), roundSamples('d', 1), (b, d) => d.wrk.p50Ms - b.wrk.p50Ms);
    const tailRounds = perRound(roundSamples('b', 1), roundSamples('d', 1), (b, d) => d.wrk.p99Ms - b.wrk.p99Ms);
    targets.push(`- (b) added p50 latency at -c1 ≤ (d)'s: ${verdict(added('b') <= added('d'))} (${fmt(added('b'), 2)} ms vs ${fmt(added('d'), 2)} ms; ${rounds(medianRounds, (margin) => margin >= 0)})`);
    targets.push(`- (b) added p99 latency at -c1 ≤ (d)'s: ${verdict(addedP99('b') <= addedP99('d'))} (${fmt(addedP99('b'), 2)} ms vs ${fmt(addedP99('d'), 2)} ms; ${rounds(tailRounds, (margin) => margin >= 0)})`);
    const perRequestTail = perRound(roundSamples('b', 1), roundSamples('d', 1), (b, d) => (b.perRequest && d.perRequest ? d.perRequest.p99Ms - b.perRequest.p99Ms : NaN)).filter(Number.isFinite);
    const addedPerRequest = (id: LegId) => perRequestMedian(id, (v) => v.p99Ms) - perRequestMedian('a', (v) => v.p99Ms);
    if (perRequestTail.length) {
      targets.push(`  - for information, per request without wrk's correction: (b) added p99 ${fmt(addedPerRequest('b'), 2)} ms vs (d) ${fmt(addedPerRequest('d'), 2)} ms; (b)'s p99 no higher than (d)'s in ${perRequestTail.filter((margin) => margin >= 0).length} of ${perRequestTail.length} rounds`);
    }
  }
  for (const s of streams) targets.push(`- ${s.direction} 100 MB, RSS growth < 50 MB: ${verdict(s.rssPeak - s.rssBefore < 50 * 1024 * 1024)} (${mb(s.rssPeak - s.rssBefore)})`);
  const gh = storms[0];
  if (gh) targets.push(`- one refresh grant per expiry (Gatehouse): ${verdict(gh.refreshGrants === 1)} (${gh.refreshGrants})`);
  lines.push('Targets:');
  lines.push(...targets);
  if (failures.length) {
    lines.push('');
    lines.push('**Run FAILED:**');
    lines.push(...failures.map((f) => `- ${f}`));
  }
  const markdown = lines.join('\n') + '\n';
  mkdirSync(path.join(import.meta.dirname, 'results'), { recursive: true });
  writeFileSync(path.join(import.meta.dirname, 'results', 'latest.md'), markdown + (profileText ? `\n\`\`\`\n${profileText}\n\`\`\`\n` : ''));
  process.stdout.write('\n' + markdown);
  if (profileText) process.stdout.write(`\n${profileText}\n`);
  log(`done in ${Math.round((Date.now() - started) / 1000)} s; results in bench/results/latest.md`);
  if (failures.length) process.exitCode = 1;
}

try {
  await (ONLY === 'dpop' ? mainDpopOnly() : main());
} catch (error) {
  log(`bench aborted: ${error instanceof Error ? error.stack ?? error.message : String(error)}`);
  process.exitCode = 1;
} finally {
  await cleanup();
}
