import { Redis } from '@upstash/redis';
import { pairsToEntries, type Store } from './types.ts';
import { checkExpireTtl, checkSetOptions, checkTimestamp, checkTtl } from './memory.ts';
import { DEL_IF_EQUALS_LUA, EXPIRE_IF_EQUALS_LUA, GET_LATEST_LUA, REPLACE_IF_HELD_LUA, TAKE_LUA } from './scripts.ts';


const REQUEST_TIMEOUT_MS = 5_000;

/**
 * @upstash/redis puts the whole request body (keys, session data, lock tokens) into its error
 * messages, so failures are rebuilt from the command name and the Redis error code alone.
 */
function storeError(command: string, error: unknown): Error {
  let kind = 'unknown error';
  if (error instanceof Error) {
    // Reply errors arrive as "ERR ...", "WRONGTYPE ..." or "Command failed: WRONGTYPE ...".
    const code = /(?:^|: )([A-Z][A-Z_-]+)(?=\s)/.exec(error.message)?.[1];
    kind = error.name === 'TimeoutError' || error.name === 'AbortError' ? 'timeout' : (code ?? error.name);
  }
  return new Error(`Upstash ${command} failed: ${kind}`);
}

async function run<T>(command: string, promise: Promise<T>): Promise<T> {
  try {
    return await promise;
  } catch (error) {
    throw storeError(command, error);
  }
}

export function createUpstashStore(url: string, token: string): Store {
  const redis = new Redis({
    url,
    token,
    // Values are opaque strings to Gatehouse; JSON-parsing them would turn "123" into a number.
    automaticDeserialization: false,
    // base64 (the default) keeps any byte sequence intact through the JSON transport.
    responseEncoding: 'base64',
    // Concurrent requests' commands share one HTTP round trip (as ioredis auto-pipelining does).
    enableAutoPipelining: true,
    // Only network failures are retried (never error replies). Keep it short so an outage
    // surfaces in well under a second of backoff instead of the default five attempts (~4 s).
    retry: { retries: 2, backoff: (retryCount) => 50 * 2 ** retryCount },
    // A fresh signal per request: a function-valued signal makes an abort reject, whereas a
    // plain AbortSignal makes the client resolve with a fake "Aborted" result.
    signal: () => AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    // No SDK/runtime/platform headers to a third party from an auth server.
    enableTelemetry: false,
    latencyLogging: false,
  });
  let closed = false;

  function open(): void {
    if (closed) throw new Error('Store is closed');
  }

  return {
    async get(key) {
      open();
      const value = await run('GET', redis.get<string>(key));
      return value ?? null;
    },

    async getLatest(key) {
      open();
      const value = await run('EVAL', redis.eval<[], string | null>(GET_LATEST_LUA, [key], []));
      return value ?? null;
    },

    async set(key, value, { ttlMs, onlyIfAbsent, onlyIfPresent }) {
      open();
      checkSetOptions({ ttlMs, onlyIfAbsent, onlyIfPresent });
      const reply = onlyIfAbsent
        ? redis.set(key, value, { px: ttlMs, nx: true })
        : onlyIfPresent
          ? redis.set(key, value, { px: ttlMs, xx: true })
          : redis.set(key, value, { px: ttlMs });
      return (await run('SET', reply)) === 'OK';
    },

    async replace(key, value) {
      open();
      return (await run('SET', redis.set(key, value, { keepTtl: true, xx: true }))) === 'OK';
    },

    async expire(key, ttlMs) {
      open();
      checkExpireTtl(ttlMs);
      return Number(await run('PEXPIRE', redis.pexpire(key, ttlMs))) === 1;
    },

    async take(key) {
      open();
      const value = await run('EVAL', redis.eval<[], string | null>(TAKE_LUA, [key], []));
      return value ?? null;
    },

    async delIfEquals(key, expected) {
      open();
      return Number(await run('EVAL', redis.eval(DEL_IF_EQUALS_LUA, [key], [expected]))) === 1;
    },

    async expireIfEquals(key, expected, ttlMs) {
      open();
      checkTtl('ttlMs', ttlMs);
      return Number(await run('EVAL', redis.eval(EXPIRE_IF_EQUALS_LUA, [key], [expected, ttlMs]))) === 1;
    },

    async replaceIfHeld(key, value, lockKey, owner) {
      open();
      return Number(await run('EVAL', redis.eval(REPLACE_IF_HELD_LUA, [key, lockKey], [value, owner]))) === 1;
    },

    async indexAdd(key, member, expiresAtMs, keyTtlMs) {
      open();
      checkTimestamp('expiresAtMs', expiresAtMs);
      checkTtl('keyTtlMs', keyTtlMs);
      // GT alone never sets a TTL on a key without one, so NX gives a new index its first TTL.
      const tx = redis
        .multi()
        .zadd(key, { score: expiresAtMs, member })
        .pexpire(key, keyTtlMs, 'NX')
        .pexpire(key, keyTtlMs, 'GT');
      await run('MULTI', tx.exec());
    },

    async indexMembers(key, nowMs) {
      open();
      checkTimestamp('nowMs', nowMs);
      const tx = redis.multi().zremrangebyscore(key, '-inf', nowMs).zrange<unknown[]>(key, 0, -1, { withScores: true });
      const [, members] = await run('MULTI', tx.exec());
      return pairsToEntries(members);
    },

    async indexRemove(key, member) {
      open();
      await run('ZREM', redis.zrem(key, member));
    },

    async indexCount(key, nowMs) {
      open();
      checkTimestamp('nowMs', nowMs);
      const [, count] = await run('MULTI', redis.multi().zremrangebyscore(key, '-inf', nowMs).zcard(key).exec());
      return Number(count);
    },

    async ping() {
      open();
      await run('PING', redis.ping());
    },

    async close() {
      // Stateless HTTP: nothing to tear down, but later calls should fail like a closed socket.
      closed = true;
    },
  };
}
