import type { FullConfig } from '@playwright/test';
import { startStack } from './support/stack.ts';

/**
 * Starts one stack for the whole run and hands its addresses to the tests through the environment
 * (test workers inherit process.env from here). The returned function is the global teardown.
 */
export default async function globalSetup(_config: FullConfig): Promise<() => Promise<void>> {
  // E2E_SERVER=next runs the same tests against `next start` (route handlers + middleware only).
  const stack = await startStack({ workers: 2, server: process.env.E2E_SERVER === 'next' ? 'next' : 'fast' });
  const app = stack.apps[0];
  if (!app) throw new Error('startStack returned no app');
  process.env.GATEHOUSE_URL = app.url;
  process.env.IDP_URL = stack.issuer;
  process.env.DEMO_API_URL = stack.apiUrl;
  process.env.GATEHOUSE_KEY_PREFIX = stack.keyPrefix;
  process.env.GATEHOUSE_CLIENT_ID = stack.clientId;
  // Lets a test read the encrypted tokens of a session in Redis (to ask the IdP whether logout revoked them).
  process.env.GATEHOUSE_SESSION_SECRET = stack.appEnv.SESSION_SECRET ?? '';
  process.env.GATEHOUSE_REDIS_URL = stack.appEnv.REDIS_URL ?? 'redis://127.0.0.1:6379';
  return async () => {
    // STACK_LOG_LEVEL=info shows what the servers logged, for diagnosing a failed run.
    if (process.env.STACK_LOG_LEVEL) for (const each of stack.apps) process.stdout.write(each.process.output());
    await stack.stop();
  };
}
