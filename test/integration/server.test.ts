import { generateKeyPairSync } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawn } from 'node:child_process';
import { closeSync, constants, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { Socket, createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ROOT, freePort, npmStartArgs, startProcess, startStack, type Stack } from '../../e2e/support/stack.ts';
import { call, idpGrants, isAlive, login, processTree, refreshGrantsOf, waitFor } from '../support/http-client.ts';
import { rawRequest, requestHead } from '../support/raw-http.ts';

/**
 * `npm start` (server.ts) as an operator meets it: workers that die are replaced, SIGTERM lets
 * in-flight streams finish before the process exits, and a bad environment stops the start with
 * every bad variable named.
 */

let stack: Stack;
let app: string;
let cookie: string;

beforeAll(async () => {
  stack = await startStack({ workers: 2 });
  app = stack.apps[0]!.url;
  cookie = await login(app, 'operator');
});

afterAll(async () => {
  await stack?.stop();
});

const cmdline = (pid: number) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');

const listeningLines = () => (stack.apps[0]!.process.output().match(/Gatehouse listening/g) ?? []).length;

describe('npm start', () => {
  it('replaces a crashed worker and keeps serving', async () => {
    const primary = stack.apps[0]!.process.child.pid as number;
    const workers = processTree(primary).filter((pid) => pid !== primary);
    expect(workers).toHaveLength(2);
    const before = listeningLines();
    process.kill(workers[0] as number, 'SIGKILL');
    await waitFor('a replacement worker', () => (listeningLines() > before ? true : undefined), 30_000);
    const now = processTree(primary).filter((pid) => pid !== primary);
    expect(now).toHaveLength(2);
    expect(now).not.toContain(workers[0]);
    for (let i = 0; i < 10; i++) expect((await call(app, '/api/proxy/demo/whoami', cookie)).status).toBe(200);
  });

  it("gives its workers npm start's V8 flags from their start, even when the primary was started without them (no V8 flag flipped at run time)", async () => {
    // The streamed-buffer collection in lib/proxy.ts needs `gc`, and the fixed young generation keeps
    // full collections off the -c1 tail (server.ts); Node calls setting V8 flags after start-up
    // unsafe, so they must be on the workers' command line.
    const servingFlags = npmStartArgs().filter((arg) => arg.startsWith('--'));
    expect(servingFlags).toEqual(expect.arrayContaining(['--expose-gc', '--min-semi-space-size=16', '--max-semi-space-size=16']));
    const port = await freePort();
    const plain = await startProcess('gatehouse-no-flag', ['server.ts'], { ...stack.apps[0]!.env, PORT: String(port), APP_BASE_URL: `http://localhost:${port}`, NODE_OPTIONS: '' }, (output) => (output.match(/Gatehouse listening/g) ?? []).length >= 2);
    try {
      const primary = plain.child.pid as number;
      expect(cmdline(primary)).not.toContain('--expose-gc');
      const workers = processTree(primary).filter((pid) => pid !== primary);
      expect(workers).toHaveLength(2);
      for (const worker of workers) expect(cmdline(worker)).toEqual(expect.arrayContaining(servingFlags));
      expect((await call(`http://localhost:${port}`, '/api/proxy/demo/whoami', cookie)).status).toBe(200);
    } finally {
      await plain.stop();
    }
    for (const file of ['lib/proxy.ts', 'lib/adapters.ts', 'server.ts']) expect(readFileSync(path.join(ROOT, file), 'utf8')).not.toMatch(/setFlagsFromString/);
  });

  /** The flags each of two workers was started with, from a primary started as `node <args>`; the workers must serve. */
  const workersFlags = async (args: string[], nodeOptions: string) => {
    const port = await freePort();
    const env = { ...stack.apps[0]!.env, PORT: String(port), APP_BASE_URL: `http://localhost:${port}`, NODE_OPTIONS: nodeOptions };
    const started = await startProcess('gatehouse-flags', args, env, (output) => (output.match(/Gatehouse listening/g) ?? []).length >= 2);
    try {
      const primary = started.child.pid as number;
      const workers = processTree(primary).filter((pid) => pid !== primary);
      expect(workers).toHaveLength(2);
      expect((await call(`http://localhost:${port}`, '/api/proxy/demo/whoami', cookie)).status).toBe(200);
      return workers.map((worker) => cmdline(worker).filter((arg) => arg.startsWith('--')));
    } finally {
      await started.stop();
    }
  };

  it("keeps an operator's own setting of those flags, given on the command line or in NODE_OPTIONS, instead of adding npm start's", async () => {
    // NODE_OPTIONS takes a semi-space maximum (not the minimum). `--no_expose_gc` is V8's spelling
    // of an opt-out: the primary must not add `--expose-gc` after it.
    expect(await workersFlags(['--no_expose_gc', 'server.ts'], '--max-semi-space-size=8')).toEqual([['--no_expose_gc'], ['--no_expose_gc']]);
  });

  it("reads a quoted flag in NODE_OPTIONS as Node does: the operator's setting is kept, not overridden by npm start's", async () => {
    // Node drops the double quotes of NODE_OPTIONS; a split at spaces alone saw `"--max-semi-space-size=8"`,
    // no flag, and gave the workers npm start's semi-space sizes after it, which V8 then obeyed.
    expect(await workersFlags(['server.ts'], '"--max-semi-space-size=8"  --trace-warnings')).toEqual([['--expose-gc'], ['--expose-gc']]);
    // A backslash inside quotes keeps the next character: read as a closing quote, the rest would run into one word.
    expect(await workersFlags(['server.ts'], '--conditions="a\\"b" "--max-semi-space-size=8"')).toEqual([['--expose-gc'], ['--expose-gc']]);
  });

  it("warns, naming them, when a single-process start lacks npm start's V8 flags, and is silent when started as npm start does", async () => {
    const single = async (args: string[]) => {
      const port = await freePort();
      const env = { ...stack.apps[0]!.env, PORT: String(port), APP_BASE_URL: `http://localhost:${port}`, GATEHOUSE_WORKERS: '1', NODE_OPTIONS: '' };
      const proc = await startProcess('gatehouse-single', args, env, /Gatehouse listening/);
      try {
        expect(processTree(proc.child.pid as number)).toHaveLength(1);
        expect((await call(`http://localhost:${port}`, '/api/proxy/demo/whoami', cookie)).status).toBe(200);
        return proc.output();
      } finally {
        await proc.stop();
      }
    };
    const warning = (output: string) => output.split('\n').find((line) => line.includes('"event":"server.missing_v8_flags"'));
    const bare = warning(await single(['server.ts']));
    expect(bare).toBeDefined();
    expect(JSON.parse(bare as string).flags).toEqual(['--expose-gc', '--min-semi-space-size=16', '--max-semi-space-size=16']);
    expect(warning(await single(['--expose-gc', 'server.ts']))).toMatch(/"flags":\["--min-semi-space-size=16","--max-semi-space-size=16"\]/);
    expect(warning(await single(npmStartArgs()))).toBeUndefined();
  });

  it('answers TRACE with 405 JSON on every path, never a 500 or a logged stack trace', async () => {
    const { port, host } = new URL(app);
    const logBefore = stack.apps[0]!.process.output().length;
    for (const path of ['/', '/api/auth/session', '/api/auth/login', '/api/proxy/demo/whoami']) {
      const answer = await rawRequest(Number(port), requestHead('TRACE', path, [['Host', host], ['X-CSRF', '1'], ['Cookie', cookie], ['Connection', 'close']]));
      expect({ path, status: answer?.status }).toEqual({ path, status: 405 });
      expect(JSON.parse(answer?.body ?? '')).toMatchObject({ error: 'method_not_allowed' });
      // A 405 must say what is allowed (RFC 9110 15.5.6); TRACE never is.
      expect(answer?.get('allow')).toMatch(/^GET, /);
      expect(answer?.get('allow')).not.toContain('TRACE');
      // TRACE echoes the request back: the cookie must not come back in any form.
      expect(answer?.body).not.toContain(cookie.split('=')[1]);
    }
    const logged = stack.apps[0]!.process.output().slice(logBefore);
    expect(logged).not.toMatch(/\n\s+at /);
    expect(logged).not.toContain('TypeError');
  });

  it('on SIGTERM lets an in-flight event stream finish, then exits by itself', async () => {
    const primary = stack.apps[0]!.process.child;
    const response = await fetch(`${app}/api/proxy/demo/events?count=8&intervalMs=250`, { headers: { cookie, 'x-csrf': '1' } });
    expect(response.status).toBe(200);
    const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
    let received = '';
    const first = await reader.read();
    received += first.value ?? '';
    expect(received).toContain('"n":0');

    const exited = new Promise<number | null>((resolve) => primary.once('exit', (code) => resolve(code)));
    primary.kill('SIGTERM');
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      received += value;
    }
    // Every event of the stream arrived although the server was told to stop after the first.
    expect(received.match(/data: /g)).toHaveLength(8);
    const streamEnded = Date.now();
    expect(await exited).toBe(0);
    // It left once the stream was done, not at the drain deadline (GATEHOUSE_DRAIN_MS, 30 s).
    expect(Date.now() - streamEnded).toBeLessThan(5_000);
    await waitFor('every worker to exit', () => (processTree(primary.pid as number).every((pid) => !isAlive(pid)) ? true : undefined), 15_000);
    await expect(fetch(`${app}/api/health`)).rejects.toThrow();
  });

  it('refuses to start with a bad environment, naming every bad variable', async () => {
    const env = { ...stack.appEnv, APP_BASE_URL: 'http://localhost:1', PORT: '0', SESSION_SECRET: 'short', BFF_APIS: '{"demo":{"url":"ftp://x"}}', GATEHOUSE_WORKERS: '0' };
    const exit = await startProcess('misconfigured', ['server.ts'], env, /never/, 30_000).then(
      () => 'started',
      (error: Error) => error.message,
    );
    expect(exit).toContain('exited early (code 1');
    expect(exit).toContain('Gatehouse cannot start');
    for (const variable of ['SESSION_SECRET:', 'BFF_APIS.demo.url:', 'GATEHOUSE_WORKERS:']) expect(exit).toContain(variable);
    expect(exit).not.toContain('short');
    expect(exit).not.toMatch(/\n\s+at /);
  });

  it('next start refuses a bad environment the same way (instrumentation)', async () => {
    const env = { ...stack.appEnv, APP_BASE_URL: 'http://localhost:1', SESSION_SECRET: '', OIDC_ISSUER: 'http://idp.example.com' };
    const exit = await startProcess('misconfigured-next', ['node_modules/next/dist/bin/next', 'start', '-p', '0'], env, /never/, 60_000).then(
      () => 'started',
      (error: Error) => error.message,
    );
    expect(exit).toContain('exited early (code 1');
    expect(exit).toContain('SESSION_SECRET:');
    expect(exit).toContain('OIDC_ISSUER: must be https://');
  });

  /** Starts server.ts expecting it to refuse; resolves to everything it printed before exiting. */
  async function refusal(name: string, env: Record<string, string>): Promise<string> {
    const started = Date.now();
    const output = await startProcess(name, ['server.ts'], env, () => false, 30_000).then(
      () => 'started',
      (error: Error) => error.message,
    );
    expect(output).toContain('exited early (code 1');
    expect(output).toContain('Gatehouse cannot start');
    // One refusal, not a respawn loop: no worker ever died, and it was quick.
    expect(output).not.toContain('server.worker_died');
    expect(Date.now() - started).toBeLessThan(20_000);
    expect(output).not.toMatch(/\n\s+at /);
    return output;
  }

  it('refuses the in-memory store with more than one worker, saying why', async () => {
    const output = await refusal('memory-two-workers', { ...stack.apps[0]!.env, SESSION_STORE: 'memory', REDIS_URL: '', GATEHOUSE_WORKERS: '2', PORT: '0' });
    expect(output).toContain('GATEHOUSE_WORKERS: the in-memory session store lives inside one process');
  });

  it('refuses an OIDC_PRIVATE_KEY that Node parses but WebCrypto will not sign with, naming it (not a 500 at the first login)', async () => {
    const jwk = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
    const output = await refusal('unusable-key', { ...stack.apps[0]!.env, OIDC_CLIENT_AUTH: 'private_key_jwt', OIDC_PRIVATE_KEY: JSON.stringify({ ...jwk, d: 'abc!' }), PORT: '0' });
    expect(output).toContain('OIDC_PRIVATE_KEY: cannot be imported as a signing key');
    expect(output).not.toContain(jwk.x as string);
  });

  it('next start refuses that key too, on Vercel as well (there without asking the IdP at every cold start)', async () => {
    const jwk = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
    const env = { ...stack.apps[0]!.env, OIDC_CLIENT_AUTH: 'private_key_jwt', OIDC_PRIVATE_KEY: JSON.stringify({ ...jwk, d: 'abc!' }), VERCEL: '1' };
    const exit = await startProcess('unusable-key-next', ['node_modules/next/dist/bin/next', 'start', '-p', '0'], env, /never/, 60_000).then(
      () => 'started',
      (error: Error) => error.message,
    );
    expect(exit).toContain('exited early (code 1');
    expect(exit).toContain('OIDC_PRIVATE_KEY: cannot be imported as a signing key');
  });

  it('without a production build: one message naming the fix, exit 1, no respawning', async () => {
    const output = await refusal('no-build', { ...stack.apps[0]!.env, NEXT_DIST_DIR: '.next-never-built', GATEHOUSE_WORKERS: '2', PORT: '0' });
    expect(output).toContain('npm run build');
  });

  it('NODE_ENV unset and no store: the same refusal as with NODE_ENV=production, once', async () => {
    const output = await refusal('no-store', { ...stack.apps[0]!.env, NODE_ENV: '', REDIS_URL: '', GATEHOUSE_WORKERS: '2', PORT: '0' });
    expect(output).toContain('REDIS_URL: a session store is required in production');
    expect(output.match(/^\s+- /gm)).toHaveLength(1);
  });

  it('a port already in use: the workers cannot start, and the server says so and exits instead of respawning them', async () => {
    const blocker = createServer();
    const port = await freePort();
    await new Promise<void>((resolve) => blocker.listen(port, '127.0.0.1', resolve));
    try {
      const output = await refusal('busy-port', { ...stack.apps[0]!.env, PORT: String(port), HOSTNAME: '127.0.0.1', GATEHOUSE_WORKERS: '2' });
      expect(output).toContain(`PORT: 127.0.0.1:${port} is already in use`);
    } finally {
      blocker.close();
    }
  });
});

