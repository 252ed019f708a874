import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loginThroughRp } from '../../e2e/support/headless-login.ts';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import { call, idpGrants, login, refreshGrantsOf } from '../support/http-client.ts';

/**
 * Per-API audiences (RFC 8707) and the BFF's own client-credentials tokens, against the real
 * IdP: each API receives a token whose `aud` is that API, which the demo APIs verify themselves.
 */

let stack: Stack;
let app: string;
let reportsUrl: string;

beforeAll(async () => {
  stack = await startStack({
    workers: 1,
    resourceApis: 1,
    apis: ({ apiUrl, resourceApiUrls: [reports] }) => ({
      demo: { url: apiUrl },
      reports: { url: reports, resource: reports },
      backoffice: { url: reports, auth: 'client', resource: reports, scope: 'api:read' },
    }),
  });
  app = stack.apps[0]!.url;
  reportsUrl = stack.resourceApiUrls[0] as string;
});

afterAll(async () => {
  await stack?.stop();
});

describe('per-API tokens', () => {
  it('sends each API a token restricted to its own audience, obtained once with the refresh token', async () => {
    const { rpCookies } = await loginThroughRp({ startUrl: `${app}/api/auth/login`, username: 'audience-user' });
    const cookie = [...rpCookies].map(([name, value]) => `${name}=${value}`).join('; ');
    const call = async (path: string) => {
      const response = await fetch(`${app}/api/proxy/${path}`, { headers: { cookie, 'x-csrf': '1' } });
      return { status: response.status, body: (await response.json()) as { aud?: string; sub?: string } };
    };

    const before = await idpGrants(stack.issuer);
    expect(await call('demo/whoami')).toMatchObject({ status: 200, body: { aud: stack.apiUrl, sub: 'audience-user' } });
    for (let i = 0; i < 5; i++) {
      expect(await call('reports/whoami')).toMatchObject({ status: 200, body: { aud: reportsUrl, sub: 'audience-user' } });
    }
    const after = await idpGrants(stack.issuer);
    const refreshes = (after.byAccount['audience-user']?.refresh_token ?? 0) - (before.byAccount['audience-user']?.refresh_token ?? 0);
    expect(refreshes).toBe(1);
    // The grant rotated the refresh token; the session kept the new one and every token still works.
    expect(await call('demo/whoami')).toMatchObject({ status: 200, body: { aud: stack.apiUrl } });
    expect(await call('reports/whoami')).toMatchObject({ status: 200, body: { aud: reportsUrl } });
  });

  it('gives "client" APIs the BFF\'s own token, fetched once and reused', async () => {
    const before = (await idpGrants(stack.issuer)).success.client_credentials ?? 0;
    for (let i = 0; i < 10; i++) {
      const response = await fetch(`${app}/api/proxy/backoffice/whoami`, { headers: { 'x-csrf': '1' } });
      expect(response.status).toBe(200);
      const body = (await response.json()) as { aud: string; client_id: string; sub?: string };
      expect(body.aud).toBe(reportsUrl);
      expect(body.client_id).toBe(stack.clientId);
      // oidc-provider names the client itself as the subject of a client-credentials token.
      expect(body.sub).toBe(stack.clientId);
    }
    expect(((await idpGrants(stack.issuer)).success.client_credentials ?? 0) - before).toBe(1);
  });

  it('an upstream 401 to a token that looked valid earns one refresh, at most one per FORCED_REFRESH_INTERVAL, and one retry for requests without a body only', async () => {
    const cookie = await login(app, 'rejected-user');
    const refreshes = async () => refreshGrantsOf(await idpGrants(stack.issuer), 'rejected-user');
    const before = await refreshes();

    // The demo API answers 401 on this route whatever the token: one refresh, one retry, then the 401 goes back.
    const rejected = await call(app, '/api/proxy/demo/status/401', cookie);
    expect(rejected.status).toBe(401);
    expect(await refreshes()).toBe(before + 1);

    // Within the interval a write's 401 earns no second refresh (refresh-guards tests one that
    // earns the first), and it is passed on, not sent again.
    const response = await fetch(`${app}/api/proxy/demo/status/401`, { method: 'POST', headers: { cookie, 'x-csrf': '1', 'content-type': 'application/json' }, body: '{"a":1}' });
    expect(response.status).toBe(401);
    expect(await refreshes()).toBe(before + 1);

    // The refreshed token is the session's token from now on.
    expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: 'rejected-user' } });
    expect(await refreshes()).toBe(before + 1);
  });
});
