// One `redis-server` process of a test's own (a cluster node, a replica, a sentinel), with its last
// output kept for the failure message, and a short-lived client to ask it one command.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Redis, type RedisOptions } from 'ioredis';

export interface RedisProcess {
  port: number;
  child: ChildProcess;
  /** The last 8 KB of its stdout and stderr. */
  output: () => string;
}

export function spawnRedis(port: number, args: string[]): RedisProcess {
  const child = spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  const collect = (chunk: Buffer) => {
    output = (output + chunk.toString()).slice(-8_000);
  };
  child.stdout?.on('data', collect);
  child.stderr?.on('data', collect);
  child.on('error', (error) => collect(Buffer.from(`spawn error: ${error.message}\n`)));
  return { port, child, output: () => output };
}

export function hasExited(node: RedisProcess): boolean {
  return node.child.exitCode !== null || node.child.signalCode !== null;
}

/** SIGTERM, then SIGKILL if it has not gone within 5 s. */
export function stopRedis(node: RedisProcess): Promise<void> {
  return new Promise<void>((resolve) => {
    const { child } = node;
    if (hasExited(node)) return resolve();
    const killer = setTimeout(() => child.kill('SIGKILL'), 5_000);
    child.once('exit', () => {
      clearTimeout(killer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

/** Runs one short-lived client against a node; connection failures read as `undefined`. */
export async function ask(port: number, command: string, args: string[] = [], options: RedisOptions = {}): Promise<unknown> {
  const client = new Redis({ host: '127.0.0.1', port, lazyConnect: true, connectTimeout: 1_000, maxRetriesPerRequest: 0, retryStrategy: () => null, ...options });
  client.on('error', () => {});
  try {
    await client.connect();
    return await client.call(command, ...args);
  } catch {
    return undefined;
  } finally {
    client.disconnect();
  }
}

export interface RedisGroup {
  /** A temp directory of the group's own, for configuration and data files. */
  dir: string;
  processes: RedisProcess[];
  spawn(port: number, args: string[]): RedisProcess;
  /** Stops every process and removes the directory. */
  stop(): Promise<void>;
  /** Stops everything and returns `error` with every process's last output appended: for a failed start. */
  failed(error: unknown): Promise<Error>;
}

/** Processes of one deployment; should the test process die without stopping them, they go down with it. */
export async function startRedisGroup(name: string): Promise<RedisGroup> {
  const dir = await mkdtemp(path.join(tmpdir(), `gatehouse-${name}-`));
  const processes: RedisProcess[] = [];
  const killAll = () => {
    for (const node of processes) if (!hasExited(node)) node.child.kill('SIGKILL');
  };
  process.once('exit', killAll);
  const stop = async () => {
    process.off('exit', killAll);
    await Promise.all(processes.map(stopRedis));
    await rm(dir, { recursive: true, force: true });
  };
  return {
    dir,
    processes,
    spawn(port, args) {
      const node = spawnRedis(port, args);
      processes.push(node);
      return node;
    },
    stop,
    async failed(error) {
      const logs = processes.map((node) => `--- redis-server :${node.port} ---\n${node.output()}`).join('\n');
      await stop();
      return new Error(`${error instanceof Error ? error.message : String(error)}\n${logs}`, { cause: error });
    },
  };
}
