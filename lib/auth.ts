import { randomBytes, timingSafeEqual } from 'node:crypto';
import { ConfigError, getConfig } from './config.ts';
import { GatehouseError, asGatehouseError, errorBody, errorHeaders, errors } from './errors.ts';
import { beginDpopLogin, finishDpopLogin } from './dpop.ts';
import { NO_STORE, checkCsrf, jsonHeaders, readBodyUpTo, safeReturnTo, sameOriginRedirect } from './http.ts';
import { describeCause, log } from './log.ts';
import { LogoutTokenRejected } from './logout-token.ts';
import * as oidc from './oidc.ts';
import {
  endedSessionHeaders,
  clearTransactionCookieHeaders,
  createSession,
  decryptAtRest,
  destroySession,
  refreshTokenAtEnd,
  destroySessionsFor,
  encryptAtRest,
  endSessionBecause,
  getStore,
  listUserSessions,
  loadSession,
  readTransaction,
  replaceSession,
  replacesCookieHeader,
  sessionCookieHeader,
  sessionExpiresAt,
  sessionFromCookieHeader,
  sessionHandle,
  sessionIdFromCookieHeader,
  sessionIdToReplace,
  servedElsewhere,
  fromOneIdpSession,
  type SignIn,
  signOutCookieHeader,
  signOutHandleFromCookie,
  signedOutHeaders,
  shortDigest,
  storeCall,
  touchSession,
  transactionCookieHeader,
  transactionCookiesToDrop,
  userClaims,
  withoutSession,
  type LoginTransaction,
  type Session,
} from './session.ts';
import { MAX_ACR_VALUES, parseAcrValues, parseMaxAge, type StepUp } from './step-up.ts';
import { countLogin, countLogout, inSpan, noteOnSpan } from './telemetry.ts';

/**
 * The auth endpoints, as functions from a Web Request to a Web Response, so route handlers stay
 * one line and the same code could serve any runtime with fetch-style handlers.
 */

function jsonResponse(status: number, body: unknown, extraHeaders: HeadersInit = {}): Response {
  const headers = new Headers(jsonHeaders());
  for (const [name, value] of new Headers(extraHeaders)) headers.append(name, value);
  return new Response(JSON.stringify(body), { status, headers });
}

/** API failures as JSON; the cause goes to the log, never into the answer. */
function apiError(caught: unknown, event: string): Response {
  const error = configAware(caught);
  if (error.status >= 500) log('error', event, { code: error.code, ...describeCause(error.cause) });
  const headers = new Headers([...Object.entries(jsonHeaders()), ...errorHeaders(error)]);
  if (error.clearSession) for (const [name, value] of endedSessionHeaders()) headers.append(name, value);
  return new Response(errorBody(error), { status: error.status, headers });
}

function configAware(caught: unknown): GatehouseError {
  if (caught instanceof ConfigError) {
    log('error', 'config.invalid', { problems: caught.problems });
    return new GatehouseError('misconfigured', 500, 'Gatehouse is not configured correctly; the server log names the setting.');
  }
  if (caught instanceof oidc.IdpError) return oidc.idpErrorToGatehouse(caught);
  return asGatehouseError(caught);
}

const escapeHtml = (text: string) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

/**
 * Browser navigations get a readable page with a way forward, never JSON or a stack trace. Logged
 * as `event` (none: the caller logged it); `action` says what failed, signing in or out, and
 * `retryPath` is its "Try again".
 */
function errorPage(caught: unknown, event: string, { retryPath = '/api/auth/login', cookies = [], action = 'in' }: { retryPath?: string | undefined; cookies?: string[]; action?: 'in' | 'out' } = {}): Response {
  const error = configAware(caught);
  if (event) log(error.status >= 500 ? 'error' : 'warn', event, { code: error.code, ...describeCause(error.cause) });
  const html = `<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Sign-${action} problem</title><style>body{font:16px/1.5 system-ui,sans-serif;max-width:34rem;margin:4rem auto;padding:0 1rem;color:#1d2330}code{background:#eef1f6;padding:.1rem .3rem;border-radius:4px}a{color:#2454c7}</style></head>
<body><main><h1>We could not sign you ${action}</h1><p>${escapeHtml(error.message)}</p><p>Error code: <code>${escapeHtml(error.code)}</code></p>
<p><a href="${escapeHtml(retryPath)}">Try again</a> · <a href="/">Back to the application</a></p></main></body></html>`;
  const headers = new Headers({ 'content-type': 'text/html; charset=utf-8', ...NO_STORE, 'x-content-type-options': 'nosniff', 'content-security-policy': "default-src 'none'; style-src 'unsafe-inline'" });
  if (error.retryAfterSec !== undefined) headers.set('retry-after', String(error.retryAfterSec));
  for (const cookie of cookies) headers.append('set-cookie', cookie);
  const status = error.status >= 500 ? (error.status === 502 || error.status === 503 ? error.status : 500) : 400;
  return new Response(html, { status, headers });
}

/** A route handler for an API endpoint: JSON errors. */
export function apiRoute<Args extends unknown[]>(handler: (request: Request, ...args: Args) => Promise<Response>, event: string) {
  return async (request: Request, ...args: Args): Promise<Response> => {
    try {
      return await handler(request, ...args);
    } catch (error) {
      return apiError(error, event);
    }
  };
}

