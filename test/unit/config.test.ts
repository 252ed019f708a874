import { generateKeyPairSync, randomBytes, type JsonWebKey as NodeJwk } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it, vi } from 'vitest';
import { ConfigError, parseConfig } from '../../lib/config.ts';
import { parseSentinelUrl } from '../../lib/store/sentinel-url.ts';
import { MAX_AGE_LIMIT_SEC } from '../../lib/step-up.ts';

const valid = {
  APP_BASE_URL: 'https://app.example.com',
  OIDC_ISSUER: 'https://idp.example.com',
  OIDC_CLIENT_ID: 'gatehouse',
  OIDC_CLIENT_SECRET: 'client-secret',
  SESSION_SECRET: 'B6MVbuqjRTACShMb374rR5Fb0oURf80iIOuoyVhC',
  BFF_APIS: '{"todos":{"url":"https://api.example.com/v1"}}',
  REDIS_URL: 'redis://127.0.0.1:6379',
};

/** A self-signed certificate whose key was thrown away: only its PEM form matters here. */
const TEST_CA_PEM = `-----BEGIN CERTIFICATE-----
MIIBtjCCAVugAwIBAgIUPvSE4Xs+JX8gcOSdesfs6XamaZcwCgYIKoZIzj0EAwIw
LzEtMCsGA1UEAwwkR2F0ZWhvdXNlIHVuaXQtdGVzdCBDQSAobm8ga2V5IGtlcHQp
MCAXDTI2MTIwMjEyNDUxOFoYDzIxMjYxMTA4MTI0NTE4WjAvMS0wKwYDVQQDDCRH
YXRlaG91c2UgdW5pdC10ZXN0IENBIChubyBrZXkga2VwdCkwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAAS5TR0BoYO9xeoGzdVkoSKJOYT1SuqtDlA9dmjDBTXRdRY8
RF6TbxPIRp0ADawjC8YBdV0zX7uIa9w/OKOS1opao1MwUTAdBgNVHQ4EFgQUpW56
YXrUNnN87z6acL1ET1oUBkUwHwYDVR0jBBgwFoAUpW56YXrUNnN87z6acL1ET1oU
BkUwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNJADBGAiEAuwQL4Dkdvu5P
W3U3c6tm7+7nn3ynGgjc8gJEVVfJK+oCIQD9qz4u9pBjpJ/DhUCW7yZU2krz228K
38U85wBIORRaBA==
-----END CERTIFICATE-----
`;

function problemsOf(env: Record<string, string | undefined>): string[] {
  try {
    parseConfig(env);
  } catch (error) {
    if (error instanceof ConfigError) return error.problems;
    throw error;
  }
  throw new Error('expected a ConfigError');
}

