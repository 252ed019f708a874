// `npm run bench:load`: a fleet under load. Several `npm start` instances behind nginx (round
// robin), one Redis, one dev IdP whose access tokens expire every few seconds, and a few hundred
// virtual users, each with its own real login, calling two APIs at once (so one session's requests
// reach different instances at the same moment) while their tokens expire again and again.
// It reports requests, failures, latency, refresh grants per session per expiry (from the IdP's own
// timestamps) and each instance's memory, and fails (exit 1) on any failed request, any refused
// refresh (a replay), or two grants for one session within one token lifetime.
// `runLoad` is also what test/integration/load.test.ts runs for 15 s in `npm test`.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { GrantCounters } from '../scripts/dev-idp.ts';
import { loginThroughRp } from '../e2e/support/headless-login.ts';
import { ROOT, freePort, startStack, type Stack } from '../e2e/support/stack.ts';
import { aptInstall, log, percentile, processTree, rssBytes, sleep } from './lib.ts';

export interface LoadOptions {
  instances: number;
  workersPerInstance: number;
  virtualUsers: number;
  seconds: number;
  accessTokenTtlSec: number;
  /** The token is due `accessTokenTtlSec - refreshSkewSec` after each refresh. */
  refreshSkewSec: number;
  /** Pause between one virtual user's rounds (each round calls both APIs at once). */
  thinkMs: number;
  /** Logins in flight at once while the users sign in. */
  loginConcurrency: number;
  redisUrl?: string;
}

export interface LoadReport {
  options: LoadOptions;
  requests: number;
  /** Non-2xx answers and transport errors, by status (0: no answer). */
  failures: Record<string, number>;
  p50Ms: number;
  p99Ms: number;
  requestsPerSecond: number;
  sessions: number;
  refreshGrants: number;
  /** Token lifetimes that ended while a user was calling (due moments passed), summed over sessions. */
  expiriesInUse: number;
  /** Sessions that got two grants within one token lifetime (must be 0). */
  sessionsWithTwoGrantsInOneLifetime: number;
  /** Refresh grants the IdP refused (a replayed refresh token would be one; must be 0). */
  refusedRefreshes: number;
  /** RSS of each instance's processes: after the logins, halfway through the load, at its end. */
  memory: Array<{ instance: string; beforeMb: number; halfwayMb: number; afterMb: number }>;
}

const NGINX = '/usr/sbin/nginx';

export const LOAD_DEFAULTS: LoadOptions = {
  instances: 2,
  workersPerInstance: 1,
  virtualUsers: 300,
  seconds: 60,
  accessTokenTtlSec: 20,
  refreshSkewSec: 10,
  thinkMs: 250,
  loginConcurrency: 12,
};

/** nginx in front of the instances, round robin, keep-alive to them; stopped by the caller. */
async function startNginx(port: number, upstreams: string[]): Promise<{ url: string; stop(): Promise<void> }> {
  if (!existsSync(NGINX)) aptInstall(['nginx']);
  const dir = mkdtempSync(path.join(tmpdir(), 'gatehouse-nginx-'));
  mkdirSync(path.join(dir, 'logs'));
  const servers = upstreams.map((url) => `    server ${new URL(url).host.replace('localhost', '127.0.0.1')};`).join('\n');
  writeFileSync(
    path.join(dir, 'nginx.conf'),
    `daemon off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path ${dir}/body; proxy_temp_path ${dir}/proxy; fastcgi_temp_path ${dir}/fastcgi; uwsgi_temp_path ${dir}/uwsgi; scgi_temp_path ${dir}/scgi;
  upstream gatehouse {
${servers}
    keepalive 128;
  }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://gatehouse;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_buffering off;
      proxy_request_buffering off;
    }
  }
}
`,
  );
  const child: ChildProcess = spawn(NGINX, ['-p', dir, '-c', path.join(dir, 'nginx.conf')], { stdio: 'ignore' });
  const url = `http://localhost:${port}`;
  for (let i = 0; ; i++) {
    const up = await new Promise<boolean>((resolve) => http.get(`http://127.0.0.1:${port}/api/health`, (res) => resolve(res.resume() && true)).on('error', () => resolve(false)));
    if (up) break;
    if (i > 100 || child.exitCode !== null) throw new Error(`nginx did not start (see ${dir}/logs/error.log)`);
    await sleep(100);
  }
  return {
    url,
    stop: async () => {
      child.kill('SIGQUIT');
      await new Promise((resolve) => (child.exitCode !== null ? resolve(undefined) : child.once('exit', resolve)));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

interface VirtualUser {
  cookie: string;
  calledFrom: number;
  calledUntil: number;
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 512 });

function get(url: URL, cookie: string): Promise<{ status: number; ms: number }> {
  const started = performance.now();
  return new Promise((resolve) => {
    const request = http.get(url, { agent, headers: { cookie, 'x-csrf': '1', accept: 'application/json' } }, (response) => {
      response.resume();
      response.on('end', () => resolve({ status: response.statusCode ?? 0, ms: performance.now() - started }));
      response.on('error', () => resolve({ status: 0, ms: performance.now() - started }));
    });
    request.setTimeout(30_000, () => request.destroy());
    request.on('error', () => resolve({ status: 0, ms: performance.now() - started }));
  });
}

async function signIn(base: string, count: number, concurrency: number): Promise<VirtualUser[]> {
  const users: VirtualUser[] = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < count) {
        const index = next++;
        const { rpCookies } = await loginThroughRp({ startUrl: `${base}/api/auth/login`, username: `load-${index}` });
        const value = rpCookies.get('gatehouse');
        if (!value) throw new Error(`login of load-${index} gave no session cookie`);
        users.push({ cookie: `gatehouse=${value}`, calledFrom: 0, calledUntil: 0 });
      }
    }),
  );
  return users;
}

