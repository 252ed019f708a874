// A throwaway Redis Sentinel deployment for tests: one master, one replica and three sentinels
// (quorum 2), each a `redis-server` process on a free loopback port, with their files in one temp
// directory that stop() removes. The data nodes and the sentinels have passwords of their own, as
// in production, so a password sent to the wrong side fails here. With `tls`, everything speaks
// only TLS, with certificates from a private CA.
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Redis, type RedisOptions } from 'ioredis';
import { freePort } from '../../e2e/support/stack.ts';
import { waitFor } from './http-client.ts';
import { ask, hasExited, startRedisGroup } from './redis-process.ts';
import { makeTestCertificates } from './test-ca.ts';

export interface RedisSentinel {
  masterName: string;
  /** What REDIS_URL takes: `redis+sentinel://:<password>@127.0.0.1:<port>,…/<masterName>` (`rediss+sentinel` with TLS). */
  url: string;
  /** With TLS: the private CA's certificate (PEM text) that every node's certificate is signed by. */
  tlsCa: string | undefined;
  /** The sentinels' own password (their `requirepass`): what REDIS_SENTINEL_PASSWORD takes. */
  sentinelPassword: string;
  sentinelPorts: number[];
  /** The data nodes: the first started as the master, the second as its replica. */
  dataPorts: [number, number];
  /** The master's port as the sentinels name it now (`SENTINEL get-master-addr-by-name`). */
  masterPort(): Promise<number | undefined>;
  /** The master's port as each sentinel names it now (`undefined`: that sentinel did not answer). */
  namedMasters(): Promise<Array<number | undefined>>;
  /** Waits until every sentinel names a master other than `oldPort`, and that node says it is one. */
  waitForPromotion(oldPort: number, timeoutMs?: number): Promise<number>;
  /** A client of the test's own on one data node, bypassing Sentinel. */
  dataClient(port: number): Redis;
  /** A client of the test's own on one sentinel (the first if not given). */
  sentinelClient(port?: number): Redis;
  /** SIGSTOP a node or sentinel: it keeps its connections and accepts new ones, but answers nothing until the returned resume(). */
  pause(port: number): () => void;
  /** SIGKILL a data node (no shutdown, no goodbye to its clients or replicas) and wait until it is gone. */
  kill(port: number): Promise<void>;
  stop(): Promise<void>;
}

const STARTUP_TIMEOUT_MS = 20_000;
const MASTER_NAME = 'gatehouse-test';
/** Sentinel's default is 30 s; a second keeps a test's failover short without flapping on a busy machine. */
const DOWN_AFTER_MS = 1_000;
const FAILOVER_TIMEOUT_MS = 5_000;

/** Flat [key, value, key, value, …] replies (SENTINEL MASTER) as an object. */
function fields(reply: unknown): Record<string, string> {
  const list = Array.isArray(reply) ? reply.map(String) : [];
  const out: Record<string, string> = {};
  for (let i = 0; i + 1 < list.length; i += 2) out[list[i] as string] = list[i + 1] as string;
  return out;
}

function testClient(port: number, password: string, options: RedisOptions): Redis {
  const client = new Redis({ host: '127.0.0.1', port, password, maxRetriesPerRequest: 1, connectTimeout: 1_000, ...options });
  client.on('error', () => {});
  return client;
}

