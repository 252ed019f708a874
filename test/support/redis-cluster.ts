// A throwaway Redis Cluster for tests: N masters (and, when asked, a replica of each) as separate
// `redis-server` processes on free loopback ports, sharing one temp directory that stop() removes.
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { freePort } from '../../e2e/support/stack.ts';
import { waitFor } from './http-client.ts';
import { ask as askNode, hasExited, startRedisGroup } from './redis-process.ts';
import { makeTestCertificates, type TestCertificates } from './test-ca.ts';

export interface RedisCluster {
  /** One `redis://127.0.0.1:<port>` URL per node (`rediss://` with `tls`). */
  urls: string[];
  /** With `tls`: the PEM text of the CA that signed every node's certificate (what REDIS_TLS_CA takes). */
  caPem?: string;
  /** All node URLs joined by commas: what REDIS_URL takes for a cluster. */
  url: string;
  /** The port of the node that serves `key` now (a master). */
  masterOf(key: string): Promise<number>;
  /** SIGKILLs the node on `port`: no goodbye to its replicas or clients, as a crashed host. */
  kill(port: number): void;
  /** Starts the killed node on `port` again with its old cluster config (it rejoins, as a replica once failed over). */
  restart(port: number): Promise<void>;
  /** Resolves once a master other than `port` serves `key` and the cluster says ok; the ms that took. */
  failedOver(key: string, port: number, timeoutMs: number): Promise<number>;
  stop(): Promise<void>;
}

export interface ClusterOptions {
  /** Masters (at least 3). */
  nodes?: number;
  /** Replicas per master. */
  replicas?: number;
  /** How long a node may be unreachable before it is failed (and its replica promoted). */
  nodeTimeoutMs?: number;
  /**
   * Redis's own default (`yes`) refuses every query while any slot is uncovered, i.e. on every
   * shard between a master's failure and its replica's promotion; `no` keeps the other shards serving.
   */
  requireFullCoverage?: boolean;
  /** Clients, replication and the cluster bus over TLS only (a private CA's certificate for 127.0.0.1). */
  tls?: boolean;
}

type NodeOptions = Required<Pick<ClusterOptions, 'nodeTimeoutMs' | 'requireFullCoverage'>> & { certificates?: TestCertificates };

const STARTUP_TIMEOUT_MS = 15_000;

/** A node's client port and its cluster-bus port. */
interface NodePorts {
  port: number;
  busPort: number;
}

/**
 * Redis's implicit bus port (client port + 10 000) is never checked for being free and lies past
 * 65 535 for high ephemeral ports, so each node is given a bus port picked like its client port.
 */
async function pickPorts(count: number): Promise<NodePorts[]> {
  const ports = new Set<number>();
  // freePort() releases the port before returning it, so two calls may hand out the same one.
  while (ports.size < count * 2) ports.add(await freePort());
  const list = [...ports];
  return list.slice(0, count).map((port, index) => ({ port, busPort: list[count + index] as number }));
}

/**
 * Another process may take a picked port between freePort() and redis-server's bind; then the
 * whole start is tried again on new ports, since the cluster's ports are fixed at creation.
 * Redis 7.0 also, rarely and on a busy machine, leaves one node out of the gossip after
 * `--cluster create` (CI saw one node never reach cluster_state:ok in 15 s while the other two
 * did); new nodes are the only cure, and no test here is about forming a cluster.
 */
const START_ATTEMPTS = 3;
const CLI_TIMED_OUT = 'did not finish';

function isRetryableStartFailure(error: unknown): boolean {
  if (!(error instanceof Error)) return false;
  const lostPortRace = error.message.includes('Address already in use');
  const joinNeverConverged = error.message.includes(CLI_TIMED_OUT) || error.message.includes('cluster_state:ok on port');
  return lostPortRace || joinNeverConverged;
}

function nodeArgs({ port, busPort }: NodePorts, dir: string, options: NodeOptions): string[] {
  // A folder per node: a replica saves the snapshot it syncs as dump.rdb there, which a shared
  // folder would hand to whichever node starts next.
  const nodeDir = path.join(dir, String(port));
  mkdirSync(nodeDir, { recursive: true });
  const transport = options.certificates
    ? [
        '--port', '0',
        '--tls-port', String(port),
        '--tls-cluster', 'yes',
        '--tls-replication', 'yes',
        '--tls-cert-file', options.certificates.cert,
        '--tls-key-file', options.certificates.key,
        '--tls-ca-cert-file', options.certificates.ca,
        '--tls-auth-clients', 'no',
      ]
    : ['--port', String(port)];
  return [
    ...transport,
    '--bind', '127.0.0.1',
    '--cluster-enabled', 'yes',
    '--cluster-port', String(busPort),
    '--cluster-config-file', path.join(dir, `nodes-${port}.conf`),
    '--cluster-node-timeout', String(options.nodeTimeoutMs),
    '--cluster-require-full-coverage', options.requireFullCoverage ? 'yes' : 'no',
    '--save', '',
    '--appendonly', 'no',
    '--dir', nodeDir,
  ];
}

function runCli(args: string[], timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('redis-cli', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(output);
      else if (timedOut) reject(new Error(`redis-cli ${args.join(' ')} ${CLI_TIMED_OUT} after ${timeoutMs} ms:\n${output}`));
      else reject(new Error(`redis-cli ${args.join(' ')} failed (code ${code}, signal ${signal}):\n${output}`));
    });
  });
}

