// "Redis Cluster ready: no command touches keys in two hash slots", on a real cluster: three
// redis-server masters (no replicas) on loopback, created with `redis-cli --cluster create`.
// First the store contract against the cluster, then a whole Gatehouse stack on it: login, a
// proxied call, a single-flight refresh under concurrency, the session list and a back-channel
// logout. A command spanning two slots would fail with CROSSSLOT and surface as 503
// store_unavailable, so every status is asserted exactly.
import { randomUUID } from 'node:crypto';
import { Cluster } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import { createRedisStore } from '../../lib/store/redis.ts';
import { call, idpGrants, login, refreshGrantsOf, waitFor, waitUntil, type CallResult } from '../support/http-client.ts';
import type { StoredSessionRecord } from '../support/http-client.ts';
import { startRedisCluster, type RedisCluster } from '../support/redis-cluster.ts';
import { ask } from '../support/redis-process.ts';
import { describeStoreContract } from '../support/store-contract.ts';

const ACCESS_TOKEN_TTL_SEC = 40;
const REFRESH_SKEW_SEC = 35;
const WHOAMI = '/api/proxy/demo/whoami';
const EVENT = 'http://schemas.openid.net/event/backchannel-logout';
/** Room for startRedisCluster's tries on new ports when a start does not converge. */
const CLUSTER_START_BUDGET_MS = 120_000;

let cluster: RedisCluster | undefined;

function clusterUrl(): string {
  if (!cluster) throw new Error('cluster not started');
  return cluster.url;
}

beforeAll(async () => {
  cluster = await startRedisCluster({ nodes: 3 });
}, CLUSTER_START_BUDGET_MS);

afterAll(async () => {
  await cluster?.stop();
});

/** A test's own client on the cluster, for looking at where keys landed. */
function clusterClient(): Cluster {
  const [first] = clusterUrl().split(',');
  const { hostname, port } = new URL(first ?? '');
  const client = new Cluster([{ host: hostname, port: Number(port) }], { redisOptions: { connectTimeout: 2_000, maxRetriesPerRequest: 2 } });
  client.on('error', () => {});
  return client;
}

/** Keys matching `pattern` on every master (SCAN is per node on a cluster). */
async function scanCluster(client: Cluster, pattern: string): Promise<string[]> {
  const found: string[] = [];
  for (const node of client.nodes('master')) {
    let cursor = '0';
    do {
      const [next, batch] = await node.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
      cursor = next;
      found.push(...batch);
    } while (cursor !== '0');
  }
  return found;
}

describeStoreContract('redis cluster', async () => createRedisStore(clusterUrl()), { hashTags: true });

describe('Redis store on a cluster', () => {
  it('spreads keys over every node and reads each back through the right one', async () => {
    const store = createRedisStore(clusterUrl(), { keyPrefix: `gh-test-${randomUUID()}:` });
    const probe = clusterClient();
    try {
      // Fixed tags hash to fixed slots; 30 of them cover all three nodes' slot ranges.
      const tags = Array.from({ length: 30 }, (_, i) => `tag${i}`);
      await Promise.all(tags.map((tag) => store.set(`k:{${tag}}`, tag, { ttlMs: 60_000 })));
      await Promise.all(tags.map((tag) => store.indexAdd(`i:{${tag}}`, tag, Date.now() + 60_000, 60_000)));
      expect(await Promise.all(tags.map((tag) => store.get(`k:{${tag}}`)))).toEqual(tags);
      expect((await Promise.all(tags.map((tag) => store.indexMembers(`i:{${tag}}`, Date.now())))).map((entries) => entries.map((entry) => entry.member))).toEqual(tags.map((tag) => [tag]));
      expect(await Promise.all(tags.map((tag) => store.delIfEquals(`k:{${tag}}`, tag)))).toEqual(tags.map(() => true));

      const masters = probe.nodes('master');
      expect(masters).toHaveLength(3);
      const slotsOf = await Promise.all(tags.map((tag) => probe.cluster('KEYSLOT', `{${tag}}`)));
      const ownerPorts = new Set(slotsOf.map((slot) => probe.slots[slot]?.[0]));
      expect(ownerPorts.size).toBe(3);
    } finally {
      await store.close();
      probe.disconnect();
    }
  });
});

