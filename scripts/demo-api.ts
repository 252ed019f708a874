// Development-only resource API: the target of the demo's proxied calls, the end-to-end tests and the benchmarks.
// It accepts JWT access tokens from the dev IdP and reports back exactly what reached it.
import { once } from 'node:events';
import { createServer } from 'node:http';
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import { createHash, randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { EmbeddedJWK, calculateJwkThumbprint, createRemoteJWKSet, jwtVerify } from 'jose';
import type { JWTPayload } from 'jose';
import { WebSocketServer, type WebSocket } from 'ws';
import { listen, readBodyUpTo, runUntilSignal } from './cli.ts';

export interface DemoApiOptions {
  /** 0 picks a free port; the default audience then uses the real one. */
  port?: number;
  host?: string;
  issuer?: string;
  audience?: string;
}

export interface DemoRequestRecord {
  method: string;
  path: string;
  query: Record<string, string>;
  headers: IncomingHttpHeaders;
  at: number;
}

/** What the API made of the DPoP proofs it was shown: tests assert on these (GET /__demo/stats). */
export interface DemoDpopStats {
  verified: number;
  /** Refusals by reason: `replayed`, `no_proof`, `bearer_for_bound_token`, `ath`, `htu`, `jkt`, `use_dpop_nonce`, … */
  refused: Record<string, number>;
}

/** One WebSocket the demo API accepted, as it saw it (headers raw: bearer token included, for tests). */
export interface DemoSocketRecord {
  path: string;
  sub: string | undefined;
  protocol: string;
  headers: IncomingHttpHeaders;
  at: number;
  /** Binary bytes received, and bytes of `!stream` frames written out so far (backpressure tests watch both). */
  received: number;
  streamed: number;
  /** Once closed: the code and reason the other end sent (1005: none, 1006: no close frame). */
  closed?: { code: number; reason: string };
}

export interface DemoApiHandle {
  url: string;
  audience: string;
  /** Most recent requests first, capped; /__demo/* calls are not recorded. */
  lastRequests: DemoRequestRecord[];
  /** `downloadsCut`: downloads whose connection closed before all their bytes were written. */
  stats: { aborted: number; requests: number; uploads: number[]; downloadsCut: number; dpop: DemoDpopStats };
  /** DPoP: demand the API's own nonce in every proof (also at POST /__demo/dpop). */
  dpop: { requireNonce: boolean; nonce: string };
  /** Every WebSocket handshake that arrived (refused ones too), and the sockets accepted, newest first. */
  websockets: { upgrades: number; sockets: DemoSocketRecord[] };
  close(): Promise<void>;
}

/** `dpop`: the proof checked out, and the token is bound to its key (`cnf.jkt`). */
type Verification = { ok: true; claims: JWTPayload; dpop?: { jkt: string } } | { ok: false; challenge?: string; nonce?: string };

/** How far a proof's `iat` may be from now, and so how long a `jti` must be remembered to refuse its replay. */
const PROOF_WINDOW_SEC = 60;

const ROUTES = new Set(['echo', 'whoami', 'public', 'mfa', 'recent', 'events', 'download', 'upload', 'slow', 'set-cookie', 'redirect', 'status', 'ws', 'cached', '__demo']);
/** The dev IdP's second-factor ACR (scripts/dev-idp.ts DEV_IDP_ACR.mfa), which `mfa/*` requires. */
const MFA_ACR = 'urn:gatehouse:mfa';
const MAX_ECHO_BODY = 1024 * 1024;
const CHUNK = Buffer.alloc(64 * 1024, 'x');

export async function startDemoApi(options: DemoApiOptions = {}): Promise<DemoApiHandle> {
  if (process.env.NODE_ENV === 'production') {
    throw new Error('demo API refuses to start with NODE_ENV=production: it records request headers, bearer tokens included, for tests');
  }
  const issuer = (options.issuer ?? 'http://localhost:4000').replace(/\/+$/, '');
  const lastRequests: DemoRequestRecord[] = [];
  const stats = { aborted: 0, requests: 0, uploads: [] as number[], downloadsCut: 0, dpop: { verified: 0, refused: {} } as DemoDpopStats };
  const websockets = { upgrades: 0, sockets: [] as DemoSocketRecord[] };
  /** Sockets opened with `?paused=1`: not read from until GET /__demo/ws/resume. */
  const pausedSockets = new Set<WebSocket>();
  let audience = options.audience ?? '';
  const dpop = { requireNonce: false, nonce: newNonce() };
  /** `POST /__demo/revoke {"before": <epoch seconds> | null}`: tokens issued earlier are refused as revoked. */
  const revocation: { before?: number } = {};
  /** Refusals held by `?holdRefusal=<id>`, by id: each resolves when released. */
  const heldRefusals = new Map<string, () => void>();
  const revoked = (claims: JWTPayload) => revocation.before !== undefined && (claims.iat ?? 0) < revocation.before;
  /** `jkt jti` → when it may be forgotten: a proof is good once. */
  const seenProofs = new Map<string, number>();

  // Discovery is lazy so the API can start before the IdP and survive IdP restarts.
  let jwks: ReturnType<typeof createRemoteJWKSet> | undefined;
  async function verify(req: IncomingMessage, path: string): Promise<Verification> {
    const match = /^(Bearer|DPoP) ([\w.~+/-]+=*)$/i.exec(req.headers.authorization ?? '');
    if (!match?.[1] || !match[2]) return { ok: false };
    if (!jwks) {
      const res = await fetch(`${issuer}/.well-known/openid-configuration`);
      if (!res.ok) throw new Error(`discovery at ${issuer} answered ${res.status}`);
      const { jwks_uri: jwksUri } = (await res.json()) as { jwks_uri?: string };
      if (!jwksUri) throw new Error(`discovery at ${issuer} has no jwks_uri`);
      jwks = createRemoteJWKSet(new URL(jwksUri));
    }
    let claims: JWTPayload;
    try {
      ({ payload: claims } = await jwtVerify(match[2], jwks, { issuer, audience, typ: 'at+jwt' }));
    } catch {
      return { ok: false };
    }
    const boundTo = (claims.cnf as { jkt?: unknown } | undefined)?.jkt;
    const scheme = match[1].toLowerCase();
    if (typeof boundTo !== 'string') {
      if (scheme !== 'bearer') return refuseProof('unbound_token', 'invalid_token');
      return revoked(claims) ? { ok: false, challenge: 'Bearer error="invalid_token", error_description="revoked"' } : { ok: true, claims };
    }
    // A bound token is worth nothing without a proof of its key: as a bearer it is refused.
    if (scheme !== 'dpop') return refuseProof('bearer_for_bound_token', 'invalid_token');
    const refusal = await checkProof(req, path, match[2], boundTo);
    if (refusal) return refusal;
    // A revoked token's refusal moves the nonce on, as a server's may at any time: the retry with a
    // refreshed token then holds a nonce that is no longer wanted.
    if (revoked(claims)) {
      dpop.nonce = newNonce();
      return refuseProof('revoked', 'invalid_token');
    }
    stats.dpop.verified += 1;
    return { ok: true, claims, dpop: { jkt: boundTo } };
  }

  function refuseProof(reason: string, error: 'invalid_token' | 'invalid_dpop_proof' | 'use_dpop_nonce'): Verification {
    stats.dpop.refused[reason] = (stats.dpop.refused[reason] ?? 0) + 1;
    return { ok: false, challenge: `DPoP error="${error}", algs="ES256"`, ...(error === 'use_dpop_nonce' ? { nonce: dpop.nonce } : {}) };
  }

  /** RFC 9449 section 4.3 and 7.1, with jose doing the JOSE: what is wrong with the request's proof, or nothing. */
  async function checkProof(req: IncomingMessage, path: string, token: string, boundTo: string): Promise<Verification | undefined> {
    const proof = req.headers.dpop;
    if (typeof proof !== 'string') return refuseProof('no_proof', 'invalid_dpop_proof');
    let payload: JWTPayload;
    let jwk: unknown;
    try {
      ({ payload, protectedHeader: { jwk } } = await jwtVerify(proof, EmbeddedJWK, { typ: 'dpop+jwt', algorithms: ['ES256', 'PS256', 'RS256', 'EdDSA', 'Ed25519'] }));
    } catch {
      return refuseProof('signature', 'invalid_dpop_proof');
    }
    const now = Math.floor(Date.now() / 1000);
    if (payload.htm !== req.method) return refuseProof('htm', 'invalid_dpop_proof');
    if (payload.htu !== `http://${req.headers.host}${path}`) return refuseProof('htu', 'invalid_dpop_proof');
    if (payload.ath !== createHash('sha256').update(token).digest('base64url')) return refuseProof('ath', 'invalid_dpop_proof');
    if (typeof payload.iat !== 'number' || Math.abs(now - payload.iat) > PROOF_WINDOW_SEC) return refuseProof('iat', 'invalid_dpop_proof');
    if (typeof payload.jti !== 'string' || !payload.jti) return refuseProof('jti', 'invalid_dpop_proof');
    if ((await calculateJwkThumbprint(jwk as Parameters<typeof calculateJwkThumbprint>[0])) !== boundTo) return refuseProof('jkt', 'invalid_dpop_proof');
    if (dpop.requireNonce && payload.nonce !== dpop.nonce) return refuseProof('use_dpop_nonce', 'use_dpop_nonce');
    for (const [seen, until] of seenProofs) {
      if (until > now) break;
      seenProofs.delete(seen);
    }
    const id = `${boundTo} ${payload.jti}`;
    if (seenProofs.has(id)) return refuseProof('replayed', 'invalid_dpop_proof');
    seenProofs.set(id, now + 2 * PROOF_WINDOW_SEC);
    return undefined;
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://demo.invalid');
    const segments = url.pathname.split('/').filter(Boolean);
    const at = segments.findIndex((segment) => ROUTES.has(segment));
    const route = segments[at] ?? '';
    const rest = at >= 0 ? segments.slice(at + 1) : [];
    const query = Object.fromEntries(url.searchParams);
    const method = req.method ?? 'GET';

    if (route === '__demo') {
      // Test introspection shows raw headers (bearer tokens included): for direct callers only,
      // never for a browser reaching it through a proxy.
      if (req.headers['x-forwarded-host']) return json(res, 404, { error: 'not_found' });
      if (rest[0] === 'stats') return json(res, 200, stats);
      if (rest[0] === 'last') return json(res, lastRequests[0] ? 200 : 404, lastRequests[0] ?? { error: 'no_requests' });
      if (rest[0] === 'release' && method === 'POST') {
        const release = heldRefusals.get(query.id ?? '');
        heldRefusals.delete(query.id ?? '');
        release?.();
        return json(res, release ? 200 : 404, { released: release !== undefined });
      }
      if (rest[0] === 'revoke' && method === 'POST') {
        const body = (await readBody(req)) as { before?: unknown } | null;
        if (typeof body?.before === 'number') revocation.before = body.before;
        else delete revocation.before;
        return json(res, 200, revocation);
      }
      if (rest[0] === 'dpop') {
        if (method === 'POST') {
          const body = (await readBody(req)) as { requireNonce?: unknown; rotate?: unknown } | null;
          if (typeof body?.requireNonce === 'boolean') dpop.requireNonce = body.requireNonce;
          if (body?.rotate === true) dpop.nonce = newNonce();
        }
        return json(res, 200, dpop);
      }
      if (rest[0] === 'ws' && rest[1] === 'resume') {
        for (const paused of pausedSockets) paused.resume();
        const resumed = pausedSockets.size;
        pausedSockets.clear();
        return json(res, 200, { resumed });
      }
      if (rest[0] === 'ws') return json(res, 200, websockets);
      return json(res, 404, { error: 'not_found' });
    }
    stats.requests += 1;
    lastRequests.unshift({ method, path: url.pathname, query, headers: req.headers, at: Date.now() });
    lastRequests.length = Math.min(lastRequests.length, 50);

    const verification = await verify(req, url.pathname);
    if (route === 'public') {
      return json(res, 200, verification.ok ? { anonymous: false, sub: verification.claims.sub } : { anonymous: true });
    }
    if (route === 'cached') {
      // Caching headers as the caller asks (`?cc=`, `?vary=`, `?cdn=` for CDN-Cache-Control, `?connection=`), with or without a token: for tests of what reaches the browser.
      if (query.cc) res.setHeader('cache-control', query.cc);
      if (query.vary) res.setHeader('vary', query.vary);
      if (query.cdn) res.setHeader('cdn-cache-control', query.cdn);
      // A misbehaving API (or something between) naming end-to-end fields as hop-by-hop.
      if (query.connection) res.setHeader('connection', query.connection);
      res.setHeader('last-modified', new Date(0).toUTCString());
      return json(res, 200, verification.ok ? { sub: verification.claims.sub } : { anonymous: true });
    }
    if (!verification.ok) {
      // `?holdRefusal=<id>`: a refusal held until POST /__demo/release?id=<id> (10 s at most), for
      // what other calls do meanwhile.
      const holdId = query.holdRefusal;
      if (holdId) {
        await new Promise<void>((resolve) => {
          heldRefusals.set(holdId, resolve);
          setTimeout(resolve, 10_000).unref();
        });
      }
      res.setHeader('www-authenticate', verification.challenge ?? 'Bearer error="invalid_token"');
      if (verification.nonce) res.setHeader('dpop-nonce', verification.nonce);
      return json(res, 401, { error: 'invalid_token' });
    }
    const { claims } = verification;
    // RFC 9449 section 9: a server that wants nonces may name the next one on any answer.
    if (verification.dpop && dpop.requireNonce) res.setHeader('dpop-nonce', dpop.nonce);
    // For tests: `?ownNonce=` stands in for another resource server on this origin, with nonces of its own.
    if (verification.dpop && query.ownNonce) res.setHeader('dpop-nonce', query.ownNonce);

    switch (route) {
      case 'mfa':
      case 'recent': {
        // RFC 9470: `mfa/*` needs the second factor's ACR, `recent?maxAge=N` a sign-in at most N seconds old.
        const { sub, acr, auth_time: authTime } = claims;
        const maxAge = clampInt(query.maxAge, 300, 0, 86_400);
        const lacking =
          route === 'mfa' ? acr !== MFA_ACR : typeof authTime !== 'number' || authTime + maxAge < Math.floor(Date.now() / 1000);
        if (lacking) {
          const wanted = route === 'mfa' ? `acr_values="${MFA_ACR}"` : `max_age=${maxAge}`;
          // In the scheme the token came in (RFC 9449 section 7.1: a DPoP-bound one is challenged as DPoP).
          const scheme = verification.dpop ? 'DPoP algs="ES256",' : 'Bearer';
          res.setHeader('www-authenticate', `${scheme} error="insufficient_user_authentication", error_description="A stronger or more recent sign-in is required", ${wanted}`);
          return json(res, 401, { error: 'insufficient_user_authentication' });
        }
        return json(res, 200, { sub, acr, auth_time: authTime, path: url.pathname });
      }
      case 'echo':
      case 'whoami': {
        const body = await readBody(req);
        if (body === undefined) return json(res, 413, { error: 'body_too_large' });
        const { sub, aud, scope, client_id } = claims;
        // The answer reaches the browser: show which scheme arrived, never the token or its proof.
        const scheme = req.headers.authorization?.split(' ')[0];
        const headers = { ...req.headers, ...(scheme ? { authorization: `${scheme} [redacted]` } : {}), ...(req.headers.dpop ? { dpop: '[redacted]' } : {}) };
        return json(res, 200, { sub, aud, scope, client_id, method, path: url.pathname, query, headers, body, dpop: verification.dpop ?? null });
      }
      case 'events':
        // `delayMs`: a head that comes late, as a long poll's does.
        return streamEvents(res, clampInt(query.count, 5, 0, 10_000), clampInt(query.intervalMs, 200, 0, 60_000), clampInt(query.delayMs, 0, 0, 600_000));
      case 'download':
        return download(res, clampInt(query.bytes, 1024, 0, Number.MAX_SAFE_INTEGER), () => (stats.downloadsCut += 1));
      case 'upload': {
        let bytes = 0;
        for await (const chunk of req) bytes += (chunk as Buffer).length;
        // What arrived whole, so a test can tell a refused upload from a shortened one.
        stats.uploads.push(bytes);
        return json(res, 200, { bytes });
      }
      case 'slow': {
        const ms = clampInt(query.ms, 1000, 0, 600_000);
        // Gone while its token was being checked: 'close' has fired already and would never reach the listener below.
        if (res.closed) {
          stats.aborted += 1;
          return;
        }
        const timer = setTimeout(() => json(res, 200, { waitedMs: ms }), ms);
        res.once('close', () => {
          if (res.writableFinished) return;
          clearTimeout(timer);
          stats.aborted += 1;
        });
        return;
      }
      case 'set-cookie':
        res.writeHead(200, {
          'content-type': 'application/json',
          'set-cookie': 'upstream=1; Path=/; HttpOnly',
          // Hop-by-hop headers a proxy must drop, next to an end-to-end one it must keep.
          'keep-alive': 'timeout=5',
          'proxy-authenticate': 'x',
          upgrade: 'h2c',
          trailer: 'X-T',
          'x-upstream': 'yes',
        });
        res.write(JSON.stringify({ ok: true }));
        res.addTrailers({ 'x-t': '1' });
        res.end();
        return;
      case 'redirect': {
        // `?to=` and `?status=` let tests play an API that aims its redirects elsewhere.
        const status = [301, 302, 303, 307, 308, 201].includes(Number(query.status)) ? Number(query.status) : 302;
        res.writeHead(status, { location: query.to ?? '/echo/after-redirect' }).end();
        return;
      }
      case 'status': {
        const status = clampInt(rest[0], 200, 200, 599);
        // `?challenge=`: the WWW-Authenticate a refusal comes with (what it asks of the caller).
        if (query.challenge) res.setHeader('www-authenticate', query.challenge);
        if (status === 204 || status === 304) return void res.writeHead(status).end();
        return json(res, status, { status });
      }
      default:
        return json(res, 404, { error: 'not_found', path: url.pathname });
    }
  }

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (res.headersSent) return void res.destroy();
      json(res, 503, { error: 'temporarily_unavailable', error_description: String(err) });
    });
  });
  // The first subprotocol offered is the one chosen, so a test can see the choice reach the browser.
  const socketServer = new WebSocketServer({ noServer: true, handleProtocols: (protocols) => protocols.values().next().value ?? false });
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    websockets.upgrades += 1;
    socket.on('error', () => socket.destroy());
    acceptSocket(req, socket, head).catch(() => refuseUpgrade(socket, 503, { error: 'temporarily_unavailable' }));
  });

  async function acceptSocket(req: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://demo.invalid');
    const segments = url.pathname.split('/').filter(Boolean);
    const at = segments.indexOf('ws');
    if (at < 0) return refuseUpgrade(socket, 404, { error: 'not_found', path: url.pathname });
    const verification = await verify(req, url.pathname);
    // A body a proxy must not pass on to the browser: tests look for this marker.
    if (!verification.ok) return refuseUpgrade(socket, 401, { error: 'invalid_token', detail: 'demo-api-refusal-body' });
    // `…/mfa/ws`: a socket that needs the second factor's ACR, refused as RFC 9470 says when it is lacking.
    if (segments[at - 1] === 'mfa' && verification.claims.acr !== MFA_ACR) {
      const challenge = `Bearer error="insufficient_user_authentication", error_description="A stronger sign-in is required", acr_values="${MFA_ACR}"`;
      return refuseUpgrade(socket, 401, { error: 'insufficient_user_authentication' }, [['www-authenticate', challenge]]);
    }
    // `…/admin/ws`: a socket no token of this client's grant may open (a scope it was never given).
    if (segments[at - 1] === 'admin') return refuseUpgrade(socket, 401, { error: 'insufficient_scope' }, [['www-authenticate', 'Bearer error="insufficient_scope", scope="admin"']]);
    // `?handshakeDelayMs=`: a handshake the API takes its time over, for what happens meanwhile.
    const delayMs = clampInt(url.searchParams.get('handshakeDelayMs') ?? undefined, 0, 0, 10_000);
    if (delayMs > 0) await new Promise((resolve) => setTimeout(resolve, delayMs));
    // `?hello=`: a greeting sent as the socket opens, in the same TCP write as the 101, as an API
    // that speaks first (Socket.IO's open packet) may send it; a proxy must not lose it.
    const hello = url.searchParams.get('hello');
    if (hello !== null) socket.cork();
    socketServer.handleUpgrade(req, socket, head, (ws) => {
      if (hello !== null) {
        ws.send(hello);
        process.nextTick(() => socket.uncork());
      }
      const record: DemoSocketRecord = { path: url.pathname, sub: verification.claims.sub, protocol: ws.protocol, headers: req.headers, at: Date.now(), received: 0, streamed: 0 };
      websockets.sockets.unshift(record);
      websockets.sockets.length = Math.min(websockets.sockets.length, 50);
      if (url.searchParams.get('paused') === '1') {
        ws.pause();
        pausedSockets.add(ws);
        ws.once('close', () => pausedSockets.delete(ws));
      }
      serveSocket(ws, record, segments[at + 1] === 'sink' ? 'sink' : 'echo');
    });
  }

  const port = await listen(server, options.port ?? 4001, options.host);
  const url = `http://localhost:${port}`;
  audience ||= url;

  return {
    url,
    audience,
    lastRequests,
    stats,
    dpop,
    websockets,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
        // Upgraded sockets are no HTTP connections any more: closeAllConnections leaves them.
        for (const client of socketServer.clients) client.terminate();
      }),
  };
}