/** `tls`: every node and sentinel speaks only TLS, with a certificate from a private CA. */
export async function startRedisSentinel({ tls = false }: { tls?: boolean } = {}): Promise<RedisSentinel> {
  const group = await startRedisGroup('redis-sentinel');
  const { dir, processes } = group;
  const password = randomBytes(12).toString('hex');
  const sentinelPassword = randomBytes(12).toString('hex');
  const certificates = tls ? makeTestCertificates(dir) : undefined;
  const tlsCa = certificates ? readFileSync(certificates.ca, 'utf8') : undefined;
  const clientTls: RedisOptions = tlsCa ? { tls: { ca: tlsCa } } : {};
  // As settings, `--name value` on the command line or `name value` in a sentinel's file: the
  // listening port, TLS only if asked for (also to the master, for replicas and sentinels).
  const listen = (port: number): Array<[string, string]> =>
    certificates
      ? [
          ['port', '0'],
          ['tls-port', String(port)],
          ['tls-cert-file', certificates.cert],
          ['tls-key-file', certificates.key],
          ['tls-ca-cert-file', certificates.ca],
          ['tls-auth-clients', 'no'],
          ['tls-replication', 'yes'],
        ]
      : [['port', String(port)]];

  const ports = new Set<number>();
  // freePort() releases the port before returning it, so two calls may hand out the same one.
  while (ports.size < 5) ports.add(await freePort());
  const [masterPort, replicaPort, ...sentinelPorts] = [...ports] as [number, number, number, number, number];
  const dataAuth = { password, ...clientTls };
  const sentinelAuth = { password: sentinelPassword, ...clientTls };

  const dataNode = (port: number, extra: string[]) =>
    group.spawn(port, [
      ...listen(port).flatMap(([name, value]) => [`--${name}`, value]),
      '--bind', '127.0.0.1',
      '--dir', dir,
      '--dbfilename', `dump-${port}.rdb`,
      '--save', '',
      '--appendonly', 'no',
      '--requirepass', password,
      // Either node may be a replica after a failover, and then authenticates to the new master.
      '--masterauth', password,
      '--replica-announce-ip', '127.0.0.1',
      // A replica's first sync starts at once instead of after the default 5 s wait for others.
      '--repl-diskless-sync-delay', '0',
      ...extra,
    ]);

  try {
    dataNode(masterPort, []);
    await waitFor('the master to answer PING', async () => ((await ask(masterPort, 'PING', [], dataAuth)) === 'PONG' ? true : undefined), STARTUP_TIMEOUT_MS, 50);
    dataNode(replicaPort, ['--replicaof', '127.0.0.1', String(masterPort)]);
    await waitFor(
      'the replica to be in sync',
      async () => (String(await ask(replicaPort, 'INFO', ['replication'], dataAuth)).includes('master_link_status:up') ? true : undefined),
      STARTUP_TIMEOUT_MS,
      50,
    );

    for (const port of sentinelPorts) {
      // Each sentinel rewrites its own configuration file as it learns the deployment.
      const file = path.join(dir, `sentinel-${port}.conf`);
      await writeFile(
        file,
        [
          ...listen(port).map(([name, value]) => `${name} ${value}`),
          'bind 127.0.0.1',
          `dir ${dir}`,
          // Sentinels announce themselves and name nodes by IP: loopback, so clients here can reach them.
          'sentinel announce-ip 127.0.0.1',
          // The sentinels' own password; they also use it with each other.
          `requirepass ${sentinelPassword}`,
          `sentinel monitor ${MASTER_NAME} 127.0.0.1 ${masterPort} 2`,
          `sentinel auth-pass ${MASTER_NAME} ${password}`,
          `sentinel down-after-milliseconds ${MASTER_NAME} ${DOWN_AFTER_MS}`,
          `sentinel failover-timeout ${MASTER_NAME} ${FAILOVER_TIMEOUT_MS}`,
          '',
        ].join('\n'),
      );
      group.spawn(port, [file, '--sentinel']);
    }
    for (const port of sentinelPorts) {
      await waitFor(
        `sentinel ${port} to know the replica and the other two sentinels`,
        async () => {
          const sentinel = processes.find((node) => node.port === port);
          if (sentinel && hasExited(sentinel)) throw new Error(`sentinel on port ${port} exited:\n${sentinel.output()}`);
          const master = fields(await ask(port, 'SENTINEL', ['MASTER', MASTER_NAME], sentinelAuth));
          return master['flags'] === 'master' && master['num-slaves'] === '1' && master['num-other-sentinels'] === '2' ? true : undefined;
        },
        STARTUP_TIMEOUT_MS,
        100,
      );
    }
  } catch (error) {
    throw await group.failed(error);
  }

  const addressFrom = async (port: number): Promise<number | undefined> => {
    const reply = await ask(port, 'SENTINEL', ['GET-MASTER-ADDR-BY-NAME', MASTER_NAME], sentinelAuth);
    return Array.isArray(reply) ? Number(reply[1]) : undefined;
  };

  const namedMasters = () => Promise.all(sentinelPorts.map(addressFrom));
  return {
    masterName: MASTER_NAME,
    url: `${tls ? 'rediss' : 'redis'}+sentinel://:${password}@${sentinelPorts.map((port) => `127.0.0.1:${port}`).join(',')}/${MASTER_NAME}`,
    tlsCa,
    sentinelPassword,
    sentinelPorts,
    dataPorts: [masterPort, replicaPort],
    async masterPort() {
      for (const port of sentinelPorts) {
        const answer = await addressFrom(port);
        if (answer !== undefined) return answer;
      }
      return undefined;
    },
    namedMasters,
    async waitForPromotion(oldPort, timeoutMs = 30_000) {
      return waitFor(
        `the sentinels to promote a new master in place of ${oldPort}`,
        async () => {
          const named = await namedMasters();
          const [first] = named;
          if (first === undefined || first === oldPort || named.some((port) => port !== first)) return undefined;
          return String(await ask(first, 'ROLE', [], dataAuth)).startsWith('master') ? first : undefined;
        },
        timeoutMs,
        50,
      );
    },
    dataClient(port) {
      return testClient(port, password, clientTls);
    },
    sentinelClient(port = sentinelPorts[0]) {
      return testClient(port, sentinelPassword, clientTls);
    },
    pause(port) {
      const node = processes.find((candidate) => candidate.port === port && !hasExited(candidate));
      if (!node) throw new Error(`no running process on port ${port}`);
      node.child.kill('SIGSTOP');
      return () => void node.child.kill('SIGCONT');
    },
    async kill(port) {
      const node = processes.find((candidate) => candidate.port === port && !hasExited(candidate));
      if (!node) throw new Error(`no running data node on port ${port}`);
      const gone = new Promise((resolve) => node.child.once('exit', resolve));
      node.child.kill('SIGKILL');
      await gone;
    },
    stop: group.stop,
  };
}
