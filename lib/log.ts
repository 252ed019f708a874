import { constants, fstatSync, openSync, writeSync } from 'node:fs';
import SonicBoom from 'sonic-boom';
import { sharedState } from './shared-state.ts';

/**
 * Structured logs: one JSON line per event on stdout. Callers pass only fields that are safe to
 * keep (hashes, codes, durations) — never a token, a cookie or a secret.
 */
type Level = 'debug' | 'info' | 'warn' | 'error';
const RANK: Record<Level | 'silent', number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 };

function threshold(): number {
  const configured = process.env.LOG_LEVEL as Level | 'silent' | undefined;
  return RANK[configured ?? 'info'] ?? RANK.info;
}

let minimum: number | undefined;

/**
 * Info and debug lines (one per proxied request at the default level) go through sonic-boom, pino's
 * writer: gathered and written off the event loop (asynchronous `fs.write`), at the latest
 * FLUSH_AFTER_MS after they were logged. One synchronous write to a pipe per request was a tenth of
 * the fast path's CPU, and a slow log reader then stalls every request. Warnings and errors go
 * at once, synchronously, so a crash cannot hide them; what is gathered is written on the way out
 * (`exit`), however the process ends short of SIGKILL. A reader that stops reading costs lines,
 * never memory: past MAX_BUFFERED_CHARS they are dropped, and the drop is reported on stderr.
 */
const FLUSH_AFTER_MS = 200;
/**
 * Writes to a pipe of at most PIPE_BUF bytes are atomic: npm start's workers share one stdout, and
 * a bigger write could be interleaved with another worker's, cutting lines in two.
 */
const PIPE_BUF = 4096;
const MAX_BUFFERED_CHARS = 16 * 1024 * 1024;
const DROP_REPORT_INTERVAL_MS = 10_000;
/** One writer per process, whichever copies of this module it loads (Next's bundle, server.ts). */
const state = sharedState('log', () => ({
  writer: undefined as SonicBoom | undefined,
  droppedLines: 0,
  reportedDrops: 0,
  lastDropReport: 0,
  dropReport: undefined as NodeJS.Timeout | undefined,
  /** fd 2's own non-blocking description when it is a pipe; null when it is not. */
  stderrPipe: undefined as number | null | undefined,
  heldWarnings: [] as string[],
  warningRetry: undefined as NodeJS.Timeout | undefined,
  /** Epoch ms after which a full pipe is given up on: set on the way out. */
  giveUpAt: Number.POSITIVE_INFINITY,
}));

/** On the way out a reader that is merely slow still gets the last lines; one that stopped costs at most this. */
const EXIT_FLUSH_MS = 1_000;

/**
 * When fd 1 or 2 is a pipe (Docker, Kubernetes, a supervisor), a description of that pipe of our
 * own, non-blocking: a reader that stops reading then costs lines, never a blocked event loop (a
 * warning written synchronously) nor a libuv pool thread stuck in write(), which the process would
 * wait for on its way out (SIGTERM then took as long as the reader's stall). The fd itself keeps its
 * flags: the cluster's other processes and process.stdout share its description. Undefined when it
 * is no pipe (a file, a terminal, a socket, where Node's own handling is kept).
 */
function nonBlockingPipe(fd: 1 | 2): number | undefined {
  try {
    if (!fstatSync(fd).isFIFO()) return undefined;
  } catch {
    return undefined;
  }
  try {
    return openSync(`/proc/self/fd/${fd}`, constants.O_WRONLY | constants.O_NONBLOCK);
  } catch (error) {
    // No /proc (a hardened sandbox): Node's blocking writes stay, and a reader that stops reading
    // can stall this process again. The operator is told once per stream, in the only way left.
    const code = (error as NodeJS.ErrnoException).code;
    process.stderr.write(`${JSON.stringify({ time: new Date().toISOString(), level: 'warn', event: 'log.pipe_blocking', fd, causeCode: code })}\n`);
    return undefined;
  }
}

/** Warnings held while fd 2's pipe is full, retried every RETRY_MS; past the cap they count as dropped. */
const HELD_WARNINGS_MAX = 1_000;
const RETRY_MS = 100;

/**
 * Warnings and errors go at once and whole, in order. When fd 2 is a pipe too full to take them,
 * they wait in a small queue retried off the event loop's critical path, never in a blocking write;
 * false when even the queue is full, and the caller counts the line as dropped.
 */
