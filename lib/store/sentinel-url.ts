/**
 * REDIS_URL for Redis Sentinel, in the form other clients use:
 * `redis+sentinel://[user:password@]host[:port][,host[:port]…]/<master name>`, and
 * `rediss+sentinel://` for TLS to the sentinels and the data nodes alike. The hosts are the
 * sentinels (port 26379 unless given); the credentials are the data nodes'. Kept free of ioredis so
 * the configuration check can use it too.
 */
export interface SentinelUrl {
  tls: boolean;
  sentinels: Array<{ host: string; port: number }>;
  masterName: string;
  username: string | undefined;
  password: string | undefined;
}

const SCHEME = /^(rediss?)\+sentinel:\/\//;
const DEFAULT_SENTINEL_PORT = 26379;
// A host name or IPv4 address, or an IPv6 address in brackets; then an optional port.
const HOST_PORT = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?$/;

export function isSentinelUrl(url: string): boolean {
  return SCHEME.test(url);
}

function decode(part: string, what: string): string {
  try {
    return decodeURIComponent(part);
  } catch {
    throw new Error(`its ${what} is not percent-encoded correctly`);
  }
}

/**
 * Throws an Error whose message says what is wrong; the message never repeats the URL, which may
 * hold a password.
 */
export function parseSentinelUrl(url: string): SentinelUrl {
  const scheme = SCHEME.exec(url);
  if (!scheme) throw new Error('must start with redis+sentinel:// or rediss+sentinel://');
  const rest = url.slice(scheme[0].length);
  if (/[?#]/.test(rest)) throw new Error('takes no query or fragment: redis+sentinel://[user:password@]host:port[,host:port…]/<master name>');
  // The last '@' ends the credentials, so a password pasted without percent-encoding ('/', '@',
  // ',') is still taken whole and never shows up in an error about the hosts.
  const at = rest.lastIndexOf('@');
  const userinfo = at === -1 ? undefined : rest.slice(0, at);
  const afterCredentials = rest.slice(at + 1);
  const slash = afterCredentials.indexOf('/');
  const hostList = slash === -1 ? afterCredentials : afterCredentials.slice(0, slash);
  const path = slash === -1 ? '' : afterCredentials.slice(slash + 1);

  if (!hostList.trim()) throw new Error('names no sentinel: redis+sentinel://host:port[,host:port…]/<master name>');
  const sentinels = hostList.split(',').map((entry) => {
    const match = HOST_PORT.exec(entry.trim());
    const port = match?.[2] === undefined ? DEFAULT_SENTINEL_PORT : Number(match[2]);
    if (!match || port < 1 || port > 65_535) throw new Error(`names a sentinel that is not host:port ("${entry.trim().slice(0, 80)}")`);
    return { host: (match[1] as string).replace(/^\[(.*)\]$/, '$1'), port };
  });

  const masterName = decode(path.replace(/\/$/, ''), 'master name');
  if (!masterName) throw new Error('names no master: the path is the name the sentinels monitor it by, e.g. redis+sentinel://host:26379/mymaster');
  if (masterName.includes('/')) throw new Error('has more than a master name in its path (a database number is not supported)');

  let username: string | undefined;
  let password: string | undefined;
  if (userinfo !== undefined) {
    const colon = userinfo.indexOf(':');
    username = decode(colon === -1 ? userinfo : userinfo.slice(0, colon), 'user name') || undefined;
    password = colon === -1 ? undefined : decode(userinfo.slice(colon + 1), 'password') || undefined;
  }
  return { tls: scheme[1] === 'rediss', sentinels, masterName, username, password };
}
