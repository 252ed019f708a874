import nextEnv from '@next/env';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { startDemoApi } from './demo-api.ts';
import { startDevFront } from './dev-front.ts';
import { DEV_IDP_DEFAULTS, parFromEnv, startDevIdp } from './dev-idp.ts';

/**
 * `npm run dev`: the zero-config demo. An embedded development IdP, the demo API and the app in
 * development mode with the in-memory store. Any variable already set — in the environment or in
 * the .env files Next reads (.env.development.local, .env.local, .env.development, .env) — wins, so
 * the same command runs against a real IdP (set OIDC_ISSUER, OIDC_CLIENT_ID, OIDC_CLIENT_SECRET)
 * or Redis (REDIS_URL).
 */

if (process.env.NODE_ENV === 'production') {
  console.error('npm run dev is for development only (NODE_ENV=production is set).');
  process.exit(1);
}

const root = path.resolve(import.meta.dirname, '..');
const NEXT_EXIT_WAIT_MS = 10_000;

// Stopping is set up before anything starts: a signal that arrived while next dev was being
// spawned, with no handler yet, killed this process and left next dev running on its own (seen in
// CI: the orphan kept Next's per-folder lock, and the next `npm run dev` printed "Ready" and exited).
const closers: Array<() => Promise<void> | undefined> = [];
let next: ChildProcess | undefined;
let stopping = false;

/** Signals next dev's whole process group; false once nothing in it is left. */
function signalNextGroup(signal: NodeJS.Signals | 0): boolean {
  if (next?.pid === undefined) return false;
  try {
    process.kill(-next.pid, signal);
    return true;
  } catch {
    return false;
  }
}

async function shutdown(code: number): Promise<void> {
  if (stopping) return;
  stopping = true;
  // Wait for every process of next dev to be gone, even one it forked while being stopped: one
  // left behind holds the folder's lock and makes the next `npm run dev` refuse to start.
  signalNextGroup('SIGTERM');
  const deadline = Date.now() + NEXT_EXIT_WAIT_MS;
  while (signalNextGroup(0) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
  signalNextGroup('SIGKILL');
  await Promise.allSettled(closers.map((close) => close()));
  process.exit(code);
}
process.on('SIGINT', () => void shutdown(0));
process.on('SIGTERM', () => void shutdown(0));
// Read before deciding anything: an OIDC_ISSUER in .env.local means "use my IdP", not the dev one.
const { loadedEnvFiles } = nextEnv.loadEnvConfig(root, true, { info: () => undefined, error: console.error });

/** A busy port ends the command with the variable that moves it, not a stack trace. */
async function orExplain<T>(what: string, variable: string, port: number, start: () => Promise<T>): Promise<T> {
  try {
    return await start();
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EADDRINUSE') {
      console.error(`npm run dev: port ${port} for the ${what} is in use. Stop what holds it, or set ${variable} to another port.`);
      process.exit(1);
    }
    throw error;
  }
}
const appPort = Number(process.env.PORT || 3000);
const appBaseUrl = process.env.APP_BASE_URL || `http://localhost:${appPort}`;
// Empty variables count as unset, as they do for Gatehouse itself.
const usesDevIdp = !process.env.OIDC_ISSUER;

const demoApiPort = Number(process.env.DEMO_API_PORT || 4001);
// The IdP mints access tokens whose audience is the demo API's own URL, which the API checks.
const apiAudiences = [`http://localhost:${demoApiPort}`];
const idpPort = Number(process.env.IDP_PORT || DEV_IDP_DEFAULTS.port);
// 127.0.0.1 while the app is on localhost: the IdP is on another site, as it is in production, so
// the SameSite=Strict cookie behaves in the demo as it will for users.
const devIdpHost = '127.0.0.1';
let idpPar: ReturnType<typeof parFromEnv>;
try {
  // IDP_PAR=required: a dev IdP that takes only pushed authorization requests, as some production IdPs do.
  idpPar = parFromEnv();
} catch (error) {
  console.error(`npm run dev: ${(error as Error).message}`);
  process.exit(1);
}
const idp = usesDevIdp
  ? await orExplain('development IdP', 'IDP_PORT', idpPort, () => startDevIdp({ port: idpPort, issuerHost: devIdpHost, appBaseUrl, apiAudiences, par: idpPar }))
  : undefined;
