import { exportJWK, generateKeyPair } from 'jose';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { browserRequest, followFlow, jarFor, type CookieJars } from '../../e2e/support/headless-login.ts';
import { defaultServerShape, restartGatehouse, startGatehouse, startProcess, startStack, type Stack } from '../../e2e/support/stack.ts';
import { call, idpGrants, login, waitFor } from '../support/http-client.ts';

/**
 * Pushed Authorization Requests (RFC 9126) against the real oidc-provider: an IdP that requires
 * them in discovery, one that requires them only through the client's registration (so only
 * OIDC_USE_PAR makes Gatehouse push), every client authentication method, a failing and a refusing
 * PAR endpoint, and an IdP with no PAR endpoint at all, which must stop the server at start.
 */

const shape = defaultServerShape();
const stacks: Stack[] = [];
afterAll(async () => {
  await Promise.all(stacks.map((stack) => stack.stop()));
});

/** The login start's redirect to the IdP, not followed. */
async function authorizationRedirect(app: string): Promise<{ res: Response; location: URL }> {
  const res = await fetch(`${app}/api/auth/login`, { redirect: 'manual' });
  return { res, location: new URL(res.headers.get('location') ?? 'about:blank') };
}

async function expectPushedRedirect(stack: Stack, app: string, clientId = stack.clientId): Promise<void> {
  const { res, location } = await authorizationRedirect(app);
  expect(res.status).toBe(302);
  expect(`${location.origin}${location.pathname}`).toBe(`${stack.issuer}/auth`);
  expect([...location.searchParams.keys()].sort()).toEqual(['client_id', 'request_uri']);
  expect(location.searchParams.get('client_id')).toBe(clientId);
  expect(location.searchParams.get('request_uri')).toMatch(/^urn:ietf:params:oauth:request_uri:/);
}

/**
 * An authorization request as Gatehouse sends it without PAR, straight to the IdP: an IdP that
 * requires PAR sends the browser back with `invalid_request` instead of a login form.
 */
async function expectPlainRequestRefused(stack: Stack, app: string): Promise<void> {
  const plain = new URL(`${stack.issuer}/auth`);
  plain.search = new URLSearchParams({
    response_type: 'code',
    client_id: stack.clientId,
    redirect_uri: `${app}/api/auth/callback`,
    scope: 'openid',
    state: 'plain-state',
    nonce: 'plain-nonce',
    code_challenge: 'E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM',
    code_challenge_method: 'S256',
  }).toString();
  const res = await fetch(plain, { redirect: 'manual' });
  await res.body?.cancel();
  expect(res.status).toBe(303);
  const back = new URL(res.headers.get('location') ?? 'about:blank');
  expect(`${back.origin}${back.pathname}`).toBe(`${app}/api/auth/callback`);
  expect(back.searchParams.get('error')).toBe('invalid_request');
  expect(back.searchParams.get('error_description')).toMatch(/Pushed Authorization Request must be used/);
}

/** A login, a proxied call, and a call that refreshes (the token is due at once: skew ≥ lifetime). */
async function loginAndUse(stack: Stack, app: string, user: string): Promise<void> {
  const cookie = await login(app, user);
  expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: user } });
  const before = (await idpGrants(stack.issuer)).byAccount[user]?.refresh_token ?? 0;
  expect(await call(app, '/api/proxy/demo/whoami', cookie)).toMatchObject({ status: 200, body: { sub: user } });
  expect(((await idpGrants(stack.issuer)).byAccount[user]?.refresh_token ?? 0) - before).toBe(1);
}

/** Starts a login in a fresh browser and stops at the IdP's redirect back to the callback (not requested). */
async function callbackOf(app: string, username: string): Promise<{ callback: URL; jars: CookieJars }> {
  const jars: CookieJars = new Map();
  const start = new URL(`${app}/api/auth/login`);
  let leftApp = false;
  const callback = await followFlow(start, (next) => (leftApp ||= next.origin !== start.origin) && next.origin === start.origin, { username, jars });
  // A real code, not an error: the pushed request was accepted, so what follows tests the callback.
  expect(callback.searchParams.get('code'), callback.href).toBeTruthy();
  return { callback, jars };
}

