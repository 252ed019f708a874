/**
 * Test-only stand-in for the Upstash REST API in front of a real Redis, covering what
 * @upstash/redis sends: POST / (one command), POST /pipeline and POST /multi-exec, a bearer
 * token, and `Upstash-Encoding: base64` responses.
 */
import { createServer } from 'node:http';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Redis } from 'ioredis';

export interface UpstashBridge {
  url: string;
  close(): Promise<void>;
}

type Reply = string | number | null | Reply[];
type Outcome = { result: Reply } | { error: string };

class BadRequest extends Error {}

function toCommand(value: unknown): [string, ...string[]] {
  if (!Array.isArray(value) || value.length === 0) throw new BadRequest('ERR command must be a non-empty array');
  const parts = value.map((part: unknown) => {
    if (typeof part === 'string') return part;
    if (typeof part === 'number' || typeof part === 'boolean') return String(part);
    throw new BadRequest('ERR command arguments must be strings or numbers');
  });
  return parts as [string, ...string[]];
}

// Replies are read as Buffers so bulk strings survive byte for byte; like Upstash, every string
// is base64-encoded when asked for, while integers and nil keep their JSON types.
function encode(reply: unknown, base64: boolean): Reply {
  if (reply === null || reply === undefined) return null;
  if (typeof reply === 'number') return reply;
  if (Array.isArray(reply)) return reply.map((item: unknown) => encode(item, base64));
  const bytes = Buffer.isBuffer(reply) ? reply : Buffer.from(String(reply));
  return base64 ? bytes.toString('base64') : bytes.toString('utf8');
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

async function readJson(req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new BadRequest('ERR request body is not valid JSON');
  }
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

/** Commands an Upstash read region may answer from its replica. */
const REPLICA_READS = new Set(['GET', 'MGET', 'EXISTS', 'PTTL', 'TTL', 'ZRANGE', 'ZCARD', 'ZCOUNT', 'ZSCORE']);

/**
 * `replicaUrl`: single read commands go there instead, as Upstash's read regions answer them from a
 * replica that lags behind the primary (a fault no local Redis shows on demand: a test points it at
 * another database that it fills, or not, itself).
 */
export async function startUpstashBridge(options: { redisUrl: string; token: string; replicaUrl?: string }): Promise<UpstashBridge> {
  // RESP2 reply shapes are what the Upstash REST API returns (flat arrays, scores as strings).
  const redis = new Redis(options.redisUrl, { protocol: 2, maxRetriesPerRequest: 1 });
  redis.on('error', () => {});
  const replica = options.replicaUrl ? new Redis(options.replicaUrl, { protocol: 2, maxRetriesPerRequest: 1 }) : undefined;
  replica?.on('error', () => {});
  const connectionFor = (command: string) => (replica && REPLICA_READS.has(command.toUpperCase()) ? replica : redis);

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    if (req.headers.authorization !== `Bearer ${options.token}`) {
      send(res, 401, { error: 'Unauthorized' });
      return;
    }
    if (req.method !== 'POST') {
      send(res, 405, { error: 'ERR only POST is supported' });
      return;
    }
    const base64 = req.headers['upstash-encoding'] === 'base64';
    const path = new URL(req.url ?? '/', 'http://bridge').pathname;
    const body = await readJson(req);

    if (path === '/') {
      const [name, ...args] = toCommand(body);
      const answering = connectionFor(name);
      try {
        send(res, 200, { result: encode(await answering.callBuffer(name, ...args), base64) });
      } catch (error) {
        send(res, 400, { error: errorText(error) });
      }
      return;
    }

    if (path !== '/pipeline' && path !== '/multi-exec') {
      send(res, 404, { error: 'ERR unknown endpoint' });
      return;
    }
    if (!Array.isArray(body) || body.length === 0) throw new BadRequest('ERR expected an array of commands');
    const commands = body.map(toCommand);
    let outcomes: Outcome[];
    if (path === '/pipeline') {
      // One connection keeps the commands in order; each one succeeds or fails on its own.
      const settled = await Promise.allSettled(commands.map(([name, ...args]) => connectionFor(name).callBuffer(name, ...args)));
      outcomes = settled.map((s) =>
        s.status === 'fulfilled' ? { result: encode(s.value, base64) } : { error: errorText(s.reason) },
      );
    } else {
      const tx = redis.multi();
      for (const [name, ...args] of commands) tx.callBuffer(name, ...args);
      let results: Awaited<ReturnType<typeof tx.exec>>;
      try {
        results = await tx.exec();
      } catch (error) {
        // EXECABORT: a command was rejected while queueing, so nothing ran.
        send(res, 400, { error: errorText(error) });
        return;
      }
      outcomes = (results ?? []).map(([error, result]) =>
        error ? { error: error.message } : { result: encode(result, base64) },
      );
    }
    send(res, 200, outcomes);
  }

  const server = createServer((req, res) => {
    handle(req, res).catch((error: unknown) => {
      if (!res.headersSent) send(res, error instanceof BadRequest ? 400 : 500, { error: errorText(error) });
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as AddressInfo;

  return {
    url: `http://127.0.0.1:${port}`,
    async close() {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      // fetch keeps connections alive; without this close() would wait for them to time out.
      server.closeAllConnections();
      await closed;
      await redis.quit().catch(() => redis.disconnect());
      await replica?.quit().catch(() => replica.disconnect());
    },
  };
}