/** A route handler for a browser navigation: readable error pages with a way forward. */
export function pageRoute(handler: (request: Request) => Promise<Response>, event: string, page: { retryPath?: string; action?: 'in' | 'out' } = {}) {
  return async (request: Request): Promise<Response> => {
    try {
      return await handler(request);
    } catch (error) {
      return errorPage(error, event, page);
    }
  };
}

function redirect(location: string, cookies: string[] = [], extra: Array<[string, string]> = []): Response {
  const headers = new Headers([['location', location], ...Object.entries(NO_STORE), ...extra]);
  for (const cookie of cookies) headers.append('set-cookie', cookie);
  return new Response(null, { status: 302, headers });
}

function requireCsrf(request: Request): void {
  if (!checkCsrf((name) => request.headers.get(name), getConfig().appBaseUrl.origin).ok) throw errors.csrf();
}

// --- login -------------------------------------------------------------------------------------

/**
 * The step-up a login asks for: `acr_values` (space-separated ACRs) and `max_age` (seconds), each at
 * most once. A value that is not one is refused rather than dropped: a login without the step-up it
 * was meant to bring would only meet the API's refusal again.
 */
export function requestedStepUp(query: URLSearchParams): StepUp {
  const stepUp: StepUp = {};
  const acrValues = query.getAll('acr_values');
  if (acrValues.length) {
    const parsed = acrValues.length === 1 ? parseAcrValues(acrValues[0] as string) : undefined;
    if (!parsed) throw invalidLoginRequest(`acr_values must be one list of up to ${MAX_ACR_VALUES} ACR values separated by spaces`);
    stepUp.acrValues = parsed;
  }
  const maxAges = query.getAll('max_age');
  if (maxAges.length) {
    const parsed = maxAges.length === 1 ? parseMaxAge(maxAges[0] as string) : undefined;
    if (parsed === undefined) throw invalidLoginRequest('max_age must be one whole number of seconds');
    stepUp.maxAge = parsed;
  }
  return stepUp;
}

/**
 * What OIDC_AUTHORIZATION_PARAMS asks of every login is a floor (an operator's MFA, say): a login
 * link's own acr_values and max_age replace it in the request, so they may only narrow it, never
 * lower it — or anyone could start a sign-in without the second factor the operator requires.
 * Returns what the login asks for: the link's values, or else the floor's. The callback holds the
 * sign-in to that, as to any step-up: to an IdP, `acr_values` and `max_age` are wishes it may answer
 * with less, and a browser without PAR can strike them from the request on its way.
 */
export function withStepUpFloor(stepUp: StepUp, configured: Array<[string, string]>): StepUp {
  const values = (name: string) => configured.filter(([key]) => key === name).map(([, value]) => value);
  const floorAcrs = values('acr_values').flatMap((value) => value.split(' ').filter(Boolean));
  if (stepUp.acrValues && floorAcrs.length && !stepUp.acrValues.every((acr) => floorAcrs.includes(acr))) {
    throw invalidLoginRequest('acr_values may only name ACRs this server already asks every sign-in for');
  }
  const floorMaxAge = values('max_age').map(parseMaxAge).find((value) => value !== undefined);
  if (stepUp.maxAge !== undefined && floorMaxAge !== undefined && stepUp.maxAge > floorMaxAge) {
    throw invalidLoginRequest('max_age may not exceed what this server asks every sign-in for');
  }
  const acrValues = stepUp.acrValues ?? (floorAcrs.length ? floorAcrs : undefined);
  const maxAge = stepUp.maxAge ?? floorMaxAge;
  return { ...(acrValues ? { acrValues } : {}), ...(maxAge !== undefined ? { maxAge } : {}) };
}

/**
 * The error a silent login (`prompt=none`) hears at once when OIDC_AUTHORIZATION_PARAMS asks every
 * sign-in for an interaction: the link's `prompt` would replace the operator's, and the IdP would
 * sign the browser in without it. The names are OIDC Core's for a silent request that cannot be met.
 */
export function silentLoginRefusal(configured: Array<[string, string]>): string | undefined {
  const prompts = configured.filter(([key]) => key === 'prompt').flatMap(([, value]) => value.split(' ').filter(Boolean));
  if (!prompts.some((prompt) => prompt !== 'none')) return undefined;
  if (prompts.includes('login')) return 'login_required';
  if (prompts.includes('consent')) return 'consent_required';
  if (prompts.includes('select_account')) return 'account_selection_required';
  return 'interaction_required';
}

/** `prompt=login` in OIDC_AUTHORIZATION_PARAMS: every sign-in must be a new one, which the callback checks (lib/oidc.ts). */
function requiresFreshSignIn(configured: Array<[string, string]>): boolean {
  return configured.some(([key, value]) => key === 'prompt' && value.split(' ').includes('login'));
}

function invalidLoginRequest(problem: string): GatehouseError {
  return new GatehouseError('invalid_request', 400, `This sign-in link is not valid: ${problem}.`);
}

