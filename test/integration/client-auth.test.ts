import { exportJWK, generateKeyPair } from 'jose';
import { afterAll, describe, expect, it } from 'vitest';
import { restartGatehouse, startStack, type Stack, type StackOptions } from '../../e2e/support/stack.ts';
import { TOKEN_EXCHANGE_GRANT, call, exchangeGrantsOf, idpGrants, login, refreshGrantsOf } from '../support/http-client.ts';

/**
 * The three client authentication methods against the real IdP: each stack's IdP knows the client
 * only with that method, so a login, a refresh and a token exchange can only succeed if Gatehouse
 * authenticates that way. oidc-provider takes client_secret_basic and client_secret_post alike from
 * a client registered for either, so the IdP's count of grants by the method they came with is
 * checked as well.
 */

/** Every stack here has an API whose token comes from a token exchange (RFC 8693). */
const withExchangedApi: Pick<StackOptions, 'resourceApis' | 'apis'> = {
  resourceApis: 1,
  apis: ({ apiUrl, resourceApiUrls: [ledger] }) => ({ demo: { url: apiUrl }, ledger: { url: ledger, tokenExchange: { audience: ledger } } }),
};

const stacks: Stack[] = [];
afterAll(async () => {
  await Promise.all(stacks.map((stack) => stack.stop()));
});

async function exercise(stack: Stack, user: string, method: 'client_secret_basic' | 'client_secret_post' | 'private_key_jwt'): Promise<void> {
  const app = stack.apps[0]!.url;
  const cookie = await login(app, user);
  expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: user } });
  // The token is due at once (skew ≥ its lifetime), so this call refreshes: the refresh grant authenticates too.
  const before = await idpGrants(stack.issuer);
  expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: user } });
  const after = await idpGrants(stack.issuer);
  expect(refreshGrantsOf(after, user) - refreshGrantsOf(before, user)).toBe(1);
  // The token exchange authenticates too (after one more refresh: the session's token is due again).
  const ledger = stack.resourceApiUrls[0];
  expect(await call(app, '/api/proxy/ledger/whoami', cookie)).toMatchObject({ status: 200, body: { sub: user, aud: ledger } });
  const exchanged = await idpGrants(stack.issuer);
  expect({ refreshed: refreshGrantsOf(exchanged, user) - refreshGrantsOf(after, user), exchanged: exchangeGrantsOf(exchanged, user) - exchangeGrantsOf(after, user) }).toEqual({
    refreshed: 1,
    exchanged: 1,
  });
  // This stack's IdP saw no other client authentication (it takes basic and post alike, so it must be looked at).
  for (const grantType of ['authorization_code', 'refresh_token', TOKEN_EXCHANGE_GRANT]) {
    expect(Object.keys(exchanged.clientAuth[grantType] ?? {}), grantType).toEqual([method]);
  }
}

describe('client authentication', () => {
  it('client_secret_post', async () => {
    const stack = await startStack({ workers: 1, accessTokenTtl: 60, env: { TOKEN_REFRESH_SKEW: '120' }, ...withExchangedApi });
    stacks.push(stack);
    // The dev IdP registers `<id>-post` for client_secret_post only.
    await restartGatehouse(stack.apps[0]!, { GATEHOUSE_WORKERS: '1', OIDC_CLIENT_ID: `${stack.clientId}-post`, OIDC_CLIENT_AUTH: 'client_secret_post', TOKEN_REFRESH_SKEW: '120' }, 'gatehouse-post');
    await exercise(stack, 'post-user', 'client_secret_post');
  });

  it('private_key_jwt, with no shared secret configured at all', async () => {
    const { publicKey, privateKey } = await generateKeyPair('ES256', { extractable: true });
    const publicJwk = { ...(await exportJWK(publicKey)), alg: 'ES256', use: 'sig', kid: 'gatehouse-test' };
    const privateJwk = { ...(await exportJWK(privateKey)), alg: 'ES256', kid: 'gatehouse-test' };
    const stack = await startStack({ workers: 1, accessTokenTtl: 60, idpEnv: { IDP_PKJWT_PUBLIC_JWK: JSON.stringify(publicJwk) }, ...withExchangedApi });
    stacks.push(stack);
    const app = stack.apps[0]!;
    const { OIDC_CLIENT_SECRET: _secret, ...envWithoutSecret } = app.env;
    app.env = envWithoutSecret;
    await restartGatehouse(
      app,
      { GATEHOUSE_WORKERS: '1', OIDC_CLIENT_ID: `${stack.clientId}-pkjwt`, OIDC_CLIENT_AUTH: 'private_key_jwt', OIDC_PRIVATE_KEY: JSON.stringify(privateJwk), TOKEN_REFRESH_SKEW: '120' },
      'gatehouse-pkjwt',
    );
    await exercise(stack, 'pkjwt-user', 'private_key_jwt');
  });

  // client_secret_basic, the default, is the client of this stack from the start.
  it('extra authorization parameters (OIDC_AUTHORIZATION_PARAMS) reach the IdP, and the login still completes', async () => {
    const stack = await startStack({ workers: 1, accessTokenTtl: 60, env: { OIDC_AUTHORIZATION_PARAMS: 'ui_locales=de&claims_locales=de', TOKEN_REFRESH_SKEW: '120' }, ...withExchangedApi });
    stacks.push(stack);
    const app = stack.apps[0]!.url;
    const start = await fetch(`${app}/api/auth/login`, { redirect: 'manual' });
    const authorize = new URL(start.headers.get('location') ?? '');
    expect(authorize.searchParams.get('ui_locales')).toBe('de');
    expect(authorize.searchParams.get('claims_locales')).toBe('de');
    expect(authorize.searchParams.get('code_challenge_method')).toBe('S256');
    await exercise(stack, 'locale-user', 'client_secret_basic');
  });
});
