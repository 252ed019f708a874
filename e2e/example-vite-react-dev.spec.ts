import { spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { expect } from '@playwright/test';
import { EXAMPLE_DIR, callApiFromExample, signInFromExample, signOutFromExample } from './support/example-app.ts';
import { test } from './support/fixtures.ts';
import { ROOT, freePort, startProcess, type RunningProcess } from './support/stack.ts';

// The README's development loop for an existing SPA, as a developer runs it: the example's own Vite
// dev server, and `SPA_DEV_URL=<it> npm run dev` — the zero-config dev IdP and demo API included —
// putting both on one origin. Runs in the `npm start` pass only: `npm run dev` is neither server shape.

// A copy inside the repository (so Vite finds the workspace's node_modules and allows serving from
// it), edited by the test to see hot reload; gitignored.
const copy = path.join(ROOT, '.test-tmp', `vite-react-${process.pid}`);
let vite: RunningProcess | undefined;
let dev: RunningProcess | undefined;
let app: string;
let idp: string;

test.describe('examples/vite-react on its Vite dev server through SPA_DEV_URL', () => {
  test.beforeAll(async () => {
    test.setTimeout(3 * 60_000);
    mkdirSync(path.dirname(copy), { recursive: true });
    cpSync(EXAMPLE_DIR, copy, { recursive: true, filter: (source) => !/[/\\](node_modules|dist)$/.test(source) });
    const [vitePort, appPort, nextPort, idpPort, apiPort] = await Promise.all([freePort(), freePort(), freePort(), freePort(), freePort()]);
    // What `npm run dev` in the example does (its predev builds @gatehouse/client first).
    const client = spawnSync('npm', ['run', '--silent', 'build:client'], { cwd: ROOT, encoding: 'utf8' });
    if (client.status !== 0) throw new Error(`building @gatehouse/client failed:\n${client.stdout}${client.stderr}`);
    vite = await startProcess('vite', [path.join(ROOT, 'node_modules/vite/bin/vite.js'), '--port', String(vitePort), '--strictPort'], { NODE_ENV: '' }, /ready in/, 60_000, copy);
    app = `http://localhost:${appPort}`;
    idp = `http://127.0.0.1:${idpPort}`;
    dev = await startProcess(
      'npm-run-dev-vite',
      ['scripts/dev.ts'],
      { NODE_ENV: '', OIDC_ISSUER: '', BFF_APIS: '', REDIS_URL: '', SPA_DEV_URL: `http://localhost:${vitePort}`, PORT: String(appPort), NEXT_DEV_PORT: String(nextPort), IDP_PORT: String(idpPort), DEMO_API_PORT: String(apiPort) },
      /Ready in/,
      90_000,
    );
  });
  test.afterAll(async () => {
    await dev?.stop();
    await vite?.stop();
    rmSync(copy, { recursive: true, force: true });
  });

  test('login, a proxied call and logout on one origin, and an edit hot-reloads without losing the session', async ({ page }) => {
    test.setTimeout(120_000);
    // Every WebSocket the page opens, and what came through each: hot reload must ride on the app's
    // own origin (Vite would otherwise fall back to its own port, which a real deployment's
    // developer may not even reach).
    const sockets: Array<{ url: string; received: string[] }> = [];
    page.on('websocket', (socket) => {
      const seen = { url: socket.url(), received: [] as string[] };
      sockets.push(seen);
      socket.on('framereceived', (frame) => seen.received.push(String(frame.payload)));
    });
    await page.goto(`${app}/`);
    await expect(page.getByTestId('title')).toHaveText('Orders');
    await signInFromExample(page, idp, 'hana');
    await callApiFromExample(page, 'hana');

    // Hot reload through Gatehouse's origin: Vite's WebSocket carries the change, React Fast Refresh
    // applies it in place — no page load (the marker survives), the user still signed in.
    await page.evaluate(() => Object.assign(window, { beforeTheEdit: true }));
    const source = path.join(copy, 'src/App.tsx');
    writeFileSync(source, readFileSync(source, 'utf8').replaceAll('>Orders<', '>Orders, hot-reloaded<'));
    await expect(page.getByTestId('title')).toHaveText('Orders, hot-reloaded', { timeout: 20_000 });
    expect(await page.evaluate(() => (window as unknown as { beforeTheEdit?: boolean }).beforeTheEdit)).toBe(true);
    await expect(page.getByTestId('user-sub')).toHaveText('hana');
    expect(sockets.length).toBeGreaterThan(0);
    for (const socket of sockets) expect(new URL(socket.url).host, 'every WebSocket on the app origin').toBe(new URL(app).host);
    expect(sockets.flatMap((socket) => socket.received).join('\n')).toContain('"type":"update"');

    await signOutFromExample(page, idp, app);
  });
});
