// The one contract every Store implementation must meet, as a vitest suite any test file can run
// against its own store (memory, Redis over TCP, Upstash via the bridge, Redis Cluster).
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Store } from '../../lib/store/index.ts';

export const RUN_PREFIX = `gh-test-${randomUUID()}:`;
export const LONG_TTL = 60_000;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

async function members(store: Store, key: string, nowMs: number): Promise<string[]> {
  return (await store.indexMembers(key, nowMs)).map((entry) => entry.member);
}

/**
 * Waits until the store itself has expired a control key written now with `ttlMs`: from then on,
 * a key that was given that TTL and then a longer one must still be there. No guessed sleep.
 */
async function outlive(store: Store, ttlMs: number): Promise<void> {
  const control = `${RUN_PREFIX}control:{${randomUUID()}}`;
  await store.set(control, 'x', { ttlMs });
  await eventually(async () => (await store.get(control)) === null);
}

/** Polls instead of sleeping a fixed time, so slow machines wait longer and fast ones less. */
async function eventually(condition: () => Promise<boolean>, timeoutMs = 3_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await sleep(10);
  }
}

export async function rejectionOf(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (error) {
    if (error instanceof Error) return error;
    throw new Error('rejected with a non-Error value', { cause: error });
  }
  throw new Error('expected a rejection');
}

export interface StoreContractOptions {
  /**
   * Ends every key in its own hash tag, `…:{<uuid>}`, the shape of Gatehouse's keys: on a Redis
   * Cluster the keys of one test then land in different slots (and mostly on different nodes).
   */
  hashTags?: boolean;
}

