import { constants, fstatSync, openSync } from 'node:fs';
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
  exiting: false,
}));

/**
 * Where the info lines go. When stdout is a pipe (Docker, Kubernetes, a supervisor), a description
 * of that pipe of our own, non-blocking: a reader that stops reading then costs lines (retried
 * every 100 ms, dropped past MAX_BUFFERED_CHARS), never a libuv pool thread stuck in write(), which
 * the process would wait for on its way out (SIGTERM then took as long as the reader's stall).
 * fd 1 itself keeps its flags: the cluster's other processes and process.stdout share its description.
 */
function stdoutFd(): number {
  try {
    if (!fstatSync(1).isFIFO()) return 1;
    return openSync('/proc/self/fd/1', constants.O_WRONLY | constants.O_NONBLOCK);
  } catch {
    return 1;
  }
}

/** The running count of dropped lines on stderr, if it grew since last said. */
function reportDrops(): void {
  state.dropReport = undefined;
  if (state.droppedLines === state.reportedDrops) return;
  state.reportedDrops = state.droppedLines;
  state.lastDropReport = Date.now();
  process.stderr.write(`${JSON.stringify({ time: new Date(state.lastDropReport).toISOString(), level: 'warn', event: 'log.dropped', lines: state.droppedLines })}\n`);
}

function stdoutWriter(): SonicBoom {
  if (state.writer) return state.writer;
  const created = new SonicBoom({
    fd: stdoutFd(),
    sync: false,
    minLength: PIPE_BUF - 512,
    maxWrite: PIPE_BUF,
    maxLength: MAX_BUFFERED_CHARS,
    periodicFlush: FLUSH_AFTER_MS,
    // A full pipe is waited out while the process runs, not on its way out.
    retryEAGAIN: () => !state.exiting,
  });
  // A closed or broken stdout must not take the server down with it.
  created.on('error', () => undefined);
  created.on('drop', (data: string) => {
    state.droppedLines += data.split('\n').length - 1;
    // At most one report per interval, and the last count is never left unsaid.
    const wait = state.lastDropReport + DROP_REPORT_INTERVAL_MS - Date.now();
    if (wait <= 0) reportDrops();
    else state.dropReport ??= setTimeout(reportDrops, wait).unref();
  });
  process.on('exit', () => {
    state.exiting = true;
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
  if (level === 'error' || level === 'warn') process.stderr.write(line);
  else stdoutWriter().write(line);
}

/** What may be logged about a failure: its name, code and message, not its payload. */
export function describeCause(cause: unknown): Record<string, unknown> {
  if (!(cause instanceof Error)) return { cause: typeof cause };
  const code = (cause as { code?: unknown }).code;
  return { cause: cause.name, causeCode: typeof code === 'string' ? code : undefined, causeMessage: cause.message.slice(0, 200) };
}
