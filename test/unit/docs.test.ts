import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { CONFIG_VARIABLES } from '../../lib/config.ts';

/** The README's configuration table and the schema in lib/config.ts must name the same variables. */
function documentedVariables(): string[] {
  const readme = readFileSync(path.resolve(import.meta.dirname, '..', '..', 'README.md'), 'utf8');
  const section = readme.split(/^## Configuration$/m)[1]?.split(/^## /m)[0] ?? '';
  const names = new Set<string>();
  for (const line of section.split('\n')) {
    const firstCell = /^\|([^|]*)\|/.exec(line)?.[1] ?? '';
    for (const match of firstCell.matchAll(/`([A-Z][A-Z0-9_]+)`/g)) names.add(match[1] as string);
  }
  return [...names].sort();
}

/** Read by `npm run dev` (scripts/dev.ts), not by Gatehouse itself. */
const DEV_SCRIPT_VARIABLES = ['IDP_PORT', 'IDP_PAR', 'DEMO_API_PORT', 'SPA_DEV_URL', 'NEXT_DEV_PORT'];

describe('README configuration reference', () => {
  it('documents exactly the variables the schema and the dev command read', () => {
    expect(documentedVariables()).toEqual([...CONFIG_VARIABLES, ...DEV_SCRIPT_VARIABLES].sort());
  });
});

describe("README's test command", () => {
  it('is exactly what CI runs', () => {
    const root = path.resolve(import.meta.dirname, '..', '..');
    const readme = readFileSync(path.join(root, 'README.md'), 'utf8');
    const quickStart = /```sh\n([\s\S]*?)```/.exec(readme.split(/^## Quick start$/m)[1] ?? '')?.[1] ?? '';
    const testLine = quickStart.split('\n').find((line) => /\bnpm test\b/.test(line)) ?? '';
    const command = testLine.replace(/\s+#.*$/, '').trim();
    expect(command).toBe('npm ci && npm test');
    const ciLines = readFileSync(path.join(root, '.ci', 'run'), 'utf8').split('\n').filter((line) => line.trim() && !line.startsWith('#'));
    expect(ciLines.at(-1)).toBe(command);
  });
});

describe('README error codes', () => {
  it('list every code Gatehouse can answer with', () => {
    const root = path.resolve(import.meta.dirname, '..', '..');
    const readme = readFileSync(path.join(root, 'README.md'), 'utf8');
    const sources = ['lib/errors.ts', 'lib/auth.ts', 'lib/proxy.ts', 'lib/websocket.ts', 'lib/oidc.ts', 'lib/adapters.ts', 'lib/tokens.ts', 'lib/dpop.ts', 'middleware.ts'];
    const codes = new Set<string>();
    for (const source of sources) {
      const text = readFileSync(path.join(root, source), 'utf8');
      for (const match of text.matchAll(/GatehouseError\(\s*'([a-z_]+)'/g)) codes.add(match[1] as string);
      for (const match of text.matchAll(/refuse\(\s*(?:request,\s*)?\d{3},\s*'([a-z_]+)'/g)) codes.add(match[1] as string);
    }
    // client_closed is logged only: the browser it would be for has gone.
    codes.delete('client_closed');
    expect(codes.size).toBeGreaterThan(15);
    const missing = [...codes].filter((code) => !readme.includes(`\`${code}\``));
    expect(missing).toEqual([]);
  });
});

describe('.env.example', () => {
  it('mentions every variable the schema reads', () => {
    const example = readFileSync(path.resolve(import.meta.dirname, '..', '..', '.env.example'), 'utf8');
    const mentioned = new Set([...example.matchAll(/^#?\s*([A-Z][A-Z0-9_]+)=/gm)].map((match) => match[1]));
    expect([...CONFIG_VARIABLES, ...DEV_SCRIPT_VARIABLES].filter((name) => !mentioned.has(name))).toEqual([]);
  });
});
