import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { once } from 'node:events';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loginThroughRp } from '../../e2e/support/headless-login.ts';
import { ROOT, startProcess, startStack, type Stack } from '../../e2e/support/stack.ts';
import { processTree, waitFor } from '../support/http-client.ts';
import { undecodablePath } from '../support/hostile-inputs.ts';
import { rawRequest } from '../support/raw-http.ts';

/**
 * SPA_DIR: a built SPA served on Gatehouse's own origin, on both server shapes. `next start` needs
 * SPA_DIR at build time (Next compiles rewrites into the build), so it gets a build of its own.
 */

// Inside the project, where a Vercel build needs it (its files must ship with the function).
mkdirSync(path.join(ROOT, '.test-tmp'), { recursive: true });
const spaDir = mkdtempSync(path.join(ROOT, '.test-tmp', 'spa-'));
const INDEX = '<!doctype html><html><head><title>My SPA</title><script type="module" src="/assets/app-Ab12Cd34.js"></script></head><body><div id="root"></div></body></html>';
const APP_JS = 'console.log("the SPA");';
const SPA_DIST_DIR = '.next-spa';

mkdirSync(path.join(spaDir, 'assets'));
writeFileSync(path.join(spaDir, 'index.html'), INDEX);
writeFileSync(path.join(spaDir, 'assets', 'app-Ab12Cd34.js'), APP_JS);
writeFileSync(path.join(spaDir, 'robots.txt'), 'User-agent: *\n');
// A name with a long word where a hash could be: edited in place on deploys, so never kept for good.
writeFileSync(path.join(spaDir, 'app-settings.json'), '{"api":"/api/proxy/demo"}');
// Only the static host below serves these, each with its own Cache-Control (see startSpaOrigin).
writeFileSync(path.join(spaDir, 'assets', 'chunk-Qw12Er34.js'), 'export const chunk = 1;');
writeFileSync(path.join(spaDir, 'short.txt'), 'fresh for a second');
writeFileSync(path.join(spaDir, 'private.txt'), 'for one browser only');
// Served by the host in French, varying by Accept-Language; and a script the host stores gzipped (as S3 does).
writeFileSync(path.join(spaDir, 'lang.txt'), 'bonjour');
const STORED_JS = 'export const stored = "kept compressed by the host";';
writeFileSync(path.join(spaDir, 'assets', 'stored-Gz12Gz34.js'), gzipSync(STORED_JS));
// What a build folder may hold besides the app: dotfiles, links out of it, a file with a script in it.
const SECURITY_TXT = 'Contact: mailto:security@example.com\n';
const outsideDir = mkdtempSync(path.join(ROOT, '.test-tmp', 'outside-'));
writeFileSync(path.join(outsideDir, 'secret.txt'), 'OUTSIDE SECRET');
writeFileSync(path.join(spaDir, '.env'), 'SECRET_KEY=env-secret');
mkdirSync(path.join(spaDir, '.git'));
writeFileSync(path.join(spaDir, '.git', 'config'), '[remote] SECRET');
mkdirSync(path.join(spaDir, '.well-known'));
writeFileSync(path.join(spaDir, '.well-known', 'security.txt'), SECURITY_TXT);
symlinkSync(path.join(outsideDir, 'secret.txt'), path.join(spaDir, 'assets', 'linked.txt'));
symlinkSync(outsideDir, path.join(spaDir, 'outside'));
symlinkSync('robots.txt', path.join(spaDir, 'alias.txt'));
// Links that stay inside SPA_DIR but lead to a dotfile: served, they would be the dotfile.
symlinkSync('.env', path.join(spaDir, 'settings.json'));
symlinkSync('../.git/config', path.join(spaDir, 'assets', 'config-Ab12Cd34.js'));
// A stable name for the current build of a script: its content changes at every deploy.
symlinkSync('assets/app-Ab12Cd34.js', path.join(spaDir, 'widget.js'));
writeFileSync(path.join(spaDir, 'assets', 'logo.svg'), '<svg xmlns="http://www.w3.org/2000/svg"><script>fetch("/api/proxy/demo/whoami")</script></svg>');
// Far more than the socket buffers between a browser that stops reading and the server hold.
const BIG_FILE = path.join(spaDir, 'big.bin');
const BIG_FILE_BYTES = 64 * 1024 * 1024;
writeFileSync(BIG_FILE, Buffer.alloc(BIG_FILE_BYTES));
const SEND_TIMEOUT_MS = 1_000;
/** A policy that keeps a file opened on its own from running script on the app's origin. */
const SANDBOXED = /^default-src 'none';.*(^|; )sandbox$/;

