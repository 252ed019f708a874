// A throwaway redis-server of a test's own, for what a shared Redis must not see: freezing it
// (SIGSTOP), killing its clients, reading its command counters, or starting it with odd settings.
import { spawn, type ChildProcess } from 'node:child_process';
import { freePort } from '../../e2e/support/stack.ts';
import { waitFor } from './http-client.ts';

export interface PrivateRedis {
  url: string;
  child: ChildProcess;
  /** Shuts the server down (SIGTERM: an append-only file is flushed), waits `downMs`, starts it again on the same port. */
  restart(downMs: number): Promise<void>;
  stop(): void;
}

async function redisAnswers(url: string): Promise<boolean> {
  const { Redis } = await import('ioredis');
  const client = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, connectTimeout: 500 });
  client.on('error', () => undefined); // not up yet: the caller polls
  try {
    await client.connect();
    return (await client.ping()) === 'PONG';
  } catch {
    return false;
  } finally {
    client.disconnect();
  }
}

export async function startPrivateRedis(extraArgs: string[] = []): Promise<PrivateRedis> {
  const port = await freePort();
  const url = `redis://127.0.0.1:${port}`;
  const start = async () => {
    const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', ...extraArgs], { stdio: 'ignore' });
    await waitFor('the private redis-server', async () => ((await redisAnswers(url)) ? true : undefined), 10_000, 100);
    return child;
  };
  const redis: PrivateRedis = {
    url,
    child: await start(),
    restart: async (downMs) => {
      const exited = new Promise((resolve) => redis.child.once('exit', resolve));
      redis.child.kill('SIGTERM');
      await exited;
      await new Promise((resolve) => setTimeout(resolve, downMs));
      redis.child = await start();
    },
    stop: () => {
      if (redis.child.pid) process.kill(redis.child.pid, 'SIGCONT');
      redis.child.kill('SIGKILL');
    },
  };
  return redis;
}