export function describeStoreContract(name: string, makeStore: () => Promise<Store>, { hashTags = false }: StoreContractOptions = {}): void {
  describe(`Store contract: ${name}`, () => {
    let store: Store;
    const key = (label: string) => (hashTags ? `${RUN_PREFIX}${name}:${label}:{${randomUUID()}}` : `${RUN_PREFIX}${name}:${label}:${randomUUID()}`);
    /** A value key and its lock, sharing one hash tag (one Cluster slot) as a session and its refresh lock do. */
    const lockedPair = (label: string) => {
      const tag = randomUUID();
      return { k: `${RUN_PREFIX}${name}:${label}:{${tag}}`, lock: `${RUN_PREFIX}${name}:${label}-lock:{${tag}}` };
    };

    beforeAll(async () => {
      store = await makeStore();
    });
    afterAll(async () => {
      await store.close();
    });

    it('pings', async () => {
      await expect(store.ping()).resolves.toBeUndefined();
    });

    it('reads what it wrote, byte for byte, and null for a missing key', async () => {
      const k = key('roundtrip');
      expect(await store.get(k)).toBeNull();
      for (const value of ['plain', '123', '{"json":true}', 'OK', '', 'ümlaut ✓ 🔑\nline', 'null']) {
        expect(await store.set(k, value, { ttlMs: LONG_TTL })).toBe(true);
        expect(await store.get(k)).toBe(value);
      }
    });

    it('onlyIfAbsent writes once and never overwrites', async () => {
      const k = key('nx');
      expect(await store.set(k, 'first', { ttlMs: LONG_TTL, onlyIfAbsent: true })).toBe(true);
      expect(await store.set(k, 'second', { ttlMs: LONG_TTL, onlyIfAbsent: true })).toBe(false);
      expect(await store.get(k)).toBe('first');
    });

    it('onlyIfPresent never creates a key and updates an existing one', async () => {
      const k = key('xx');
      expect(await store.set(k, 'ghost', { ttlMs: LONG_TTL, onlyIfPresent: true })).toBe(false);
      expect(await store.get(k)).toBeNull();
      await store.set(k, 'v1', { ttlMs: LONG_TTL });
      expect(await store.set(k, 'v2', { ttlMs: LONG_TTL, onlyIfPresent: true })).toBe(true);
      expect(await store.get(k)).toBe('v2');
    });

    it('rejects invalid set arguments', async () => {
      const k = key('invalid');
      await expect(store.set(k, 'v', { ttlMs: 0 })).rejects.toThrow();
      await expect(store.set(k, 'v', { ttlMs: 1.5 })).rejects.toThrow();
      await expect(store.set(k, 'v', { ttlMs: LONG_TTL, onlyIfAbsent: true, onlyIfPresent: true })).rejects.toThrow();
      expect(await store.get(k)).toBeNull();
    });

    it('expires a key after its TTL', async () => {
      const k = key('ttl');
      await store.set(k, 'v', { ttlMs: 80 });
      expect(await store.get(k)).toBe('v');
      await eventually(async () => (await store.get(k)) === null);
    });

    it('set replaces the TTL of an existing key', async () => {
      const k = key('set-ttl');
      await store.set(k, 'short', { ttlMs: 60 });
      await store.set(k, 'long', { ttlMs: LONG_TTL });
      await outlive(store, 60);
      expect(await store.get(k)).toBe('long');
    });

    it('replace keeps the TTL and never creates a key', async () => {
      const missing = key('replace-missing');
      expect(await store.replace(missing, 'v')).toBe(false);
      expect(await store.get(missing)).toBeNull();

      const k = key('replace');
      await store.set(k, 'v1', { ttlMs: 150 });
      expect(await store.replace(k, 'v2')).toBe(true);
      expect(await store.get(k)).toBe('v2');
      // Without KEEPTTL the key would have become persistent and never go away.
      await eventually(async () => (await store.get(k)) === null);
    });

    it('replace does not resurrect an expired key', async () => {
      const k = key('replace-expired');
      await store.set(k, 'v', { ttlMs: 50 });
      await eventually(async () => (await store.get(k)) === null);
      expect(await store.replace(k, 'back')).toBe(false);
      expect(await store.get(k)).toBeNull();
    });

    it('expire is false for a missing key and does not create it', async () => {
      const k = key('expire-missing');
      expect(await store.expire(k, LONG_TTL)).toBe(false);
      expect(await store.get(k)).toBeNull();
    });

    it('expire shortens and extends the TTL of an existing key', async () => {
      const shortened = key('expire-short');
      await store.set(shortened, 'v', { ttlMs: LONG_TTL });
      expect(await store.expire(shortened, 60)).toBe(true);
      await eventually(async () => (await store.get(shortened)) === null);

      const extended = key('expire-long');
      await store.set(extended, 'v', { ttlMs: 60 });
      expect(await store.expire(extended, LONG_TTL)).toBe(true);
      await outlive(store, 60);
      expect(await store.get(extended)).toBe('v');
    });

    it('expire with a non-positive TTL deletes the key, as PEXPIRE does', async () => {
      const k = key('expire-zero');
      await store.set(k, 'v', { ttlMs: LONG_TTL });
      expect(await store.expire(k, 0)).toBe(true);
      expect(await store.get(k)).toBeNull();
    });

    it('take deletes the key and returns its last value, once', async () => {
      const k = key('take');
      await store.set(k, 'v', { ttlMs: LONG_TTL });
      await store.replace(k, 'v2');
      expect(await store.take(k)).toBe('v2');
      expect(await store.get(k)).toBeNull();
      expect(await store.take(k)).toBeNull();
    });

    it('of concurrent takes of one key, exactly one gets its value', async () => {
      const k = key('take-race');
      await store.set(k, 'once', { ttlMs: LONG_TTL });
      const taken = await Promise.all(Array.from({ length: 8 }, () => store.take(k)));
      expect(taken.filter((value) => value === 'once')).toHaveLength(1);
      expect(taken.filter((value) => value === null)).toHaveLength(7);
    });

    it('delIfEquals deletes only for the owner', async () => {
      const k = key('lock');
      expect(await store.delIfEquals(k, 'owner')).toBe(false);
      await store.set(k, 'owner', { ttlMs: LONG_TTL, onlyIfAbsent: true });
      expect(await store.delIfEquals(k, 'intruder')).toBe(false);
      expect(await store.get(k)).toBe('owner');
      expect(await store.delIfEquals(k, 'owner')).toBe(true);
      expect(await store.get(k)).toBeNull();
    });

    it('expireIfEquals renews a lease only for its owner', async () => {
      const k = key('lease');
      expect(await store.expireIfEquals(k, 'owner', LONG_TTL)).toBe(false);
      expect(await store.get(k)).toBeNull();
      await store.set(k, 'owner', { ttlMs: 60, onlyIfAbsent: true });
      expect(await store.expireIfEquals(k, 'intruder', LONG_TTL)).toBe(false);
      expect(await store.expireIfEquals(k, 'owner', LONG_TTL)).toBe(true);
      await outlive(store, 60);
      expect(await store.get(k)).toBe('owner');
      await expect(store.expireIfEquals(k, 'owner', 0)).rejects.toThrow();
    });

    it('replaceIfHeld writes only while the lock holds the owner, keeps the TTL and never creates the key', async () => {
      const { k, lock } = lockedPair('held');
      await store.set(k, 'v1', { ttlMs: 150 });
      await store.set(lock, 'owner', { ttlMs: LONG_TTL, onlyIfAbsent: true });
      expect(await store.replaceIfHeld(k, 'v2', lock, 'owner')).toBe(true);
      expect(await store.get(k)).toBe('v2');
      expect(await store.get(lock)).toBe('owner');
      // KEEPTTL: the write did not make the key outlive its TTL.
      await eventually(async () => (await store.get(k)) === null);
      expect(await store.replaceIfHeld(k, 'back', lock, 'owner')).toBe(false);
      expect(await store.get(k)).toBeNull();
    });

    it('replaceIfHeld refuses the write once the lock was taken over or has expired', async () => {
      const { k, lock } = lockedPair('taken');
      await store.set(k, 'v1', { ttlMs: LONG_TTL });
      await store.set(lock, 'owner', { ttlMs: 60, onlyIfAbsent: true });
      await eventually(async () => (await store.get(lock)) === null);
      expect(await store.replaceIfHeld(k, 'stale-owner', lock, 'owner')).toBe(false);
      await store.set(lock, 'successor', { ttlMs: LONG_TTL, onlyIfAbsent: true });
      expect(await store.replaceIfHeld(k, 'stale-owner', lock, 'owner')).toBe(false);
      expect(await store.get(k)).toBe('v1');
      expect(await store.replaceIfHeld(k, 'v2', lock, 'successor')).toBe(true);
      expect(await store.get(k)).toBe('v2');
    });

    it('index returns live members ordered by expiry and prunes expired ones', async () => {
      const k = key('index');
      const now = Date.now();
      expect(await members(store, k, now)).toEqual([]);
      await store.indexAdd(k, 'later', now + 20_000, LONG_TTL);
      await store.indexAdd(k, 'sooner', now + 10_000, LONG_TTL);
      await store.indexAdd(k, 'past', now - 1, LONG_TTL);
      expect(await members(store, k, now)).toEqual(['sooner', 'later']);

      // A member expiring exactly at nowMs is no longer live.
      expect(await members(store, k, now + 10_000)).toEqual(['later']);
      // Pruning is permanent: an earlier clock does not bring 'sooner' back.
      expect(await members(store, k, now)).toEqual(['later']);
      // Each member comes back with its expiry, exactly as added.
      expect(await store.indexMembers(k, now)).toEqual([{ member: 'later', expiresAtMs: now + 20_000 }]);
    });

    it('indexCount counts live members only, pruning expired ones, and is 0 for no index', async () => {
      const k = key('index-count');
      const now = Date.now();
      expect(await store.indexCount(k, now)).toBe(0);
      await store.indexAdd(k, 'a', now + 10_000, LONG_TTL);
      await store.indexAdd(k, 'b', now + 20_000, LONG_TTL);
      await store.indexAdd(k, 'gone', now - 1, LONG_TTL);
      await store.indexAdd(k, 'a', now + 30_000, LONG_TTL);
      expect(await store.indexCount(k, now)).toBe(2);
      // A member expiring exactly at nowMs no longer counts, and pruning is permanent.
      expect(await store.indexCount(k, now + 20_000)).toBe(1);
      expect(await members(store, k, now)).toEqual(['a']);
      await store.indexRemove(k, 'a');
      expect(await store.indexCount(k, now)).toBe(0);
    });

    it('index re-adding a member moves its expiry', async () => {
      const k = key('index-readd');
      const now = Date.now();
      await store.indexAdd(k, 'a', now + 1_000, LONG_TTL);
      await store.indexAdd(k, 'b', now + 2_000, LONG_TTL);
      await store.indexAdd(k, 'a', now + 3_000, LONG_TTL);
      expect(await members(store, k, now)).toEqual(['b', 'a']);
      expect(await members(store, k, now + 2_500)).toEqual(['a']);
    });

    it('index orders members with equal expiry by their UTF-8 bytes, as Redis does', async () => {
      const k = key('index-ties');
      const at = Date.now() + 10_000;
      // U+FF01 sorts before U+1F511 in UTF-8 but after it in JavaScript's UTF-16 order.
      for (const member of ['\u{1F511}', 'b', '\uFF01', 'a']) await store.indexAdd(k, member, at, LONG_TTL);
      expect(await members(store, k, Date.now())).toEqual(['a', 'b', '\uFF01', '\u{1F511}']);
    });

    it('indexRemove removes one member and tolerates missing ones', async () => {
      const k = key('index-remove');
      const now = Date.now();
      await store.indexAdd(k, 'a', now + 10_000, LONG_TTL);
      await store.indexAdd(k, 'b', now + 10_000, LONG_TTL);
      await store.indexRemove(k, 'a');
      await store.indexRemove(k, 'not-there');
      await store.indexRemove(key('index-none'), 'a');
      expect(await members(store, k, now)).toEqual(['b']);
      await store.indexRemove(k, 'b');
      expect(await members(store, k, now)).toEqual([]);
    });

    it('the index key expires after keyTtlMs even while members are live', async () => {
      const k = key('index-ttl');
      await store.indexAdd(k, 'a', Date.now() + LONG_TTL, 80);
      expect(await members(store, k, Date.now())).toEqual(['a']);
      await eventually(async () => (await members(store, k, Date.now())).length === 0);
    });

    it('a shorter keyTtlMs never shortens the index key TTL', async () => {
      const k = key('index-ttl-grow');
      await store.indexAdd(k, 'a', Date.now() + LONG_TTL, LONG_TTL);
      await store.indexAdd(k, 'b', Date.now() + LONG_TTL, 50);
      await outlive(store, 50);
      expect(await members(store, k, Date.now())).toEqual(['a', 'b']);
    });

    it('a longer keyTtlMs extends the index key TTL', async () => {
      const k = key('index-ttl-extend');
      await store.indexAdd(k, 'a', Date.now() + LONG_TTL, 60);
      await store.indexAdd(k, 'b', Date.now() + LONG_TTL, LONG_TTL);
      await outlive(store, 60);
      expect(await members(store, k, Date.now())).toEqual(['a', 'b']);
    });

    it('rejects type mismatches without putting keys or values into the error', async () => {
      const stringKey = key('wrongtype-string');
      await store.set(stringKey, 'secret-value', { ttlMs: LONG_TTL });
      const indexError = await rejectionOf(store.indexAdd(stringKey, 'secret-member', Date.now() + 1_000, LONG_TTL));
      expect(indexError.message).toMatch(/WRONGTYPE/);

      const indexKey = key('wrongtype-index');
      await store.indexAdd(indexKey, 'secret-member', Date.now() + 10_000, LONG_TTL);
      const getError = await rejectionOf(store.get(indexKey));
      expect(getError.message).toMatch(/WRONGTYPE/);

      for (const error of [indexError, getError]) {
        const rendered = `${error.message} ${JSON.stringify(error)} ${String(error.stack)}`;
        expect(rendered).not.toMatch(/secret|wrongtype-/);
      }
    });

    it('rejects calls after close, and stays closed', async () => {
      const closing = await makeStore();
      await closing.ping();
      await closing.close();
      await expect(closing.get(key('closed'))).rejects.toThrow();
      // Longer than the Redis store's first reconnect delay: a store brought back after it ended
      // by itself (see reconnectWhenEnded) must not come back after close().
      await new Promise((resolve) => setTimeout(resolve, 300));
      await expect(closing.get(key('closed'))).rejects.toThrow();
    });
  });
}
