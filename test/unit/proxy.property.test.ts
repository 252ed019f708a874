// Property tests for the proxy's two pure gates: the upstream URL it builds and the headers it lets
// through. The examples in proxy.test.ts pin known payloads; these generate the payloads nobody
// listed, from the pieces path and header attacks are made of.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { ApiConfig } from '../../lib/config.ts';
import { GatehouseError } from '../../lib/errors.ts';
import { filterRequestHeaders, filterResponseHeaders, resolveUpstream } from '../../lib/proxy.ts';
import { parseChallenges } from '../../lib/step-up.ts';

const RUNS = 3000;

const api = (name: string, url: string): ApiConfig => ({ name, url: new URL(url), auth: 'user', scope: undefined, resource: undefined, tokenExchange: undefined, timeoutMs: 1000, maxBodyBytes: 1000 });
const apis = {
  todos: api('todos', 'https://api.example.com/v1'),
  slashed: api('slashed', 'https://api.example.com/v2/base/'),
  root: api('root', 'http://127.0.0.1:8080'),
};

// ---------------------------------------------------------------------------------------------
// resolveUpstream

/** What paths are made of when someone tries to leave a base path, in every encoding we know of. */
const PATH_PIECES = [
  '/', '//', '.', '..', ';', '..;', '.;', '%', '%2e', '%2E', '%2f', '%2F', '%5c', '%5C', '%3b', '%3B', '%25', '%252e', '%253b',
  '%3f', '%3F', '%23', '%253f', '%2523', '？', '＃',
  '\\', '@', ':', 'http:', '%40', '%00', '%0a', '?', '#', '=', '~', ' ', 'a', 'b', 'x', 'é', 'todos', 'v1',
];
const pathPiece = fc.oneof({ weight: 6, arbitrary: fc.constantFrom(...PATH_PIECES) }, { weight: 1, arbitrary: fc.string({ maxLength: 3 }) });
const proxyPath = fc
  .tuple(fc.constantFrom('/api/proxy/todos/', '/api/proxy/slashed/', '/api/proxy/root/', '/api/proxy/todos', '/api/proxy/', '/api/proxy/nope/', '/api/prox/'), fc.array(pathPiece, { maxLength: 12 }))
  .map(([prefix, pieces]) => prefix + pieces.join(''));

/** Decodes like a lenient server: as far as it can, leaving what does not decode. */
function decodeLeniently(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

/** `.` or `..`, bare or with `;params` (how Tomcat and Spring see `..;x`). */
const isDotSegment = (segment: string) => /^\.\.?(?:;.*)?$/.test(segment);

/** Every `%XX` of an ASCII character decoded, the rest left as it is: what a lenient server makes of a whole target. */
const decodeAsciiEscapes = (text: string) => text.replace(/%([0-7][0-9a-f])/gi, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)));