describe('Redis store when the whole cluster goes away', () => {
  it('rejects every command within commandTimeoutMs instead of queueing it until the cluster returns', async () => {
    // A cluster of its own, so stopping it leaves the shared one alone.
    const doomed = await startRedisCluster({ nodes: 3 });
    const store = createRedisStore(doomed.url, { commandTimeoutMs: 500 });
    try {
      expect(await store.set('k:{doomed}', 'v', { ttlMs: 60_000 })).toBe(true);
      await doomed.stop();
      const calls: Array<[string, () => Promise<unknown>]> = [
        ['GET', () => store.get('k:{doomed}')],
        ['GET', () => store.get('k:{other}')],
        ['SET', () => store.set('k:{doomed}', 'v2', { ttlMs: 60_000 })],
        ['MULTI', () => store.indexMembers('i:{doomed}', Date.now())],
        ['EVALSHA', () => store.delIfEquals('k:{doomed}', 'v')],
        ['PING', () => store.ping()],
      ];
      for (const [command, run] of calls) {
        const started = Date.now();
        const error = await run().then(
          () => new Error('resolved'),
          (reason: unknown) => (reason instanceof Error ? reason : new Error(String(reason))),
        );
        expect(error.message, command).toMatch(new RegExp(`^Redis ${command} failed: `));
        expect(Date.now() - started, command).toBeLessThan(1_500);
      }
    } finally {
      await store.close();
      await doomed.stop();
    }
  }, CLUSTER_START_BUDGET_MS + 20_000);
});

describe('a Gatehouse stack on the cluster', () => {
  let stack: Stack;
  let app: string;
  let probe: Cluster;

  beforeAll(async () => {
    stack = await startStack({
      workers: 1,
      redisUrl: clusterUrl(),
      accessTokenTtl: ACCESS_TOKEN_TTL_SEC,
      env: { TOKEN_REFRESH_SKEW: String(REFRESH_SKEW_SEC) },
    });
    app = stack.apps[0]?.url ?? '';
    probe = clusterClient();
  }, 90_000);

  afterAll(async () => {
    probe?.disconnect();
    await stack?.stop();
  });

  async function sessionRecordKeys(): Promise<string[]> {
    return scanCluster(probe, `${stack.keyPrefix}session:*`);
  }

  async function signWithIdp(payload: Record<string, unknown>): Promise<string> {
    const response = await fetch(`${stack.issuer}/__dev/sign`, { method: 'POST', body: JSON.stringify({ payload }) });
    expect(response.status).toBe(200);
    return ((await response.json()) as { jws: string }).jws;
  }

  function statuses(results: CallResult[]): Record<string, number> {
    const counts: Record<string, number> = {};
    for (const result of results) {
      const error = typeof result.body === 'object' && result.body && 'error' in result.body ? ` ${String(result.body.error)}` : '';
      counts[`${result.status}${error}`] = (counts[`${result.status}${error}`] ?? 0) + 1;
    }
    return counts;
  }

  it('logs in, refreshes once under concurrency, lists sessions and ends them by back-channel logout', async () => {
    const user = `cluster-${randomUUID().slice(0, 8)}`;
    const cookie = await login(app, user);

    const first = await call(app, WHOAMI, cookie);
    expect({ status: first.status, body: first.body }).toMatchObject({ status: 200, body: { sub: user } });

    const [sessionKey, ...others] = await sessionRecordKeys();
    expect(others).toEqual([]);
    if (!sessionKey) throw new Error('no session key on the cluster');
    const raw = await probe.get(sessionKey);
    const record = raw === null ? undefined : (JSON.parse(raw) as StoredSessionRecord);
    expect(record?.sub).toBe(user);
    if (!record?.accessTokenExpiresAt) throw new Error('no stored access token expiry');

    const before = await idpGrants(stack.issuer);
    expect(refreshGrantsOf(before, user)).toBe(0);
    // +50 ms: strictly past the skew boundary on every process's clock reading.
    await waitUntil(`${user}'s token to become due`, record.accessTokenExpiresAt - REFRESH_SKEW_SEC * 1000 + 50, 15_000);

    const burst = await Promise.all(Array.from({ length: 20 }, () => call(app, WHOAMI, cookie)));
    expect(statuses(burst)).toEqual({ '200': 20 });
    for (const result of burst) expect(result.body).toMatchObject({ sub: user });
    const after = await idpGrants(stack.issuer);
    expect(refreshGrantsOf(after, user)).toBe(1);
    expect(after.error.refresh_token ?? 0).toBe(before.error.refresh_token ?? 0);
    // The refreshed token is stored, and the lock (same hash tag as the session) is gone.
    const refreshedRaw = await probe.get(sessionKey);
    expect((JSON.parse(refreshedRaw ?? '{}') as Partial<StoredSessionRecord>).accessTokenExpiresAt).toBeGreaterThan(record.accessTokenExpiresAt);
    expect(await probe.exists(sessionKey.replace(`${stack.keyPrefix}session:`, `${stack.keyPrefix}refresh-lock:`))).toBe(0);

    const list = await call(app, '/api/auth/sessions', cookie);
    expect(list.status).toBe(200);
    expect(list.body).toMatchObject({ sessions: [{ current: true }] });
    expect((list.body as { sessions: unknown[] }).sessions).toHaveLength(1);

    const now = Math.floor(Date.now() / 1000);
    const logoutToken = await signWithIdp({ iss: stack.issuer, aud: stack.clientId, iat: now, exp: now + 120, jti: randomUUID(), events: { [EVENT]: {} }, sub: user });
    const logout = await fetch(`${app}/api/auth/backchannel-logout`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ logout_token: logoutToken }),
    });
    expect(logout.status).toBe(200);

    const session = await call(app, '/api/auth/session', cookie);
    expect({ status: session.status, body: session.body }).toEqual({ status: 200, body: { authenticated: false, endedBy: 'idp' } });
    expect(await waitFor('the session key to be gone', async () => ((await probe.exists(sessionKey)) === 0 ? true : undefined), 2_000)).toBe(true);
    const proxied = await call(app, WHOAMI, cookie);
    expect(proxied.status).toBe(401);
  });
});

