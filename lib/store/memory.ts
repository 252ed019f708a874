import type { Store } from './types.ts';

/*
 * The in-process store is the reference for the Store contract: it mirrors what Redis does for
 * each command, including the argument checks Redis would otherwise do on the server. The
 * argument checks are exported so the Redis and Upstash stores reject the same inputs the same
 * way before anything goes over the wire (Redis would accept some of them differently, e.g. an
 * `Infinity` score, or JSON would turn it into null).
 */

export function checkTtl(name: string, ttlMs: number): void {
  if (!Number.isSafeInteger(ttlMs) || ttlMs <= 0) {
    throw new RangeError(`${name} must be a positive integer number of milliseconds`);
  }
}

/** PEXPIRE accepts zero and negative values (the key is deleted), only the type is checked. */
export function checkExpireTtl(ttlMs: number): void {
  if (!Number.isSafeInteger(ttlMs)) throw new RangeError('ttlMs must be an integer number of milliseconds');
}

export function checkTimestamp(name: string, ms: number): void {
  if (!Number.isFinite(ms)) throw new RangeError(`${name} must be a finite number`);
}

export function checkSetOptions(options: { ttlMs: number; onlyIfAbsent?: boolean; onlyIfPresent?: boolean }): void {
  checkTtl('ttlMs', options.ttlMs);
  if (options.onlyIfAbsent && options.onlyIfPresent) {
    throw new RangeError('onlyIfAbsent and onlyIfPresent are mutually exclusive');
  }
}

type Entry =
  | { type: 'string'; value: string; expiresAt: number | null }
  | { type: 'zset'; members: Map<string, number>; expiresAt: number | null };

const utf8 = new TextEncoder();

// Redis orders equal scores by the members' bytes, which is not JS string order for every code
// point. TextEncoder rather than Buffer: this module is also imported on edge runtimes.
function compareBytes(a: string, b: string): number {
  const x = utf8.encode(a);
  const y = utf8.encode(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const diff = (x[i] ?? 0) - (y[i] ?? 0);
    if (diff !== 0) return diff;
  }
  return x.length - y.length;
}

function compareMembers(a: [string, number], b: [string, number]): number {
  return a[1] - b[1] || compareBytes(a[0], b[0]);
}

function wrongType(): Error {
  return new Error('WRONGTYPE Operation against a key holding the wrong kind of value');
}

const SWEEP_INTERVAL_MS = 30_000;

export function createMemoryStore(): Store {
  const data = new Map<string, Entry>();
  let closed = false;

  // Lazy expiry alone keeps correctness; the sweep only bounds memory for keys nobody reads again.
  const sweep = setInterval(() => {
    const now = Date.now();
    for (const [key, entry] of data) {
      if (entry.expiresAt !== null && entry.expiresAt <= now) data.delete(key);
    }
  }, SWEEP_INTERVAL_MS);
  // Edge runtimes return a plain number from setInterval.
  (sweep as { unref?: () => void }).unref?.();

  function live(key: string): Entry | undefined {
    if (closed) throw new Error('Store is closed');
    const entry = data.get(key);
    if (entry && entry.expiresAt !== null && entry.expiresAt <= Date.now()) {
      data.delete(key);
      return undefined;
    }
    return entry;
  }

  /** The key's entry while it holds exactly `expected` (GET and compare, as the Lua scripts do). */
  function heldBy(key: string, expected: string): Entry | undefined {
    const entry = live(key);
    if (entry === undefined) return undefined;
    if (entry.type !== 'string') throw wrongType();
    return entry.value === expected ? entry : undefined;
  }

  /** SET XX KEEPTTL: replaces a key of any type and keeps its expiry. */
  function replaceLive(key: string, value: string): boolean {
    const entry = live(key);
    if (entry === undefined) return false;
    data.set(key, { type: 'string', value, expiresAt: entry.expiresAt });
    return true;
  }

  function zset(key: string): Map<string, number> | undefined {
    const entry = live(key);
    if (entry === undefined) return undefined;
    if (entry.type !== 'zset') throw wrongType();
    return entry.members;
  }

  /** The members whose expiry is after `nowMs`; the others are pruned, and an emptied set deleted, as Redis does. */
  function liveMembers(key: string, nowMs: number): Map<string, number> {
    checkTimestamp('nowMs', nowMs);
    const members = zset(key);
    if (members === undefined) return new Map();
    for (const [member, score] of members) {
      if (score <= nowMs) members.delete(member);
    }
    if (members.size === 0) data.delete(key);
    return members;
  }

  // Every method is async so argument and type errors reject instead of throwing synchronously,
  // as they do with the network stores.
  return {
    async get(key) {
      const entry = live(key);
      if (entry === undefined) return null;
      if (entry.type !== 'string') throw wrongType();
      return entry.value;
    },

    async set(key, value, options) {
      checkSetOptions(options);
      const exists = live(key) !== undefined;
      if ((options.onlyIfAbsent && exists) || (options.onlyIfPresent && !exists)) return false;
      data.set(key, { type: 'string', value, expiresAt: Date.now() + options.ttlMs });
      return true;
    },

    async replace(key, value) {
      return replaceLive(key, value);
    },

    async expire(key, ttlMs) {
      checkExpireTtl(ttlMs);
      const entry = live(key);
      if (entry === undefined) return false;
      if (ttlMs <= 0) data.delete(key);
      else entry.expiresAt = Date.now() + ttlMs;
      return true;
    },

    async take(key) {
      const entry = live(key);
      if (entry === undefined) return null;
      if (entry.type !== 'string') throw wrongType();
      data.delete(key);
      return entry.value;
    },

    async delIfEquals(key, expected) {
      if (!heldBy(key, expected)) return false;
      data.delete(key);
      return true;
    },

    async expireIfEquals(key, expected, ttlMs) {
      checkTtl('ttlMs', ttlMs);
      const entry = heldBy(key, expected);
      if (!entry) return false;
      entry.expiresAt = Date.now() + ttlMs;
      return true;
    },

    async replaceIfHeld(key, value, lockKey, owner) {
      return heldBy(lockKey, owner) !== undefined && replaceLive(key, value);
    },

    async indexAdd(key, member, expiresAtMs, keyTtlMs) {
      checkTimestamp('expiresAtMs', expiresAtMs);
      checkTtl('keyTtlMs', keyTtlMs);
      const entry = live(key);
      if (entry !== undefined && entry.type !== 'zset') throw wrongType();
      const keyExpiresAt = Date.now() + keyTtlMs;
      let members: Map<string, number>;
      if (entry === undefined) {
        members = new Map();
        data.set(key, { type: 'zset', members, expiresAt: keyExpiresAt });
      } else {
        members = entry.members;
        // PEXPIRE NX then PEXPIRE GT: give a persistent key a TTL, otherwise only ever extend it.
        if (entry.expiresAt === null || entry.expiresAt < keyExpiresAt) entry.expiresAt = keyExpiresAt;
      }
      members.set(member, expiresAtMs);
    },

    async indexMembers(key, nowMs) {
      return [...liveMembers(key, nowMs)].sort(compareMembers).map(([member, expiresAtMs]) => ({ member, expiresAtMs }));
    },

    async indexCount(key, nowMs) {
      return liveMembers(key, nowMs).size;
    },

    async indexRemove(key, member) {
      const members = zset(key);
      if (members === undefined) return;
      members.delete(member);
      if (members.size === 0) data.delete(key);
    },

    async ping() {
      if (closed) throw new Error('Store is closed');
    },

    async close() {
      closed = true;
      clearInterval(sweep);
      data.clear();
    },
  };
}
