import { spawn } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { ROOT } from '../../e2e/support/stack.ts';

/**
 * lib/log.ts gathers info lines and writes them off the event loop. What must hold whatever the
 * batching: every line arrives whole, none is lost on the way out, and processes sharing one
 * stdout (npm start's workers) never cut each other's lines.
 */

const LOG_LINES = 20_000;

/** A process that logs `lines` info lines with a marker, each ~300 bytes, then exits. */
function loggerScript(marker: string, lines: number, exit: 'exit' | 'drain'): string {
  return `
    import { log } from ${JSON.stringify(`${ROOT}/lib/log.ts`)};
    for (let i = 0; i < ${lines}; i++) log('info', 'test.line', { marker: ${JSON.stringify(marker)}, i, pad: 'x'.repeat(200 + (i % 97)) });
    ${exit === 'exit' ? 'process.exit(0);' : ''}
  `;
}

/** Runs a shell command line and returns its standard output. */
function run(command: string, env: Record<string, string> = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('sh', ['-c', command], { cwd: ROOT, env: { ...process.env, LOG_LEVEL: 'info', ...env }, stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`exited ${code}`))));
  });
}

function parsedLines(output: string): Array<{ event: string; marker: string; i: number }> {
  return output
    .split('\n')
    .filter(Boolean)
    .map((line) => JSON.parse(line) as { event: string; marker: string; i: number });
}

describe('log writer', () => {
  it('writes every line whole, in order, when the process exits at once after logging them', async () => {
    const output = await run(`"${process.execPath}" --input-type=module -e "$SCRIPT"`, { SCRIPT: loggerScript('a', LOG_LINES, 'exit') });
    const lines = parsedLines(output);
    expect(lines).toHaveLength(LOG_LINES);
    expect(lines.map((line) => line.i)).toEqual(Array.from({ length: LOG_LINES }, (_, i) => i));
  });

  it('writes every line whole when the process ends because it has nothing left to do', async () => {
    const output = await run(`"${process.execPath}" --input-type=module -e "$SCRIPT"`, { SCRIPT: loggerScript('b', 500, 'drain') });
    expect(parsedLines(output)).toHaveLength(500);
  });

  it('two processes on one stdout pipe never cut each other’s lines', async () => {
    const node = `"${process.execPath}" --input-type=module -e`;
    const output = await run(`${node} "$ONE" & ${node} "$TWO" & wait`, { ONE: loggerScript('one', LOG_LINES, 'exit'), TWO: loggerScript('two', LOG_LINES, 'exit') });
    // JSON.parse throws on a line cut in two or two lines run together.
    const lines = parsedLines(output);
    expect(lines.filter((line) => line.marker === 'one')).toHaveLength(LOG_LINES);
    expect(lines.filter((line) => line.marker === 'two')).toHaveLength(LOG_LINES);
  });
});

describe('log writer on pipes it cannot reopen non-blocking', () => {
  // Fault injection: opening /proc/self/fd/N fails in a hardened sandbox, which this machine is not;
  // a preload makes that one open fail (EACCES) and leaves every other call alone.
  const failProcOpens = `data:text/javascript,${encodeURIComponent(`
    import fs from 'node:fs';
    import { syncBuiltinESMExports } from 'node:module';
    const open = fs.openSync;
    fs.openSync = (file, ...rest) => {
      if (String(file).startsWith('/proc/self/fd/')) throw Object.assign(new Error('EACCES (injected)'), { code: 'EACCES' });
      return open(file, ...rest);
    };
    syncBuiltinESMExports();
  `)}`;
  const script = `
    import { log } from ${JSON.stringify(`${ROOT}/lib/log.ts`)};
    for (let i = 0; i < 3; i++) log('info', 'test.line', { i });
    log('warn', 'test.warning');
    process.exit(0);
  `;
  const events = (output: string) => output.split('\n').filter(Boolean).map((line) => JSON.parse(line) as { event: string; fd?: number; causeCode?: string });

  it('keeps every line, and says once per stream that a stalled reader can stall it', async () => {
    // Both streams into one shell pipe: a FIFO, as under Docker.
    const output = await run(`"${process.execPath}" --import "$PRELOAD" --input-type=module -e "$SCRIPT" 2>&1 | cat`, { PRELOAD: failProcOpens, SCRIPT: script });
    const seen = events(output);
    expect(seen.filter((line) => line.event === 'test.line')).toHaveLength(3);
    expect(seen.filter((line) => line.event === 'test.warning')).toHaveLength(1);
    const warned = seen.filter((line) => line.event === 'log.pipe_blocking');
    expect(warned.map(({ fd, causeCode }) => ({ fd, causeCode })).sort((a, b) => (a.fd ?? 0) - (b.fd ?? 0))).toEqual([
      { fd: 1, causeCode: 'EACCES' },
      { fd: 2, causeCode: 'EACCES' },
    ]);
  });

  it('says nothing of the kind where it can', async () => {
    const output = await run(`"${process.execPath}" --input-type=module -e "$SCRIPT" 2>&1 | cat`, { SCRIPT: script });
    const seen = events(output);
    expect(seen.filter((line) => line.event === 'test.line')).toHaveLength(3);
    expect(seen.some((line) => line.event === 'log.pipe_blocking')).toBe(false);
  });
});

describe('log writer with a reader that stops reading', () => {
  it('drops lines past its buffer, says how many on stderr, and loses none of the rest', async () => {
    const total = 100_000; // ~30 MB of lines, past the 16 MB the writer keeps waiting
    const script = `
      import { log } from ${JSON.stringify(`${ROOT}/lib/log.ts`)};
      for (let i = 0; i < ${total}; i++) log('info', 'test.line', { i, pad: 'x'.repeat(250) });
      process.stderr.write('logged\\n');
      process.exit(0);
    `;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { cwd: ROOT, env: { ...process.env, LOG_LEVEL: 'info' }, stdio: ['ignore', 'pipe', 'pipe'] });
    // Nobody reads stdout until the child has logged everything: the pipe fills and stays full.
    child.stdout.pause();
    let stderr = '';
    const logged = new Promise<void>((resolve) =>
      child.stderr.on('data', (chunk: Buffer) => {
        stderr += chunk.toString();
        if (stderr.includes('logged\n')) resolve();
      }),
    );
    const exited = new Promise<number | null>((resolve) => child.on('close', resolve));
    await logged;
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    child.stdout.resume();
    expect(await exited).toBe(0);
    const dropped = stderr
      .split('\n')
      .filter((line) => line.includes('"log.dropped"'))
      .map((line) => (JSON.parse(line) as { lines: number }).lines);
    expect(dropped.length).toBeGreaterThan(0);
    const received = parsedLines(out);
    // Whole lines only, and every line is either written or counted as dropped.
    expect(received.length).toBeGreaterThan(0);
    expect(received.length + Math.max(...dropped)).toBe(total);
  });
});