export async function startRedisCluster(options: ClusterOptions = {}): Promise<RedisCluster> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startRedisClusterOnce(options);
    } catch (error) {
      if (!isRetryableStartFailure(error) || attempt >= START_ATTEMPTS) throw error;
      console.warn(`Redis cluster start failed (attempt ${attempt} of ${START_ATTEMPTS}); trying again on new ports: ${(error as Error).message.split('\n')[0]}`);
    }
  }
}

async function startRedisClusterOnce({ nodes: masters = 3, replicas = 0, nodeTimeoutMs = 5_000, requireFullCoverage = true, tls = false }: ClusterOptions): Promise<RedisCluster> {
  if (masters < 3) throw new Error('redis-cli --cluster create needs at least 3 masters');
  const count = masters * (1 + replicas);
  const group = await startRedisGroup('redis-cluster');
  const certificates = tls ? makeTestCertificates(group.dir) : undefined;
  const caPem = certificates ? readFileSync(certificates.ca, 'utf8') : undefined;
  const nodeOptions: NodeOptions = { nodeTimeoutMs, requireFullCoverage, certificates };
  // The test's own short-lived clients speak the nodes' transport too.
  const ask = (port: number, command: string, args: string[] = []) => askNode(port, command, args, caPem ? { tls: { ca: caPem } } : {});
  const cliTransport = certificates ? ['--tls', '--cacert', certificates.ca] : [];
  const nodes = group.processes;
  const busPorts = new Map<number, number>();
  try {
    for (const node of await pickPorts(count)) {
      busPorts.set(node.port, node.busPort);
      group.spawn(node.port, nodeArgs(node, group.dir, nodeOptions));
    }

    for (const node of nodes) {
      await waitFor(
        `redis-server on port ${node.port} to answer PING`,
        async () => {
          if (hasExited(node)) throw new Error(`redis-server on port ${node.port} exited:\n${node.output()}`);
          return (await ask(node.port, 'PING')) === 'PONG' ? true : undefined;
        },
        STARTUP_TIMEOUT_MS,
      );
    }

    const addresses = nodes.map((node) => `127.0.0.1:${node.port}`);
    await runCli([...cliTransport, '--cluster', 'create', ...addresses, '--cluster-replicas', String(replicas), '--cluster-yes'], STARTUP_TIMEOUT_MS);

    for (const node of nodes) {
      await waitFor(
        `cluster_state:ok on port ${node.port}`,
        async () => (String(await ask(node.port, 'CLUSTER', ['INFO'])).includes('cluster_state:ok') ? true : undefined),
        STARTUP_TIMEOUT_MS,
      );
    }
  } catch (error) {
    throw await group.failed(error);
  }

  const urls = nodes.map((node) => `${tls ? 'rediss' : 'redis'}://127.0.0.1:${node.port}`);
  /** Asks the live nodes in turn: which port serves this key's slot, and is the cluster ok. */
  const ownerOf = async (key: string): Promise<{ port: number; ok: boolean } | undefined> => {
    for (const node of nodes.filter((candidate) => !hasExited(candidate))) {
      const slot = await ask(node.port, 'CLUSTER', ['KEYSLOT', key]);
      const info = await ask(node.port, 'CLUSTER', ['INFO']);
      const table = await ask(node.port, 'CLUSTER', ['NODES']);
      if (slot === undefined || info === undefined || table === undefined) continue;
      for (const line of String(table).split('\n')) {
        const [, address, flags, , , , , state, ...ranges] = line.split(' ');
        if (!address || !flags?.includes('master') || flags.includes('fail') || state !== 'connected') continue;
        const covers = ranges.some((range) => {
          const [from, to = from] = range.split('-').map(Number);
          return Number(slot) >= (from as number) && Number(slot) <= (to as number);
        });
        if (covers) return { port: Number(address.split('@')[0]?.split(':')[1]), ok: String(info).includes('cluster_state:ok') };
      }
    }
    return undefined;
  };
  return {
    urls,
    ...(caPem ? { caPem } : {}),
    url: urls.join(','),
    async masterOf(key) {
      const owner = await ownerOf(key);
      if (!owner) throw new Error(`no live master serves ${key}`);
      return owner.port;
    },
    kill(port) {
      nodes.find((node) => node.port === port)?.child.kill('SIGKILL');
    },
    async restart(port) {
      const index = nodes.findIndex((node) => node.port === port);
      if (index < 0) throw new Error(`no node on port ${port}`);
      nodes.splice(index, 1);
      // Its bus port as before: the other nodes' configs still name it.
      group.spawn(port, nodeArgs({ port, busPort: busPorts.get(port) as number }, group.dir, nodeOptions));
      await waitFor(`redis-server on port ${port} to answer PING again`, async () => ((await ask(port, 'PING')) === 'PONG' ? true : undefined), STARTUP_TIMEOUT_MS);
    },
    async failedOver(key, port, timeoutMs) {
      const started = Date.now();
      await waitFor(
        `a master other than :${port} serving ${key}`,
        async () => {
          const owner = await ownerOf(key);
          return owner && owner.port !== port && owner.ok ? true : undefined;
        },
        timeoutMs,
        50,
      );
      return Date.now() - started;
    },
    stop: group.stop,
  };
}