/** The login start that asks for the same step-up and returns to the same place: a failed step-up's "Try again". */
function loginPathFor(transaction: LoginTransaction): string {
  const query = new URLSearchParams({ returnTo: transaction.returnTo });
  if (transaction.acrValues) query.set('acr_values', transaction.acrValues.join(' '));
  if (transaction.maxAge !== undefined) query.set('max_age', String(transaction.maxAge));
  return `/api/auth/login?${query}`;
}

/** Login start, in a span of its own (its failures are answered by the page route around it). */
export function startLogin(request: Request): Promise<Response> {
  return inSpan('auth.login', {}, () => beginLogin(request));
}

async function beginLogin(request: Request): Promise<Response> {
  const url = new URL(request.url);
  const cookieHeader = request.headers.get('cookie');
  const returnTo = safeReturnTo(url.searchParams.get('returnTo'));
  const prompt = url.searchParams.get('prompt') === 'none' ? 'none' : undefined;
  const linkStepUp = requestedStepUp(url.searchParams);
  const { authorizationParams } = getConfig().oidc;
  const stepUp = withStepUpFloor(linkStepUp, authorizationParams);
  const refusedAs = notTheUserFollowingTheLink(request);
  if (refusedAs) {
    // Not a warning: every hover over a prefetched link would be one.
    log('info', 'auth.login_refused', { reason: refusedAs });
    return errorPage(invalidLoginRequest('only following the link signs in'), '', { retryPath: `${url.pathname}${url.search}` });
  }
  const site = request.headers.get('sec-fetch-site');
  if (prompt && site !== null && site !== 'same-origin' && site !== 'none') {
    // Started by another site's page, a silent login could be repeated at will: each one ends the
    // session it replaces, and one in another account's IdP session would swap the user.
    throw new GatehouseError('csrf_failed', 403, 'A silent sign-in must start from the application itself.');
  }
  const refusal = prompt && silentLoginRefusal(authorizationParams);
  if (refusal) {
    log('info', 'auth.silent_login', { outcome: refusal, from: 'config' });
    countLogin('silent_login_failed');
    return redirect(withAuthError(returnTo, refusal), await transactionCookiesToDrop(cookieHeader));
  }
  const authorization = oidc.newAuthorizationRequest({ prompt, ...stepUp });
  // With DPoP the session's key pair exists before the IdP sees the request: it is named there (dpop_jkt).
  if (getConfig().oidc.dpop) authorization.dpopJkt = await beginDpopLogin(authorization.state);
  const { url: location, pushed } = await oidc.buildAuthorizationUrl(authorization);
  const previousSessionId = (await sessionIdFromCookieHeader(cookieHeader)) ?? undefined;
  const transaction: LoginTransaction = {
    ...authorization,
    returnTo,
    startedAt: Date.now(),
    ...(previousSessionId ? { previousSessionId } : {}),
    ...(linkStepUp.acrValues || linkStepUp.maxAge !== undefined ? { stepUp: true as const } : {}),
    ...(requiresFreshSignIn(authorizationParams) ? { freshSignIn: pushed ? 'pushed' : 'sent' } : {}),
  };
  log('info', 'auth.login_started', { silent: Boolean(prompt), ...(linkStepUp.acrValues ? { acrValues: linkStepUp.acrValues.length } : {}), ...(linkStepUp.maxAge !== undefined ? { maxAge: linkStepUp.maxAge } : {}) });
  const attempt = await transactionCookieHeader(transaction);
  return redirect(location.href, [...(await transactionCookiesToDrop(cookieHeader, attempt)), attempt]);
}

function withAuthError(returnTo: string, code: string): string {
  const target = new URL(sameOriginRedirect(returnTo, getConfig().appBaseUrl));
  target.searchParams.set('authError', code);
  return target.href;
}

/** The callback: whatever its outcome, the attempt's transaction cookie goes. */
export async function finishLogin(request: Request): Promise<Response> {
  const state = new URL(request.url).searchParams.get('state');
  const clearTransaction = clearTransactionCookieHeaders(request.headers.get('cookie'), state);
  const retry = { path: '/api/auth/login' };
  try {
    return await inSpan('auth.callback', {}, () => completeLogin(request, clearTransaction, retry));
  } catch (error) {
    const failure = configAware(error);
    countLogin(failure.code);
    return errorPage(failure, 'auth.callback_failed', { retryPath: retry.path, cookies: clearTransaction });
  }
}

