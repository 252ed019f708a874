// `npm run bench:load`: a fleet under load. Several `npm start` instances behind nginx (round
// robin), one Redis, one dev IdP whose access tokens expire every few seconds, and a few hundred
// virtual users, each with its own real login, calling two APIs at once (so one session's requests
// reach different instances at the same moment) while their tokens expire again and again.
// It reports requests, failures, latency, refresh grants per session per expiry (from the IdP's own
// timestamps) and each instance's memory, and fails (exit 1) on any failed request, any refused
// refresh (a replay), or two grants for one session within one token lifetime.
// With LOAD_FAULTS=1 it then runs each fault scenario under the same load — an instance killed and
// restarted, the IdP stalled, Redis restarted with and without persistence, a Redis Cluster master
// killed and failed over, the APIs resetting connections — each with the outcome it must have,
// checked from outside (see `problemsIn`).
// `runLoad` is also what test/integration/load.test.ts runs for 15 s in `npm test`.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { loginThroughRp } from '../e2e/support/headless-login.ts';
import { ROOT, freePort, startGatehouse, startStack, type Stack } from '../e2e/support/stack.ts';
import { Cluster } from 'ioredis';
import { sessionHandle } from '../lib/session.ts';
import { idpGrants } from '../test/support/http-client.ts';
import { startPrivateRedis, type PrivateRedis } from '../test/support/private-redis.ts';
import { startRedisCluster, type RedisCluster } from '../test/support/redis-cluster.ts';
import { startTcpRelay } from '../test/support/tcp-relay.ts';
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
  fault?: Fault;
}

/**
 * What goes wrong during the load, from `atSec` for `forSec`: `kill-instance` SIGKILLs the first
 * instance's processes and starts it again; `stall-idp` freezes the IdP (SIGSTOP: connections are
 * accepted, nothing answers); `restart-redis` and `restart-redis-aof` stop a private Redis (without
 * and with an append-only file) and start it again on the same port; `reset-upstream` makes the
 * APIs' connections (through a TCP relay in front of them) reset at random, one request in ten;
 * `failover-cluster` runs the fleet on a Redis Cluster (3 masters, each with a replica), SIGKILLs
 * one master, lets its replica take over, and starts the killed node again after `forSec`.
 */
export interface Fault {
  kind: 'kill-instance' | 'stall-idp' | 'restart-redis' | 'restart-redis-aof' | 'reset-upstream' | 'failover-cluster';
  atSec: number;
  forSec: number;
}

interface Answer {
  status: number;
  code: string | null;
  ms: number;
}

