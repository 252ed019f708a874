import { X509Certificate, createPrivateKey, type JsonWebKey as NodeJwk } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { ACR_VALUE, MAX_ACR_VALUES, MAX_ACR_VALUES_LENGTH, MAX_AGE_LIMIT_SEC, parseAcrValues, parseMaxAge } from './step-up.ts';
import { isSentinelUrl, parseSentinelUrl } from './store/sentinel-url.ts';

/**
 * The whole configuration, read from the environment once, on first use. Validating at import
 * time would break `next build`, which imports route modules without any secrets present.
 */
export type SpaSource =
  | { kind: 'dir'; dir: string; contentSecurityPolicy: string | undefined }
  | { kind: 'origin'; url: URL; contentSecurityPolicy: string | undefined };

export interface Config {
  appBaseUrl: URL;
  /** Secure cookies and the `__Host-` prefix: everywhere except plain-http loopback. */
  secureCookies: boolean;
  oidc: {
    issuer: URL;
    clientId: string;
    clientAuth: 'client_secret_basic' | 'client_secret_post' | 'private_key_jwt';
    clientSecret: string | undefined;
    privateKeyJwk: JsonWebKeyWithKid | undefined;
    scopes: string;
    /** Extra authorization request parameters some IdPs need (Google's access_type, Auth0's audience). */
    authorizationParams: Array<[string, string]>;
    /** RFC 9126 even where the IdP does not require it; an IdP that does is obeyed either way. */
    usePar: boolean;
    /** RFC 9449: each session's tokens are bound to a key pair of its own (lib/dpop.ts). */
    dpop: boolean;
    redirectUri: string;
    postLogoutRedirectUri: string;
    /** http:// endpoints are allowed only when the issuer is on loopback. */
    allowInsecureRequests: boolean;
    timeoutMs: number;
  };
  session: {
    /** First entry seals, every entry unseals. */
    secrets: string[];
    /** First entry encrypts, every entry decrypts. */
    tokenKeys: string[];
    cookieName: string;
    sameSite: 'strict' | 'lax';
    idleTimeoutSec: number;
    absoluteTimeoutSec: number;
    /** The sliding expiry is pushed forward at most this often per session, not on every call. */
    touchIntervalSec: number;
  };
  /** `forcedIntervalSec`: an upstream 401 forces at most one refresh per session this often. */
  /** `waitMs`: how long a call waits for a refresh (its own or another instance's) before it goes on with the token held, or answers 503. */
  refresh: { skewSec: number; lockLeaseMs: number; forcedIntervalSec: number; waitMs: number };
  store:
    | { kind: 'memory' }
    | { kind: 'redis'; url: string; tlsCa?: string; sentinelPassword?: string }
    | { kind: 'upstash'; url: string; token: string };
  keyPrefix: string;
  apis: Record<string, ApiConfig>;
  /** Reverse proxies in front of Gatehouse whose X-Forwarded-For entries are believed (the last N). */
  trustedProxyHops: number;
  /**
   * Bounds on what one browser holds of the proxy: how long an answer may wait for the browser to
   * take more of it, and how many calls of one user may be open at once in one process.
   */
  proxy: { sendTimeoutMs: number; maxCallsPerUser: number };
  /** A built SPA served on this origin, from a folder or from another origin, with the CSP for its pages. */
  spa: SpaSource | undefined;
  logLevel: 'debug' | 'info' | 'warn' | 'error' | 'silent';
  /** For `npm start` (server.ts) only. */
  server: { port: number; hostname: string; workers: number; drainMs: number };
  /** `npm start` only: how often each open WebSocket's session is looked up (it may have ended elsewhere). */
  websocket: { sessionCheckIntervalSec: number };
  /** The Prometheus scrape endpoint (lib/telemetry-sdk.ts): never on the public port; off without a port. */
  metrics: { port: number | undefined; hostname: string };
}

export interface JsonWebKeyWithKid extends JsonWebKey {
  kid?: string;
}

export interface ApiConfig {
  name: string;
  url: URL;
  auth: 'user' | 'user-optional' | 'client' | 'none';
  scope: string | undefined;
  resource: string | undefined;
  /** RFC 8693: the API's token is the session's access token exchanged for one meant for it. */
  tokenExchange: TokenExchangeTarget | undefined;
  timeoutMs: number;
  maxBodyBytes: number;
  /** The session's sign-in must have one of these ACRs, or the call is refused with `step_up_required`. */
  acr?: string[];
  /** Seconds: the session's sign-in must be at most this old, or the call is refused with `step_up_required`. */
  maxAge?: number;
  /** Present the session's token as `DPoP` with a proof per request, instead of as a bearer (unset: bearer). */
  dpop?: boolean;
  /** WebSocket upgrades through `/api/proxy/<name>/…` (lib/websocket.ts, `npm start` only); absent means no. */
  websocket?: boolean;
}

export interface TokenExchangeTarget {
  audience: string;
  scope: string | undefined;
}

