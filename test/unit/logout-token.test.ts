import fc from 'fast-check';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { SignJWT, createLocalJWKSet, createRemoteJWKSet, errors as joseErrors, exportJWK, generateKeyPair, type CryptoKey, type JWK, type JWTVerifyGetKey } from 'jose';
import { beforeAll, describe, expect, it, vi } from 'vitest';
import { BACKCHANNEL_LOGOUT_EVENT as EVENT, LogoutTokenRejected, checkLogoutToken, type LogoutTokenExpectations } from '../../lib/logout-token.ts';

/**
 * Property: for generated logout tokens (a valid token's claims and header, each member kept,
 * dropped, or swapped for a wrong value or type), `checkLogoutToken` accepts exactly the tokens
 * that `specAccepts` below does, and refuses every other one with its own error. `specAccepts` is
 * written from OIDC Back-Channel Logout 1.0 sections 2.4 and 2.6 (plus Gatehouse's stated choices
 * on `typ`, `aud` and the `exp` range), independently of the implementation.
 */

const ISSUER = 'https://idp.example.com';
const CLIENT_ID = 'gatehouse-client';
const NOW = 1_800_000_000;
const MAX_AGE = 300;
const TOLERANCE = 60;
const EXPECTED: LogoutTokenExpectations = {
  issuer: ISSUER,
  clientId: CLIENT_ID,
  algorithms: ['ES256', 'RS256'],
  maxAgeSec: MAX_AGE,
  clockToleranceSec: TOLERANCE,
  currentDate: new Date(NOW * 1000),
};

/** A member that is left out of the token altogether. */
const ABSENT = Symbol('absent');
type Maybe<T> = T | typeof ABSENT;

const isJsonObject = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null && !Array.isArray(value);
const isNumber = (value: unknown): value is number => typeof value === 'number' && Number.isFinite(value);
const isNonEmptyString = (value: unknown): value is string => typeof value === 'string' && value.length > 0;