function newNonce(): string {
  return randomBytes(16).toString('base64url');
}

function refuseUpgrade(socket: Duplex, status: number, body: unknown, headers: Array<[string, string]> = []): void {
  const payload = JSON.stringify(body);
  const extra = headers.map(([name, value]) => `${name}: ${value}\r\n`).join('');
  socket.end(`HTTP/1.1 ${status} Refused\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(payload)}\r\n${extra}connection: close\r\n\r\n${payload}`);
}

/**
 * A demo socket: `echo` sends every message back as it came (text or binary); `sink` only counts
 * binary bytes (opened with `?paused=1`, it reads nothing until told: a slow consumer).
 * Text commands, in both modes: `!whoami` (what arrived, bearer redacted), `!count` (binary bytes
 * received so far), `!stream <frames> <bytes>` (that many binary frames, each sent once the last
 * has been written out, then `!streamed <total>`), `!close <code> <reason>`.
 */
function serveSocket(ws: WebSocket, record: DemoSocketRecord, mode: 'echo' | 'sink'): void {
  ws.on('close', (code, reason) => (record.closed = { code, reason: reason.toString() }));
  ws.on('error', () => ws.terminate());
  ws.on('message', (data, isBinary) => {
    const message = data as Buffer;
    if (isBinary) record.received += message.length;
    const text = isBinary ? '' : message.toString();
    if (!isBinary && text.startsWith('!')) return void command(text.slice(1).split(' '));
    if (mode === 'echo') ws.send(message, { binary: isBinary });
  });

  async function command([name, ...args]: string[]): Promise<void> {
    if (name === 'whoami') {
      const headers = { ...record.headers, ...(record.headers.authorization ? { authorization: 'Bearer [redacted]' } : {}) };
      return ws.send(JSON.stringify({ sub: record.sub, protocol: record.protocol, path: record.path, headers }));
    }
    if (name === 'count') return ws.send(`!counted ${record.received}`);
    if (name === 'close') return ws.close(Number(args[0]), args.slice(1).join(' '));
    if (name === 'stream') {
      const frames = clampInt(args[0], 1, 0, 1_000_000);
      const frame = Buffer.alloc(clampInt(args[1], 1024, 1, 16 * 1024 * 1024), 'y');
      for (let n = 0; n < frames && ws.readyState === ws.OPEN; n++) {
        await new Promise((resolve) => ws.send(frame, resolve));
        record.streamed += frame.length;
      }
      return ws.send(`!streamed ${frames * frame.length}`);
    }
    ws.send(`!unknown ${name ?? ''}`);
  }
}

