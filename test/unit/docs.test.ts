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

describe('README configuration reference', () => {
  it('documents exactly the variables the schema reads', () => {
    expect(documentedVariables()).toEqual([...CONFIG_VARIABLES].sort());
  });
});
