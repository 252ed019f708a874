// A TCP relay for faults no real part produces on demand (connections reset at random, an answer
// lost between a command and its reply): every byte passes unless a hook says otherwise.
import { connect, createServer, type Socket } from 'node:net';

export interface RelayedConnection {
  client: Socket;
  upstream: Socket;
  /** Whatever the hooks want to remember about this connection. */
  state: Record<string, unknown>;
}

export interface RelayHooks {
  /** Each chunk from the client, before it is passed on; false keeps it back. */
  fromClient?(chunk: Buffer, connection: RelayedConnection): boolean;
  /** Each chunk from the upstream, before it is passed on; false keeps it back. */
  fromUpstream?(chunk: Buffer, connection: RelayedConnection): boolean;
}

export async function startTcpRelay(port: number, target: { host: string; port: number }, hooks: RelayHooks = {}): Promise<{ close(): Promise<void> }> {
  const open = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = connect(target.port, target.host);
    const connection: RelayedConnection = { client, upstream, state: {} };
    open.add(client).add(upstream);
    client.on('data', (chunk: Buffer) => {
      if (hooks.fromClient?.(chunk, connection) ?? true) upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => {
      if (hooks.fromUpstream?.(chunk, connection) ?? true) client.write(chunk);
    });
    const close = () => {
      client.destroy();
      upstream.destroy();
      open.delete(client);
      open.delete(upstream);
    };
    client.on('error', close).on('close', close);
    upstream.on('error', close).on('close', close);
  });
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  return {
    close: () =>
      new Promise((resolve) => {
        server.close(() => resolve());
        for (const socket of open) socket.destroy();
      }),
  };
}