function json(res: ServerResponse, status: number, body: unknown): void {
  const payload = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) });
  res.end(payload);
}

function clampInt(raw: string | undefined, fallback: number, min: number, max: number): number {
  const value = raw === undefined ? NaN : Number.parseInt(raw, 10);
  return Number.isFinite(value) ? Math.min(max, Math.max(min, value)) : fallback;
}

async function readBody(req: IncomingMessage): Promise<unknown> {
  const body = await readBodyUpTo(req, MAX_ECHO_BODY);
  if (body === undefined) return undefined;
  if (body.length === 0) return null;
  const text = body.toString('utf8');
  if (!/\bjson\b/i.test(req.headers['content-type'] ?? '')) return text;
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return text;
  }
}

async function streamEvents(res: ServerResponse, count: number, intervalMs: number, delayMs: number): Promise<void> {
  if (delayMs > 0) await new Promise((resolve) => setTimeout(resolve, delayMs));
  if (res.destroyed) return;
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store', 'x-accel-buffering': 'no' });
  res.flushHeaders();
  for (let n = 0; n < count && !res.destroyed; n += 1) {
    if (n > 0) await new Promise((resolve) => setTimeout(resolve, intervalMs));
    res.write(`data: ${JSON.stringify({ n, at: Date.now() })}\n\n`);
  }
  res.end();
}

async function download(res: ServerResponse, bytes: number, onCut: () => void): Promise<void> {
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': bytes });
  let left = bytes;
  for (; left > 0 && !res.destroyed; left -= CHUNK.length) {
    // Honour backpressure so large downloads stream instead of piling up in memory.
    if (!res.write(left >= CHUNK.length ? CHUNK : CHUNK.subarray(0, left))) {
      await Promise.race([once(res, 'drain'), once(res, 'close')]);
    }
  }
  if (left > 0) onCut();
  res.end();
}

if (import.meta.main) {
  await runUntilSignal(
    () =>
      startDemoApi({
        port: process.env.DEMO_API_PORT ? Number(process.env.DEMO_API_PORT) : undefined,
        host: process.env.DEMO_API_HOST || undefined,
        issuer: process.env.DEMO_API_ISSUER || undefined,
        audience: process.env.DEMO_API_AUDIENCE || undefined,
      }),
    (api) => `demo API listening on ${api.url}`,
  );
}
