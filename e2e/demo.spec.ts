import { expect, type Page } from '@playwright/test';
import { env, refuseExternalRequests, signInThroughIdp, test } from './support/fixtures.ts';

// The demo SPA driven as a user would: everything here goes through gatehouse/client and the
// useSession hook, against the production server, the dev IdP and the demo API.

async function signedInPage(page: Page, username: string): Promise<void> {
  await page.goto('/');
  await signInThroughIdp(page, username);
  await expect(page.getByTestId('user-sub')).toHaveText(username);
}

test('the demo: see the user, call both APIs, watch the stream arrive event by event', async ({ page }) => {
  // Nothing the page loads is missing (a 404 favicon included).
  const missing: string[] = [];
  page.on('response', (response) => {
    if (response.status() === 404) missing.push(response.url());
  });
  await signedInPage(page, 'erin');
  await expect(page.getByTestId('user-name')).toHaveText('Erin Example');
  await expect(page.getByTestId('expires-at')).toContainText('extended while you use it');

  await page.getByTestId('call-api').click();
  await expect(page.getByTestId('api-answer')).toContainText('"sub": "erin"');
  await expect(page.getByTestId('api-answer')).toContainText(`"aud": "${env('DEMO_API_URL')}"`);
  await expect(page.getByTestId('api-answer')).not.toContainText('eyJ');

  await page.getByTestId('call-public').click();
  await expect(page.getByTestId('public-answer')).toContainText('"anonymous": false');
  await expect(page.getByTestId('public-answer')).toContainText('"sub": "erin"');

  // Eight events 400 ms apart: a buffering proxy would deliver them all at once at the end.
  await page.getByTestId('start-stream').click();
  await expect(page.getByTestId('event')).toHaveCount(1);
  await expect(page.getByTestId('stream-state')).toHaveCount(0);
  await expect(page.getByTestId('event')).toHaveCount(8, { timeout: 15_000 });
  await expect(page.getByTestId('stream-state')).toHaveText('Stream finished.');
  const offsets = await page.getByTestId('event').evaluateAll((items) => items.map((item) => Number(/after (\d+) ms/.exec(item.textContent ?? '')?.[1])));
  expect(offsets[0]).toBe(0);
  expect(offsets[7]).toBeGreaterThan(2_000);
  for (let i = 1; i < offsets.length; i++) expect(offsets[i]).toBeGreaterThan(offsets[i - 1] as number);

  // Stopping a stream says so and keeps what arrived.
  await page.getByTestId('start-stream').click();
  await expect(page.getByTestId('event')).toHaveCount(1);
  await page.getByTestId('stop-stream').click();
  await expect(page.getByTestId('stream-state')).toHaveText(/^Stream stopped after [1-8] events?\.$/);
  await expect(page.getByTestId('start-stream')).toBeEnabled();
  expect(missing).toEqual([]);

  // Keyboard: the main actions are reachable with Tab and work with Enter.
  await page.getByTestId('call-api').focus();
  await page.keyboard.press('Tab');
  await expect(page.getByTestId('call-public')).toBeFocused();
});

test("a silent login's authError is told in the page's own words: a link cannot make the app's page say anything", async ({ page }) => {
  const notice = page.locator('p[role="alert"]');
  await page.goto('/?authError=login_required');
  await expect(notice).toHaveText('Sign-in: you are not signed in at the identity provider.');
  await page.goto(`/?authError=${encodeURIComponent('Your account is locked. Call +1 555 0100 now')}`);
  await expect(notice).toHaveText('Sign-in: it did not complete.');
  await expect(page.locator('body')).not.toContainText('555 0100');
  await page.goto('/?authError=__proto__');
  await expect(notice).toHaveText('Sign-in: it did not complete.');
});

test('sign out everywhere else from a second browser; the first notices and offers login', async ({ browser }) => {
  const laptop = await browser.newContext();
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, userAgent: 'Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Safari/604.1' });
  const offline = await Promise.all([laptop, phone].map(refuseExternalRequests));
  const laptopPage = await laptop.newPage();
  const phonePage = await phone.newPage();
  try {
    await signedInPage(laptopPage, 'frank');
    // The phone signs in as the same user in its own browser (its own IdP session too).
    await signedInPage(phonePage, 'frank');

    await expect(phonePage.getByTestId('session-entry')).toHaveCount(2);
    await expect(phonePage.locator('[data-testid="session-entry"][data-current="true"]')).toContainText('Safari on iOS');
    await expect(phonePage.getByTestId('sessions')).not.toContainText('eyJ');
    // Phone layout: no horizontal scrolling.
    expect(await phonePage.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth)).toBe(true);

    await phonePage.getByTestId('sign-out-elsewhere').click();
    await expect(phonePage.getByTestId('sessions-message')).toHaveText('Signed out 1 other session.');
    await expect(phonePage.getByTestId('session-entry')).toHaveCount(1);

    // The laptop finds out on its next call: the client reports the ended session, the hook
    // refetches, and the page offers to sign in again.
    await laptopPage.getByTestId('call-api').click();
    await expect(laptopPage.getByTestId('login')).toBeVisible();
    await expect(laptopPage.getByRole('heading', { name: 'You are not signed in' })).toBeVisible();
    await expect(laptopPage.getByTestId('signed-out-reason')).toHaveText('You were signed out from another device.');
    // The phone is still signed in.
    await phonePage.reload();
    await expect(phonePage.getByTestId('user-sub')).toHaveText('frank');
    for (const external of offline) expect(external).toEqual([]);
  } finally {
    await laptop.close();
    await phone.close();
  }
});

test('a browser that was signed out elsewhere notices when its window regains focus', async ({ browser }) => {
  const first = await browser.newContext();
  const second = await browser.newContext();
  const offline = await Promise.all([first, second].map(refuseExternalRequests));
  try {
    const a = await first.newPage();
    const b = await second.newPage();
    await signedInPage(a, 'grace');
    await signedInPage(b, 'grace');
    await b.getByTestId('sign-out-elsewhere').click();
    await expect(b.getByTestId('sessions-message')).toHaveText('Signed out 1 other session.');
    await a.evaluate(() => window.dispatchEvent(new Event('focus')));
    await expect(a.getByTestId('login')).toBeVisible();
    await expect(a.getByTestId('signed-out-reason')).toHaveText('You were signed out from another device.');
    for (const external of offline) expect(external).toEqual([]);
  } finally {
    await first.close();
    await second.close();
  }
});