async function completeLogin(request: Request, clearTransaction: string[], retry: { path: string }): Promise<Response> {
  const url = new URL(request.url);
  const cookieHeader = request.headers.get('cookie');
  const transaction = await readTransaction(cookieHeader, url.searchParams.get('state'));
  if (!transaction) {
    // No matching login in progress: a forged, stale or replayed callback.
    throw new GatehouseError('invalid_state', 400, 'This sign-in link is not valid any more. Start again.');
  }
  if (transaction.acrValues || transaction.maxAge !== undefined) retry.path = loginPathFor(transaction);
  const dpop = transaction.dpopJkt ? await finishDpopLogin(transaction.state, transaction.dpopJkt) : undefined;
  const answer = await oidc.checkCallback(url, transaction.state);
  if (answer.kind === 'error' && transaction.prompt !== 'none') {
    // The IdP's code goes to the log (as the cause), cut short: anyone can put one in a callback URL.
    throw new GatehouseError(answer.error === 'access_denied' ? 'access_denied' : 'idp_error', 400, 'The identity provider did not sign you in.', { cause: new Error(`the IdP answered ${answer.error.slice(0, 64)}`) });
  }
  if (answer.kind === 'error') {
    // Silent login: tell the SPA instead of showing the IdP's UI.
    const code = /^[a-z_]{1,64}$/.test(answer.error) ? answer.error : 'login_required';
    log('info', 'auth.silent_login', { outcome: code });
    // The IdP's code is not a label: any value of its shape could arrive, each a time series.
    countLogin('silent_login_failed');
    noteOnSpan({ 'gatehouse.outcome': 'silent_login_failed' });
    return redirect(withAuthError(transaction.returnTo, code), clearTransaction);
  }
  const { tokens, claims } = await oidc.redeemAuthorizationCode(answer.params, transaction, dpop?.handle);
  if (transaction.stepUp) await refuseAnotherUsersStepUp(transaction.previousSessionId, cookieHeader, claims.sub, tokens.refreshToken);

  // Under SameSite=Strict only the login start saw the browser's session; with a same-site IdP or
  // SameSite=Lax the cookie arrives here too. Whichever the browser holds, the session this login
  // replaces ends now.
  const idpSid = typeof claims.sid === 'string' ? claims.sid : undefined;
  // And the session the last login to finish in this browser created, which a login started before
  // it finished cannot have seen (two tabs signing in one after the other).
  const replacedIds = new Set([transaction.previousSessionId, await sessionIdFromCookieHeader(cookieHeader), await sessionIdToReplace(cookieHeader)].filter((id): id is string => Boolean(id)));
  for (const id of replacedIds) await endReplacedSession(id, { sub: claims.sub, idpSid });

  const session = await createSession({
    sub: claims.sub,
    idpSid,
    secrets: { accessToken: tokens.accessToken, refreshToken: tokens.refreshToken, idToken: tokens.idToken, claims: userClaims(claims), ...(dpop ? { dpopKey: dpop.key } : {}) },
    accessTokenExpiresAt: tokens.accessTokenExpiresAt,
    userAgent: request.headers.get('user-agent') ?? undefined,
    acr: typeof claims.acr === 'string' ? claims.acr : undefined,
    authTime: claims.auth_time,
  });
  log('info', 'auth.login', {
    session: sessionHandle(session.id),
    refreshToken: Boolean(tokens.refreshToken),
    replaced: replacedIds.size > 0,
    ...(transaction.acrValues || transaction.maxAge !== undefined ? { stepUp: true } : {}),
  });
  countLogin('ok');
  noteOnSpan({ 'gatehouse.outcome': 'ok' });
  return redirect(sameOriginRedirect(transaction.returnTo, getConfig().appBaseUrl), [await sessionCookieHeader(session.id), await replacesCookieHeader(session.id), ...clearTransaction]);
}

/**
 * A step-up is the same user signing in more strongly: the SPA goes on with what it was doing (a
 * payment the API wanted a second factor for), so a sign-in as someone else must not replace the
 * session there. That one stays, and the other user's new grant is given back.
 */
async function refuseAnotherUsersStepUp(previousSessionId: string | undefined, cookieHeader: string | null, sub: string, refreshToken: string | undefined): Promise<void> {
  const giveBack = async () => (refreshToken ? oidc.revokeToken(refreshToken, 'refresh_token') : false);
  // A step-up link followed from another site reached the login without the Strict session cookie:
  // the session this sign-in replaces is then the one the callback's cookies name, if it lives.
  const candidates = previousSessionId ? [previousSessionId] : [await sessionIdFromCookieHeader(cookieHeader), await sessionIdToReplace(cookieHeader)];
  for (const id of candidates) {
    if (!id) continue;
    let previousSub: string | undefined;
    try {
      previousSub = (await loadSession(id)).session?.record.sub;
    } catch (error) {
      await giveBack();
      throw error;
    }
    if (previousSub === sub || (previousSub === undefined && !previousSessionId)) continue;
    // Ended meanwhile, or unreadable here: whose it was cannot be told, so it is not taken as this user's.
    const revoked = await giveBack();
    log('warn', 'auth.step_up_other_user', { session: sessionHandle(id), revoked, sessionFound: previousSub !== undefined });
    throw new GatehouseError(
      'step_up_failed',
      400,
      previousSub === undefined
        ? 'The session this sign-in was to strengthen has ended. Sign in again.'
        : 'You signed in as someone else than the user of this session, which is unchanged. Sign in again as that user, or sign out first to switch users.',
    );
  }
}

/**
 * A new login in the same browser: the old session stops authorising at once, and its refresh
 * token is revoked (RFC 7009) — unless it came from the same IdP session as the new login. IdPs
 * such as oidc-provider and Keycloak revoke the whole grant with a refresh token, and a silent
 * re-login within one IdP session continues that grant: revoking it would end the new login too.
 * The old token is then only dropped with the record.
 */