if (idp) closers.push(() => idp.close());
const issuer = process.env.OIDC_ISSUER || (idp as { issuer: string }).issuer;
const demoApi = process.env.BFF_APIS ? undefined : await orExplain('demo API', 'DEMO_API_PORT', demoApiPort, () => startDemoApi({ port: demoApiPort, issuer }));
if (demoApi) closers.push(() => demoApi.close());

// OIDC_DPOP=true: the demo API checks DPoP proofs, so its entries ask for them (zod's stringbool spellings of true).
const dpop = /^(true|1|yes|on|y|enabled)$/i.test(process.env.OIDC_DPOP?.trim() ?? '') ? { dpop: true } : {};
const env: NodeJS.ProcessEnv = {
  ...process.env,
  APP_BASE_URL: appBaseUrl,
  OIDC_ISSUER: issuer,
  // The dev IdP's client, only with the dev IdP: against your own, a missing one is named at start.
  ...(usesDevIdp ? { OIDC_CLIENT_ID: process.env.OIDC_CLIENT_ID || DEV_IDP_DEFAULTS.clientId, OIDC_CLIENT_SECRET: process.env.OIDC_CLIENT_SECRET || DEV_IDP_DEFAULTS.clientSecret } : {}),
  OIDC_SCOPES: process.env.OIDC_SCOPES || 'openid profile email offline_access api:read api:write',
  // A fresh secret per run: the in-memory sessions do not survive a restart anyway.
  SESSION_SECRET: process.env.SESSION_SECRET || randomBytes(32).toString('base64url'),
  BFF_APIS:
    process.env.BFF_APIS ||
    JSON.stringify({ demo: { url: demoApi?.url, ...dpop }, public: { url: `${demoApi?.url}/public`, auth: 'user-optional', ...dpop } }),
};

const idpLine = usesDevIdp
  ? `${issuer} — the embedded development IdP (sign in with any name); set OIDC_ISSUER to use your own`
  : `${issuer} — your own (OIDC_ISSUER${loadedEnvFiles.length ? ` from the environment or ${loadedEnvFiles.map((file) => file.path).join(', ')}` : ''})`;
console.log(`\n  Gatehouse demo: ${appBaseUrl}\n  IdP:            ${idpLine}\n  APIs:           ${demoApi ? `${demoApi.url} (the demo API)` : 'from BFF_APIS'}\n  sessions:       ${process.env.REDIS_URL ? 'Redis (REDIS_URL)' : 'in memory (gone on restart)'}\n`);

// SPA_DEV_URL: the SPA's own dev server and Gatehouse on one origin (appPort); next dev moves inside.
const spaDevUrl = process.env.SPA_DEV_URL ? new URL(process.env.SPA_DEV_URL) : undefined;
const nextPort = spaDevUrl ? Number(process.env.NEXT_DEV_PORT || appPort + 1) : appPort;
const front = spaDevUrl ? await orExplain('front server', 'PORT', appPort, () => startDevFront(appPort, new URL(`http://127.0.0.1:${nextPort}`), spaDevUrl, new URL(appBaseUrl).hostname)) : undefined;
if (front) closers.push(() => front.close());
if (spaDevUrl) console.log(`  SPA:            ${spaDevUrl.origin} (its dev server, hot reload included), on ${appBaseUrl}; next dev on :${nextPort}\n`);

// Its own process group, so that stopping reaches every process next dev starts. No stdin: a
// background group reading the terminal would be stopped by it; Ctrl-C reaches us, and we stop the group.
if (!stopping) {
  next = spawn(process.execPath, [path.join(root, 'node_modules/next/dist/bin/next'), 'dev', '-p', String(nextPort)], { cwd: root, env, stdio: ['ignore', 'inherit', 'inherit'], detached: true });
  next.on('exit', (code) => void shutdown(code ?? 0));
}
