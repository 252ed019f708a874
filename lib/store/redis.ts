import { Cluster, Redis } from 'ioredis';
import type { ClusterNode, RedisOptions } from 'ioredis';
import { pairsToEntries, type Store } from './types.ts';
import { checkExpireTtl, checkSetOptions, checkTimestamp, checkTtl } from './memory.ts';
import { DEL_IF_EQUALS_LUA, EXPIRE_IF_EQUALS_LUA, REPLACE_IF_HELD_LUA, TAKE_LUA } from './scripts.ts';
import { isSentinelUrl, parseSentinelUrl } from './sentinel-url.ts';

export interface RedisStoreOptions {
  /** Prepended by ioredis to every key (also to the KEYS of scripts). */
  keyPrefix?: string;
  /** Treat the URL (or each URL of a comma-separated list) as seed nodes of a Redis Cluster. */
  cluster?: boolean;
  /**
   * Upper bound for one command, counted from the call, so it also covers time spent in the
   * offline queue while reconnecting. A timed-out write may still have been applied.
   */
  commandTimeoutMs?: number;
  /** Upper bound for establishing a TCP (and TLS) connection. */
  connectTimeoutMs?: number;
  /** PEM certificates trusted for rediss:// in place of the system's (a private CA's). */
  tlsCa?: string;
  /** For redis+sentinel:// URLs: the sentinels' own password (their `requirepass`); none if unset. */
  sentinelPassword?: string;
}

// ioredis adds methods from defineCommand at run time; this is the shape it adds.
interface WithScripts {
  gatehouseTake(key: string): Promise<string | null>;
  gatehouseDelIfEquals(key: string, expected: string): Promise<number>;
  gatehouseExpireIfEquals(key: string, expected: string, ttlMs: number): Promise<number>;
  gatehouseReplaceIfHeld(key: string, lockKey: string, value: string, owner: string): Promise<number>;
}

/** What ioredis rejects commands with while a connection is closed and not (yet) reconnecting. */
const CONNECTION_CLOSED = 'Connection is closed.';

/**
 * ioredis gives a connection up for good ('end') only when it is closed on purpose, or when its
 * connector throws mid-connect. The second happens behind Sentinel: the failover detector of the
 * connection's previous life is still subscribed while the client reconnects to a dead master, and
 * its +switch-master disconnects the connector in the middle of the next connect. The client would
 * then fail every command at once for the rest of the process's life; this starts it again.
 */
function reconnectWhenEnded(connection: Redis, closing: () => boolean, backoff: (times: number) => number): void {
  let ends = 0;
  connection.on('ready', () => (ends = 0));
  connection.on('end', () => {
    if (closing()) return;
    setTimeout(() => {
      if (!closing() && connection.status === 'end') connection.connect().catch(() => {});
    }, backoff(++ends)).unref();
  });
}

/**
 * Rebuilds an ioredis failure as an Error that names only the command and the kind of failure.
 * ioredis attaches the full argument list (session data, lock tokens) to its reply errors, so
 * neither the original error nor its properties may travel up into logs.
 */
function storeError(command: string, error: unknown): Error {
  let kind = 'unknown error';
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    if (error.name === 'ReplyError') {
      // Redis error replies start with an upper-case code (ERR, WRONGTYPE, READONLY, ...).
      kind = /^[A-Z][A-Z_-]*(?=\s|$)/.exec(error.message)?.[0] ?? 'ReplyError';
    } else if (typeof code === 'string') {
      kind = code;
    } else if (error.message === 'Command timed out') {
      kind = 'timeout';
    } else if (error.message === CONNECTION_CLOSED) {
      kind = 'connection closed';
    } else {
      kind = error.name;
    }
  }
  return new Error(`Redis ${command} failed: ${kind}`);
}

async function runCommand<T>(command: string, promise: Promise<T>): Promise<T> {
  try {
    return await promise;
  } catch (error) {
    throw storeError(command, error);
  }
}

/**
 * Rejects with ioredis's own timeout message once `ms` have passed. A Cluster parks commands in
 * its own offline queue while it has no connected node (and keeps reconnecting forever), and the
 * per-node commandTimeout only starts once a command reaches a node: without this bound a cluster
 * outage would hold every request open instead of failing it.
 */
function withDeadline<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error('Command timed out')), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

type ExecResult = [error: Error | null, result: unknown][] | null;

function execResults(command: string, results: ExecResult): unknown[] {
  if (results === null) throw new Error(`Redis ${command} failed: transaction aborted`);
  return results.map(([error, result]) => {
    if (error) throw storeError(command, error);
    return result;
  });
}

