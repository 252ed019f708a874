// Small helpers for integration tests that drive a running Gatehouse stack over HTTP and look at
// its Redis keys: a browser-like call with the session cookie, the dev IdP's grant counters, and
// bounded polling instead of fixed sleeps.
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Redis, type RedisOptions } from 'ioredis';
import { loginThroughRp } from '../../e2e/support/headless-login.ts';
import type { GrantCounters, IdpDelays } from '../../scripts/dev-idp.ts';

export const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';

export interface CallResult {
  status: number;
  /** Parsed JSON when the body is JSON, otherwise the raw text. */
  body: unknown;
  setCookies: string[];
  headers: Headers;
  ms: number;
}

/** One SPA-style request: the session cookie, `X-CSRF: 1`, never following redirects. */
export async function call(
  baseUrl: string,
  path: string,
  cookie: string | undefined,
  { method = 'GET', signal }: { method?: string; signal?: AbortSignal } = {},
): Promise<CallResult> {
  const started = performance.now();
  const headers = new Headers({ 'x-csrf': '1', accept: 'application/json' });
  if (cookie) headers.set('cookie', cookie);
  const res = await fetch(new URL(path, baseUrl), { method, headers, redirect: 'manual', signal });
  const text = await res.text();
  let body: unknown = text;
  if ((res.headers.get('content-type') ?? '').includes('json')) {
    try {
      body = JSON.parse(text) as unknown;
    } catch {
      // Keep the text: a broken JSON body is itself worth seeing in a failure message.
    }
  }
  return { status: res.status, body, setCookies: res.headers.getSetCookie(), headers: res.headers, ms: performance.now() - started };
}

/** A burst's answers counted by status and Gatehouse error code: `{ '200': 198, '503 idp_unavailable': 2 }` says in one line what went wrong. */
export function summarize(results: CallResult[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const result of results) {
    const label = `${result.status}${typeof result.body === 'object' && result.body && 'error' in result.body ? ` ${String(result.body.error)}` : ''}`;
    counts[label] = (counts[label] ?? 0) + 1;
  }
  return counts;
}

/** Logs `username` in through Gatehouse and the dev IdP; returns a ready `Cookie` header value. */
export async function login(appUrl: string, username: string): Promise<string> {
  const { rpCookies } = await loginThroughRp({ startUrl: `${appUrl}/api/auth/login`, username });
  const value = rpCookies.get('gatehouse');
  if (!value) throw new Error(`login of ${username} produced no gatehouse cookie (got ${[...rpCookies.keys()].join(', ') || 'none'})`);
  return `gatehouse=${value}`;
}

/** True when a Set-Cookie line clears the Gatehouse session cookie. */
export function clearsSessionCookie(setCookies: string[]): boolean {
  return setCookies.some((line) => /^gatehouse=;/.test(line) && /max-age=0/i.test(line));
}

export async function idpGrants(issuer: string): Promise<GrantCounters> {
  const res = await fetch(`${issuer}/__dev/grants`);
  if (!res.ok) throw new Error(`GET /__dev/grants answered ${res.status}`);
  return (await res.json()) as GrantCounters;
}

export async function resetIdpGrants(issuer: string): Promise<void> {
  const res = await fetch(`${issuer}/__dev/grants/reset`, { method: 'POST' });
  if (!res.ok) throw new Error(`POST /__dev/grants/reset answered ${res.status}`);
}

export async function revokeIdpGrants(issuer: string, sub: string): Promise<number> {
  const res = await fetch(`${issuer}/__dev/revoke-grants?sub=${encodeURIComponent(sub)}`, { method: 'POST' });
  if (!res.ok) throw new Error(`POST /__dev/revoke-grants answered ${res.status}`);
  return ((await res.json()) as { revoked: number }).revoked;
}

/** Makes the dev IdP's discovery and/or token endpoint slow; answers how many requests it delayed so far. */
export async function setIdpDelays(issuer: string, delays: Partial<IdpDelays>): Promise<IdpDelays & { delayed: { discovery: number; token: number } }> {
  const res = await fetch(`${issuer}/__dev/delays`, { method: 'POST', body: JSON.stringify(delays) });
  if (!res.ok) throw new Error(`POST /__dev/delays answered ${res.status}`);
  return (await res.json()) as IdpDelays & { delayed: { discovery: number; token: number } };
}

export function refreshGrantsOf(grants: GrantCounters, account: string): number {
  return grants.byAccount[account]?.refresh_token ?? 0;
}

/** RFC 8693's grant type: the dev IdP counts token exchanges under it. */
export const TOKEN_EXCHANGE_GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange';

export function exchangeGrantsOf(grants: GrantCounters, account: string): number {
  return grants.byAccount[account]?.[TOKEN_EXCHANGE_GRANT] ?? 0;
}

/**
 * The bearer token a demo API received last, asked of the API directly (its introspection route
 * answers no proxied caller): what Gatehouse sent upstream, which the browser must never see.
 */
