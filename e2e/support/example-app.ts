import { spawnSync } from 'node:child_process';
import { expect, type Page } from '@playwright/test';
import { signInThroughIdp } from './fixtures.ts';
import { ROOT } from './stack.ts';

/**
 * examples/vite-react — a Vite + React SPA that knows Gatehouse only through @gatehouse/client —
 * driven as its user would, whichever way Gatehouse puts it on its origin (SPA_DIR, SPA_DEV_URL).
 */

export const EXAMPLE_DIR = `${ROOT}/examples/vite-react`;

/** `npm run build` of the example, as its README says: the client package, a type-check, vite build. */
export function buildExample(): string {
  const build = spawnSync('npm', ['run', '--silent', 'build'], { cwd: EXAMPLE_DIR, encoding: 'utf8' });
  if (build.status !== 0) throw new Error(`building examples/vite-react failed:\n${build.stdout}${build.stderr}`);
  return `${EXAMPLE_DIR}/dist`;
}

/** From the example's "Sign in" through the IdP's form, back to where the user was. */
export async function signInFromExample(page: Page, idp: string, username: string): Promise<void> {
  await signInThroughIdp(page, username, { idp, landing: new URL(page.url()) });
  await expect(page.getByTestId('user-sub')).toHaveText(username);
}

/** The API call and what must (and must not) reach the page. */
export async function callApiFromExample(page: Page, username: string): Promise<void> {
  await page.getByTestId('call-api').click();
  await expect(page.getByTestId('api-answer')).toContainText(`"sub": "${username}"`);
  await expect(page.getByTestId('api-answer')).not.toContainText('eyJ');
  // The session cookie is HTTP-only: nothing of it is readable by the page's scripts.
  expect(await page.evaluate(() => document.cookie)).not.toContain('gatehouse');
}

/** Sign out: Gatehouse ends its session, the IdP asks, the user lands signed out on the app. */
export async function signOutFromExample(page: Page, idp: string, app: string): Promise<void> {
  await page.getByTestId('logout').click();
  await page.waitForURL((url) => url.href.startsWith(idp));
  await page.getByRole('button', { name: 'Yes, sign me out' }).click();
  await page.waitForURL((url) => url.origin === new URL(app).origin);
  await expect(page.getByTestId('login')).toBeVisible();
}