export interface LoadReport {
  options: LoadOptions;
  requests: number;
  /** Non-2xx answers and transport errors, by status (0: no answer). */
  failures: Record<string, number>;
  p50Ms: number;
  p99Ms: number;
  /** Answers that took a second or more: callers that waited for a refresh (REFRESH_WAIT_MS is 2 s). */
  answersOverOneSecond: number;
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
  /** When the fault began and ended, in ms from the start of the load. */
  faultWindow?: { fromMs: number; toMs: number };
  /**
   * Every failed answer: when it was sent and when it came back (ms from the start of the load),
   * its status, Gatehouse's code, and whose call it was.
   */
  failureLog: Array<{ atMs: number; answeredAtMs: number; status: number; code: string | null; user: number }>;
  /** Each user's session after the load (and the fault) ended, asked once more: answers by status and code. */
  sessionsAfter: Record<string, number>;
  /** reset-upstream: how many requests the relay answered with a reset. */
  upstreamResets?: number;
  /**
   * failover-cluster: the users whose session lived on the killed master, and how long from the
   * kill until a replica served its slots with the cluster ok again.
   */
  failover?: { usersOnFailedShard: number[]; failoverMs: number };
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

/** One SPA call; a transport error or no answer within 30 s is status 0 (a hang). */
function get(url: URL, cookie: string): Promise<Answer> {
  const started = performance.now();
  return new Promise((resolve) => {
    const request = http.get(url, { agent, headers: { cookie, 'x-csrf': '1', accept: 'application/json' } }, (response) => {
      const code = response.headers['x-gatehouse-error'];
      response.resume();
      response.on('end', () => resolve({ status: response.statusCode ?? 0, code: typeof code === 'string' ? code : null, ms: performance.now() - started }));
      response.on('error', () => resolve({ status: 0, code: null, ms: performance.now() - started }));
    });
    request.setTimeout(30_000, () => request.destroy());
    request.on('error', () => resolve({ status: 0, code: null, ms: performance.now() - started }));
  });
}

/** A redis-server of the run's own, for the faults that restart it (with an append-only file in a folder of its own when asked). */
async function startOwnRedis(appendOnly: boolean): Promise<PrivateRedis & { close(): void }> {
  const dir = mkdtempSync(path.join(tmpdir(), 'gatehouse-load-redis-'));
  const redis = await startPrivateRedis(appendOnly ? ['--appendonly', 'yes', '--appendfsync', 'always', '--dir', dir] : ['--dir', dir]);
  return Object.assign(redis, {
    close: () => {
      redis.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  });
}

/**
 * A TCP relay in front of the APIs that, while `resetting` is on, resets a connection instead of
 * passing on one request in ten (RST: the upstream neither answers nor closes politely).
 */
async function startResettingRelay(port: number, target: URL): Promise<{ resetting: boolean; resets: number; close(): Promise<void> }> {
  const relay = { resetting: false, resets: 0, close: async () => undefined as void };
  const { close } = await startTcpRelay(
    port,
    { host: '127.0.0.1', port: Number(target.port) },
    {
      fromClient(_chunk, { client, upstream }) {
        if (!relay.resetting || Math.random() >= 0.1) return true;
        relay.resets++;
        client.resetAndDestroy();
        upstream.destroy();
        return false;
      },
    },
  );
  relay.close = close;
  return relay;
}

/** Which master holds each user's session key: the users' own sessions lists name their current session's handle. */
async function sessionShards(cluster: RedisCluster, keyPrefix: string, base: string, users: VirtualUser[]): Promise<number[]> {
  const [seed] = cluster.urls.map((url) => new URL(url));
  const client = new Cluster([{ host: seed?.hostname ?? '127.0.0.1', port: Number(seed?.port) }]);
  client.on('error', () => undefined);
  const portByHandle = new Map<string, number>();
  try {
    await new Promise((resolve) => client.once('ready', resolve));
    for (const node of client.nodes('master')) {
      let cursor = '0';
      do {
        const [next, keys] = await node.scan(cursor, 'MATCH', `${keyPrefix}session:{*}`, 'COUNT', 1000);
        cursor = next;
        for (const key of keys) portByHandle.set(sessionHandle(key.slice(key.indexOf('{') + 1, -1)), Number(node.options.port));
      }
      while (cursor !== '0');
    }
  } finally {
    client.disconnect();
  }
  return Promise.all(
    users.map(async (user, index) => {
      const response = await fetch(new URL('/api/auth/sessions', base), { headers: { cookie: user.cookie, 'x-csrf': '1' } });
      const { sessions } = (await response.json()) as { sessions: Array<{ handle: string; current: boolean }> };
      const port = portByHandle.get(sessions.find((entry) => entry.current)?.handle ?? '');
      if (port === undefined) throw new Error(`no session key found for load-${index}`);
      return port;
    }),
  );
}

/** Brings the fault about at its time and undoes it; resolves with when it began and ended (and, for a failover, how long that took). */
async function injectFault(fault: Fault, stack: Stack, redis: Awaited<ReturnType<typeof startOwnRedis>> | undefined, publicUrl: string, started: number, relay: Awaited<ReturnType<typeof startResettingRelay>> | undefined, cluster: { cluster: RedisCluster; victim: number; keyOnVictim: string } | undefined): Promise<{ fromMs: number; toMs: number; failoverMs?: number }> {
  await sleep(started + fault.atSec * 1000 - Date.now());
  const fromMs = Date.now() - started;
  log(`fault: ${fault.kind} for ${fault.forSec} s`);
  if (fault.kind === 'failover-cluster') {
    const { cluster: redisCluster, victim, keyOnVictim } = cluster as NonNullable<typeof cluster>;
    redisCluster.kill(victim);
    const failoverMs = await redisCluster.failedOver(keyOnVictim, victim, 60_000);
    log(`failover: a replica serves the killed master's slots after ${failoverMs} ms`);
    await sleep(started + (fault.atSec + fault.forSec) * 1000 - Date.now());
    await redisCluster.restart(victim);
    return { fromMs, toMs: Date.now() - started, failoverMs };
  } else if (fault.kind === 'kill-instance') {
    const app = stack.apps[0] as Stack['apps'][number];
    for (const pid of processTree(app.process.child.pid as number)) process.kill(pid, 'SIGKILL');
    await sleep(fault.forSec * 1000);
    const port = Number(new URL(app.url).port);
    const restarted = await startGatehouse({ name: 'gatehouse-0-restarted', port, workers: Number(app.env.GATEHOUSE_WORKERS), env: app.env, publicUrl });
    app.process = restarted.process;
  } else if (fault.kind === 'reset-upstream') {
    (relay as NonNullable<typeof relay>).resetting = true;
    await sleep(fault.forSec * 1000);
    (relay as NonNullable<typeof relay>).resetting = false;
  } else if (fault.kind === 'stall-idp') {
    const pid = stack.idp.child.pid as number;
    process.kill(pid, 'SIGSTOP');
    await sleep(fault.forSec * 1000);
    process.kill(pid, 'SIGCONT');
  } else {
    await (redis as NonNullable<typeof redis>).restart(fault.forSec * 1000);
  }
  return { fromMs, toMs: Date.now() - started };
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

function instanceMemoryMb(stack: Stack): number[] {
  return stack.apps.map((app) => rssBytes(processTree(app.process.child.pid as number)) / 2 ** 20);
}

export async function runLoad(overrides: Partial<LoadOptions> = {}): Promise<LoadReport> {
  const options = { ...LOAD_DEFAULTS, ...overrides };
  const lifetimeMs = (options.accessTokenTtlSec - options.refreshSkewSec) * 1000;
  const publicPort = await freePort();
  const publicUrl = `http://localhost:${publicPort}`;
  // The balancer's URL is known before it starts (its port is reserved), so the instances and the
  // IdP can be told it; nginx then listens there.
  let stack: Stack | undefined;
  let nginx: { url: string; stop(): Promise<void> } | undefined;
  const redis = options.fault?.kind.startsWith('restart-redis') ? await startOwnRedis(options.fault.kind === 'restart-redis-aof') : undefined;
  // Failover is what replicas are for; `cluster-require-full-coverage no` is what the README
  // recommends, so that the shards whose master lives keep serving meanwhile.
  const cluster = options.fault?.kind === 'failover-cluster' ? await startRedisCluster({ nodes: 3, replicas: 1, nodeTimeoutMs: 2_000, requireFullCoverage: false }) : undefined;
  // With reset-upstream the APIs are reached through the relay, whose port is known up front.
  const relayPort = options.fault?.kind === 'reset-upstream' ? await freePort() : undefined;
  let relay: Awaited<ReturnType<typeof startResettingRelay>> | undefined;
  try {
    stack = await startStack({
      instances: options.instances,
      workers: options.workersPerInstance,
      accessTokenTtl: options.accessTokenTtlSec,
      publicUrl,
      ...(redis ? { redisUrl: redis.url } : cluster ? { redisUrl: cluster.url } : options.redisUrl ? { redisUrl: options.redisUrl } : {}),
      ...(relayPort ? { apis: () => ({ demo: { url: `http://localhost:${relayPort}` }, public: { url: `http://localhost:${relayPort}/public`, auth: 'user-optional' } }) } : {}),
      env: { TOKEN_REFRESH_SKEW: String(options.refreshSkewSec), LOG_LEVEL: 'error' },
    });
    if (relayPort) relay = await startResettingRelay(relayPort, new URL(stack.apiUrl));
    nginx = await startNginx(publicPort, stack.apps.map((app) => app.url));
    log(`${options.instances} instances behind nginx at ${nginx.url}; signing in ${options.virtualUsers} users`);
    const users = await signIn(nginx.url, options.virtualUsers, options.loginConcurrency);
    const grantsBefore = await idpGrants(stack.issuer);
    const memoryBefore = instanceMemoryMb(stack);
    let failover: { victim: number; keyOnVictim: string; usersOnFailedShard: number[] } | undefined;
    if (cluster) {
      const shards = await sessionShards(cluster, stack.keyPrefix, nginx.url, users);
      const victim = shards[0] as number;
      const usersOnFailedShard = shards.flatMap((port, index) => (port === victim ? [index] : []));
      failover = { victim, keyOnVictim: `${stack.keyPrefix}session:{probe-${victim}}`, usersOnFailedShard };
      // Any key of a slot the victim serves will do for watching the failover: find one by name.
      for (let i = 0; (await cluster.masterOf(failover.keyOnVictim)) !== victim; i++) failover.keyOnVictim = `${stack.keyPrefix}session:{probe-${i}}`;
      log(`sessions per master: ${JSON.stringify(countBy(shards))}; the master on :${victim} will be killed`);
    }

    const latencies: number[] = [];
    const failures: Record<string, number> = {};
    const failureLog: LoadReport['failureLog'] = [];
    const apis = [new URL('/api/proxy/demo/whoami', nginx.url), new URL('/api/proxy/public/whoami', nginx.url)];
    const started = Date.now();
    const end = started + options.seconds * 1000;
    log(`load: ${options.virtualUsers} users × 2 APIs for ${options.seconds} s, tokens due every ${lifetimeMs / 1000} s`);
    // Halfway and at the end: growth that stops (heap sized to the load) versus growth that goes on.
    let memoryHalfway: number[] = [];
    const halfway = setTimeout(() => (memoryHalfway = instanceMemoryMb(stack as Stack)), (options.seconds * 1000) / 2);
    const faultDone = options.fault ? injectFault(options.fault, stack, redis, publicUrl, started, relay, cluster && failover ? { cluster, ...failover } : undefined) : undefined;
    await Promise.all(
      users.map(async (user, index) => {
        // Spread the users over one think time so they do not beat in step.
        await sleep((index * options.thinkMs) / users.length);
        user.calledFrom = Date.now();
        while (Date.now() < end) {
          const sentAt = Date.now() - started;
          for (const answer of await Promise.all(apis.map((api) => get(api, user.cookie)))) {
            latencies.push(answer.ms);
            if (answer.status >= 200 && answer.status < 300) continue;
            failures[answer.status] = (failures[answer.status] ?? 0) + 1;
            if (failureLog.length < 20_000) failureLog.push({ atMs: sentAt, answeredAtMs: Math.round(sentAt + answer.ms), status: answer.status, code: answer.code, user: index });
          }
          user.calledUntil = Date.now();
          await sleep(options.thinkMs);
        }
      }),
    );
    clearTimeout(halfway);
    const elapsedSec = (Date.now() - started) / 1000;
    const faultOutcome = await faultDone;
    const faultWindow = faultOutcome && { fromMs: faultOutcome.fromMs, toMs: faultOutcome.toMs };
    // The grants of refreshes still under way settle within a moment; then every session is asked once more.
    await sleep(500);
    const sessionsAfter: Record<string, number> = {};
    for (const user of users) {
      const answer = await get(apis[0] as URL, user.cookie);
      const key = answer.status === 200 ? '200' : `${answer.status} ${answer.code ?? ''}`.trim();
      sessionsAfter[key] = (sessionsAfter[key] ?? 0) + 1;
    }
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
      answersOverOneSecond: sorted.filter((ms) => ms >= 1_000).length,
      requestsPerSecond: latencies.length / elapsedSec,
      sessions: users.length,
      refreshGrants: (grantsAfter.success.refresh_token ?? 0) - (grantsBefore.success.refresh_token ?? 0),
      expiriesInUse,
      sessionsWithTwoGrantsInOneLifetime: doubled,
      refusedRefreshes: (grantsAfter.error.refresh_token ?? 0) - (grantsBefore.error.refresh_token ?? 0),
      memory: stack.apps.map((app, i) => ({ instance: new URL(app.url).host, beforeMb: memoryBefore[i] as number, halfwayMb: memoryHalfway[i] ?? Number.NaN, afterMb: memoryAfter[i] as number })),
      ...(faultWindow ? { faultWindow } : {}),
      failureLog,
      sessionsAfter,
      ...(relay ? { upstreamResets: relay.resets } : {}),
      ...(failover ? { failover: { usersOnFailedShard: failover.usersOnFailedShard, failoverMs: faultOutcome?.failoverMs ?? Number.NaN } } : {}),
    };
  } finally {
    await nginx?.stop();
    await relay?.close();
    await stack?.stop();
    redis?.close();
    await cluster?.stop();
  }
}

function countBy(values: Array<string | number>): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const value of values) counts[String(value)] = (counts[String(value)] ?? 0) + 1;
  return counts;
}

