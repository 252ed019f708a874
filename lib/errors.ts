/**
 * One error type for everything Gatehouse answers with. `code` is stable (the SPA branches on it),
 * `message` is safe to show, `cause` is for the log only and never leaves the server.
 */
export class GatehouseError extends Error {
  readonly code: string;
  readonly status: number;
  /** The browser's session cookie no longer leads anywhere and should be cleared with this answer. */
  readonly clearSession: boolean;
  /** Seconds, for a `Retry-After` header: passed on from an IdP that said when to come back. */
  readonly retryAfterSec: number | undefined;
  /** Further members of the JSON answer, for errors the SPA acts on with data (step-up's `acr_values`). */
  readonly details: Readonly<Record<string, string | number>> | undefined;

  constructor(
    code: string,
    status: number,
    message: string,
    options: { cause?: unknown; clearSession?: boolean; retryAfterSec?: number; details?: Record<string, string | number> } = {},
  ) {
    super(message, { cause: options.cause });
    this.name = 'GatehouseError';
    this.code = code;
    this.status = status;
    this.clearSession = options.clearSession ?? false;
    this.retryAfterSec = options.retryAfterSec;
    this.details = options.details;
  }
}

export const errors = {
  csrf: (message = 'This request must come from the application itself (X-CSRF: 1, same origin).') =>
    new GatehouseError('csrf_failed', 403, message),
  unauthenticated: (clearSession = false) =>
    new GatehouseError('unauthenticated', 401, 'Sign in to continue.', { clearSession }),
  /** A new login in this browser replaced the session a moment ago; the browser already has the new cookie. */
  sessionReplaced: () => new GatehouseError('session_replaced', 401, 'This session was replaced by a new sign-in. Retry the request.'),
  /** Same code as an expiry (the SPA does the same: offer login), with the reason in the message. */
  sessionEnded: (by: 'elsewhere' | 'idp' | 'expired') =>
    by === 'expired'
      ? errors.sessionExpired()
      : new GatehouseError('session_expired', 401, by === 'elsewhere' ? 'You were signed out from another device.' : 'You signed out at the identity provider.', { clearSession: true }),
  sessionExpired: (cause?: unknown) =>
    new GatehouseError('session_expired', 401, 'Your session has ended. Sign in again.', { cause, clearSession: true }),
  /** The session lives on, but this call needs a token it cannot get without a new sign-in. */
  reauthenticationRequired: () =>
    new GatehouseError('reauthentication_required', 403, 'This needs a fresh sign-in: the session cannot obtain the token it requires.'),
  /**
   * The IdP refused to exchange the session's token for this API's (RFC 8693): its policy, not the
   * session, is at fault, so the session stays and only calls to this API fail.
   */
  tokenExchangeRefused: (cause?: unknown) =>
    new GatehouseError('token_exchange_refused', 403, 'The identity provider refused a token for this API. Your session is unaffected.', { cause }),
  idpRefused: (cause?: unknown, retryAfterSec?: number) => new GatehouseError('idp_error', 502, 'The identity provider refused the request.', { cause, retryAfterSec }),
  idpUnavailable: (cause?: unknown, retryAfterSec?: number) =>
    new GatehouseError('idp_unavailable', 503, 'The identity provider is not reachable right now. Try again shortly.', { cause, retryAfterSec }),
  storeUnavailable: (cause?: unknown, retryAfterSec?: number) =>
    new GatehouseError('store_unavailable', 503, 'The session store is not reachable right now. Try again shortly.', { cause, retryAfterSec }),
  /**
   * The request's session is stored but this instance cannot open it (a newer release's record
   * during its rolling deploy, or one it cannot read while refreshing): other instances serve it, so
   * the browser retries rather than hearing that it is signed out.
   */
  sessionUnreadable: (cause?: unknown) =>
    new GatehouseError('store_unavailable', 503, 'This server cannot read your session right now. Try again shortly.', { cause, retryAfterSec: 5 }),
  /**
   * The API needs a stronger or more recent sign-in than the session's (RFC 9470). The session stays;
   * `details` says what the new sign-in must bring, under RFC 9470's names `acr_values` and `max_age`.
   */
  stepUpRequired: (details: Record<string, string | number>) =>
    new GatehouseError('step_up_required', 401, 'This needs a stronger or more recent sign-in. Sign in again to continue.', { details }),
  /** Login only: the IdP signed the user in, but not as strongly or as recently as this login asked. */
  stepUpFailed: (cause?: unknown) =>
    new GatehouseError('step_up_failed', 400, 'The identity provider did not confirm the stronger or more recent sign-in that was asked for.', { cause }),
  payloadTooLarge: (message = 'The request body is too large.') => new GatehouseError('payload_too_large', 413, message),
  internal: (cause?: unknown) => new GatehouseError('internal_error', 500, 'Something went wrong on our side.', { cause }),
};

export function asGatehouseError(error: unknown): GatehouseError {
  return error instanceof GatehouseError ? error : errors.internal(error);
}

/** The headers every rendering of an error carries besides its body. */
export function errorHeaders(error: GatehouseError): Array<[string, string]> {
  const headers: Array<[string, string]> = [['x-gatehouse-error', error.code]];
  if (error.retryAfterSec !== undefined) headers.push(['retry-after', String(error.retryAfterSec)]);
  return headers;
}

export function errorBody(error: GatehouseError): string {
  const body: Record<string, string | number> = { error: error.code, message: error.message };
  // Details come after the two members every error has, and can never replace them.
  for (const [name, value] of Object.entries(error.details ?? {})) if (!Object.hasOwn(body, name)) body[name] = value;
  return JSON.stringify(body);
}
