import { test as base, expect, type BrowserContext, type Page } from '@playwright/test';

/** The stack's addresses, set by e2e/global-setup.ts (known only once it has run). */
export function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run the e2e tests through playwright.config.ts (global setup)`);
  return value;
}

export const test = base.extend({
  // Playwright reads fixture dependencies from the destructuring pattern, so it must be there.
  // eslint-disable-next-line no-empty-pattern -- Playwright needs the (empty) pattern to see there are no dependencies
  baseURL: async ({}, use) => {
    await use(env('GATEHOUSE_URL'));
  },
  context: async ({ context }, use) => {
    const external = await refuseExternalRequests(context);
    await use(context);
    expect(external, 'requests that left the machine').toEqual([]);
  },
});

/**
 * Everything the demo and the dev IdP show works offline: a request that would leave the machine
 * (a web font, an analytics script) is refused, and recorded in the returned list for the test to check.
 */
export async function refuseExternalRequests(context: BrowserContext): Promise<string[]> {
  const external: string[] = [];
  await context.route(/^https?:\/\/(?!(localhost|127\.0\.0\.1|\[::1\])[:/])/, (route) => {
    external.push(route.request().url());
    return route.abort();
  });
  return external;
}

export async function sessionCookie(context: BrowserContext, appUrl: string) {
  return (await context.cookies(appUrl)).find((cookie) => cookie.name === 'gatehouse');
}

/**
 * From the page's "Log in" button (test id `login`, or `button`) through the dev IdP's form and
 * back to `landing`: by default the global stack's IdP and the demo page. `fields` fills more of the
 * form (the second factor's `otp`); `atIdp` looks at the IdP's page before it is sent.
 */
export async function signInThroughIdp(
  page: Page,
  username: string,
  {
    idp = env('IDP_URL'),
    landing = new URL('/', env('GATEHOUSE_URL')),
    button = 'login',
    fields = {},
    atIdp,
  }: { idp?: string; landing?: URL; button?: string; fields?: Record<string, string>; atIdp?: (page: Page) => Promise<void> } = {},
): Promise<void> {
  await page.getByTestId(button).click();
  await page.waitForURL((url) => url.href.startsWith(`${idp}/interaction/`));
  await atIdp?.(page);
  for (const [name, value] of Object.entries({ login: username, password: 'any-password', ...fields })) await page.locator(`input[name="${name}"]`).fill(value);
  await page.getByRole('button', { name: 'Sign-in' }).click();
  await page.waitForURL((url) => url.origin === landing.origin && url.pathname === landing.pathname);
}