/** When the last failed call (other than a 401 for a session that is gone) was sent, relative to the fault's end. */
function lastFailureAfter(report: LoadReport): string {
  const last = Math.max(...report.failureLog.filter((f) => f.status !== 401).map((f) => f.atMs));
  if (!Number.isFinite(last) || !report.faultWindow) return 'none';
  const delta = (last - report.faultWindow.toMs) / 1000;
  return delta <= 0 ? `${(-delta).toFixed(1)} s before its end` : `${delta.toFixed(1)} s after its end`;
}

/** Failed answers counted by status and Gatehouse's code, e.g. {"503 idp_unavailable": 12}. */
function countByAnswer(entries: LoadReport['failureLog']): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const entry of entries) {
    const key = `${entry.status} ${entry.code ?? ''}`.trim();
    counts[key] = (counts[key] ?? 0) + 1;
  }
  return counts;
}

// How long after a fault ends its effects may still show: a caller's REFRESH_WAIT_MS, Redis
// reconnects, a restarted instance's first requests, and the backlog of a saturated machine (the
// report says how long it actually took).
const FAULT_TAIL_MS = 10_000;

/** Both mean "retry shortly"; which one a caller hears depends on what its refresh waited on last. */
const RETRY_SHORTLY = ['idp_unavailable', 'store_unavailable'];