describe('configuration', () => {
  it('accepts a complete production environment with documented defaults', () => {
    const config = parseConfig({ ...valid, NODE_ENV: 'production' });
    expect(config.oidc.scopes).toBe('openid profile email offline_access');
    expect(config.oidc.redirectUri).toBe('https://app.example.com/api/auth/callback');
    expect(config.oidc.clientAuth).toBe('client_secret_basic');
    expect(config.session.cookieName).toBe('__Host-gatehouse');
    expect(config.session.sameSite).toBe('strict');
    expect(config.secureCookies).toBe(true);
    expect(config.store).toEqual({ kind: 'redis', url: 'redis://127.0.0.1:6379' });
    expect(config.apis.todos?.auth).toBe('user');
    expect(config.apis.todos?.url.href).toBe('https://api.example.com/v1');
  });

  it('trusts no X-Forwarded-For entries unless told how many proxies stand in front', () => {
    expect(parseConfig(valid).trustedProxyHops).toBe(0);
    expect(parseConfig({ ...valid, TRUSTED_PROXY_HOPS: '2' }).trustedProxyHops).toBe(2);
    expect(problemsOf({ ...valid, TRUSTED_PROXY_HOPS: '-1' })[0]).toMatch(/^TRUSTED_PROXY_HOPS: /);
    expect(problemsOf({ ...valid, TRUSTED_PROXY_HOPS: 'all' })[0]).toMatch(/^TRUSTED_PROXY_HOPS: /);
  });

  it('bounds what one browser holds of the proxy, and names a bad bound', () => {
    expect(parseConfig(valid).proxy).toEqual({ sendTimeoutMs: 60_000, maxCallsPerUser: 256 });
    expect(parseConfig({ ...valid, PROXY_SEND_TIMEOUT_MS: '5000', PROXY_MAX_CALLS_PER_USER: '8' }).proxy).toEqual({ sendTimeoutMs: 5_000, maxCallsPerUser: 8 });
    for (const [name, value] of [['PROXY_SEND_TIMEOUT_MS', '500'], ['PROXY_SEND_TIMEOUT_MS', 'never'], ['PROXY_MAX_CALLS_PER_USER', '0'], ['PROXY_MAX_CALLS_PER_USER', '1.5']] as const) {
      expect(problemsOf({ ...valid, [name]: value }).join('\n'), `${name}=${value}`).toMatch(new RegExp(`^${name}: `, 'm'));
    }
  });

  it('names every missing variable at once', () => {
    const problems = problemsOf({});
    for (const name of ['APP_BASE_URL', 'OIDC_ISSUER', 'OIDC_CLIENT_ID', 'SESSION_SECRET', 'BFF_APIS']) {
      expect(problems.some((p) => p.startsWith(`${name}:`)), `${name} in ${problems.join(' | ')}`).toBe(true);
    }
  });

  it('names the problems across variables in the same start as malformed ones (not one fix at a time)', () => {
    const problems = problemsOf({ ...valid, OIDC_CLIENT_SECRET: undefined, SESSION_SECRET: 'short', APP_BASE_URL: 'ftp://x', SESSION_IDLE_TIMEOUT: '900', SESSION_ABSOLUTE_TIMEOUT: '600', NODE_ENV: 'production', REDIS_URL: undefined });
    const named = problems.map((problem) => problem.slice(0, problem.indexOf(':')));
    expect(named).toEqual(expect.arrayContaining(['SESSION_SECRET', 'APP_BASE_URL', 'OIDC_CLIENT_SECRET', 'SESSION_IDLE_TIMEOUT', 'REDIS_URL']));
    expect(problems.join('\n')).toContain('OIDC_CLIENT_SECRET: is required when OIDC_CLIENT_AUTH=client_secret_basic');
  });

  it('names an SPA_DIR without an index.html, and takes one that has it', () => {
    const problems = problemsOf({ ...valid, SPA_DIR: '/nonexistent/spa/dist' });
    expect(problems).toEqual([expect.stringMatching(/^SPA_DIR: no index\.html in \/nonexistent\/spa\/dist/)]);
    const dir = mkdtempSync(path.join(tmpdir(), 'spa-'));
    writeFileSync(path.join(dir, 'index.html'), '<!doctype html>');
    try {
      expect(parseConfig({ ...valid, SPA_DIR: dir, SPA_CONTENT_SECURITY_POLICY: "default-src 'self'" }).spa).toEqual({ kind: 'dir', dir, contentSecurityPolicy: "default-src 'self'" });
      // Written over several lines, as a .env file allows: one header line.
      const policy = (written: string) => parseConfig({ ...valid, SPA_DIR: dir, SPA_CONTENT_SECURITY_POLICY: written }).spa?.contentSecurityPolicy;
      expect(policy("default-src 'self';\r\n  img-src 'self' data:;\n")).toBe("default-src 'self'; img-src 'self' data:;");
      // A line that begins with a directive begins one, with or without a `;` above: none runs into the next.
      expect(policy("script-src 'self'\nobject-src 'none'\n\nBase-URI 'none'")).toBe("script-src 'self'; object-src 'none'; Base-URI 'none'");
      // Any other line is the rest of the source list above: a wrapped hash or 'strict-dynamic' stays in its directive.
      expect(policy("script-src 'self' 'unsafe-inline'\n    'sha256-abc='\n    'strict-dynamic' https:\nstyle-src 'self'")).toBe("script-src 'self' 'unsafe-inline' 'sha256-abc=' 'strict-dynamic' https:; style-src 'self'");
      for (const policy of ["default-src 'self'\u0000", "default-src 'self' https://exämple.com"]) {
        expect(problemsOf({ ...valid, SPA_DIR: dir, SPA_CONTENT_SECURITY_POLICY: policy }), JSON.stringify(policy)).toEqual([expect.stringMatching(/^SPA_CONTENT_SECURITY_POLICY: /)]);
      }
    } finally {
      rmSync(dir, { recursive: true });
    }
  });

  it('takes SPA_UPSTREAM_URL as an endpoint (https, or http on loopback), and refuses it next to SPA_DIR', () => {
    expect(parseConfig({ ...valid, SPA_UPSTREAM_URL: 'https://cdn.example.com/app/' }).spa).toMatchObject({ kind: 'origin', url: new URL('https://cdn.example.com/app/') });
    expect(problemsOf({ ...valid, SPA_UPSTREAM_URL: 'http://cdn.example.com/app/' })).toEqual([expect.stringMatching(/^SPA_UPSTREAM_URL: must be https:\/\//)]);
    expect(problemsOf({ ...valid, SPA_UPSTREAM_URL: 'https://cdn.example.com/', SPA_DIR: '/nonexistent' })).toContain('SPA_UPSTREAM_URL: set SPA_DIR or SPA_UPSTREAM_URL, not both');
  });

  it('takes extra authorization parameters, but never the ones that carry the flow', () => {
    expect(parseConfig({ ...valid, OIDC_AUTHORIZATION_PARAMS: 'access_type=offline&audience=https%3A%2F%2Fapi.example.com' }).oidc.authorizationParams).toEqual([
      ['access_type', 'offline'],
      ['audience', 'https://api.example.com'],
    ]);
    expect(parseConfig(valid).oidc.authorizationParams).toEqual([]);
    // acr_values is a floor every login carries in its cookie: bounded as a login link's own.
    for (const acr of [`acr_values=${'a'.repeat(300)}`, 'acr_values=', 'acr_values=%22gold%22']) {
      expect(problemsOf({ ...valid, OIDC_AUTHORIZATION_PARAMS: acr }), acr).toEqual(['OIDC_AUTHORIZATION_PARAMS: acr_values must be one list of up to 8 ACR values separated by spaces, 256 characters in all']);
    }
    expect(parseConfig({ ...valid, OIDC_AUTHORIZATION_PARAMS: 'acr_values=urn%3Amfa%20urn%3Ahwk&max_age=600' }).oidc.authorizationParams).toEqual([
      ['acr_values', 'urn:mfa urn:hwk'],
      ['max_age', '600'],
    ]);
    expect(problemsOf({ ...valid, OIDC_AUTHORIZATION_PARAMS: 'state=x&code_challenge_method=plain&ui_locales=de' })).toEqual([
      'OIDC_AUTHORIZATION_PARAMS: must not set state, code_challenge_method: Gatehouse sets those itself',
    ]);
  });

  it('refuses a parameter given twice: the IdP would hear one value, and the floor could check another', () => {
    const name = fc.constantFrom('acr_values', 'max_age', 'prompt', 'audience', 'resource', 'ui_locales', 'x');
    fc.assert(
      fc.property(fc.array(fc.tuple(name, fc.string({ maxLength: 8 })), { minLength: 2, maxLength: 6 }), (pairs) => {
        const names = pairs.map(([key]) => key);
        const repeated = [...new Set(names.filter((key, index) => names.indexOf(key) !== index))];
        fc.pre(repeated.length > 0);
        expect(problemsOf({ ...valid, OIDC_AUTHORIZATION_PARAMS: new URLSearchParams(pairs).toString() })).toEqual([`OIDC_AUTHORIZATION_PARAMS: sets ${repeated.join(', ')} more than once: give each parameter once`]);
      }),
    );
  });

  it('refuses a max_age the callback could not hold a sign-in to, rather than send it unchecked', () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 12 }), (text) => {
        fc.pre(!/^\d{1,10}$/.test(text) || Number(text) > MAX_AGE_LIMIT_SEC);
        expect(problemsOf({ ...valid, OIDC_AUTHORIZATION_PARAMS: new URLSearchParams({ max_age: text }).toString() })).toEqual([`OIDC_AUTHORIZATION_PARAMS: max_age must be a whole number of seconds (digits only), at most ${MAX_AGE_LIMIT_SEC}`]);
      }),
    );
    for (const text of ['soon', '-1', '1.5', '60s', ' 60', '1e3', '', String(MAX_AGE_LIMIT_SEC + 1)]) {
      expect(problemsOf({ ...valid, OIDC_AUTHORIZATION_PARAMS: `max_age=${encodeURIComponent(text)}` }), text).toHaveLength(1);
    }
    expect(parseConfig({ ...valid, OIDC_AUTHORIZATION_PARAMS: 'max_age=0' }).oidc.authorizationParams).toEqual([['max_age', '0']]);
  });

  it('refuses a SESSION_COOKIE_NAME with a prefix of its own (browsers read any "__" name as one): Gatehouse adds __Host- itself', () => {
    for (const name of ['__Host-x', '__host-x', '__Secure-x', '__SECURE-x', '__x']) {
      expect(problemsOf({ ...valid, SESSION_COOKIE_NAME: name }), name).toEqual(['SESSION_COOKIE_NAME: must not start with "__": Gatehouse adds the __Host- prefix itself on https']);
    }
    expect(parseConfig({ ...valid, SESSION_COOKIE_NAME: 'my_app-session' }).session.cookieName).toBe('__Host-my_app-session');
  });

  it('takes OIDC_USE_PAR as a boolean, off by default, and names anything else', () => {
    expect(parseConfig(valid).oidc.usePar).toBe(false);
    expect(parseConfig({ ...valid, OIDC_USE_PAR: 'true' }).oidc.usePar).toBe(true);
    expect(parseConfig({ ...valid, OIDC_USE_PAR: 'false' }).oidc.usePar).toBe(false);
    expect(problemsOf({ ...valid, OIDC_USE_PAR: 'sometimes' })).toEqual(['OIDC_USE_PAR: must be true or false']);
  });

  it('treats an empty variable as unset', () => {
    expect(problemsOf({ ...valid, SESSION_SECRET: '', OIDC_CLIENT_ID: '  ' })).toEqual(expect.arrayContaining(['SESSION_SECRET: is required', 'OIDC_CLIENT_ID: is required']));
    expect(parseConfig({ ...valid, OIDC_SCOPES: '' }).oidc.scopes).toBe('openid profile email offline_access');
  });

  it('names malformed values without echoing secrets', () => {
    const problems = problemsOf({ ...valid, SESSION_SECRET: 'too-short-secret', BFF_APIS: '{not json', OIDC_SCOPES: 'profile' });
    expect(problems).toContain('SESSION_SECRET: every comma-separated entry must be at least 32 characters');
    expect(problems).toContain('BFF_APIS: is not valid JSON');
    expect(problems.some((p) => p.startsWith('OIDC_SCOPES:'))).toBe(true);
    expect(problems.join('\n')).not.toContain('too-short-secret');
  });

  it('points into BFF_APIS entries', () => {
    const problems = problemsOf({ ...valid, BFF_APIS: '{"todos":{"url":"ftp://x"},"Bad Name":{"url":"https://a.example"},"x":{"url":"https://a.example","extra":1}}' });
    expect(problems.some((p) => p.startsWith('BFF_APIS.todos.url:'))).toBe(true);
    expect(problems.some((p) => p.startsWith('BFF_APIS.Bad Name:'))).toBe(true);
    expect(problems.some((p) => p.startsWith('BFF_APIS.x:'))).toBe(true);
  });

  it('reads an API’s sign-in requirement (acr, maxAge) and refuses one no user could meet', () => {
    const apis = (entries: Record<string, unknown>) => ({ ...valid, BFF_APIS: JSON.stringify(entries) });
    const config = parseConfig(apis({ one: { url: 'https://a.example', acr: 'urn:mfa' }, list: { url: 'https://a.example', acr: ['gold', 'silver', 'gold'], maxAge: 300 }, plain: { url: 'https://a.example' } }));
    expect(config.apis.one).toMatchObject({ acr: ['urn:mfa'] });
    expect(config.apis.list).toMatchObject({ acr: ['gold', 'silver'], maxAge: 300 });
    expect(config.apis.plain).not.toHaveProperty('acr');
    expect(config.apis.plain).not.toHaveProperty('maxAge');
    const problems = problemsOf(
      apis({
        spaced: { url: 'https://a.example', acr: 'gold silver' },
        empty: { url: 'https://a.example', acr: [] },
        zero: { url: 'https://a.example', maxAge: 0 },
        anonymous: { url: 'https://a.example', auth: 'user-optional', acr: 'gold' },
        machine: { url: 'https://a.example', auth: 'client', maxAge: 60 },
      }),
    );
    for (const where of ['BFF_APIS.spaced.acr:', 'BFF_APIS.empty.acr:', 'BFF_APIS.zero.maxAge:']) expect(problems.some((p) => p.startsWith(where)), where).toBe(true);
    // Cross-checks run on what parsed: a fixed environment names these next, so show them now.
    expect(problemsOf(apis({ anonymous: { url: 'https://a.example', auth: 'user-optional', acr: 'gold' }, machine: { url: 'https://a.example', auth: 'client', maxAge: 60 } }))).toEqual([
      'BFF_APIS.anonymous.acr: needs "auth": "user" (the default)',
      'BFF_APIS.machine.maxAge: needs "auth": "user" (the default)',
    ]);
  });

