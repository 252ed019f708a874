import { expect } from '@playwright/test';
import { env, sessionCookie, signInThroughIdp, test } from './support/fixtures.ts';

// Step-up (RFC 9470) as a user meets it in the demo SPA: a call the API refuses for want of a second
// factor, the stronger sign-in at the IdP (on 127.0.0.1, another site than the app on localhost),
// and the call made again on the way back, now answered.

test('step-up: the call gets step_up_required, login({ acrValues }) goes through the IdP’s second factor, and the call succeeds', async ({ page, context }) => {
  const app = env('GATEHOUSE_URL');
  await page.goto('/');
  await signInThroughIdp(page, 'stella');
  await expect(page.getByTestId('user-acr')).toHaveText('urn:gatehouse:pwd');
  const before = await sessionCookie(context, app);

  await page.getByTestId('call-mfa').click();
  await expect(page.getByTestId('mfa-answer')).toContainText('step_up_required');

  // The IdP asks the signed-in user again, this time for the second factor too; back in the app,
  // the page makes the call again by itself.
  await signInThroughIdp(page, 'stella', {
    button: 'step-up',
    fields: { otp: '123456' },
    atIdp: async (idpPage) => {
      await expect(idpPage.getByText('This application asks for a sign-in with a second factor.')).toBeVisible();
      await expect(idpPage.locator('input[name="login"]')).toHaveValue('stella');
    },
  });
  await expect(page.getByTestId('mfa-answer')).toContainText('"acr": "urn:gatehouse:mfa"');
  await expect(page.getByTestId('mfa-answer')).toContainText('"sub": "stella"');
  await expect(page.getByTestId('user-acr')).toHaveText('urn:gatehouse:mfa');
  expect(new URL(page.url()).search).toBe('');
  // A new session, and this browser is still signed in with it.
  const after = await sessionCookie(context, app);
  expect(after?.value).toBeTruthy();
  expect(after?.value).not.toBe(before?.value);
  await page.getByTestId('call-api').click();
  await expect(page.getByTestId('api-answer')).toContainText('"sub": "stella"');
});
