import { defineConfig } from '@playwright/test';

// End-to-end tests against the real processes: the dev IdP, the demo API and a production build of
// Gatehouse (`npm start`, two cluster workers), all started once by e2e/global-setup.ts on free ports.
// Build first: `npm run build` (or `NEXT_DIST_DIR=.next-e2e npm run build` and the same variable here).
//
// The config is evaluated before global setup runs, so the app's URL is not known yet: tests read
// process.env.GATEHOUSE_URL (set by global setup, inherited by the test workers) at run time.

const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export default defineConfig({
  testDir: 'e2e',
  testMatch: '*.spec.ts',
  // `npm run dev` (the example on its Vite dev server) is neither server shape: it runs once, in
  // the `npm start` pass; E2E_SERVER=next runs every other spec against `next start`.
  testIgnore: process.env.E2E_SERVER === 'next' ? ['example-vite-react-dev.spec.ts'] : [],
  globalSetup: './e2e/global-setup.ts',
  // One stack, shared state (Redis prefix, IdP sessions, the demo API's last request): run serially.
  workers: 1,
  fullyParallel: false,
  forbidOnly: Boolean(process.env.CI),
  retries: 0,
  reporter: 'list',
  timeout: 30_000,
  // The example's spec builds the example (and, under next start, a Next build with SPA_DIR).
  globalTimeout: 10 * 60_000,
  expect: { timeout: 10_000 },
  outputDir: 'test-results',
  use: {
    browserName: 'chromium',
    headless: true,
    viewport: { width: 1200, height: 800 },
    actionTimeout: 10_000,
    navigationTimeout: 15_000,
    trace: 'retain-on-failure',
    launchOptions: {
      executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
      args: CHROMIUM_ARGS,
    },
  },
});