describe('a Gatehouse stack on a cluster over TLS', () => {
  // Redis Cluster as a managed service runs it: clients, replication and the cluster bus over TLS
  // only. The nodes announce themselves by IP (CLUSTER SLOTS), so the certificate's IP SAN is what
  // Gatehouse checks on every node it discovers, against REDIS_TLS_CA.
  let tlsCluster: RedisCluster;
  let stack: Stack;
  let app: string;

  beforeAll(async () => {
    tlsCluster = await startRedisCluster({ nodes: 3, tls: true });
    stack = await startStack({ workers: 1, redisUrl: tlsCluster.url, env: { REDIS_TLS_CA: tlsCluster.caPem ?? '' } });
    app = stack.apps[0]?.url ?? '';
  }, CLUSTER_START_BUDGET_MS + 60_000);

  afterAll(async () => {
    await stack?.stop();
    await tlsCluster?.stop();
  });

  it('signs in, proxies and signs out with every connection over TLS, and the nodes refuse plaintext', async () => {
    const [first] = tlsCluster.url.split(',');
    const { hostname, port } = new URL(first ?? '');
    const probe = new Cluster([{ host: hostname, port: Number(port) }], { redisOptions: { tls: { ca: tlsCluster.caPem }, connectTimeout: 2_000, maxRetriesPerRequest: 2 } });
    probe.on('error', () => {});
    try {
      const cookie = await login(app, 'tls-cluster-user');
      const proxied = await call(app, WHOAMI, cookie);
      expect({ status: proxied.status, body: proxied.body }).toMatchObject({ status: 200, body: { sub: 'tls-cluster-user' } });
      const sessions = () => scanCluster(probe, `${stack.appEnv.REDIS_KEY_PREFIX}session:*`);
      expect(await sessions()).toHaveLength(1);
      expect((await call(app, '/api/auth/logout', cookie, { method: 'POST' })).status).toBe(200);
      expect(await sessions()).toHaveLength(0);
      // The same port without TLS gets no answer: there is no plaintext way in.
      for (const url of tlsCluster.urls) expect(await ask(Number(new URL(url).port), 'PING'), url).toBeUndefined();
    } finally {
      probe.disconnect();
    }
  });
});
