// A bench-local variant of e2e/support/headless-login.ts `loginThroughRp`, on node:http instead of
// fetch. mod_auth_openidc answers 401 instead of redirecting to the IdP when a request does not
// look like a top-level navigation, and fetch always sends `Sec-Fetch-Mode: cors`; node:http sends
// only the headers given here (Sec-Fetch-Mode: navigate, like a browser following a link).
// Only the transport differs: cookie jars and form parsing are headless-login's own.
import http from 'node:http';
import { jarFor, parseForm, storeCookies, type CookieJars } from '../e2e/support/headless-login.ts';

type Jar = Map<string, string>;

interface Answer {
  status: number;
  location: string | undefined;
  setCookies: string[];
  body: string;
}

function request(url: URL, jar: Jar, form?: URLSearchParams): Promise<Answer> {
  const headers: Record<string, string> = {
    host: url.host,
    accept: 'text/html,application/xhtml+xml,*/*;q=0.8',
    'sec-fetch-mode': 'navigate',
    'sec-fetch-dest': 'document',
    'user-agent': 'gatehouse-bench-login',
  };
  if (jar.size) headers.cookie = [...jar].map(([name, value]) => `${name}=${value}`).join('; ');
  const payload = form?.toString();
  if (payload !== undefined) {
    headers['content-type'] = 'application/x-www-form-urlencoded';
    headers['content-length'] = String(Buffer.byteLength(payload));
  }
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: url.hostname === 'localhost' ? '127.0.0.1' : url.hostname, port: url.port, path: url.pathname + url.search, method: form ? 'POST' : 'GET', headers },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => (body += chunk));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, location: res.headers.location, setCookies: res.headers['set-cookie'] ?? [], body }));
      },
    );
    req.on('error', reject);
    req.setTimeout(15_000, () => req.destroy(new Error(`timeout: ${url.href}`)));
    req.end(payload);
  });
}

/**
 * Logs into a relying party from `startUrl` (its login URL or any protected URL) through the dev
 * IdP's login form, up to and including the RP's callback. Returns the RP's cookies as a header value.
 */
export async function benchLogin(startUrl: string, username: string): Promise<{ cookieHeader: string; cookies: Jar; loggedInAt: number }> {
  const start = new URL(startUrl);
  const jars: CookieJars = new Map();
  let url = start;
  let form: URLSearchParams | undefined;
  let leftRp = false;
  for (let step = 0; step < 25; step += 1) {
    const jar = jarFor(jars, url.origin);
    const res = await request(url, jar, form);
    form = undefined;
    storeCookies(jar, res.setCookies);
    if (url.origin !== start.origin) leftRp = true;
    if (res.status >= 300 && res.status < 400) {
      if (!res.location) throw new Error(`${res.status} without Location at ${url.href}`);
      const next = new URL(res.location, url);
      // Back at the RP after the IdP: this was the callback, the session cookie is set.
      if (leftRp && url.origin === start.origin) return done();
      url = next;
      continue;
    }
    if (leftRp && url.origin === start.origin) {
      if (res.status >= 400) throw new Error(`RP callback ${url.href} answered ${res.status}: ${res.body.slice(0, 300)}`);
      return done();
    }
    const page = res.status === 200 ? parseForm(res.body, url) : undefined;
    if (!page) throw new Error(`login flow stuck at ${url.href} (HTTP ${res.status}): ${res.body.slice(0, 300)}`);
    if ('login' in page.fields) {
      page.fields.login = username;
      page.fields.password = 'password';
    }
    url = page.action;
    form = new URLSearchParams(page.fields);
  }
  throw new Error(`login at ${startUrl} did not finish`);

  function done() {
    const cookies = jarFor(jars, start.origin);
    return { cookieHeader: [...cookies].map(([name, value]) => `${name}=${value}`).join('; '), cookies, loggedInAt: Date.now() };
  }
}