/** The spec oracle: what an RP following sections 2.4 and 2.6 to the letter accepts. */
function specAccepts(header: Record<string, unknown>, claims: Record<string, unknown>, trustedSigner: boolean): boolean {
  if (!trustedSigner) return false;
  // Explicit typing (section 4.1): logout+jwt; IdPs that predate it send JWT or nothing.
  if ('typ' in header) {
    if (typeof header.typ !== 'string') return false;
    const type = header.typ.toLowerCase().replace(/^application\//, '');
    if (type !== 'logout+jwt' && type !== 'jwt') return false;
  }
  if (claims.iss !== ISSUER) return false;
  // OIDC Core 3.1.3.7: the client must be an audience, and no other (untrusted) audience may be.
  const aud = claims.aud;
  if (!(aud === CLIENT_ID || (Array.isArray(aud) && aud.length === 1 && aud[0] === CLIENT_ID))) return false;
  const { iat, exp } = claims;
  if (!isNumber(iat) || NOW - iat > MAX_AGE + TOLERANCE || iat - NOW > TOLERANCE) return false;
  if (!isNumber(exp) || exp <= NOW - TOLERANCE || exp <= iat) return false;
  if (!isNonEmptyString(claims.jti)) return false;
  const events = claims.events;
  if (!isJsonObject(events) || !Object.hasOwn(events, EVENT) || !isJsonObject(events[EVENT])) return false;
  if ('nonce' in claims) return false;
  for (const name of ['sub', 'sid'] as const) if (name in claims && !isNonEmptyString(claims[name])) return false;
  return 'sub' in claims || 'sid' in claims;
}

/** Mostly the valid value (the first one), so that accepted tokens are common, else one of the others. */
const member = <T>(valid: Maybe<T>, ...others: Array<Maybe<T>>) =>
  fc.oneof({ arbitrary: fc.constant(valid), weight: 6 * others.length }, ...others.map((value) => ({ arbitrary: fc.constant(value), weight: 1 })));
const at = (offset: number) => NOW + offset;

const claimSets = fc.record({
  iss: member<unknown>(ISSUER, `${ISSUER}/`, 'https://evil.example', 42, null, ABSENT),
  aud: member<unknown>(CLIENT_ID, [CLIENT_ID], [CLIENT_ID, 'https://other.example'], ['https://other.example', CLIENT_ID], [CLIENT_ID, CLIENT_ID], [], 'another-client', [42], 42, null, ABSENT),
  iat: member<unknown>(at(0), at(-30), at(-200), at(-400), at(-3600), at(30), at(200), at(-10.5), String(NOW), null, ABSENT),
  exp: member<unknown>(at(120), at(30), at(0), at(-30), at(-120), at(-3600), at(10 * 365 * 86400), 1e300, String(NOW + 120), true, null, ABSENT),
  jti: member<unknown>('jti-1', '', 42, null, ['jti'], { id: 1 }, ABSENT),
  events: member<unknown>(
    { [EVENT]: {} },
    { [EVENT]: { reason: 'logout' } },
    { [EVENT]: {}, 'https://example.com/other-event': {} },
    { [EVENT]: 'logout' },
    { [EVENT]: null },
    { [EVENT]: [] },
    { [EVENT]: true },
    { 'https://example.com/other-event': {} },
    {},
    [EVENT],
    [{ [EVENT]: {} }],
    EVENT,
    null,
    42,
    ABSENT,
  ),
  nonce: member<unknown>(ABSENT, 'n-0S6', '', null),
  sub: member<unknown>('alice', '', 42, null, ABSENT),
  sid: member<unknown>('idp-session-1', '', 7, ['s'], ABSENT),
  extra: fc.dictionary(fc.string({ minLength: 1, maxLength: 8 }).map((name) => `x_${name}`), fc.jsonValue({ maxDepth: 2 }), { maxKeys: 3 }),
});

const headers = fc.record({
  typ: member<unknown>('logout+jwt', ABSENT, 'application/logout+jwt', 'Logout+JWT', 'JWT', 'jwt', 'application/jwt', 'at+jwt', 'application/at+jwt', 'secevent+jwt', 'id_token+jwt', '', 7, null),
  signer: member<'trusted' | 'stranger'>('trusted', 'stranger'),
});

function withoutAbsent(record: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(record).filter(([, value]) => value !== ABSENT));
}

let trustedKey: CryptoKey;
let strangerKey: CryptoKey;
let keySet: JWTVerifyGetKey;

beforeAll(async () => {
  const trusted = await generateKeyPair('ES256');
  trustedKey = trusted.privateKey;
  strangerKey = (await generateKeyPair('ES256')).privateKey;
  keySet = createLocalJWKSet({ keys: [{ ...(await exportJWK(trusted.publicKey)), kid: 'idp-key', alg: 'ES256', use: 'sig' }] });
});

/** 'accepted' or 'rejected'; any other error is thrown on, and fails the property. */
async function outcomeOf(token: string) {
  try {
    return { verdict: 'accepted' as const, claims: await checkLogoutToken(token, keySet, EXPECTED) };
  } catch (error) {
    if (error instanceof LogoutTokenRejected) return { verdict: 'rejected' as const };
    throw error;
  }
}

