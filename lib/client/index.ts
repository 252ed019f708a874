/**
 * The browser side of Gatehouse: same-origin calls with the anti-forgery header, and Gatehouse's
 * own JSON errors as typed errors. No token ever reaches this code; the cookie does the work.
 * No dependencies: the React hook lives in ./react.ts.
 */

export type SessionInfo =
  /**
   * `endedBy`: the session was ended from another device, at the identity provider, or because its
   * tokens ran out (the IdP refused its refresh token, or it had none) within the last hour.
   */
  | { authenticated: false; endedBy?: 'elsewhere' | 'idp' | 'expired' }
  | {
      authenticated: true;
      user: Record<string, unknown> & { sub: string };
      expiresAt: number;
      /** How and when the user signed in (the id_token's `acr`, `auth_time` in epoch seconds), when the IdP said. */
      acr?: string;
      authTime?: number;
      logoutUrl: string;
    };

/** The codes Gatehouse answers with (an upstream API's own errors come back as `upstream_<status>`). */
export type GatehouseErrorCode =
  | 'unauthenticated'
  | 'session_expired'
  | 'session_replaced'
  | 'reauthentication_required'
  | 'step_up_required'
  | 'token_exchange_refused'
  | 'csrf_failed'
  | 'idp_unavailable'
  | 'store_unavailable'
  | 'too_many_calls'
  | 'unknown_api'
  | 'invalid_path'
  | 'payload_too_large'
  | 'method_not_allowed'
  | 'upstream_unavailable'
  | 'upstream_timeout'
  | `upstream_${number}`
  | 'network_error'
  | (string & {});

export class GatehouseClientError extends Error {
  readonly code: GatehouseErrorCode;
  readonly status: number;
  /** The upstream API's answer, for `upstream_<status>` errors. */
  readonly response: Response | undefined;
  constructor(code: GatehouseErrorCode, status: number, message: string, response?: Response) {
    super(message);
    this.name = 'GatehouseClientError';
    this.code = code;
    this.status = status;
    this.response = response;
  }
}

/**
 * The API needs a stronger or more recent sign-in (RFC 9470 step-up). The session is still there;
 * `login({ acrValues, maxAge })` with this error's values signs in again as the API asked.
 */
export class StepUpRequiredError extends GatehouseClientError {
  /** Any one of these Authentication Context Class References will do; undefined when the API named none. */
  readonly acrValues: string[] | undefined;
  /** Seconds: the new sign-in may be at most this old; undefined when the API set no limit. */
  readonly maxAge: number | undefined;
  constructor(status: number, message: string, acrValues: string[] | undefined, maxAge: number | undefined) {
    super('step_up_required', status, message);
    this.name = 'StepUpRequiredError';
    this.acrValues = acrValues;
    this.maxAge = maxAge;
  }
}

/** Fired on `window` whenever a call finds the session gone; `useSession` listens for it. */
export const SESSION_ENDED_EVENT = 'gatehouse:session-ended';

const settings = { redirectToLoginOnSessionEnd: false };

/** `redirectToLoginOnSessionEnd`: send the user to login (coming back here) when a call finds the session gone. */
export function configure(options: Partial<typeof settings>): void {
  Object.assign(settings, options);
}

function currentLocation(): string {
  return window.location.pathname + window.location.search + window.location.hash;
}

/** fetch with `X-CSRF: 1` and same-origin credentials; Gatehouse's own errors throw GatehouseClientError. */
export async function bffFetch(input: string, init: RequestInit = {}): Promise<Response> {
  const headers = new Headers(init.headers);
  headers.set('X-CSRF', '1');
  const send = async () => {
    try {
      return await fetch(input, { ...init, headers, credentials: 'same-origin' });
    } catch (error) {
      throw new GatehouseClientError('network_error', 0, error instanceof Error ? error.message : 'Network error');
    }
  };
  let response = await send();
  // Sent with the cookie of a session that a sign-in in another tab replaced a moment ago: the
  // browser holds the new cookie by now, so one retry is made with it (when the body can be re-sent).
  if (response.headers.get('x-gatehouse-error') === 'session_replaced' && !(init.body instanceof ReadableStream)) {
    await response.body?.cancel();
    response = await send();
  }
  const code = response.headers.get('x-gatehouse-error');
  if (!code) return response;
  const body = (await response.json().catch(() => ({}))) as { message?: unknown; acr_values?: unknown; max_age?: unknown };
  const message = typeof body.message === 'string' ? body.message : code;
  if (code === 'step_up_required') {
    const acrValues = typeof body.acr_values === 'string' ? body.acr_values.split(' ').filter(Boolean) : [];
    const maxAge = typeof body.max_age === 'number' && Number.isSafeInteger(body.max_age) && body.max_age >= 0 ? body.max_age : undefined;
    throw new StepUpRequiredError(response.status, message, acrValues.length ? acrValues : undefined, maxAge);
  }
  if (code === 'session_expired' || code === 'unauthenticated') {
    if (typeof window !== 'undefined') {
      // The message says why (e.g. "You were signed out from another device."), for the page to show.
      window.dispatchEvent(new CustomEvent(SESSION_ENDED_EVENT, { detail: { code, message: typeof body.message === 'string' ? body.message : undefined } }));
      if (settings.redirectToLoginOnSessionEnd) login(currentLocation());
    }
  }
  throw new GatehouseClientError(code, response.status, message);
}

async function parseBody(response: Response): Promise<unknown> {
  if (response.status === 204 || response.status === 205) return null;
  const type = response.headers.get('content-type') ?? '';
  return type.includes('json') ? response.json() : response.text();
}

