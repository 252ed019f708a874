// @vitest-environment happy-dom
import fc from 'fast-check';
import { act } from 'react';
import { createRoot } from 'react-dom/client';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { GatehouseClientError, SESSION_ENDED_EVENT, StepUpRequiredError, api, bffFetch, configure, getSession, login, streamEvents } from '../../lib/client/index.ts';
import { refreshSession, resetSessionStateForTests, useSession } from '../../lib/client/react.ts';

// The network is the one thing faked here: these tests pin the client's own behaviour; the
// end-to-end suite drives the same client against the real server in Chromium.
const fetchMock = vi.fn<typeof fetch>();

function json(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json', ...headers } });
}

beforeEach(() => {
  fetchMock.mockReset();
  vi.stubGlobal('fetch', fetchMock);
  configure({ redirectToLoginOnSessionEnd: false });
  resetSessionStateForTests();
  (globalThis as { IS_REACT_ACT_ENVIRONMENT?: boolean }).IS_REACT_ACT_ENVIRONMENT = true;
});
afterEach(() => vi.unstubAllGlobals());

describe('api(name) paths', () => {
  it('never sends a call that the browser would resolve out of the API (to /api/auth/*, another API)', async () => {
    fetchMock.mockImplementation(async () => json(200, {}));
    const piece = fc.constantFrom('..', '.', '%2e', '%2E', '.%2e', '%2e%2e', '\\', '/', '//', 'a', 'items', 'auth', 'sessions', '\t', '?x=1', '#f', '%2f', '%5c', '..;');
    await fc.assert(
      fc.asyncProperty(fc.array(piece, { maxLength: 10 }), fc.constantFrom('get', 'delete', 'post', 'put', 'patch'), async (pieces, method) => {
        fetchMock.mockClear();
        const path = pieces.join('');
        const outcome = await api('orders')[method as 'get'](path).then(
          () => 'sent',
          (error: unknown) => (error as { code?: string }).code,
        );
        if (outcome === 'invalid_path') {
          expect(fetchMock).not.toHaveBeenCalled();
          return;
        }
        expect(outcome, path).toBe('sent');
        // Where the browser sends it: the same resolution fetch() applies to a relative URL.
        const sentTo = new URL(String(fetchMock.mock.calls[0]![0]), 'https://app.example.com').pathname;
        expect(sentTo.startsWith('/api/proxy/orders/'), `${JSON.stringify(path)} → ${sentTo}`).toBe(true);
      }),
      { numRuns: 2_000, examples: [[['..', '/', '..', '/', 'auth', '/', 'sessions'], 'delete'], [['%2e%2e', '/', '%2e%2e', '/', 'auth'], 'post'], [['a', '\\', '..', '\\', '..'], 'get']] },
    );
    // Ordinary paths are untouched.
    fetchMock.mockClear();
    await api('orders').get('items/7?tab=1');
    expect(fetchMock.mock.calls[0]![0]).toBe('/api/proxy/orders/items/7?tab=1');
  });
});

describe('streamEvents(path)', () => {
  it('reads only through the proxy on this origin: a path the browser would resolve elsewhere is refused before anything is sent', async () => {
    fetchMock.mockImplementation(async () => new Response('data: x\n\n', { status: 200, headers: { 'content-type': 'text/event-stream' } }));
    const piece = fc.constantFrom('..', '.', '%2e', '%2E%2e', '\\', '/', '//', 'api', 'proxy', 'auth', 'sessions', 'demo', 'events', 'evil.example', 'https:', '?x', '#f');
    await fc.assert(
      fc.asyncProperty(fc.constantFrom('/api/proxy/', '/api/proxy/demo/', '', '/', '//', 'https://evil.example/api/proxy/'), fc.array(piece, { maxLength: 8 }), async (head, pieces) => {
        fetchMock.mockClear();
        const path = head + pieces.join('');
        const outcome = await streamEvents(path, () => undefined).then(
          () => 'sent',
          (error: unknown) => (error as { code?: string }).code,
        );
        if (outcome === 'invalid_path') {
          expect(fetchMock).not.toHaveBeenCalled();
          return;
        }
        const sentTo = new URL(String(fetchMock.mock.calls[0]![0]), 'https://app.example.com');
        expect([sentTo.origin, sentTo.pathname.startsWith('/api/proxy/')], path).toEqual(['https://app.example.com', true]);
      }),
      { numRuns: 1_000, examples: [['/api/proxy/', ['..', '/', 'auth', '/', 'sessions']], ['https://evil.example/api/proxy/', ['demo']]] },
    );
    const seen: string[] = [];
    fetchMock.mockClear();
    await streamEvents('/api/proxy/demo/events', (data) => void seen.push(data));
    expect(seen).toEqual(['x']);
  });
});