/** The curves WebCrypto's ECDSA signs with (Node's names for P-256, P-384 and P-521). */
const SIGNING_CURVES = new Set(['prime256v1', 'secp384r1', 'secp521r1']);

const LOOPBACK_HOSTS = new Set(['localhost', '127.0.0.1', '[::1]']);

export function isLoopback(url: URL): boolean {
  return LOOPBACK_HOSTS.has(url.hostname);
}

/** https anywhere; http only on loopback, so a production build can be tested locally. */
const endpointUrl = z
  .string({ error: 'is required' })
  .trim()
  .min(1, 'is required')
  .transform((value, ctx) => {
    let url: URL;
    try {
      url = new URL(value);
    } catch {
      ctx.addIssue({ code: 'custom', message: `is not a URL ("${value.slice(0, 80)}")` });
      return z.NEVER;
    }
    if (url.protocol !== 'https:' && !(url.protocol === 'http:' && isLoopback(url))) {
      ctx.addIssue({ code: 'custom', message: 'must be https:// (http:// is accepted only for localhost, 127.0.0.1 and [::1])' });
      return z.NEVER;
    }
    if (url.username || url.password) {
      ctx.addIssue({ code: 'custom', message: 'must not contain credentials' });
      return z.NEVER;
    }
    // Each of these is an origin or a base that paths are joined to: a query or a fragment on it
    // would be dropped or sent along with every request, never what was meant (an issuer may have
    // neither, OpenID Connect Discovery says).
    // `?` or `#` anywhere, an empty one too (`https://x?`, which the parser keeps no trace of).
    if (/[?#]/.test(value)) {
      ctx.addIssue({ code: 'custom', message: 'must not contain a query (?…) or a fragment (#…)' });
      return z.NEVER;
    }
    return url;
  });

/**
 * A typed or placeholder secret ("x" × 32, "changeme" over and over, a word padded out) meets the
 * length rule and still falls to a guess. Random output has at least 6 different characters at
 * 32 or more (of 32 random decimal digits about one string in 17 million has fewer, of hex
 * digits one in 3 trillion) and is never one piece repeated: a word repeated is caught by that.
 */
function looksRandom(secret: string): boolean {
  if (new Set(secret).size < 6) return false;
  // A piece repeated (its last copy may be cut short); pieces of over 64 characters are nobody's typing.
  for (let period = 1; period <= Math.min(secret.length / 2, 64); period++) {
    if (secret.slice(period) === secret.slice(0, -period)) return false;
  }
  return true;
}

const secretList = (minLength: number) =>
  z
    .string({ error: 'is required' })
    .transform((value) => value.split(',').map((entry) => entry.trim()).filter(Boolean))
    .refine((list) => list.length > 0, 'is required')
    .refine((list) => list.every((entry) => entry.length >= minLength), `every comma-separated entry must be at least ${minLength} characters`)
    .refine((list) => list.every((entry) => entry.length < minLength || looksRandom(entry)), 'every comma-separated entry must be random, not a word or a pattern (at least 6 different characters, no piece repeated over and over): `openssl rand -base64 48` makes one')
    .refine((list) => new Set(list).size === list.length, 'must not list the same secret twice');

/** Parameters that carry the flow's security (PKCE, state, nonce, redirect) are never configurable. */
const RESERVED_AUTHORIZATION_PARAMS = new Set([
  'response_type',
  'client_id',
  'redirect_uri',
  'scope',
  'state',
  'nonce',
  'code_challenge',
  'code_challenge_method',
  'response_mode',
  'request',
  'request_uri',
  'dpop_jkt',
]);

/** The directives of CSP Level 3 and those browsers still take: a line that begins with one begins a directive. */
const CSP_DIRECTIVES = new Set(
  [
    ...['default-src', 'script-src', 'script-src-elem', 'script-src-attr', 'style-src', 'style-src-elem', 'style-src-attr', 'img-src', 'font-src', 'connect-src', 'media-src'],
    ...['object-src', 'child-src', 'frame-src', 'worker-src', 'manifest-src', 'prefetch-src', 'fenced-frame-src', 'base-uri', 'form-action', 'frame-ancestors', 'sandbox'],
    ...['report-uri', 'report-to', 'upgrade-insecure-requests', 'block-all-mixed-content', 'require-trusted-types-for', 'trusted-types', 'webrtc', 'plugin-types', 'navigate-to'],
  ],
);

/**
 * A policy written over several lines as one line. A line that begins with a directive's name
 * begins a directive (a `;` is put before it if the line above lacks one); any other line goes on
 * the one above, as the rest of its source list: a hash or `'strict-dynamic'` wrapped onto a line
 * of its own must stay in its directive, or the policy would be weaker than written.
 */
function oneLinePolicy(policy: string): string {
  let joined = '';
  for (const line of policy.split(/[\r\n]+/).map((text) => text.trim()).filter(Boolean)) {
    const startsDirective = CSP_DIRECTIVES.has((/^[a-z-]+/i.exec(line)?.[0] ?? '').toLowerCase());
    joined = !joined ? line : `${joined}${startsDirective && !joined.endsWith(';') ? ';' : ''} ${line}`;
  }
  return joined;
}

const seconds = (fallback: number) => z.coerce.number().int().positive().default(fallback);

const acrValue = z.string().regex(ACR_VALUE, 'an ACR value is 1 to 128 URI characters (no spaces or quotes)');

const apiSchema = z
  .object({
    url: endpointUrl,
    auth: z.enum(['user', 'user-optional', 'client', 'none']).default('user'),
    scope: z.string().trim().min(1).optional(),
    // RFC 8707: an absolute URI without a fragment.
    resource: z.url().refine((value) => !value.includes('#'), 'must not contain a fragment (RFC 8707)').optional(),
    tokenExchange: z
      .object({
        audience: z.string({ error: 'is required: the audience the IdP issues the exchanged token for' }).trim().min(1, 'must not be empty'),
        scope: z.string({ error: 'must be a string of space-separated scopes' }).trim().min(1, 'must not be empty (leave it out for the IdP\'s default)').optional(),
      })
      .strict()
      .optional(),
    timeoutMs: z.number().int().positive().max(600_000).default(30_000),
    maxBodyBytes: z.number().int().nonnegative().default(10 * 1024 * 1024),
    acr: z
      .union([acrValue, z.array(acrValue).min(1).max(MAX_ACR_VALUES)])
      .transform((value) => [...new Set([value].flat())])
      .optional(),
    // Zero would refuse every call, a fresh sign-in's included: no sign-in is younger than the call it allows.
    maxAge: z.number().int().positive().max(MAX_AGE_LIMIT_SEC).optional(),
    dpop: z.boolean().default(false),
    websocket: z.boolean().default(false),
  })
  .strict()
  .superRefine((api, ctx) => {
    // Both would name the token's audience, each its own way, and only one token can be sent.
    if (api.tokenExchange && api.resource) ctx.addIssue({ code: 'custom', message: 'set "resource" or "tokenExchange", not both' });
    // Only a user's session has an access token to exchange.
    if (api.tokenExchange && (api.auth === 'client' || api.auth === 'none')) {
      ctx.addIssue({ code: 'custom', path: ['tokenExchange'], message: `needs auth "user" or "user-optional" (a session's token is what gets exchanged), not "${api.auth}"` });
    }
    // A user's token carries the scopes of the user's grant: a scope here would be ignored, and the
    // API would get more than it says.
    if (api.scope !== undefined && api.auth !== 'client') {
      ctx.addIssue({ code: 'custom', path: ['scope'], message: `applies to auth "client" only (its client-credentials grant); a user's token has the scopes of the sign-in (OIDC_SCOPES)${api.tokenExchange ? ', an exchanged one those of tokenExchange.scope' : ''}` });
    }
  });

const apisSchema = z
  .string({ error: 'is required (JSON, e.g. {"todos":{"url":"https://api.example.com/v1"}})' })
  .transform((value, ctx) => {
    try {
      return JSON.parse(value) as unknown;
    } catch {
      ctx.addIssue({ code: 'custom', message: 'is not valid JSON' });
      return z.NEVER;
    }
  })
  .pipe(z.record(z.string().regex(/^[a-z0-9][a-z0-9_-]{0,62}$/, 'API names are lowercase letters, digits, "-" and "_"'), apiSchema));

const envSchema = z.object({
  // Next runs any other value as a production server (with a warning), while the production checks
  // here would not apply: a missing REDIS_URL under `staging` would quietly be the in-memory store.
  NODE_ENV: z.enum(['production', 'development', 'test'], { error: 'must be production, development or test (other values run Next as production without its production checks here)' }).optional(),
  APP_BASE_URL: endpointUrl,
  OIDC_ISSUER: endpointUrl,
  OIDC_CLIENT_ID: z.string({ error: 'is required' }).trim().min(1, 'is required'),
  OIDC_CLIENT_SECRET: z.string().trim().min(1).optional(),
  OIDC_CLIENT_AUTH: z.enum(['client_secret_basic', 'client_secret_post', 'private_key_jwt']).default('client_secret_basic'),
  OIDC_PRIVATE_KEY: z
    .string()
    .optional()
    .transform((value, ctx) => {
      if (value === undefined) return undefined;
      let jwk: JsonWebKeyWithKid;
      try {
        jwk = JSON.parse(value) as JsonWebKeyWithKid;
        if (typeof jwk !== 'object' || jwk === null || typeof jwk.kty !== 'string' || typeof jwk.d !== 'string') throw new Error();
      } catch {
        ctx.addIssue({ code: 'custom', message: 'must be a private JWK as JSON' });
        return z.NEVER;
      }
      // Imported here, not at the first login: a key that cannot sign would otherwise let the server
      // start healthy and fail every sign-in and refresh with a 500 that names nothing.
      let signing: string | undefined;
      try {
        const key = createPrivateKey({ key: jwk as NodeJwk, format: 'jwk' });
        const curve = key.asymmetricKeyDetails?.namedCurve;
        if (key.asymmetricKeyType === 'rsa' || key.asymmetricKeyType === 'ed25519' || (key.asymmetricKeyType === 'ec' && curve && SIGNING_CURVES.has(curve))) signing = key.asymmetricKeyType;
      } catch {
        // Not importable at all: said below.
      }
      if (!signing) {
        ctx.addIssue({ code: 'custom', message: 'must be a complete private signing key as a JWK: RSA, EC on P-256, P-384 or P-521, or Ed25519' });
        return z.NEVER;
      }
      return jwk;
    }),
  OIDC_SCOPES: z.string().trim().default('openid profile email offline_access').refine((s) => s.split(/\s+/).includes('openid'), 'must include "openid"'),
  OIDC_AUTHORIZATION_PARAMS: z
    .string()
    .optional()
    .transform((value, ctx) => {
      const pairs = [...new URLSearchParams(value ?? '')];
      const reserved = pairs.map(([name]) => name).filter((name) => RESERVED_AUTHORIZATION_PARAMS.has(name));
      if (reserved.length) {
        ctx.addIssue({ code: 'custom', message: `must not set ${reserved.join(', ')}: Gatehouse sets those itself` });
        return z.NEVER;
      }
      // The request carries one value per name (lib/oidc.ts), and the floor below reads them: a second
      // value would be dropped on the way to the IdP, or checked without being asked for.
      const repeated = [...new Set(pairs.map(([name]) => name).filter((name, index, names) => names.indexOf(name) !== index))];
      if (repeated.length) {
        ctx.addIssue({ code: 'custom', message: `sets ${repeated.join(', ')} more than once: give each parameter once` });
        return z.NEVER;
      }
      // A floor every login carries in its attempt's cookie (lib/auth.ts withStepUpFloor): bounded as a link's own.
      const acrValues = pairs.find(([name]) => name === 'acr_values');
      if (acrValues && !parseAcrValues(acrValues[1])) {
        ctx.addIssue({ code: 'custom', message: `acr_values must be one list of up to ${MAX_ACR_VALUES} ACR values separated by spaces, ${MAX_ACR_VALUES_LENGTH} characters in all` });
        return z.NEVER;
      }
      // One the callback could not read would go to the IdP unchecked, a floor in name only.
      const maxAge = pairs.find(([name]) => name === 'max_age');
      if (maxAge && parseMaxAge(maxAge[1]) === undefined) {
        ctx.addIssue({ code: 'custom', message: `max_age must be a whole number of seconds (digits only), at most ${MAX_AGE_LIMIT_SEC}` });
        return z.NEVER;
      }
      return pairs;
    }),
  OIDC_USE_PAR: z.stringbool({ error: 'must be true or false' }).default(false),
  OIDC_DPOP: z.stringbool({ error: 'must be true or false' }).default(false),
  OIDC_TIMEOUT_MS: z.coerce.number().int().positive().max(60_000).default(10_000),
  SESSION_SECRET: secretList(32),
  TOKEN_ENCRYPTION_KEY: secretList(32).optional(),
  SESSION_COOKIE_NAME: z
    .string()
    .regex(/^[A-Za-z0-9_-]{1,64}$/, 'letters, digits, "-" and "_" only')
    // Gatehouse adds `__Host-` itself on https; a prefix of the operator's own (browsers read any `__`
    // name as one, in any letter case) would make browsers refuse every cookie it sets.
    .refine((name) => !name.startsWith('__'), 'must not start with "__": Gatehouse adds the __Host- prefix itself on https')
    .default('gatehouse'),
  SESSION_COOKIE_SAMESITE: z.enum(['strict', 'lax']).default('strict'),
  SESSION_IDLE_TIMEOUT: seconds(8 * 3600),
  SESSION_ABSOLUTE_TIMEOUT: seconds(7 * 24 * 3600),
  SESSION_TOUCH_INTERVAL: seconds(60),
  TOKEN_REFRESH_SKEW: z.coerce.number().int().nonnegative().default(30),
  // Timers: one past 2^31 ms fires at once (Node), so each has a bound well below that.
  REFRESH_LOCK_LEASE_MS: z.coerce.number().int().positive().max(600_000).default(25_000),
  REFRESH_WAIT_MS: z.coerce.number().int().positive().max(60_000).default(2_000),
  FORCED_REFRESH_INTERVAL: seconds(60),
  SESSION_STORE: z.enum(['memory', 'redis', 'upstash']).optional(),
  REDIS_URL: z
    .string()
    .trim()
    .regex(/^rediss?(\+sentinel)?:\/\//, 'must start with redis://, rediss://, redis+sentinel:// or rediss+sentinel://')
    .superRefine((value, ctx) => {
      if (!isSentinelUrl(value)) return;
      try {
        parseSentinelUrl(value);
      } catch (error) {
        ctx.addIssue({ code: 'custom', message: (error as Error).message });
      }
    })
    .optional(),
  REDIS_TLS_CA: z.string().trim().min(1).optional(),
  REDIS_SENTINEL_PASSWORD: z.string().min(1).optional(),
  UPSTASH_REDIS_REST_URL: endpointUrl.optional(),
  UPSTASH_REDIS_REST_TOKEN: z.string().trim().min(1).optional(),
  REDIS_KEY_PREFIX: z.string().regex(/^[A-Za-z0-9:_-]{1,64}$/).default('gatehouse:'),
  BFF_APIS: apisSchema,
  TRUSTED_PROXY_HOPS: z.coerce.number().int().min(0).max(16).default(0),
  PROXY_SEND_TIMEOUT_MS: z.coerce.number().int().min(1_000).max(3_600_000).default(60_000),
  PROXY_MAX_CALLS_PER_USER: z.coerce.number().int().positive().max(100_000).default(256),
  SPA_DIR: z.string().trim().min(1).optional(),
  SPA_UPSTREAM_URL: endpointUrl.optional(),
  // A header value: a policy written over several lines (as in a .env file) becomes one line; any
  // other control or non-ASCII character would make every page fail when the header is written.
  SPA_CONTENT_SECURITY_POLICY: z.string().transform(oneLinePolicy)
    .pipe(z.string().min(1).regex(/^[\t\x20-\x7e]+$/, 'must be printable ASCII (a header value)'))
    .optional(),
  LOG_LEVEL: z.enum(['debug', 'info', 'warn', 'error', 'silent']).default('info'),
  PORT: z.coerce.number().int().min(0).max(65_535).default(3000),
  HOSTNAME: z.string().trim().min(1).default('0.0.0.0'),
  GATEHOUSE_WORKERS: z.coerce.number().int().min(1).max(256).optional(),
  GATEHOUSE_DRAIN_MS: z.coerce.number().int().min(0).max(3_600_000).default(30_000),
  WEBSOCKET_SESSION_CHECK_INTERVAL: seconds(30).pipe(z.number().max(86_400)),
  METRICS_PORT: z.coerce.number({ error: 'must be a port number (1-65535)' }).int('must be a port number (1-65535)').min(1, 'must be a port number (1-65535)').max(65_535, 'must be a port number (1-65535)').optional(),
  METRICS_HOST: z.string().trim().min(1).default('127.0.0.1'),
});

/** Every variable Gatehouse reads; the README's configuration table is checked against this list. */
export const CONFIG_VARIABLES: readonly string[] = Object.keys(envSchema.shape).filter((name) => name !== 'NODE_ENV');

type Env = z.output<typeof envSchema>;

export class ConfigError extends Error {
  readonly problems: string[];
  constructor(problems: string[]) {
    super(`Gatehouse configuration is invalid:\n${problems.map((p) => `  - ${p}`).join('\n')}`);
    this.name = 'ConfigError';
    this.problems = problems;
  }
}

/** Checks that need several variables at once; each problem still names its variable. */
function crossCheck(env: Partial<Env>): string[] {
  const problems: string[] = [];
  const production = env.NODE_ENV === 'production';
  if (env.OIDC_CLIENT_AUTH === 'private_key_jwt' && !env.OIDC_PRIVATE_KEY) {
    problems.push('OIDC_PRIVATE_KEY: is required when OIDC_CLIENT_AUTH=private_key_jwt');
  }
  if (env.OIDC_CLIENT_AUTH !== 'private_key_jwt' && !env.OIDC_CLIENT_SECRET) {
    problems.push(`OIDC_CLIENT_SECRET: is required when OIDC_CLIENT_AUTH=${env.OIDC_CLIENT_AUTH}`);
  }
  // The IdP holds the client secret: whoever runs it could then seal session cookies or open stored tokens.
  for (const name of ['SESSION_SECRET', 'TOKEN_ENCRYPTION_KEY'] as const) {
    if (env.OIDC_CLIENT_SECRET && env[name]?.includes(env.OIDC_CLIENT_SECRET)) problems.push(`${name}: must not be OIDC_CLIENT_SECRET (the identity provider knows that one)`);
  }
  if (env.SESSION_IDLE_TIMEOUT !== undefined && env.SESSION_ABSOLUTE_TIMEOUT !== undefined && env.SESSION_IDLE_TIMEOUT > env.SESSION_ABSOLUTE_TIMEOUT) {
    problems.push('SESSION_IDLE_TIMEOUT: must not be longer than SESSION_ABSOLUTE_TIMEOUT');
  }
  if (env.REFRESH_LOCK_LEASE_MS !== undefined && env.OIDC_TIMEOUT_MS !== undefined && env.REFRESH_LOCK_LEASE_MS <= env.OIDC_TIMEOUT_MS) {
    // A lease shorter than the token call would let a second instance refresh while the first still waits.
    problems.push('REFRESH_LOCK_LEASE_MS: must be longer than OIDC_TIMEOUT_MS');
  }
  const hasUpstash = Boolean(env.UPSTASH_REDIS_REST_URL || env.UPSTASH_REDIS_REST_TOKEN);
  if (hasUpstash && !(env.UPSTASH_REDIS_REST_URL && env.UPSTASH_REDIS_REST_TOKEN)) {
    problems.push(`${env.UPSTASH_REDIS_REST_URL ? 'UPSTASH_REDIS_REST_TOKEN' : 'UPSTASH_REDIS_REST_URL'}: Upstash needs both UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN`);
  }
  if (env.SESSION_STORE === 'redis' && !env.REDIS_URL) problems.push('REDIS_URL: is required when SESSION_STORE=redis');
  if (env.REDIS_TLS_CA && !/^rediss(\+sentinel)?:\/\//.test(env.REDIS_URL ?? '')) {
    problems.push('REDIS_TLS_CA: only used for TLS, with a rediss:// or rediss+sentinel:// REDIS_URL');
  }
  if (env.REDIS_SENTINEL_PASSWORD && !isSentinelUrl(env.REDIS_URL ?? '')) {
    problems.push('REDIS_SENTINEL_PASSWORD: only used with a redis+sentinel:// or rediss+sentinel:// REDIS_URL');
  }
  if (env.REDIS_TLS_CA) {
    const problem = tlsCaProblem(env.REDIS_TLS_CA);
    if (problem) problems.push(`REDIS_TLS_CA: ${problem}`);
  }
  if (env.SESSION_STORE === 'upstash' && !hasUpstash) problems.push('UPSTASH_REDIS_REST_URL: is required when SESSION_STORE=upstash');
  if (production && !env.SESSION_STORE && !env.REDIS_URL && !hasUpstash) {
    problems.push(
      'REDIS_URL: a session store is required in production (set REDIS_URL, or UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN; SESSION_STORE=memory only for a single-instance trial)',
    );
  }
  // The scrape endpoint must never answer on the public port, where the browser's requests arrive.
  if (env.METRICS_PORT !== undefined && env.METRICS_PORT === (env.PORT ?? 3000)) problems.push(`METRICS_PORT: must differ from PORT (${env.METRICS_PORT}): metrics are never served on the public port`);
  if (env.SPA_DIR && env.SPA_UPSTREAM_URL) problems.push('SPA_UPSTREAM_URL: set SPA_DIR or SPA_UPSTREAM_URL, not both');
  if (env.SPA_DIR && !existsSync(path.join(path.resolve(env.SPA_DIR), 'index.html'))) {
    problems.push(`SPA_DIR: no index.html in ${path.resolve(env.SPA_DIR)} (point it at the SPA's build output)`);
  }
  for (const [name, api] of Object.entries(env.BFF_APIS ?? {})) {
    if (api.auth === 'client' && env.OIDC_CLIENT_AUTH !== 'private_key_jwt' && !env.OIDC_CLIENT_SECRET) {
      problems.push(`BFF_APIS.${name}.auth: "client" needs client credentials`);
    }
    // Another mode would forward the call without a user whose sign-in could be checked.
    for (const field of ['acr', 'maxAge'] as const) {
      if (api[field] !== undefined && api.auth !== 'user') problems.push(`BFF_APIS.${name}.${field}: needs "auth": "user" (the default)`);
    }
    if (api.dpop && !env.OIDC_DPOP) {
      problems.push(`BFF_APIS.${name}.dpop: needs OIDC_DPOP=true (only then are the session's tokens bound to a key Gatehouse can prove)`);
    }
    if (api.dpop && (api.auth === 'client' || api.auth === 'none')) {
      // Only a session has a DPoP key: client-credentials tokens stay bearer tokens.
      problems.push(`BFF_APIS.${name}.dpop: only for auth "user" or "user-optional" (the user's token is the one bound)`);
    }
    if (api.dpop && api.tokenExchange) {
      // The exchange grant is made without a proof, so the exchanged token is a bearer token.
      problems.push(`BFF_APIS.${name}.dpop: not with "tokenExchange" (the exchanged token is not bound to the session's key)`);
    }
    if (api.websocket && api.auth !== 'user') {
      // A socket lives as long as its user's session and is closed when it ends: it needs one.
      problems.push(`BFF_APIS.${name}.websocket: needs "auth": "user" (a WebSocket is held for a signed-in user's session)`);
    }
    if (api.websocket && (api.dpop || api.tokenExchange)) {
      // The handshake carries the session's own token as a bearer, with no proof and no exchange.
      problems.push(`BFF_APIS.${name}.websocket: not with "dpop" or "tokenExchange" (the handshake carries the session's own bearer token)`);
    }
  }
  return problems;
}

/**
 * REDIS_TLS_CA holds the certificates themselves (a secret store's usual form, where newlines are
 * often written as `\n`) or names a PEM file.
 */
function tlsCaText(value: string): string {
  const text = value.includes('-----BEGIN CERTIFICATE-----') ? value.replaceAll('\\n', '\n') : readFileSync(value, 'utf8');
  return `${text.trim()}\n`;
}

function tlsCaProblem(value: string): string | undefined {
  let text: string;
  try {
    text = tlsCaText(value);
  } catch {
    return `neither PEM certificates nor a readable file (${value.length > 80 ? `${value.slice(0, 80)}…` : value})`;
  }
  try {
    new X509Certificate(text);
    return undefined;
  } catch {
    return 'not a PEM certificate (expected -----BEGIN CERTIFICATE-----)';
  }
}

function pickStore(env: Env): Config['store'] {
  const kind = env.SESSION_STORE ?? (env.UPSTASH_REDIS_REST_URL ? 'upstash' : env.REDIS_URL ? 'redis' : 'memory');
  if (kind === 'redis') {
    return {
      kind,
      url: env.REDIS_URL as string,
      ...(env.REDIS_TLS_CA ? { tlsCa: tlsCaText(env.REDIS_TLS_CA) } : {}),
      ...(env.REDIS_SENTINEL_PASSWORD ? { sentinelPassword: env.REDIS_SENTINEL_PASSWORD } : {}),
    };
  }
  if (kind === 'upstash') return { kind, url: (env.UPSTASH_REDIS_REST_URL as URL).href, token: env.UPSTASH_REDIS_REST_TOKEN as string };
  return { kind: 'memory' };
}

const OTEL_CHOICES: Record<string, readonly string[]> = {
  OTEL_TRACES_EXPORTER: ['otlp', 'none'],
  OTEL_METRICS_EXPORTER: ['otlp', 'none'],
  // gRPC would pull in a second transport stack; every collector also takes OTLP over HTTP.
  OTEL_EXPORTER_OTLP_PROTOCOL: ['http/protobuf', 'http/json'],
  OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: ['http/protobuf', 'http/json'],
  OTEL_EXPORTER_OTLP_METRICS_PROTOCOL: ['http/protobuf', 'http/json'],
  OTEL_TRACES_SAMPLER: ['always_on', 'always_off', 'traceidratio', 'parentbased_always_on', 'parentbased_always_off', 'parentbased_traceidratio'],
};

/**
 * The standard OpenTelemetry variables Gatehouse's SDK wiring (lib/telemetry-sdk.ts) understands,
 * checked with the rest so a typo stops the start instead of silently exporting nothing. They keep
 * their standard names and are documented under "Observability", not in the table above.
 */
function otelProblems(present: Record<string, string | undefined>): string[] {
  const problems: string[] = [];
  for (const [name, choices] of Object.entries(OTEL_CHOICES)) {
    const value = present[name]?.trim();
    if (value !== undefined && !choices.includes(value)) problems.push(`${name}: must be one of ${choices.join(', ')} (got "${value.slice(0, 40)}")`);
  }
  const ratio = present.OTEL_TRACES_SAMPLER_ARG;
  if (ratio !== undefined && !(Number(ratio) >= 0 && Number(ratio) <= 1)) problems.push('OTEL_TRACES_SAMPLER_ARG: must be a ratio between 0 and 1');
  // The exporters fall back to http://localhost:4318 on a value they cannot parse, silently.
  for (const name of ['OTEL_EXPORTER_OTLP_ENDPOINT', 'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT', 'OTEL_EXPORTER_OTLP_METRICS_ENDPOINT']) {
    const value = present[name]?.trim();
    // Not echoed: a value that is no URL may still hold a collector's credentials.
    if (value !== undefined && !(URL.canParse(value) && /^https?:$/.test(new URL(value).protocol))) problems.push(`${name}: must be an http(s) URL`);
  }
  const metricsHost = present.METRICS_HOST?.trim();
  // Host names as resolvers take them: compose service names may hold `_`, and a trailing dot is absolute.
  if (metricsHost !== undefined && isIP(metricsHost) === 0 && !/^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$/.test(metricsHost)) {
    problems.push(`METRICS_HOST: must be a host name or an IP address to listen on, without scheme or port (got "${metricsHost.slice(0, 40)}")`);
  }
  if (metricsHost !== undefined && present.METRICS_PORT === undefined) problems.push('METRICS_HOST: is set, but metrics are off until METRICS_PORT is set too');
  return problems;
}

export function parseConfig(source: Record<string, string | undefined>): Config {
  // Deployment dashboards often keep a variable with an empty value: that means "not set".
  const present = Object.fromEntries(Object.entries(source).filter(([, value]) => value !== undefined && value.trim() !== ''));
  const parsed = envSchema.safeParse(present);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((issue) => {
      const [variable, ...rest] = issue.path.map(String);
      const where = rest.length ? `${variable}.${rest.join('.')}` : variable;
      return `${where ?? '(environment)'}: ${issue.message}`;
    });
    // The checks across variables run too, on what did parse, so one start names every problem
    // instead of revealing them one fix at a time.
    const bad = new Set(parsed.error.issues.map((issue) => String(issue.path[0])));
    const usable = envSchema.partial().safeParse(Object.fromEntries(Object.entries(present).filter(([name]) => !bad.has(name))));
    if (usable.success) problems.push(...crossCheck(usable.data).filter((problem) => !bad.has(problem.slice(0, problem.indexOf(':')))));
    throw new ConfigError([...problems, ...otelProblems(present)]);
  }
  const env = parsed.data;
  const problems = [...crossCheck(env), ...otelProblems(present)];
  if (env.APP_BASE_URL.pathname !== '/' || env.APP_BASE_URL.search || env.APP_BASE_URL.hash) {
    // Cookies are scoped to Path=/ (required by the __Host- prefix), so Gatehouse owns the whole origin.
    problems.unshift('APP_BASE_URL: must be an origin such as https://app.example.com, without a path');
  }
  if (problems.length) throw new ConfigError(problems);

  const appBaseUrl = new URL(env.APP_BASE_URL.origin);
  const secureCookies = appBaseUrl.protocol === 'https:';
  const base = appBaseUrl.origin;
  return {
    appBaseUrl,
    secureCookies,
    oidc: {
      issuer: env.OIDC_ISSUER,
      clientId: env.OIDC_CLIENT_ID,
      clientAuth: env.OIDC_CLIENT_AUTH,
      clientSecret: env.OIDC_CLIENT_SECRET,
      privateKeyJwk: env.OIDC_PRIVATE_KEY,
      scopes: env.OIDC_SCOPES.split(/\s+/).join(' '),
      authorizationParams: env.OIDC_AUTHORIZATION_PARAMS,
      usePar: env.OIDC_USE_PAR,
      dpop: env.OIDC_DPOP,
      redirectUri: `${base}/api/auth/callback`,
      postLogoutRedirectUri: `${base}/`,
      allowInsecureRequests: env.OIDC_ISSUER.protocol === 'http:',
      timeoutMs: env.OIDC_TIMEOUT_MS,
    },
    session: {
      secrets: env.SESSION_SECRET,
      tokenKeys: env.TOKEN_ENCRYPTION_KEY ?? env.SESSION_SECRET,
      cookieName: secureCookies ? `__Host-${env.SESSION_COOKIE_NAME}` : env.SESSION_COOKIE_NAME,
      sameSite: env.SESSION_COOKIE_SAMESITE,
      idleTimeoutSec: env.SESSION_IDLE_TIMEOUT,
      absoluteTimeoutSec: env.SESSION_ABSOLUTE_TIMEOUT,
      touchIntervalSec: Math.min(env.SESSION_TOUCH_INTERVAL, env.SESSION_IDLE_TIMEOUT),
    },
    refresh: { skewSec: env.TOKEN_REFRESH_SKEW, lockLeaseMs: env.REFRESH_LOCK_LEASE_MS, forcedIntervalSec: env.FORCED_REFRESH_INTERVAL, waitMs: env.REFRESH_WAIT_MS },
    store: pickStore(env),
    keyPrefix: env.REDIS_KEY_PREFIX,
    apis: Object.fromEntries(
      Object.entries(env.BFF_APIS).map(([name, api]) => [
        name,
        {
          name,
          url: api.url,
          auth: api.auth,
          scope: api.scope,
          resource: api.resource,
          tokenExchange: api.tokenExchange && { audience: api.tokenExchange.audience, scope: api.tokenExchange.scope },
          timeoutMs: api.timeoutMs,
          maxBodyBytes: api.maxBodyBytes,
          ...(api.acr ? { acr: api.acr } : {}),
          ...(api.maxAge !== undefined ? { maxAge: api.maxAge } : {}),
          dpop: api.dpop,
          websocket: api.websocket,
        },
      ]),
    ),
    trustedProxyHops: env.TRUSTED_PROXY_HOPS,
    proxy: { sendTimeoutMs: env.PROXY_SEND_TIMEOUT_MS, maxCallsPerUser: env.PROXY_MAX_CALLS_PER_USER },
    spa: env.SPA_DIR
      ? { kind: 'dir', dir: path.resolve(env.SPA_DIR), contentSecurityPolicy: env.SPA_CONTENT_SECURITY_POLICY }
      : env.SPA_UPSTREAM_URL
        ? { kind: 'origin', url: env.SPA_UPSTREAM_URL, contentSecurityPolicy: env.SPA_CONTENT_SECURITY_POLICY }
        : undefined,
    logLevel: env.LOG_LEVEL,
    server: { port: env.PORT, hostname: env.HOSTNAME, workers: env.GATEHOUSE_WORKERS ?? availableParallelism(), drainMs: env.GATEHOUSE_DRAIN_MS },
    websocket: { sessionCheckIntervalSec: env.WEBSOCKET_SESSION_CHECK_INTERVAL },
    metrics: { port: env.METRICS_PORT, hostname: env.METRICS_HOST },
  };
}

let cached: Config | undefined;

/** Parses on first call and remembers the answer; a bad environment throws a ConfigError naming every variable. */
export function getConfig(): Config {
  cached ??= parseConfig(process.env);
  return cached;
}

/** For server start-up: print every problem and stop, rather than serve errors. */
export function exitOnInvalidConfig(): Config {
  try {
    return getConfig();
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    process.stderr.write(`${error.message}\n`);
    process.exit(1);
  }
}
