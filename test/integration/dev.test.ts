import { afterAll, describe, expect, it } from 'vitest';
import { freePort, startProcess, type RunningProcess } from '../../e2e/support/stack.ts';
import { call, login } from '../support/http-client.ts';

/**
 * The README's first command: `npm run dev` with no configuration at all brings up the dev IdP,
 * the demo API and the app with the in-memory store, and a user can sign in and call the API.
 */

let dev: RunningProcess | undefined;
afterAll(async () => {
  await dev?.stop();
});

describe('npm run dev', () => {
  it('needs no configuration: sign in at the embedded IdP and call the demo API', async () => {
    const [appPort, idpPort, apiPort] = await Promise.all([freePort(), freePort(), freePort()]);
    // Only ports are chosen here (so the test cannot collide with a running demo); nothing else is configured.
    const clean = Object.fromEntries(
      Object.keys(process.env)
        .filter((name) => /^(OIDC_|SESSION_|BFF_|REDIS_|UPSTASH_|APP_BASE_URL|TOKEN_|NEXT_DIST_DIR)/.test(name))
        .map((name) => [name, '']),
    );
    dev = await startProcess('npm-run-dev', ['scripts/dev.ts'], { ...clean, NODE_ENV: '', PORT: String(appPort), IDP_PORT: String(idpPort), DEMO_API_PORT: String(apiPort) }, /Ready in/, 90_000);
    const app = `http://localhost:${appPort}`;
    const page = await fetch(app);
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('Gatehouse demo');
    const cookie = await login(app, 'dev-user');
    expect(await call(app, '/api/auth/session', cookie)).toMatchObject({ status: 200, body: { authenticated: true, user: { sub: 'dev-user' } } });
    expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'dev-user', aud: `http://localhost:${apiPort}` } });
  }, 180_000);
});