/** The segments an upstream that decodes the whole target before splitting off its query resolves: those before the first `?` or `#`. */
const segmentsBeforeQuery = (path: string) => (path.split(/[?#]/, 1)[0] ?? '').split(/[/\\]/);

describe('resolveUpstream (generated paths)', () => {
  it('refuses with invalid_path or unknown_api only, and whatever it returns stays under the API’s origin and base path with no dot segment in any decoding', () => {
    fc.assert(
      fc.property(proxyPath, (rawUrl) => {
        let result: ReturnType<typeof resolveUpstream>;
        try {
          result = resolveUpstream(rawUrl, apis);
        } catch (error) {
          expect(error).toBeInstanceOf(GatehouseError);
          expect(['invalid_path', 'unknown_api']).toContain((error as GatehouseError).code);
          return;
        }
        const { api: chosen, url } = result;
        const basePath = chosen.url.pathname.endsWith('/') ? chosen.url.pathname : `${chosen.url.pathname}/`;
        expect(url.origin).toBe(chosen.url.origin);
        expect(url.pathname.startsWith(basePath)).toBe(true);
        for (const segment of url.pathname.slice(basePath.length).split('/')) {
          const once = decodeLeniently(segment);
          for (const layer of [segment, once, decodeLeniently(once)]) {
            expect(isDotSegment(layer), `segment ${JSON.stringify(segment)} of ${url.pathname} from ${JSON.stringify(rawUrl)}`).toBe(false);
            expect(/[/\\]/.test(layer), `separator in ${JSON.stringify(segment)} from ${JSON.stringify(rawUrl)}`).toBe(false);
          }
        }
        const relative = url.pathname.slice(basePath.length);
        const once = decodeAsciiEscapes(relative);
        for (const layer of [relative, once, decodeAsciiEscapes(once)]) {
          for (const segment of segmentsBeforeQuery(layer)) expect(isDotSegment(segment), `${JSON.stringify(segment)} of ${JSON.stringify(layer)} from ${JSON.stringify(rawUrl)}`).toBe(false);
        }
      }),
      { numRuns: RUNS },
    );
  });

  it('refuses every `..;` / `.;` segment, and `..` or `.` before an encoded `?` or `#`, however it is encoded', () => {
    const encodings = {
      // The last: `．` encoded twice, a dot to an upstream that decodes again and normalises Unicode.
      dot: ['.', '%2e', '%2E', '%25EF%25BC%258E'],
      // `?` itself would start the query: `..` is then the last segment, refused as such.
      semicolon: [';', '%3b', '%3B', '%253b', '%3f', '%3F', '%253f', '#', '%23', '%2523', '；', '？', '＃', '%25EF%25BC%259F', '%25EF%25BC%2583'],
    };
    const dotSegment = fc.tuple(
      fc.constantFrom(1, 2),
      fc.constantFrom(...encodings.dot),
      fc.constantFrom(...encodings.dot),
      fc.constantFrom(...encodings.semicolon),
      fc.stringMatching(/^[a-z0-9=]{0,6}$/),
    ).map(([dots, first, second, semicolon, param]) => (dots === 1 ? first : first + second) + semicolon + param);
    fc.assert(
      fc.property(fc.array(fc.constantFrom('a', 'items', '7'), { maxLength: 3 }), dotSegment, fc.array(fc.constantFrom('a', 'admin'), { maxLength: 3 }), (before, dot, after) => {
        const rawUrl = `/api/proxy/todos/${[...before, dot, ...after].join('/')}`;
        expect(() => resolveUpstream(rawUrl, apis)).toThrow(expect.objectContaining({ code: 'invalid_path', status: 400 }));
      }),
      { numRuns: RUNS },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// Header filtering. The lists here are the specification, written out independently of lib/proxy.ts,
// so that dropping an entry there fails here.

const HOP_BY_HOP = ['connection', 'keep-alive', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'proxy-connection', 'http2-settings'];
const REQUEST_DENIED = [
  'host', 'cookie', 'authorization', 'dpop', 'x-csrf', 'content-length', 'forwarded', 'x-request-id', 'expect', 'proxy',
  'x-real-ip', 'true-client-ip', 'x-client-ip', 'cf-connecting-ip', 'x-cluster-client-ip', 'fastly-client-ip',
  'client-ip', 'x-originating-ip', 'x-original-forwarded-for', 'x-true-client-ip', 'wl-proxy-client-ip', 'x-proxyuser-ip',
  'x-original-url', 'x-rewrite-url', 'x-original-uri',
  'x-original-host', 'x-host', 'x-http-host-override',
  'remote-user', 'x-userinfo', 'x-client-dn',
];
const RESPONSE_DENIED = [
  'x-content-type-options', 'x-frame-options', 'referrer-policy', 'set-cookie', 'set-cookie2', 'x-request-id', 'clear-site-data', 'strict-transport-security', 'alt-svc', 'nel', 'report-to',
  'reporting-endpoints', 'service-worker-allowed', 'set-login', 'x-accel-redirect', 'x-sendfile', 'x-lighttpd-send-file',
];
const REQUEST_DENIED_PREFIXES = [
  'x-forwarded-', 'proxy-', 'x-amzn-oidc-', 'x-amzn-mtls-', 'x-ms-client-principal', 'x-ms-token-', 'x-goog-authenticated-user-', 'x-goog-iap-', 'cf-access-',
  'x-auth-request-', 'x-pomerium-', 'x-consumer-', 'tailscale-', 'x-webauth-', 'x-remote-', 'x-envoy-',
  'x-authenticated-', 'x-credential-', 'oidc-claim-', 'oidc-access-token', 'x-id-token', 'x-access-token',
  'x-ssl-', 'ssl-client-', 'x-client-cert', 'x-client-verify', 'x-arr-clientcert',
  'x-vercel-', 'x-now-', 'x-nf-', 'fly-', 'teleport-jwt-assertion',
  'cf-connecting-ip', 'cloudfront-viewer-', 'x-azure-', 'x-appengine-', 'remote-', 'x-authentik-', 'x-vouch-',
];
const RESPONSE_DENIED_PREFIXES = ['x-gatehouse-', 'proxy-'];
/** Names no list mentions, some of them close to listed ones. */
const ORDINARY = ['accept', 'content-type', 'etag', 'cache-control', 'x-accel-buffering', 'x-forwarded', 'x-gatehouse', 'cookies', 'x-requestid', 'tee', 'www-authenticate', 'vary', 'x-envoy', 'x-client', 'x-remote', 'remote', 'x-user-agent-hint', 'cf-ray', 'x-ssl', 'x-consumer', 'tailscale', 'x-authenticated', 'oidc', 'x-id', 'x-access', 'x-vercel', 'fly', 'x-nf', 'teleport'];

const token = fc.stringMatching(/^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}$/);
function headerName(listed: string[], prefixes: string[]): fc.Arbitrary<string> {
  const base = fc.oneof(
    fc.constantFrom(...listed, ...HOP_BY_HOP, ...ORDINARY),
    fc.tuple(fc.constantFrom(...prefixes), token).map(([prefix, rest]) => prefix + rest),
    token,
  );
  // Header names are case-insensitive: every letter may arrive in either case, and CGI-style
  // servers read `_` as `-`, so any dash may arrive as an underscore.
  return fc.tuple(base, fc.array(fc.boolean(), { minLength: 32, maxLength: 32 }), fc.array(fc.boolean(), { minLength: 32, maxLength: 32 })).map(([name, upper, underscore]) =>
    [...name].map((char, i) => (char === '-' && underscore[i % 32] ? '_' : upper[i % 32] ? char.toUpperCase() : char.toLowerCase())).join(''),
  );
}
const headerValue = fc.stringMatching(/^[\x20-\x7e]{0,20}$/);

/** Headers plus one or more Connection headers that list some of their names (and others). */
function headerSet(listed: string[], prefixes: string[]) {
  const name = headerName(listed, prefixes);
  return fc
    .tuple(fc.array(fc.tuple(name, headerValue), { maxLength: 20 }), fc.array(fc.array(name, { maxLength: 4 }), { minLength: 1, maxLength: 2 }), fc.constantFrom(',', ', ', ' ,  '))
    .chain(([headers, connectionLists, separator]) => {
      const connections = connectionLists.map((names): [string, string] => ['Connection', names.join(separator)]);
      return fc.shuffledSubarray([...headers, ...connections], { minLength: headers.length + connections.length }).map((all) => ({ all }));
    });
}

function expectedSurvivors(all: Array<[string, string]>, denied: string[], prefixes: string[], underscoreIsDash = false, answer = false): Array<[string, string]> {
  // Every Connection header counts, also one the name generator happened to spell (CI once drew
  // `connection: 5`, which rightly removed a header named `5`).
  const connections = all.filter(([name]) => name.toLowerCase() === 'connection');
  const listed = new Set(connections.flatMap(([, value]) => value.split(',').map((name) => name.trim().toLowerCase())));
  // An answer's cache rules are whole or gone: one of Vary and Cache-Control listed takes the
  // other, and the answer then says no-store (last).
  const cacheRulesListed = answer && (listed.has('vary') || listed.has('cache-control'));
  if (cacheRulesListed) listed.add('vary').add('cache-control');
  const survivors = all
    .map(([name, value]): [string, string] => [name.toLowerCase(), value])
    .filter(([name]) => {
      const spellings = underscoreIsDash ? [name, name.replaceAll('_', '-')] : [name];
      return spellings.every((spelled) => !HOP_BY_HOP.includes(spelled) && !denied.includes(spelled) && !listed.has(spelled) && !prefixes.some((prefix) => spelled.startsWith(prefix)));
    });
  return cacheRulesListed ? [...survivors, ['cache-control', 'no-store']] : survivors;
}

describe('header filtering (generated headers)', () => {
  it('on the way up: nothing denied or hop-by-hop survives, nothing else is dropped, order and values kept', () => {
    fc.assert(
      fc.property(headerSet(REQUEST_DENIED, REQUEST_DENIED_PREFIXES), ({ all }) => {
        // Node joins repeated Connection headers into one value; so do both adapters.
        const connection = all.filter(([name]) => name.toLowerCase() === 'connection').map(([, value]) => value).join(', ');
        expect(filterRequestHeaders(all, connection)).toEqual(expectedSurvivors(all, REQUEST_DENIED, REQUEST_DENIED_PREFIXES, true));
      }),
      { numRuns: RUNS },
    );
  });

  it('on the way down: nothing denied or hop-by-hop survives, nothing else is dropped, order and values kept', async () => {
    await fc.assert(
      fc.asyncProperty(headerSet(RESPONSE_DENIED, RESPONSE_DENIED_PREFIXES), async ({ all }) => {
        expect(await filterResponseHeaders(all.flat())).toEqual(expectedSurvivors(all, RESPONSE_DENIED, RESPONSE_DENIED_PREFIXES, false, true));
      }),
      { numRuns: RUNS },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// WWW-Authenticate: a 401 that reaches a fetch with a Basic, Digest, Negotiate or NTLM challenge
// makes the browser ask for a password on the app's origin. Lists of challenges are generated
// with the parts that make them hard to split: commas and quotes inside quoted values, escapes,
// token68 and scheme names where no scheme is.

/** What a browser reads as the scheme of a field: its first token (Chromium's tokenizer does so). */
const firstToken = (value: string) => /^[\s,]*([!#$%&'*+.^_`|~0-9A-Za-z-]+)/.exec(value)?.[1]?.toLowerCase();
const PROMPTING = ['basic', 'digest', 'negotiate', 'ntlm'];
const anyCase = (text: string) =>
  fc.array(fc.boolean(), { minLength: text.length, maxLength: text.length }).map((upper) => [...text].map((char, i) => (upper[i] ? char.toUpperCase() : char.toLowerCase())).join(''));
// Scheme names of the characters every scheme in use has: oauth4webapi finds where the next
// challenge begins by them (a scheme such as `|a`, a valid token, would make the list unreadable).
const schemeName = fc.oneof(fc.constantFrom('Basic', 'Digest', 'Negotiate', 'NTLM', 'Bearer', 'DPoP', 'Custom-Scheme', 'Basic2', 'XBasic'), fc.stringMatching(/^[A-Za-z][A-Za-z0-9._~+-]{0,11}$/)).chain(anyCase);
const quotedText = fc.array(fc.constantFrom(',', ', ', '"', '\\', '=', ' ', 'a', 'realm', 'Basic', 'NTLM', ', Basic realm="x"', 'é'), { maxLength: 8 }).map((pieces) => pieces.join(''));
const quote = (text: string) => `"${text.replace(/["\\]/g, '\\$&')}"`;
const parameter = fc.tuple(fc.stringMatching(/^[a-z][a-z0-9_-]{0,8}$/), fc.oneof(quotedText.map(quote), token));
const challenge = fc.tuple(
  schemeName,
  fc.oneof(
    fc.tuple(fc.array(parameter, { maxLength: 4 }), fc.constantFrom(', ', ',')).map(([pairs, separator]) => pairs.map(([name, value]) => `${name}=${value}`).join(separator)),
    fc.stringMatching(/^[A-Za-z0-9._~+/-]{1,12}={0,2}$/),
  ),
).map(([scheme, rest]) => (rest ? `${scheme} ${rest}` : scheme));
// oauth4webapi's parser reads `, ` and `,` between challenges (not `Scheme , next`, which RFC 9110
// allows): a field it cannot read is dropped whole when it names a prompting scheme (below).
const challengeList = fc.tuple(fc.array(challenge, { minLength: 1, maxLength: 5 }), fc.constantFrom(', ', ',')).map(([list, separator]) => list.join(separator));

const isPrompting = ({ scheme }: { scheme: string }) => PROMPTING.includes(scheme.toLowerCase());

describe('WWW-Authenticate on the way down (generated challenge lists)', () => {
  it('drops every Basic, Digest, Negotiate and NTLM challenge and keeps the others as they were meant', async () => {
    await fc.assert(
      fc.asyncProperty(challengeList, async (header) => {
        const sent = await parseChallenges(header);
        // The generator writes readable lists only; this keeps it honest.
        expect(sent.length, header).toBeGreaterThan(0);
        const kept = await filterResponseHeaders(['Content-Type', 'application/json', 'WWW-Authenticate', header]);
        expect(kept[0]).toEqual(['content-type', 'application/json']);
        const others = sent.filter((each) => !isPrompting(each));
        if (others.length === sent.length) return void expect(kept, header).toEqual([['content-type', 'application/json'], ['www-authenticate', header]]);
        if (others.length === 0) return void expect(kept, header).toEqual([['content-type', 'application/json']]);
        expect(kept, header).toHaveLength(2);
        const written = kept[1]?.[1] ?? '';
        expect(await parseChallenges(written), `${header} → ${written}`).toEqual(others);
        expect(PROMPTING, written).not.toContain(firstToken(written));
      }),
      { numRuns: RUNS },
    );
  });

  it('whatever an API sends, no field that reaches the browser starts with or parses to a prompting challenge', async () => {
    const pieces = ['Basic', 'basic', 'NTLM', 'Negotiate', 'Digest', 'Bearer', 'DPoP', ' ', ',', '"', '\\', '=', 'realm', 'x', '\t', 'abc==', 'é'];
    const hostile = fc.array(fc.constantFrom(...pieces), { minLength: 1, maxLength: 14 }).map((parts) => parts.join(''));
    await fc.assert(
      fc.asyncProperty(fc.array(hostile, { minLength: 1, maxLength: 3 }), async (values) => {
        const kept = await filterResponseHeaders(values.flatMap((value) => ['www-authenticate', value]));
        for (const [, value] of kept) {
          expect(PROMPTING, value).not.toContain(firstToken(value));
          const challenges = await parseChallenges(value);
          // A field that mentions no such scheme passes as it came, readable or not.
          if (!/basic|digest|negotiate|ntlm/i.test(value)) continue;
          expect(challenges.length, value).toBeGreaterThan(0);
          expect(challenges.filter(isPrompting), value).toEqual([]);
        }
      }),
      { numRuns: RUNS },
    );
  });
});