describe(`an IdP that requires PAR in its discovery document (${shape})`, () => {
  let stack: Stack;
  let app: string;
  let privateJwk: Record<string, unknown>;

  beforeAll(async () => {
    const { publicKey, privateKey } = await generateKeyPair('ES256', { extractable: true });
    const publicJwk = { ...(await exportJWK(publicKey)), alg: 'ES256', use: 'sig', kid: 'gatehouse-par' };
    privateJwk = { ...(await exportJWK(privateKey)), alg: 'ES256', kid: 'gatehouse-par' };
    stack = await startStack({
      workers: 1,
      accessTokenTtl: 60,
      env: { TOKEN_REFRESH_SKEW: '120' },
      idpEnv: { IDP_PAR: 'required', IDP_PKJWT_PUBLIC_JWK: JSON.stringify(publicJwk) },
    });
    stacks.push(stack);
    app = stack.apps[0]!.url;
    const discovery = (await (await fetch(`${stack.issuer}/.well-known/openid-configuration`)).json()) as Record<string, unknown>;
    expect(discovery.require_pushed_authorization_requests).toBe(true);
  });

  it('the IdP refuses an authorization request that was not pushed', async () => {
    await expectPlainRequestRefused(stack, app);
  });

  it('login pushes the request and redirects with only client_id and request_uri; the session works, refresh included', async () => {
    expect(stack.appEnv.OIDC_USE_PAR).toBeUndefined();
    await expectPushedRedirect(stack, app);
    await loginAndUse(stack, app, 'par-basic');
  });

  it('a silent login (prompt=none) is pushed too', async () => {
    const res = await fetch(`${app}/api/auth/login?prompt=none`, { redirect: 'manual' });
    const location = new URL(res.headers.get('location') ?? 'about:blank');
    expect([...location.searchParams.keys()].sort()).toEqual(['client_id', 'request_uri']);
    // Not signed in at the IdP: it answers the pushed prompt=none with login_required, as it would unpushed.
    const jars: CookieJars = new Map();
    const landed = await browserRequest(location, jars);
    const back = new URL(landed.headers.get('location') ?? 'about:blank', location);
    expect(back.searchParams.get('error')).toBe('login_required');
  });

  it('the callback checks still hold: a forged state, a foreign iss, and a code from another login are refused', async () => {
    const other = await callbackOf(app, 'par-other');
    const tampers: Array<[string, (params: URLSearchParams) => void]> = [
      ['invalid_state', (params) => params.set('state', 'forged-state')],
      ['invalid_callback', (params) => params.set('iss', 'http://127.0.0.1:1')],
      // Another login's code with this login's state: PKCE (and the nonce) bind the code to the login that asked for it.
      ['token_exchange_failed', (params) => params.set('code', other.callback.searchParams.get('code') as string)],
    ];
    for (const [code, tamper] of tampers) {
      const { callback, jars } = await callbackOf(app, 'par-tamper');
      tamper(callback.searchParams);
      const res = await browserRequest(callback, jars);
      expect(res.status, code).toBe(400);
      expect(await res.text()).toContain(`<code>${code}</code>`);
      expect(jarFor(jars, app).get('gatehouse')).toBeUndefined();
    }
  });

  it('a PAR endpoint that fails (503, 429) is a readable 503 idp_unavailable page with its Retry-After', async () => {
    for (const status of [503, 429]) {
      await fetch(`${stack.issuer}/__dev/par-fault?status=${status}&retryAfter=4&count=1`, { method: 'POST' });
      const { res } = await authorizationRedirect(app);
      expect(res.status).toBe(503);
      expect(res.headers.get('retry-after')).toBe('4');
      expect(res.headers.get('content-type')).toMatch(/^text\/html/);
      const html = await res.text();
      expect(html).toContain('<code>idp_unavailable</code>');
      expect(html).not.toMatch(/\bat [\w.<>$]+ \(|node_modules|\.ts:\d+/);
    }
    // The fault is spent: the next login pushes again.
    await expectPushedRedirect(stack, app);
  });

  it('each client authentication method pushes with its own credentials', async () => {
    const gatehouse = stack.apps[0]!;
    const basicEnv = gatehouse.env;
    try {
      // The dev IdP registers `<id>-post` for client_secret_post only.
      await restartGatehouse(gatehouse, { OIDC_CLIENT_ID: `${stack.clientId}-post`, OIDC_CLIENT_AUTH: 'client_secret_post' }, 'gatehouse-par-post');
      await expectPushedRedirect(stack, app, `${stack.clientId}-post`);
      await loginAndUse(stack, app, 'par-post');

      // And `<id>-pkjwt` for private_key_jwt only; no shared secret configured at all.
      const { OIDC_CLIENT_SECRET: _secret, ...withoutSecret } = basicEnv;
      gatehouse.env = withoutSecret;
      await restartGatehouse(
        gatehouse,
        { OIDC_CLIENT_ID: `${stack.clientId}-pkjwt`, OIDC_CLIENT_AUTH: 'private_key_jwt', OIDC_PRIVATE_KEY: JSON.stringify(privateJwk) },
        'gatehouse-par-pkjwt',
      );
      await expectPushedRedirect(stack, app, `${stack.clientId}-pkjwt`);
      await loginAndUse(stack, app, 'par-pkjwt');

      // A wrong secret: the PAR endpoint refuses the client, and the page says the IdP refused, no more.
      gatehouse.env = basicEnv;
      await restartGatehouse(gatehouse, { OIDC_CLIENT_SECRET: 'not-the-secret-of-this-client-at-all' }, 'gatehouse-par-wrong-secret');
      const { res } = await authorizationRedirect(app);
      expect(res.status).toBe(502);
      const html = await res.text();
      expect(html).toContain('<code>idp_error</code>');
      expect(html).not.toContain('not-the-secret');
      expect(html).not.toMatch(/\bat [\w.<>$]+ \(|node_modules|\.ts:\d+/);
    } finally {
      gatehouse.env = basicEnv;
      await restartGatehouse(gatehouse, {}, 'gatehouse-par-basic');
    }
  });

  it('a PAR endpoint that refuses the request (400) is a readable 502 idp_error page, with the IdP\'s reason only in the log', async () => {
    const gatehouse = stack.apps[0]!;
    const before = gatehouse.env;
    try {
      // oidc-provider checks pushed parameters as it would unpushed ones: a prompt it does not know is invalid_request.
      await restartGatehouse(gatehouse, { OIDC_AUTHORIZATION_PARAMS: 'prompt=sometimes', LOG_LEVEL: 'warn' }, 'gatehouse-par-refused');
      const logBefore = gatehouse.process.output().length;
      const { res } = await authorizationRedirect(app);
      expect(res.status).toBe(502);
      expect(res.headers.get('content-type')).toMatch(/^text\/html/);
      const html = await res.text();
      expect(html).toContain('<code>idp_error</code>');
      expect(html).toContain('The identity provider refused the sign-in request.');
      expect(html).not.toContain('prompt');
      expect(html).not.toMatch(/\bat [\w.<>$]+ \(|node_modules|\.ts:\d+/);
      const logged = gatehouse.process.output().slice(logBefore);
      expect(logged).toContain('pushed authorization request: IdP answered invalid_request (unsupported prompt value requested)');
      expect(logged).not.toContain(stack.appEnv.OIDC_CLIENT_SECRET as string);
    } finally {
      gatehouse.env = before;
      await restartGatehouse(gatehouse, {}, 'gatehouse-par-basic');
    }
  });
});

describe(`OIDC_USE_PAR=true with an IdP that offers PAR without saying it requires it (${shape})`, () => {
  let stack: Stack;
  let app: string;

  beforeAll(async () => {
    // The clients are registered with require_pushed_authorization_requests: the IdP refuses
    // unpushed requests, but its discovery document does not say so. Only OIDC_USE_PAR gets in.
    stack = await startStack({ workers: 1, accessTokenTtl: 60, env: { TOKEN_REFRESH_SKEW: '120', OIDC_USE_PAR: 'true' }, idpEnv: { IDP_PAR: 'required-per-client' } });
    stacks.push(stack);
    app = stack.apps[0]!.url;
    const discovery = (await (await fetch(`${stack.issuer}/.well-known/openid-configuration`)).json()) as Record<string, unknown>;
    expect(discovery.pushed_authorization_request_endpoint).toBe(`${stack.issuer}/request`);
    expect(discovery.require_pushed_authorization_requests).toBeUndefined();
  });

  it('the IdP refuses an authorization request that was not pushed', async () => {
    await expectPlainRequestRefused(stack, app);
  });

  it('login pushes the request, redirects with only client_id and request_uri, and the session works', async () => {
    await expectPushedRedirect(stack, app);
    await loginAndUse(stack, app, 'use-par');
  });
});

describe(`an IdP with no PAR endpoint (${shape})`, () => {
  let stack: Stack;

  beforeAll(async () => {
    stack = await startStack({ workers: 1, idpEnv: { IDP_PAR: 'disabled' } });
    stacks.push(stack);
    const discovery = (await (await fetch(`${stack.issuer}/.well-known/openid-configuration`)).json()) as Record<string, unknown>;
    expect(discovery.pushed_authorization_request_endpoint).toBeUndefined();
  });

  it('with OIDC_USE_PAR=true the server does not start, and says why', async () => {
    const env = { ...stack.apps[0]!.env, OIDC_USE_PAR: 'true', PORT: '0' };
    const args = shape === 'next' ? ['node_modules/next/dist/bin/next', 'start', '-p', '0', '-H', '127.0.0.1'] : ['server.ts'];
    const started = Date.now();
    const exit = await startProcess(`par-misconfigured-${shape}`, args, env, () => false, 60_000).then(
      () => 'started',
      (error: Error) => error.message,
    );
    expect(exit).toContain('exited early (code 1');
    expect(exit).toContain('Gatehouse cannot start');
    expect(exit).toContain(`OIDC_USE_PAR: is true, but the IdP publishes no pushed_authorization_request_endpoint; enable PAR at the IdP or unset OIDC_USE_PAR (${stack.issuer})`);
    expect(exit).not.toMatch(/\n\s+at /);
    expect(Date.now() - started).toBeLessThan(30_000);
  });

  it('a server that could not ask the IdP at start refuses the login with a page naming no secret, and is not healthy', async () => {
    // Frozen, the IdP accepts connections and never answers: the start-up check gives up (3 s) and lets the server start.
    const idpPid = stack.idp.child.pid as number;
    process.kill(idpPid, 'SIGSTOP');
    let lateComer: Awaited<ReturnType<typeof startGatehouse>> | undefined;
    try {
      lateComer = await startGatehouse({ name: `par-unchecked-${shape}`, workers: 1, env: { ...stack.appEnv, OIDC_USE_PAR: 'true' } });
      // next start prints "Ready" before its instrumentation hook runs the check (requests wait for the hook).
      const started = lateComer;
      await waitFor('the start-up check to give up', () => (started.process.output().includes('server.idp_unchecked') ? true : undefined));
    } finally {
      process.kill(idpPid, 'SIGCONT');
    }
    try {
      const { res } = await authorizationRedirect(lateComer.url);
      expect(res.status).toBe(502);
      expect(res.headers.get('content-type')).toMatch(/^text\/html/);
      const html = await res.text();
      expect(html).toContain('<code>par_unsupported</code>');
      expect(html).not.toMatch(/\bat [\w.<>$]+ \(|node_modules|\.ts:\d+/);
      // The log names the problem for the operator.
      await waitFor('the logged problem', () => (lateComer.process.output().includes(`OIDC_USE_PAR: is true, but the IdP publishes no pushed_authorization_request_endpoint; enable PAR at the IdP or unset OIDC_USE_PAR (${stack.issuer})`) ? true : undefined));
      expect(await call(lateComer.url, '/api/health', undefined)).toMatchObject({ status: 503, body: { error: 'unhealthy', store: 'ok', idp: 'misconfigured' } });
    } finally {
      await lateComer.process.stop();
    }
  });

  it('without OIDC_USE_PAR the same IdP gets ordinary authorization requests, and /api/health is ok', async () => {
    const app = stack.apps[0]!.url;
    const { location } = await authorizationRedirect(app);
    expect(location.searchParams.get('code_challenge_method')).toBe('S256');
    expect(location.searchParams.has('request_uri')).toBe(false);
    expect(await call(app, '/api/health', undefined)).toMatchObject({ status: 200, body: { status: 'ok', idp: 'ok' } });
  });
});