it('refuses a query or a fragment on the URLs paths are joined to (issuer, app, APIs, SPA origin, Upstash) and a fragment on a resource', () => {
    const tail = fc.oneof(fc.webQueryParameters().map((query) => `?${query}`), fc.webFragments().map((fragment) => `#${fragment}`), fc.constantFrom('?', '#', '?#x'));
    fc.assert(
      fc.property(fc.constantFrom('https://x.example', 'https://x.example/base', 'https://x.example/base/'), tail, fc.constantFrom('OIDC_ISSUER', 'APP_BASE_URL', 'SPA_UPSTREAM_URL', 'UPSTASH_REDIS_REST_URL', 'BFF_APIS'), (base, suffix, name) => {
        const value = `${base}${suffix}`;
        const env = name === 'BFF_APIS' ? { ...valid, BFF_APIS: JSON.stringify({ todos: { url: value } }) } : { ...valid, [name]: value, ...(name === 'UPSTASH_REDIS_REST_URL' ? { UPSTASH_REDIS_REST_TOKEN: 't' } : {}) };
        expect(problemsOf(env).join('\n'), value).toMatch(new RegExp(`^${name === 'BFF_APIS' ? 'BFF_APIS\\.todos\\.url' : name}: must not contain a query`, 'm'));
      }),
    );
    expect(problemsOf({ ...valid, BFF_APIS: JSON.stringify({ todos: { url: 'https://api.example.com', resource: 'https://api.example.com/#x' } }) })).toEqual(['BFF_APIS.todos.resource: must not contain a fragment (RFC 8707)']);
    expect(parseConfig({ ...valid, BFF_APIS: JSON.stringify({ todos: { url: 'https://api.example.com/v1/', resource: 'urn:api:todos' } }) }).apis.todos?.resource).toBe('urn:api:todos');
  });

  it('takes a tokenExchange per API, and refuses one that cannot work at start-up, naming BFF_APIS and the API', () => {
    const apis = (entries: Record<string, unknown>) => ({ ...valid, BFF_APIS: JSON.stringify(entries) });
    const url = 'https://api.example.com/v1';
    const config = parseConfig(apis({ ledger: { url, tokenExchange: { audience: 'urn:ledger', scope: ' ledger:read ' } }, todos: { url, tokenExchange: { audience: 'https://todos' } } }));
    expect(config.apis.ledger?.tokenExchange).toEqual({ audience: 'urn:ledger', scope: 'ledger:read' });
    expect(config.apis.todos?.tokenExchange).toEqual({ audience: 'https://todos', scope: undefined });
    expect(parseConfig(valid).apis.todos?.tokenExchange).toBeUndefined();

    expect(problemsOf(apis({ ledger: { url, resource: 'https://ledger', tokenExchange: { audience: 'https://ledger' } } }))).toEqual([
      'BFF_APIS.ledger: set "resource" or "tokenExchange", not both',
    ]);
    expect(problemsOf(apis({ ledger: { url, tokenExchange: { audience: '  ' } } }))).toEqual(['BFF_APIS.ledger.tokenExchange.audience: must not be empty']);
    expect(problemsOf(apis({ ledger: { url, tokenExchange: { scope: 'a' } } }))).toEqual([
      'BFF_APIS.ledger.tokenExchange.audience: is required: the audience the IdP issues the exchanged token for',
    ]);
    expect(problemsOf(apis({ ledger: { url, tokenExchange: { audience: 'a', scope: '' } } }))[0]).toMatch(/^BFF_APIS\.ledger\.tokenExchange\.scope: must not be empty/);
    expect(problemsOf(apis({ ledger: { url, tokenExchange: { audience: 7 } } }))[0]).toMatch(/^BFF_APIS\.ledger\.tokenExchange\.audience: /);
    expect(problemsOf(apis({ ledger: { url, tokenExchange: { audience: 'a', resource: 'https://x' } } }))[0]).toMatch(/^BFF_APIS\.ledger\.tokenExchange: /);
    expect(problemsOf(apis({ ledger: { url, tokenExchange: 'urn:ledger' } }))[0]).toMatch(/^BFF_APIS\.ledger\.tokenExchange: /);
    // A scope is the client-credentials grant's: on a user's token it would be ignored.
    expect(parseConfig(apis({ machine: { url, auth: 'client', scope: 'api:read' } })).apis.machine?.scope).toBe('api:read');
    for (const auth of ['user', 'user-optional', 'none']) {
      expect(problemsOf(apis({ orders: { url, auth, resource: 'https://orders', scope: 'orders:read' } })), auth).toEqual([
        'BFF_APIS.orders.scope: applies to auth "client" only (its client-credentials grant); a user\'s token has the scopes of the sign-in (OIDC_SCOPES)',
      ]);
    }
    for (const auth of ['client', 'none']) {
      expect(problemsOf(apis({ ledger: { url, auth, tokenExchange: { audience: 'a' } } }))).toEqual([
        `BFF_APIS.ledger.tokenExchange: needs auth "user" or "user-optional" (a session's token is what gets exchanged), not "${auth}"`,
      ]);
    }
    expect(parseConfig(apis({ ledger: { url, auth: 'user-optional', tokenExchange: { audience: 'a' } } })).apis.ledger?.auth).toBe('user-optional');
  });

  it('turns WebSockets on per API, for user APIs only, and checks their sessions every 30 s by default', () => {
    const config = parseConfig({ ...valid, BFF_APIS: '{"todos":{"url":"https://api.example.com/v1"},"live":{"url":"https://live.example.com","websocket":true}}' });
    expect(config.apis.todos?.websocket).toBe(false);
    expect(config.apis.live?.websocket).toBe(true);
    expect(config.websocket.sessionCheckIntervalSec).toBe(30);
    expect(parseConfig({ ...valid, WEBSOCKET_SESSION_CHECK_INTERVAL: '2' }).websocket.sessionCheckIntervalSec).toBe(2);
    expect(problemsOf({ ...valid, WEBSOCKET_SESSION_CHECK_INTERVAL: '0' })[0]).toMatch(/^WEBSOCKET_SESSION_CHECK_INTERVAL: /);
    expect(problemsOf({ ...valid, BFF_APIS: '{"live":{"url":"https://live.example.com","websocket":"yes"}}' })[0]).toMatch(/^BFF_APIS\.live\.websocket: /);
    for (const auth of ['none', 'client', 'user-optional']) {
      expect(problemsOf({ ...valid, BFF_APIS: JSON.stringify({ live: { url: 'https://live.example.com', websocket: true, auth } }) })).toContain(
        'BFF_APIS.live.websocket: needs "auth": "user" (a WebSocket is held for a signed-in user\'s session)',
      );
    }
  });

  it('accepts http:// only for loopback hosts, and then leaves Secure off', () => {
    expect(problemsOf({ ...valid, OIDC_ISSUER: 'http://idp.example.com' })[0]).toMatch(/^OIDC_ISSUER: must be https:\/\//);
    expect(problemsOf({ ...valid, APP_BASE_URL: 'http://10.0.0.5:3000' })[0]).toMatch(/^APP_BASE_URL:/);
    const local = parseConfig({ ...valid, APP_BASE_URL: 'http://localhost:3000', OIDC_ISSUER: 'http://127.0.0.1:4000' });
    expect(local.secureCookies).toBe(false);
    expect(local.session.cookieName).toBe('gatehouse');
    expect(local.oidc.allowInsecureRequests).toBe(true);
  });

  it('refuses a production start without a session store, naming the variable', () => {
    const { REDIS_URL: _omitted, ...withoutStore } = valid;
    expect(problemsOf({ ...withoutStore, NODE_ENV: 'production' })[0]).toMatch(/^REDIS_URL: a session store is required in production/);
    expect(parseConfig({ ...withoutStore, NODE_ENV: 'production', SESSION_STORE: 'memory' }).store).toEqual({ kind: 'memory' });
    expect(parseConfig({ ...withoutStore }).store).toEqual({ kind: 'memory' });
    // Next serves any other NODE_ENV as production: so must these checks, or the start is refused.
    for (const nodeEnv of ['staging', 'prod', 'Production', 'PRODUCTION', ' production']) {
      expect(problemsOf({ ...withoutStore, NODE_ENV: nodeEnv }).join('\n'), nodeEnv).toMatch(/^NODE_ENV: must be production, development or test/m);
    }
  });

  it('selects Upstash when its two variables are set, and wants both', () => {
    const { REDIS_URL: _omitted, ...withoutStore } = valid;
    const config = parseConfig({ ...withoutStore, UPSTASH_REDIS_REST_URL: 'https://eu1.upstash.io', UPSTASH_REDIS_REST_TOKEN: 't' });
    expect(config.store).toEqual({ kind: 'upstash', url: 'https://eu1.upstash.io/', token: 't' });
    expect(problemsOf({ ...withoutStore, UPSTASH_REDIS_REST_URL: 'https://eu1.upstash.io' })[0]).toMatch(/^UPSTASH_REDIS_REST_TOKEN:/);
  });

  it('bounds how long a call waits for a refresh: 2 s by default, at most a minute', () => {
    expect(parseConfig(valid).refresh.waitMs).toBe(2_000);
    expect(parseConfig({ ...valid, REFRESH_WAIT_MS: '500' }).refresh.waitMs).toBe(500);
    // A timer past 2^31 ms would fire at once: every refresh would answer 503 immediately.
    expect(problemsOf({ ...valid, REFRESH_WAIT_MS: String(2 ** 31) }).join('\n')).toMatch(/^REFRESH_WAIT_MS: /m);
    expect(problemsOf({ ...valid, REFRESH_WAIT_MS: '0' }).join('\n')).toMatch(/^REFRESH_WAIT_MS: /m);
  });

  it('bounds every timer it arms below the 2^31 ms at which Node would fire it at once', () => {
    for (const [name, largest] of [['REFRESH_LOCK_LEASE_MS', 600_000], ['GATEHOUSE_DRAIN_MS', 3_600_000], ['WEBSOCKET_SESSION_CHECK_INTERVAL', 86_400]] as const) {
      expect(() => parseConfig({ ...valid, [name]: String(largest) }), name).not.toThrow();
      for (const tooLong of [largest + 1, 2 ** 31, 3e9]) expect(problemsOf({ ...valid, [name]: String(tooLong) }).join('\n'), `${name}=${tooLong}`).toMatch(new RegExp(`^${name}: `, 'm'));
    }
  });

  it('takes REDIS_TLS_CA as PEM text (newlines escaped or not) or a PEM file, only for rediss://, and names anything else', () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'gatehouse-ca-'));
    try {
      const tls = { ...valid, REDIS_URL: 'rediss://redis.example.com:6380' };
      const file = path.join(dir, 'ca.pem');
      writeFileSync(file, TEST_CA_PEM);
      expect(parseConfig({ ...tls, REDIS_TLS_CA: file }).store).toEqual({ kind: 'redis', url: tls.REDIS_URL, tlsCa: `${TEST_CA_PEM.trim()}\n` });
      expect(parseConfig({ ...tls, REDIS_TLS_CA: TEST_CA_PEM }).store).toMatchObject({ tlsCa: `${TEST_CA_PEM.trim()}\n` });
      expect(parseConfig({ ...tls, REDIS_TLS_CA: TEST_CA_PEM.replaceAll('\n', '\\n') }).store).toMatchObject({ tlsCa: `${TEST_CA_PEM.trim()}\n` });
      expect(problemsOf({ ...valid, REDIS_TLS_CA: file })).toContain('REDIS_TLS_CA: only used for TLS, with a rediss:// or rediss+sentinel:// REDIS_URL');
      expect(parseConfig({ ...valid, REDIS_URL: 'rediss+sentinel://s1:26379/mymaster', REDIS_TLS_CA: file }).store).toMatchObject({ tlsCa: `${TEST_CA_PEM.trim()}\n` });
      expect(problemsOf({ ...valid, REDIS_URL: 'redis+sentinel://s1:26379/mymaster', REDIS_TLS_CA: file })).toContain('REDIS_TLS_CA: only used for TLS, with a rediss:// or rediss+sentinel:// REDIS_URL');
      const notPem = path.join(dir, 'not.pem');
      writeFileSync(notPem, 'hello');
      expect(problemsOf({ ...tls, REDIS_TLS_CA: notPem })).toContain('REDIS_TLS_CA: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)');
      expect(problemsOf({ ...tls, REDIS_TLS_CA: dir }).join('\n')).toMatch(/^REDIS_TLS_CA: neither PEM certificates nor a readable file/m);
      const long = `/nowhere/${'x'.repeat(200)}`;
      const [problem] = problemsOf({ ...tls, REDIS_TLS_CA: long });
      expect(problem?.length).toBeLessThan(200);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('takes a Sentinel deployment as redis+sentinel://, with the sentinels\' own password apart', () => {
    const url = 'redis+sentinel://gatehouse:p%40ss@s1.example.com:26379,s2.example.com,[::1]:26380/mymaster';
    const config = parseConfig({ ...valid, REDIS_URL: url, REDIS_SENTINEL_PASSWORD: 'sentinel-secret' });
    expect(config.store).toEqual({ kind: 'redis', url, sentinelPassword: 'sentinel-secret' });
    expect(parseSentinelUrl(url)).toEqual({
      tls: false,
      sentinels: [
        { host: 's1.example.com', port: 26379 },
        { host: 's2.example.com', port: 26379 },
        { host: '::1', port: 26380 },
      ],
      masterName: 'mymaster',
      username: 'gatehouse',
      password: 'p@ss',
    });
    expect(parseSentinelUrl('rediss+sentinel://:secret@s1:26379/mymaster/')).toMatchObject({ tls: true, username: undefined, password: 'secret', masterName: 'mymaster' });
    // A password pasted without percent-encoding is still taken whole.
    expect(parseSentinelUrl('redis+sentinel://:a/b@c,d@s1:26379/mymaster')).toMatchObject({ password: 'a/b@c,d', sentinels: [{ host: 's1', port: 26379 }] });
    expect(problemsOf({ ...valid, REDIS_SENTINEL_PASSWORD: 'sentinel-secret' })).toEqual([
      'REDIS_SENTINEL_PASSWORD: only used with a redis+sentinel:// or rediss+sentinel:// REDIS_URL',
    ]);
  });

  it('refuses a malformed Sentinel REDIS_URL at start-up, naming REDIS_URL and what is wrong, never echoing the password', () => {
    const cases: Array<[string, RegExp]> = [
      ['redis+sentinel://:hunter22@s1:26379', /^REDIS_URL: names no master/],
      ['redis+sentinel://:hunter22@s1:26379/', /^REDIS_URL: names no master/],
      ['redis+sentinel://:hunter22@/mymaster', /^REDIS_URL: names no sentinel/],
      ['redis+sentinel://:hunter22@s1:26379,,s2:26379/mymaster', /^REDIS_URL: names a sentinel that is not host:port \(""\)/],
      ['redis+sentinel://:hunter22@s1:99999/mymaster', /^REDIS_URL: names a sentinel that is not host:port \("s1:99999"\)/],
      ['redis+sentinel://:hunter22@s1:port/mymaster', /^REDIS_URL: names a sentinel that is not host:port/],
      ['redis+sentinel://:hunter22@s1:26379/mymaster/0', /^REDIS_URL: has more than a master name/],
      ['redis+sentinel://:hunter22@s1:26379/mymaster?db=1', /^REDIS_URL: takes no query or fragment/],
      ['redis+sentinel://:hunter%zz@s1:26379/mymaster', /^REDIS_URL: its password is not percent-encoded correctly/],
      ['sentinel://:hunter22@s1:26379/mymaster', /^REDIS_URL: must start with redis:\/\/, rediss:\/\/, redis\+sentinel:\/\/ or rediss\+sentinel:\/\//],
    ];
    for (const [url, expected] of cases) {
      const problems = problemsOf({ ...valid, REDIS_URL: url });
      expect(problems.join('\n'), url).toMatch(expected);
      expect(problems.join('\n'), url).not.toContain('hunter');
    }
  });

  it('checks settings that depend on each other', () => {
    expect(problemsOf({ ...valid, SESSION_IDLE_TIMEOUT: '100', SESSION_ABSOLUTE_TIMEOUT: '50' })[0]).toMatch(/^SESSION_IDLE_TIMEOUT:/);
    expect(problemsOf({ ...valid, OIDC_CLIENT_AUTH: 'private_key_jwt' })[0]).toMatch(/^OIDC_PRIVATE_KEY:/);
    expect(problemsOf({ ...valid, OIDC_TIMEOUT_MS: '30000', REFRESH_LOCK_LEASE_MS: '20000' })[0]).toMatch(/^REFRESH_LOCK_LEASE_MS:/);
    expect(problemsOf({ ...valid, APP_BASE_URL: 'https://app.example.com/sub' })[0]).toMatch(/^APP_BASE_URL: must be an origin/);
  });

  it('imports OIDC_PRIVATE_KEY at start-up: a key that cannot sign is named there, not found at the first login', async () => {
    const keyed = (jwk: unknown) => ({ ...valid, OIDC_CLIENT_AUTH: 'private_key_jwt', OIDC_PRIVATE_KEY: JSON.stringify(jwk) });
    const withKey = (jwk: unknown) => problemsOf(keyed(jwk));
    const signing = signingKeys();
    for (const jwk of signing) expect(() => parseConfig(keyed({ ...jwk, kid: 'k1' })), String(jwk.kty)).not.toThrow();
    const cannotSign = /^OIDC_PRIVATE_KEY: must be a complete private signing key as a JWK/;
    const x25519 = generateKeyPairSync('x25519').privateKey.export({ format: 'jwk' });
    const secp256k1 = generateKeyPairSync('ec', { namedCurve: 'secp256k1' }).privateKey.export({ format: 'jwk' });
    for (const jwk of [{ kty: 'RSA', d: 'x' }, { kty: 'EC', crv: 'P-256', d: 'x' }, x25519, secp256k1, { kty: 'oct', k: 'c2VjcmV0', d: 'x' }]) {
      expect(withKey(jwk)[0], JSON.stringify(jwk).slice(0, 40)).toMatch(cannotSign);
    }
    // What Node's parser lets through and WebCrypto does not: the start-up check imports it as a login would.
    const { privateKeyProblem } = await withEnv({ ...valid, OIDC_CLIENT_AUTH: 'private_key_jwt', OIDC_PRIVATE_KEY: JSON.stringify(signing[1]) });
    expect(await privateKeyProblem()).toBeUndefined();
    for (const [index, member] of [[1, 'd'], [4, 'x']] as const) {
      const broken = { ...signing[index], [member]: 'abc!' };
      expect(() => parseConfig(keyed(broken)), member).not.toThrow();
      const deployed = await withEnv({ ...valid, OIDC_CLIENT_AUTH: 'private_key_jwt', OIDC_PRIVATE_KEY: JSON.stringify(broken) });
      expect(await deployed.privateKeyProblem(), member).toMatch(/^OIDC_PRIVATE_KEY: cannot be imported as a signing key \(DataError\)/);
    }
  });

  it('refuses the OIDC client secret as a session secret or token key, in any place of the list, without echoing it', () => {
    const clientSecret = 'NbK2v-W9qTz4LmXa8RcYdE1uHfJ0sGpQ';
    for (const [name, value] of [['SESSION_SECRET', clientSecret], ['SESSION_SECRET', `${'dVArRNXeYyFmolW0Q_Nz5pzl8Irohm2Yo2u80vB1'},${clientSecret}`], ['TOKEN_ENCRYPTION_KEY', clientSecret]] as const) {
      const problems = problemsOf({ ...valid, OIDC_CLIENT_SECRET: clientSecret, [name]: value }).join('\n');
      expect(problems, `${name}=${value}`).toMatch(new RegExp(`^${name}: must not be OIDC_CLIENT_SECRET`, 'm'));
      expect(problems).not.toContain(clientSecret);
    }
    expect(() => parseConfig({ ...valid, OIDC_CLIENT_SECRET: clientSecret })).not.toThrow();
  });

  it('refuses a typed or placeholder secret that meets the length rule: a few characters, or one piece repeated', () => {
    const notRandom = /^(SESSION_SECRET|TOKEN_ENCRYPTION_KEY): every comma-separated entry must be random/m;
    // Few distinct characters, whatever their order and however long.
    const fewCharacters = fc.tuple(fc.uniqueArray(fc.string({ minLength: 1, maxLength: 1 }).filter((c) => c !== ',' && c.trim() !== ''), { minLength: 1, maxLength: 5 }), fc.integer({ min: 32, max: 200 }), fc.infiniteStream(fc.nat())).map(([alphabet, length, picks]) => {
      const iterator = picks[Symbol.iterator]();
      return Array.from({ length }, () => alphabet[(iterator.next().value as number) % alphabet.length]).join('');
    });
    // A word or phrase repeated (the last copy may be cut short), however varied the word.
    const repeated = fc.tuple(fc.stringMatching(/^[A-Za-z0-9!-+\-./:-@_]{1,40}$/), fc.integer({ min: 0, max: 40 })).map(([piece, cut]) => {
      const whole = piece.repeat(Math.ceil(Math.max(64, piece.length * 2 + cut) / piece.length));
      return whole.slice(0, Math.max(32, whole.length - (cut % piece.length)));
    });
    fc.assert(
      fc.property(fc.oneof(fewCharacters, repeated), fc.constantFrom('SESSION_SECRET', 'TOKEN_ENCRYPTION_KEY'), fc.boolean(), (weak, name, asSecondEntry) => {
        const value = asSecondEntry ? `${randomBytes(32).toString('base64url')},${weak}` : weak;
        expect(problemsOf({ ...valid, [name]: value }).join('\n')).toMatch(notRandom);
      }),
    );
    for (const weak of ['x'.repeat(32), 'changeme-changeme-changeme-changeme', 'passwordpasswordpasswordpassword', '0123456701234567012345670123456701']) {
      expect(problemsOf({ ...valid, SESSION_SECRET: weak }).join('\n'), weak).toMatch(notRandom);
    }
  });

  it('takes every secret that random bytes make, in the encodings people use (base64, base64url, hex)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 16, maxLength: 64 }), fc.constantFrom<BufferEncoding>('base64', 'base64url', 'hex'), (bytes, encoding) => {
        const secret = Buffer.from(bytes).toString(encoding);
        fc.pre(secret.length >= 32);
        expect(() => parseConfig({ ...valid, SESSION_SECRET: secret, TOKEN_ENCRYPTION_KEY: randomBytes(32).toString('hex') })).not.toThrow();
      }),
      { numRuns: 2000 },
    );
  });

  it('reads a comma-separated SESSION_SECRET as a rotation list, first entry first', () => {
    const [newer, older] = ['Ff_8kUugM9frbLcVGwDUjN2rVWKAvE-dTZ63Kpdy', 'kn7DHY8D9In5Yxw-zLwaXshtegaMf1ovvOMbZl5O'];
    const config = parseConfig({ ...valid, SESSION_SECRET: `${newer}, ${older}` });
    expect(config.session.secrets).toEqual([newer, older]);
    expect(config.session.tokenKeys).toEqual(config.session.secrets);
  });
});

