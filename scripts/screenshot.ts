import { chromium } from '@playwright/test';
import path from 'node:path';
import { ROOT, freePort, startProcess } from '../e2e/support/stack.ts';

/**
 * `npm run screenshot`: the README's picture, taken from the real `npm run dev` demo (dev IdP,
 * demo API, Next in development mode) in Chromium: signed in, one API call made, the stream run.
 */

const [appPort, idpPort, apiPort] = await Promise.all([freePort(), freePort(), freePort()]);
const cleared = Object.fromEntries(
  Object.keys(process.env)
    .filter((name) => /^(OIDC_|SESSION_|BFF_|REDIS_|UPSTASH_|APP_BASE_URL|TOKEN_|NEXT_DIST_DIR)/.test(name))
    .map((name) => [name, '']),
);
const dev = await startProcess('npm-run-dev', ['scripts/dev.ts'], { ...cleared, NODE_ENV: '', PORT: String(appPort), IDP_PORT: String(idpPort), DEMO_API_PORT: String(apiPort) }, /Ready in/, 120_000);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 1000 }, deviceScaleFactor: 1 });
  await page.goto(`http://localhost:${appPort}/`);
  await page.getByTestId('login').click();
  await page.locator('input[name="login"]').fill('ada');
  await page.locator('input[name="password"]').fill('any-password');
  await page.getByRole('button', { name: 'Sign-in' }).click();
  await page.getByTestId('user-sub').waitFor();
  await page.getByTestId('call-api').click();
  await page.getByTestId('api-answer').waitFor();
  await page.getByTestId('start-stream').click();
  await page.getByTestId('stream-state').waitFor({ timeout: 30_000 });
  const file = path.join(ROOT, 'docs', 'demo.png');
  await page.screenshot({ path: file, fullPage: true });
  console.log(`wrote ${path.relative(ROOT, file)}`);
} finally {
  await browser.close();
  await dev.stop();
}
