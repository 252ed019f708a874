/**
 * The one interface Gatehouse needs from a key-value store. Every method touches exactly one
 * key, so the same code runs on a single Redis, on Redis Cluster and on Upstash.
 */
export interface IndexEntry {
  member: string;
  expiresAtMs: number;
}

export interface Store {
  get(key: string): Promise<string | null>;
  /**
   * Like `get`, but may answer from a per-process copy that the store keeps coherent: dropped as
   * soon as the key changes anywhere (Redis client-side caching), and never older than
   * `maxAgeMs`. Stores that cannot keep a copy coherent leave it out, and callers use `get`.
   */
  getCoherent?(key: string, maxAgeMs: number): Promise<string | null>;
  /**
   * Like `get`, from the primary, where the store may answer reads from replicas that lag behind
   * it (Upstash read regions): what a refresh lock's holder reads, since a token another instance
   * has just rotated must not be used again. Stores that read the primary anyway leave it out.
   */
  getLatest?(key: string): Promise<string | null>;
  /**
   * Writes with a time to live. `onlyIfAbsent` is SET NX (locks, replay markers),
   * `onlyIfPresent` is SET XX (never resurrect a deleted session). Returns whether it wrote.
   */
  set(key: string, value: string, options: { ttlMs: number; onlyIfAbsent?: boolean; onlyIfPresent?: boolean }): Promise<boolean>;
  /** Overwrites an existing key and keeps its TTL (SET XX KEEPTTL); false when the key is gone. */
  replace(key: string, value: string): Promise<boolean>;
  /** Sets a new TTL on an existing key (PEXPIRE); false when the key is gone. */
  expire(key: string, ttlMs: number): Promise<boolean>;
  /**
   * Deletes the key and returns what it held, null when it was gone (GET and DEL in one atomic
   * step): of two callers, only one gets the value, and it gets the last one written before the delete.
   */
  take(key: string): Promise<string | null>;
  /** Deletes the key only while it still holds `expected` (lock release by its owner, atomically). */
  delIfEquals(key: string, expected: string): Promise<boolean>;
  /** Sets a new TTL only while the key still holds `expected` (lease renewal by its owner, atomically). */
  expireIfEquals(key: string, expected: string, ttlMs: number): Promise<boolean>;
  /**
   * `replace`, in one atomic step with a check that `lockKey` still holds `owner`: the write-back
   * of a lock owner whose lease ran out must not land. The two keys must share a hash tag (one
   * Redis Cluster slot). False when the lock is not the owner's or the key is gone.
   */
  replaceIfHeld(key: string, value: string, lockKey: string, owner: string): Promise<boolean>;
  /**
   * A per-owner index of members that each expire on their own (a sorted set scored by expiry).
   * `keyTtlMs` keeps the whole index from outliving its last member.
   */
  indexAdd(key: string, member: string, expiresAtMs: number, keyTtlMs: number): Promise<void>;
  /** Members whose expiry is still in the future, soonest first; expired ones are pruned as a side effect. */
  indexMembers(key: string, nowMs: number): Promise<IndexEntry[]>;
  indexRemove(key: string, member: string): Promise<void>;
  /** How many members have not expired yet; expired ones are pruned as a side effect. */
  indexCount(key: string, nowMs: number): Promise<number>;
  ping(): Promise<void>;
  close(): Promise<void>;
}

/** ZRANGE … WITHSCORES answers [member, score, member, score, …]. */
export function pairsToEntries(reply: unknown): IndexEntry[] {
  if (!Array.isArray(reply)) return [];
  const entries: IndexEntry[] = [];
  for (let i = 0; i + 1 < reply.length; i += 2) entries.push({ member: String(reply[i]), expiresAtMs: Number(reply[i + 1]) });
  return entries;
}
