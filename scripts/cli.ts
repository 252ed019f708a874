import type { IncomingMessage, Server } from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * Runs a dev-only server as a command: prints its ready line (what the test harness waits for),
 * closes it cleanly on SIGINT/SIGTERM, and exits 1 with just the message if it cannot start.
 */
export async function runUntilSignal<T extends { close(): Promise<void> }>(start: () => Promise<T>, readyLine: (handle: T) => string): Promise<void> {
  try {
    const handle = await start();
    console.log(readyLine(handle));
    const stop = () => void handle.close().then(() => process.exit(0));
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  } catch (err) {
    console.error(err instanceof Error ? err.message : err);
    process.exit(1);
  }
}

/** Listens and resolves to the real port (port 0 picks a free one); a bind error rejects. */
export function listen(server: Server, port: number, host: string | undefined): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve((server.address() as AddressInfo).port);
    });
  });
}

/** A dev server's request body, or undefined once it passes `maxBytes` (the rest is left unread). */
export async function readBodyUpTo(req: IncomingMessage, maxBytes: number): Promise<Buffer | undefined> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > maxBytes) return undefined;
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks);
}
