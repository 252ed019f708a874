// The refresh path against faults of the store at the worst moment. The IdP here is a stand-in on
// loopback that answers every refresh grant and records revocations: what is under test is what
// Gatehouse does when the store loses an answer after the write landed, which neither real Redis
// nor the dev IdP can be made to do at that moment (test/integration covers the real parts).
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';

let idp: Server;
let issuer: string;
const revoked: string[] = [];

beforeAll(async () => {
  idp = createServer((request, response) => {
    let body = '';
    request.on('data', (chunk: Buffer) => (body += chunk));
    request.on('end', () => {
      response.setHeader('content-type', 'application/json');
      if (request.url === '/.well-known/openid-configuration') {
        response.end(JSON.stringify({ issuer, token_endpoint: `${issuer}/token`, revocation_endpoint: `${issuer}/revoke`, jwks_uri: `${issuer}/jwks`, authorization_endpoint: `${issuer}/auth` }));
      } else if (request.url === '/token') {
        response.end(JSON.stringify({ access_token: 'at-2', refresh_token: 'rt-2', token_type: 'Bearer', expires_in: 3600 }));
      } else if (request.url === '/revoke') {
        revoked.push(new URLSearchParams(body).get('token') ?? '');
        response.end('{}');
      } else {
        response.statusCode = 404;
        response.end('{}');
      }
    });
  });
  await new Promise<void>((resolve) => idp.listen(0, '127.0.0.1', resolve));
  issuer = `http://127.0.0.1:${(idp.address() as AddressInfo).port}`;
});

afterAll(() => new Promise<void>((resolve) => idp.close(() => resolve())));

async function deploy() {
  vi.resetModules();
  delete (globalThis as Record<symbol, unknown>)[Symbol.for('gatehouse.shared-state')];
  vi.unstubAllEnvs();
  const env: Record<string, string> = {
    APP_BASE_URL: 'http://localhost:3999',
    OIDC_ISSUER: issuer,
    OIDC_CLIENT_ID: 'gatehouse',
    OIDC_CLIENT_SECRET: 'secret',
    SESSION_SECRET: 'SeVhSpfHPcUhUQMEn0p0f7250URUfvrjNYvEPXY-',
    BFF_APIS: '{"demo":{"url":"https://api.example.com"}}',
    SESSION_STORE: 'memory',
    LOG_LEVEL: 'silent',
  };
  for (const [name, value] of Object.entries(env)) vi.stubEnv(name, value);
  const session = await import('../../lib/session.ts');
  const tokens = await import('../../lib/tokens.ts');
  return { session, tokens };
}

describe('a write-back that landed but whose answer was lost', () => {
  it('is kept when another instance holds the lock by the time it is retried: the rotated refresh token is neither lost nor revoked', async () => {
    const { session, tokens } = await deploy();
    const store = session.getStore();
    const replaceIfHeld = store.replaceIfHeld.bind(store);
    let lost = false;
    // The first write-back lands; its answer is lost (a timeout) while the lease runs out and
    // another instance (a resource-token grant of the same session) takes the lock for a moment.
    store.replaceIfHeld = async (key, value, lockKey, owner) => {
      if (lost) return replaceIfHeld(key, value, lockKey, owner);
      lost = true;
      expect(await replaceIfHeld(key, value, lockKey, owner)).toBe(true);
      await store.del(lockKey);
      expect(await store.set(lockKey, 'another-instance', { ttlMs: 25_000, onlyIfAbsent: true })).toBe(true);
      setTimeout(() => void store.delIfEquals(lockKey, 'another-instance'), 300);
      throw new Error('Command timed out');
    };
    const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets: { accessToken: 'at-1', refreshToken: 'rt-1', idToken: undefined, claims: {} }, accessTokenExpiresAt: Date.now() - 1_000, userAgent: 'ua' });
    revoked.length = 0;
    const outcome = await tokens.getAccessToken(created).then(
      (result) => ({ token: result.token }),
      (error: { code?: string }) => ({ error: error.code }),
    );
    expect(lost).toBe(true);
    expect([{ token: 'at-2' }, { error: 'store_unavailable' }, { error: 'idp_unavailable' }]).toContainEqual(outcome);
    expect(revoked).toEqual([]);
    expect((await session.readSession(created.id))?.secrets.refreshToken).toBe('rt-2');
  });
});