export async function lastBearerAt(apiUrl: string): Promise<string> {
  const res = await fetch(`${apiUrl}/__demo/last`);
  if (!res.ok) throw new Error(`GET ${apiUrl}/__demo/last answered ${res.status}`);
  const { headers } = (await res.json()) as { headers: Record<string, string | undefined> };
  const token = /^Bearer (.+)$/.exec(headers.authorization ?? '')?.[1];
  if (!token) throw new Error(`the last request to ${apiUrl} carried no bearer token`);
  return token;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * Polls `probe` until it returns something other than undefined, at most `timeoutMs`; the error
 * names `what` so a failure says which condition never held.
 */
export async function waitFor<T>(what: string, probe: () => Promise<T | undefined> | T | undefined, timeoutMs = 10_000, intervalMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(Math.max(1, Math.min(intervalMs, deadline - Date.now())));
  }
}

/** Waits until the wall clock reaches `epochMs` (a deadline derived from observed state, not a guess). */
/** The demo API refuses every token issued before `beforeSec` (epoch seconds) as revoked; null lifts that. */
export async function revokeAtDemoApi(apiUrl: string, beforeSec: number | null): Promise<void> {
  const res = await fetch(`${apiUrl}/__demo/revoke`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ before: beforeSec }) });
  if (res.status !== 200) throw new Error(`the demo API answered ${res.status} to a revocation`);
}

export async function waitUntil(what: string, epochMs: number, maxWaitMs = 60_000): Promise<void> {
  await waitFor(what, () => (Date.now() >= epochMs ? true : undefined), maxWaitMs, 100);
}

/** The stored session record as Gatehouse wrote it (tokens stay encrypted in `sealed`). */
export interface StoredSessionRecord {
  sub: string;
  createdAt: number;
  absoluteExpiresAt: number;
  accessTokenExpiresAt: number | null;
  sealed: string;
}

/** Read-only view on one stack's Redis keys. */
export class RedisProbe {
  readonly redis: Redis;
  readonly keyPrefix: string;

  constructor(keyPrefix: string, url = REDIS_URL, options: RedisOptions = {}) {
    this.redis = new Redis(url, { lazyConnect: false, maxRetriesPerRequest: 2, ...options });
    this.keyPrefix = keyPrefix;
  }

  async keys(kind: 'session' | 'refresh-lock'): Promise<string[]> {
    const found: string[] = [];
    let cursor = '0';
    do {
      const [next, batch] = await this.redis.scan(cursor, 'MATCH', `${this.keyPrefix}${kind}:*`, 'COUNT', 1000);
      cursor = next;
      found.push(...batch);
    } while (cursor !== '0');
    return found;
  }

  /** The session key of `sub`'s only session (records name their subject in clear). */
  async sessionKeyOf(sub: string): Promise<string | undefined> {
    const matches: string[] = [];
    for (const key of await this.keys('session')) {
      const raw = await this.redis.get(key);
      if (raw && (JSON.parse(raw) as StoredSessionRecord).sub === sub) matches.push(key);
    }
    if (matches.length > 1) throw new Error(`${sub} has ${matches.length} sessions; the tests expect one`);
    return matches[0];
  }

  async record(key: string): Promise<StoredSessionRecord | undefined> {
    const raw = await this.redis.get(key);
    return raw === null ? undefined : (JSON.parse(raw) as StoredSessionRecord);
  }

  /** Waits until `sub`'s stored access token is due (its expiry less the refresh skew), read from the store. */
  async waitUntilDue(sub: string, skewSec: number): Promise<void> {
    const key = await this.sessionKeyOf(sub);
    const expiresAt = key ? (await this.record(key))?.accessTokenExpiresAt : undefined;
    if (!expiresAt) throw new Error(`${sub}: no stored access token expiry`);
    await waitUntil(`${sub}'s token to become due`, expiresAt - skewSec * 1000 + 50);
  }

  /** The refresh lock that belongs to a session key (same id, same hash tag). */
  lockKeyFor(sessionKey: string): string {
    return sessionKey.replace(`${this.keyPrefix}session:`, `${this.keyPrefix}refresh-lock:`);
  }

  async exists(key: string): Promise<boolean> {
    return (await this.redis.exists(key)) === 1;
  }

  /** Removes everything under the prefix (the stack's own keys only). */
  async cleanup(): Promise<void> {
    const keys = [...(await this.keys('session')), ...(await this.keys('refresh-lock'))];
    if (keys.length) await this.redis.del(...keys);
  }

  async close(): Promise<void> {
    await this.redis.quit().catch(() => this.redis.disconnect());
  }
}

/** The sessions of a test file's users: each one's cookie and session key, or an error naming the user. */
export interface SignedInUsers {
  cookieOf(user: string): string;
  keyOf(user: string): string;
}

/**
 * Signs every user in at once, alternating over `apps`, so their tokens come due together and a
 * file waits for "due" only once. Each user must then have exactly one session key in Redis.
 */
