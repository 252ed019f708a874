// Summarises a V8 .cpuprofile (node --cpu-prof): self time by function+file, self time by package or
// project file, and inclusive time of the project's own functions (lib/, server.ts).
//
//   node bench/profile.ts <file.cpuprofile | dir> [top=20]
import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
  columnNumber: number;
}

interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

const ROOT = path.resolve(import.meta.dirname, '..');

function shortUrl(url: string): string {
  if (!url) return '(native)';
  let file = url.replace(/^file:\/\//, '');
  if (file.startsWith(ROOT + '/')) file = file.slice(ROOT.length + 1);
  const nm = file.lastIndexOf('node_modules/');
  if (nm !== -1) file = file.slice(nm + 'node_modules/'.length);
  return file;
}

/** The package (node_modules/<pkg>), node internals, or the project file a frame belongs to. */
function owner(url: string): string {
  if (!url) return '(native / GC / idle)';
  if (url.startsWith('node:')) return 'node:' + url.slice(5).split('/')[0];
  const file = url.replace(/^file:\/\//, '');
  const nm = file.lastIndexOf('node_modules/');
  if (nm !== -1) {
    const rest = file.slice(nm + 'node_modules/'.length).split('/');
    const pkg = rest[0]?.startsWith('@') ? `${rest[0]}/${rest[1]}` : rest[0];
    if (pkg === 'next') return `next/${rest.slice(1, 4).join('/')}`;
    return pkg ?? file;
  }
  return shortUrl(url);
}

export interface Row {
  name: string;
  ms: number;
  pct: number;
}

export interface Summary {
  file: string;
  totalMs: number;
  byFunction: Row[];
  byOwner: Row[];
  projectInclusive: Row[];
}

export function summarise(file: string, top = 20): Summary {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const nodes = new Map(profile.nodes.map((node) => [node.id, node]));
  const self = new Map<number, number>();
  // timeDeltas[i] is the time before sample i; the time after it belongs to sample i.
  for (let i = 0; i < profile.samples.length; i++) {
    const dt = (profile.timeDeltas[i + 1] ?? 0) / 1000;
    const id = profile.samples[i] as number;
    self.set(id, (self.get(id) ?? 0) + dt);
  }
  const totalMs = [...self.values()].reduce((a, b) => a + b, 0);
  const label = (frame: CallFrame) => `${frame.functionName || '(anonymous)'}  ${shortUrl(frame.url)}${frame.url ? `:${frame.lineNumber + 1}` : ''}`;
  const add = (table: Map<string, number>, key: string, ms: number) => table.set(key, (table.get(key) ?? 0) + ms);

  const byFunction = new Map<string, number>();
  const byOwner = new Map<string, number>();
  for (const [id, ms] of self) {
    const frame = (nodes.get(id) as ProfileNode).callFrame;
    add(byFunction, label(frame), ms);
    add(byOwner, owner(frame.url), ms);
  }

  // Inclusive time of project functions, counting each sample once per function even under recursion.
  const parent = new Map<number, number>();
  for (const node of profile.nodes) for (const child of node.children ?? []) parent.set(child, node.id);
  const isProject = (url: string) => url.startsWith(`file://${ROOT}/`) && !url.includes('/node_modules/') && !url.includes('/.next');
  const inclusive = new Map<string, number>();
  for (const [id, ms] of self) {
    const seen = new Set<string>();
    for (let cursor: number | undefined = id; cursor !== undefined; cursor = parent.get(cursor)) {
      const frame = (nodes.get(cursor) as ProfileNode).callFrame;
      if (!isProject(frame.url)) continue;
      const key = label(frame);
      if (seen.has(key)) continue;
      seen.add(key);
      add(inclusive, key, ms);
    }
  }

  const rows = (table: Map<string, number>, n: number): Row[] =>
    [...table]
      .sort((a, b) => b[1] - a[1])
      .slice(0, n)
      .map(([name, ms]) => ({ name, ms, pct: (100 * ms) / totalMs }));
  return { file, totalMs, byFunction: rows(byFunction, top), byOwner: rows(byOwner, 15), projectInclusive: rows(inclusive, 15) };
}

export function formatSummary(summary: Summary): string {
  const table = (title: string, rows: Row[]) =>
    [`${title}`, ...rows.map((row) => `  ${row.ms.toFixed(0).padStart(7)} ms ${row.pct.toFixed(1).padStart(5)}%  ${row.name}`)].join('\n');
  return [
    `CPU profile ${path.basename(summary.file)}: ${summary.totalMs.toFixed(0)} ms sampled`,
    table(`Top ${summary.byFunction.length} functions by self time:`, summary.byFunction),
    table('Self time by package / project file:', summary.byOwner),
    table('Inclusive time of project functions (lib/, server.ts):', summary.projectInclusive),
  ].join('\n\n');
}

/** The newest .cpuprofile in a directory (or the file itself). */
export function newestProfile(target: string): string {
  if (!statSync(target).isDirectory()) return target;
  const files = readdirSync(target)
    .filter((name) => name.endsWith('.cpuprofile'))
    .map((name) => path.join(target, name))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
  if (!files[0]) throw new Error(`no .cpuprofile in ${target}`);
  return files[0];
}

if (import.meta.main) {
  const [target, top] = process.argv.slice(2);
  if (!target) {
    process.stderr.write('usage: node bench/profile.ts <file.cpuprofile | dir> [top=20]\n');
    process.exit(2);
  }
  process.stdout.write(formatSummary(summarise(newestProfile(target), Number(top ?? 20))) + '\n');
}
