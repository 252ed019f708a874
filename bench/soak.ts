// `npm run bench:soak`: one `npm start` instance (documented defaults: a worker per core) under
// ten minutes of mixed traffic — resident users calling an API while their tokens come due again
// and again, users who sign in, look at their sessions and sign out, and SSE streams, some left
// early by their reader — sampled every few seconds for memory (RSS), open file descriptors and
// the Redis keys under the instance's prefix.
// It fails (exit 1) on a failed request, a Redis key without an expiry, session keys beyond the
// live sessions at the end, descriptors left open, or memory peaks that keep rising (see `soakProblems`).
// `runSoak` is also what test/integration/soak.test.ts runs for 40 s in `npm test`.
import { readdirSync } from 'node:fs';
import http from 'node:http';
import { Redis } from 'ioredis';
import { loginThroughRp } from '../e2e/support/headless-login.ts';
import { startStack } from '../e2e/support/stack.ts';
import { REDIS_URL, idpGrants } from '../test/support/http-client.ts';
import { log, processTree, rssBytes, sleep } from './lib.ts';

export interface SoakOptions {
  seconds: number;
  /** Users signed in for the whole soak, each calling an API every `residentThinkMs`. */
  residents: number;
  residentThinkMs: number;
  /** Loops that each sign a new user in, call the API, list the sessions and sign out, again and again. */
  churners: number;
  /** SSE streams open at once (20 events, 100 ms apart; every third one left after 500 ms). */
  streams: number;
  sampleEverySec: number;
  accessTokenTtlSec: number;
  refreshSkewSec: number;
  /** The server shape; by default the test stack's (npm start unless E2E_SERVER=next). */
  server?: 'fast' | 'next';
}

export const SOAK_DEFAULTS: SoakOptions = {
  seconds: 600,
  residents: 100,
  residentThinkMs: 500,
  churners: 2,
  streams: 8,
  sampleEverySec: 10,
  accessTokenTtlSec: 30,
  refreshSkewSec: 20,
};

export interface SoakSample {
  atSec: number;
  rssMb: number;
  /** Open file descriptors of the instance's processes (sockets included). */
  fds: number;
  /** Keys under the instance's prefix, by kind (`session`, `user-sessions`, …). */
  keys: Record<string, number>;
  /** Kinds of keys found without an expiry (a leak: nothing would ever remove them). */
  keysWithoutTtl: string[];
  /** Sessions signed in and not signed out at the moment of the sample. */
  liveSessions: number;
}