/** What the run must show (with a fault: what that fault may cost and nothing more); an empty list is a pass. */
export function problemsIn(report: LoadReport): string[] {
  const problems: string[] = [];
  const fault = report.options.fault;
  const window = report.faultWindow;
  const describe = (entries: LoadReport['failureLog']) => JSON.stringify(countByAnswer(entries));
  if (report.sessionsWithTwoGrantsInOneLifetime > 0) problems.push(`${report.sessionsWithTwoGrantsInOneLifetime} sessions refreshed twice within one token lifetime`);
  // Never, whatever the fault: a request without an answer (a hang) or a 500.
  const broken = report.failureLog.filter((f) => f.status === 0 || f.status === 500);
  if (broken.length) problems.push(`requests that hung or failed with 500: ${describe(broken)}`);
  const sessions = Object.values(report.sessionsAfter).reduce((a, b) => a + b, 0);
  if (!fault) {
    if (report.failureLog.length > 0) problems.push(`${report.failureLog.length} failed requests: ${describe(report.failureLog)}`);
    if (report.refusedRefreshes > 0) problems.push(`${report.refusedRefreshes} refresh grants refused by the IdP`);
    if (report.refreshGrants < report.expiriesInUse) problems.push(`${report.refreshGrants} refresh grants for ${report.expiriesInUse} expiries in use`);
    if (report.sessionsAfter['200'] !== sessions) problems.push(`sessions after the load: ${JSON.stringify(report.sessionsAfter)}`);
    return problems;
  }
  if (!window) return [...problems, 'the fault never happened'];
  // A call sent before the fault may meet it (a saturated machine answers seconds later), so the
  // window opens on when it was answered and closes on when it was sent.
  const inWindow = (f: { atMs: number; answeredAtMs: number }) => f.answeredAtMs >= window.fromMs && f.atMs <= window.toMs + FAULT_TAIL_MS;
  // A grant the killed instance got but never stored makes the survivor's refresh a replay, and an
  // IdP that rotates refresh tokens without a grace period then revokes that grant: at most one
  // lost session per refused grant, reported rather than hidden (README, "Reliability").
  const lost = sessions - (report.sessionsAfter['200'] ?? 0);
  const allowed: Record<Fault['kind'], (f: LoadReport['failureLog'][number]) => boolean> = {
    // Only the calls that needed a refresh while the IdP was frozen, each told to retry shortly.
    'stall-idp': (f) => inWindow(f) && f.status === 503 && RETRY_SHORTLY.includes(f.code ?? ''),
    // What the balancer could not retry while an instance died and came back, and refreshes that
    // waited for a lock the dead instance held until its lease ran out.
    'kill-instance': (f) => (inWindow(f) && [502, 503, 504].includes(f.status)) || (f.status === 401 && lost <= report.refusedRefreshes),
    // The store away: 503, never a logout.
    'restart-redis-aof': (f) => inWindow(f) && f.status === 503 && RETRY_SHORTLY.includes(f.code ?? ''),
    // Only the requests whose connection was reset, each a 502 (a bodiless one met on a reused
    // connection is sent once more, so fewer fail than were reset).
    'reset-upstream': (f) => inWindow(f) && f.status === 502 && f.code === 'upstream_unavailable',
    // The store away, then every session gone: 503 while away, then 401 with the cookie cleared.
    'restart-redis': (f) => (inWindow(f) && f.status === 503 && RETRY_SHORTLY.includes(f.code ?? '')) || (f.atMs >= window.fromMs && f.status === 401),
    // Only the sessions on the failed shard, told to retry while its replica takes over; a write
    // the old master acknowledged but never replicated can lose a rotated refresh token, which the
    // IdP then refuses as a replay (one lost session per refused grant, as for kill-instance).
    'failover-cluster': (f) => onFailedShard.has(f.user) && ((inWindow(f) && f.status === 503 && RETRY_SHORTLY.includes(f.code ?? '')) || (f.status === 401 && lost <= report.refusedRefreshes)),
  };
  const onFailedShard = new Set(report.failover?.usersOnFailedShard);
  const unexpected = report.failureLog.filter((f) => !allowed[fault.kind](f));
  if (unexpected.length) problems.push(`failures a ${fault.kind} must not cause: ${describe(unexpected)}`);
  if (fault.kind === 'restart-redis') {
    // Without persistence every session ended cleanly: 401, and none survived by accident.
    if ((report.sessionsAfter['200'] ?? 0) > 0 || Object.keys(report.sessionsAfter).some((key) => !key.startsWith('401'))) problems.push(`sessions after Redis lost them: ${JSON.stringify(report.sessionsAfter)}`);
    return problems;
  }
  if (fault.kind === 'failover-cluster') {
    const elsewhere = report.failureLog.filter((f) => !onFailedShard.has(f.user));
    if (elsewhere.length) problems.push(`sessions outside the failed shard noticed: ${describe(elsewhere)}`);
  }
  if (fault.kind === 'kill-instance' || fault.kind === 'failover-cluster') {
    if (lost > report.refusedRefreshes) problems.push(`${lost} sessions lost but only ${report.refusedRefreshes} refused grants: ${JSON.stringify(report.sessionsAfter)}`);
    return problems;
  }
  if (report.refusedRefreshes > 0) problems.push(`${report.refusedRefreshes} refresh grants refused by the IdP`);
  if (report.sessionsAfter['200'] !== sessions) problems.push(`sessions after the fault: ${JSON.stringify(report.sessionsAfter)}`);
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
    `| latency | p50 ${report.p50Ms.toFixed(1)} ms, p99 ${report.p99Ms.toFixed(1)} ms, ${report.answersOverOneSecond} answers of a second or more |`,
    `| refresh grants | ${report.refreshGrants} for ${report.expiriesInUse} expiries in use over ${report.sessions} sessions; sessions with two grants in one lifetime: ${report.sessionsWithTwoGrantsInOneLifetime}; refused: ${report.refusedRefreshes} |`,
    ...(report.options.fault && report.faultWindow
      ? [
          `| fault | ${report.options.fault.kind} from ${(report.faultWindow.fromMs / 1000).toFixed(1)} s to ${(report.faultWindow.toMs / 1000).toFixed(1)} s; last failure ${lastFailureAfter(report)}${report.upstreamResets !== undefined ? `; ${report.upstreamResets} upstream requests reset` : ''}${report.failover ? `; failed over in ${(report.failover.failoverMs / 1000).toFixed(1)} s; ${report.failover.usersOnFailedShard.length} of ${report.sessions} sessions on the failed shard; failures of sessions elsewhere: ${report.failureLog.filter((f) => !report.failover?.usersOnFailedShard.includes(f.user)).length}` : ''} |`,
          `| failures | ${JSON.stringify(countByAnswer(report.failureLog))} |`,
          `| sessions after | ${JSON.stringify(report.sessionsAfter)} |`,
        ]
      : []),
    `| memory (RSS: signed in → halfway → end) | ${report.memory.map((m) => `${m.instance}: ${m.beforeMb.toFixed(0)} → ${m.halfwayMb.toFixed(0)} → ${m.afterMb.toFixed(0)} MB`).join('; ')} |`,
  ].join('\n');
}

