import { ServerResponse, type IncomingMessage, type Server } from 'node:http';
import type { Duplex } from 'node:stream';
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

const LOOPBACK_PEER = /^(?:127\.|::1$|::ffff:127\.)/;
/** `localhost` and its subdomains (RFC 6761), 127.0.0.0/8, ::1. */
const LOOPBACK_NAME = /^(?:(?:[a-z0-9-]+\.)*localhost|127(?:\.\d{1,3}){3}|\[::1\])$/;

/**
 * Sent from this machine, to a name of this machine (or one the caller names: the app's own host
 * name): not a peer on the network, nor a page whose own host name was made to resolve here (DNS
 * rebinding).
 */
function fromThisMachine(request: IncomingMessage, names: ReadonlySet<string>): boolean {
  if (!LOOPBACK_PEER.test(request.socket.remoteAddress ?? '')) return false;
  try {
    const { hostname } = new URL(`http://${request.headers.host ?? ''}`);
    return LOOPBACK_NAME.test(hostname) || names.has(hostname);
  } catch {
    return false;
  }
}

/**
 * Answers only requests from this machine, to this machine, on a server that listens on every
 * interface (so that both 127.0.0.1 and ::1 reach "localhost"): the dev IdP signs whatever it is
 * asked to and the demo API shows the bearer tokens it received, real ones when `npm run dev` runs
 * against a real IdP.
 */
const guarded = new WeakSet<Server>();

function thisMachineOnly(server: Server, names: ReadonlySet<string>): void {
  if (guarded.has(server)) return;
  guarded.add(server);
  for (const event of ['request', 'upgrade'] as const) {
    const handlers = server.listeners(event) as Array<(request: IncomingMessage, ...rest: unknown[]) => void>;
    // A server with no upgrade handler answers such requests as ordinary ones; one that did nothing would leave them hanging.
    if (handlers.length === 0) continue;
    server.removeAllListeners(event);
    server.on(event, (request: IncomingMessage, ...rest: unknown[]) => {
      if (fromThisMachine(request, names)) {
        for (const handler of handlers) handler.call(server, request, ...rest);
        return;
      }
      const [answer] = rest as [ServerResponse | Duplex];
      if (answer instanceof ServerResponse) answer.writeHead(403, { 'content-type': 'text/plain' }).end('This dev server answers this machine only.\n');
      else answer.destroy();
    });
  }
}

/**
 * Listens and resolves to the real port (port 0 picks a free one); a bind error rejects. Without a
 * host, on every interface but for this machine only (thisMachineOnly); a host given explicitly
 * (IDP_HOST, DEMO_API_HOST: a container, a second machine) is the operator's choice.
 */
export function listen(server: Server, port: number, host: string | undefined, names: readonly string[] = []): Promise<number> {
  if (host === undefined) thisMachineOnly(server, new Set(names.map((name) => name.toLowerCase())));
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