export async function signInAll(users: readonly string[], apps: readonly string[], probe: RedisProbe): Promise<SignedInUsers> {
  const cookies = new Map<string, string>();
  const keys = new Map<string, string>();
  await Promise.all(
    users.map(async (user, index) => {
      cookies.set(user, await login(apps[index % apps.length] as string, user));
      const key = await probe.sessionKeyOf(user);
      if (!key) throw new Error(`no session key in Redis for ${user}`);
      keys.set(user, key);
    }),
  );
  const lookUp = (table: Map<string, string>, what: string) => (user: string) => {
    const value = table.get(user);
    if (!value) throw new Error(`no ${what} for ${user}`);
    return value;
  };
  return { cookieOf: lookUp(cookies, 'session'), keyOf: lookUp(keys, 'session key') };
}

/**
 * Every process of a spawned process tree (the cluster primary and its workers), children first
 * read from /proc, so a test can SIGKILL a whole Gatehouse instance by pid.
 */
export function processTree(pid: number): number[] {
  const pids = [pid];
  for (let i = 0; i < pids.length; i++) {
    const current = pids[i] as number;
    let children: string;
    try {
      children = readFileSync(`/proc/${current}/task/${current}/children`, 'utf8');
    } catch {
      continue; // already gone
    }
    for (const child of children.trim().split(/\s+/).filter(Boolean)) pids.push(Number(child));
  }
  return pids;
}

/** False once the process is gone or only a zombie waiting to be reaped (it runs no code any more). */
export function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // "pid (comm) S ...": the state follows the last closing parenthesis.
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

interface TcpRow {
  localPort: number;
  remotePort: number;
  /** The kernel's state code: '01' ESTABLISHED, '08' CLOSE_WAIT, … */
  state: string;
  unreadBytes: number;
}

/** Every TCP socket of this machine, from the kernel's socket tables. */
function* tcpRows(): Generator<TcpRow> {
  const portOf = (address: string) => Number.parseInt(address.slice(address.lastIndexOf(':') + 1), 16);
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let rows: string[];
    try {
      rows = readFileSync(table, 'utf8').trim().split('\n').slice(1);
    } catch {
      continue; // no IPv6 on this machine
    }
    for (const row of rows) {
      // "sl local_address rem_address st tx_queue:rx_queue ...", addresses as HEXIP:HEXPORT.
      const [, local, remote, state, queues] = row.trim().split(/\s+/);
      if (!local || !remote || !state || !queues) continue;
      yield { localPort: portOf(local), remotePort: portOf(remote), state, unreadBytes: Number.parseInt(queues.slice(queues.indexOf(':') + 1), 16) };
    }
  }
}

/**
 * Bytes that clients have sent to a local server on `port` and that it has not read yet, from the
 * kernel's socket table. With the server frozen (SIGSTOP) this is how a test knows a request has
 * left the client and is waiting in the server's socket — "in flight" as a fact, not a guess.
 */
export function unreadBytesAt(port: number): number {
  const ESTABLISHED = '01';
  let unread = 0;
  for (const row of tcpRows()) if (row.state === ESTABLISHED && row.localPort === port) unread += row.unreadBytes;
  return unread;
}

/**
 * Whether the server on `serverPort` still holds its end of the connection from a client's
 * `clientPort` (open, or closed by the client and not yet by the server): how a test knows the
 * server has noticed a client that left.
 */
export function serverHoldsConnection(serverPort: number, clientPort: number): boolean {
  const CLOSE_WAIT = '08';
  const ESTABLISHED = '01';
  for (const row of tcpRows()) {
    if (row.localPort === serverPort && row.remotePort === clientPort && (row.state === ESTABLISHED || row.state === CLOSE_WAIT)) return true;
  }
  return false;
}

/**
 * The app's output from `since` on, once everything logged before this call is in it. Log lines are
 * written asynchronously, so a marker request whose warning (`proxy.location_dropped`, through the
 * demo API's `redirect`) comes after them tells when they are out. The dropped value is not logged:
 * a Location may carry a signature or a token of the API's.
 */
export async function logSoFar(appUrl: string, cookie: string, output: () => string, since: number): Promise<string> {
  const secret = `marker-${randomUUID()}`;
  const answer = await call(appUrl, `/api/proxy/demo/redirect?to=${encodeURIComponent(`${appUrl}/api/auth/${secret}`)}`, cookie);
  if (answer.headers.get('location') !== null) throw new Error('the marker redirect was not dropped');
  const requestId = answer.headers.get('x-request-id') as string;
  const line = await waitFor('the marker line', () => output().slice(since).split('\n').find((entry) => entry.includes('"event":"proxy.location_dropped"') && entry.includes(requestId)), 5_000);
  if (line.includes(secret)) throw new Error(`the dropped Location was logged: ${line}`);
  return output().slice(since);
}