export interface SoakReport {
  options: SoakOptions;
  requests: number;
  /** Unexpected answers by status and Gatehouse's code (a 401 after sign-out is expected, not counted). */
  failures: Record<string, number>;
  logins: number;
  logouts: number;
  /** Refresh grants the IdP answered during the soak. */
  refreshGrants: number;
  streams: { completed: number; left: number; events: number };
  /** Every sample; the last is taken after the traffic stopped and the client closed its connections. */
  samples: SoakSample[];
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
const QUIET_MS = 8_000;

interface Answer {
  status: number;
  code: string | null;
  body: string;
}

function request(base: string, path: string, cookie: string, options: { method?: string; leaveAfterMs?: number } = {}, retried = false): Promise<Answer> {
  const { method = 'GET', leaveAfterMs } = options;
  return new Promise((resolve) => {
    const req = http.request(new URL(path, base), { method, agent, headers: { cookie, 'x-csrf': '1', accept: 'application/json' } }, (response) => {
      const code = response.headers['x-gatehouse-error'];
      const chunks: Buffer[] = [];
      response.on('data', (chunk: Buffer) => chunks.push(chunk));
      const done = () => resolve({ status: response.statusCode ?? 0, code: typeof code === 'string' ? code : null, body: Buffer.concat(chunks).toString() });
      response.on('end', done);
      // A reader that leaves early: the answer so far counts, the connection is torn down.
      if (leaveAfterMs !== undefined) setTimeout(() => (req.destroy(), done()), leaveAfterMs);
      response.on('error', () => undefined);
    });
    req.setTimeout(30_000, () => req.destroy());
    req.on('error', () => {
      // As browsers do: an idempotent request that met a kept-alive connection the server had just
      // closed (its idle timeout racing our reuse) is sent once more, on a new connection.
      if (req.reusedSocket && method === 'GET' && !retried) resolve(request(base, path, cookie, options, true));
      else resolve({ status: 0, code: null, body: '' });
    });
    req.end();
  });
}

async function signIn(base: string, username: string): Promise<string> {
  const { rpCookies } = await loginThroughRp({ startUrl: `${base}/api/auth/login`, username });
  const value = rpCookies.get('gatehouse');
  if (!value) throw new Error(`login of ${username} gave no session cookie`);
  return `gatehouse=${value}`;
}

function openFds(pids: number[]): number {
  let count = 0;
  for (const pid of pids) {
    try {
      count += readdirSync(`/proc/${pid}/fd`).length;
    } catch {
      // gone
    }
  }
  return count;
}

/** Every key under the prefix, counted by kind, and the kinds of those without an expiry. */
async function keysUnder(redis: Redis, prefix: string): Promise<{ keys: Record<string, number>; keysWithoutTtl: string[] }> {
  const keys: Record<string, number> = {};
  const withoutTtl = new Set<string>();
  let cursor = '0';
  do {
    const [next, batch] = await redis.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 1000);
    cursor = next;
    const ttls = batch.length ? ((await redis.pipeline(batch.map((key) => ['pttl', key])).exec()) ?? []) : [];
    batch.forEach((key, i) => {
      const kind = key.slice(prefix.length).split(':')[0] ?? '?';
      keys[kind] = (keys[kind] ?? 0) + 1;
      if (ttls[i]?.[1] === -1) withoutTtl.add(kind);
    });
  } while (cursor !== '0');
  return { keys, keysWithoutTtl: [...withoutTtl] };
}

