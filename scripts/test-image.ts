import { spawn, spawnSync, type SpawnSyncOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, cpSync, existsSync, mkdtempSync, readFileSync, realpathSync, rmSync, symlinkSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { loginThroughRp } from '../e2e/support/headless-login.ts';
import { CLIENT_ID, CLIENT_SECRET, ROOT, freePort, startProcess, type RunningProcess } from '../e2e/support/stack.ts';

/**
 * `npm run test:image`: builds the production container image (Dockerfile) with podman and checks
 * it from outside — health, a non-root process, a real login through the dev IdP and a proxied
 * call. Official base images cannot be pulled here, so the base is built from Debian packages
 * (debootstrap) plus the Node 24 this project already installs from npm; the Dockerfile takes it
 * as BASE_IMAGE. Not part of `npm test`: it needs root and takes minutes.
 */

const BASE_IMAGE = 'localhost/gatehouse-base:node24';
const IMAGE = 'localhost/gatehouse:test';
const CONTAINER = `gatehouse-test-${randomBytes(3).toString('hex')}`;

function run(command: string, args: string[], options: SpawnSyncOptions = {}): string {
  const result = spawnSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], ...options });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed (exit ${result.status})`);
  return String(result.stdout ?? '');
}

function step(message: string): void {
  console.log(`\n=== ${message}`);
}

function ensureTools(): void {
  const missing = ['podman', 'debootstrap'].filter((tool) => spawnSync(tool, ['--version']).status !== 0);
  if (!missing.length) return;
  if (process.getuid?.() !== 0) throw new Error(`Install ${missing.join(' and ')} (apt-get install ${missing.join(' ')}) and run again.`);
  step(`installing ${missing.join(', ')}`);
  run('apt-get', ['update', '-qq'], { stdio: 'inherit' });
  run('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...missing, 'uidmap', 'fuse-overlayfs'], { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
}

/** The Debian mirror this machine's apt uses, so debootstrap fetches from where apt may. */
function debianMirror(): string {
  const sources = '/etc/apt/sources.list.d/debian.sources';
  const text = existsSync(sources) ? readFileSync(sources, 'utf8') : existsSync('/etc/apt/sources.list') ? readFileSync('/etc/apt/sources.list', 'utf8') : '';
  return /URIs:\s*(\S+\/debian)\s*$/m.exec(text)?.[1] ?? /^deb\s+(\S+\/debian)\s/m.exec(text)?.[1] ?? 'http://deb.debian.org/debian';
}

/** A stand-in for node:24-bookworm-slim: Debian bookworm, Node 24 (from the npm package) and npm. */
function ensureBaseImage(): void {
  if (spawnSync('podman', ['image', 'exists', BASE_IMAGE]).status === 0) return;
  step(`building the base image ${BASE_IMAGE} from Debian packages`);
  const work = mkdtempSync(path.join(tmpdir(), 'gatehouse-base-'));
  const rootfs = path.join(work, 'rootfs');
  try {
    run('debootstrap', ['--variant=minbase', '--include=ca-certificates', 'bookworm', rootfs, debianMirror()], { stdio: 'inherit' });
    cpSync(realpathSync(path.join(ROOT, 'node_modules', '.bin', 'node')), path.join(rootfs, 'usr/local/bin/node'));
    const npmDir = path.join(run('npm', ['root', '-g']).trim(), 'npm');
    mkdirSync(path.join(rootfs, 'usr/local/lib/node_modules'), { recursive: true });
    cpSync(npmDir, path.join(rootfs, 'usr/local/lib/node_modules/npm'), { recursive: true });
    symlinkSync('../lib/node_modules/npm/bin/npm-cli.js', path.join(rootfs, 'usr/local/bin/npm'));
    symlinkSync('../lib/node_modules/npm/bin/npx-cli.js', path.join(rootfs, 'usr/local/bin/npx'));
    // The image should trust what this machine trusts (its registry may sit behind a TLS proxy with
    // a CA of its own), as an official base would trust the public CAs.
    const hostBundle = '/etc/ssl/certs/ca-certificates.crt';
    if (existsSync(hostBundle)) cpSync(hostBundle, path.join(rootfs, hostBundle));
    rmSync(path.join(rootfs, 'var/cache/apt/archives'), { recursive: true, force: true });
    const tar = spawnSync('tar', ['-C', rootfs, '-c', '.'], { maxBuffer: 2 ** 31 });
    if (tar.status !== 0) throw new Error('tar of the base root filesystem failed');
    const imported = spawnSync('podman', ['import', '--change', 'CMD ["node"]', '--change', 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt', '-', BASE_IMAGE], { input: tar.stdout, stdio: ['pipe', 'inherit', 'inherit'], maxBuffer: 2 ** 31 });
    if (imported.status !== 0) throw new Error('podman import failed');
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

const HEALTH_POLL_MS = 250;

/** Polls /api/health until it answers 200 (the container's start takes seconds), bounded by `timeoutMs`. */
async function waitForHealth(url: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = 'no answer';
  while (Date.now() < deadline) {
    try {
      const res = await fetch(`${url}/api/health`);
      if (res.ok) return;
      last = `${res.status} ${await res.text()}`;
    } catch (error) {
      last = error instanceof Error ? error.message : String(error);
    }
    await new Promise((resolve) => setTimeout(resolve, HEALTH_POLL_MS));
  }
  throw new Error(`the container did not become healthy within ${timeoutMs} ms (last: ${last})`);
}

interface RunningImage {
  exec(args: string[]): string;
  stop(): void;
}

/** The container, or — where this machine cannot run containers — the image's own files, user, environment and command in a chroot. */
function startImage(env: Record<string, string>): RunningImage {
  const flags = Object.entries(env).flatMap(([name, value]) => ['-e', `${name}=${value}`]);
  const started = spawnSync('podman', ['run', '-d', '--rm', '--network', 'host', '--name', CONTAINER, ...flags, IMAGE], { encoding: 'utf8' });
  if (started.status === 0) {
    return {
      exec: (args) => run('podman', ['exec', CONTAINER, ...args]),
      stop: () => void spawnSync('podman', ['stop', '--time', '10', CONTAINER], { stdio: 'ignore' }),
    };
  }
  // Secrets are in `flags`: report podman's own words only.
  console.log(`podman cannot run containers here (${started.stderr.trim().split('\n').at(-1)}); running the image's filesystem, user, environment and command in a chroot instead.`);
  return startInChroot(env);
}