/**
 * A server whose stdout and stderr go to one pipe (a FIFO, as Docker and Kubernetes give them; like
 * `2>&1 | collector`), read by this test.
 */
async function startLoggingToPipe(shape: 'npm start' | 'next start', env: Record<string, string>) {
  const args = shape === 'npm start' ? npmStartArgs() : ['node_modules/next/dist/bin/next', 'start', '-p', env.PORT as string];
  const dir = mkdtempSync(path.join(os.tmpdir(), 'gatehouse-log-pipe-'));
  const fifo = path.join(dir, 'log');
  execFileSync('mkfifo', [fifo]);
  const readFd = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
  const writeFd = openSync(fifo, constants.O_WRONLY);
  const child = spawn(process.execPath, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', writeFd, writeFd] });
  closeSync(writeFd);
  const reader = new Socket({ fd: readFd, readable: true, writable: false });
  let text = '';
  reader.on('data', (chunk: Buffer) => (text += chunk.toString()));
  const ready = () => (shape === 'npm start' ? (text.match(/Gatehouse listening/g) ?? []).length >= 2 : text.includes('Ready in'));
  await waitFor(`${shape} to start`, () => {
    if (child.exitCode !== null) throw new Error(`${shape} exited early:\n${text.slice(-2000)}`);
    return ready() ? true : undefined;
  }, 60_000);
  return {
    child,
    text: () => text,
    pause: () => reader.pause(),
    resume: () => reader.resume(),
    stop: async () => {
      reader.resume();
      if (child.exitCode === null && child.signalCode === null) {
        const gone = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGKILL');
        await gone;
      }
      reader.destroy();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

describe('a log reader that stops reading (a blocked Docker log driver, a stalled collector)', () => {
  for (const shape of ['npm start', 'next start'] as const) {
    it(`${shape}, logging to a pipe: every request is still answered, those that log warnings too, no line is lost once it reads again, and SIGTERM still ends the server promptly`, async () => {
      const port = await freePort();
      const base = `http://localhost:${port}`;
      const apis = JSON.parse(stack.appEnv.BFF_APIS as string) as Record<string, unknown>;
      // An API nobody listens on: each call to it answers 502 and logs a warning.
      const env = { ...stack.apps[0]!.env, PORT: String(port), APP_BASE_URL: base, LOG_LEVEL: 'info', BFF_APIS: JSON.stringify({ ...apis, dead: { url: `http://127.0.0.1:${await freePort()}` } }) };
      const server = await startLoggingToPipe(shape, env);
      const linesOf = (event: string) => server.text().split('\n').filter((line) => line.includes(`"event":"${event}"`)).length;
      // About 270 KB of info lines (one per call) and 180 KB of warnings (one per 502) per round: far
      // more than a pipe holds (64 KiB).
      const round = async () => {
        for (let batch = 0; batch < 30; batch++) {
          const results = await Promise.all(Array.from({ length: 50 }, (_, i) => call(base, i % 2 ? '/api/proxy/demo/whoami' : '/api/proxy/dead/x', cookie, { signal: AbortSignal.timeout(10_000) }).then((result) => result.status, () => 'no answer')));
          expect(results).toEqual(Array.from({ length: 50 }, (_, i) => (i % 2 ? 200 : 502)));
        }
      };
      try {
        server.pause();
        const before = { requests: linesOf('proxy.request'), warnings: linesOf('proxy.error') };
        await round();
        // The reader comes back: every line held meanwhile arrives, the warnings too.
        server.resume();
        await waitFor('the held lines', () => (linesOf('proxy.request') - before.requests >= 1_500 && linesOf('proxy.error') - before.warnings >= 750 ? true : undefined), 10_000);
        expect(server.text()).not.toContain('"event":"log.dropped"');
        // And stalls again, for good this time.
        server.pause();
        await round();
        const exited = new Promise<string>((resolve) => server.child.once('exit', (code, signal) => resolve(`code ${code}, signal ${signal}`)));
        const stoppedAt = Date.now();
        server.child.kill('SIGTERM');
        const exit = await Promise.race([exited, new Promise<string>((resolve) => setTimeout(() => resolve('still running'), 10_000))]);
        expect(exit).toMatch(shape === 'npm start' ? /^code 0,/ : /^code \d+,|signal SIGTERM/);
        // No request was in flight: nothing but a log write could hold it up.
        expect(Date.now() - stoppedAt).toBeLessThan(5_000);
      } finally {
        await server.stop();
      }
    });
  }
});

describe('npm start crash loops', () => {
  it('five worker deaths within a minute end the server with the cause instead of respawning for ever', async () => {
    const looping = await startProcess('crash-loop', ['server.ts'], { ...stack.apps[0]!.env, PORT: String(await freePort()), GATEHOUSE_WORKERS: '2' }, (output) => (output.match(/Gatehouse listening/g) ?? []).length >= 2);
    const primary = looping.child.pid as number;
    const exited = new Promise<number | null>((resolve) => looping.child.once('exit', (code) => resolve(code)));
    for (let death = 1; death <= 5 && isAlive(primary); death++) {
      const [worker] = processTree(primary).filter((pid) => pid !== primary);
      if (worker === undefined) break;
      process.kill(worker, 'SIGKILL');
      // Wait for the replacement (or, after the fifth death, for the primary to give up).
      await waitFor(`death ${death} to be noticed`, () => ((looping.output().match(/server\.worker_died/g) ?? []).length >= death ? true : undefined), 30_000);
    }
    expect(await exited).toBe(1);
    expect(looping.output()).toContain('Gatehouse cannot start: 5 workers died within 60 s');
  });
});

describe('npm start and .env files', () => {
  it('reads them as next start does, and the process environment wins over them', async () => {
    const file = path.join(ROOT, '.env.production.local');
    // LOG_LEVEL only from the file: the start-up line that lists the files read shows at info level.
    writeFileSync(file, 'LOG_LEVEL=info\nPORT=1\n');
    const port = await freePort();
    const { LOG_LEVEL: _fromTheStack, ...env } = stack.apps[0]!.env;
    const withFile = await startProcess('dotenv', ['server.ts'], { ...env, PORT: String(port), GATEHOUSE_WORKERS: '1' }, /Gatehouse listening/).finally(() => rmSync(file));
    try {
      // Info lines are written within a fraction of a second, not at once (lib/log.ts).
      await waitFor('the env_files line', () => withFile.output().includes('server.env_files') || undefined, 3_000);
      expect(withFile.output()).toContain('.env.production.local');
      expect(withFile.output()).toContain(`Gatehouse listening on http://127.0.0.1:${port}`);
    } finally {
      await withFile.stop();
    }
  });
});

describe('npm start with the in-memory store (a single-process trial)', () => {
  it('one worker: login, proxied calls, a refresh and logout all see the same sessions', async () => {
    // One access token expiry's worth of skew: every proxied call refreshes first.
    const trial = await startStack({ server: 'fast', workers: 1, env: { SESSION_STORE: 'memory', REDIS_URL: '', TOKEN_REFRESH_SKEW: '3600' } });
    try {
      const url = trial.apps[0]!.url;
      const trialCookie = await login(url, 'memory-user');
      expect(await call(url, '/api/auth/session', trialCookie)).toMatchObject({ status: 200, body: { authenticated: true, user: { sub: 'memory-user' } } });
      const grantsBefore = refreshGrantsOf(await idpGrants(trial.issuer), 'memory-user');
      // Served by server.ts's own proxy core, on a session the Next route handler created.
      expect(await call(url, '/api/proxy/demo/whoami', trialCookie)).toMatchObject({ status: 200, body: { sub: 'memory-user' } });
      expect(await call(url, '/api/proxy/demo/whoami', trialCookie)).toMatchObject({ status: 200, body: { sub: 'memory-user' } });
      expect(refreshGrantsOf(await idpGrants(trial.issuer), 'memory-user') - grantsBefore).toBe(2);
      expect(await call(url, '/api/auth/logout', trialCookie, { method: 'POST' })).toMatchObject({ status: 200 });
      expect(await call(url, '/api/proxy/demo/whoami', trialCookie)).toMatchObject({ status: 401 });
    } finally {
      await trial.stop();
    }
  });
});