const stacks: Stack[] = [];
afterAll(async () => {
  await Promise.all(stacks.map((stack) => stack.stop()));
  rmSync(spaDir, { recursive: true, force: true });
  rmSync(outsideDir, { recursive: true, force: true });
});

describe.each(['fast', 'next'] as const)('SPA_DIR on %s', (shape) => {
  let app: string;
  let appEnv: Record<string, string>;
  let server: Stack['apps'][number]['process'];
  beforeAll(async () => {
    if (shape === 'next') {
      const build = spawnSync('npm', ['run', '--silent', 'build'], { cwd: ROOT, encoding: 'utf8', env: { ...process.env, SPA_DIR: spaDir, NEXT_DIST_DIR: SPA_DIST_DIR } });
      expect(build.status, `${build.stdout}${build.stderr}`).toBe(0);
    }
    const stack = await startStack({ server: shape, workers: 1, env: { SPA_DIR: spaDir, PROXY_SEND_TIMEOUT_MS: String(SEND_TIMEOUT_MS), ...(shape === 'next' ? { NEXT_DIST_DIR: SPA_DIST_DIR } : {}) } });
    stacks.push(stack);
    app = stack.apps[0]!.url;
    appEnv = stack.apps[0]!.env;
    server = stack.apps[0]!.process;
  }, 240_000);

  const get = (pathname: string, accept = 'text/html') => fetch(`${app}${pathname}`, { headers: { accept }, redirect: 'manual' });

  if (shape === 'next') {
    it('the build traces every SPA file into the SPA route (on Vercel the function holds only traced files)', () => {
      const trace = path.join(ROOT, SPA_DIST_DIR, 'server/app/api/spa/[[...path]]/route.js.nft.json');
      const traced = new Set((JSON.parse(readFileSync(trace, 'utf8')) as { files: string[] }).files.map((file) => path.resolve(path.dirname(trace), file)));
      for (const file of ['index.html', 'assets/app-Ab12Cd34.js', 'robots.txt']) expect(traced, file).toContain(path.join(spaDir, file));
    });

    it('a start whose SPA setting disagrees with the build stops, naming the variable: built with it and run without (either shape), or built without it and run with it under next start', async () => {
      const { SPA_DIR: _, ...withoutSpa } = appEnv;
      const refusal = (name: string, args: string[], env: Record<string, string>) =>
        startProcess(name, args, { ...env, PORT: '0' }, () => false, 60_000).then(
          () => 'started',
          (error: Error) => error.message,
        );
      const nextStart = ['node_modules/next/dist/bin/next', 'start', '-p', '0'];
      const cases = [
        ['spa-build-next-without-spa', nextStart, { ...withoutSpa, NEXT_DIST_DIR: SPA_DIST_DIR }, 'SPA_DIR: the build was made with SPA_DIR or SPA_UPSTREAM_URL'],
        ['spa-build-npm-start-without-spa', ['server.ts'], { ...withoutSpa, NEXT_DIST_DIR: SPA_DIST_DIR }, 'SPA_DIR: the build was made with SPA_DIR or SPA_UPSTREAM_URL'],
        ['plain-build-next-with-spa', nextStart, { ...appEnv, NEXT_DIST_DIR: process.env.NEXT_DIST_DIR ?? '.next' }, 'SPA_DIR: next start serves the SPA through a rewrite'],
      ] as const;
      for (const [name, args, env, expected] of cases) {
        const output = await refusal(name, [...args], env);
        expect(output, name).toContain('exited early (code 1');
        expect(output, name).toContain(expected);
        expect(output, name).not.toMatch(/\n\s+at /);
      }
    });
  }

  it('serves index.html for / and for any route of the SPA, never cached, with a Content-Security-Policy', async () => {
    for (const pathname of ['/', '/orders/42', '/deep/link?tab=2']) {
      const res = await get(pathname);
      expect(res.status, pathname).toBe(200);
      expect(res.headers.get('content-type'), pathname).toBe('text/html; charset=utf-8');
      expect(res.headers.get('cache-control'), pathname).toBe('no-cache');
      expect(res.headers.get('content-security-policy'), pathname).toContain("frame-ancestors 'none'");
      expect(res.headers.get('x-content-type-options'), pathname).toBe('nosniff');
      expect(await res.text(), pathname).toBe(INDEX);
    }
  });

  it('serves hashed assets for good, other files revalidated, each with its type; a missing file is a 404', async () => {
    const js = await get('/assets/app-Ab12Cd34.js', '*/*');
    expect(js.status).toBe(200);
    expect(js.headers.get('content-type')).toBe('text/javascript; charset=utf-8');
    expect(js.headers.get('cache-control')).toBe('public, max-age=31536000, immutable');
    expect(await js.text()).toBe(APP_JS);
    const robots = await get('/robots.txt', '*/*');
    expect(robots.headers.get('content-type')).toBe('text/plain; charset=utf-8');
    expect(robots.headers.get('cache-control')).toBe('no-cache');
    const widget = await get('/widget.js', '*/*');
    expect(await widget.text()).toBe(APP_JS);
    expect(widget.headers.get('cache-control')).toBe('no-cache');
    const settings = await get('/app-settings.json', '*/*');
    expect(settings.headers.get('content-type')).toBe('application/json; charset=utf-8');
    expect(settings.headers.get('cache-control')).toBe('no-cache');
    expect((await get('/assets/missing-Zz99Yy88.js', '*/*')).status).toBe(404);
  });

  it('every file and the page carry an ETag and Last-Modified, and the browser’s own revalidation is a 304 without the file', async () => {
    const changing = path.join(spaDir, 'changing.txt');
    writeFileSync(changing, 'version 1');
    for (const [pathname, accept] of [['/robots.txt', '*/*'], ['/orders/42', 'text/html'], ['/assets/app-Ab12Cd34.js', '*/*'], ['/changing.txt', '*/*']] as const) {
      const first = await get(pathname, accept);
      await first.arrayBuffer();
      const etag = first.headers.get('etag') ?? '';
      const lastModified = first.headers.get('last-modified') ?? '';
      expect(etag, pathname).toMatch(/^"[\w-]{22}"$/);
      expect(Date.parse(lastModified), pathname).not.toBeNaN();
      const validators: Array<Record<string, string>> = [{ 'if-none-match': etag }, { 'if-none-match': `"x", W/${etag}` }, { 'if-modified-since': lastModified }];
      for (const validator of validators) {
        const again = await fetch(`${app}${pathname}`, { headers: { accept, ...validator } });
        expect([again.status, await again.text(), again.headers.get('etag')], `${pathname} ${JSON.stringify(validator)}`).toEqual([304, '', etag]);
      }
      const other = await fetch(`${app}${pathname}`, { headers: { accept, 'if-none-match': '"another-version"' } });
      expect(other.status, pathname).toBe(200);
      await other.arrayBuffer();
      // Only the very date last sent: a later one is no proof the browser holds this version.
      const later = await fetch(`${app}${pathname}`, { headers: { accept, 'if-modified-since': new Date(Date.parse(lastModified) + 60_000).toUTCString() } });
      expect(later.status, pathname).toBe(200);
      await later.arrayBuffer();
    }
    try {
      // A deploy that rewrites a file changes its tag, even at the same size and time (reproducible builds set both).
      const first = await get('/changing.txt', '*/*');
      const before = first.headers.get('etag') ?? '';
      await first.arrayBuffer();
      const { mtime } = statSync(changing);
      writeFileSync(changing, 'version 2');
      utimesSync(changing, mtime, mtime);
      const after = await fetch(`${app}/changing.txt`, { headers: { accept: '*/*', 'if-none-match': before } });
      expect([after.status, await after.text(), after.headers.get('last-modified')]).toEqual([200, 'version 2', first.headers.get('last-modified')]);
    } finally {
      rmSync(changing, { force: true });
    }
  });

  it('a navigation to a path that looks like a file but names none is a route of the SPA (/users/jane.doe); the same path asked for by a page stays a 404', async () => {
    // Raw requests: fetch() adds a Sec-Fetch-Mode of its own, as browsers do, but never `navigate`.
    const port = Number(new URL(app).port);
    const ask = async (pathname: string, headers: string) => {
      const res = await rawRequest(port, `GET ${pathname} HTTP/1.1\r\nHost: localhost:${port}\r\n${headers}Connection: close\r\n\r\n`);
      return [res?.status, res?.body === INDEX];
    };
    for (const pathname of ['/users/jane.doe', '/release/1.2']) {
      expect(await ask(pathname, 'Accept: text/html,application/xhtml+xml\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Dest: document\r\n'), pathname).toEqual([200, true]);
      // A cache must not hand that page to a script asking for the same path.
      const page = await rawRequest(port, `GET ${pathname} HTTP/1.1\r\nHost: localhost:${port}\r\nAccept: text/html\r\nSec-Fetch-Mode: navigate\r\nConnection: close\r\n\r\n`);
      expect(page?.get('vary')?.split(/,\s*/), pathname).toEqual(expect.arrayContaining(['Sec-Fetch-Mode', 'Accept']));
      expect(await ask(pathname, 'Accept: */*\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Dest: script\r\n'), pathname).toEqual([404, false]);
      // What fetch() sends, even asking for HTML: no navigation.
      expect(await ask(pathname, 'Accept: text/html\r\nSec-Fetch-Mode: cors\r\n'), pathname).toEqual([404, false]);
    }
    // A browser without Fetch Metadata says what it wants by Accept.
    expect(await ask('/users/jane.doe', 'Accept: text/html\r\n')).toEqual([200, true]);
    expect(await ask('/users/jane.doe', 'Accept: */*\r\n')).toEqual([404, false]);
  });

  it('a path whose escapes do not decode is a readable 404 page, never the SPA or a bare 500', async () => {
    const port = Number(new URL(app).port);
    await fc.assert(
      fc.asyncProperty(undecodablePath.filter((rest) => !/^(api|_next)([/\\]|$)/.test(rest)), async (rest) => {
        const res = await rawRequest(port, `GET /${rest} HTTP/1.1\r\nHost: localhost:${port}\r\nAccept: text/html\r\nConnection: close\r\n\r\n`);
        expect(res?.status, rest).toBe(404);
        expect(res?.get('content-type'), rest).toMatch(/^text\/html/);
        expect(res?.body, rest).not.toContain('<title>My SPA</title>');
      }),
      { numRuns: 25 },
    );
  });

  it('never serves a file outside SPA_DIR, however the path is spelled', async () => {
    const port = Number(new URL(app).port);
    for (const target of ['/../../../../etc/passwd', '/%2e%2e/%2e%2e/%2e%2e/etc/passwd', '/..%2f..%2f..%2fetc%2fpasswd', '/assets/..%5c..%5cetc%5cpasswd', '/%252e%252e/etc/passwd']) {
      const res = await rawRequest(port, `GET ${target} HTTP/1.1\r\nHost: localhost:${port}\r\nAccept: text/html\r\nConnection: close\r\n\r\n`);
      expect(res?.body ?? '', target).not.toContain('root:');
    }
  });

  it('serves no dotfile and follows no link out of SPA_DIR; .well-known and links that stay inside are served', async () => {
    for (const pathname of ['/.env', '/.git/config', '/assets/linked.txt', '/outside/secret.txt', '/%2eenv', '/assets/%2e%2e/.env', '/settings.json', '/assets/config-Ab12Cd34.js']) {
      const res = await get(pathname, '*/*');
      const body = await res.text();
      expect(body, pathname).not.toContain('SECRET');
      // A path without an extension is a route of the SPA: index.html, never the file.
      expect(res.status === 404 || body === INDEX, pathname).toBe(true);
    }
    expect(await (await get('/.well-known/security.txt', '*/*')).text()).toBe(SECURITY_TXT);
    expect(await (await get('/alias.txt', '*/*')).text()).toBe('User-agent: *\n');
  });

  it('a file the browser stops taking is ended after PROXY_SEND_TIMEOUT_MS and let go (spa.send_timeout in the log), not held for as long as the connection stays', async () => {
    const holdsBigFile = () =>
      processTree(server.child.pid as number).some((pid) => {
        try {
          return readdirSync(`/proc/${pid}/fd`).some((fd) => readlinkSync(`/proc/${pid}/fd/${fd}`) === BIG_FILE);
        } catch {
          return false; // gone, or the descriptor closed while listed
        }
      });
    const port = Number(new URL(app).port);
    const socket = net.connect(port, '127.0.0.1');
    await once(socket, 'connect');
    let received = 0;
    // The browser stops reading the moment the answer begins.
    socket.on('data', (chunk: Buffer) => {
      received += chunk.length;
      socket.pause();
    });
    socket.on('error', () => undefined);
    try {
      socket.write(`GET /big.bin HTTP/1.1\r\nHost: localhost:${port}\r\nAccept: */*\r\n\r\n`);
      await waitFor('the answer to start', () => (received > 0 ? true : undefined), 5_000, 10);
      expect(holdsBigFile(), 'the file is open while its answer is under way').toBe(true);
      await waitFor('the server to let the file go', () => (holdsBigFile() ? undefined : true), 10 * SEND_TIMEOUT_MS, 100);
      expect(received).toBeLessThan(BIG_FILE_BYTES);
      await waitFor('spa.send_timeout in the log', () => (server.output().includes('"event":"spa.send_timeout"') ? true : undefined), 5_000, 100);
    } finally {
      socket.destroy();
    }
  });

  it('a file other than the page runs in a sandbox without scripts when opened by itself; scripts and the page keep theirs', async () => {
    const svg = await get('/assets/logo.svg', '*/*');
    expect(svg.headers.get('content-type')).toBe('image/svg+xml');
    expect(svg.headers.get('content-security-policy')).toMatch(SANDBOXED);
    expect(svg.headers.get('content-security-policy'), 'no other site may frame it').toContain("frame-ancestors 'none'");
    expect((await get('/robots.txt', '*/*')).headers.get('content-security-policy')).toMatch(SANDBOXED);
    // A worker takes its policy from its script's answer: a script's answer carries none.
    expect((await get('/assets/app-Ab12Cd34.js', '*/*')).headers.get('content-security-policy')).toBeNull();
    expect((await get('/')).headers.get('content-security-policy')).toContain("script-src 'self'");
  });

  it('the SPA route answers only through the rewrite: asked for by its own name, or under //api or a dot segment that resolves into /api or /_next, never the page', async () => {
    for (const pathname of ['/api/spa', '/api/spa/', '/api/spa/index.html', '/api/spa/orders/42', '/api/spa/assets/app-Ab12Cd34.js', '/api/spa/x/..%2f..%2findex.html', '//api/spa/orders']) {
      const res = await get(pathname);
      const body = await res.text();
      expect(body, pathname).not.toBe(INDEX);
      expect(body, pathname).not.toContain(APP_JS);
      if (res.status === 308) continue; // Next collapses `//`: the next request is one of the above
      expect(res.status, pathname).toBe(404);
      expect(JSON.parse(body), pathname).toMatchObject({ error: 'not_found' });
    }
    // Its name percent-encoded, asked for by the app's own script (X-CSRF: 1): Next routes by the decoded name.
    for (const pathname of ['/api/%73pa/orders', '/api/sp%61', '/api/%73%70%61/index.html', '/api/%73pa/assets/app-Ab12Cd34.js']) {
      const res = await fetch(`${app}${pathname}`, { headers: { accept: 'text/html', 'x-csrf': '1' }, redirect: 'manual' });
      const body = await res.text();
      expect([res.status, body.includes('<title>My SPA</title>') || body.includes(APP_JS)], pathname).toEqual([404, false]);
      expect(JSON.parse(body), pathname).toMatchObject({ error: 'not_found' });
    }
    // Spellings that Next resolves into /api or /_next (a browser would resolve them first; a raw client need not).
    const port = Number(new URL(app).port);
    for (const target of ['//api/auth/session', '//api/nothing-here', '//_next/static/x.js', '/./api/auth/session', '/x/../api/auth/session', '/%2e/api/auth/session', '/x/%2E%2e/api/auth/session', '/\\api/auth/session', '/./api/spa/x', '/.%2e/_next/x']) {
      const res = await rawRequest(port, `GET ${target} HTTP/1.1\r\nHost: localhost:${port}\r\nAccept: text/html\r\nConnection: close\r\n\r\n`);
      expect(res?.body ?? '', target).not.toContain('<title>My SPA</title>');
    }
  });

  it("leaves Gatehouse's own endpoints alone, and a login lands on the SPA", async () => {
    const session = await fetch(`${app}/api/auth/session`, { headers: { 'x-csrf': '1' } });
    expect(await session.json()).toEqual({ authenticated: false });
    const { finalUrl, rpCookies } = await loginThroughRp({ startUrl: `${app}/api/auth/login?returnTo=%2Forders%2F42`, username: 'spa-user' });
    expect(finalUrl).toBe(`${app}/orders/42`);
    const page = await fetch(finalUrl, { headers: { accept: 'text/html', cookie: `gatehouse=${rpCookies.get('gatehouse')}` } });
    expect(await page.text()).toBe(INDEX);
    const signedIn = await fetch(`${app}/api/auth/session`, { headers: { 'x-csrf': '1', cookie: `gatehouse=${rpCookies.get('gatehouse')}` } });
    expect(await signedIn.json()).toMatchObject({ authenticated: true, user: { sub: 'spa-user' } });
  });
});

