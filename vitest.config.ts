import { defineConfig } from 'vitest/config';

const integration = { environment: 'node', testTimeout: 60_000, hookTimeout: 120_000, fileParallelism: false } as const;

/**
 * The suites that exercise the proxy, refresh, sessions and logout through a running server, run a
 * second time against `next start` (route handlers + middleware, what Vercel runs), so nothing can
 * hold on the `npm start` fast path only. Suites about `server.ts` itself, the stores or the dev
 * tools run once; login-hardening runs both shapes itself.
 */
const BOTH_SHAPES = ['proxy', 'proxy-limits', 'upstream-client', 'telemetry', 'refresh', 'refresh-guards', 'refresh-wait', 'sessions', 'session-lifetime', 'outages', 'resource-tokens', 'client-auth', 'logs', 'soak', 'par', 'step-up', 'token-exchange', 'dpop', 'stream-session'];

export default defineConfig({
  test: {
    projects: [
      { test: { name: 'unit', include: ['test/unit/**/*.test.{ts,tsx}'], environment: 'node' } },
      { test: { name: 'integration', include: ['test/integration/**/*.test.ts'], ...integration } },
      {
        test: {
          name: 'integration-next',
          include: BOTH_SHAPES.map((name) => `test/integration/${name}.test.ts`),
          env: { GATEHOUSE_TEST_SERVER: 'next' },
          ...integration,
        },
      },
    ],
  },
});