async function endReplacedSession(id: string, successor: SignIn): Promise<void> {
  const { session: previous, miss } = await loadSession(id);
  if (!previous) {
    // Ended a moment ago (its tokens ran out, a logout on another device): calls its tabs still have
    // in flight must hear "replaced", which leaves the cookie alone (by then the new session's),
    // not that end's word, which clears it by name. A record this instance cannot read is not ours to end.
    if (!servedElsewhere(miss) && miss !== 'replaced') await endSessionBecause(id, undefined, 'replaced');
    return;
  }
  const sameIdpSession = fromOneIdpSession(previous.record, successor);
  const refreshToken = await refreshTokenAtEnd(previous, await replaceSession(previous, sameIdpSession));
  const revoked = refreshToken && !sameIdpSession ? await oidc.revokeToken(refreshToken, 'refresh_token') : false;
  log('info', 'auth.session_replaced', { session: sessionHandle(id), revoked, sameIdpSession });
}

// --- session -----------------------------------------------------------------------------------

export async function describeSession(request: Request): Promise<Response> {
  requireCsrf(request);
  const found = await sessionFromCookieHeader(request.headers.get('cookie'));
  const { session, stale, endedBy } = found;
  if (found.newerRelease) throw withoutSession(found);
  if (!session) return jsonResponse(200, { authenticated: false, ...(endedBy ? { endedBy } : {}) }, stale ? endedSessionHeaders() : []);
  await touchSession(session, true);
  const { acr, authTime } = session.record;
  return jsonResponse(200, {
    authenticated: true,
    user: session.secrets.claims,
    expiresAt: Math.floor(sessionExpiresAt(session.record) / 1000),
    // How and when the user signed in (the id_token's acr and auth_time), so the SPA can tell whether a step-up is due.
    ...(acr !== undefined ? { acr } : {}),
    ...(authTime !== undefined ? { authTime } : {}),
    logoutUrl: `/api/auth/logout?sid=${encodeURIComponent(session.record.logoutToken)}`,
  });
}

// --- logout ------------------------------------------------------------------------------------

function constantTimeEqual(a: string, b: string): boolean {
  const left = Buffer.from(a);
  const right = Buffer.from(b);
  return left.length === right.length && timingSafeEqual(left, right);
}

/**
 * Ends the session here and at the IdP's token layer. Ended from another device, it leaves a marker
 * so its own browser hears why.
 */
async function endSession(session: Session, survivor?: SignIn): Promise<void> {
  // Ended from a session of the same IdP session, its refresh token is that session's grant too.
  // The others listed are mostly other devices': one that names no IdP session counts as another's,
  // and its token is revoked. One that names it, ended from a session that names none, is kept: the
  // IdP may have left `sid` out of the survivor's id_token only, and revoking a grant they share would
  // end the user's own session (the token kept is held by nobody once the record is gone).
  const sharedGrant = survivor !== undefined && session.record.idpSid !== undefined && fromOneIdpSession(session.record, survivor);
  const deleted = survivor ? await endSessionBecause(session.id, session.record, 'elsewhere', sharedGrant) : await destroySession(session.id, session.record);
  const refreshToken = await refreshTokenAtEnd(session, deleted);
  const revoked = refreshToken && !sharedGrant ? await oidc.revokeToken(refreshToken, 'refresh_token') : false;
  log('info', 'auth.logout', { session: sessionHandle(session.id), revoked, ...(sharedGrant ? { sharedGrant } : {}) });
  countLogout(survivor ? 'other_device' : 'user', 'ok');
}

/**
 * A session this instance cannot read (a newer release's record during a rolling deploy, tokens
 * under a key it does not hold), ended on its user's word: its record goes, so it ends everywhere;
 * its refresh token, unreadable here, cannot be given back to the IdP and runs out there.
 */
async function endUnreadSession(id: string, by: 'user' | 'other_device'): Promise<void> {
  if (by === 'user') await destroySession(id);
  else await endSessionBecause(id, undefined, 'elsewhere');
  log('warn', 'auth.logout', { session: sessionHandle(id), revoked: false, unread: true });
  countLogout(by, 'ok');
}

/** Where a browser goes once its session has ended: the IdP's logout (RP-initiated), else the app. */
async function afterSignOut(idToken: string | undefined): Promise<string> {
  return (await oidc.buildEndSessionUrl(idToken))?.href ?? '/';
}

/** How long the way to the IdP's logout that a POST logout answers with stays usable. */
const SIGN_OUT_CONTINUATION_TTL_MS = 5 * 60_000;

function signOutContinuationKey(handle: string): string {
  return `${getConfig().keyPrefix}logout-continue:{${shortDigest(handle)}}`;
}

/** Where a POST logout sends the browser on when the IdP's logout needs the id_token (see signOutContinuation). */
const SIGN_OUT_CONTINUATION_PATH = '/api/auth/logout?continue=1';

/**
 * A POST logout's way to the IdP. The IdP's logout URL carries the id_token (`id_token_hint`, so the
 * IdP signs the user out without asking), and a JSON answer is read by the page's scripts, which
 * never hold a token: the answer names a same-origin step instead, whose redirect a script cannot
 * read. The id_token waits for it in the store, encrypted, for one use, under a handle that only
 * the browser holds (an HttpOnly cookie on the logout path): a script could send the handle
 * anywhere, and the step would then hand the id_token to whoever asked.
 */
