// A bench-local variant of e2e/support/headless-login.ts `loginThroughRp`, on node:http instead of
// fetch. mod_auth_openidc answers 401 instead of redirecting to the IdP when a request does not
// look like a top-level navigation, and fetch always sends `Sec-Fetch-Mode: cors`; node:http sends
// only the headers given here (Sec-Fetch-Mode: navigate, like a browser following a link).
import http from 'node:http';

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

function store(jar: Jar, setCookies: string[]): void {
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

function decode(text: string): string {
  return text.replace(/&(amp|lt|gt|quot|#39|#x27);/g, (_, e: string) => ({ amp: '&', lt: '<', gt: '>', quot: '"', '#39': "'", '#x27': "'" })[e] ?? '');
}

function attributes(tag: string): Record<string, string> {
  const found: Record<string, string> = {};
  for (const [, name = '', value = ''] of tag.matchAll(/([\w-]+)\s*=\s*"([^"]*)"/g)) found[name.toLowerCase()] = decode(value);
  return found;
}

function parseForm(html: string, pageUrl: URL): { action: URL; fields: Record<string, string> } | undefined {
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
 * Logs into a relying party from `startUrl` (its login URL or any protected URL) through the dev
 * IdP's login form, up to and including the RP's callback. Returns the RP's cookies as a header value.
 */
export async function benchLogin(startUrl: string, username: string): Promise<{ cookieHeader: string; cookies: Jar; loggedInAt: number }> {
  const start = new URL(startUrl);
  const jars = new Map<string, Jar>();
  const jarFor = (origin: string) => {
    let jar = jars.get(origin);
    if (!jar) jars.set(origin, (jar = new Map()));
    return jar;
  };
  let url = start;
  let form: URLSearchParams | undefined;
  let leftRp = false;
  for (let step = 0; step < 25; step += 1) {
    const jar = jarFor(url.origin);
    const res = await request(url, jar, form);
    form = undefined;
    store(jar, res.setCookies);
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
    const cookies = jarFor(start.origin);
    return { cookieHeader: [...cookies].map(([name, value]) => `${name}=${value}`).join('; '), cookies, loggedInAt: Date.now() };
  }
}
