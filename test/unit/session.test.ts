import fc from 'fast-check';
import v8 from 'node:v8';
import { afterEach, describe, expect, it, vi } from 'vitest';

const A = 'kn7DHY8D9In5Yxw-zLwaXshtegaMf1ovvOMbZl5O';
const B = 'Ff_8kUugM9frbLcVGwDUjN2rVWKAvE-dTZ63Kpdy';

/** Loads lib/session.ts afresh under the given secrets, as a new deployment would. */
async function deploy(sessionSecret: string, extra: Record<string, string> = {}) {
  vi.resetModules();
  // A new deployment is a new process: drop what the process-wide home (lib/shared-state.ts) holds.
  delete (globalThis as Record<symbol, unknown>)[Symbol.for('gatehouse.shared-state')];
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

type SessionModule = Awaited<ReturnType<typeof deploy>>;
type Session = Parameters<SessionModule['sealSessionTokens']>[0];

/** A refresh's write-back: the session sealed with new tokens, written only while `owner` holds the lock. */
async function writeTokens(session: SessionModule, current: Session, secrets: Session['secrets'], owner: string) {
  return session.writeSessionTokens(await session.sealSessionTokens(current, secrets, null), owner);
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

  it('clears a tampered cookie but not one sealed under a secret this instance lacks (a rotation in progress elsewhere)', async () => {
    const sealedWithB = cookieValue(await (await deploy(B)).sessionCookieHeader(ID));
    const session = await deploy(A);
    const sealedWithA = cookieValue(await session.sessionCookieHeader(ID));
    const tampered = sealedWithA.slice(0, -6) + (sealedWithA.at(-6) === 'A' ? 'B' : 'A') + sealedWithA.slice(-5);
    expect(await session.sessionFromCookieHeader(`__Host-gatehouse=${tampered}`)).toEqual({ session: null, stale: true, replaced: false });
    expect(await session.sessionFromCookieHeader(`__Host-gatehouse=${sealedWithB}`)).toEqual({ session: null, stale: false, replaced: false, unreadable: {} });
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
    const transaction = { state: 'state-one-abcdefghijklmnop', nonce: 'n', codeVerifier: 'v', returnTo: '/orders', startedAt: Date.now() };
    const header = await session.transactionCookieHeader(transaction);
    expect(header).toContain('SameSite=Lax');
    expect(header).toContain('HttpOnly');
    expect(header).toMatch(/Max-Age=600/);
    const cookie = header.split(';')[0]!;
    expect(await session.readTransaction(cookie, transaction.state)).toEqual(transaction);
    expect(await session.readTransaction(cookie, 'state-two-abcdefghijklmnop')).toBeNull();
    expect(await session.readTransaction(cookie, null)).toBeNull();
  });

  it('fits a browser’s 4096 bytes, whole Set-Cookie line, with the longest returnTo and every other field at its largest', async () => {
    const session = await deploy(A);
    const { requestedStepUp } = await import('../../lib/auth.ts');
    const { MAX_RETURN_TO_LENGTH, safeReturnTo } = await import('../../lib/http.ts');
    const { MAX_ACR_VALUES, MAX_ACR_VALUES_LENGTH } = await import('../../lib/step-up.ts');
    const each = Math.floor((MAX_ACR_VALUES_LENGTH + 1) / MAX_ACR_VALUES) - 1;
    const acr = Array.from({ length: MAX_ACR_VALUES }, (_, i) => `${i}`.padEnd(each, 'u')).join(' ').padEnd(MAX_ACR_VALUES_LENGTH, 'u');
    const stepUp = requestedStepUp(new URLSearchParams({ acr_values: acr, max_age: '315360000' }));
    expect(stepUp.acrValues).toHaveLength(8);
    // Non-ASCII triples in the normalised form: 341 × `é` is 2046 characters as `%C3%A9`.
    const returnTo = safeReturnTo(`/${'é'.repeat(341)}a`);
    expect(returnTo).toHaveLength(MAX_RETURN_TO_LENGTH);
    // Random values in the real lengths: a login's state, nonce, verifier, session id and DPoP thumbprint are 43 characters each.
    const random = () => 'x'.repeat(43);
    const header = await session.transactionCookieHeader({ state: random(), nonce: random(), codeVerifier: random(), prompt: 'none', returnTo, ...stepUp, startedAt: Date.now(), previousSessionId: random(), dpopJkt: random() });
    // SESSION_SECRET A's key id has the most digits a key id can have (10): the seal is as long as it gets.
    expect(/^[^=]+=Fe26\.2\*(\d+)\*/.exec(header)?.[1]).toHaveLength(10);
    expect(header).toMatch(/^__Host-.*; Secure/);
    expect(header.length).toBeLessThanOrEqual(4096);
  });

  it('are bounded per browser: a new login drops the oldest and any unreadable ones', async () => {
    const session = await deploy(A);
    const cookies: string[] = [];
    for (let i = 0; i < 5; i++) {
      const header = await session.transactionCookieHeader({ state: `state-${i}-abcdefghijklmnop`, nonce: 'n', codeVerifier: 'v', returnTo: '/', startedAt: 1_000 + i });
      cookies.push(header.split(';')[0]!);
    }
    cookies.push('__Host-gatehouse-tx-garbage=not-a-seal', '__Host-gatehouse=unrelated');
    const adding = await session.transactionCookieHeader({ state: 'state-5-abcdefghijklmnop', nonce: 'n', codeVerifier: 'v', returnTo: '/', startedAt: 1_006 });
    const dropped = await session.transactionCookiesToDrop(cookies.join('; '), adding);
    const names = dropped.map((line) => line.split('=')[0]);
    // The newest MAX_LIVE_TRANSACTIONS - 1 stay, so with the login being started there are MAX_LIVE_TRANSACTIONS.
    const kept = ['state-4', 'state-3'].map((state) => `__Host-gatehouse-tx-${state}-abcdefgh`);
    expect(session.MAX_LIVE_TRANSACTIONS).toBe(3);
    expect(names.sort()).toEqual(['__Host-gatehouse-tx-garbage', ...['state-0', 'state-1', 'state-2'].map((state) => `__Host-gatehouse-tx-${state}-abcdefgh`)].sort());
    for (const name of kept) expect(names).not.toContain(name);
    for (const line of dropped) expect(line).toMatch(/Max-Age=0/);
    expect(await session.transactionCookiesToDrop(cookies.slice(0, 2).join('; '), adding)).toEqual([]);
    // Without a new attempt (a silent login answered at once), three may stay.
    expect(await session.transactionCookiesToDrop(cookies.slice(0, 3).join('; '))).toEqual([]);
  });

  it('are bounded in bytes too: attempts at full size leave room for the new one only, within MAX_TRANSACTION_COOKIE_BYTES', async () => {
    const session = await deploy(A);
    const big = async (i: number) => session.transactionCookieHeader({ state: `state-${i}-abcdefghijklmnop`, nonce: 'n', codeVerifier: 'v', returnTo: `/${'a'.repeat(2047)}`, acrValues: Array.from({ length: 8 }, (_, k) => `urn:acr:${k}`.padEnd(31, 'x')), maxAge: 315_360_000, startedAt: 1_000 + i });
    const older = [(await big(0)).split(';')[0]!, (await big(1)).split(';')[0]!];
    const adding = await big(2);
    expect(session.MAX_TRANSACTION_COOKIE_BYTES).toBe(4096);
    expect((adding.split(';')[0] ?? '').length).toBeGreaterThan(session.MAX_TRANSACTION_COOKIE_BYTES / 2);
    const names = (await session.transactionCookiesToDrop(older.join('; '), adding)).map((line) => line.split('=')[0]);
    expect(names.sort()).toEqual(['state-0', 'state-1'].map((state) => `__Host-gatehouse-tx-${state}-abcdefgh`));
    // A small new one keeps the newest big one beside it.
    const small = await session.transactionCookieHeader({ state: 'state-3-abcdefghijklmnop', nonce: 'n', codeVerifier: 'v', returnTo: '/', startedAt: 1_003 });
    expect((await session.transactionCookiesToDrop(older.join('; '), small)).map((line) => line.split('=')[0])).toEqual(['__Host-gatehouse-tx-state-0-abcdefgh']);
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
  it('get a fresh id each time', async () => {
    const session = await deploy(A);
    const input = { sub: 'alice', idpSid: 'sid-1', secrets, accessTokenExpiresAt: null, userAgent: 'test' };
    const first = await session.createSession(input);
    const second = await session.createSession(input);
    expect(first.id).not.toBe(second.id);
    expect(first.id).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect((await session.readSession(first.id))?.secrets).toEqual(secrets);
  });

  it('that this instance cannot read are never deleted: another release or key may read them', async () => {
    const session = await deploy(A);
    const input = { sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined };
    const newerFormat = await session.createSession(input);
    const key = session.sessionKey(newerFormat.id);
    const written = JSON.stringify({ v: 2, shape: 'of a newer release' });
    await session.getStore().replace(key, written);
    expect(await session.loadSession(newerFormat.id)).toEqual({ session: null, miss: 'newer_release' });
    expect(await session.getStore().get(key)).toBe(written);
    // An older or unknown format is no newer release's: no session here, and still not deleted.
    for (const other of [JSON.stringify({ v: 0, shape: 'of an older release' }), JSON.stringify({ shape: 'no version' }), 'not JSON']) {
      await session.getStore().replace(key, other);
      expect(await session.loadSession(newerFormat.id), other).toEqual({ session: null, miss: 'unreadable' });
      expect(await session.getStore().get(key)).toBe(other);
    }

    // Tokens encrypted under a key this instance does not have yet (a rotation rolling out).
    const rotatedAhead = await deploy(A, { TOKEN_ENCRYPTION_KEY: B });
    const ahead = await rotatedAhead.createSession(input);
    const behind = await deploy(A, { TOKEN_ENCRYPTION_KEY: A });
    const record = await rotatedAhead.getStore().get(rotatedAhead.sessionKey(ahead.id));
    await behind.getStore().set(behind.sessionKey(ahead.id), record!, { ttlMs: 60_000 });
    expect(await behind.loadSession(ahead.id)).toEqual({ session: null, miss: 'unreadable' });
    expect(await behind.getStore().get(behind.sessionKey(ahead.id))).toBe(record);
  });

  it("are created when the store's answer to the write was lost and the write sent again (ioredis after a reconnect, a REST retry)", async () => {
    const session = await deploy(A);
    const store = session.getStore();
    const set = store.set.bind(store);
    // The first send lands and its answer is lost; the client sends it again and hears "exists".
    store.set = async (key, value, options) => {
      if (!options?.onlyIfAbsent || !key.includes('session:')) return set(key, value, options);
      await set(key, value, options);
      return set(key, value, options);
    };
    const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    expect((await session.readSession(created.id))?.secrets).toEqual(secrets);
  });

  it("stay in the indexes while a newer release's record (unreadable here) is listed, so a back-channel logout still finds them", async () => {
    const session = await deploy(A);
    const input = { sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined };
    const current = await session.createSession(input);
    const newer = await session.createSession(input);
    await session.getStore().replace(session.sessionKey(newer.id), JSON.stringify({ v: 2, shape: 'of a newer release' }));
    const listed = await session.listUserSessions(current);
    expect([listed.sessions.map((entry) => entry.id), listed.unreadableIds]).toEqual([[current.id], [newer.id]]);
    const indexed = await session.getStore().indexMembers(session.userSessionsKey('alice'), Date.now());
    expect(indexed.map((entry) => entry.member).sort()).toEqual([current.id, newer.id].sort());
  });

  it('whose touch failed at the store are touched again by the next call, not a touch interval later', async () => {
    const session = await deploy(A);
    const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    const store = session.getStore();
    const indexAdd = store.indexAdd.bind(store);
    let failures = 1;
    let writes = 0;
    store.indexAdd = async (...args) => {
      writes++;
      if (failures-- > 0) throw new Error('Connection is closed.');
      return indexAdd(...args);
    };
    await expect(session.touchSession(created, true)).rejects.toMatchObject({ code: 'store_unavailable' });
    const before = writes;
    await session.touchSession(created);
    expect(writes).toBeGreaterThan(before);
  });

  it('are never resurrected by a token update after deletion', async () => {
    const session = await deploy(A);
    const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    await session.getStore().set(session.refreshLockKey(created.id), 'owner', { ttlMs: 60_000, onlyIfAbsent: true });
    await session.destroySession(created.id);
    expect(await writeTokens(session, created, secrets, 'owner')).toBeNull();
    await session.touchSession(created, true);
    expect(await session.getStore().get(session.sessionKey(created.id))).toBeNull();
  });
});

/**
 * Someone who can write to the store but has no token key: they know every session id (it is in
 * the keys) and can rewrite any record, but cannot seal a cookie or open the tokens.
 */
describe('a session record rewritten by a store writer', () => {
  const input = (sub: string) => ({ sub, idpSid: `idp-${sub}`, secrets: { ...secrets, claims: { sub } }, accessTokenExpiresAt: Date.now() + 60_000, userAgent: 'ua', acr: 'pwd', authTime: 1_700_000_000 });
  const rawRecord = async (session: SessionModule, id: string) => JSON.parse((await session.getStore().get(session.sessionKey(id)))!) as Record<string, unknown>;
  /** The same store as seen by another instance: no copy of any record opened before. */
  const anotherInstance = (session: SessionModule) => {
    const home = (globalThis as Record<symbol, Map<string, unknown>>)[Symbol.for('gatehouse.shared-state')]!;
    (home.get('session') as { openedRecords: Map<string, unknown> }).openedRecords.clear();
    return session;
  };

  it('ends when another session\'s record is moved under its id, in this process and in another', async () => {
    for (const fresh of [false, true]) {
      const session = await deploy(A);
      const victim = await session.createSession(input('victim'));
      const attacker = await session.createSession(input('mallory'));
      // Warm this process's copies of both, as a busy instance has them.
      expect((await session.readSession(attacker.id))?.record.sub).toBe('mallory');
      expect((await session.readSession(victim.id))?.record.sub).toBe('victim');
      await session.getStore().replace(session.sessionKey(attacker.id), (await session.getStore().get(session.sessionKey(victim.id)))!);
      const reader = fresh ? anotherInstance(session) : session;
      expect(await reader.loadSession(attacker.id)).toEqual({ session: null, miss: 'gone' });
      expect(await reader.getStore().get(reader.sessionKey(attacker.id))).toBeNull();
      expect((await reader.readSession(victim.id))?.secrets.accessToken).toBe('at-123');
    }
  });

  it('ends when any field fixed at sign-in is changed, whatever the new value', async () => {
    const session = await deploy(A);
    const fixed = ['v', 'sub', 'idpSid', 'createdAt', 'absoluteExpiresAt', 'logoutToken', 'userAgent', 'acr', 'authTime'] as const;
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...fixed), fc.oneof(fc.string(), fc.integer(), fc.constant(null), fc.constant(undefined)), fc.boolean(), async (field, value, warm) => {
        const created = await session.createSession(input('alice'));
        const record = await rawRecord(session, created.id);
        fc.pre(JSON.stringify({ value: record[field] }) !== JSON.stringify({ value }));
        if (warm) await session.readSession(created.id);
        // A wrong `v` is another release's format: left for it, unread (a newer one serves it meanwhile). Every other change ends the session.
        const expected = field !== 'v' ? 'gone' : typeof value === 'number' && value > (record.v as number) ? 'newer_release' : 'unreadable';
        await session.getStore().replace(session.sessionKey(created.id), JSON.stringify({ ...record, [field]: value }));
        const loaded = await session.loadSession(created.id);
        if (field === 'sub' && typeof value !== 'string') expect(loaded).toEqual({ session: null, miss: 'unreadable' });
        else expect(loaded).toEqual({ session: null, miss: expected });
      }),
      { numRuns: 150 },
    );
  });

  it('lives on when only the access token\'s expiry changed: a refresh by an older release rewrites it with the old binding', async () => {
    const session = await deploy(A);
    const created = await session.createSession(input('alice'));
    const record = await rawRecord(session, created.id);
    await session.getStore().replace(session.sessionKey(created.id), JSON.stringify({ ...record, accessTokenExpiresAt: Date.now() + 3_600_000 }));
    expect((await anotherInstance(session).readSession(created.id))?.record.sub).toBe('alice');
  });

  it('without a binding (written before records were bound, or another value sealed under the token key) is not read, and left in the store', async () => {
    const session = await deploy(A);
    const victim = await session.createSession(input('victim'));
    const attacker = await session.createSession(input('mallory'));
    const record = await rawRecord(session, victim.id);
    const { boundTo, ...unbound } = (await session.decryptSecrets(record.sealed as string))!;
    expect(boundTo).toMatch(/^[A-Za-z0-9_-]{43}$/);
    // The victim's tokens as an older release sealed them, under the attacker's key; then a DPoP
    // login's key pair (also sealed under the token key) where a session's secrets go.
    for (const sealed of [await session.encryptSecrets(unbound), await session.encryptAtRest({ kty: 'EC', crv: 'P-256', x: 'x', y: 'y', d: 'd' })]) {
      const written = JSON.stringify({ ...record, sealed });
      await session.getStore().replace(session.sessionKey(attacker.id), written);
      expect(await anotherInstance(session).loadSession(attacker.id)).toEqual({ session: null, miss: 'unreadable' });
      expect(await session.getStore().get(session.sessionKey(attacker.id))).toBe(written);
    }
    expect((await session.readSession(victim.id))?.secrets.accessToken).toBe('at-123');
  });
});

