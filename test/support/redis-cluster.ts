// A throwaway Redis Cluster for tests: N masters (no replicas) as separate `redis-server`
// processes on free loopback ports, sharing one temp directory that stop() removes again.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { freePort } from '../../e2e/support/stack.ts';
import { waitFor } from './http-client.ts';
import { ask, hasExited, startRedisGroup } from './redis-process.ts';

export interface RedisCluster {
  /** One `redis://127.0.0.1:<port>` URL per node. */
  urls: string[];
  /** All node URLs joined by commas: what REDIS_URL takes for a cluster. */
  url: string;
  stop(): Promise<void>;
}

const STARTUP_TIMEOUT_MS = 15_000;

function nodeArgs(port: number, dir: string): string[] {
  return [
    '--port', String(port),
    '--bind', '127.0.0.1',
    '--cluster-enabled', 'yes',
    '--cluster-config-file', path.join(dir, `nodes-${port}.conf`),
    '--cluster-node-timeout', '5000',
    '--save', '',
    '--appendonly', 'no',
    '--dir', dir,
  ];
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
  const group = await startRedisGroup('redis-cluster');
  const nodes = group.processes;
  try {
    const ports = new Set<number>();
    // freePort() releases the port before returning it, so two calls may hand out the same one.
    while (ports.size < count) ports.add(await freePort());
    for (const port of ports) group.spawn(port, nodeArgs(port, group.dir));

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
    await runCli(['--cluster', 'create', ...addresses, '--cluster-replicas', '0', '--cluster-yes'], STARTUP_TIMEOUT_MS);

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

  const urls = nodes.map((node) => `redis://127.0.0.1:${node.port}`);
  return { urls, url: urls.join(','), stop: group.stop };
}