describe('bffFetch', () => {
  it('always sends X-CSRF: 1 with same-origin credentials, whatever the caller passed', async () => {
    fetchMock.mockResolvedValue(json(200, {}));
    await bffFetch('/api/proxy/demo/x', { headers: { 'X-CSRF': '0', accept: 'application/json' }, credentials: 'include' });
    await api('demo').post('items', { a: 1 });
    for (const [, init] of fetchMock.mock.calls) {
      expect(new Headers(init?.headers).get('x-csrf')).toBe('1');
      expect(init?.credentials).toBe('same-origin');
    }
    const [url, init] = fetchMock.mock.calls[1]!;
    expect(url).toBe('/api/proxy/demo/items');
    expect(init?.method).toBe('POST');
    expect(new Headers(init?.headers).get('content-type')).toBe('application/json');
    expect(init?.body).toBe('{"a":1}');
  });

  it.each(['session_expired', 'unauthenticated', 'idp_unavailable', 'upstream_timeout', 'upstream_unavailable', 'csrf_failed'])(
    'turns Gatehouse error %s into a typed error',
    async (code) => {
      fetchMock.mockResolvedValue(json(503, { error: code, message: `m-${code}` }, { 'x-gatehouse-error': code }));
      const error = await bffFetch('/api/proxy/demo/x').catch((e: unknown) => e);
      expect(error).toBeInstanceOf(GatehouseClientError);
      expect(error).toMatchObject({ code, status: 503, message: `m-${code}` });
    },
  );

  it("leaves an upstream API's own JSON errors to the caller, and api() reports them as upstream_<status>", async () => {
    fetchMock.mockResolvedValue(json(404, { error: 'not_found' }));
    const response = await bffFetch('/api/proxy/demo/x');
    expect(response.status).toBe(404);
    await expect(api('demo').get('x')).rejects.toMatchObject({ code: 'upstream_404', status: 404 });
  });

  it('announces an ended session, and sends the user to login when configured', async () => {
    const ended = vi.fn();
    window.addEventListener(SESSION_ENDED_EVENT, ended);
    const assign = vi.spyOn(window.location, 'assign').mockImplementation(() => undefined);
    fetchMock.mockImplementation(async () => json(401, { error: 'session_expired', message: 'ended' }, { 'x-gatehouse-error': 'session_expired' }));
    await expect(bffFetch('/api/proxy/demo/x')).rejects.toMatchObject({ code: 'session_expired' });
    expect(ended).toHaveBeenCalledTimes(1);
    expect(assign).not.toHaveBeenCalled();
    configure({ redirectToLoginOnSessionEnd: true });
    window.history.replaceState(null, '', '/orders?id=7');
    await expect(bffFetch('/api/proxy/demo/x')).rejects.toMatchObject({ code: 'session_expired' });
    expect(assign).toHaveBeenCalledWith('/api/auth/login?returnTo=%2Forders%3Fid%3D7');
    window.removeEventListener(SESSION_ENDED_EVENT, ended);
  });

  it('retries once, and announces nothing, when a sign-in in another tab replaced the session mid-request', async () => {
    const ended = vi.fn();
    window.addEventListener(SESSION_ENDED_EVENT, ended);
    const replaced = () => json(401, { error: 'session_replaced', message: 'replaced' }, { 'x-gatehouse-error': 'session_replaced' });
    fetchMock.mockResolvedValueOnce(replaced()).mockResolvedValueOnce(json(200, { ok: true }));
    expect(await api('demo').post('items', { a: 1 })).toEqual({ ok: true });
    expect(fetchMock).toHaveBeenCalledTimes(2);
    expect(fetchMock.mock.calls[1]![1]?.body).toBe('{"a":1}');
    // Twice in a row is not a race any more: the caller hears it, still without a session-ended alarm.
    fetchMock.mockReset();
    fetchMock.mockImplementation(async () => replaced());
    await expect(bffFetch('/api/proxy/demo/x')).rejects.toMatchObject({ code: 'session_replaced', status: 401 });
    expect(fetchMock).toHaveBeenCalledTimes(2);
    expect(ended).not.toHaveBeenCalled();
    window.removeEventListener(SESSION_ENDED_EVENT, ended);
  });

  it('turns step_up_required into a StepUpRequiredError with what the new sign-in must bring, and announces no session end', async () => {
    const ended = vi.fn();
    window.addEventListener(SESSION_ENDED_EVENT, ended);
    const assign = vi.spyOn(window.location, 'assign').mockImplementation(() => undefined);
    configure({ redirectToLoginOnSessionEnd: true });
    const stepUp = (body: Record<string, unknown>) => json(401, { error: 'step_up_required', message: 'stronger', ...body }, { 'x-gatehouse-error': 'step_up_required' });
    fetchMock.mockResolvedValueOnce(stepUp({ acr_values: 'urn:gatehouse:mfa urn:x:hwk', max_age: 300 }));
    const error = await api('demo').get('mfa/whoami').catch((e: unknown) => e);
    expect(error).toBeInstanceOf(StepUpRequiredError);
    expect(error).toBeInstanceOf(GatehouseClientError);
    expect(error).toMatchObject({ code: 'step_up_required', status: 401, message: 'stronger', acrValues: ['urn:gatehouse:mfa', 'urn:x:hwk'], maxAge: 300 });
    // Values of another shape are not guessed at.
    for (const body of [{}, { acr_values: ['x'], max_age: '300' }, { acr_values: '', max_age: -1 }, { acr_values: 7, max_age: 1.5 }]) {
      fetchMock.mockResolvedValueOnce(stepUp(body));
      await expect(bffFetch('/api/proxy/demo/x')).rejects.toMatchObject({ code: 'step_up_required', acrValues: undefined, maxAge: undefined });
    }
    expect(ended).not.toHaveBeenCalled();
    expect(assign).not.toHaveBeenCalled();
    window.removeEventListener(SESSION_ENDED_EVENT, ended);
  });

  it('login() asks for a step-up with acrValues and maxAge, and still takes a bare returnTo', () => {
    const assign = vi.spyOn(window.location, 'assign').mockImplementation(() => undefined);
    window.history.replaceState(null, '', '/orders?id=7');
    login();
    login('/x');
    login({ acrValues: ['urn:gatehouse:mfa', 'gold'], maxAge: 0 });
    login({ returnTo: '/pay', acrValues: 'urn:gatehouse:mfa' });
    const error = new StepUpRequiredError(401, 'm', ['urn:gatehouse:mfa'], 60);
    login({ acrValues: error.acrValues, maxAge: error.maxAge, returnTo: '/pay' });
    expect(assign.mock.calls.map(([url]) => String(url))).toEqual([
      '/api/auth/login?returnTo=%2Forders%3Fid%3D7',
      '/api/auth/login?returnTo=%2Fx',
      '/api/auth/login?returnTo=%2Forders%3Fid%3D7&acr_values=urn%3Agatehouse%3Amfa%20gold&max_age=0',
      '/api/auth/login?returnTo=%2Fpay&acr_values=urn%3Agatehouse%3Amfa',
      '/api/auth/login?returnTo=%2Fpay&acr_values=urn%3Agatehouse%3Amfa&max_age=60',
    ]);
  });

  it('reads the session', async () => {
    fetchMock.mockResolvedValue(json(200, { authenticated: false }));
    expect(await getSession()).toEqual({ authenticated: false });
    expect(fetchMock.mock.calls[0]![0]).toBe('/api/auth/session');
  });
});

