import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startProcess, startStack, type Stack } from '../../e2e/support/stack.ts';
import { call, isAlive, login, processTree, waitFor } from '../support/http-client.ts';
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
    expect(exit).toContain('Gatehouse configuration is invalid');
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
});
