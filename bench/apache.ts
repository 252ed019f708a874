// Renders bench/apache/httpd.conf.template into a temporary directory and runs Apache in the
// foreground (not as a daemon), so stopping the child stops every Apache process.
import { spawn } from 'node:child_process';
import http from 'node:http';
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { sleep } from './lib.ts';

export interface ApacheOptions {
  port: number;
  issuer: string;
  clientId: string;
  clientSecret: string;
  upstreamPort: number;
  redis: string;
  refreshSkewSec: number;
}

export interface RunningApache {
  url: string;
  pid: number;
  dir: string;
  errorLog(): string;
  stop(): Promise<void>;
}

export async function startApache(options: ApacheOptions): Promise<RunningApache> {
  const dir = mkdtempSync(path.join(tmpdir(), 'gatehouse-bench-apache-'));
  // Children drop to www-data when started as root and still need the run directory.
  chmodSync(dir, 0o755);
  const root = process.getuid?.() === 0;
  const values: Record<string, string> = {
    RUN_DIR: dir,
    PORT: String(options.port),
    USER: root ? 'www-data' : `#${process.getuid?.() ?? 0}`,
    GROUP: root ? 'www-data' : `#${process.getgid?.() ?? 0}`,
    ISSUER: options.issuer,
    CLIENT_ID: options.clientId,
    CLIENT_SECRET: options.clientSecret,
    PASSPHRASE: randomBytes(24).toString('base64url'),
    REDIS_HOST_PORT: options.redis,
    UPSTREAM_PORT: String(options.upstreamPort),
    REFRESH_SKEW: String(options.refreshSkewSec),
  };
  const template = readFileSync(path.join(import.meta.dirname, 'apache', 'httpd.conf.template'), 'utf8');
  const conf = template.replace(/\{\{([A-Z_]+)\}\}/g, (_, key: string) => {
    const value = values[key];
    if (value === undefined) throw new Error(`httpd.conf.template: no value for {{${key}}}`);
    return value;
  });
  const confPath = path.join(dir, 'httpd.conf');
  writeFileSync(confPath, conf);
  const errorLog = () => {
    try {
      return readFileSync(path.join(dir, 'error.log'), 'utf8');
    } catch {
      return '';
    }
  };

  let output = '';
  const child = spawn('apache2', ['-f', confPath, '-DFOREGROUND'], { stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout.on('data', (chunk: Buffer) => (output += chunk));
  child.stderr.on('data', (chunk: Buffer) => (output += chunk));
  const url = `http://localhost:${options.port}`;
  const stop = () =>
    new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) return resolve();
      const killer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      child.once('exit', () => {
        clearTimeout(killer);
        rmSync(dir, { recursive: true, force: true });
        resolve();
      });
      // SIGTERM stops an Apache running in the foreground at once, children included.
      child.kill('SIGTERM');
    });

  const deadline = Date.now() + 20_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`apache2 exited (${child.exitCode}):\n${output}\n${errorLog()}`);
    try {
      // The protected location sends an unauthenticated browser to the IdP: Apache is up and
      // mod_auth_openidc has read the provider metadata.
      const res = await probe(options.port);
      if (res.status === 302 && res.location?.startsWith(options.issuer)) break;
      if (Date.now() > deadline) throw new Error(`apache2 answered ${res.status} instead of a redirect to the IdP\n${errorLog()}`);
    } catch (error) {
      if (Date.now() > deadline) {
        await stop();
        throw new Error(`apache2 did not come up: ${String(error)}\n${output}\n${errorLog()}`, { cause: error });
      }
    }
    await sleep(200);
  }
  return { url, pid: child.pid as number, dir, errorLog, stop };
}

/** A top-level navigation as a browser sends it (plain node:http: fetch adds Sec-Fetch-Mode: cors). */
function probe(port: number): Promise<{ status: number; location: string | undefined }> {
  return new Promise((resolve, reject) => {
    const request = http.get({ host: '127.0.0.1', port, path: '/api/proxy/bench/whoami', headers: { accept: 'text/html', host: `localhost:${port}` } }, (res) => {
      res.resume();
      resolve({ status: res.statusCode ?? 0, location: res.headers.location });
    });
    request.on('error', reject);
    request.setTimeout(2_000, () => request.destroy(new Error('timeout')));
  });
}
