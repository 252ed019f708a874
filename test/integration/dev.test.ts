import { randomUUID } from 'node:crypto';
import { readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { connect, createServer } from 'node:net';
import type { Duplex } from 'node:stream';
import { loginThroughRp } from '../../e2e/support/headless-login.ts';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, freePort, startProcess, type RunningProcess } from '../../e2e/support/stack.ts';
import { call, login } from '../support/http-client.ts';

/**
 * The README's first command: `npm run dev` with no configuration at all brings up the dev IdP,
 * the demo API and the app with the in-memory store, and a user can sign in and call the API.
 */

/**
 * Every process of one `npm run dev` carries this marker in its environment (children inherit it),
 * so a test can see whether anything of it outlived the command: a `next dev` left behind keeps
 * Next's per-folder lock, and the next `npm run dev` then prints "Ready" and exits.
 */
function marker(): Record<string, string> {
  return { GATEHOUSE_TEST_MARK: randomUUID() };
}

function processesMarked(mark: Record<string, string>): string[] {
  const wanted = `GATEHOUSE_TEST_MARK=${mark.GATEHOUSE_TEST_MARK}`;
  const found: string[] = [];
  for (const pid of readdirSync('/proc').filter((name) => /^\d+$/.test(name))) {
    try {
      if (!readFileSync(`/proc/${pid}/environ`, 'latin1').split('\0').includes(wanted)) continue;
      const command = readFileSync(`/proc/${pid}/cmdline`, 'latin1').replaceAll('\0', ' ');
      // Next's telemetry upload is detached on purpose, outlives the command by design and holds no lock.
      if (!command.includes('next/dist/telemetry/detached-flush.js')) found.push(`${pid}: ${command}`);
    } catch {
      // Gone while we looked, or not ours to read: either way not a leftover of this command.
    }
  }
  return found;
}

/**
 * What of the command is still running 5 s after it stopped. A command a Next process had just
 * started (telemetry's `git config … remote.origin.url`, for its project id) may outlive it by a
 * moment and exits by itself; a server left behind does not.
 */
async function leftoversOf(mark: Record<string, string>): Promise<string[]> {
  let leftovers = processesMarked(mark);
  for (const until = Date.now() + 5_000; leftovers.length > 0 && Date.now() < until; leftovers = processesMarked(mark)) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return leftovers;
}

