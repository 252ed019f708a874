// OpenTelemetry under `next start` (lib/telemetry-sdk.ts `withoutSecrets`): Next's own request spans
// record the request path (`http.target`); README promises no session handle in any span, so
// `DELETE /api/auth/sessions/<handle>` must export none (found by an attacker's review).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import { login, waitFor } from '../support/http-client.ts';
import { startOtlpCollector, type OtlpCollector } from '../support/otlp-collector.ts';


let stack: Stack;
let app: string;
let collector: OtlpCollector;

beforeAll(async () => {
  collector = await startOtlpCollector();
  stack = await startStack({
    server: 'next',
    workers: 1,
    apis: ({ apiUrl }) => ({ demo: { url: apiUrl } }),
    env: { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: `${collector.url}/v1/traces`, OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json', OTEL_BSP_SCHEDULE_DELAY: '100', OTEL_METRICS_EXPORTER: 'none' },
  });
  app = stack.apps[0]!.url;
});

afterAll(async () => {
  await stack?.stop();
  collector?.close();
});

describe('telemetry under next start', () => {
  it('ending another of one’s sessions (DELETE /api/auth/sessions/<handle>) exports no session handle in any span', async () => {
    const laptop = await login(app, 'otel-handle-user');
    const phone = await login(app, 'otel-handle-user');
    const listed = await fetch(`${app}/api/auth/sessions`, { headers: { cookie: laptop, 'x-csrf': '1' } });
    const { sessions } = (await listed.json()) as { sessions: Array<{ handle: string; current: boolean }> };
    const other = sessions.find((session) => !session.current)?.handle;
    if (!other) throw new Error('no second session listed');
    const ended = await fetch(`${app}/api/auth/sessions/${other}`, { method: 'DELETE', headers: { cookie: laptop, 'x-csrf': '1' } });
    expect(ended.status).toBe(200);
    expect((await fetch(`${app}/api/auth/session`, { headers: { cookie: phone, 'x-csrf': '1' } }).then((res) => res.json())) as object).toMatchObject({ authenticated: false });
    // Every span of that request has been exported once one names the sessions route.
    const exported = await waitFor('the DELETE request’s spans to be exported', () => {
      const text = collector.bodies.filter((body) => body.path === '/v1/traces').map((body) => body.text).join('\n');
      return text.includes('/api/auth/sessions/') ? text : undefined;
    }, 15_000);
    expect(exported.includes(other), `the handle ${other} appears in the exported spans`).toBe(false);
  }, 60_000);
});
