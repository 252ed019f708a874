// Signs a user in through the dev IdP with plain fetch, no browser: shared by integration tests,
// end-to-end setup and benchmarks. It follows redirects by hand and fills whatever form the IdP shows
// (devInteractions login, and consent should it ever appear), keeping one cookie jar per origin like a browser.

/** Cookie name → value, per origin. Paths and expiry dates are ignored: every flow here is short-lived. */
export type CookieJars = Map<string, Map<string, string>>;

export interface FlowOptions {
  username: string;
  /** devInteractions accepts any non-empty password. */
  password?: string;
  jars?: CookieJars;
  maxSteps?: number;
  /**
   * More fields for the sign-in form, e.g. the dev IdP's second-factor `otp` (any 6 digits) or its
   * test-only `auth_age` (seconds the sign-in claims to be old).
   */
  fields?: Record<string, string>;
}

interface HtmlForm {
  action: URL;
  fields: Record<string, string>;
}

export function jarFor(jars: CookieJars, origin: string): Map<string, string> {
  let jar = jars.get(origin);
  if (!jar) jars.set(origin, (jar = new Map()));
  return jar;
}

export function storeCookies(jar: Map<string, string>, setCookies: string[]): void {
  for (const line of setCookies) {
    const [pair = '', ...attributes] = line.split(';');
    const eq = pair.indexOf('=');
    if (eq <= 0) continue;
    const name = pair.slice(0, eq).trim();
    const value = pair.slice(eq + 1).trim();
    const expired = attributes.some((attr) => {
      const [key = '', val = ''] = attr.split('=').map((part) => part.trim());
      if (/^max-age$/i.test(key)) return Number(val) <= 0;
      return /^expires$/i.test(key) && Date.parse(val) <= Date.now();
    });
    if (expired || value === '') jar.delete(name);
    else jar.set(name, value);
  }
}

/** One browser-like request: sends and records the origin's cookies, never follows redirects. */
export async function browserRequest(url: URL, jars: CookieJars, form?: URLSearchParams): Promise<Response> {
  const jar = jarFor(jars, url.origin);
  const headers = new Headers({ accept: 'text/html,application/xhtml+xml,*/*;q=0.8' });
  if (jar.size) headers.set('cookie', [...jar].map(([name, value]) => `${name}=${value}`).join('; '));
  if (form) headers.set('content-type', 'application/x-www-form-urlencoded');
  const res = await fetch(url, { method: form ? 'POST' : 'GET', body: form, headers, redirect: 'manual' });
  storeCookies(jar, res.headers.getSetCookie());
  return res;
}

function decodeEntities(text: string): string {
  return text.replace(/&(amp|lt|gt|quot|#39|#x27);/g, (_, entity: string) =>
    ({ amp: '&', lt: '<', gt: '>', quot: '"', '#39': "'", '#x27': "'" })[entity] ?? '',
  );
}

function attributes(tag: string): Record<string, string> {
  const found: Record<string, string> = {};
  for (const [, name = '', value = ''] of tag.matchAll(/([\w-]+)\s*=\s*"([^"]*)"/g)) {
    found[name.toLowerCase()] = decodeEntities(value);
  }
  return found;
}

export function parseForm(html: string, pageUrl: URL): HtmlForm | undefined {
  const formMatch = /<form\b[^>]*>([\s\S]*?)<\/form>/i.exec(html);
  if (!formMatch) return undefined;
  const formTag = /<form\b[^>]*>/i.exec(formMatch[0])?.[0] ?? '';
  const fields: Record<string, string> = {};
  for (const [input] of (formMatch[1] ?? '').matchAll(/<input\b[^>]*>/gi)) {
    const { name, value } = attributes(input);
    if (name) fields[name] = value ?? '';
  }
  return { action: new URL(attributes(formTag).action ?? pageUrl.href, pageUrl), fields };
}

/**
 * Drives a redirect/form flow from `startUrl` and returns the first redirect target for which
 * `stop` is true, without requesting it (so a caller can hand a code to its own client).
 */