describe('npm run dev', () => {
  it('needs no configuration: sign in at the embedded IdP and call the demo API', async () => {
    const [appPort, idpPort, apiPort] = await Promise.all([freePort(), freePort(), freePort()]);
    // Only ports are chosen here (so the test cannot collide with a running demo); nothing else is configured.
    const clean = Object.fromEntries(
      Object.keys(process.env)
        .filter((name) => /^(OIDC_|SESSION_|BFF_|REDIS_|UPSTASH_|APP_BASE_URL|TOKEN_|NEXT_DIST_DIR)/.test(name))
        .map((name) => [name, '']),
    );
    const mark = marker();
    // Next allows one `next dev` per project folder: this one must be gone before the next test starts another.
    const dev = await startProcess('npm-run-dev', ['scripts/dev.ts'], { ...clean, ...mark, NODE_ENV: '', PORT: String(appPort), IDP_PORT: String(idpPort), DEMO_API_PORT: String(apiPort) }, /Ready in/, 90_000);
    try {
      const app = `http://localhost:${appPort}`;
      const page = await fetch(app);
      expect(page.status).toBe(200);
      expect(await page.text()).toContain('Gatehouse demo');
      const cookie = await login(app, 'dev-user');
      expect(await call(app, '/api/auth/session', cookie)).toMatchObject({ status: 200, body: { authenticated: true, user: { sub: 'dev-user' } } });
      expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'dev-user', aud: `http://localhost:${apiPort}` } });
    } finally {
      await dev.stop();
    }
    expect(await leftoversOf(mark)).toEqual([]);
  }, 180_000);

  it('a busy dev IdP port ends the command with the variable that moves it, not a stack trace', async () => {
    const blocker = createServer();
    const [busy, appPort, apiPort] = await Promise.all([freePort(), freePort(), freePort()]);
    await new Promise<void>((resolve) => blocker.listen(busy, resolve));
    try {
      const exit = await startProcess('npm-run-dev-busy', ['scripts/dev.ts'], { OIDC_ISSUER: '', BFF_APIS: '', NODE_ENV: '', PORT: String(appPort), IDP_PORT: String(busy), DEMO_API_PORT: String(apiPort) }, () => false, 30_000).then(
        () => 'started',
        (error: Error) => error.message,
      );
      expect(exit).toContain('exited early (code 1');
      expect(exit).toContain(`port ${busy} for the development IdP is in use`);
      expect(exit).toContain('IDP_PORT');
      expect(exit).not.toMatch(/\n\s+at /);
    } finally {
      blocker.close();
    }
  });

  it('reads OIDC_ISSUER from .env.local like Next, says it uses that IdP, and starts no dev IdP', async () => {
    const file = path.join(ROOT, '.env.local');
    writeFileSync(file, 'OIDC_ISSUER=https://idp.example.com/realms/main\nOIDC_CLIENT_ID=from-dotenv\nOIDC_CLIENT_SECRET=from-dotenv-secret\n');
    const [appPort, idpPort, apiPort] = await Promise.all([freePort(), freePort(), freePort()]);
    let started: RunningProcess | undefined;
    const mark = marker();
    try {
      // undefined drops a variable from the child's environment (an empty one would count as set and win over the file).
      started = await startProcess('npm-run-dev-own-idp', ['scripts/dev.ts'], { ...mark, OIDC_ISSUER: undefined as unknown as string, NODE_ENV: '', PORT: String(appPort), IDP_PORT: String(idpPort), DEMO_API_PORT: String(apiPort) }, /IdP: .*\n/, 30_000);
      expect(started.output()).toContain('IdP:            https://idp.example.com/realms/main — your own (OIDC_ISSUER from the environment or .env.local)');
      // Nothing listens where the dev IdP would have.
      await expect(fetch(`http://127.0.0.1:${idpPort}/.well-known/openid-configuration`)).rejects.toThrow();
    } finally {
      rmSync(file, { force: true });
      // Stopped while next dev is still starting: the moment an orphan is most likely.
      await started?.stop();
    }
    expect(await leftoversOf(mark)).toEqual([]);
  });

  it('stopped at any moment of its start, it leaves no process behind', async () => {
    // A stop that lands while next dev is being spawned is the one that left an orphan holding Next's lock.
    for (const delayMs of [0, 0, 5, 10, 20, 50, 100, 300]) {
      const [appPort, apiPort] = await Promise.all([freePort(), freePort()]);
      const mark = marker();
      const env = { ...mark, OIDC_ISSUER: 'https://idp.example.com/realms/main', OIDC_CLIENT_ID: 'x', OIDC_CLIENT_SECRET: 'y', NODE_ENV: '', PORT: String(appPort), DEMO_API_PORT: String(apiPort) };
      const started = await startProcess('npm-run-dev-stopped', ['scripts/dev.ts'], env, /IdP: .*\n/, 30_000);
      await new Promise((resolve) => setTimeout(resolve, delayMs));
      await started.stop();
      expect(await leftoversOf(mark), `stopped ${delayMs} ms after it named the IdP`).toEqual([]);
    }
  }, 120_000);

  it('SPA_DEV_URL: the SPA dev server and Gatehouse on one origin, hot-reload WebSocket included; login lands on the SPA', async () => {
    // A stand-in for Vite: any page is its index, and its HMR WebSocket echoes what it is sent.
    const spaDev = createHttpServer((_req, res) => res.writeHead(200, { 'content-type': 'text/html' }).end('<!doctype html><title>SPA dev server</title>'));
    spaDev.on('upgrade', (_req, socket: Duplex) => {
      socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n');
      socket.pipe(socket);
    });
    const spaPort = await freePort();
    await new Promise<void>((resolve) => spaDev.listen(spaPort, '127.0.0.1', resolve));
    const [appPort, nextPort, idpPort, apiPort] = await Promise.all([freePort(), freePort(), freePort(), freePort()]);
    const clean = Object.fromEntries(
      Object.keys(process.env)
        .filter((name) => /^(OIDC_|SESSION_|BFF_|REDIS_|UPSTASH_|APP_BASE_URL|TOKEN_|NEXT_DIST_DIR|SPA_)/.test(name))
        .map((name) => [name, '']),
    );
    let running: RunningProcess | undefined;
    const mark = marker();
    try {
      running = await startProcess('npm-run-dev-spa', ['scripts/dev.ts'], { ...clean, ...mark, NODE_ENV: '', SPA_DEV_URL: `http://127.0.0.1:${spaPort}`, PORT: String(appPort), NEXT_DEV_PORT: String(nextPort), IDP_PORT: String(idpPort), DEMO_API_PORT: String(apiPort) }, /Ready in/, 90_000);
      const app = `http://localhost:${appPort}`;
      expect(await (await fetch(`${app}/orders/42`)).text()).toContain('SPA dev server');
      // "Ready" is printed before next dev takes the folder's lock; say why, should it then exit.
      expect(await call(app, '/api/auth/session', undefined), running.output()).toMatchObject({ status: 200, body: { authenticated: false } });

      const socket = connect(appPort, '127.0.0.1');
      socket.write(`GET /vite-hmr HTTP/1.1\r\nHost: localhost:${appPort}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`);
      const received = await new Promise<string>((resolve, reject) => {
        let text = '';
        socket.on('data', (chunk) => {
          text += chunk.toString('latin1');
          if (text.includes('\r\n\r\n') && !text.includes('hot-reload-ping')) socket.write('hot-reload-ping');
          if (text.includes('hot-reload-ping')) resolve(text);
        });
        socket.on('error', reject);
        setTimeout(() => reject(new Error(`no echo through the tunnel: ${text}`)), 10_000).unref();
      });
      socket.destroy();
      expect(received).toMatch(/^HTTP\/1\.1 101 /);

      const { finalUrl, rpCookies } = await loginThroughRp({ startUrl: `${app}/api/auth/login?returnTo=%2Forders%2F42`, username: 'spa-dev-user' });
      expect(finalUrl).toBe(`${app}/orders/42`);
      const cookie = `gatehouse=${rpCookies.get('gatehouse')}`;
      expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'spa-dev-user' } });
    } finally {
      await running?.stop();
      spaDev.close();
    }
    expect(await leftoversOf(mark)).toEqual([]);
  }, 240_000);
});