function clusterNodes(url: string, tlsCa: string | undefined): { nodes: ClusterNode[]; redisOptions: RedisOptions } {
  const parts = url.split(',').map((part) => part.trim()).filter(Boolean);
  const first = new URL(parts[0] ?? '');
  const nodes = parts.map((part) => {
    const parsed = new URL(part.includes('://') ? part : `${first.protocol}//${part}`);
    return { host: parsed.hostname, port: parsed.port ? Number(parsed.port) : 6379 };
  });
  const redisOptions: RedisOptions = {};
  // Every node of one cluster shares credentials and transport, so the first URL speaks for all.
  if (first.username) redisOptions.username = decodeURIComponent(first.username);
  if (first.password) redisOptions.password = decodeURIComponent(first.password);
  if (first.protocol === 'rediss:') redisOptions.tls = tlsCa ? { ca: tlsCa } : {};
  return { nodes, redisOptions };
}

/**
 * A client that asks the sentinels for the master (again on every reconnect). The URL's
 * credentials are the data nodes'; sentinels usually have a password of their own or none, and an
 * ACL user made for Gatehouse on the data nodes does not exist on them.
 */
function sentinelOptions(url: string, tlsCa: string | undefined, sentinelPassword: string | undefined): RedisOptions {
  const parsed = parseSentinelUrl(url);
  const tls = parsed.tls ? (tlsCa ? { ca: tlsCa } : {}) : undefined;
  return {
    sentinels: parsed.sentinels,
    name: parsed.masterName,
    ...(parsed.username ? { username: parsed.username } : {}),
    ...(parsed.password ? { password: parsed.password } : {}),
    ...(sentinelPassword ? { sentinelPassword } : {}),
    // rediss+sentinel: TLS to the sentinels and to the data nodes they name, with the same CA.
    ...(tls ? { tls, sentinelTLS: tls, enableTLSForSentinelMode: true } : {}),
    // Without this, after a failover that leaves the old master running (a manual one, or one across
    // a partition) the connections stay on it, and its writes are lost, until the sentinels demote
    // it about ten seconds later; with it, the sentinels' +switch-master moves them at once.
    failoverDetector: true,
  };
}

const INVALIDATION_CHANNEL = '__redis__:invalidate';
const COHERENT_COPIES_LIMIT = 10_000;

interface CoherentReads {
  get(key: string, maxAgeMs: number): Promise<string | null>;
  /** Drops this process's copy at once; Redis's own invalidation for the write arrives later. */
  forget(key: string): void;
  close(): Promise<void>;
}

/** Which server a connection is on: its run_id, new with every start of a redis-server. */
async function serverOf(connection: Redis): Promise<string | undefined> {
  return /^run_id:(\w+)/m.exec(String(await connection.info('server')))?.[1];
}

/**
 * Per-process copies of values read from Redis, kept coherent by server-assisted client-side
 * caching (CLIENT TRACKING with REDIRECT to a second connection subscribed to invalidations): a
 * write or expiry anywhere drops the copy everywhere within a round trip. A copy is used only
 * while both connections have been up since it was read, and only if no invalidation arrived
 * while it was being read (the reply and the invalidation travel on different connections).
 */
