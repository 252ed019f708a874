import { afterEach, describe, expect, it, vi } from 'vitest';

const A = 'a'.repeat(32);
const B = 'b'.repeat(32);

/** Loads lib/session.ts afresh under the given secrets, as a new deployment would. */
async function deploy(sessionSecret: string, extra: Record<string, string> = {}) {
  vi.resetModules();
  vi.unstubAllEnvs();
  const env: Record<string, string> = {
    APP_BASE_URL: 'https://app.example.com',
    OIDC_ISSUER: 'https://idp.example.com',
    OIDC_CLIENT_ID: 'gatehouse',
    OIDC_CLIENT_SECRET: 'secret',
    SESSION_SECRET: sessionSecret,
    BFF_APIS: '{"demo":{"url":"https://api.example.com"}}',
    SESSION_STORE: 'memory',
    ...extra,
  };
  for (const [name, value] of Object.entries(env)) vi.stubEnv(name, value);
  return import('../../lib/session.ts');
}

function cookieValue(setCookie: string): string {
  return decodeURIComponent(setCookie.split(';')[0]!.split('=').slice(1).join('='));
}

const ID = 'x'.repeat(43);
const secrets = { accessToken: 'at-123', refreshToken: 'rt-456', idToken: 'id-789', claims: { sub: 'alice' } };

afterEach(() => vi.unstubAllEnvs());

describe('session cookie', () => {
  it('is HttpOnly, Secure, SameSite=Strict, Path=/, __Host- prefixed, without Domain', async () => {
    const session = await deploy(A);
    const header = await session.sessionCookieHeader(ID);
    expect(header).toMatch(/^__Host-gatehouse=/);
    expect(header).toContain('HttpOnly');
    expect(header).toContain('Secure');
    expect(header).toContain('SameSite=Strict');
    expect(header).toContain('Path=/');
    expect(header).not.toMatch(/Domain=/i);
    expect(header).not.toContain(ID);
  });

  it('carries only a sealed id that round-trips', async () => {
    const session = await deploy(A);
    const sealed = cookieValue(await session.sessionCookieHeader(ID));
    expect(await session.unsealSessionId(sealed)).toBe(ID);
  });

  it('refuses tampered, foreign and garbage seals without throwing', async () => {
    const session = await deploy(A);
    const sealed = cookieValue(await session.sessionCookieHeader(ID));
    const flipped = sealed.slice(0, 20) + (sealed[20] === 'A' ? 'B' : 'A') + sealed.slice(21);
    expect(await session.unsealSessionId(flipped)).toBeNull();
    // The version suffix is outside iron-session's MAC; an altered one is refused all the same.
    expect(await session.unsealSessionId(`${sealed}x`)).toBeNull();
    expect(await session.unsealSessionId(sealed.replace(/~2$/, '~3'))).toBeNull();
    expect(await session.unsealSessionId('not-a-seal')).toBeNull();
    expect(await session.unsealSessionId('Fe26.2*1*x*y*z*1*a*b~2')).toBeNull();
    const other = await deploy(B);
    expect(await other.unsealSessionId(sealed)).toBeNull();
  });

  it('rotates: A-sealed cookies survive "B,A", new seals use B, and "B" alone ends A-only cookies', async () => {
    const sealedWithA = cookieValue(await (await deploy(A)).sessionCookieHeader(ID));
    const rotating = await deploy(`${B},${A}`);
    expect(await rotating.unsealSessionId(sealedWithA)).toBe(ID);
    const sealedWithB = cookieValue(await rotating.sessionCookieHeader(ID));
    const onlyB = await deploy(B);
    expect(await onlyB.unsealSessionId(sealedWithB)).toBe(ID);
    expect(await onlyB.unsealSessionId(sealedWithA)).toBeNull();
  });

  it('uses SameSite=Lax when configured, and no Secure or prefix on plain-http loopback', async () => {
    const session = await deploy(A, { APP_BASE_URL: 'http://localhost:3000', SESSION_COOKIE_SAMESITE: 'lax' });
    const header = await session.sessionCookieHeader(ID);
    expect(header).toMatch(/^gatehouse=/);
    expect(header).toContain('SameSite=Lax');
    expect(header).not.toContain('Secure');
  });
});

describe('login transaction cookie', () => {
  it('is SameSite=Lax (the IdP redirect back is cross-site) and found only by its own state', async () => {
    const session = await deploy(A);
    const transaction = { state: 'state-one-abcdefghijklmnop', nonce: 'n', codeVerifier: 'v', returnTo: '/orders' };
    const header = await session.transactionCookieHeader(transaction);
    expect(header).toContain('SameSite=Lax');
    expect(header).toContain('HttpOnly');
    expect(header).toMatch(/Max-Age=600/);
    const cookie = header.split(';')[0]!;
    expect(await session.readTransaction(cookie, transaction.state)).toEqual(transaction);
    expect(await session.readTransaction(cookie, 'state-two-abcdefghijklmnop')).toBeNull();
    expect(await session.readTransaction(cookie, null)).toBeNull();
  });
});