describe('a sliding touch that races the session\'s end', () => {
  it('leaves no index entry behind when the end lands between its PEXPIRE and its index writes', async () => {
    const session = await deploy(A);
    const created = await session.createSession({ sub: 'alice', idpSid: 'idp-sid-1', secrets, accessTokenExpiresAt: null, userAgent: undefined });
    expect(await session.countActiveSessions()).toBe(1);
    // The race, made to happen (a real store's timing cannot be ordered on demand): a logout's
    // DEL and index removals land just before the touch's first index write.
    const store = session.getStore();
    const indexAdd = store.indexAdd.bind(store);
    let ended = false;
    store.indexAdd = async (...args) => {
      if (!ended) {
        ended = true;
        await session.destroySession(created.id, created.record);
      }
      return indexAdd(...args);
    };
    await session.touchSession(created, true);
    expect(ended).toBe(true);
    expect(await store.get(session.sessionKey(created.id))).toBeNull();
    expect(await session.countActiveSessions()).toBe(0);
    expect(await store.indexMembers(session.userSessionsKey('alice'), Date.now())).toEqual([]);
    expect(await store.indexMembers(session.idpSessionKey('idp-sid-1'), Date.now())).toEqual([]);
  });
});

describe('a session ended by another instance', () => {
  it('leaves no decrypted tokens in this process once a read finds it gone', async () => {
    const session = await deploy(A);
    const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    expect((await session.readSession(created.id))?.secrets.accessToken).toBe('at-123');
    const home = (globalThis as Record<symbol, Map<string, unknown>>)[Symbol.for('gatehouse.shared-state')]!;
    const copies = home.get('session') as { openedRecords: Map<string, { secrets?: unknown }> };
    expect(copies.openedRecords.get(created.id)?.secrets).toBeDefined();
    // Another instance ends it: only the store changes.
    await session.getStore().take(session.sessionKey(created.id));
    expect(await session.readSession(created.id)).toBeNull();
    expect(copies.openedRecords.has(created.id)).toBe(false);
  });
});

