import * as oauth from 'oauth4webapi';
import { errors, type GatehouseError } from './errors.ts';
import { log } from './log.ts';

/**
 * Step-up authentication (RFC 9470): what a stronger or fresher sign-in must bring, read from an
 * API's `WWW-Authenticate` challenge, from a login request's query, or from `BFF_APIS`. Everything
 * here ends up in a JSON answer, a redirect to the IdP or a login cookie, so every value is checked
 * against a narrow shape, never passed on as it came.
 */

export interface StepUp {
  /** Any one of these Authentication Context Class References will do. */
  acrValues?: string[];
  /** Seconds: the sign-in must be at most this old. */
  maxAge?: number;
}

/**
 * One ACR value: URI characters only (ACRs in use are URNs, URLs or short names such as `phr` or
 * `1`), so nothing that needs quoting in a header, escaping in HTML or a separator of any list.
 */
export const ACR_VALUE = /^[A-Za-z0-9._~:/?#[\]@!$&'()*+,;=%-]{1,128}$/;
/** Both bounds keep the login attempt's cookie, which records them, well under a browser's 4 KB. */
export const MAX_ACR_VALUES = 8;
export const MAX_ACR_VALUES_LENGTH = 256;
/** A sign-in older than ten years is no sign-in: a larger value is a mistake, not a policy. */
export const MAX_AGE_LIMIT_SEC = 10 * 365 * 24 * 3600;

/** A space-separated list of ACR values, or undefined when it is not one. */
export function parseAcrValues(text: string): string[] | undefined {
  if (text.length > MAX_ACR_VALUES_LENGTH) return undefined;
  const values = text.split(' ').filter(Boolean);
  if (values.length === 0 || values.length > MAX_ACR_VALUES || !values.every((value) => ACR_VALUE.test(value))) return undefined;
  return [...new Set(values)];
}

/** A `max_age` in seconds (a non-negative integer as digits only), or undefined when it is not one. */
export function parseMaxAge(text: string): number | undefined {
  if (!/^\d{1,10}$/.test(text)) return undefined;
  const seconds = Number(text);
  return seconds <= MAX_AGE_LIMIT_SEC ? seconds : undefined;
}

/** The RFC 9470 error code an API sends when the user's sign-in is not strong or fresh enough. */
const INSUFFICIENT_USER_AUTHENTICATION = 'insufficient_user_authentication';
/** Node's default limit for all request headers together: a challenge longer than that is no challenge. */
const MAX_CHALLENGE_LENGTH = 16 * 1024;
const PLACEHOLDER_RESOURCE = new URL('https://resource.invalid/');

/**
 * The challenges in a `WWW-Authenticate` value, parsed by oauth4webapi's RFC 9110 parser (quoted
 * strings with escapes, token68, several challenges in one value). oauth4webapi exports the parser
 * only through `protectedResourceRequest`, which runs it on the answer its fetch returns; the fetch
 * here answers with the header in hand, and nothing goes over the network. An empty list when the
 * value is not a challenge list the parser can read.
 */
export async function parseChallenges(header: string): Promise<oauth.WWWAuthenticateChallenge[]> {
  let answer: Response;
  try {
    answer = new Response(null, { status: 401, headers: { 'www-authenticate': header } });
  } catch {
    // A value the Fetch API refuses to carry (control characters): no challenge anyone could read.
    return [];
  }
  try {
    await oauth.protectedResourceRequest('placeholder', 'GET', PLACEHOLDER_RESOURCE, undefined, null, { [oauth.customFetch]: async () => answer });
    return [];
  } catch (error) {
    if (error instanceof oauth.WWWAuthenticateChallengeError) return error.cause;
    return [];
  }
}

export interface StepUpChallenge extends StepUp {
  /** Parameters the API sent in a shape Gatehouse does not pass on (logged by name, never by value). */
  dropped: Array<'acr_values' | 'max_age'>;
}

/** How Gatehouse presented the token: a `DPoP` API's challenges come in that scheme (RFC 9449 section 7.1). */
export type TokenScheme = 'bearer' | 'dpop';

/**
 * The challenges of an upstream's answer in the scheme Gatehouse presented its token with: those
 * are the ones that speak to it. `rawHeaders` as Node gives them; several `WWW-Authenticate`
 * fields count as one comma-joined list (RFC 9110 section 5.3).
 */
export async function tokenChallenges(rawHeaders: readonly string[], scheme: TokenScheme = 'bearer'): Promise<oauth.WWWAuthenticateChallenge[]> {
  return (await challengesOf(rawHeaders)).filter((challenge) => challenge.scheme === scheme);
}

async function challengesOf(rawHeaders: readonly string[]): Promise<oauth.WWWAuthenticateChallenge[]> {
  const values: string[] = [];
  for (let i = 0; i + 1 < rawHeaders.length; i += 2) if (rawHeaders[i]?.toLowerCase() === 'www-authenticate') values.push(rawHeaders[i + 1] as string);
  const header = values.join(', ');
  if (!header || header.length > MAX_CHALLENGE_LENGTH) return [];
  return parseChallenges(header);
}

/**
 * Whether an upstream's 401 refuses the token itself (a revoked one, clock skew): no challenge, or
 * one with no error or `invalid_token`. One that asks for something else (a step-up, a scope, a
 * DPoP proof or nonce) would refuse a new token of the same grant too, and a grant would be spent
 * for nothing.
 */
export async function refusesTheToken(rawHeaders: readonly string[], scheme: TokenScheme = 'bearer'): Promise<boolean> {
  return (await tokenChallenges(rawHeaders, scheme)).every(({ parameters }) => parameters.error === undefined || parameters.error === 'invalid_token');
}

/**
 * The step-up an upstream's 401 asks for (`error="insufficient_user_authentication"` in the scheme
 * the token went in; for a DPoP token, in the `Bearer` scheme too, as APIs that take both may say
 * it), or undefined when it asks for something else or nothing readable.
 */
export async function stepUpChallenge(rawHeaders: readonly string[], scheme: TokenScheme = 'bearer'): Promise<StepUpChallenge | undefined> {
  const asking = (await challengesOf(rawHeaders)).filter(({ parameters }) => parameters.error === INSUFFICIENT_USER_AUTHENTICATION);
  const challenge = asking.find((candidate) => candidate.scheme === scheme) ?? (scheme === 'dpop' ? asking.find((candidate) => candidate.scheme === 'bearer') : undefined);
  if (!challenge) return undefined;
  const result: StepUpChallenge = { dropped: [] };
  const { acr_values: acrText, max_age: maxAgeText } = challenge.parameters;
  if (acrText !== undefined) {
    const acrValues = parseAcrValues(acrText);
    if (acrValues) result.acrValues = acrValues;
    else result.dropped.push('acr_values');
  }
  if (maxAgeText !== undefined) {
    const maxAge = parseMaxAge(maxAgeText);
    if (maxAge !== undefined) result.maxAge = maxAge;
    else result.dropped.push('max_age');
  }
  return result;
}

/**
 * An upstream's answer that asks for a stronger or more recent sign-in, as the error the browser
 * hears (`step_up_required`, the session kept); undefined for any other answer. Only the checked
 * values are passed on, never the API's own wording (`error_description`).
 */
export async function stepUpRefusal(status: number, rawHeaders: readonly string[], scheme: TokenScheme, where: Record<string, unknown>): Promise<GatehouseError | undefined> {
  if (status !== 401) return undefined;
  const challenge = await stepUpChallenge(rawHeaders, scheme);
  if (!challenge) return undefined;
  log('info', 'proxy.step_up_required', { ...where, from: 'upstream', ...(challenge.dropped.length ? { dropped: challenge.dropped } : {}) });
  return errors.stepUpRequired(stepUpDetails(challenge));
}

/**
 * What a session's sign-in lacks for an API that declares `acr` and/or `maxAge` in BFF_APIS, as the
 * step-up to ask for; undefined when it has all. A sign-in whose ACR or time the IdP did not say
 * does not meet a requirement on it.
 */
export function missingAuthentication(requirement: StepUp, signIn: { acr?: string | undefined; authTime?: number | undefined }, nowSec = Math.floor(Date.now() / 1000)): StepUp | undefined {
  const { acrValues, maxAge } = requirement;
  const acrMet = !acrValues || (signIn.acr !== undefined && acrValues.includes(signIn.acr));
  const ageMet = maxAge === undefined || (signIn.authTime !== undefined && signIn.authTime + maxAge >= nowSec);
  if (acrMet && ageMet) return undefined;
  // Both are asked for even when one is met: a new sign-in that satisfies one must not lose the other.
  return { ...(acrValues ? { acrValues } : {}), ...(maxAge !== undefined ? { maxAge } : {}) };
}

/** The JSON members of a `step_up_required` answer (RFC 9470's parameter names). */
export function stepUpDetails(stepUp: StepUp): Record<string, string | number> {
  return { ...(stepUp.acrValues ? { acr_values: stepUp.acrValues.join(' ') } : {}), ...(stepUp.maxAge !== undefined ? { max_age: stepUp.maxAge } : {}) };
}

/** setTimeout's limit; a later deadline is re-armed when this much has passed. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * Runs `onTooOld` at the first instant missingAuthentication (which counts whole seconds) calls a
 * sign-in at `authTime` too old for `maxAge`: what bounds a WebSocket or a streamed answer that
 * began in time. Always from a timer, never synchronously. Returns the cancel.
 */
export function whenSignInTooOld(authTime: number, maxAge: number, onTooOld: () => void): () => void {
  const deadlineMs = (authTime + maxAge + 1) * 1000;
  const wait = () => Math.min(Math.max(deadlineMs - Date.now(), 0), MAX_TIMER_MS);
  let timer = setTimeout(function check() {
    if (Date.now() < deadlineMs) timer = setTimeout(check, wait()).unref();
    else onTooOld();
  }, wait()).unref();
  return () => clearTimeout(timer);
}