/**
 * Calls to one API named in BFF_APIS; resolves with the parsed body, rejects on any non-2xx. A path
 * that would leave the API once the browser resolves it (`../../auth/sessions`, `%2e%2e`, `\\`) is
 * refused with `invalid_path` before anything is sent: the browser resolves dot segments itself, so
 * a path built from a user's value could otherwise reach Gatehouse's own endpoints, or another API,
 * with the SPA's X-CSRF header.
 */
export function api(name: string) {
  const prefix = `/api/proxy/${encodeURIComponent(name)}/`;
  const call = async (method: string, path: string, body?: unknown): Promise<unknown> => {
    const target = prefix + path.replace(/^\/+/, '');
    checkStaysUnder(prefix, target);
    const init: RequestInit = { method };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { 'content-type': 'application/json' };
    }
    const response = await bffFetch(target, init);
    if (!response.ok) throw new GatehouseClientError(`upstream_${response.status}`, response.status, `The API answered ${response.status}.`, response);
    return parseBody(response);
  };
  return {
    get: (path: string) => call('GET', path),
    delete: (path: string) => call('DELETE', path),
    post: (path: string, body?: unknown) => call('POST', path, body),
    put: (path: string, body?: unknown) => call('PUT', path, body),
    patch: (path: string, body?: unknown) => call('PATCH', path, body),
  };
}

/** Refuses, before anything is sent, a target that the browser would resolve outside `prefix` on this origin. */
function checkStaysUnder(prefix: string, target: string): void {
  let resolved: URL | undefined;
  try {
    // Only a path from the root: a relative one resolves against the page's URL, not this one.
    if (target.startsWith('/')) resolved = new URL(target, 'http://gatehouse.invalid');
  } catch {
    // Not a URL at all: refused below.
  }
  if (resolved?.origin !== 'http://gatehouse.invalid' || !resolved.pathname.startsWith(prefix)) throw new GatehouseClientError('invalid_path', 400, 'The API path is not allowed.');
}

export async function getSession(): Promise<SessionInfo> {
  const response = await bffFetch('/api/auth/session');
  return (await response.json()) as SessionInfo;
}

export interface LoginOptions {
  /** Where Gatehouse brings the user back to (same origin only); the current page by default. */
  returnTo?: string;
  /** Step-up: ask the IdP for a sign-in with one of these ACRs (a StepUpRequiredError's `acrValues`). */
  acrValues?: string | readonly string[];
  /** Step-up: ask for a sign-in at most this many seconds old (a StepUpRequiredError's `maxAge`). */
  maxAge?: number;
}

/**
 * Top-level navigation to the IdP; Gatehouse brings the user back to `returnTo` (same origin only).
 * `login('/path')` is short for `login({ returnTo: '/path' })`.
 */
export function login(options: string | LoginOptions = {}): void {
  const { returnTo = currentLocation(), acrValues, maxAge } = typeof options === 'string' ? { returnTo: options } : options;
  let query = `returnTo=${encodeURIComponent(returnTo)}`;
  const acr = typeof acrValues === 'string' ? acrValues : acrValues?.join(' ');
  if (acr) query += `&acr_values=${encodeURIComponent(acr)}`;
  if (maxAge !== undefined) query += `&max_age=${encodeURIComponent(String(maxAge))}`;
  window.location.assign(`/api/auth/login?${query}`);
}

/** Ends the session in Gatehouse, then lets the IdP end its own session by navigation. */
export async function logout(): Promise<void> {
  const response = await bffFetch('/api/auth/logout', { method: 'POST' });
  const { redirectTo } = (await response.json()) as { redirectTo: string };
  window.location.assign(redirectTo);
}

export interface SessionEntry {
  handle: string;
  createdAt: number;
  lastUsedAt: number;
  expiresAt: number;
  device: string;
  current: boolean;
}

/** The signed-in user's sessions (devices), newest first. */
export async function listSessions(): Promise<SessionEntry[]> {
  const response = await bffFetch('/api/auth/sessions');
  return ((await response.json()) as { sessions: SessionEntry[] }).sessions;
}

/** Ends one of the user's sessions; ending the current one signs this browser out too. */
export async function endSession(handle: string): Promise<void> {
  await bffFetch(`/api/auth/sessions/${encodeURIComponent(handle)}`, { method: 'DELETE' });
}

/** "Sign out everywhere else": every session of this user except this browser's. Resolves to how many ended. */
export async function endOtherSessions(): Promise<number> {
  const response = await bffFetch('/api/auth/sessions', { method: 'DELETE' });
  return ((await response.json()) as { ended: number }).ended;
}

/**
 * Reads a server-sent event stream through the proxy. EventSource cannot send the X-CSRF header,
 * so this reads the response body as it arrives and hands over each event's data.
 */
export async function streamEvents(path: string, onData: (data: string) => void, signal?: AbortSignal): Promise<void> {
  checkStaysUnder('/api/proxy/', path);
  const response = await bffFetch(path, { headers: { accept: 'text/event-stream' }, signal });
  if (!response.ok || !response.body) throw new GatehouseClientError(`upstream_${response.status}`, response.status, `The API answered ${response.status}.`, response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += value;
    let boundary: number;
    while ((boundary = buffered.search(/\r?\n\r?\n/)) !== -1) {
      const block = buffered.slice(0, boundary);
      buffered = buffered.slice(boundary).replace(/^\r?\n\r?\n/, '');
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).replace(/^ /, ''))
        .join('\n');
      if (data) onData(data);
    }
  }
}
