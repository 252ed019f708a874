import { Redis } from 'ioredis';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createRedisStore } from '../../lib/store/redis.ts';
import type { Store } from '../../lib/store/types.ts';
import { waitFor, waitUntil } from '../support/http-client.ts';
import { startPrivateRedis, type PrivateRedis } from '../support/private-redis.ts';

/**
 * The Redis store's coherent per-process copies (the proxy's hot path reads sessions through
 * them): two store instances stand for two Gatehouse processes, on a private redis-server whose
 * command counters and client list are this file's alone.
 *
 * "Dropped within a round trip" is checked as "seen within INVALIDATION_BOUND_MS", far below the
 * copies' maximum age, so only an invalidation can explain the new value.
 */
const MAX_AGE_MS = 30_000;
const INVALIDATION_BOUND_MS = 500;
const LONG_TTL = 60_000;

let redis: PrivateRedis;
let admin: Redis;
let reader: Store;
let writer: Store;
let counter = 0;

async function getCalls(): Promise<number> {
  const stats = await admin.info('commandstats');
  return Number(/cmdstat_get:calls=(\d+)/.exec(stats)?.[1] ?? 0);
}

/** How many GETs reached Redis while `work` ran. */
async function redisGetsDuring(work: () => Promise<unknown>): Promise<number> {
  const before = await getCalls();
  await work();
  return (await getCalls()) - before;
}

/** A key the reader holds a copy of (read twice; the second read must not reach Redis). */
async function copiedKey(value: string): Promise<string> {
  const key = `k${++counter}`;
  await writer.set(key, value, { ttlMs: LONG_TTL });
  await waitFor('the reader to hold a copy', async () => {
    await reader.getCoherent!(key, MAX_AGE_MS);
    return (await redisGetsDuring(() => reader.getCoherent!(key, MAX_AGE_MS))) === 0 ? true : undefined;
  }, 5_000, 20);
  return key;
}

async function readerSees(key: string, expected: string | null): Promise<void> {
  await waitFor(`the reader to see ${key} = ${expected}`, async () => ((await reader.getCoherent!(key, MAX_AGE_MS)) === expected ? true : undefined), INVALIDATION_BOUND_MS, 5);
}

beforeAll(async () => {
  redis = await startPrivateRedis();
  admin = new Redis(redis.url);
  reader = createRedisStore(redis.url);
  writer = createRedisStore(redis.url);
});

afterAll(async () => {
  await Promise.all([reader?.close(), writer?.close()]);
  admin?.disconnect();
  redis?.stop();
});