describe('tokens at rest', () => {
  it('are encrypted: the stored form contains no token', async () => {
    const session = await deploy(A);
    const sealed = await session.encryptSecrets(secrets);
    for (const token of ['at-123', 'rt-456', 'id-789', 'alice']) expect(sealed).not.toContain(token);
    expect(await session.decryptSecrets(sealed)).toEqual(secrets);
  });

  it('rotate with TOKEN_ENCRYPTION_KEY like the session secret', async () => {
    const old = await deploy(A, { TOKEN_ENCRYPTION_KEY: A });
    const sealedWithA = await old.encryptSecrets(secrets);
    const rotating = await deploy(A, { TOKEN_ENCRYPTION_KEY: `${B},${A}` });
    expect(await rotating.decryptSecrets(sealedWithA)).toEqual(secrets);
    const sealedWithB = await rotating.encryptSecrets(secrets);
    const onlyB = await deploy(A, { TOKEN_ENCRYPTION_KEY: B });
    expect(await onlyB.decryptSecrets(sealedWithB)).toEqual(secrets);
    expect(await onlyB.decryptSecrets(sealedWithA)).toBeNull();
  });
});

describe('session records', () => {
  it('get a fresh id each time and end cleanly when their format is unknown', async () => {
    const session = await deploy(A);
    const input = { sub: 'alice', idpSid: 'sid-1', secrets, accessTokenExpiresAt: null, userAgent: 'test' };
    const first = await session.createSession(input);
    const second = await session.createSession(input);
    expect(first.id).not.toBe(second.id);
    expect(first.id).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect((await session.readSession(first.id))?.secrets).toEqual(secrets);
    await session.getStore().set(session.sessionKey(second.id), JSON.stringify({ v: 0, legacy: true }), { ttlMs: 60_000 });
    expect(await session.readSession(second.id)).toBeNull();
    expect(await session.getStore().get(session.sessionKey(second.id))).toBeNull();
  });

  it('are never resurrected by a token update after deletion', async () => {
    const session = await deploy(A);
    const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    await session.getStore().set(session.refreshLockKey(created.id), 'owner', { ttlMs: 60_000, onlyIfAbsent: true });
    await session.destroySession(created.id);
    expect(await session.updateSessionTokens(created, secrets, null, 'owner')).toBeNull();
    await session.touchSession(created, true);
    expect(await session.getStore().get(session.sessionKey(created.id))).toBeNull();
  });
});

describe('a token update', () => {
  it('is written only while the refresh lock is still its owner\'s', async () => {
    const session = await deploy(A);
    const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    const renewed = { ...secrets, accessToken: 'at-new' };
    expect(await session.updateSessionTokens(created, renewed, null, 'owner')).toBeNull();
    await session.getStore().set(session.refreshLockKey(created.id), 'successor', { ttlMs: 60_000, onlyIfAbsent: true });
    expect(await session.updateSessionTokens(created, renewed, null, 'owner')).toBeNull();
    expect((await session.readSession(created.id))?.secrets.accessToken).toBe('at-123');
    expect((await session.updateSessionTokens(created, renewed, null, 'successor'))?.secrets.accessToken).toBe('at-new');
    expect((await session.readSession(created.id))?.secrets.accessToken).toBe('at-new');
  });
});

describe('a session replaced by a new login', () => {
  it('lingers only for the grace period, unlisted, and is never extended', async () => {
    const session = await deploy(A);
    const old = await session.createSession({ sub: 'alice', idpSid: 'sid-9', secrets, accessTokenExpiresAt: null, userAgent: undefined });
    await session.retireSession(old);
    const retired = await session.readSession(old.id);
    expect(retired?.record.retiredAt).toBeTypeOf('number');
    expect(session.sessionExpiresAt(retired!.record)).toBeLessThanOrEqual(Date.now() + session.REPLACED_SESSION_GRACE_MS);
    expect(await session.getStore().indexMembers(session.userSessionsKey('alice'), Date.now())).toEqual([]);
    expect(await session.getStore().indexMembers(session.idpSessionKey('sid-9'), Date.now())).toEqual([]);

    // A use of the old cookie must not slide its expiry back out to the idle timeout, nor list it again.
    const retiredAt = retired!.record.retiredAt!;
    vi.useFakeTimers({ now: retiredAt + 20_000, toFake: ['Date'] });
    try {
      await session.touchSession(retired!, true);
      expect(await session.getStore().indexMembers(session.userSessionsKey('alice'), Date.now())).toEqual([]);
      // Asked of the store, not of readSession: readSession hides a retired record by its own clock
      // check, so an extended key TTL would go unseen there. The memory store expires keys by
      // Date.now(), so this reads the key's TTL as the store keeps it (the second covers the
      // moments between stamping retiredAt and setting the TTL).
      vi.setSystemTime(retiredAt + session.REPLACED_SESSION_GRACE_MS + 1_000);
      expect(await session.getStore().get(session.sessionKey(old.id))).toBeNull();
    } finally {
      vi.useRealTimers();
    }
  });
});
