import { spawnSync } from 'node:child_process';
import { expect } from '@playwright/test';
import { buildExample, callApiFromExample, signInFromExample, signOutFromExample } from './support/example-app.ts';
import { isHashedAsset } from '../lib/spa.ts';
import { test } from './support/fixtures.ts';
import { ROOT, startStack, type Stack } from './support/stack.ts';

// examples/vite-react, built by its own `npm run build` and served by Gatehouse with SPA_DIR, on
// the server shape of this run (E2E_SERVER). Its own stack: the global one serves the demo app.
const shape = process.env.E2E_SERVER === 'next' ? 'next' : 'fast';
// `next start` needs SPA_DIR at build time (Next compiles rewrites into the build): a build of its own.
const NEXT_DIST_DIR = '.next-example';

let stack: Stack;
let app: string;

test.describe(`examples/vite-react served by SPA_DIR on ${shape === 'next' ? 'next start' : 'npm start'}`, () => {
  test.beforeAll(async () => {
    test.setTimeout(6 * 60_000);
    const spaDir = buildExample();
    if (shape === 'next') {
      const build = spawnSync('npm', ['run', '--silent', 'build'], { cwd: ROOT, encoding: 'utf8', env: { ...process.env, SPA_DIR: spaDir, NEXT_DIST_DIR } });
      if (build.status !== 0) throw new Error(`next build with SPA_DIR failed:\n${build.stdout}${build.stderr}`);
    }
    stack = await startStack({ server: shape, workers: 1, env: { SPA_DIR: spaDir, ...(shape === 'next' ? { NEXT_DIST_DIR } : {}) } });
    app = (stack.apps[0] as Stack['apps'][number]).url;
  });
  test.afterAll(async () => {
    await stack?.stop();
  });

  test('a deep link, login back to it, a proxied call, logout: the SPA never sees a token', async ({ page }) => {
    const landing = await page.goto(`${app}/orders/42`);
    // History-API fallback: the deep link is the SPA's index.html, with its security headers.
    expect(landing?.status()).toBe(200);
    const headers = landing?.headers() ?? {};
    expect(headers['content-security-policy']).toContain("script-src 'self'");
    expect(headers['cache-control']).toBe('no-cache');
    await expect(page).toHaveTitle(/Orders/);
    await expect(page.getByTestId('login')).toBeVisible();

    await signInFromExample(page, stack.issuer, 'vera');
    expect(new URL(page.url()).pathname).toBe('/orders/42');
    await callApiFromExample(page, 'vera');

    // The assets the build emitted are cached for good when their names show a content hash
    // (isHashedAsset: about 1 in 17 of Rollup's hashes reads as a written name and revalidates
    // instead, decided by content, so by this example's own code); a reload keeps the session.
    const assets = await page.evaluate(() => [...document.querySelectorAll<HTMLScriptElement | HTMLLinkElement>('script[type="module"][src], link[rel="stylesheet"][href]')].map((element) => ('src' in element ? element.src : element.href)));
    expect(assets.length).toBeGreaterThan(0);
    const caching = await Promise.all(assets.map(async (asset) => ({ asset, cacheControl: (await page.request.get(asset)).headers()['cache-control'] })));
    expect(caching).toEqual(assets.map((asset) => ({ asset, cacheControl: isHashedAsset(new URL(asset).pathname.slice(1)) ? 'public, max-age=31536000, immutable' : 'no-cache' })));
    await page.reload();
    await expect(page.getByTestId('user-sub')).toHaveText('vera');

    await signOutFromExample(page, stack.issuer, app);
    const after = await page.request.get(`${app}/api/proxy/demo/whoami`, { headers: { 'x-csrf': '1' } });
    expect(after.status()).toBe(401);
  });
});