async function signOutContinuation(idToken: string | undefined): Promise<{ redirectTo: string; cookies: string[] }> {
  const destination = await afterSignOut(idToken);
  if (!idToken || destination === '/') return { redirectTo: destination, cookies: [] };
  const handle = randomBytes(32).toString('base64url');
  const sealed = await encryptAtRest(idToken);
  await storeCall(() => getStore().set(signOutContinuationKey(handle), sealed, { ttlMs: SIGN_OUT_CONTINUATION_TTL_MS }));
  return { redirectTo: SIGN_OUT_CONTINUATION_PATH, cookies: [signOutCookieHeader(handle, SIGN_OUT_CONTINUATION_TTL_MS / 1000)] };
}

/** The id_token a continuation holds, taken out of the store (it is used once), or undefined. */
async function takeSignOutContinuation(handle: string): Promise<string | undefined> {
  const key = signOutContinuationKey(handle);
  // Of two requests with one handle, only one takes it.
  const sealed = await storeCall(() => getStore().take(key));
  if (sealed === null) return undefined;
  const idToken = await decryptAtRest<unknown>(sealed);
  return typeof idToken === 'string' ? idToken : undefined;
}

/**
 * GET with the session's own `sid`: a top-level navigation that a cross-site link cannot forge. Or
 * a POST logout's `continue`: on to the IdP's logout, the session already ended, with the id_token
 * the browser's handle names. Without one (lost, used, expired, or another browser), the IdP still
 * hears of the logout, without the hint: it asks the user to confirm rather than keep a session
 * that the next "Sign in" on this device would reuse without a password.
 */
export async function logoutByNavigation(request: Request): Promise<Response> {
  const refusedAs = notTheUserFollowingTheLink(request);
  if (refusedAs) {
    // Every hover over a prefetched link would be a warning otherwise.
    log('info', 'auth.logout_refused', { reason: refusedAs });
    return errorPage(new GatehouseError('invalid_request', 400, 'Only following the link signs out.'), '', { retryPath: '/', action: 'out' });
  }
  const query = new URL(request.url).searchParams;
  if (query.has('continue')) {
    const handle = signOutHandleFromCookie(request.headers.get('cookie'));
    const idToken = handle && /^[\w-]{43}$/.test(handle) ? await takeSignOutContinuation(handle) : undefined;
    if (!idToken) log('info', 'auth.logout_continued', { idTokenHint: false, handle: handle ? 'unknown' : 'absent' });
    return redirect(await afterSignOut(idToken), handle === undefined ? [] : [signOutCookieHeader('', 0)]);
  }
  const sid = query.get('sid');
  if (!sid) throw new GatehouseError('invalid_request', 400, 'Sign out from the application page.');
  const found = await sessionFromCookieHeader(request.headers.get('cookie'), { latest: true });
  // A session this instance cannot read (whose `sid` it may not be able to check either): retry.
  if (found.unreadable) throw errors.sessionUnreadable();
  const { session } = found;
  // Without a matching session nothing changes, the cookie included: under SameSite=Strict a
  // cross-site link arrives without the cookie, and clearing it then would let any site sign users out.
  if (!session || !constantTimeEqual(sid, session.record.logoutToken)) {
    throw new GatehouseError('invalid_request', 400, 'Sign out from the application page.');
  }
  await endSession(session);
  return redirect(await afterSignOut(session.secrets.idToken), [], signedOutHeaders());
}

/**
 * Why a request for a sign-in or sign-out link is not the browser following it, when it is not: a
 * prefetch or prerender (Speculation Rules, `<link rel=prefetch>`, a browser's preview) on sight or
 * on hover; a script's fetch (Next's `<Link>` and router fetch a link's target with `RSC: 1`); an
 * `<img>`, `<script>` or `<iframe>` of a page, a sibling site's included. One would sign the user out
 * here while the IdP never hears of it (or use up a POST logout's continuation); another write a
 * sign-in attempt's cookie that pushes the user's own attempt out. Browsers mark their own
 * navigations `Sec-Fetch-Mode: navigate`, and a top-level one `Sec-Fetch-Dest: document`, or
 * `empty` when a service worker passes it on (`fetch(event.request)` keeps the mode, not the
 * destination). A client that names no destination is no browser, and no other site can make it send anything.
 */
function notTheUserFollowingTheLink(request: Request): 'prefetch' | 'not_a_navigation' | undefined {
  if (prefetched(request)) return 'prefetch';
  // Every browser that sends Fetch Metadata names the destination (Node's fetch sends only a mode).
  const dest = request.headers.get('sec-fetch-dest');
  if (dest === null) return undefined;
  const pageLoad = request.headers.get('sec-fetch-mode') === 'navigate' && (dest === 'document' || dest === 'empty');
  return pageLoad ? undefined : 'not_a_navigation';
}

/** A browser's prefetch or prerender, or Next's router prefetching a link. */
function prefetched(request: Request): boolean {
  const purpose = ['sec-purpose', 'purpose', 'x-purpose', 'x-moz'].map((name) => request.headers.get(name) ?? '').join(',');
  return /prefetch|prerender|preview/i.test(purpose) || request.headers.has('rsc') || request.headers.has('next-router-prefetch');
}