function startInChroot(env: Record<string, string>): RunningImage {
  const config = JSON.parse(run('podman', ['image', 'inspect', IMAGE, '--format', '{{json .Config}}'])) as { User?: string; Env?: string[]; WorkingDir?: string; Cmd?: string[] };
  const rootfs = mkdtempSync(path.join(tmpdir(), 'gatehouse-image-'));
  // mkdtemp makes it 0700: as the chroot's `/`, the image's non-root user must be able to enter it.
  chmodSync(rootfs, 0o755);
  const created = run('podman', ['create', IMAGE]).trim();
  try {
    const exported = spawnSync('sh', ['-c', `podman export ${created} | tar -x -C ${rootfs}`], { stdio: 'inherit' });
    if (exported.status !== 0) throw new Error('podman export of the image failed');
  } finally {
    spawnSync('podman', ['rm', created], { stdio: 'ignore' });
  }
  // What podman would inject into a container on the host network.
  for (const file of ['/etc/hosts', '/etc/resolv.conf']) if (existsSync(file)) cpSync(file, path.join(rootfs, file));
  const user = config.User || 'root';
  const imageEnv = [...(config.Env ?? []), ...Object.entries(env).map(([name, value]) => `${name}=${value}`)];
  const inImage = (args: string[]) => ['--userspec', `${user}:${user}`, rootfs, '/usr/bin/env', '-i', ...imageEnv, 'sh', '-c', `cd ${config.WorkingDir || '/'} && exec "$@"`, 'sh', ...args];
  const child = spawn('chroot', inImage(config.Cmd ?? ['npm', 'start']), { stdio: ['ignore', 'inherit', 'inherit'], detached: true });
  return {
    exec: (args) => run('chroot', inImage(args)),
    stop: () => {
      // The whole process group: npm, the primary and its workers.
      if (child.pid) process.kill(-child.pid, 'SIGKILL');
      rmSync(rootfs, { recursive: true, force: true });
    },
  };
}