describe('useSession', () => {
  function Probe({ id }: { id: number }) {
    const session = useSession();
    return <span data-probe={id}>{session.status === 'authenticated' ? String(session.user?.sub) : session.status}</span>;
  }

  it('makes one session request however many components ask, and refetches on focus and on session end', async () => {
    let answer: unknown = { authenticated: true, user: { sub: 'alice' }, expiresAt: 1, logoutUrl: '/api/auth/logout?sid=x' };
    fetchMock.mockImplementation(async () => json(200, answer));
    const container = document.createElement('div');
    document.body.append(container);
    const root = createRoot(container);
    await act(async () => {
      root.render(
        <>
          {Array.from({ length: 25 }, (_, i) => (
            <Probe key={i} id={i} />
          ))}
        </>,
      );
    });
    await vi.waitFor(() => expect(container.textContent).toBe('alice'.repeat(25)));
    expect(fetchMock).toHaveBeenCalledTimes(1);

    answer = { authenticated: false };
    await act(async () => {
      window.dispatchEvent(new Event('focus'));
    });
    await vi.waitFor(() => expect(container.textContent).toBe('unauthenticated'.repeat(25)));
    expect(fetchMock).toHaveBeenCalledTimes(2);

    await act(async () => {
      window.dispatchEvent(new CustomEvent(SESSION_ENDED_EVENT));
    });
    await vi.waitFor(() => expect(fetchMock).toHaveBeenCalledTimes(3));

    // Many callers of refresh at once (say, every component after a failed call) share one request.
    await act(async () => {
      await Promise.all([refreshSession(), refreshSession(), refreshSession(), refreshSession()]);
    });
    expect(fetchMock).toHaveBeenCalledTimes(4);
    act(() => root.unmount());
  });

  it('says why the session ended: from the failed call that found out, or from the session endpoint', async () => {
    function Reason() {
      const session = useSession();
      return <span>{session.status === 'unauthenticated' ? `out: ${session.signedOutReason ?? 'no reason'}` : session.status}</span>;
    }
    let answer: unknown = { authenticated: true, user: { sub: 'alice' }, expiresAt: 1, logoutUrl: '/x' };
    fetchMock.mockImplementation(async (input) =>
      String(input).startsWith('/api/proxy/')
        ? json(401, { error: 'session_expired', message: 'You were signed out from another device.' }, { 'x-gatehouse-error': 'session_expired' })
        : json(200, answer),
    );
    const container = document.createElement('div');
    document.body.append(container);
    const root = createRoot(container);
    await act(async () => root.render(<Reason />));
    await vi.waitFor(() => expect(container.textContent).toBe('authenticated'));

    // A call finds the session ended; the refetch only says "not signed in" (its cookie was cleared).
    answer = { authenticated: false };
    await act(async () => {
      await expect(api('demo').get('x')).rejects.toMatchObject({ code: 'session_expired' });
    });
    await vi.waitFor(() => expect(container.textContent).toBe('out: You were signed out from another device.'));

    // The session endpoint's own word, for a page that was idle (focus) rather than calling.
    resetSessionStateForTests();
    answer = { authenticated: false, endedBy: 'idp' };
    await act(async () => {
      await refreshSession();
    });
    await vi.waitFor(() => expect(container.textContent).toBe('out: You signed out at the identity provider.'));

    // And for a session whose tokens ran out (its refresh token refused) while this page was idle.
    resetSessionStateForTests();
    answer = { authenticated: false, endedBy: 'expired' };
    await act(async () => {
      await refreshSession();
    });
    await vi.waitFor(() => expect(container.textContent).toBe('out: Your session has ended. Sign in again.'));
    act(() => root.unmount());
  });
});

describe('useSession and step-up', () => {
  it('tells how and when the user signed in, so a page can offer the step-up before calling', async () => {
    function SignIn() {
      const session = useSession();
      return <span>{session.status === 'authenticated' ? `${session.acr ?? 'no acr'} at ${session.authTime ?? 'unknown'}` : session.status}</span>;
    }
    let answer: unknown = { authenticated: true, user: { sub: 'alice' }, expiresAt: 1, acr: 'urn:gatehouse:mfa', authTime: 1700000000, logoutUrl: '/x' };
    fetchMock.mockImplementation(async () => json(200, answer));
    const container = document.createElement('div');
    document.body.append(container);
    const root = createRoot(container);
    await act(async () => root.render(<SignIn />));
    await vi.waitFor(() => expect(container.textContent).toBe('urn:gatehouse:mfa at 1700000000'));
    answer = { authenticated: true, user: { sub: 'alice' }, expiresAt: 1, logoutUrl: '/x' };
    await act(async () => {
      await refreshSession();
    });
    await vi.waitFor(() => expect(container.textContent).toBe('no acr at unknown'));
    act(() => root.unmount());
  });
});
