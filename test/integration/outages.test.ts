import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import { call, clearsSessionCookie, login, waitFor } from '../support/http-client.ts';
import { startPrivateRedis, type PrivateRedis } from '../support/private-redis.ts';

/**
 * Transient faults never cost a session: a Redis that stops answering (a private redis-server,
 * frozen with SIGSTOP) and an IdP that stops answering are 503s naming what failed, and the same
 * session works again once they are back. /api/health names the failing dependency.
 */

let redis: PrivateRedis;
let stack: Stack;
let app: string;
let cookie: string;

beforeAll(async () => {
  redis = await startPrivateRedis();
  stack = await startStack({ workers: 1, redisUrl: redis.url, env: { OIDC_TIMEOUT_MS: '1500', REFRESH_LOCK_LEASE_MS: '3000' } });
  app = stack.apps[0]!.url;
  cookie = await login(app, 'outage-user');
});

afterAll(async () => {
  if (stack?.idp.child.pid) process.kill(stack.idp.child.pid, 'SIGCONT');
  await stack?.stop();
  redis?.stop();
});

describe('transient faults', () => {
  it('health is 200 while everything answers', async () => {
    const response = await fetch(`${app}/api/health`);
    expect(response.status).toBe(200);
    expect(await response.json()).toEqual({ status: 'ok', store: 'ok', idp: 'ok' });
  });

  it('a Redis that stops answering is a 503 store_unavailable, not a logout; the session works once it is back', async () => {
    process.kill(redis.child.pid as number, 'SIGSTOP');
    try {
      const proxied = await call(app, '/api/proxy/demo/whoami', cookie);
      expect(proxied.status).toBe(503);
      expect(proxied.body).toMatchObject({ error: 'store_unavailable' });
      expect(clearsSessionCookie(proxied.setCookies)).toBe(false);
      const session = await call(app, '/api/auth/session', cookie);
      expect(session).toMatchObject({ status: 503, body: { error: 'store_unavailable' } });
      expect(clearsSessionCookie(session.setCookies)).toBe(false);
      const health = await fetch(`${app}/api/health`);
      expect(health.status).toBe(503);
      expect(await health.json()).toMatchObject({ error: 'unhealthy', store: 'unavailable', idp: 'ok' });
    } finally {
      process.kill(redis.child.pid as number, 'SIGCONT');
    }
    await waitFor('the session to answer again', async () => ((await call(app, '/api/proxy/demo/whoami', cookie)).status === 200 ? true : undefined), 10_000, 100);
    expect(await call(app, '/api/auth/session', cookie)).toMatchObject({ status: 200, body: { authenticated: true, user: { sub: 'outage-user' } } });
  });

  it('an IdP that stops answering makes health 503 naming the IdP; proxied calls with a fresh token are unaffected', async () => {
    const idp = stack.idp.child.pid as number;
    process.kill(idp, 'SIGSTOP');
    try {
      const health = await fetch(`${app}/api/health`);
      expect(health.status).toBe(503);
      expect(await health.json()).toMatchObject({ store: 'ok', idp: 'unavailable' });
      expect((await call(app, '/api/proxy/demo/whoami', cookie)).status).toBe(200);
    } finally {
      process.kill(idp, 'SIGCONT');
    }
  });
});