async function idpGrants(issuer: string): Promise<GrantCounters> {
  const response = await fetch(`${issuer}/__dev/grants`);
  return (await response.json()) as GrantCounters;
}

function instanceMemoryMb(stack: Stack): number[] {
  return stack.apps.map((app) => rssBytes(processTree(app.process.child.pid as number)) / 2 ** 20);
}

export async function runLoad(overrides: Partial<LoadOptions> = {}): Promise<LoadReport> {
  const options = { ...LOAD_DEFAULTS, ...overrides };
  const lifetimeMs = (options.accessTokenTtlSec - options.refreshSkewSec) * 1000;
  const publicPort = await freePort();
  // The balancer's URL is known before it starts (its port is reserved), so the instances and the
  // IdP can be told it; nginx then listens there.
  let stack: Stack | undefined;
  let nginx: { url: string; stop(): Promise<void> } | undefined;
  try {
    stack = await startStack({
      instances: options.instances,
      workers: options.workersPerInstance,
      accessTokenTtl: options.accessTokenTtlSec,
      publicUrl: `http://localhost:${publicPort}`,
      ...(options.redisUrl ? { redisUrl: options.redisUrl } : {}),
      env: { TOKEN_REFRESH_SKEW: String(options.refreshSkewSec), LOG_LEVEL: 'error' },
    });
    nginx = await startNginx(publicPort, stack.apps.map((app) => app.url));
    log(`${options.instances} instances behind nginx at ${nginx.url}; signing in ${options.virtualUsers} users`);
    const users = await signIn(nginx.url, options.virtualUsers, options.loginConcurrency);
    const grantsBefore = await idpGrants(stack.issuer);
    const memoryBefore = instanceMemoryMb(stack);

    const latencies: number[] = [];
    const failures: Record<string, number> = {};
    const apis = [new URL('/api/proxy/demo/whoami', nginx.url), new URL('/api/proxy/public/whoami', nginx.url)];
    const started = Date.now();
    const end = started + options.seconds * 1000;
    log(`load: ${options.virtualUsers} users × 2 APIs for ${options.seconds} s, tokens due every ${lifetimeMs / 1000} s`);
    // Halfway and at the end: growth that stops (heap sized to the load) versus growth that goes on.
    let memoryHalfway: number[] = [];
    const halfway = setTimeout(() => (memoryHalfway = instanceMemoryMb(stack as Stack)), (options.seconds * 1000) / 2);
    await Promise.all(
      users.map(async (user, index) => {
        // Spread the users over one think time so they do not beat in step.
        await sleep((index * options.thinkMs) / users.length);
        user.calledFrom = Date.now();
        while (Date.now() < end) {
          for (const answer of await Promise.all(apis.map((api) => get(api, user.cookie)))) {
            latencies.push(answer.ms);
            if (answer.status < 200 || answer.status >= 300) failures[answer.status] = (failures[answer.status] ?? 0) + 1;
          }
          user.calledUntil = Date.now();
          await sleep(options.thinkMs);
        }
      }),
    );
    clearTimeout(halfway);
    const elapsedSec = (Date.now() - started) / 1000;
    // The grants of refreshes still under way settle within a moment.
    await sleep(500);
    const memoryAfter = instanceMemoryMb(stack);
    const grantsAfter = await idpGrants(stack.issuer);

    const sorted = latencies.sort((a, b) => a - b);
    const newTimes = Object.entries(grantsAfter.refreshTimesBySid).map(([sid, times]) => times.slice(grantsBefore.refreshTimesBySid[sid]?.length ?? 0));
    // Two grants of one session closer than a token lifetime (less a little for timer jitter) would
    // mean two refreshes of one expiry.
    const slackMs = Math.min(1_000, lifetimeMs / 4);
    const doubled = newTimes.filter((times) => times.some((time, i) => i > 0 && time - (times[i - 1] as number) < lifetimeMs - slackMs)).length;
    const expiriesInUse = users.reduce((sum, user) => sum + Math.max(0, Math.floor((user.calledUntil - user.calledFrom) / lifetimeMs)), 0);
    return {
      options,
      requests: latencies.length,
      failures,
      p50Ms: percentile(sorted, 50),
      p99Ms: percentile(sorted, 99),
      requestsPerSecond: latencies.length / elapsedSec,
      sessions: users.length,
      refreshGrants: (grantsAfter.success.refresh_token ?? 0) - (grantsBefore.success.refresh_token ?? 0),
      expiriesInUse,
      sessionsWithTwoGrantsInOneLifetime: doubled,
      refusedRefreshes: (grantsAfter.error.refresh_token ?? 0) - (grantsBefore.error.refresh_token ?? 0),
      memory: stack.apps.map((app, i) => ({ instance: new URL(app.url).host, beforeMb: memoryBefore[i] as number, halfwayMb: memoryHalfway[i] ?? Number.NaN, afterMb: memoryAfter[i] as number })),
    };
  } finally {
    await nginx?.stop();
    await stack?.stop();
  }
}

