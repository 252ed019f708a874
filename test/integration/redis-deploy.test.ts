// Redis as users deploy it: TLS only (a private CA, trusted through REDIS_TLS_CA) and an ACL user
// allowed exactly the commands the README lists, on its key prefix only. Every session feature runs
// against it — login, proxied calls, a refresh under the lock, the sessions list, ending a session,
// back-channel logout, logout — so a command missing from the list fails here, not in production.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, startGatehouse, startStack, type Stack } from '../../e2e/support/stack.ts';
import { RedisProbe, call, login, waitFor } from '../support/http-client.ts';
import { makeTestCertificates } from '../support/test-ca.ts';

/** The commands the README's "Redis as you deploy it" lists; the ACL below allows these and nothing else. */
const README = readFileSync(path.resolve(import.meta.dirname, '../../README.md'), 'utf8');
const ACL_LINE = /^\s*(ACL SETUSER gatehouse .*)$/m.exec(README)?.[1] ?? '';

const ACCESS_TOKEN_TTL_SEC = 20;
const REFRESH_SKEW_SEC = 17;
const dir = mkdtempSync(path.join(tmpdir(), 'gatehouse-redis-tls-'));
const password = randomBytes(18).toString('base64url');
const adminPassword = randomBytes(18).toString('base64url');
let redis: ChildProcess;
let port: number;
let stack: Stack;
let app: string;
// The test's own eyes on the server, as its admin user: session records, ACL LOG, CLIENT LIST.
let probe: RedisProbe;

beforeAll(async () => {
  // A private CA and a server certificate for localhost (server.crt, server.key, ca.crt in dir).
  makeTestCertificates(dir);
  port = await freePort();
  expect(ACL_LINE, 'the README lists the ACL').toMatch(/^ACL SETUSER gatehouse on /);
  // The README's ACL line, with this run's password and key prefix; the default user is off.
  const prefix = `gh-acl-${randomBytes(4).toString('hex')}:`;
  const rules = ACL_LINE.replace(/^ACL SETUSER gatehouse /, '').replace('>PASSWORD', `>${password}`).replace('~gatehouse:*', `~${prefix}*`);
  writeFileSync(
    path.join(dir, 'redis.conf'),
    [`port 0`, `tls-port ${port}`, `bind 127.0.0.1`, `tls-cert-file server.crt`, `tls-key-file server.key`, `tls-ca-cert-file ca.crt`, `tls-auth-clients no`, `save ""`, `appendonly no`, `user default off`, `user gatehouse ${rules}`, `user admin on >${adminPassword} ~* &* +@all`].join('\n'),
  );
  redis = spawn('redis-server', [path.join(dir, 'redis.conf')], { cwd: dir, stdio: 'ignore' });
  const url = `rediss://gatehouse:${password}@localhost:${port}`;
  await waitFor('the TLS redis-server', () => (spawnSync('redis-cli', ['--tls', '--cacert', path.join(dir, 'ca.crt'), '-p', String(port), '--user', 'gatehouse', '--pass', password, 'ping'], { encoding: 'utf8' }).stdout.trim() === 'PONG' ? true : undefined), 10_000, 100);
  stack = await startStack({
    workers: 1,
    redisUrl: url,
    accessTokenTtl: ACCESS_TOKEN_TTL_SEC,
    env: { REDIS_KEY_PREFIX: prefix, REDIS_TLS_CA: path.join(dir, 'ca.crt'), TOKEN_REFRESH_SKEW: String(REFRESH_SKEW_SEC) },
  });
  app = stack.apps[0]!.url;
  probe = new RedisProbe(prefix, `rediss://admin:${adminPassword}@localhost:${port}`, { tls: { ca: readFileSync(path.join(dir, 'ca.crt'), 'utf8') } });
}, 120_000);

afterAll(async () => {
  await probe?.close();
  await stack?.stop();
  redis?.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

async function signWithIdp(payload: Record<string, unknown>): Promise<string> {
  const response = await fetch(`${stack.issuer}/__dev/sign`, { method: 'POST', body: JSON.stringify({ payload, header: {} }) });
  return ((await response.json()) as { jws: string }).jws;
}

describe('Redis over TLS with a least-privilege ACL user', () => {
  it('every session feature works: login, calls, a refresh, the sessions list, ending one, back-channel logout, logout', async () => {
    const user = 'acl-user';
    const cookie = await login(app, user);
    expect(await call(app, '/api/auth/session', cookie)).toMatchObject({ status: 200, body: { authenticated: true, user: { sub: user } } });
    expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: user } });

    // A refresh: the lock, the guarded write-back, the lock's release.
    await probe.waitUntilDue(user, REFRESH_SKEW_SEC);
    expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: user } });

    // A second session; the list shows both; the first ends the second.
    const other = await login(app, user);
    const listed = await call(app, '/api/auth/sessions', cookie);
    expect(listed.status).toBe(200);
    const sessions = (listed.body as { sessions: Array<{ handle: string; current: boolean }> }).sessions;
    expect(sessions).toHaveLength(2);
    const otherHandle = sessions.find((entry) => !entry.current)?.handle as string;
    expect((await call(app, `/api/auth/sessions/${otherHandle}`, cookie, { method: 'DELETE' })).status).toBe(200);
    expect(await call(app, '/api/auth/session', other)).toMatchObject({ status: 200, body: { authenticated: false } });

    // Back-channel logout of every session of a second user.
    const victim = await login(app, 'acl-bcl-user');
    const now = Math.floor(Date.now() / 1000);
    const token = await signWithIdp({ iss: stack.issuer, aud: stack.clientId, iat: now, exp: now + 120, jti: randomUUID(), sub: 'acl-bcl-user', events: { 'http://schemas.openid.net/event/backchannel-logout': {} } });
    const bcl = await fetch(`${app}/api/auth/backchannel-logout`, { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams({ logout_token: token }) });
    expect(bcl.status).toBe(200);
    expect(await call(app, '/api/auth/session', victim)).toMatchObject({ status: 200, body: { authenticated: false } });

    // Logout.
    expect((await call(app, '/api/auth/logout', cookie, { method: 'POST' })).status).toBe(200);
    expect(await call(app, '/api/auth/session', cookie)).toMatchObject({ status: 200, body: { authenticated: false } });
    expect(stack.apps[0]!.process.output()).not.toMatch(/NOPERM|store_unavailable/);

    // Some failures are absorbed on purpose (a lost lease renewal, coherent copies switched off), so
    // the server itself is asked: nothing was denied, and the session cache's tracking is on.
    expect(await probe.redis.call('ACL', 'LOG')).toEqual([]);
    const clients = String(await probe.redis.call('CLIENT', 'LIST')).split('\n').filter((line) => / user=gatehouse /.test(line));
    expect(clients.some((line) => /\bflags=\S*t/.test(line)), clients.join('\n')).toBe(true);
  }, 90_000);

  it('without REDIS_TLS_CA the private CA is not trusted: the store is unavailable, and says so', async () => {
    const { REDIS_TLS_CA: _ignored, ...env } = stack.appEnv;
    const untrusting = await startGatehouse({ name: 'gatehouse-no-ca', workers: 1, env: { ...env, REDIS_URL: `rediss://gatehouse:${password}@localhost:${port}` } });
    try {
      const health = await fetch(`${untrusting.url}/api/health`);
      expect(health.status).toBe(503);
      expect(await health.json()).toMatchObject({ store: 'unavailable' });
    } finally {
      await untrusting.process.stop();
    }
  });
});
