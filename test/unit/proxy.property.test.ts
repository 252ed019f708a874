// Property tests for the proxy's two pure gates: the upstream URL it builds and the headers it lets
// through. The examples in proxy.test.ts pin known payloads; these generate the payloads nobody
// listed, from the pieces path and header attacks are made of.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { ApiConfig } from '../../lib/config.ts';
import { GatehouseError } from '../../lib/errors.ts';
import { filterRequestHeaders, filterResponseHeaders, resolveUpstream } from '../../lib/proxy.ts';

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
      }),
      { numRuns: RUNS },
    );
  });

  it('refuses every `..;` / `.;` segment, however it is encoded', () => {
    const encodings = {
      dot: ['.', '%2e', '%2E'],
      semicolon: [';', '%3b', '%3B'],
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
const REQUEST_DENIED = ['host', 'cookie', 'authorization', 'x-csrf', 'content-length', 'forwarded', 'x-real-ip', 'x-request-id'];
const RESPONSE_DENIED = [
  'set-cookie', 'set-cookie2', 'x-request-id', 'clear-site-data', 'strict-transport-security', 'alt-svc', 'nel', 'report-to',
  'reporting-endpoints', 'service-worker-allowed', 'set-login', 'x-accel-redirect', 'x-sendfile', 'x-lighttpd-send-file',
];
const REQUEST_DENIED_PREFIXES = ['x-forwarded-', 'proxy-'];
const RESPONSE_DENIED_PREFIXES = ['x-gatehouse-', 'proxy-'];
/** Names no list mentions, some of them close to listed ones. */
const ORDINARY = ['accept', 'content-type', 'etag', 'cache-control', 'x-accel-buffering', 'x-forwarded', 'x-gatehouse', 'cookies', 'x-requestid', 'tee', 'www-authenticate', 'vary'];

const token = fc.stringMatching(/^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}$/);
function headerName(listed: string[], prefixes: string[]): fc.Arbitrary<string> {
  const base = fc.oneof(
    fc.constantFrom(...listed, ...HOP_BY_HOP, ...ORDINARY),
    fc.tuple(fc.constantFrom(...prefixes), token).map(([prefix, rest]) => prefix + rest),
    token,
  );
  // Header names are case-insensitive: every letter may arrive in either case.
  return fc.tuple(base, fc.array(fc.boolean(), { minLength: 32, maxLength: 32 })).map(([name, upper]) =>
    [...name].map((char, i) => (upper[i % upper.length] ? char.toUpperCase() : char.toLowerCase())).join(''),
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

function expectedSurvivors(all: Array<[string, string]>, denied: string[], prefixes: string[]): Array<[string, string]> {
  // Every Connection header counts, also one the name generator happened to spell (CI once drew
  // `connection: 5`, which rightly removed a header named `5`).
  const connections = all.filter(([name]) => name.toLowerCase() === 'connection');
  const listed = new Set(connections.flatMap(([, value]) => value.split(',').map((name) => name.trim().toLowerCase())));
  return all
    .map(([name, value]): [string, string] => [name.toLowerCase(), value])
    .filter(([name]) => !HOP_BY_HOP.includes(name) && !denied.includes(name) && !listed.has(name) && !prefixes.some((prefix) => name.startsWith(prefix)));
}

describe('header filtering (generated headers)', () => {
  it('on the way up: nothing denied or hop-by-hop survives, nothing else is dropped, order and values kept', () => {
    fc.assert(
      fc.property(headerSet(REQUEST_DENIED, REQUEST_DENIED_PREFIXES), ({ all }) => {
        // Node joins repeated Connection headers into one value; so do both adapters.
        const connection = all.filter(([name]) => name.toLowerCase() === 'connection').map(([, value]) => value).join(', ');
        expect(filterRequestHeaders(all, connection)).toEqual(expectedSurvivors(all, REQUEST_DENIED, REQUEST_DENIED_PREFIXES));
      }),
      { numRuns: RUNS },
    );
  });

  it('on the way down: nothing denied or hop-by-hop survives, nothing else is dropped, order and values kept', () => {
    fc.assert(
      fc.property(headerSet(RESPONSE_DENIED, RESPONSE_DENIED_PREFIXES), ({ all }) => {
        expect(filterResponseHeaders(all.flat())).toEqual(expectedSurvivors(all, RESPONSE_DENIED, RESPONSE_DENIED_PREFIXES));
      }),
      { numRuns: RUNS },
    );
  });
});
