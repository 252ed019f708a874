// A relay in front of a Redis that can lose one answer on purpose: armed with a marker, it passes
// on the first client write containing that marker, swallows whatever Redis answers on that
// connection, and cuts it shortly after. Redis has executed the command; the client never hears
// so. A network fault no real part produces on demand (a connection dropped between a command and
// its reply, as when a master dies after its replica has the write), hence this stand-in.
import { freePort } from '../../e2e/support/stack.ts';
import { startTcpRelay } from './tcp-relay.ts';

export interface LossyRedisRelay {
  url: string;
  /** Loses the answer to the next client write that contains `marker`; resolves once the connection is cut. */
  loseAnswerTo(marker: string, cutAfterMs?: number): Promise<void>;
  close(): Promise<void>;
}

export async function startLossyRedisRelay(target: string): Promise<LossyRedisRelay> {
  const { hostname, port: targetPort } = new URL(target);
  let armed: { marker: string; cutAfterMs: number; cut: () => void } | undefined;
  const port = await freePort();
  const relay = await startTcpRelay(
    port,
    { host: hostname, port: Number(targetPort) },
    {
      fromClient(chunk, { client, upstream, state }) {
        if (armed && chunk.includes(armed.marker)) {
          const { cutAfterMs, cut } = armed;
          armed = undefined;
          state.swallowing = true;
          setTimeout(() => {
            client.destroy();
            upstream.destroy();
            cut();
          }, cutAfterMs);
        }
        return true;
      },
      fromUpstream: (_chunk, { state }) => state.swallowing !== true,
    },
  );
  return {
    url: `redis://127.0.0.1:${port}`,
    loseAnswerTo: (marker, cutAfterMs = 200) => new Promise((resolve) => (armed = { marker, cutAfterMs, cut: resolve })),
    close: relay.close,
  };
}
