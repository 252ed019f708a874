/**
 * Runs once when a Next server starts (not during `next build`): a misconfigured deployment stops
 * here with a message naming every bad variable, instead of failing on its first request.
 */
export async function register(): Promise<void> {
  if (process.env.NEXT_RUNTIME === 'nodejs') {
    const { exitOnInvalidConfig } = await import('./lib/config.ts');
    exitOnInvalidConfig();
  }
}