export async function runSoak(overrides: Partial<SoakOptions> = {}): Promise<SoakReport> {
  const options = { ...SOAK_DEFAULTS, ...overrides };
  const stack = await startStack({ ...(options.server ? { server: options.server } : {}), accessTokenTtl: options.accessTokenTtlSec, env: { TOKEN_REFRESH_SKEW: String(options.refreshSkewSec) } });
  const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: 2 });
  try {
    const base = (stack.apps[0] as (typeof stack.apps)[number]).url;
    const pids = () => processTree(stack.apps[0]?.process.child.pid as number);
    log(`one instance at ${base}; signing in ${options.residents} residents`);
    const residents: string[] = [];
    for (let i = 0; i < options.residents; i++) residents.push(await signIn(base, `soak-resident-${i}`));

    const grantsBefore = await idpGrants(stack.issuer);
    const report: SoakReport = { options, requests: 0, failures: {}, logins: residents.length, logouts: 0, refreshGrants: 0, streams: { completed: 0, left: 0, events: 0 }, samples: [] };
    let churning = 0;
    const fail = (answer: Answer, what: string) => {
      const key = `${what}: ${answer.status} ${answer.code ?? ''}`.trim();
      report.failures[key] = (report.failures[key] ?? 0) + 1;
    };
    const started = Date.now();
    const end = started + options.seconds * 1000;
    const sample = async () => {
      const pidList = pids();
      report.samples.push({ atSec: Math.round((Date.now() - started) / 1000), rssMb: rssBytes(pidList) / 2 ** 20, fds: openFds(pidList), ...(await keysUnder(redis, stack.keyPrefix)), liveSessions: residents.length + churning });
      const last = report.samples.at(-1) as SoakSample;
      log(`${last.atSec} s: RSS ${last.rssMb.toFixed(0)} MB, ${last.fds} fds, keys ${JSON.stringify(last.keys)}, ${last.liveSessions} live sessions`);
    };
    await sample();
    log(`soak: ${options.seconds} s of residents, ${options.churners} sign-in/sign-out loops and ${options.streams} SSE streams`);

    const residentLoops = residents.map(async (cookie, index) => {
      await sleep((index * options.residentThinkMs) / residents.length);
      while (Date.now() < end) {
        const answer = await request(base, '/api/proxy/demo/whoami', cookie);
        report.requests++;
        if (answer.status !== 200) fail(answer, 'resident call');
        await sleep(options.residentThinkMs);
      }
    });
    let churned = 0;
    const churnLoops = Array.from({ length: options.churners }, async () => {
      while (Date.now() < end) {
        const cookie = await signIn(base, `soak-churn-${churned++}`);
        churning++;
        report.logins++;
        for (const path of ['/api/proxy/demo/whoami', '/api/auth/sessions', '/api/proxy/demo/whoami']) {
          const answer = await request(base, path, cookie);
          report.requests++;
          if (answer.status !== 200) fail(answer, 'churn call');
        }
        const out = await request(base, '/api/auth/logout', cookie, { method: 'POST' });
        report.requests++;
        churning--;
        if (out.status !== 200) fail(out, 'logout');
        else report.logouts++;
        // Signed out means signed out: the same cookie is refused at once.
        const after = await request(base, '/api/proxy/demo/whoami', cookie);
        report.requests++;
        if (after.status !== 401) fail(after, 'call after logout');
      }
    });
    let opened = 0;
    const streamLoops = Array.from({ length: options.streams }, async (_, index) => {
      while (Date.now() < end) {
        const leave = opened++ % 3 === 2;
        const answer = await request(base, '/api/proxy/demo/events?count=20&intervalMs=100', residents[index % residents.length] as string, leave ? { leaveAfterMs: 500 } : {});
        report.requests++;
        const events = answer.body.split('\n\n').filter((event) => event.startsWith('data:')).length;
        report.streams.events += events;
        if (answer.status !== 200) fail(answer, 'stream');
        else if (leave) report.streams.left++;
        else if (events === 20) report.streams.completed++;
        else fail({ ...answer, code: `${events} of 20 events` }, 'stream');
      }
    });
    const sampler = (async () => {
      for (let next = started + options.sampleEverySec * 1000; next < end; next += options.sampleEverySec * 1000) {
        await sleep(next - Date.now());
        await sample();
      }
    })();
    await Promise.all([...residentLoops, ...churnLoops, ...streamLoops, sampler]);
    // Quiet: the client closes its connections; idle pooled connections to the API and the IdP
    // close after their keep-alive timeouts (the demo API's 5 s hint, undici's 4 s); then the last look.
    agent.destroy();
    await sleep(QUIET_MS);
    await sample();
    report.refreshGrants = ((await idpGrants(stack.issuer)).success.refresh_token ?? 0) - (grantsBefore.success.refresh_token ?? 0);
    return report;
  } finally {
    redis.disconnect();
    await stack.stop();
  }
}

/** Kinds whose keys belong to live sessions; every other kind is a short-lived marker with an expiry. */
const PER_SESSION = ['session', 'user-sessions', 'idp-sid'];