/**
 * A static host for the same files under /app/ (ETag, Cache-Control, 304s), with a file outside
 * that base path that must never be reachable through Gatehouse. It records what it was sent.
 */
function startSpaOrigin(): Promise<{ url: string; seen: IncomingHttpHeaders[]; requests: OriginRequest[]; server: Server }> {
  const seen: IncomingHttpHeaders[] = [];
  const requests: OriginRequest[] = [];
  const server = createServer((req, res) => {
    seen.push(req.headers);
    const pathname = new URL(req.url ?? '/', 'http://x').pathname;
    requests.push({ method: req.method ?? '', path: pathname, ifNoneMatch: req.headers['if-none-match'] });
    if (pathname === '/secret.txt') return void res.writeHead(200, { 'content-type': 'text/plain' }).end('SECRET');
    const redirects: Record<string, [number, string]> = {
      '/app/moved.txt': [301, '/app/robots.txt?from=moved'],
      '/app/elsewhere.txt': [302, 'https://example.com/signed?x=1'],
      '/app/away.txt': [302, '/secret.txt'],
      '/app/into-api.txt': [302, '/app/api/auth/logout'],
      '/app/double.txt': [302, '/app//evil.example/x'],
      '/app/backslash.txt': [302, '/app/\\evil.example/x'],
    };
    const redirect = redirects[pathname];
    if (redirect) return void res.writeHead(redirect[0], { location: redirect[1], 'cache-control': 'no-store' }).end();
    const file = pathname.startsWith('/app/') ? path.join(spaDir, pathname.slice('/app/'.length)) : '';
    if (!file.startsWith(spaDir) || !existsSync(file) || !file.includes('.')) return void res.writeHead(404).end('not found');
    const body = readFileSync(file);
    const etag = `"${createHash('sha256').update(body).digest('hex').slice(0, 16)}"`;
    const headers = {
      etag,
      'cache-control': file.includes('/assets/') ? 'public, max-age=31536000, immutable' : file.endsWith('short.txt') ? 'max-age=1' : file.endsWith('private.txt') ? 'private, max-age=600' : 'no-cache',
      'content-type': file.endsWith('.html') ? 'TEXT/HTML; charset=utf-8' : file.endsWith('.js') ? 'text/javascript' : file.endsWith('.svg') ? 'image/svg+xml' : 'text/plain',
      'set-cookie': 'cdn=1; Path=/',
      ...(file.endsWith('lang.txt') ? { vary: 'Accept-Language', 'content-language': 'fr', 'cache-control': 'public, max-age=600' } : {}),
      ...(file.includes('stored-') ? { 'content-encoding': 'gzip' } : {}),
    };
    if (req.headers['if-none-match'] === etag) return void res.writeHead(304, headers).end();
    res.writeHead(200, headers).end(body);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ url: `http://127.0.0.1:${(server.address() as { port: number }).port}/app/`, seen, requests, server })));
}