/** What the run must show; an empty list is a pass. */
export function problemsIn(report: LoadReport): string[] {
  const problems: string[] = [];
  const failed = Object.values(report.failures).reduce((a, b) => a + b, 0);
  if (failed > 0) problems.push(`${failed} failed requests: ${JSON.stringify(report.failures)}`);
  if (report.refusedRefreshes > 0) problems.push(`${report.refusedRefreshes} refresh grants refused by the IdP`);
  if (report.sessionsWithTwoGrantsInOneLifetime > 0) problems.push(`${report.sessionsWithTwoGrantsInOneLifetime} sessions refreshed twice within one token lifetime`);
  if (report.refreshGrants < report.expiriesInUse) problems.push(`${report.refreshGrants} refresh grants for ${report.expiriesInUse} expiries in use`);
  return problems;
}

export function formatReport(report: LoadReport): string {
  const { options: o } = report;
  const failed = Object.values(report.failures).reduce((a, b) => a + b, 0);
  return [
    `| fleet | ${o.instances} × npm start (${o.workersPerInstance} worker${o.workersPerInstance > 1 ? 's' : ''}) behind nginx, one Redis |`,
    `|---|---|`,
    `| load | ${o.virtualUsers} users, each its own login, calling 2 APIs at once every ${o.thinkMs} ms for ${o.seconds} s |`,
    `| tokens | due every ${o.accessTokenTtlSec - o.refreshSkewSec} s (TTL ${o.accessTokenTtlSec} s, skew ${o.refreshSkewSec} s) |`,
    `| requests | ${report.requests} (${report.requestsPerSecond.toFixed(0)}/s), failed ${failed} |`,
    `| latency | p50 ${report.p50Ms.toFixed(1)} ms, p99 ${report.p99Ms.toFixed(1)} ms |`,
    `| refresh grants | ${report.refreshGrants} for ${report.expiriesInUse} expiries in use over ${report.sessions} sessions; sessions with two grants in one lifetime: ${report.sessionsWithTwoGrantsInOneLifetime}; refused: ${report.refusedRefreshes} |`,
    `| memory (RSS: signed in → halfway → end) | ${report.memory.map((m) => `${m.instance}: ${m.beforeMb.toFixed(0)} → ${m.halfwayMb.toFixed(0)} → ${m.afterMb.toFixed(0)} MB`).join('; ')} |`,
  ].join('\n');
}

if (import.meta.filename === process.argv[1]) {
  const report = await runLoad({
    ...(process.env.LOAD_USERS ? { virtualUsers: Number(process.env.LOAD_USERS) } : {}),
    ...(process.env.LOAD_SECONDS ? { seconds: Number(process.env.LOAD_SECONDS) } : {}),
    ...(process.env.LOAD_INSTANCES ? { instances: Number(process.env.LOAD_INSTANCES) } : {}),
  });
  const table = formatReport(report);
  const problems = problemsIn(report);
  process.stdout.write(`\n${table}\n\n${problems.length ? `FAILED:\n- ${problems.join('\n- ')}` : 'All requests answered, one grant per session per expiry.'}\n`);
  mkdirSync(path.join(ROOT, 'bench/results'), { recursive: true });
  writeFileSync(path.join(ROOT, 'bench/results/load.md'), `${table}\n`);
  process.exit(problems.length ? 1 : 0);
}
