import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createStore } from '../../lib/store/index.ts';
import { createRedisStore } from '../../lib/store/redis.ts';
import { createUpstashStore } from '../../lib/store/upstash.ts';
import { LONG_TTL, RUN_PREFIX, describeStoreContract, rejectionOf } from '../support/store-contract.ts';
import { startUpstashBridge } from '../support/upstash-bridge.ts';
import type { UpstashBridge } from '../support/upstash-bridge.ts';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const BRIDGE_TOKEN = `bridge-token-${randomUUID()}`;

// The same contract for every store; cluster.test.ts runs it against a real Redis Cluster.
describeStoreContract('memory', async () => createStore({ kind: 'memory' }));
describeStoreContract('redis', async () => createStore({ kind: 'redis', url: REDIS_URL }));

let bridge: UpstashBridge | undefined;
beforeAll(async () => {
  bridge = await startUpstashBridge({ redisUrl: REDIS_URL, token: BRIDGE_TOKEN });
});
afterAll(async () => {
  await bridge?.close();
});
function bridgeUrl(): string {
  if (!bridge) throw new Error('bridge not started');
  return bridge.url;
}

describeStoreContract('upstash', async () =>
  createStore({ kind: 'upstash', url: bridgeUrl(), token: BRIDGE_TOKEN }),
);

describe('Redis store over TCP', () => {
  it('rejects quickly when Redis is unreachable instead of hanging', async () => {
    const dead = createRedisStore('redis://127.0.0.1:1');
    // Later calls meet a client deep in its reconnect backoff; they must fail just as fast.
    for (const call of [() => dead.get('gh-test-dead'), () => dead.ping(), () => dead.set('gh-test-dead', 'v', { ttlMs: 1_000 })]) {
      const started = Date.now();
      const error = await rejectionOf(call());
      expect(Date.now() - started).toBeLessThan(2_500);
      expect(error.message).toMatch(/^Redis (GET|PING|SET) failed/);
    }
    await dead.close();
  });

  it('applies keyPrefix to plain commands and to the Lua script', async () => {
    const prefix = `${RUN_PREFIX}prefixed:`;
    const prefixed = createRedisStore(REDIS_URL, { keyPrefix: prefix });
    const plain = createRedisStore(REDIS_URL);
    try {
      await prefixed.set('lock', 'owner', { ttlMs: LONG_TTL });
      expect(await plain.get(`${prefix}lock`)).toBe('owner');
      expect(await plain.get('lock')).not.toBe('owner');
      expect(await prefixed.delIfEquals('lock', 'owner')).toBe(true);
      expect(await plain.get(`${prefix}lock`)).toBeNull();
    } finally {
      await Promise.all([prefixed.close(), plain.close()]);
    }
  });
});

describe('Upstash store and bridge', () => {
  it('getLatest reads the primary where get may read a lagging replica (read regions)', async () => {
    // The "replica": another database of the same Redis, which never receives the writes.
    const replicaUrl = new URL(REDIS_URL);
    replicaUrl.pathname = '/1';
    const lagging = await startUpstashBridge({ redisUrl: REDIS_URL, token: BRIDGE_TOKEN, replicaUrl: replicaUrl.href });
    try {
      const store = createUpstashStore(lagging.url, BRIDGE_TOKEN);
      const key = `${RUN_PREFIX}read-region:${randomUUID()}`;
      await store.set(key, 'rotated', { ttlMs: LONG_TTL });
      expect(await store.get(key)).toBeNull();
      expect(await store.getLatest!(key)).toBe('rotated');
      expect(await store.take(key)).toBe('rotated');
      expect(await store.getLatest!(key)).toBeNull();
    } finally {
      await lagging.close();
    }
  });

  it('rejects quickly when the REST endpoint is unreachable', async () => {
    const dead = createUpstashStore('http://127.0.0.1:1', 'token');
    const started = Date.now();
    const error = await rejectionOf(dead.get('gh-test-dead'));
    expect(Date.now() - started).toBeLessThan(2_500);
    expect(error.message).toMatch(/^Upstash GET failed/);
  });

  it('the bridge refuses a wrong bearer token', async () => {
    const response = await fetch(bridgeUrl(), {
      method: 'POST',
      headers: { authorization: 'Bearer wrong', 'content-type': 'application/json' },
      body: JSON.stringify(['PING']),
    });
    expect(response.status).toBe(401);
    const intruder = createUpstashStore(bridgeUrl(), 'wrong');
    await expect(intruder.ping()).rejects.toThrow();
    // An HTTP-level failure is where @upstash/redis quotes the whole request body.
    const error = await rejectionOf(intruder.set(`${RUN_PREFIX}intruder`, 'secret-value', { ttlMs: 1_000 }));
    expect(`${error.message} ${JSON.stringify(error)} ${String(error.stack)}`).not.toMatch(/secret|intruder/);
  });

  it('the bridge base64-encodes strings only when asked, as Upstash does', async () => {
    const k = `${RUN_PREFIX}bridge:${randomUUID()}`;
    const call = async (command: (string | number)[], encoding: boolean) => {
      const headers: Record<string, string> = { authorization: `Bearer ${BRIDGE_TOKEN}` };
      if (encoding) headers['Upstash-Encoding'] = 'base64';
      const response = await fetch(bridgeUrl(), { method: 'POST', headers, body: JSON.stringify(command) });
      return { status: response.status, body: (await response.json()) as unknown };
    };
    await call(['SET', k, 'välue', 'PX', 60_000], false);
    expect(await call(['GET', k], true)).toEqual({ status: 200, body: { result: Buffer.from('välue').toString('base64') } });
    expect(await call(['GET', k], false)).toEqual({ status: 200, body: { result: 'välue' } });
    expect(await call(['PEXPIRE', k, 60_000], true)).toEqual({ status: 200, body: { result: 1 } });
    expect(await call(['GET', `${k}:missing`], true)).toEqual({ status: 200, body: { result: null } });
    const failed = await call(['ZADD', k, 1, 'm'], true);
    expect(failed.status).toBe(400);
    expect(failed.body).toMatchObject({ error: expect.stringMatching(/^WRONGTYPE/) });
  });
});