export async function followFlow(
  startUrl: URL,
  stop: (next: URL) => boolean,
  { username, password = 'password', jars = new Map(), maxSteps = 20, fields = {} }: FlowOptions,
): Promise<URL> {
  let url = startUrl;
  let form: URLSearchParams | undefined;
  for (let step = 0; step < maxSteps; step += 1) {
    const res = await browserRequest(url, jars, form);
    form = undefined;
    if (res.status >= 300 && res.status < 400) {
      await res.body?.cancel();
      const location = res.headers.get('location');
      if (!location) throw new Error(`${res.status} without Location at ${url.href}`);
      const next = new URL(location, url);
      if (stop(next)) return next;
      url = next;
      continue;
    }
    const html = await res.text();
    const page = res.ok ? parseForm(html, url) : undefined;
    if (!page) throw new Error(`login flow stuck at ${url.href} (HTTP ${res.status}): ${html.slice(0, 300)}`);
    if ('login' in page.fields) {
      page.fields.login = username;
      page.fields.password = password;
      Object.assign(page.fields, fields);
    }
    url = page.action;
    form = new URLSearchParams(page.fields);
  }
  throw new Error(`login flow did not finish within ${maxSteps} steps (last: ${url.href})`);
}

/**
 * From an authorization request URL on the IdP to the redirect back to the client (with code, state
 * and iss). Pass `cookieJar` again to reuse the IdP session (silent SSO).
 */
export async function loginWithDevIdp({
  authorizationUrl,
  username,
  password,
  cookieJar,
}: {
  authorizationUrl: string | URL;
  username: string;
  password?: string;
  cookieJar?: Map<string, string>;
}): Promise<URL> {
  const start = new URL(authorizationUrl);
  const jars: CookieJars = new Map(cookieJar ? [[start.origin, cookieJar]] : []);
  return followFlow(start, (next) => next.origin !== start.origin, { username, password, jars });
}

/**
 * Logs into a relying party: starts at its login URL (e.g. http://localhost:3000/api/auth/login), goes
 * through the IdP and requests the RP's callback, which sets the session cookie. `finalUrl` is where the
 * callback sends the browser next (not requested) or the callback URL when it does not redirect.
 */
export async function loginThroughRp({
  startUrl,
  username,
  password,
  jars = new Map(),
  fields,
}: {
  startUrl: string | URL;
  username: string;
  password?: string;
  jars?: CookieJars;
  fields?: Record<string, string>;
}): Promise<{ rpCookies: Map<string, string>; finalUrl: string; callbackStatus: number; jars: CookieJars }> {
  const start = new URL(startUrl);
  let leftRp = false;
  const callback = await followFlow(
    start,
    (next) => {
      if (next.origin !== start.origin) leftRp = true;
      return leftRp && next.origin === start.origin;
    },
    { username, password, jars, ...(fields ? { fields } : {}) },
  );
  const res = await browserRequest(callback, jars);
  await res.body?.cancel();
  const location = res.status >= 300 && res.status < 400 ? res.headers.get('location') : null;
  if (!location && !res.ok) throw new Error(`RP callback ${callback.href} answered ${res.status}`);
  return {
    rpCookies: jarFor(jars, start.origin),
    finalUrl: location ? new URL(location, callback).href : callback.href,
    callbackStatus: res.status,
    jars,
  };
}

/**
 * Confirms the IdP's RP-initiated logout page ("Yes, sign me out") headlessly. `endSessionUrl` is the
 * end_session_endpoint request the RP redirected to; `jars` must hold the IdP session (e.g. from
 * loginThroughRp). Resolves to the IdP's final redirect, normally the post_logout_redirect_uri.
 */
export async function confirmDevIdpLogout({ endSessionUrl, jars }: { endSessionUrl: string | URL; jars: CookieJars }): Promise<URL> {
  const start = new URL(endSessionUrl);
  const page = await browserRequest(start, jars);
  const html = await page.text();
  const form = page.ok ? parseForm(html, start) : undefined;
  if (!form) throw new Error(`no logout confirmation at ${start.href} (HTTP ${page.status}): ${html.slice(0, 300)}`);
  // The "Yes" button carries logout=yes; the form itself only holds the xsrf token.
  let res = await browserRequest(form.action, jars, new URLSearchParams({ ...form.fields, logout: 'yes' }));
  let url = form.action;
  while (res.status >= 300 && res.status < 400) {
    await res.body?.cancel();
    const next = new URL(res.headers.get('location') ?? '', url);
    if (next.origin !== start.origin) return next;
    url = next;
    res = await browserRequest(url, jars);
  }
  await res.body?.cancel();
  return url;
}