function writeWarning(line: string): boolean {
  if (state.stderrPipe === undefined) {
    state.stderrPipe = nonBlockingPipe(2) ?? null;
    // One last try on the way out: what the pipe still cannot take then is lost with the process.
    if (state.stderrPipe !== null) process.once('exit', writeHeldWarnings);
  }
  // Longer than PIPE_BUF, a write to a full pipe could go out in part: such a rare line waits instead.
  if (state.stderrPipe === null || Buffer.byteLength(line) > PIPE_BUF) {
    process.stderr.write(line);
    return true;
  }
  if (!state.heldWarnings.length && writeToPipe(state.stderrPipe, line)) return true;
  if (state.heldWarnings.length >= HELD_WARNINGS_MAX) return false;
  state.heldWarnings.push(line);
  state.warningRetry ??= setTimeout(writeHeldWarnings, RETRY_MS).unref();
  return true;
}

function writeToPipe(fd: number, line: string): boolean {
  try {
    writeSync(fd, line);
    return true;
  } catch {
    return false;
  }
}

function writeHeldWarnings(): void {
  state.warningRetry = undefined;
  const fd = state.stderrPipe;
  if (typeof fd !== 'number') return;
  while (state.heldWarnings.length && writeToPipe(fd, state.heldWarnings[0] as string)) state.heldWarnings.shift();
  if (state.heldWarnings.length) state.warningRetry = setTimeout(writeHeldWarnings, RETRY_MS).unref();
}

/** Counts lines lost and says so on stderr, at most once per interval, and the last count is never left unsaid. */
function noteDropped(lines: number): void {
  state.droppedLines += lines;
  const wait = state.lastDropReport + DROP_REPORT_INTERVAL_MS - Date.now();
  if (wait <= 0) reportDrops();
  else state.dropReport ??= setTimeout(reportDrops, wait).unref();
}

/** The running count of dropped lines on stderr, if it grew since last said. */
function reportDrops(): void {
  state.dropReport = undefined;
  if (state.droppedLines === state.reportedDrops) return;
  const now = Date.now();
  if (!writeWarning(`${JSON.stringify({ time: new Date(now).toISOString(), level: 'warn', event: 'log.dropped', lines: state.droppedLines })}\n`)) {
    state.dropReport = setTimeout(reportDrops, DROP_REPORT_INTERVAL_MS).unref();
    return;
  }
  state.reportedDrops = state.droppedLines;
  state.lastDropReport = now;
}

function stdoutWriter(): SonicBoom {
  if (state.writer) return state.writer;
  const created = new SonicBoom({
    fd: nonBlockingPipe(1) ?? 1,
    sync: false,
    minLength: PIPE_BUF - 512,
    maxWrite: PIPE_BUF,
    maxLength: MAX_BUFFERED_CHARS,
    periodicFlush: FLUSH_AFTER_MS,
    // A full pipe is waited out while the process runs, and for a bounded time on its way out.
    retryEAGAIN: () => Date.now() < state.giveUpAt,
  });
  // A closed or broken stdout must not take the server down with it.
  created.on('error', () => undefined);
  created.on('drop', (data: string) => noteDropped(data.split('\n').length - 1));
  process.on('exit', () => {
    state.giveUpAt = Date.now() + EXIT_FLUSH_MS;
    reportDrops();
    try {
      created.flushSync();
    } catch {
      // Nothing more can be done for the last lines on the way out.
    }
  });
  state.writer = created;
  return created;
}

export function log(level: Level, event: string, fields: Record<string, unknown> = {}): void {
  minimum ??= threshold();
  if (RANK[level] < minimum) return;
  const line = JSON.stringify({ time: new Date().toISOString(), level, event, ...fields }) + '\n';
  if (level === 'error' || level === 'warn') {
    if (!writeWarning(line)) noteDropped(1);
  } else stdoutWriter().write(line);
}

/** What may be logged about a failure: its name, code and message, not its payload. */
export function describeCause(cause: unknown): Record<string, unknown> {
  if (!(cause instanceof Error)) return { cause: typeof cause };
  const code = (cause as { code?: unknown }).code;
  return { cause: cause.name, causeCode: typeof code === 'string' ? code : undefined, causeMessage: cause.message.slice(0, 200) };
}