/** POST with X-CSRF for SPAs: ends the session and hands back where to navigate next (see signOutContinuation). */
export async function logoutByApi(request: Request): Promise<Response> {
  requireCsrf(request);
  // From the primary: a replica may not have the session yet, and the sign-out would leave it live.
  const found = await sessionFromCookieHeader(request.headers.get('cookie'), { latest: true });
  if (found.unreadable) {
    // Clearing a cookie this instance cannot open would leave its session live where it is read.
    const { sessionId } = found.unreadable;
    if (!sessionId) throw errors.sessionUnreadable();
    await endUnreadSession(sessionId, 'user');
    return jsonResponse(200, { redirectTo: await afterSignOut(undefined) }, signedOutHeaders());
  }
  const { session } = found;
  // The way on first: a store that fails it leaves the session, and the SPA's retry, intact.
  const { redirectTo, cookies } = session ? await signOutContinuation(session.secrets.idToken) : { redirectTo: '/', cookies: [] };
  if (session) await endSession(session);
  return jsonResponse(200, { redirectTo }, [...signedOutHeaders(), ...cookies.map((cookie): [string, string] => ['set-cookie', cookie])]);
}

// --- health ------------------------------------------------------------------------------------

/**
 * Health asks the IdP for its discovery document, and anyone may ask for health: one check at a
 * time per process, its answer reused for IDP_HEALTH_REUSE_MS, so a flood of anonymous health
 * requests cannot become one at the IdP (which might then rate-limit this server's logins and
 * refreshes). The store's PING stays live: it is this deployment's own.
 */
const IDP_HEALTH_REUSE_MS = 2_000;
let idpHealth: { checkedAt: number; state: Promise<string> } | undefined;

function idpHealthState(): Promise<string> {
  const now = Date.now();
  if (idpHealth && now - idpHealth.checkedAt < IDP_HEALTH_REUSE_MS) return idpHealth.state;
  // An IdP that answers but cannot take this server's logins (PAR required, no endpoint; an endpoint
  // in clear text) is not ready either.
  const state = oidc.checkDiscovery().then(
    (as) => (oidc.pushedAuthorizationProblem(as) || oidc.cleartextEndpointProblem(as) ? 'misconfigured' : 'ok'),
    () => 'unavailable',
  );
  idpHealth = { checkedAt: now, state };
  return state;
}

/**
 * `?probe=live`: the process answers (for a liveness probe, which restarts what fails it: an IdP or
 * store outage must not restart every instance). `?probe=ready`: the store answers too (for a
 * readiness probe: signed-in users' calls need only the store, so an IdP outage must not take every
 * instance out of the balancer). Without it, the IdP is asked as well (for monitoring).
 */
export async function checkHealth(request: Request): Promise<Response> {
  getConfig();
  const probe = new URL(request.url).searchParams.get('probe');
  if (probe === 'live') return jsonResponse(200, { status: 'ok' });
  const [store, idp] = await Promise.all([
    getStore().ping().then(
      () => 'ok',
      () => 'unavailable',
    ),
    probe === 'ready' ? undefined : idpHealthState(),
  ]);
  const failing = [store !== 'ok' && `store ${store}`, idp !== undefined && idp !== 'ok' && `idp ${idp}`].filter(Boolean).join(' and ');
  const checked = { store, ...(idp === undefined ? {} : { idp }) };
  return jsonResponse(failing ? 503 : 200, failing ? { error: 'unhealthy', message: `Not ready: ${failing}.`, ...checked } : { status: 'ok', ...checked });
}

// --- a user's sessions -------------------------------------------------------------------------

async function requireSession(request: Request): Promise<Session> {
  requireCsrf(request);
  const found = await sessionFromCookieHeader(request.headers.get('cookie'));
  if (!found.session) throw withoutSession(found);
  return found.session;
}

/** "Chrome on macOS"-style, from a user agent string: enough to recognise a device, nothing more. */
function describeDevice(userAgent: string | undefined): string {
  if (!userAgent) return 'Unknown device';
  const browser = /Edg\//.test(userAgent)
    ? 'Edge'
    : /Firefox\//.test(userAgent)
      ? 'Firefox'
      : /Chrome\/|Chromium\//.test(userAgent)
        ? 'Chrome'
        : /Safari\//.test(userAgent)
          ? 'Safari'
          : /curl\//.test(userAgent)
            ? 'curl'
            : 'Browser';
  const os = /Android/.test(userAgent)
    ? 'Android'
    : /iPhone|iPad/.test(userAgent)
      ? 'iOS'
      : /Mac OS X/.test(userAgent)
        ? 'macOS'
        : /Windows/.test(userAgent)
          ? 'Windows'
          : /Linux/.test(userAgent)
            ? 'Linux'
            : undefined;
  return os ? `${browser} on ${os}` : browser;
}

export async function listSessions(request: Request): Promise<Response> {
  const current = await requireSession(request);
  const { sessions } = await listUserSessions(current);
  return jsonResponse(200, {
    sessions: sessions.map((entry) => ({
      handle: entry.handle,
      createdAt: Math.floor(entry.createdAt / 1000),
      lastUsedAt: Math.floor(entry.lastUsedAt / 1000),
      expiresAt: Math.floor(entry.expiresAt / 1000),
      device: describeDevice(entry.userAgent),
      current: entry.current,
    })),
  });
}

