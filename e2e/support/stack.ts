import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, fstatSync, openSync, readFileSync, readSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import path from 'node:path';

/**
 * Starts the real parts a test needs as separate processes — the dev IdP (oidc-provider), the
 * demo API and Gatehouse itself (production build) — on free loopback ports, and stops them.
 */

export const ROOT = path.resolve(import.meta.dirname, '..', '..');
const NODE = process.execPath;

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

export interface RunningProcess {
  name: string;
  child: ChildProcess;
  output: () => string;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/** The last `bytes` of a file, however long it has grown (a benchmark's log reaches gigabytes). */
function fileTail(file: string, bytes: number): string {
  const fd = openSync(file, 'r');
  try {
    const size = fstatSync(fd).size;
    const tail = Buffer.alloc(Math.min(size, bytes));
    readSync(fd, tail, 0, tail.length, size - tail.length);
    return tail.toString('utf8');
  } finally {
    closeSync(fd);
  }
}

/**
 * Spawns a process and resolves once a line of its output matches `ready`; rejects if it exits first.
 * With `logFile`, its stdout and stderr go to that file, as a service's output goes to a file or a
 * journal, and nothing in this process reads its every line (the benchmark's case: one log line per
 * request, read here, would take CPU from the cores being measured).
 */
export function startProcess(
  name: string,
  args: string[],
  env: Record<string, string>,
  ready: RegExp | ((output: string) => boolean),
  timeoutMs = 60_000,
  cwd = ROOT,
  logFile?: string,
): Promise<RunningProcess> {
  return new Promise((resolve, reject) => {
    const logFd = logFile === undefined ? undefined : openSync(logFile, 'a');
    const child = spawn(NODE, args, { cwd, env: { ...process.env, ...env }, stdio: logFd === undefined ? ['ignore', 'pipe', 'pipe'] : ['ignore', logFd, logFd] });
    // The child holds its own copy of the descriptor.
    if (logFd !== undefined) closeSync(logFd);
    let piped = '';
    const output = () => (logFile === undefined ? piped : fileTail(logFile, 100_000));
    let settled = false;
    const timer = setTimeout(() => fail(new Error(`${name} did not become ready within ${timeoutMs} ms`)), timeoutMs);
    const poll = logFile === undefined ? undefined : setInterval(() => check(), 50);
    const fail = (error: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      clearInterval(poll);
      child.kill('SIGKILL');
      reject(new Error(`${error.message}\n--- ${name} output ---\n${output().slice(-4000)}`));
    };
    const check = () => {
      if (settled) return;
      const text = output();
      if (!(typeof ready === 'function' ? ready(text) : ready.test(text))) return;
      settled = true;
      clearTimeout(timer);
      clearInterval(poll);
      resolve({
        name,
        child,
        output,
        stop: (signal = 'SIGTERM') =>
          new Promise<void>((done) => {
            if (child.exitCode !== null || child.signalCode !== null) return done();
            const killer = setTimeout(() => child.kill('SIGKILL'), 10_000);
            child.once('exit', () => {
              clearTimeout(killer);
              done();
            });
            child.kill(signal);
          }),
      });
    };
    const onData = (chunk: Buffer) => {
      piped += chunk.toString();
      if (piped.length > 200_000) piped = piped.slice(-100_000);
      check();
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    // 'close', not 'exit': only then has all of its output (the reason it stopped) been read.
    child.once('close', (code, signal) => fail(new Error(`${name} exited early (code ${code}, signal ${signal})`)));
  });
}

/** `node`'s arguments in `npm start` (package.json), so tests and the bench start the server exactly as users do. */
export function npmStartArgs(): string[] {
  const script = (JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { scripts: { start: string } }).scripts.start;
  const [command, ...args] = script.split(/\s+/);
  if (command !== 'node' || args.at(-1) !== 'server.ts') throw new Error(`package.json: "start" is no longer "node … server.ts": ${script}`);
  return args;
}

/** The server shape a test gets unless it asks for one: `GATEHOUSE_TEST_SERVER=next` runs a suite on `next start`. */
export function defaultServerShape(): 'fast' | 'next' {
  return process.env.GATEHOUSE_TEST_SERVER === 'next' ? 'next' : 'fast';
}

export interface StackOptions {
  /** How many Gatehouse instances (each its own process, sharing Redis). */
  instances?: number;
  /** 'fast' runs `node server.ts` (npm start); 'next' runs `next start` only. Default: defaultServerShape(). */
  server?: 'fast' | 'next';
  workers?: number;
  accessTokenTtl?: number;
  env?: Record<string, string>;
  redisUrl?: string;
  /** Extra demo APIs, each its own RFC 8707 resource (audience) at the IdP. */
  resourceApis?: number;
  /**
   * The IdP's host name; by default `127.0.0.1` while the apps are on `localhost`, so the IdP is on
   * another site, as in production, and SameSite=Strict cookies behave in browsers as they will for users.
   */
  idpHost?: string;
  /** Extra environment for the dev IdP process (e.g. IDP_PKJWT_PUBLIC_JWK), or built from the URLs the stack picked. */
  idpEnv?: Record<string, string> | ((urls: { apiUrl: string; resourceApiUrls: string[] }) => Record<string, string>);
  /** A balancer's URL in front of the instances: every instance's APP_BASE_URL, and a redirect target the IdP knows. */
  publicUrl?: string;
  /** BFF_APIS built from the URLs the stack picked (they are only known once it starts). */
  apis?: (urls: { apiUrl: string; resourceApiUrls: string[] }) => Record<string, unknown>;
}

export interface Stack {
  issuer: string;
  idp: RunningProcess;
  apiUrl: string;
  api: RunningProcess;
  /** URLs of the extra demo APIs; each URL is also its audience. */
  resourceApiUrls: string[];
  apps: Array<{ url: string; process: RunningProcess; env: Record<string, string> }>;
  keyPrefix: string;
  appEnv: Record<string, string>;
  clientId: string;
  stop(): Promise<void>;
}

export const CLIENT_ID = 'gatehouse-e2e';
export const CLIENT_SECRET = 'e2e-client-secret-' + 'x'.repeat(24);

export async function startStack(options: StackOptions = {}): Promise<Stack> {
  const instances = options.instances ?? 1;
  const [idpPort, apiPort, ...appPorts] = await Promise.all([freePort(), freePort(), ...Array.from({ length: instances }, freePort)]);
  const resourceApiUrls = await Promise.all(Array.from({ length: options.resourceApis ?? 0 }, async () => `http://localhost:${await freePort()}`));
  const appUrls = appPorts.map((port) => `http://localhost:${port}`);
  const idpHost = options.idpHost ?? '127.0.0.1';
  const issuer = `http://${idpHost}:${idpPort}`;
  const apiUrl = `http://localhost:${apiPort}`;
  const idp = await startProcess(
    'dev-idp',
    ['scripts/dev-idp.ts'],
    {
      NODE_ENV: 'development',
      IDP_PORT: String(idpPort),
      IDP_ISSUER_HOST: idpHost,
      IDP_CLIENT_ID: CLIENT_ID,
      IDP_CLIENT_SECRET: CLIENT_SECRET,
      IDP_APP_BASE_URLS: [...appUrls, ...(options.publicUrl ? [options.publicUrl] : [])].join(','),
      IDP_API_AUDIENCES: [apiUrl, ...resourceApiUrls].join(','),
      ...(options.accessTokenTtl ? { IDP_ACCESS_TOKEN_TTL: String(options.accessTokenTtl) } : {}),
      ...(typeof options.idpEnv === 'function' ? options.idpEnv({ apiUrl, resourceApiUrls }) : options.idpEnv),
    },
    /dev IdP listening/,
  );
  const api = await startProcess(
    'demo-api',
    ['scripts/demo-api.ts'],
    { NODE_ENV: 'development', DEMO_API_PORT: String(apiPort), DEMO_API_ISSUER: issuer, DEMO_API_AUDIENCE: apiUrl },
    /demo API listening/,
  );
  const resourceApis = await Promise.all(
    resourceApiUrls.map((url, index) =>
      startProcess(
        `resource-api-${index}`,
        ['scripts/demo-api.ts'],
        { NODE_ENV: 'development', DEMO_API_PORT: new URL(url).port, DEMO_API_ISSUER: issuer, DEMO_API_AUDIENCE: url },
        /demo API listening/,
      ),
    ),
  );
  const keyPrefix = `gh-test-${randomBytes(6).toString('hex')}:`;
  const appEnv: Record<string, string> = {
    NODE_ENV: 'production',
    OIDC_ISSUER: issuer,
    OIDC_CLIENT_ID: CLIENT_ID,
    OIDC_CLIENT_SECRET: CLIENT_SECRET,
    OIDC_SCOPES: 'openid profile email offline_access api:read api:write',
    SESSION_SECRET: randomBytes(32).toString('base64url'),
    REDIS_URL: options.redisUrl ?? process.env.REDIS_URL ?? 'redis://127.0.0.1:6379',
    REDIS_KEY_PREFIX: keyPrefix,
    BFF_APIS: JSON.stringify(
      options.apis?.({ apiUrl, resourceApiUrls }) ?? {
        demo: { url: apiUrl },
        public: { url: `${apiUrl}/public`, auth: 'user-optional' },
      },
    ),
    LOG_LEVEL: process.env.STACK_LOG_LEVEL ?? 'warn',
    ...options.env,
  };
  const apps: Stack['apps'] = [];
  const stopAll = async () => {
    await Promise.all([...apps.map((app) => app.process.stop()), ...resourceApis.map((process) => process.stop()), api.stop(), idp.stop()]);
  };
  try {
    for (const [index, port] of appPorts.entries()) {
      apps.push(await startGatehouse({ name: `gatehouse-${index}`, port, server: options.server, workers: options.workers, env: appEnv, publicUrl: options.publicUrl }));
    }
  } catch (error) {
    await stopAll();
    throw error;
  }
  return { issuer, idp, apiUrl, api, resourceApiUrls, apps, keyPrefix, appEnv, clientId: CLIENT_ID, stop: stopAll };
}

/**
 * One Gatehouse server on `http://localhost:<port>` with `env` (as startStack builds it): `npm start`
 * (`fast`, the default) or `next start` (`next`).
 */
export async function startGatehouse({
  name = 'gatehouse',
  port,
  server = defaultServerShape(),
  workers = 2,
  env: baseEnv,
  publicUrl,
}: {
  name?: string;
  port?: number;
  server?: 'fast' | 'next';
  workers?: number;
  env: Record<string, string>;
  /** The URL users reach it by, when a balancer stands in front; by default its own. */
  publicUrl?: string;
}): Promise<{ url: string; process: RunningProcess; env: Record<string, string> }> {
  const listenPort = port ?? (await freePort());
  const url = `http://localhost:${listenPort}`;
  const env = { ...baseEnv, APP_BASE_URL: publicUrl ?? url, PORT: String(listenPort), HOSTNAME: '127.0.0.1', GATEHOUSE_WORKERS: String(workers) };
  // As `npm start` (its own node flags, server.ts says why) and `npm run start:next` (V8's gc exposed) start them.
  const args = server === 'next' ? ['--expose-gc', 'node_modules/next/dist/bin/next', 'start', '-p', String(listenPort), '-H', '127.0.0.1'] : npmStartArgs();
  const ready = server === 'next' ? /Ready in/ : (output: string) => (output.match(/Gatehouse listening/g) ?? []).length >= workers;
  return { url, process: await startProcess(name, args, env, ready), env };
}

/** Stops `app` and starts it again on the same URL (so the IdP still knows it) with `env` applied on top. */
export async function restartGatehouse(app: Stack['apps'][number], env: Record<string, string>, name = 'gatehouse-restarted'): Promise<void> {
  await app.process.stop();
  const merged = { ...app.env, ...env };
  const restarted = await startGatehouse({ name, port: Number(new URL(app.url).port), workers: Number(merged.GATEHOUSE_WORKERS ?? 2), env: merged });
  app.process = restarted.process;
  app.env = restarted.env;
}
