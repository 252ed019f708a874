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

export function log(level: Level, event: string, fields: Record<string, unknown> = {}): void {
  minimum ??= threshold();
  if (RANK[level] < minimum) return;
  const line = JSON.stringify({ time: new Date().toISOString(), level, event, ...fields });
  if (level === 'error' || level === 'warn') process.stderr.write(line + '\n');
  else process.stdout.write(line + '\n');
}

/** What may be logged about a failure: its name, code and message, not its payload. */
export function describeCause(cause: unknown): Record<string, unknown> {
  if (!(cause instanceof Error)) return { cause: typeof cause };
  const code = (cause as { code?: unknown }).code;
  return { cause: cause.name, causeCode: typeof code === 'string' ? code : undefined, causeMessage: cause.message.slice(0, 200) };
}
