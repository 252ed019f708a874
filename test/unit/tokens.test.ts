// The refresh path against faults of the store at the worst moment. The IdP here is a stand-in on
// loopback that answers every refresh grant and records revocations: what is under test is what
// Gatehouse does when the store loses an answer after the write landed, which neither real Redis
// nor the dev IdP can be made to do at that moment (test/integration covers the real parts).
import { createServer, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';

let idp: Server;
let issuer: string;
const revoked: string[] = [];
let tokenGrants = 0;
/** `failing`: the token endpoint answers 503 with Retry-After: 30; `stalling`: it answers nothing until told. */
let idpMode: 'answering' | 'failing' | 'stalling' = 'answering';
const stalled: ServerResponse[] = [];
/** When set, the access token every grant answers with (IdPs that keep a still-valid token on refresh). */
let fixedAccessToken: string | undefined;
/** Endpoints the discovery document says otherwise than the defaults (a misconfigured or hostile IdP). */
let discoveryOverrides: Record<string, string> = {};
/** When set, the discovery document answers 503 (an IdP outage, or its CDN's). */
let discoveryFailing = false;
/** The token_type every grant answers with. */
let tokenType = 'Bearer';
/** What the token endpoint says its access tokens live: under the 30 s skew, they are due at once. */
let accessTokenLifetimeSec = 3600;

function answerStalled(): void {
  for (const response of stalled.splice(0)) response.writeHead(503).end();
}

/** Answers the stalled grants as the IdP would have: rotated tokens, after all. */
function grantStalled(): void {
  for (const response of stalled.splice(0)) response.end(JSON.stringify({ access_token: 'at-late', refresh_token: 'rt-late', token_type: 'Bearer', expires_in: 3600 }));
}

beforeAll(async () => {
  idp = createServer((request, response) => {
    let body = '';
    request.on('data', (chunk: Buffer) => (body += chunk));
    request.on('end', () => {
      response.setHeader('content-type', 'application/json');
      if (request.url === '/.well-known/openid-configuration') {
        if (discoveryFailing) return void response.writeHead(503).end('{}');
        response.end(JSON.stringify({ issuer, token_endpoint: `${issuer}/token`, revocation_endpoint: `${issuer}/revoke`, jwks_uri: `${issuer}/jwks`, authorization_endpoint: `${issuer}/auth`, ...discoveryOverrides }));
      } else if (request.url === '/token') {
        tokenGrants += 1;
        if (idpMode === 'stalling') {
          stalled.push(response);
          return;
        }
        if (idpMode === 'failing') {
          response.statusCode = 503;
          response.setHeader('retry-after', '30');
          response.end('{"error":"temporarily_unavailable"}');
          return;
        }
        response.end(JSON.stringify({ access_token: fixedAccessToken ?? `at-${tokenGrants}`, refresh_token: 'rt-2', token_type: tokenType, expires_in: accessTokenLifetimeSec, issued_token_type: 'urn:ietf:params:oauth:token-type:access_token' }));
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

afterAll(() => {
  answerStalled();
  return new Promise<void>((resolve) => idp.close(() => resolve()));
});

async function deploy(extraEnv: Record<string, string> = {}) {
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
    ...extraEnv,
  };
  for (const [name, value] of Object.entries(env)) vi.stubEnv(name, value);
  const session = await import('../../lib/session.ts');
  const tokens = await import('../../lib/tokens.ts');
  /** A session of alice's (by default) whose access token runs out `expiresInMs` from now (already, by default), with refresh token rt-1. */
  const signIn = ({ sub = 'alice', idpSid, accessToken = 'at-0', refreshToken = 'rt-1', expiresInMs = -1_000 }: { sub?: string; idpSid?: string; accessToken?: string; refreshToken?: string; expiresInMs?: number } = {}) =>
    session.createSession({ sub, idpSid, secrets: { accessToken, refreshToken, idToken: undefined, claims: {} }, accessTokenExpiresAt: Date.now() + expiresInMs, userAgent: 'ua' });
  return { session, tokens, signIn };
}

describe('a write-back that landed but whose answer was lost', () => {
  it('is kept when another instance holds the lock by the time it is retried: the rotated refresh token is neither lost nor revoked', async () => {
    const { session, tokens, signIn } = await deploy();
    const store = session.getStore();
    const replaceIfHeld = store.replaceIfHeld.bind(store);
    let lost = false;
    // The first write-back lands; its answer is lost (a timeout) while the lease runs out and
    // another instance (a resource-token grant of the same session) takes the lock for a moment.
    store.replaceIfHeld = async (key, value, lockKey, owner) => {
      if (lost) return replaceIfHeld(key, value, lockKey, owner);
      lost = true;
      expect(await replaceIfHeld(key, value, lockKey, owner)).toBe(true);
      await store.take(lockKey);
      expect(await store.set(lockKey, 'another-instance', { ttlMs: 25_000, onlyIfAbsent: true })).toBe(true);
      setTimeout(() => void store.delIfEquals(lockKey, 'another-instance'), 300);
      throw new Error('Command timed out');
    };
    const created = await signIn({ accessToken: 'at-1' });
    revoked.length = 0;
    const outcome = await tokens.getAccessToken(created).then(
      (result) => ({ token: result.token }),
      (error: { code?: string }) => ({ error: error.code }),
    );
    expect(lost).toBe(true);
    expect([{ token: `at-${tokenGrants}` }, { error: 'store_unavailable' }, { error: 'idp_unavailable' }]).toContainEqual(outcome);
    expect(revoked).toEqual([]);
    expect((await session.readSession(created.id))?.secrets.refreshToken).toBe('rt-2');
  });
});

describe('"sign out everywhere else"', () => {
  it('ends only the user’s own sessions: an entry of their list whose record turns out to be another user’s (rewritten in the store between the list and the end) is left alone', async () => {
    const deployed = await deploy();
    const { session } = deployed;
    const alice = await deployed.signIn({ sub: 'alice', accessToken: 'at-alice', expiresInMs: 3_600_000 });
    const bob = await deployed.signIn({ sub: 'bob', accessToken: 'at-bob', refreshToken: 'rt-bob', expiresInMs: 3_600_000 });
    const store = session.getStore();
    // Bob's session id in Alice's list; read as a newer release's record while the list is made, as Bob's own after.
    await store.indexAdd(session.userSessionsKey('alice'), bob.id, Date.now() + 3_600_000, 3_600_000);
    const get = store.get.bind(store);
    let listing = true;
    store.get = async (key) => (listing && key === session.sessionKey(bob.id) ? ((listing = false), JSON.stringify({ v: 99 })) : get(key));
    revoked.length = 0;
    const cookie = (await session.sessionCookieHeader(alice.id)).split(';')[0]!;
    const { endOtherSessions } = await import('../../lib/auth.ts');
    const answer = await endOtherSessions(new Request('http://localhost:3999/api/auth/sessions', { method: 'DELETE', headers: { cookie, 'x-csrf': '1', origin: 'http://localhost:3999', 'sec-fetch-site': 'same-origin' } }));
    expect(await answer.json()).toEqual({ ended: 0 });
    expect(listing).toBe(false);
    expect((await session.readSession(bob.id))?.secrets.accessToken).toBe('at-bob');
    expect(revoked).toEqual([]);
  });
});

describe('the client’s own tokens and exchanged ones', () => {
  afterEach(() => {
    tokenType = 'Bearer';
  });

  it('are taken only as bearer tokens: one the IdP binds (DPoP) would be presented without its proof, and refused on every call', async () => {
    await deploy();
    const oidc = await import('../../lib/oidc.ts');
    await expect(oidc.clientCredentialsToken({})).resolves.toMatchObject({ accessToken: expect.any(String) });
    await expect(oidc.exchangeToken('subject', { audience: 'urn:api' })).resolves.toMatchObject({ accessToken: expect.any(String) });
    tokenType = 'DPoP';
    await expect(oidc.clientCredentialsToken({})).rejects.toMatchObject({ kind: 'rejected', message: expect.stringContaining('not a bearer one') });
    await expect(oidc.exchangeToken('subject', { audience: 'urn:api' })).rejects.toMatchObject({ kind: 'rejected', message: expect.stringContaining('not a bearer one') });
  });
});

describe('signing out while the IdP’s discovery document cannot be fetched again', () => {
  afterEach(() => {
    vi.useRealTimers();
    discoveryFailing = false;
    discoveryOverrides = {};
  });

  it('still sends the browser to the end_session_endpoint last read, with its hint; without one ever read, nowhere', async () => {
    discoveryOverrides = { end_session_endpoint: `${issuer}/session/end` };
    await deploy();
    const oidc = await import('../../lib/oidc.ts');
    expect((await oidc.buildEndSessionUrl('id-token'))?.pathname).toBe('/session/end');
    // An hour on, the document is due to be fetched again, and the IdP's discovery is down.
    vi.useFakeTimers({ toFake: ['Date'] });
    vi.setSystemTime(Date.now() + 61 * 60_000);
    discoveryFailing = true;
    const url = await oidc.buildEndSessionUrl('id-token');
    expect([url?.origin, url?.pathname, url?.searchParams.get('id_token_hint'), url?.searchParams.get('client_id')]).toEqual([issuer, '/session/end', 'id-token', 'gatehouse']);
    await deploy();
    expect(await (await import('../../lib/oidc.ts')).buildEndSessionUrl('id-token')).toBeNull();
  });
});

describe('an IdP whose discovery document names a cleartext token endpoint off this machine', () => {
  afterEach(() => {
    discoveryOverrides = {};
  });

  it('gets no refresh token sent there: the refresh is refused as an IdP error (502), the session kept', async () => {
    // Where a loopback issuer lets oauth4webapi call http at all; 192.0.2.1 (TEST-NET-1) answers nobody.
    discoveryOverrides = { token_endpoint: 'http://192.0.2.1/token' };
    const { session, tokens, signIn } = await deploy();
    const created = await signIn({ accessToken: 'at-1' });
    const outcome = await tokens.getAccessToken(created).then(
      () => ({}),
      (error: { code?: string; status?: number }) => ({ code: error.code, status: error.status }),
    );
    expect(outcome).toEqual({ code: 'idp_error', status: 502 });
    expect((await session.readSession(created.id))?.secrets.refreshToken).toBe('rt-1');
  });

  it('makes /api/health say the IdP is misconfigured (503), not ok', async () => {
    discoveryOverrides = { revocation_endpoint: 'http://192.0.2.1/revoke' };
    await deploy();
    const { checkHealth } = await import('../../lib/auth.ts');
    const answer = await checkHealth(new Request('http://localhost:3999/api/health'));
    expect([answer.status, await answer.json()]).toEqual([503, { error: 'unhealthy', message: 'Not ready: idp misconfigured.', store: 'ok', idp: 'misconfigured' }]);
    // Readiness and liveness ask no IdP: sessions already signed in still work.
    for (const probe of ['ready', 'live']) expect((await checkHealth(new Request(`http://localhost:3999/api/health?probe=${probe}`))).status, probe).toBe(200);
    discoveryOverrides = {};
    await deploy();
    const { checkHealth: healthy } = await import('../../lib/auth.ts');
    expect((await healthy(new Request('http://localhost:3999/api/health'))).status).toBe(200);
  });
});

describe('an IdP whose access tokens live no longer than TOKEN_REFRESH_SKEW', () => {
  afterEach(() => {
    accessTokenLifetimeSec = 3600;
    vi.doUnmock('../../lib/log.ts');
  });

  it('is named in one warning per process, which says what to change: every call for such a token refreshes', async () => {
    const logged: Array<{ level: string; event: string; fields?: Record<string, unknown> }> = [];
    vi.doMock('../../lib/log.ts', async (importOriginal) => ({
      ...(await importOriginal<typeof import('../../lib/log.ts')>()),
      log: (level: string, event: string, fields?: Record<string, unknown>) => void logged.push({ level, event, fields }),
    }));
    const { tokens, signIn } = await deploy();
    const due = (sub: string) => signIn({ sub });
    await tokens.getAccessToken(await due('long-lived'));
    expect(logged.filter(({ event }) => event === 'token.lifetime_under_skew')).toEqual([]);
    accessTokenLifetimeSec = 30; // the default skew
    for (const sub of ['alice', 'bob', 'carol']) await tokens.getAccessToken(await due(sub));
    const warnings = logged.filter(({ event }) => event === 'token.lifetime_under_skew');
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatchObject({ level: 'warn', fields: { lifetimeSec: 30, skewSec: 30, fix: expect.stringContaining('TOKEN_REFRESH_SKEW') } });
  });
});

describe('a call whose token the upstream refused', () => {
  it('gets a new token even when it joins a refresh begun for an older one that finds the refused token stored by another instance', async () => {
    const { session, tokens, signIn } = await deploy();
    const store = session.getStore();
    const stale = await signIn();
    const lockKey = session.refreshLockKey(stale.id);
    // Another instance holds the lock while this one's ordinary refresh (for at-0) waits for it...
    expect(await store.set(lockKey, 'another-instance', { ttlMs: 25_000, onlyIfAbsent: true })).toBe(true);
    const ordinary = tokens.getAccessToken(stale);
    // ...and stores at-other, which a call of this process sends and the upstream refuses.
    const renewed = await session.writeSessionTokens(await session.sealSessionTokens(stale, { ...stale.secrets, accessToken: 'at-other', refreshToken: 'rt-other' }, Date.now() + 3_600_000), 'another-instance');
    const grantsBefore = tokenGrants;
    const forced = tokens.getAccessToken(renewed!, { rejectedToken: 'at-other' });
    expect(await store.delIfEquals(lockKey, 'another-instance')).toBe(true);
    expect((await ordinary).token).toBe('at-other');
    const answer = await forced;
    expect(answer.token).not.toBe('at-other');
    expect(answer).toMatchObject({ token: `at-${tokenGrants}`, refreshed: true });
    expect(tokenGrants - grantsBefore).toBe(1);
  });

  it('costs one grant even when the IdP answers it with the very token refused (one that keeps a valid token on refresh)', async () => {
    const { tokens, signIn } = await deploy();
    fixedAccessToken = 'at-kept';
    try {
      const held = await signIn({ accessToken: 'at-kept', expiresInMs: 3_600_000 });
      const grantsBefore = tokenGrants;
      expect(await tokens.getAccessToken(held, { rejectedToken: 'at-kept' })).toMatchObject({ token: 'at-kept', refreshed: true });
      expect(tokenGrants - grantsBefore).toBe(1);
    } finally {
      fixedAccessToken = undefined;
    }
  });
});

describe('a store that answers reads from a lagging replica (Upstash read regions)', () => {
  /**
   * A due session's refresh, begun while another instance holds its lock, with `get` of one key
   * answered by a replica that still holds `replicaValue` (a stand-in: the memory store has one
   * copy, and no local Redis lags on demand); `meanwhile` runs, then the other instance lets go.
   */
  async function refreshBehind(lagging: (deployed: Awaited<ReturnType<typeof deploy>>, stale: { id: string }) => Promise<{ key: string; replicaValue: string | null }>, meanwhile: (deployed: Awaited<ReturnType<typeof deploy>>, stale: Awaited<ReturnType<Awaited<ReturnType<typeof deploy>>['signIn']>>) => Promise<void>) {
    const deployed = await deploy();
    const store = deployed.session.getStore();
    const stale = await deployed.signIn();
    const lockKey = deployed.session.refreshLockKey(stale.id);
    const { key, replicaValue } = await lagging(deployed, stale);
    const read = store.get.bind(store);
    store.get = async (k) => (k === key ? replicaValue : read(k));
    store.getLatest = read;
    expect(await store.set(lockKey, 'another-instance', { ttlMs: 25_000, onlyIfAbsent: true })).toBe(true);
    const grantsBefore = tokenGrants;
    const outcome = deployed.tokens.getAccessToken(stale).then(
      (answer) => answer.token,
      (error: { code?: string }) => error.code,
    );
    await meanwhile(deployed, stale);
    expect(await store.delIfEquals(lockKey, 'another-instance')).toBe(true);
    return { outcome: await outcome, grants: tokenGrants - grantsBefore };
  }

  it('never lets the lock holder refresh with a refresh token another instance has rotated: it reads the primary', async () => {
    const result = await refreshBehind(
      // The replica keeps showing the record as it was.
      async ({ session }, stale) => ({ key: session.sessionKey(stale.id), replicaValue: await session.getStore().get(session.sessionKey(stale.id)) }),
      // Another instance refreshes under the lock (rt-1 spent at the IdP) and stores rt-2.
      async ({ session }, stale) => {
        await session.writeSessionTokens(await session.sealSessionTokens(stale, { ...stale.secrets, accessToken: 'at-other', refreshToken: 'rt-2' }, Date.now() + 3_600_000), 'another-instance');
      },
    );
    expect(result).toEqual({ outcome: 'at-other', grants: 0 });
  });

  it('tells a call whose session a new login replaced meanwhile that it was replaced, as the primary says, even while the replica lacks the marker', async () => {
    const result = await refreshBehind(
      // The replica has not seen the marker yet, while the record is read from the primary.
      async ({ session }, stale) => ({ key: session.endedMarkerKey(stale.id), replicaValue: null }),
      async ({ session }, stale) => {
        await session.replaceSession(stale);
      },
    );
    // `session_replaced` leaves the browser's cookie (by now the new session's) alone; `session_expired` would clear it.
    expect(result).toEqual({ outcome: 'session_replaced', grants: 0 });
  });
});

describe('a rotated refresh token that cannot be stored', () => {
  afterEach(() => {
    idpMode = 'answering';
    answerStalled();
  });

  /** A due session of alice's whose refresh sits at the IdP while `meanwhile` runs, then gets rotated tokens. */
  async function refreshOutlivedBy(meanwhile: (deployed: Awaited<ReturnType<typeof deploy>>, created: { id: string }) => Promise<void>) {
    const deployed = await deploy();
    idpMode = 'stalling';
    const created = await deployed.signIn({ idpSid: 'idp-1', accessToken: 'at-1' });
    revoked.length = 0;
    const outcome = deployed.tokens.getAccessToken(created).then(
      (result) => ({ token: result.token }),
      (error: { code?: string }) => ({ error: error.code }),
    );
    await vi.waitFor(() => expect(stalled).toHaveLength(1));
    await meanwhile(deployed, created);
    grantStalled();
    return { ...deployed, created, outcome: await outcome };
  }

  it('is given back when its session ended meanwhile (a logout)', async () => {
    const { outcome } = await refreshOutlivedBy(async ({ session }, created) => {
      await session.destroySession(created.id);
    });
    expect(outcome).toEqual({ error: 'session_expired' });
    expect(revoked).toEqual(['rt-late']);
  });

  it('is not given back when its session was replaced keeping the grant for the new one (a re-login in the same IdP session may continue it)', async () => {
    let successor: { id: string } | undefined;
    const { outcome, session } = await refreshOutlivedBy(async (deployed, created) => {
      successor = await deployed.signIn({ idpSid: 'idp-1', accessToken: 'at-new', refreshToken: 'rt-new', expiresInMs: 3_600_000 });
      await deployed.session.replaceSession((await deployed.session.readSession(created.id))!, true);
    });
    expect(outcome).toEqual({ error: 'session_replaced' });
    expect(revoked).toEqual([]);
    expect((await session.readSession(successor!.id))?.secrets.refreshToken).toBe('rt-new');
  });

  it('is given back when its session was replaced or ended without keeping the grant, whatever other sessions the user has (with or without an IdP session id)', async () => {
    for (const [end, otherIdpSid] of [['replaced', 'idp-2'], ['replaced', undefined], ['logout', undefined], ['logout', 'idp-1']] as const) {
      const { outcome } = await refreshOutlivedBy(async (deployed, created) => {
        // Another device's session of the user, which may or may not name an IdP session.
        await deployed.signIn({ ...(otherIdpSid ? { idpSid: otherIdpSid } : {}), accessToken: 'at-other', refreshToken: 'rt-other', expiresInMs: 3_600_000 });
        if (end === 'replaced') await deployed.session.replaceSession((await deployed.session.readSession(created.id))!);
        else await deployed.session.destroySession(created.id);
      });
      expect(outcome, `${end}, other session's sid ${otherIdpSid}`).toEqual({ error: end === 'replaced' ? 'session_replaced' : 'session_expired' });
      expect(revoked, `${end}, other session's sid ${otherIdpSid}`).toEqual(['rt-late']);
    }
  });

  it('"sign out everywhere else" from a session of the same IdP session keeps the grant they share, the refresh answer included; from another IdP session, both tokens go back', async () => {
    for (const [survivorIdpSid, expected] of [['idp-1', []], ['idp-2', ['rt-1', 'rt-late']]] as const) {
      const { outcome } = await refreshOutlivedBy(async (deployed) => {
        const survivor = await deployed.signIn({ idpSid: survivorIdpSid, accessToken: 'at-new', refreshToken: 'rt-new', expiresInMs: 3_600_000 });
        const cookie = (await deployed.session.sessionCookieHeader(survivor.id)).split(';')[0]!;
        const { endOtherSessions } = await import('../../lib/auth.ts');
        const answer = await endOtherSessions(new Request('http://localhost:3999/api/auth/sessions', { method: 'DELETE', headers: { cookie, 'x-csrf': '1', origin: 'http://localhost:3999', 'sec-fetch-site': 'same-origin' } }));
        expect(await answer.json()).toEqual({ ended: 1 });
      });
      expect(outcome, survivorIdpSid).toEqual({ error: 'session_expired' });
      expect([...revoked].sort(), survivorIdpSid).toEqual(expected);
    }
  });

  it('is not given back while its session lives on (the lease ran out and another instance holds the lock): the grant is the session’s own', async () => {
    const { outcome, session, created } = await refreshOutlivedBy(async ({ session: deployedSession }, created) => {
      const store = deployedSession.getStore();
      const lockKey = deployedSession.refreshLockKey(created.id);
      expect(await store.take(lockKey)).not.toBeNull();
      expect(await store.set(lockKey, 'another-instance', { ttlMs: 25_000, onlyIfAbsent: true })).toBe(true);
    });
    expect(outcome).toEqual({ error: 'idp_unavailable' });
    expect(revoked).toEqual([]);
    expect((await session.readSession(created.id))?.secrets.refreshToken).toBe('rt-1');
  });
});

describe('a refresh that meets an IdP outage while the token held still has a while to run', () => {
  const pauses = () => (globalThis as unknown as Record<symbol, Map<string, unknown>>)[Symbol.for('gatehouse.shared-state')]!.get('refresh-pauses') as { byKey: Map<string, { until: number; token: string; refused: boolean }>; sweptAt: number };

  async function deployWithOutage(mode: 'failing' | 'stalling', env: Record<string, string> = {}) {
    const deployed = await deploy(env);
    idpMode = mode;
    // Due under the 30 s skew, with `expiresInMs` to run.
    const due = (accessToken: string, expiresInMs: number) =>
      deployed.signIn({ accessToken, expiresInMs });
    return { ...deployed, due };
  }

  afterEach(() => {
    idpMode = 'answering';
    accessTokenLifetimeSec = 3600;
    answerStalled();
  });

  it("answers that token, and leaves its refresh alone for the IdP's Retry-After; a token with 5 s or less to run gets the outage", async () => {
    const { tokens, due } = await deployWithOutage('failing');
    const held = await due('at-held', 20_000);
    const grantsBefore = tokenGrants;
    expect(await tokens.getAccessToken(held)).toMatchObject({ token: 'at-held', refreshed: false });
    expect(await tokens.getAccessToken(held)).toMatchObject({ token: 'at-held', refreshed: false });
    expect(tokenGrants - grantsBefore).toBe(1);
    const [pause] = [...pauses().byKey.values()];
    expect(pause).toMatchObject({ token: 'at-held', refused: false });
    expect(pause!.until - Date.now()).toBeGreaterThan(25_000);
    // The pause is that token's: once the session holds another due token, the IdP is asked again.
    idpMode = 'answering';
    accessTokenLifetimeSec = 20;
    const renewed = await tokens.getAccessToken(held, { rejectedToken: 'at-held' });
    expect(renewed).toMatchObject({ token: `at-${tokenGrants}`, refreshed: true });
    idpMode = 'failing';
    const grantsBeforeRenewed = tokenGrants;
    expect(await tokens.getAccessToken(renewed.session)).toMatchObject({ token: renewed.token, refreshed: false });
    expect(tokenGrants - grantsBeforeRenewed).toBe(1);
    await expect(tokens.getAccessToken(await due('at-spent', 4_000))).rejects.toMatchObject({ code: 'idp_unavailable', retryAfterSec: 30 });
  });

  it('waits for a stalled refresh no longer than the token held would still be worth sending', async () => {
    const { tokens, due } = await deployWithOutage('stalling', { REFRESH_WAIT_MS: '20000' });
    const held = await due('at-held', 6_500);
    const started = Date.now();
    expect(await tokens.getAccessToken(held)).toMatchObject({ token: 'at-held', refreshed: false });
    // About 1 s (6.5 s less the 5 s margin and time to check the store), not REFRESH_WAIT_MS.
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it('does not wait again for a refresh some call has already waited out', async () => {
    const { tokens, due } = await deployWithOutage('stalling', { REFRESH_WAIT_MS: '1500' });
    const held = await due('at-held', 20_000);
    expect(await tokens.getAccessToken(held)).toMatchObject({ token: 'at-held', refreshed: false });
    // Not paused now: the next call finds the same refresh still at the IdP, and goes on at once.
    pauses().byKey.clear();
    const started = Date.now();
    expect(await tokens.getAccessToken(held)).toMatchObject({ token: 'at-held', refreshed: false });
    expect(Date.now() - started).toBeLessThan(750);
    expect(stalled).toHaveLength(1);
  });

  it('never sends a token whose session ended while the call waited', async () => {
    const { session, tokens, due } = await deployWithOutage('stalling');
    const held = await due('at-held', 20_000);
    const pending = tokens.getAccessToken(held);
    await vi.waitFor(() => expect(stalled).toHaveLength(1));
    await session.destroySession(held.id, held.record);
    await expect(pending).rejects.toMatchObject({ code: 'idp_unavailable' });
  });

  it('never answers a token the upstream refused: not to the forced refresh, not to a call that joined it, not to later calls', async () => {
    const { tokens, due } = await deployWithOutage('failing');
    const held = await due('at-refused', 20_000);
    const [forced, joined] = await Promise.allSettled([tokens.getAccessToken(held, { rejectedToken: 'at-refused' }), tokens.getAccessToken(held)]);
    expect(forced).toMatchObject({ status: 'rejected', reason: { code: 'idp_unavailable' } });
    expect(joined).toMatchObject({ status: 'rejected', reason: { code: 'idp_unavailable' } });
    await expect(tokens.getAccessToken(held)).rejects.toMatchObject({ code: 'idp_unavailable' });
  });

  it('stops going on with a paused token as soon as the upstream refuses it, while its forced refresh is still at the IdP', async () => {
    const { tokens, due } = await deployWithOutage('failing', { REFRESH_WAIT_MS: '1000' });
    const held = await due('at-paused', 20_000);
    expect(await tokens.getAccessToken(held)).toMatchObject({ token: 'at-paused', refreshed: false });
    idpMode = 'stalling';
    const forced = tokens.getAccessToken(held, { rejectedToken: 'at-paused' }).then(
      ({ token }) => token,
      (error: { code?: string }) => error.code,
    );
    await vi.waitFor(() => expect(stalled).toHaveLength(1));
    await expect(tokens.getAccessToken(held)).rejects.toMatchObject({ code: 'idp_unavailable' });
    expect(await forced).toBe('idp_unavailable');
  });

  it('keeps at most 10,000 pauses a process: expired ones are swept, and none is added while still full', async () => {
    const { tokens, due } = await deployWithOutage('failing');
    for (let i = pauses().byKey.size; i < 10_000; i += 1) pauses().byKey.set(`other-${i}`, { until: Date.now() + 60_000, token: 'x', refused: false });
    const unpaused = await due('at-unpaused', 20_000);
    const beforeFull = tokenGrants;
    expect(await tokens.getAccessToken(unpaused)).toMatchObject({ token: 'at-unpaused' });
    expect(await tokens.getAccessToken(unpaused)).toMatchObject({ token: 'at-unpaused' });
    expect(tokenGrants - beforeFull).toBe(2);
    expect(pauses().byKey.size).toBe(10_000);
    for (const pause of pauses().byKey.values()) pause.until = Date.now() - 1;
    // The sweep runs at most once a second: as if the last one were long ago.
    pauses().sweptAt = 0;
    const beforeSwept = tokenGrants;
    expect(await tokens.getAccessToken(unpaused)).toMatchObject({ token: 'at-unpaused' });
    expect(await tokens.getAccessToken(unpaused)).toMatchObject({ token: 'at-unpaused' });
    expect(tokenGrants - beforeSwept).toBe(1);
    expect(pauses().byKey.size).toBe(1);

    // Full again: a refused token still takes a place, so it is never used meanwhile.
    for (let i = pauses().byKey.size; i < 10_000; i += 1) pauses().byKey.set(`more-${i}`, { until: Date.now() + 60_000, token: 'x', refused: false });
    const refused = await due('at-refused', 20_000);
    await expect(tokens.getAccessToken(refused, { rejectedToken: 'at-refused' })).rejects.toMatchObject({ code: 'idp_unavailable' });
    expect(pauses().byKey.size).toBe(10_000);
    expect([...pauses().byKey.values()].filter((pause) => pause.refused)).toEqual([expect.objectContaining({ token: 'at-refused' })]);
    await expect(tokens.getAccessToken(refused)).rejects.toMatchObject({ code: 'idp_unavailable' });
  });
});