describe('what a session holds open', () => {
  it('ends with it, each held thing even when another one fails to end; a released one is left alone', async () => {
    const session = await deploy(A);
    const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    const ended: string[] = [];
    session.holdOpen(created.id, {
      end() {
        throw new Error('a socket that cannot close');
      },
    });
    session.holdOpen(created.id, { end: (seenBy) => ended.push(`stream: ${seenBy}`) });
    const release = session.holdOpen(created.id, { end: () => ended.push('a call already over') });
    release();
    session.holdOpen(ID, { end: () => ended.push('another session') });
    await session.destroySession(created.id, created.record);
    expect(ended).toEqual(['stream: this_process']);
  });

  // Every proxied call with a session is held while it is open. A Map or Set in V8's old
  // generation rehashes into a new table there whenever it empties, so a registry that emptied
  // on each release grew the old generation by ~50 bytes a call: a full collection (a 10–20 ms
  // stall of the worker) every 20–60 s at one call at a time.
  it('holding and releasing calls adds nothing to the old generation', async () => {
    const session = await deploy(A);
    const oldSpace = () => v8.getHeapSpaceStatistics().find((space) => space.space_name === 'old_space')?.space_used_size ?? 0;
    const call = () => session.holdOpen(ID, { end() {} })();
    call();
    // Into the old generation, as a server's registry is after its first seconds: by surviving scavenges.
    let kept: unknown;
    for (let i = 0; i < 4_000_000; i++) kept = { i };
    expect(kept).toBeDefined();
    // A full collection during the calls would shrink the old generation and hide what they added: measured again then.
    let grew: number | undefined;
    for (let attempt = 0; attempt < 5 && grew === undefined; attempt++) {
      const collections = new v8.GCProfiler();
      collections.start();
      const before = oldSpace();
      for (let i = 0; i < 100_000; i++) call();
      const after = oldSpace();
      if (collections.stop().statistics.every(({ gcType }) => gcType === 'Scavenge')) grew = after - before;
    }
    expect(grew).toBeDefined();
    expect(grew).toBeLessThan(1_000_000);
  });

  it('a release counts once; the periodic check stops once nothing is held, and runs while something is', async () => {
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] });
    try {
      const session = await deploy(A);
      const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
      const ended: string[] = [];
      // The memory store's own timers, if any, are not the check's.
      const others = vi.getTimerCount();
      const first = session.holdOpen(created.id, { end: () => ended.push('first') });
      const second = session.holdOpen(created.id, { end: () => ended.push('second') });
      const third = session.holdOpen(created.id, { end: () => ended.push('third') });
      second();
      second();
      first();
      expect(vi.getTimerCount()).toBe(others + 1);
      await vi.advanceTimersByTimeAsync(30_000);
      // The session is still there: what it holds stays open, and so does the check.
      expect(ended).toEqual([]);
      expect(vi.getTimerCount()).toBe(others + 1);
      third();
      await vi.advanceTimersByTimeAsync(30_000);
      expect(vi.getTimerCount()).toBe(others);
      // Held again after the sweep: tied to the session as before, and ended with it.
      session.holdOpen(created.id, { end: (seenBy) => ended.push(`again: ${seenBy}`) });
      expect(vi.getTimerCount()).toBe(others + 1);
      await session.destroySession(created.id, created.record);
      expect(ended).toEqual(['again: this_process']);
    } finally {
      vi.useRealTimers();
    }
  });
});