function coherentReads(
  client: Redis,
  keyPrefix: string,
  read: (key: string) => Promise<[string | null, number]>,
  /** Sentinel: each connection may be moved to another server on its own (see trackReads). */
  movable: boolean,
  backoff: (times: number) => number,
): CoherentReads {
  const copies = new Map<string, { value: string; readAt: number; keyExpiresAt: number }>();
  // Bumped by every invalidation and every connection change: a read that saw it move is not kept.
  let generation = 0;
  // Bumped when either connection drops: tracking set up before that no longer holds.
  let connectionEpoch = 0;
  let tracking = false;
  let closing = false;
  let subscriberId: number | undefined;
  // The run_id of the server the subscriber is on; see trackReads.
  let subscriberServer: string | undefined;
  // RESP2: Redis then sends invalidations as pub/sub messages, which ioredis passes on (it drops RESP3 `invalidate` pushes).
  const subscriber = client.duplicate({ autoResubscribe: false, keyPrefix: '', protocol: 2 });
  subscriber.on('error', () => {});
  reconnectWhenEnded(subscriber, () => closing, backoff);

  const stopUsingCopies = () => {
    tracking = false;
    connectionEpoch++;
    generation++;
    copies.clear();
  };

  const trackReads = async () => {
    const started = connectionEpoch;
    const target = subscriberId;
    if (target === undefined || client.status !== 'ready') return;
    try {
      // Client ids are per server, and behind Sentinel the two connections find the master each
      // on their own: during a failover they can land on different servers, where the id may name
      // some other client and the invalidations would go to it. Copies wait until both agree; a
      // reconnect of either (the sentinels end both on the old master) tries again.
      if (movable && (await serverOf(client)) !== subscriberServer) return;
      await client.client('TRACKING', 'ON', 'REDIRECT', String(target));
      if (connectionEpoch === started && !closing) tracking = true;
    } catch {
      // Redis without CLIENT TRACKING (older than 6, or the command renamed away): plain reads.
    }
  };

  subscriber.on('ready', async () => {
    try {
      const id = (await subscriber.client('ID')) as number;
      // Asked before SUBSCRIBE: a RESP2 connection in subscriber mode takes no other commands.
      const server = movable ? await serverOf(subscriber) : undefined;
      await subscriber.subscribe(INVALIDATION_CHANNEL);
      subscriberServer = server;
      subscriberId = id;
      await trackReads();
    } catch {
      // Reconnecting already; the next 'ready' tries again.
    }
  });
  subscriber.on('close', () => {
    subscriberId = undefined;
    subscriberServer = undefined;
    stopUsingCopies();
  });
  subscriber.on('messageBuffer', (channel: Buffer, keys: Buffer[] | null) => {
    if (channel.toString() !== INVALIDATION_CHANNEL) return;
    generation++;
    // null: the whole database was flushed.
    if (!Array.isArray(keys)) return void copies.clear();
    for (const key of keys) copies.delete(key.toString());
  });
  client.on('close', stopUsingCopies);
  client.on('ready', () => void trackReads());

  return {
    async get(key, maxAgeMs) {
      const fullKey = keyPrefix + key;
      // Monotonic: a wall clock stepped back would keep a copy past maxAgeMs.
      const now = performance.now();
      const copy = copies.get(fullKey);
      if (copy && now - copy.readAt < maxAgeMs && now < copy.keyExpiresAt) return copy.value;
      const readAt = generation;
      const wasTracking = tracking;
      const [value, ttlMs] = await read(key);
      if (value !== null && wasTracking && tracking && generation === readAt && ttlMs > 0) {
        if (copies.size >= COHERENT_COPIES_LIMIT && !copies.has(fullKey)) copies.delete(copies.keys().next().value as string);
        copies.set(fullKey, { value, readAt: now, keyExpiresAt: now + ttlMs });
      }
      return value;
    },
    forget(key) {
      generation++;
      copies.delete(keyPrefix + key);
    },
    async close() {
      closing = true;
      stopUsingCopies();
      subscriber.disconnect();
    },
  };
}

