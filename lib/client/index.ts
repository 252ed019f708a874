/**
 * The browser side of Gatehouse: same-origin calls with the anti-forgery header, Gatehouse's JSON
 * errors as typed errors. No tokens ever reach this code; the cookie does the work.
 */

export type SessionInfo =
  | { authenticated: false }
  | { authenticated: true; user: Record<string, unknown> & { sub: string }; expiresAt: number; logoutUrl: string };

export class GatehouseClientError extends Error {
  readonly code: string;
  readonly status: number;
  constructor(code: string, status: number, message: string) {
    super(message);
    this.name = 'GatehouseClientError';
    this.code = code;
    this.status = status;
  }
}

export const SESSION_ENDED_EVENT = 'gatehouse:session-ended';

/** fetch with `X-CSRF: 1` and same-origin credentials; throws GatehouseClientError for Gatehouse's errors. */
export async function bffFetch(input: string, init: RequestInit = {}): Promise<Response> {
  const headers = new Headers(init.headers);
  headers.set('X-CSRF', '1');
  const response = await fetch(input, { ...init, headers, credentials: 'same-origin' });
  if (response.ok) return response;
  const type = response.headers.get('content-type') ?? '';
  if (!type.includes('application/json')) return response;
  const body = (await response.clone().json().catch(() => null)) as { error?: unknown; message?: unknown } | null;
  if (!body || typeof body.error !== 'string') return response;
  if ((body.error === 'session_expired' || body.error === 'unauthenticated') && typeof window !== 'undefined') {
    window.dispatchEvent(new CustomEvent(SESSION_ENDED_EVENT, { detail: { code: body.error } }));
  }
  throw new GatehouseClientError(body.error, response.status, typeof body.message === 'string' ? body.message : body.error);
}

async function parse(response: Response): Promise<unknown> {
  const type = response.headers.get('content-type') ?? '';
  if (response.status === 204) return null;
  return type.includes('json') ? response.json() : response.text();
}

export function api(name: string) {
  const call = async (method: string, path: string, body?: unknown) => {
    const init: RequestInit = { method };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { 'content-type': 'application/json' };
    }
    const response = await bffFetch(`/api/proxy/${encodeURIComponent(name)}/${path.replace(/^\/+/, '')}`, init);
    if (!response.ok) throw new GatehouseClientError(`upstream_${response.status}`, response.status, `The API answered ${response.status}.`);
    return parse(response);
  };
  return {
    get: (path: string) => call('GET', path),
    delete: (path: string) => call('DELETE', path),
    post: (path: string, body?: unknown) => call('POST', path, body),
    put: (path: string, body?: unknown) => call('PUT', path, body),
    patch: (path: string, body?: unknown) => call('PATCH', path, body),
  };
}

export async function getSession(): Promise<SessionInfo> {
  const response = await bffFetch('/api/auth/session');
  return (await response.json()) as SessionInfo;
}

export function login(returnTo = window.location.pathname + window.location.search): void {
  window.location.assign(`/api/auth/login?returnTo=${encodeURIComponent(returnTo)}`);
}

/** Ends the session server-side, then lets the IdP end its own session by navigation. */
export async function logout(): Promise<void> {
  const response = await bffFetch('/api/auth/logout', { method: 'POST' });
  const { redirectTo } = (await response.json()) as { redirectTo: string };
  window.location.assign(redirectTo);
}
