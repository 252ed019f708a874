import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ROOT } from '../../e2e/support/stack.ts';

/**
 * @gatehouse/client as a consumer meets it: `npm pack`ed, installed into a fresh Vite + React +
 * TypeScript app, type-checked and bundled there. Only the tarball is installed from disk; the
 * app's own toolchain (react, typescript, vite) is this repository's, linked in, so the check runs
 * offline.
 */

const work = mkdtempSync(path.join(tmpdir(), 'gatehouse-client-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

function run(command: string, args: string[], cwd: string): { status: number | null; output: string } {
  const result = spawnSync(command, args, { cwd, encoding: 'utf8', env: { ...process.env, npm_config_audit: 'false', npm_config_fund: 'false' } });
  return { status: result.status, output: `${result.stdout}${result.stderr}` };
}

describe('@gatehouse/client', () => {
  it('packs to ESM JavaScript with declarations, no sources and no dependencies', () => {
    const build = run('npm', ['run', '--silent', 'build:client'], ROOT);
    expect(build.status, build.output).toBe(0);
    const packed = run('npm', ['pack', '--json', '--pack-destination', work], path.join(ROOT, 'packages/client'));
    expect(packed.status, packed.output).toBe(0);
    const [info] = JSON.parse(packed.output.slice(packed.output.indexOf('['))) as Array<{ filename: string; files: Array<{ path: string }> }>;
    expect(info?.files.map((file) => file.path).sort()).toEqual(['README.md', 'dist/index.d.ts', 'dist/index.js', 'dist/react.d.ts', 'dist/react.js', 'package.json']);
    const manifest = JSON.parse(readFileSync(path.join(ROOT, 'packages/client/package.json'), 'utf8')) as { dependencies?: unknown };
    expect(manifest.dependencies).toBeUndefined();
    // The hook's entry imports the client by its built name, not the TypeScript source.
    expect(readFileSync(path.join(ROOT, 'packages/client/dist/react.js'), 'utf8')).toMatch(/from ['"]\.\/index\.js['"]/);
  });

  it('installs, type-checks and bundles in a fresh Vite + React + TypeScript app', () => {
    const tarball = readdirSync(work).find((file) => file.endsWith('.tgz'));
    expect(tarball).toBeDefined();
    const app = path.join(work, 'app');
    mkdirSync(path.join(app, 'src'), { recursive: true });
    writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'spa', private: true, type: 'module' }));
    const installed = run('npm', ['install', '--offline', '--no-save', path.join(work, tarball as string)], app);
    expect(installed.status, installed.output).toBe(0);
    for (const name of ['react', 'react-dom', '@types/react', '@types/react-dom', 'typescript', 'vite']) {
      mkdirSync(path.dirname(path.join(app, 'node_modules', name)), { recursive: true });
      symlinkSync(path.join(ROOT, 'node_modules', name), path.join(app, 'node_modules', name));
    }
    // What Vite's react-ts template configures, strict included.
    writeFileSync(
      path.join(app, 'tsconfig.json'),
      JSON.stringify({ compilerOptions: { target: 'ES2022', lib: ['ES2022', 'DOM', 'DOM.Iterable'], module: 'ESNext', moduleResolution: 'bundler', jsx: 'react-jsx', strict: true, noEmit: true, skipLibCheck: false, types: [] }, include: ['src'] }),
    );
    writeFileSync(path.join(app, 'index.html'), '<!doctype html><html><body><div id="root"></div><script type="module" src="/src/main.tsx"></script></body></html>');
    writeFileSync(
      path.join(app, 'src/main.tsx'),
      `import { createRoot } from 'react-dom/client';
import { GatehouseClientError, api, login, logout, type SessionInfo } from '@gatehouse/client';
import { useSession } from '@gatehouse/client/react';

function App() {
  const session = useSession();
  if (session.status !== 'authenticated') return <button onClick={() => login('/')}>Log in {session.signedOutReason}</button>;
  const load = async () => {
    try {
      const items: unknown = await api('orders').get('items');
      console.log(items);
    } catch (error) {
      if (error instanceof GatehouseClientError && error.code === 'session_expired') login();
    }
  };
  return <button onClick={() => void load().then(() => logout())}>{session.user?.sub}</button>;
}

const info: SessionInfo = { authenticated: false };
console.log(info);
createRoot(document.getElementById('root') as HTMLElement).render(<App />);
`,
    );
    const typecheck = run(process.execPath, [path.join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', app], app);
    expect(typecheck.status, typecheck.output).toBe(0);
    // And a type error is caught, so the check above can fail.
    writeFileSync(path.join(app, 'src/wrong.ts'), "import { api } from '@gatehouse/client';\nconst n: number = api('x');\nexport default n;\n");
    expect(run(process.execPath, [path.join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', app], app).status).not.toBe(0);
    rmSync(path.join(app, 'src/wrong.ts'));
    const bundle = run(process.execPath, [path.join(ROOT, 'node_modules/vite/bin/vite.js'), 'build', '--logLevel', 'warn'], app);
    expect(bundle.status, bundle.output).toBe(0);
    const assets = readdirSync(path.join(app, 'dist/assets')).filter((file) => file.endsWith('.js'));
    const js = assets.map((file) => readFileSync(path.join(app, 'dist/assets', file), 'utf8')).join('\n');
    expect(js).toContain('X-CSRF');
    expect(js).not.toContain('@gatehouse/client');
  });
});