async function main(): Promise<void> {
  ensureTools();
  ensureBaseImage();
  step(`building ${IMAGE} from the Dockerfile`);
  // chroot isolation: RUN steps need no OCI runtime, so the build works where containers cannot run.
  // --format docker keeps the HEALTHCHECK, which the OCI image format has no field for.
  run('podman', ['build', '--isolation', 'chroot', '--format', 'docker', '--network', 'host', '--build-arg', `BASE_IMAGE=${BASE_IMAGE}`, '-t', IMAGE, ROOT], { stdio: 'inherit' });

  step('starting the dev IdP, the demo API and the container (host network, loopback only)');
  const [idpPort, apiPort, appPort] = await Promise.all([freePort(), freePort(), freePort()]);
  const appUrl = `http://localhost:${appPort}`;
  const issuer = `http://127.0.0.1:${idpPort}`;
  const apiUrl = `http://localhost:${apiPort}`;
  const helpers: RunningProcess[] = [];
  let stopImage: (() => void) | undefined;
  try {
    helpers.push(
      await startProcess('dev-idp', ['scripts/dev-idp.ts'], { NODE_ENV: 'development', IDP_PORT: String(idpPort), IDP_ISSUER_HOST: '127.0.0.1', IDP_CLIENT_ID: CLIENT_ID, IDP_CLIENT_SECRET: CLIENT_SECRET, IDP_APP_BASE_URLS: appUrl, IDP_API_AUDIENCES: apiUrl }, /dev IdP listening/),
      await startProcess('demo-api', ['scripts/demo-api.ts'], { NODE_ENV: 'development', DEMO_API_PORT: String(apiPort), DEMO_API_ISSUER: issuer, DEMO_API_AUDIENCE: apiUrl }, /demo API listening/),
    );
    const env = {
      APP_BASE_URL: appUrl,
      PORT: String(appPort),
      HOSTNAME: '127.0.0.1',
      OIDC_ISSUER: issuer,
      OIDC_CLIENT_ID: CLIENT_ID,
      OIDC_CLIENT_SECRET: CLIENT_SECRET,
      OIDC_SCOPES: 'openid profile email offline_access api:read api:write',
      SESSION_SECRET: randomBytes(32).toString('base64url'),
      REDIS_URL: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379',
      REDIS_KEY_PREFIX: `gh-image-${randomBytes(4).toString('hex')}:`,
      BFF_APIS: JSON.stringify({ demo: { url: apiUrl } }),
      GATEHOUSE_WORKERS: '2',
    };
    const running = startImage(env);
    stopImage = running.stop;
    await waitForHealth(appUrl, 60_000);

    step('checking the running image from outside');
    const uid = running.exec(['id', '-u']).trim();
    if (uid === '0' || uid === '') throw new Error(`the image runs as ${uid === '0' ? 'root' : 'an unknown user'}`);
    if (running.exec(['sh', '-c', 'test -e node_modules/vitest && echo present || echo absent']).trim() !== 'absent') {
      throw new Error('the image carries development dependencies (vitest)');
    }
    const healthcheck = run('podman', ['image', 'inspect', IMAGE, '--format', '{{json .Config.Healthcheck}}']);
    if (!healthcheck.includes('/api/health?probe=ready')) throw new Error(`the image has no HEALTHCHECK on /api/health?probe=ready: ${healthcheck}`);
    const { rpCookies } = await loginThroughRp({ startUrl: `${appUrl}/api/auth/login`, username: 'image-user' });
    const cookie = `gatehouse=${rpCookies.get('gatehouse') ?? ''}`;
    const session = await fetch(`${appUrl}/api/auth/session`, { headers: { cookie, 'x-csrf': '1' } });
    const described = (await session.json()) as { authenticated?: boolean; user?: { sub?: string } };
    if (!described.authenticated || described.user?.sub !== 'image-user') throw new Error(`no session after login: ${JSON.stringify(described)}`);
    const proxied = await fetch(`${appUrl}/api/proxy/demo/whoami`, { headers: { cookie, 'x-csrf': '1' } });
    const body = (await proxied.json()) as { sub?: string };
    if (proxied.status !== 200 || body.sub !== 'image-user') throw new Error(`proxied call answered ${proxied.status} ${JSON.stringify(body)}`);
    console.log(`\nimage OK: healthy, runs as uid ${uid} without development dependencies, login and a proxied call work (${appUrl}).`);
  } finally {
    stopImage?.();
    await Promise.all(helpers.map((helper) => helper.stop()));
  }
}

try {
  await main();
} catch (error) {
  console.error(`\ntest:image failed: ${error instanceof Error ? error.message : String(error)}`);
  process.exitCode = 1;
}
