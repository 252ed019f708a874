/**
 * Runs once when a Next server starts (not during `next build`): a misconfigured deployment stops
 * here with a message naming every bad variable, instead of failing on its first request.
 */
export async function register(): Promise<void> {
  if (process.env.NEXT_RUNTIME === 'nodejs') {
    const { exitOnInvalidConfig } = await import('./lib/config.ts');
    exitOnInvalidConfig();
    // OpenTelemetry, when configured (lib/telemetry-sdk.ts); npm start (server.ts) has wired it already.
    const { startTelemetry } = await import('./lib/telemetry-sdk.ts');
    await startTelemetry('serve').catch((error: unknown) => {
      process.stderr.write(`Gatehouse cannot start:\n  - ${error instanceof Error ? error.message : String(error)}\n`);
      process.exit(1);
    });
    // npm start (server.ts) checked the IdP before it started any worker. On Vercel every cold start
    // would pay for a discovery fetch: there the check runs at each login only, and only the key
    // (no network) is checked here.
    if (process.env.GATEHOUSE_START_CHECKED) return;
    const { getConfig } = await import('./lib/config.ts');
    const config = getConfig();
    const { spaBuildProblem } = await import('./lib/spa.ts');
    const spaProblem = spaBuildProblem(process.env.GATEHOUSE_BUILT_WITH_SPA === '1', config.spa, { servedBeforeNext: false });
    if (config.trustedProxyHops === 0 && Object.values(config.apis).some((api) => api.auth !== 'user')) {
      // A route handler is never told the socket's peer: without a trusted proxy's word, every
      // caller without a session has the same address, and one of them can hold that count.
      const { log } = await import('./lib/log.ts');
      log('warn', 'server.anonymous_calls_share_one_count', {
        message: 'TRUSTED_PROXY_HOPS=0 under next start: calls without a session (to none, client and user-optional APIs) cannot be told apart by address and share one PROXY_MAX_CALLS_PER_USER count; set TRUSTED_PROXY_HOPS to the number of proxies in front (1 on Vercel)',
      });
    }
    const { idpStartProblems, privateKeyProblem } = await import('./lib/oidc.ts');
    const problems = [spaProblem, ...(process.env.VERCEL ? [await privateKeyProblem()] : await idpStartProblems())].filter((problem) => problem !== undefined);
    if (problems.length) {
      process.stderr.write(`Gatehouse cannot start:\n${problems.map((problem) => `  - ${problem}`).join('\n')}\n`);
      process.exit(1);
    }
  }
}