describe('telemetry settings', () => {
  it('METRICS_PORT: off by default, on its own port and loopback otherwise', () => {
    expect(parseConfig(valid).metrics).toEqual({ port: undefined, hostname: '127.0.0.1' });
    expect(parseConfig({ ...valid, METRICS_PORT: '9464', METRICS_HOST: '0.0.0.0' }).metrics).toEqual({ port: 9464, hostname: '0.0.0.0' });
  });

  it.each([['abc'], ['0'], ['70000'], ['94.5']])('METRICS_PORT=%s is refused, by name', (value) => {
    expect(problemsOf({ ...valid, METRICS_PORT: value })).toEqual([expect.stringMatching(/^METRICS_PORT: must be a port number/)]);
  });

  it('METRICS_PORT may not be the public port', () => {
    expect(problemsOf({ ...valid, PORT: '8080', METRICS_PORT: '8080' })).toEqual([expect.stringMatching(/^METRICS_PORT: must differ from PORT/)]);
    expect(problemsOf({ ...valid, METRICS_PORT: '3000' })).toEqual([expect.stringMatching(/^METRICS_PORT: must differ from PORT/)]);
  });

  it('METRICS_HOST: a host name or address to listen on, and only with METRICS_PORT (not silently ignored, nor blamed on METRICS_PORT)', () => {
    for (const host of ['localhost', '127.0.0.1', '0.0.0.0', '::', '::1', 'metrics.internal', 'fe80::1', 'fe80::1%eth0', 'gatehouse_metrics', 'localhost.']) {
      expect(parseConfig({ ...valid, METRICS_PORT: '9464', METRICS_HOST: host }).metrics.hostname, host).toBe(host);
    }
    for (const host of ['no such host!', 'http://127.0.0.1', '127.0.0.1:9464', 'a b', 'host/x', '-bad.example']) {
      expect(problemsOf({ ...valid, METRICS_PORT: '9464', METRICS_HOST: host }), host).toEqual([expect.stringMatching(/^METRICS_HOST: must be a host name or an IP address/)]);
    }
    expect(problemsOf({ ...valid, METRICS_HOST: '0.0.0.0' })).toEqual(['METRICS_HOST: is set, but metrics are off until METRICS_PORT is set too']);
  });

  it('an OTLP endpoint that is not an http(s) URL is refused by name (the exporters would fall back to localhost:4318 in silence)', () => {
    for (const name of ['OTEL_EXPORTER_OTLP_ENDPOINT', 'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT', 'OTEL_EXPORTER_OTLP_METRICS_ENDPOINT']) {
      for (const value of ['not a url', 'collector:4318', 'grpc://collector:4317', '/v1/traces', 'otel:s3cret@collector']) {
        expect(problemsOf({ ...valid, [name]: value }), `${name}=${value}`).toEqual([`${name}: must be an http(s) URL`]);
      }
      expect(() => parseConfig({ ...valid, [name]: 'http://otel-collector:4318' })).not.toThrow();
    }
  });

  it('unknown OTEL_* choices are refused with the rest, by name', () => {
    const problems = problemsOf({ ...valid, OTEL_TRACES_EXPORTER: 'jaeger', OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc', OTEL_TRACES_SAMPLER_ARG: '2', SESSION_SECRET: 'short' });
    expect(problems.map((problem) => problem.slice(0, problem.indexOf(':')))).toEqual(['SESSION_SECRET', 'OTEL_TRACES_EXPORTER', 'OTEL_EXPORTER_OTLP_PROTOCOL', 'OTEL_TRACES_SAMPLER_ARG']);
    expect(() => parseConfig({ ...valid, OTEL_TRACES_EXPORTER: 'otlp', OTEL_METRICS_EXPORTER: 'none', OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json', OTEL_TRACES_SAMPLER: 'parentbased_traceidratio', OTEL_TRACES_SAMPLER_ARG: '0' })).not.toThrow();
  });
});

/** One of each key type OIDC_PRIVATE_KEY takes: RSA, EC on P-256, P-384 and P-521, Ed25519. */
function signingKeys(): NodeJwk[] {
  return [
    generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' }),
    generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' }),
    generateKeyPairSync('ec', { namedCurve: 'P-384' }).privateKey.export({ format: 'jwk' }),
    generateKeyPairSync('ec', { namedCurve: 'P-521' }).privateKey.export({ format: 'jwk' }),
    generateKeyPairSync('ed25519').privateKey.export({ format: 'jwk' }),
  ];
}

/** lib/oidc.ts as a server started with `env` would load it. */
async function withEnv(env: Record<string, string>) {
  vi.resetModules();
  vi.unstubAllEnvs();
  delete (globalThis as Record<symbol, unknown>)[Symbol.for('gatehouse.shared-state')];
  for (const [name, value] of Object.entries(env)) vi.stubEnv(name, value);
  return import('../../lib/oidc.ts');
}
