// A throwaway Redis Cluster for tests: N masters (no replicas) as separate `redis-server`
// processes on free loopback ports, sharing one temp directory that stop() removes again.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Redis } from 'ioredis';
import { freePort } from '../../e2e/support/stack.ts';
import { waitFor } from './http-client.ts';

export interface RedisCluster {
  /** One `redis://127.0.0.1:<port>` URL per node. */
  urls: string[];
  /** All node URLs joined by commas: what REDIS_URL takes for a cluster. */
  url: string;
  stop(): Promise<void>;
}

const STARTUP_TIMEOUT_MS = 15_000;

interface Node {
  port: number;
  child: ChildProcess;
  output: () => string;
}

function spawnNode(port: number, dir: string): Node {
  const child = spawn(
    'redis-server',
    [
      '--port', String(port),
      '--bind', '127.0.0.1',
      '--cluster-enabled', 'yes',
      '--cluster-config-file', path.join(dir, `nodes-${port}.conf`),
      '--cluster-node-timeout', '5000',
      '--save', '',
      '--appendonly', 'no',
      '--dir', dir,
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  const collect = (chunk: Buffer) => {
    output = (output + chunk.toString()).slice(-8_000);
  };
  child.stdout?.on('data', collect);
  child.stderr?.on('data', collect);
  child.on('error', (error) => collect(Buffer.from(`spawn error: ${error.message}\n`)));
  return { port, child, output: () => output };
}

function stopNode(node: Node): Promise<void> {
  return new Promise<void>((resolve) => {
    const { child } = node;
    if (child.exitCode !== null || child.signalCode !== null) return resolve();
    const killer = setTimeout(() => child.kill('SIGKILL'), 5_000);
    child.once('exit', () => {
      clearTimeout(killer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

function exited(node: Node): boolean {
  return node.child.exitCode !== null || node.child.signalCode !== null;
}

/** Runs one short-lived client against a node; connection failures read as `undefined`. */
async function ask(port: number, command: string, ...args: string[]): Promise<string | undefined> {
  const client = new Redis({ host: '127.0.0.1', port, lazyConnect: true, connectTimeout: 1_000, maxRetriesPerRequest: 0, retryStrategy: () => null });
  client.on('error', () => {});
  try {
    await client.connect();
    return String(await client.call(command, ...args));
  } catch {
    return undefined;
  } finally {
    client.disconnect();
  }
}

function runCli(args: string[], timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('redis-cli', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(output);
      else reject(new Error(`redis-cli ${args.join(' ')} failed (code ${code}, signal ${signal}):\n${output}`));
    });
  });
}

export async function startRedisCluster({ nodes: count = 3 }: { nodes?: number } = {}): Promise<RedisCluster> {
  if (count < 3) throw new Error('redis-cli --cluster create needs at least 3 masters');
  const dir = await mkdtemp(path.join(tmpdir(), 'gatehouse-redis-cluster-'));
  const nodes: Node[] = [];
  // Should the test process die without running afterAll, the servers go down with it.
  const killAll = () => {
    for (const node of nodes) if (!exited(node)) node.child.kill('SIGKILL');
  };
  process.once('exit', killAll);
  const stop = async () => {
    process.off('exit', killAll);
    await Promise.all(nodes.map(stopNode));
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const ports = new Set<number>();
    // freePort() releases the port before returning it, so two calls may hand out the same one.
    while (ports.size < count) ports.add(await freePort());
    for (const port of ports) nodes.push(spawnNode(port, dir));

    for (const node of nodes) {
      await waitFor(
        `redis-server on port ${node.port} to answer PING`,
        async () => {
          if (exited(node)) throw new Error(`redis-server on port ${node.port} exited:\n${node.output()}`);
          return (await ask(node.port, 'PING')) === 'PONG' ? true : undefined;
        },
        STARTUP_TIMEOUT_MS,
      );
    }

    const addresses = nodes.map((node) => `127.0.0.1:${node.port}`);
    await runCli(['--cluster', 'create', ...addresses, '--cluster-replicas', '0', '--cluster-yes'], STARTUP_TIMEOUT_MS);

    for (const node of nodes) {
      await waitFor(
        `cluster_state:ok on port ${node.port}`,
        async () => ((await ask(node.port, 'CLUSTER', 'INFO'))?.includes('cluster_state:ok') ? true : undefined),
        STARTUP_TIMEOUT_MS,
      );
    }
  } catch (error) {
    const logs = nodes.map((node) => `--- redis-server :${node.port} ---\n${node.output()}`).join('\n');
    await stop();
    throw new Error(`${error instanceof Error ? error.message : String(error)}\n${logs}`, { cause: error });
  }

  const urls = nodes.map((node) => `redis://127.0.0.1:${node.port}`);
  return { urls, url: urls.join(','), stop };
}