describe('a token update', () => {
  it('is written only while the refresh lock is still its owner\'s', async () => {
    const session = await deploy(A);
    const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    const renewed = { ...secrets, accessToken: 'at-new' };
    expect(await writeTokens(session, created, renewed, 'owner')).toBeNull();
    await session.getStore().set(session.refreshLockKey(created.id), 'successor', { ttlMs: 60_000, onlyIfAbsent: true });
    expect(await writeTokens(session, created, renewed, 'owner')).toBeNull();
    expect((await session.readSession(created.id))?.secrets.accessToken).toBe('at-123');
    expect((await writeTokens(session, created, renewed, 'successor'))?.secrets.accessToken).toBe('at-new');
    expect((await session.readSession(created.id))?.secrets.accessToken).toBe('at-new');
  });
});

describe('a session whose tokens are judged spent', () => {
  it('ends, with an "expired" marker, while its record is the one judged', async () => {
    const session = await deploy(A);
    const created = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    const ended = await session.expireSessionIfUnchanged(created.id, created.record);
    expect(ended?.code).toBe('session_expired');
    expect(await session.getStore().get(session.sessionKey(created.id))).toBeNull();
    expect(await session.loadSession(created.id)).toEqual({ session: null, miss: 'ended_expired' });
  });

  it('stays, and leaves no marker, when another instance renewed it after it was read (a late refusal of a replaced refresh token)', async () => {
    const session = await deploy(A);
    const read = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    await session.getStore().set(session.refreshLockKey(read.id), 'successor', { ttlMs: 60_000, onlyIfAbsent: true });
    const renewed = await writeTokens(session, read, { ...secrets, accessToken: 'at-new', refreshToken: 'rt-new' }, 'successor');
    expect(renewed).not.toBeNull();

    expect(await session.expireSessionIfUnchanged(read.id, read.record)).toBeNull();
    expect(await session.getStore().get(session.endedMarkerKey(read.id))).toBeNull();
    const after = await session.loadSession(read.id);
    expect(after.session?.secrets).toMatchObject({ accessToken: 'at-new', refreshToken: 'rt-new' });
    // The renewed record still ends when its own tokens are judged spent.
    expect((await session.expireSessionIfUnchanged(read.id, renewed!.record))?.code).toBe('session_expired');
    expect(await session.loadSession(read.id)).toEqual({ session: null, miss: 'ended_expired' });
  });

  it('renewed between the read of its record and the delete: stays, and the marker set meanwhile goes again', async () => {
    const session = await deploy(A);
    const read = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    await session.getStore().set(session.refreshLockKey(read.id), 'successor', { ttlMs: 60_000, onlyIfAbsent: true });
    const store = session.getStore();
    const deleteIfEquals = store.delIfEquals.bind(store);
    // The other instance's write lands exactly between the compare and the delete.
    store.delIfEquals = async (key, expected) => {
      if (key === session.sessionKey(read.id)) await writeTokens(session, read, { ...secrets, accessToken: 'at-new' }, 'successor');
      return deleteIfEquals(key, expected);
    };
    expect(await session.expireSessionIfUnchanged(read.id, read.record)).toBeNull();
    expect(await store.get(session.endedMarkerKey(read.id))).toBeNull();
    expect((await session.readSession(read.id))?.secrets.accessToken).toBe('at-new');
  });

  it('ended by another instance between its marker and its delete: the marker stays, so every tab hears why', async () => {
    const session = await deploy(A);
    const read = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    const store = session.getStore();
    const deleteIfEquals = store.delIfEquals.bind(store);
    // Two instances judged the same spent tokens: this one's marker went first, the other's delete did.
    store.delIfEquals = async (key, expected) => {
      if (key === session.sessionKey(read.id)) await deleteIfEquals(key, expected);
      return deleteIfEquals(key, expected);
    };
    expect((await session.expireSessionIfUnchanged(read.id, read.record))?.code).toBe('session_expired');
    expect(await session.loadSession(read.id)).toEqual({ session: null, miss: 'ended_expired' });
  });

  it('replaced by a new login between its marker and its delete: answers "replaced", which leaves the new cookie alone', async () => {
    const session = await deploy(A);
    const read = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    const store = session.getStore();
    const deleteIfEquals = store.delIfEquals.bind(store);
    let replacedMeanwhile = false;
    // The login's marker overwrites this one's just before this one's delete lands (the login's comes after).
    store.delIfEquals = async (key, expected) => {
      if (key === session.sessionKey(read.id) && !replacedMeanwhile) {
        replacedMeanwhile = true;
        await store.set(session.endedMarkerKey(read.id), 'replaced', { ttlMs: session.REPLACED_SESSION_MARKER_MS });
      }
      return deleteIfEquals(key, expected);
    };
    const ended = await session.expireSessionIfUnchanged(read.id, read.record);
    expect(replacedMeanwhile).toBe(true);
    expect(ended?.code).toBe('session_replaced');
    expect(ended?.clearSession).toBe(false);
    expect(await session.loadSession(read.id)).toEqual({ session: null, miss: 'replaced' });
  });

  it('already ended by a new login: answers "replaced" and keeps that marker', async () => {
    const session = await deploy(A);
    const old = await session.createSession({ sub: 'alice', idpSid: undefined, secrets, accessTokenExpiresAt: null, userAgent: undefined });
    await session.replaceSession(old);
    expect((await session.expireSessionIfUnchanged(old.id, old.record))?.code).toBe('session_replaced');
    expect(await session.loadSession(old.id)).toEqual({ session: null, miss: 'replaced' });
  });
});
describe('a session replaced by a new login', () => {
  it('stops at once, unlisted; for a short while its cookie reads as "replaced", then as gone', async () => {
    const session = await deploy(A);
    const old = await session.createSession({ sub: 'alice', idpSid: 'sid-9', secrets, accessTokenExpiresAt: null, userAgent: undefined });
    const cookie = (await session.sessionCookieHeader(old.id)).split(';')[0]!;
    await session.replaceSession(old);
    expect(await session.getStore().get(session.sessionKey(old.id))).toBeNull();
    expect(await session.sessionFromCookieHeader(cookie)).toEqual({ session: null, stale: false, replaced: true });
    expect(await session.getStore().indexMembers(session.userSessionsKey('alice'), Date.now())).toEqual([]);
    expect(await session.getStore().indexMembers(session.idpSessionKey('sid-9'), Date.now())).toEqual([]);
    // A late token write-back (a refresh in flight, still holding its lock) cannot bring it back.
    await session.getStore().set(session.refreshLockKey(old.id), 'refresh-owner', { ttlMs: 60_000 });
    expect(await writeTokens(session, old, secrets, 'refresh-owner')).toBeNull();

    // The memory store expires keys by Date.now(): past the marker's lifetime the cookie is just stale.
    vi.useFakeTimers({ now: Date.now() + session.REPLACED_SESSION_MARKER_MS + 1, toFake: ['Date'] });
    try {
      expect(await session.sessionFromCookieHeader(cookie)).toEqual({ session: null, stale: true, replaced: false });
    } finally {
      vi.useRealTimers();
    }
  });
});
