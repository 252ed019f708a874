import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import { call, login, waitFor } from '../support/http-client.ts';

/**
 * Structured logs at the most verbose level, through a whole session's life: one JSON line per
 * auth event and per proxied request, with what an operator needs — and never a token, a cookie or
 * a secret.
 */

let stack: Stack;
let app: string;

beforeAll(async () => {
  stack = await startStack({
    workers: 1,
    accessTokenTtl: 60,
    env: { LOG_LEVEL: 'debug', TOKEN_REFRESH_SKEW: '120' },
    resourceApis: 1,
    apis: ({ apiUrl, resourceApiUrls: [ledger] }) => ({ demo: { url: apiUrl }, ledger: { url: ledger, tokenExchange: { audience: ledger } } }),
  });
  app = stack.apps[0]!.url;
});

afterAll(async () => {
  await stack?.stop();
});

describe('logs', () => {
  it('one JSON line per event, and no secret in any of them', async () => {
    const cookie = await login(app, 'log-user');
    expect((await call(app, '/api/proxy/demo/whoami?x=1', cookie)).status).toBe(200);
    expect((await call(app, '/api/proxy/ledger/whoami', cookie)).status).toBe(200);
    await call(app, '/api/proxy/demo/echo', undefined);
    await fetch(`${app}/api/auth/logout`, { method: 'POST', headers: { cookie, 'x-csrf': '1' } });

    const readLines = () =>
      stack.apps[0]!.process
        .output()
        .split('\n')
        .filter((line) => line.startsWith('{'));
    // Info lines are written within a fraction of a second, not at once (lib/log.ts), and may come
    // in more than one write: wait for the last event logged too, the logout.
    const lines = await waitFor(
      'the proxied requests and the logout logged',
      () => {
        const now = readLines();
        return now.filter((line) => line.includes('"proxy.request"')).length >= 3 && now.some((line) => line.includes('"auth.logout"')) ? now : undefined;
      },
      3_000,
    );
    const events = lines.map((line) => JSON.parse(line) as { event: string; level: string; time: string } & Record<string, unknown>);
    const proxied = events.filter((event) => event.event === 'proxy.request');
    expect(proxied).toHaveLength(3);
    // The token was due, so the first call refreshed first, the second refreshed and exchanged; the third had no session.
    expect(proxied[0]).toMatchObject({ method: 'GET', api: 'demo', status: 200, refreshed: true });
    expect(proxied[1]).toMatchObject({ method: 'GET', api: 'ledger', status: 200, refreshed: true });
    expect(proxied[2]).toMatchObject({ api: 'demo', status: 401, refreshed: false });
    for (const event of proxied) {
      expect(event.requestId).toMatch(/^[0-9a-f-]{36}$/);
      expect(typeof event.ms).toBe('number');
    }
    expect(events.map((event) => event.event)).toEqual(expect.arrayContaining(['auth.login_started', 'auth.login', 'token.refresh', 'token.exchange', 'auth.logout']));
    expect(events.find((event) => event.event === 'token.refresh')).toMatchObject({ outcome: 'ok', session: expect.stringMatching(/^[A-Za-z0-9_-]{16}$/) });
    expect(events.find((event) => event.event === 'token.exchange')).toMatchObject({ outcome: 'ok', audience: stack.resourceApiUrls[0], session: expect.stringMatching(/^[A-Za-z0-9_-]{16}$/) });

    const everything = stack.apps[0]!.process.output();
    expect(everything).not.toMatch(/eyJ[A-Za-z0-9_-]{10,}/); // no JWT: access, id or logout token
    expect(everything).not.toContain(cookie.split('=').slice(1).join('='));
    expect(everything).not.toContain(stack.appEnv.SESSION_SECRET as string);
    expect(everything).not.toContain(stack.appEnv.OIDC_CLIENT_SECRET as string);
  });
});
