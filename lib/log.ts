import { writeSync } from 'node:fs';

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
 * Info and debug lines (one per proxied request at the default level) are gathered and written
 * together at most FLUSH_AFTER_MS later: a write to a pipe is a synchronous system call in Node,
 * and one per request was a tenth of the fast path's CPU. Warnings and errors go at once, so a
 * crash cannot hide them; what is gathered is written on the way out, however the process exits
 * short of SIGKILL.
 */
const FLUSH_AT_CHARS = 64 * 1024;
const FLUSH_AFTER_MS = 50;
let buffered = '';
let flushScheduled = false;
let exitHookInstalled = false;

function flush(): void {
  flushScheduled = false;
  if (!buffered) return;
  const lines = buffered;
  buffered = '';
  process.stdout.write(lines);
}

function buffer(line: string): void {
  buffered += line;
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      if (buffered) writeSync(1, buffered);
      buffered = '';
    });
  }
  if (buffered.length >= FLUSH_AT_CHARS) flush();
  else if (!flushScheduled) {
    flushScheduled = true;
    setTimeout(flush, FLUSH_AFTER_MS).unref();
  }
}

export function log(level: Level, event: string, fields: Record<string, unknown> = {}): void {
  minimum ??= threshold();
  if (RANK[level] < minimum) return;
  const line = JSON.stringify({ time: new Date().toISOString(), level, event, ...fields }) + '\n';
  if (level === 'error' || level === 'warn') process.stderr.write(line);
  else buffer(line);
}

/** What may be logged about a failure: its name, code and message, not its payload. */
export function describeCause(cause: unknown): Record<string, unknown> {
  if (!(cause instanceof Error)) return { cause: typeof cause };
  const code = (cause as { code?: unknown }).code;
  return { cause: cause.name, causeCode: typeof code === 'string' ? code : undefined, causeMessage: cause.message.slice(0, 200) };
}
