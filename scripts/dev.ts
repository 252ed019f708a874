import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { startDemoApi } from './demo-api.ts';
import { DEV_IDP_DEFAULTS, startDevIdp } from './dev-idp.ts';

/**
 * `npm run dev`: the zero-config demo. An embedded development IdP, the demo API and the app in
 * development mode with the in-memory store. Any variable already set in the environment wins,
 * so the same command can run against a real IdP or Redis.
 */

if (process.env.NODE_ENV === 'production') {
  console.error('npm run dev is for development only (NODE_ENV=production is set).');
  process.exit(1);
}

const root = path.resolve(import.meta.dirname, '..');
const appPort = Number(process.env.PORT || 3000);
const appBaseUrl = process.env.APP_BASE_URL || `http://localhost:${appPort}`;
// Empty variables count as unset, as they do for Gatehouse itself.
const usesOwnIdp = !process.env.OIDC_ISSUER;

const demoApiPort = Number(process.env.DEMO_API_PORT || 4001);
// The IdP mints access tokens whose audience is the demo API's own URL, which the API checks.
const apiAudiences = [`http://localhost:${demoApiPort}`];
const idp = usesOwnIdp ? await startDevIdp({ port: Number(process.env.IDP_PORT || DEV_IDP_DEFAULTS.port), appBaseUrl, apiAudiences }) : undefined;
const issuer = process.env.OIDC_ISSUER || (idp as { issuer: string }).issuer;
const demoApi = process.env.BFF_APIS ? undefined : await startDemoApi({ port: demoApiPort, issuer });

const env: NodeJS.ProcessEnv = {
  ...process.env,
  APP_BASE_URL: appBaseUrl,
  OIDC_ISSUER: issuer,
  OIDC_CLIENT_ID: process.env.OIDC_CLIENT_ID || DEV_IDP_DEFAULTS.clientId,
  OIDC_CLIENT_SECRET: process.env.OIDC_CLIENT_SECRET || DEV_IDP_DEFAULTS.clientSecret,
  OIDC_SCOPES: process.env.OIDC_SCOPES || 'openid profile email offline_access api:read api:write',
  // A fresh secret per run: the in-memory sessions do not survive a restart anyway.
  SESSION_SECRET: process.env.SESSION_SECRET || randomBytes(32).toString('base64url'),
  BFF_APIS:
    process.env.BFF_APIS ||
    JSON.stringify({ demo: { url: demoApi?.url }, public: { url: `${demoApi?.url}/public`, auth: 'user-optional' } }),
};

console.log(`\n  Gatehouse demo: ${appBaseUrl}\n  dev IdP:        ${issuer} (sign in with any name)\n  demo API:       ${demoApi?.url ?? '(from BFF_APIS)'}\n`);

const next = spawn(process.execPath, [path.join(root, 'node_modules/next/dist/bin/next'), 'dev', '-p', String(appPort)], { cwd: root, env, stdio: 'inherit' });

const shutdown = async (code: number) => {
  next.kill('SIGTERM');
  await Promise.allSettled([idp?.close(), demoApi?.close()]);
  process.exit(code);
};
next.on('exit', (code) => void shutdown(code ?? 0));
process.on('SIGINT', () => void shutdown(0));
process.on('SIGTERM', () => void shutdown(0));