/** Ends one of the user's own sessions by its handle (another user's handle is simply not found). */
export async function endSessionByHandle(request: Request, handle: string): Promise<Response> {
  const current = await requireSession(request);
  const { sessions, unreadableIds } = await listUserSessions(current);
  const target = sessions.find((entry) => entry.handle === handle) ?? unreadableIds.map((id) => ({ id, current: false })).find(({ id }) => sessionHandle(id) === handle);
  if (!target) throw new GatehouseError('not_found', 404, 'No such session.');
  if (target.current) await endSession(current);
  else await endListedSession(target.id, current);
  // Ending one's own session signs this browser out as a logout does: no cookie left that names a session.
  const signedOut = target.current ? signedOutHeaders() : [];
  return jsonResponse(200, { ended: 1 }, signedOut);
}

/** "Sign out everywhere else": every session of this user but the one making the request. */
export async function endOtherSessions(request: Request): Promise<Response> {
  const current = await requireSession(request);
  const { sessions, unreadableIds } = await listUserSessions(current);
  let ended = 0;
  for (const id of [...sessions.filter((entry) => !entry.current).map((entry) => entry.id), ...unreadableIds]) {
    if (await endListedSession(id, current)) ended++;
  }
  log('info', 'auth.sessions_ended', { session: sessionHandle(current.id), ended });
  return jsonResponse(200, { ended });
}

/**
 * Ends another session the user's list names, from `current`; whether there was one to end. Read
 * from the primary: a replica may not have a session created a moment ago, and "ended" would be
 * untrue. The list is the user's, but a record read now may not be (one rewritten in the store
 * meanwhile): only the user's own is ended.
 */
async function endListedSession(id: string, current: Session): Promise<boolean> {
  const loaded = await loadSession(id, { latest: true });
  if (loaded.session?.record.sub === current.record.sub) await endSession(loaded.session, current.record);
  else if (!loaded.session && servedElsewhere(loaded.miss)) await endUnreadSession(id, 'other_device');
  else return false;
  return true;
}

// --- back-channel logout -----------------------------------------------------------------------

/** A logout token is a few hundred bytes to a few KiB; anything near this is not one. */
const LOGOUT_BODY_MAX_BYTES = 64 * 1024;

function logoutTokenReplayKey(jti: string): string {
  return `${getConfig().keyPrefix}logout-jti:{${shortDigest(jti)}}`;
}

/** OIDC Back-Channel Logout: the IdP tells us a user signed out there; end the matching sessions. */
export async function backchannelLogout(request: Request): Promise<Response> {
  const headers = { ...NO_STORE };
  const refuse = (reason: string, cause?: unknown) => {
    log('warn', 'auth.backchannel_logout', { outcome: 'refused', reason, ...describeCause(cause) });
    countLogout('backchannel', 'refused');
    return jsonResponse(400, { error: 'invalid_request', message: 'The logout token is not valid.' }, headers);
  };
  // A media type is case-insensitive (RFC 9110 §8.3.1): an IdP that writes it in capitals must not lose its logouts.
  const type = (request.headers.get('content-type') ?? '').split(';', 1)[0]!.trim().toLowerCase();
  if (type !== 'application/x-www-form-urlencoded') return refuse('content_type');
  const form = new URLSearchParams(new TextDecoder().decode(await readBodyUpTo(request, LOGOUT_BODY_MAX_BYTES)));
  const tokens = form.getAll('logout_token');
  // Two tokens are ambiguous: which one the IdP meant is not ours to guess.
  if (tokens.length > 1) return refuse('several_tokens');
  const token = tokens[0];
  if (!token) return refuse('missing_token');
  let claims: oidc.LogoutTokenClaims;
  try {
    claims = await oidc.verifyLogoutToken(token);
  } catch (error) {
    if (error instanceof LogoutTokenRejected) return refuse('invalid_token', error);
    // The IdP's discovery document or key set out of reach: a 400 would tell the IdP to give up on
    // this logout, and the sessions would live on. A 503 it retries.
    log('warn', 'auth.backchannel_logout', { outcome: 'idp_unavailable', ...describeCause(error) });
    countLogout('backchannel', 'failed');
    throw errors.idpUnavailable(error);
  }
  // The token is used up only once its sessions have ended. Marking it first would let a store
  // blip lose the logout: a SET that timed out here may still land when Redis resumes, and the
  // IdP's retry of this very token would then be refused as a replay, the sessions left alive.
  // Two deliveries at once both end the same sessions, which is harmless.
  const replayKey = logoutTokenReplayKey(claims.jti);
  if ((await storeCall(() => getStore().get(replayKey))) !== null) return refuse('replayed_jti');
  const ended = await destroySessionsFor({ sub: claims.sub, idpSid: claims.sid }, claims.issuedAt * 1000);
  // NumericDates may carry fractions; a store TTL is whole milliseconds.
  const ttlMs = Math.max(1_000, Math.ceil(claims.replayableUntil * 1000 - Date.now()));
  await storeCall(() => getStore().set(replayKey, '1', { ttlMs }));
  log('info', 'auth.backchannel_logout', { outcome: 'ok', ended, by: claims.sid ? 'sid' : 'sub' });
  countLogout('backchannel', 'ok');
  return new Response(null, { status: 200, headers });
}