describe('checkLogoutToken', () => {
  it('accepts exactly the logout tokens the spec accepts, and refuses the rest with its own error', async () => {
    const verdicts = { accepted: 0, rejected: 0 };
    await fc.assert(
      fc.asyncProperty(claimSets, headers, async ({ extra, ...members }, { typ, signer }) => {
        const claims = { ...extra, ...withoutAbsent(members) };
        const header = withoutAbsent({ alg: 'ES256', kid: 'idp-key', typ });
        const token = await new SignJWT(claims).setProtectedHeader(header as { alg: string }).sign(signer === 'trusted' ? trustedKey : strangerKey);
        const outcome = await outcomeOf(token);
        expect(outcome.verdict).toBe(specAccepts(header, claims, signer === 'trusted') ? 'accepted' : 'rejected');
        verdicts[outcome.verdict]++;
        if (outcome.verdict !== 'accepted') return;
        expect(outcome.claims).toMatchObject({ sub: claims.sub, sid: claims.sid, jti: claims.jti });
        // The replay marker outlives the last moment the token is accepted, but never by more
        // than the iat window: a far-future exp must not pin a key in the store.
        const lastAccepted = Math.min(claims.exp as number, (claims.iat as number) + MAX_AGE) + TOLERANCE;
        expect(outcome.claims.replayableUntil).toBeGreaterThanOrEqual(lastAccepted);
        expect(outcome.claims.replayableUntil).toBeLessThanOrEqual((claims.iat as number) + MAX_AGE + TOLERANCE);
      }),
      { numRuns: 400 },
    );
    // Both sides of the oracle must really be exercised, or the property says nothing.
    expect(verdicts.accepted).toBeGreaterThan(40);
    expect(verdicts.rejected).toBeGreaterThan(40);
  });

  it('refuses malformed input with its own error, never another exception', async () => {
    const segment = fc.oneof(fc.base64String(), fc.string(), fc.json().map((json) => Buffer.from(json).toString('base64url')));
    const tokens = fc.oneof(fc.string(), fc.tuple(segment, segment, segment).map((parts) => parts.join('.')), fc.array(segment, { maxLength: 6 }).map((parts) => parts.join('.')));
    await fc.assert(
      fc.asyncProperty(tokens, async (token) => {
        expect((await outcomeOf(token)).verdict).toBe('rejected');
      }),
      { numRuns: 300 },
    );
  });
});

describe('a logout token signed with a key the IdP rotated to moments ago', () => {
  it('is no verdict while the key set is too fresh to be fetched again: a retryable error, then accepted once it may be; a key still unknown after a fetch is refused', async () => {
    const [first, rotated, unknown] = await Promise.all([generateKeyPair('ES256'), generateKeyPair('ES256'), generateKeyPair('ES256')]);
    const published: JWK[] = [{ ...(await exportJWK(first.publicKey)), kid: 'first', alg: 'ES256', use: 'sig' }];
    const server = createServer((_, response) => response.setHeader('content-type', 'application/json').end(JSON.stringify({ keys: published })));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      // jose's own remote key set, its cooldown shortened from 30 s for the test.
      const keys = createRemoteJWKSet(new URL(`http://127.0.0.1:${(server.address() as AddressInfo).port}/jwks`), { cooldownDuration: 300 });
      const now = Math.floor(Date.now() / 1000);
      const token = (kid: string, key: CryptoKey) =>
        new SignJWT({ iss: ISSUER, aud: CLIENT_ID, iat: now, exp: now + 120, jti: `${kid}-${Math.random()}`, sid: 's', events: { [EVENT]: {} } }).setProtectedHeader({ alg: 'ES256', kid }).sign(key);
      const check = async (jwt: string) => {
        try {
          await checkLogoutToken(jwt, keys, { ...EXPECTED, currentDate: undefined, keysMayPredateToken: keys.coolingDown });
          return 'accepted';
        } catch (error) {
          if (error instanceof LogoutTokenRejected) return 'rejected';
          if (error instanceof joseErrors.JWKSNoMatchingKey) return 'retry';
          throw error;
        }
      };
      expect(await check(await token('first', first.privateKey))).toBe('accepted');
      published.push({ ...(await exportJWK(rotated.publicKey)), kid: 'rotated', alg: 'ES256', use: 'sig' });
      const signedWithRotated = await token('rotated', rotated.privateKey);
      expect(keys.coolingDown).toBe(true);
      expect(await check(signedWithRotated)).toBe('retry');
      await vi.waitFor(() => expect(keys.coolingDown).toBe(false), { timeout: 2_000, interval: 20 });
      expect(await check(signedWithRotated)).toBe('accepted');
      await vi.waitFor(() => expect(keys.coolingDown).toBe(false), { timeout: 2_000, interval: 20 });
      expect(await check(await token('unknown', unknown.privateKey))).toBe('rejected');
    } finally {
      server.close();
    }
  });
});