/** What the soak must show; an empty list is a pass. `strictMemory` only for runs long enough to judge a trend. */
export function soakProblems(report: SoakReport, { strictMemory = true } = {}): string[] {
  const problems: string[] = [];
  if (Object.keys(report.failures).length) problems.push(`unexpected answers: ${JSON.stringify(report.failures)}`);
  const leaking = [...new Set(report.samples.flatMap((s) => s.keysWithoutTtl))];
  if (leaking.length) problems.push(`Redis keys without an expiry: ${leaking.join(', ')}`);
  const last = report.samples.at(-1);
  const first = report.samples[0];
  if (!last || !first || report.samples.length < 4) return [...problems, 'too few samples'];
  // At the end only the residents are signed in: one session key (and one entry in each index) each.
  for (const kind of PER_SESSION) {
    if ((last.keys[kind] ?? 0) > last.liveSessions) problems.push(`${last.keys[kind]} ${kind} keys for ${last.liveSessions} live sessions at the end`);
  }
  // Descriptors: the quiet end has no more open than the quiet start, give or take a few (log files, timers' pipes).
  if (last.fds > first.fds + 8) problems.push(`open descriptors grew from ${first.fds} (quiet start) to ${last.fds} (quiet end)`);
  if (strictMemory) {
    // RSS is a saw: V8 lets the old generation grow to its limit, then a major collection gives it
    // back (a 10-minute run here fell from 1,032 to 810 MB at once). So not a slope but the peaks:
    // the second half's highest may not pass the first half's by more than a tenth.
    const underLoad = report.samples.slice(1, -1);
    const half = Math.floor(underLoad.length / 2);
    const peak = (samples: SoakSample[]) => Math.max(...samples.map((s) => s.rssMb));
    const [firstPeak, secondPeak] = [peak(underLoad.slice(0, half)), peak(underLoad.slice(half))];
    if (secondPeak > firstPeak * 1.1) problems.push(`RSS peaks still rising: ${firstPeak.toFixed(0)} MB in the first half, ${secondPeak.toFixed(0)} MB in the second`);
  }
  return problems;
}

export function formatSoak(report: SoakReport): string {
  const { options: o, samples } = report;
  const settledFrom = samples[Math.floor(samples.length / 3)];
  const beforeQuiet = samples.at(-2);
  const last = samples.at(-1);
  return [
    `| instance | one npm start (a worker per core), Redis, the dev IdP; tokens due every ${o.accessTokenTtlSec - o.refreshSkewSec} s |`,
    `|---|---|`,
    `| traffic | ${o.seconds} s: ${o.residents} residents calling every ${o.residentThinkMs} ms, ${o.churners} sign-in → calls → sessions list → sign-out loops, ${o.streams} SSE streams at once |`,
    `| requests | ${report.requests}; logins ${report.logins}, logouts ${report.logouts}; refresh grants ${report.refreshGrants}; streams ${report.streams.completed} read to the end, ${report.streams.left} left early, ${report.streams.events} events |`,
    `| unexpected answers | ${Object.keys(report.failures).length ? JSON.stringify(report.failures) : 'none'} |`,
    `| RSS (all processes) | ${samples[0]?.rssMb.toFixed(0)} MB quiet start → ${settledFrom?.rssMb.toFixed(0)} MB at ${settledFrom?.atSec} s → ${beforeQuiet?.rssMb.toFixed(0)} MB at ${beforeQuiet?.atSec} s; highest ${Math.max(...samples.map((s) => s.rssMb)).toFixed(0)} MB |`,
    `| open descriptors | ${samples[0]?.fds} quiet start; ${Math.min(...samples.slice(1, -1).map((s) => s.fds))}–${Math.max(...samples.slice(1, -1).map((s) => s.fds))} under load; ${last?.fds} quiet end |`,
    `| Redis keys | start ${JSON.stringify(samples[0]?.keys)}; end ${JSON.stringify(last?.keys)} for ${last?.liveSessions} live sessions; most at once ${Math.max(...samples.map((s) => Object.values(s.keys).reduce((a, b) => a + b, 0)))}; without expiry: ${[...new Set(samples.flatMap((s) => s.keysWithoutTtl))].join(', ') || 'none'} |`,
  ].join('\n');
}

if (import.meta.filename === process.argv[1]) {
  const report = await runSoak({
    ...(process.env.SOAK_SECONDS ? { seconds: Number(process.env.SOAK_SECONDS) } : {}),
    ...(process.env.SOAK_SERVER === 'next' ? { server: 'next' as const } : {}),
  });
  const problems = soakProblems(report, { strictMemory: report.options.seconds >= 300 });
  process.stdout.write(`\n${formatSoak(report)}\n\n${problems.length ? `FAILED:\n- ${problems.join('\n- ')}` : 'Flat: memory, descriptors and Redis keys.'}\n`);
  process.exit(problems.length ? 1 : 0);
}