describe('coherent copies on Redis', () => {
  it('repeated reads of an unchanged key are answered without Redis', async () => {
    const key = await copiedKey('v1');
    expect(await redisGetsDuring(async () => {
      for (let i = 0; i < 50; i++) expect(await reader.getCoherent!(key, MAX_AGE_MS)).toBe('v1');
    })).toBe(0);
  });

  it('every kind of write by another process drops the copy within a round trip', async () => {
    const writes: Array<[string, (key: string) => Promise<unknown>, string | null]> = [
      ['SET', (key) => writer.set(key, 'new', { ttlMs: LONG_TTL }), 'new'],
      ['SET XX KEEPTTL', (key) => writer.replace(key, 'replaced'), 'replaced'],
      ['take (GET and DEL in one script)', (key) => writer.take(key), null],
      ['compare-and-delete', (key) => writer.delIfEquals(key, 'old'), null],
      ['PEXPIRE to a moment ago', (key) => admin.pexpire(key, 1), null],
    ];
    for (const [, write, expected] of writes) {
      const key = await copiedKey('old');
      await write(key);
      await readerSees(key, expected);
    }
  });

  it('a process’s own write drops its copy before the write returns', async () => {
    const key = await copiedKey('old');
    await reader.set(key, 'mine', { ttlMs: LONG_TTL });
    expect(await reader.getCoherent!(key, MAX_AGE_MS)).toBe('mine');
    expect(await reader.take(key)).toBe('mine');
    expect(await reader.getCoherent!(key, MAX_AGE_MS)).toBeNull();
  });

  it('a copy never outlives the key’s TTL or maxAgeMs', async () => {
    await writer.set('short', 'v', { ttlMs: 300 });
    expect(await reader.getCoherent!('short', MAX_AGE_MS)).toBe('v');
    await waitFor('the key to expire', async () => ((await admin.exists('short')) === 0 ? true : undefined), 5_000, 20);
    expect(await reader.getCoherent!('short', MAX_AGE_MS)).toBeNull();

    const key = await copiedKey('aged');
    // The copy was read before this moment, so from copiedBy + 50 on it is at least 50 ms old.
    const copiedBy = Date.now();
    expect(await redisGetsDuring(() => reader.getCoherent!(key, MAX_AGE_MS))).toBe(0);
    await waitUntil('the copy to be older than 50 ms', copiedBy + 50);
    expect(await redisGetsDuring(() => reader.getCoherent!(key, 50))).toBe(1);
  });

  it('when the invalidation connection drops, copies stop being used until tracking is back; then invalidation works again', async () => {
    const key = await copiedKey('before');
    // Kill every pub/sub connection: the reader's and the writer's invalidation connections.
    await admin.call('CLIENT', 'KILL', 'TYPE', 'pubsub');
    // Until the reader notices, it may answer from its copy; once it has, every read goes to Redis.
    await waitFor('the reader to stop using its copy', async () => ((await redisGetsDuring(() => reader.getCoherent!(key, MAX_AGE_MS))) === 1 ? true : undefined), 5_000, 10);
    // The reader may already be tracking again (it reconnects within ~50 ms); either way the write is seen.
    await writer.set(key, 'while-down', { ttlMs: LONG_TTL });
    await readerSees(key, 'while-down');

    // Reconnected and tracking again: copies are used, and a write elsewhere still drops them.
    const again = await copiedKey('tracked');
    await writer.set(again, 'after', { ttlMs: LONG_TTL });
    await readerSees(again, 'after');
  });

  it('when the reading connection itself drops, its copies go too', async () => {
    const key = await copiedKey('before');
    // Every normal connection but the admin's: the reader's and the writer's command connections.
    await admin.call('CLIENT', 'KILL', 'TYPE', 'normal', 'SKIPME', 'yes');
    await waitFor('the reader to stop using its copy', async () => ((await redisGetsDuring(() => reader.getCoherent!(key, MAX_AGE_MS))) === 1 ? true : undefined), 5_000, 10);
    // And once reconnected, it copies and invalidates as before.
    const again = await copiedKey('tracked');
    await writer.set(again, 'after', { ttlMs: LONG_TTL });
    await readerSees(again, 'after');
  });

  it('a flushed database drops every copy', async () => {
    const keys = [await copiedKey('a'), await copiedKey('b')];
    await admin.flushdb();
    for (const key of keys) await readerSees(key, null);
  });
});

describe('Redis without CLIENT TRACKING', () => {
  let plainRedis: PrivateRedis;
  let plainReader: Store;
  let plainWriter: Store;

  beforeAll(async () => {
    // A managed Redis may rename CLIENT away: reads must still be right, just never copied.
    plainRedis = await startPrivateRedis(['--rename-command', 'CLIENT', '']);
    plainReader = createRedisStore(plainRedis.url);
    plainWriter = createRedisStore(plainRedis.url);
  });

  afterAll(async () => {
    await Promise.all([plainReader?.close(), plainWriter?.close()]);
    plainRedis?.stop();
  });

  it('reads every time and so sees every write at once', async () => {
    for (let i = 0; i < 20; i++) {
      await plainWriter.set('k', `v${i}`, { ttlMs: LONG_TTL });
      expect(await plainReader.getCoherent!('k', MAX_AGE_MS)).toBe(`v${i}`);
    }
  });
});