export function createRedisStore(url: string, options: RedisStoreOptions = {}): Store {
  const connectTimeout = options.connectTimeoutMs ?? 2_000;
  const commandTimeout = options.commandTimeoutMs ?? 2_000;
  const common = {
    keyPrefix: options.keyPrefix ?? '',
    // Concurrent requests' commands share one round trip without any code here batching them.
    enableAutoPipelining: true,
  };
  const perConnection: RedisOptions = {
    connectTimeout,
    commandTimeout,
    // Queued commands fail after two reconnect attempts (and at the latest at commandTimeout),
    // so an outage turns into rejected promises instead of requests waiting for Redis to return.
    maxRetriesPerRequest: 2,
  };
  // Short, capped backoff: together with maxRetriesPerRequest the delays decide how fast each
  // request fails during an outage, so they stay well under commandTimeout.
  const retryStrategy = (times: number): number => Math.min(50 * 2 ** (times - 1), 500);

  const sentinel = isSentinelUrl(url);
  const isCluster = !sentinel && (options.cluster === true || url.includes(','));
  let client: Redis | Cluster;
  if (sentinel) {
    client = new Redis({
      ...sentinelOptions(url, options.tlsCa, options.sentinelPassword),
      ...common,
      ...perConnection,
      retryStrategy,
      // While no sentinel answers, commands wait in the offline queue: commandTimeout bounds them.
      sentinelRetryStrategy: retryStrategy,
      // A sentinel that accepts the connection but never answers must not stall the reconnect.
      sentinelCommandTimeout: commandTimeout,
    });
  } else if (isCluster) {
    const { nodes, redisOptions } = clusterNodes(url, options.tlsCa);
    client = new Cluster(nodes, {
      ...common,
      clusterRetryStrategy: retryStrategy,
      redisOptions: { ...redisOptions, ...perConnection },
    });
  } else {
    const tls = url.startsWith('rediss://') && options.tlsCa ? { tls: { ca: options.tlsCa } } : {};
    client = new Redis(url, { ...common, ...perConnection, ...tls, retryStrategy });
  }
  // Failures reach callers as rejected commands; without a listener ioredis would also print
  // every reconnect attempt as an unhandled error event.
  client.on('error', () => {});
  let closing = false;
  if (!isCluster) reconnectWhenEnded(client as Redis, () => closing, retryStrategy);
  client.defineCommand('gatehouseTake', { numberOfKeys: 1, lua: TAKE_LUA });
  client.defineCommand('gatehouseDelIfEquals', { numberOfKeys: 1, lua: DEL_IF_EQUALS_LUA });
  client.defineCommand('gatehouseExpireIfEquals', { numberOfKeys: 1, lua: EXPIRE_IF_EQUALS_LUA });
  client.defineCommand('gatehouseReplaceIfHeld', { numberOfKeys: 2, lua: REPLACE_IF_HELD_LUA });
  const scripts = client as unknown as WithScripts;
  const run = <T>(command: string, promise: Promise<T>): Promise<T> =>
    runCommand(command, isCluster ? withDeadline(promise, commandTimeout) : promise);
  // A cluster would need tracking per node and slot migrations handled: it reads every time.
  const coherent = isCluster
    ? undefined
    : coherentReads(client as Redis, common.keyPrefix, async (key) => {
        const results = await run('GET', client.pipeline().get(key).pttl(key).exec());
        const [value, ttlMs] = execResults('GET', results);
        return [typeof value === 'string' ? value : null, Number(ttlMs)];
      }, sentinel, retryStrategy);
  const forget = (key: string) => coherent?.forget(key);

  return {
    async get(key) {
      return run('GET', client.get(key));
    },

    async getCoherent(key, maxAgeMs) {
      return coherent ? coherent.get(key, maxAgeMs) : run('GET', client.get(key));
    },

    async set(key, value, { ttlMs, onlyIfAbsent, onlyIfPresent }) {
      checkSetOptions({ ttlMs, onlyIfAbsent, onlyIfPresent });
      forget(key);
      const reply = onlyIfAbsent
        ? client.set(key, value, 'PX', ttlMs, 'NX')
        : onlyIfPresent
          ? client.set(key, value, 'PX', ttlMs, 'XX')
          : client.set(key, value, 'PX', ttlMs);
      return (await run('SET', reply)) === 'OK';
    },

    async replace(key, value) {
      forget(key);
      return (await run('SET', client.set(key, value, 'KEEPTTL', 'XX'))) === 'OK';
    },

    async expire(key, ttlMs) {
      checkExpireTtl(ttlMs);
      forget(key);
      return (await run('PEXPIRE', client.pexpire(key, ttlMs))) === 1;
    },

    async take(key) {
      forget(key);
      return run('EVALSHA', scripts.gatehouseTake(key));
    },

    async delIfEquals(key, expected) {
      forget(key);
      return (await run('EVALSHA', scripts.gatehouseDelIfEquals(key, expected))) === 1;
    },

    async expireIfEquals(key, expected, ttlMs) {
      checkTtl('ttlMs', ttlMs);
      forget(key);
      return (await run('EVALSHA', scripts.gatehouseExpireIfEquals(key, expected, ttlMs))) === 1;
    },

    async replaceIfHeld(key, value, lockKey, owner) {
      forget(key);
      return (await run('EVALSHA', scripts.gatehouseReplaceIfHeld(key, lockKey, value, owner))) === 1;
    },

    async indexAdd(key, member, expiresAtMs, keyTtlMs) {
      checkTimestamp('expiresAtMs', expiresAtMs);
      checkTtl('keyTtlMs', keyTtlMs);
      // GT alone never sets a TTL on a key that has none (Redis treats that as infinite), so a
      // freshly created index first gets one through NX; after that the TTL only grows.
      const results = await run(
        'MULTI',
        client.multi().zadd(key, expiresAtMs, member).pexpire(key, keyTtlMs, 'NX').pexpire(key, keyTtlMs, 'GT').exec(),
      );
      execResults('ZADD', results);
    },

    async indexMembers(key, nowMs) {
      checkTimestamp('nowMs', nowMs);
      const results = await run(
        'MULTI',
        client.multi().zremrangebyscore(key, '-inf', String(nowMs)).zrange(key, '0', '-1', 'WITHSCORES').exec(),
      );
      return pairsToEntries(execResults('ZRANGE', results)[1]);
    },

    async indexRemove(key, member) {
      await run('ZREM', client.zrem(key, member));
    },

    async indexCount(key, nowMs) {
      checkTimestamp('nowMs', nowMs);
      const results = await run('MULTI', client.multi().zremrangebyscore(key, '-inf', String(nowMs)).zcard(key).exec());
      return Number(execResults('ZCARD', results)[1]);
    },

    async ping() {
      await run('PING', client.ping());
    },

    async close() {
      closing = true;
      await coherent?.close();
      // QUIT waits for replies still in flight; a client that is not connected has nothing to
      // wait for and QUIT would only sit in the offline queue.
      if (client.status === 'ready') {
        try {
          await client.quit();
        } catch {
          // The connection is going away anyway.
        }
      }
      // Also after QUIT: only disconnect() reaches the connector, which behind Sentinel holds the
      // failover detector's subscriptions on every sentinel (they would keep reconnecting forever).
      client.disconnect();
    },
  };
}

