import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { Socket } from 'node:net';
import path from 'node:path';
import { freePort } from '../e2e/support/stack.ts';

/**
 * `npm test`: type-check, lint, unit, production build, integration (real Redis, real IdP
 * processes) and end-to-end (real Chromium). Installs redis-server and chromium when missing (as
 * root on Debian) and starts a private Redis when none is reachable.
 */

const root = path.resolve(import.meta.dirname, '..');

function redisAnswers(url: URL): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = new Socket();
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1_000, () => done(false));
    socket.once('error', () => done(false));
    socket.connect(Number(url.port || 6379), url.hostname, () => socket.write('PING\r\n'));
    socket.once('data', (data) => done(data.toString().startsWith('+PONG')));
  });
}

async function ensureRedis(): Promise<{ url: string; server?: ChildProcess }> {
  const url = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
  if (await redisAnswers(new URL(url))) return { url };
  if (spawnSync('redis-server', ['--version']).status !== 0) {
    throw new Error(`No Redis answers at ${url} and redis-server is not installed (apt-get install redis-server).`);
  }
  const port = await freePort();
  const server = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  const privateUrl = `redis://127.0.0.1:${port}`;
  for (let attempt = 0; attempt < 50; attempt++) {
    if (await redisAnswers(new URL(privateUrl))) return { url: privateUrl, server };
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  server.kill();
  throw new Error('Started redis-server but it did not answer.');
}

function run(script: string, env: NodeJS.ProcessEnv): Promise<number> {
  console.log(`\n=== npm run ${script}\n`);
  return new Promise((resolve) => {
    const child = spawn('npm', ['run', '--silent', script], { cwd: root, env, stdio: 'inherit' });
    child.on('exit', (code, signal) => resolve(code ?? (signal ? 1 : 0)));
  });
}

/**
 * The suite needs Debian's redis-server and chromium (Playwright cannot download browsers here),
 * nginx (the balancer of the load test) and openssl (the TLS Redis test's certificates).
 * As root on Debian, missing ones are installed, so the README's test command works by itself on a
 * fresh machine; anyone else is told exactly what to install.
 */
function ensureSystemPackages(): void {
  const chromium = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
  const missing = [
    ...(spawnSync('redis-server', ['--version']).status === 0 ? [] : ['redis-server']),
    ...(existsSync(chromium) ? [] : ['chromium']),
    ...(existsSync('/usr/sbin/nginx') ? [] : ['nginx']),
    ...(spawnSync('openssl', ['version']).status === 0 ? [] : ['openssl']),
  ];
  if (missing.length === 0) return;
  const canInstall = process.getuid?.() === 0 && spawnSync('apt-get', ['--version']).status === 0 && !process.env.CHROMIUM_PATH;
  if (!canInstall) {
    console.error(`Missing: ${missing.join(', ')}. Install with: apt-get install ${missing.join(' ')} (or set CHROMIUM_PATH to a Chromium).`);
    process.exit(1);
  }
  console.log(`\n=== installing ${missing.join(', ')} (apt-get)\n`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  for (const args of [['update', '-qq'], ['install', '-y', '-qq', '--no-install-recommends', ...missing, 'fonts-dejavu-core']]) {
    if (spawnSync('apt-get', args, { stdio: 'inherit', env }).status !== 0) {
      console.error(`apt-get ${args[0]} failed: install ${missing.join(' ')} by hand.`);
      process.exit(1);
    }
  }
}

ensureSystemPackages();

const redis = await ensureRedis();
const env = { ...process.env, REDIS_URL: redis.url };
const steps = ['typecheck', 'lint', 'test:unit', 'build', 'test:integration', 'test:e2e', 'test:e2e:next'];
let failed: string | undefined;
for (const step of steps) {
  if ((await run(step, env)) !== 0) {
    failed = step;
    break;
  }
}
redis.server?.kill();
if (failed) {
  console.error(`\nnpm test: "${failed}" failed.`);
  process.exit(1);
}
console.log(`\nnpm test: all ${steps.length} steps passed (${steps.join(', ')}).`);