interface OriginRequest {
  method: string;
  path: string;
  ifNoneMatch: string | undefined;
}

describe.each(['fast', 'next'] as const)('SPA_UPSTREAM_URL on %s', (shape) => {
  let app: string;
  let origin: Awaited<ReturnType<typeof startSpaOrigin>>;
  beforeAll(async () => {
    origin = await startSpaOrigin();
    // next start reuses the build made above: its rewrite only needs "an SPA is configured".
    const stack = await startStack({ server: shape, workers: 1, env: { SPA_UPSTREAM_URL: origin.url, ...(shape === 'next' ? { NEXT_DIST_DIR: SPA_DIST_DIR } : {}) } });
    stacks.push(stack);
    app = stack.apps[0]!.url;
  }, 120_000);
  afterAll(() => origin?.server.close());

  it('serves the SPA from its origin on this one: index.html for routes, files as they are, its caching headers kept', async () => {
    for (const pathname of ['/', '/orders/42']) {
      const res = await fetch(`${app}${pathname}`, { headers: { accept: 'text/html', cookie: 'gatehouse=secret-cookie' } });
      expect(res.status, pathname).toBe(200);
      expect(await res.text(), pathname).toBe(INDEX);
      expect(res.headers.get('content-security-policy'), pathname).toContain("frame-ancestors 'none'");
      expect(res.headers.get('cache-control'), pathname).toBe('no-cache');
      expect(res.headers.get('set-cookie'), pathname).toBeNull();
    }
    const js = await fetch(`${app}/assets/app-Ab12Cd34.js`);
    expect(await js.text()).toBe(APP_JS);
    expect(js.headers.get('cache-control')).toBe('public, max-age=31536000, immutable');
    const etag = js.headers.get('etag');
    expect(etag).toMatch(/^"[0-9a-f]{16}"$/);
    const again = await fetch(`${app}/assets/app-Ab12Cd34.js`, { headers: { 'if-none-match': etag as string } });
    expect(again.status).toBe(304);
    expect((await fetch(`${app}/assets/missing-Zz99Yy88.js`)).status).toBe(404);
    // The browser's cookie (its session) never reaches the static host.
    expect(origin.seen.some((headers) => headers.cookie !== undefined || headers.authorization !== undefined)).toBe(false);
  });

  it('keeps the host’s files as its Cache-Control says: fetched once while fresh, then revalidated with If-None-Match; never a private one', async () => {
    const asked = (file: string) => origin.requests.filter((request) => request.path === `/app/${file}`);
    const fetchText = async (pathname: string, headers: Record<string, string> = {}) => {
      const res = await fetch(`${app}${pathname}`, { headers });
      return { status: res.status, body: await res.text(), etag: res.headers.get('etag'), age: res.headers.get('age') };
    };

    // Immutable: five browsers, one request to the host; a browser's own revalidation is answered here.
    for (let i = 0; i < 5; i++) expect(await fetchText('/assets/chunk-Qw12Er34.js')).toMatchObject({ status: 200, body: 'export const chunk = 1;', age: expect.stringMatching(/^\d+$/) });
    const { etag } = await fetchText('/assets/chunk-Qw12Er34.js');
    expect(await fetchText('/assets/chunk-Qw12Er34.js', { 'if-none-match': etag as string })).toMatchObject({ status: 304, body: '' });
    expect(asked('assets/chunk-Qw12Er34.js')).toEqual([{ method: 'GET', path: '/app/assets/chunk-Qw12Er34.js', ifNoneMatch: undefined }]);

    // no-cache (index.html): every load asks the host, but only whether it changed; the host answers 304 without the file.
    await fetchText('/warm-up');
    const before = asked('index.html').length;
    for (const route of ['/a', '/b/c', '/d']) expect(await fetchText(route)).toMatchObject({ status: 200, body: INDEX });
    const revalidations = asked('index.html').slice(before);
    expect(revalidations).toHaveLength(3);
    for (const request of revalidations) expect(request.ifNoneMatch).toMatch(/^"[0-9a-f]{16}"$/);

    // max-age=1: kept for a second, then revalidated once and kept again.
    expect(await fetchText('/short.txt')).toMatchObject({ status: 200, body: 'fresh for a second' });
    expect(await fetchText('/short.txt')).toMatchObject({ status: 200, body: 'fresh for a second' });
    expect(asked('short.txt')).toHaveLength(1);
    // Asked until the copy has gone stale and the host is asked again; each answer is the file.
    await waitFor('the copy of short.txt to go stale', async () => {
      expect(await fetchText('/short.txt')).toMatchObject({ status: 200, body: 'fresh for a second' });
      return asked('short.txt').length > 1 ? true : undefined;
    }, 3_000, 100);
    expect(await fetchText('/short.txt')).toMatchObject({ status: 200, body: 'fresh for a second' });
    expect(asked('short.txt').map((request) => request.ifNoneMatch === undefined)).toEqual([true, false]);

    // private: for one browser, never kept to hand to another.
    for (let i = 0; i < 3; i++) expect(await fetchText('/private.txt')).toMatchObject({ status: 200, body: 'for one browser only' });
    expect(asked('private.txt')).toHaveLength(3);
  });

  it('asks the host for no dotfile; what is not the page runs sandboxed when opened by itself, the page keeps its policy whatever the letter case of its type', async () => {
    for (const pathname of ['/.env', '/.git/config', '/%2eenv']) {
      const res = await fetch(`${app}${pathname}`);
      const body = await res.text();
      expect(body, pathname).not.toContain('SECRET');
      expect(res.status === 404 || body === INDEX, pathname).toBe(true);
    }
    expect(origin.requests.some((request) => request.path.includes('/.'))).toBe(false);
    expect((await fetch(`${app}/assets/logo.svg`)).headers.get('content-security-policy')).toMatch(SANDBOXED);
    expect((await fetch(`${app}/assets/app-Ab12Cd34.js`)).headers.get('content-security-policy')).toBeNull();
    expect((await fetch(`${app}/orders`, { headers: { accept: 'text/html' } })).headers.get('content-security-policy')).toContain("frame-ancestors 'none'");
  });

  it('passes on what the host says of a file (its encoding, language and what it varies by), and its redirects as places on this origin', async () => {
    const french = await fetch(`${app}/lang.txt`, { headers: { 'accept-language': 'fr' } });
    expect([await french.text(), french.headers.get('content-language')]).toEqual(['bonjour', 'fr']);
    // next start adds names of its own.
    expect(french.headers.get('vary')?.split(/,\s*/)).toContain('Accept-Language');
    // Kept gzipped by the host, sent so whatever the request said: the browser gets it decoded, from the host and from the copy kept here.
    for (let i = 0; i < 2; i++) {
      const stored = await fetch(`${app}/assets/stored-Gz12Gz34.js`);
      expect([stored.status, await stored.text()], `request ${i + 1}`).toEqual([200, STORED_JS]);
    }
    expect(origin.requests.filter((request) => request.path === '/app/assets/stored-Gz12Gz34.js')).toHaveLength(1);
    const redirected = async (pathname: string) => {
      const res = await fetch(`${app}${pathname}`, { redirect: 'manual' });
      await res.arrayBuffer();
      return [res.status, res.headers.get('location')];
    };
    expect(await redirected('/moved.txt')).toEqual([301, '/robots.txt?from=moved']);
    expect(await redirected('/elsewhere.txt')).toEqual([302, 'https://example.com/signed?x=1']);
    // The host's own places outside the base path, and Gatehouse's paths, are nowhere to send the browser.
    expect(await redirected('/away.txt')).toEqual([302, null]);
    expect(await redirected('/into-api.txt')).toEqual([302, null]);
    // A place under the base whose path starts with `//` would be another site for a browser.
    expect(await redirected('/double.txt')).toEqual([302, null]);
    expect(await redirected('/backslash.txt')).toEqual([302, null]);
  });

  it('a navigation to a path that looks like a file but names none gets the page; a path that does not decode is a 404 and never reaches the host', async () => {
    const port = Number(new URL(app).port);
    const ask = async (headers: string) => {
      const res = await rawRequest(port, `GET /users/jane.doe HTTP/1.1\r\nHost: localhost:${port}\r\n${headers}Connection: close\r\n\r\n`);
      return [res?.status, res?.body === INDEX];
    };
    expect(await ask('Accept: text/html\r\nSec-Fetch-Mode: navigate\r\n')).toEqual([200, true]);
    const page = await rawRequest(port, `GET /users/jane.doe HTTP/1.1\r\nHost: localhost:${port}\r\nAccept: text/html\r\nSec-Fetch-Mode: navigate\r\nConnection: close\r\n\r\n`);
    expect(page?.all('vary').join(', ').split(/,\s*/)).toEqual(expect.arrayContaining(['Sec-Fetch-Mode', 'Accept']));
    expect(await ask('Accept: image/*\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Dest: image\r\n')).toEqual([404, false]);
    const asked = origin.requests.length;
    for (const target of ['/%zz', '/orders/%E0%A4%A', '/a%']) {
      const res = await rawRequest(port, `GET ${target} HTTP/1.1\r\nHost: localhost:${port}\r\nAccept: text/html\r\nConnection: close\r\n\r\n`);
      expect(res?.status, target).toBe(404);
      expect(res?.body, target).not.toContain('<title>My SPA</title>');
    }
    expect(origin.requests.length).toBe(asked);
  });

  it('never reaches outside the origin’s base path, however the path is spelled', async () => {
    const port = Number(new URL(app).port);
    for (const target of ['/../secret.txt', '/%2e%2e/secret.txt', '/..%2fsecret.txt', '/%252e%252e/secret.txt', '/assets/..%5c..%5csecret.txt']) {
      const res = await rawRequest(port, `GET ${target} HTTP/1.1\r\nHost: localhost:${port}\r\nAccept: */*\r\nConnection: close\r\n\r\n`);
      expect(res?.body ?? '', target).not.toContain('SECRET');
    }
    expect(origin.seen.length).toBeGreaterThan(0);
    // A host that decodes twice or normalises Unicode would read these as `..`: they never reach it.
    const before = origin.requests.length;
    for (const target of ['/%252e%252e/%252e%252e/private/x.js', '/%EF%BC%8E%EF%BC%8E/x.js', '/%25EF%25BC%258E%25EF%25BC%258E/x.js', '/assets/%255c..%255cx.js']) {
      const res = await rawRequest(port, `GET ${target} HTTP/1.1\r\nHost: localhost:${port}\r\nAccept: */*\r\nConnection: close\r\n\r\n`);
      expect(res?.status, target).toBe(404);
    }
    expect(origin.requests.slice(before)).toEqual([]);
  });
});