const FAULT_KINDS: Array<Fault['kind']> = ['stall-idp', 'kill-instance', 'restart-redis-aof', 'restart-redis', 'reset-upstream', 'failover-cluster'];

/** LOAD_FAULTS=1: every fault; or a comma-separated list of fault kinds. */
function faultsAsked(value: string | undefined): Array<Fault['kind']> {
  if (!value) return [];
  if (value === '1') return FAULT_KINDS;
  const kinds = value.split(',').map((kind) => kind.trim());
  const unknown = kinds.filter((kind) => !FAULT_KINDS.includes(kind as Fault['kind']));
  if (unknown.length) throw new Error(`LOAD_FAULTS: unknown fault ${unknown.join(', ')} (known: 1, ${FAULT_KINDS.join(', ')})`);
  return kinds as Array<Fault['kind']>;
}

if (import.meta.filename === process.argv[1]) {
  const base: Partial<LoadOptions> = {
    ...(process.env.LOAD_USERS ? { virtualUsers: Number(process.env.LOAD_USERS) } : {}),
    ...(process.env.LOAD_SECONDS ? { seconds: Number(process.env.LOAD_SECONDS) } : {}),
    ...(process.env.LOAD_INSTANCES ? { instances: Number(process.env.LOAD_INSTANCES) } : {}),
  };
  const seconds = base.seconds ?? LOAD_DEFAULTS.seconds;
  // The fault starts a third of the way in and lasts 20 s (less on short runs).
  const faultAt = { atSec: Math.round(seconds / 3), forSec: Math.min(20, Math.round(seconds / 3)) };
  const runs: Array<Partial<LoadOptions>> = [
    base,
    ...faultsAsked(process.env.LOAD_FAULTS).map((kind) => ({ ...base, fault: { kind, ...faultAt } })),
  ];
  const sections: string[] = [];
  let failed = false;
  for (const run of runs) {
    const report = await runLoad(run);
    const problems = problemsIn(report);
    failed ||= problems.length > 0;
    sections.push(`${formatReport(report)}\n\n${problems.length ? `FAILED:\n- ${problems.join('\n- ')}` : report.options.fault ? 'Only what the fault may cost.' : 'All requests answered, one grant per session per expiry.'}`);
    process.stdout.write(`\n${sections.at(-1)}\n`);
  }
  mkdirSync(path.join(ROOT, 'bench/results'), { recursive: true });
  writeFileSync(path.join(ROOT, 'bench/results/load.md'), `${sections.join('\n\n')}\n`);
  process.exit(failed ? 1 : 0);
}
