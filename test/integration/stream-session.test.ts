import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loginThroughRp, type CookieJars } from '../../e2e/support/headless-login.ts';
import { startStack, type Stack } from '../../e2e/support/stack.ts';
import { login, waitFor } from '../support/http-client.ts';

/**
 * A streamed answer (server-sent events, a long download) is the user's data flowing on: it must
 * stop when the session ends, as an open WebSocket does, whichever instance ends it.
 */

const CHECK_INTERVAL_SEC = 2;
let stack: Stack;

beforeAll(async () => {
  stack = await startStack({ instances: 2, workers: 1, env: { LOG_LEVEL: 'info', WEBSOCKET_SESSION_CHECK_INTERVAL: String(CHECK_INTERVAL_SEC) } });
});

afterAll(async () => {
  await stack?.stop();
});

/** An event stream of about a minute through the first instance, its first event read. */
async function openStream(cookie: string) {
  const response = await fetch(`${stack.apps[0]!.url}/api/proxy/demo/events?count=600&intervalMs=100`, { headers: { cookie, 'x-csrf': '1' } });
  expect(response.status).toBe(200);
  const reader = response.body!.getReader();
  expect((await reader.read()).done).toBe(false);
  let events = 1;
  const ended = (async function drain(): Promise<'whole' | 'cut'> {
    const { done } = await reader.read();
    if (done) return 'whole';
    events += 1;
    return drain();
  })().catch(() => 'cut' as const);
  return { ended, events: () => events, cancel: () => reader.cancel() };
}

/** The first instance's `proxy.stream_ended` lines since `since` (info lines reach its output within 200 ms). */
function endedLines(since: number): Promise<Array<Record<string, unknown>>> {
  const lines = () =>
    stack.apps[0]!.process
      .output()
      .slice(since)
      .split('\n')
      .filter((line) => line.includes('"proxy.stream_ended"'))
      .map((line) => JSON.parse(line) as Record<string, unknown>);
  return waitFor('the stream’s end to be logged', () => (lines().length ? lines() : undefined), 5_000, 50);
}

/** A call through the first instance, its body read to the end or to a cut, bytes counted. */
async function callCounting(path: string, cookie: string, method = 'GET') {
  const response = await fetch(`${stack.apps[0]!.url}${path}`, { method, headers: { cookie, 'x-csrf': '1' } });
  let bytes = 0;
  const chunks: Uint8Array[] = [];
  const reader = response.body!.getReader();
  const read = await (async function drain(): Promise<'whole' | 'cut'> {
    const { done, value } = await reader.read();
    if (done) return 'whole';
    bytes += value.length;
    chunks.push(value);
    return drain();
  })().catch(() => 'cut' as const);
  return { status: response.status, read, bytes, text: Buffer.concat(chunks).toString(), clearsCookie: /Max-Age=0/i.test(response.headers.get('set-cookie') ?? '') };
}

describe('a streamed answer ends with its session', () => {
  it('a logout on the same instance cuts it at once; another user’s stream flows on', async () => {
    const [cookie, bystanderCookie] = await Promise.all([login(stack.apps[0]!.url, 'stream-leaver'), login(stack.apps[0]!.url, 'stream-stayer')]);
    const since = stack.apps[0]!.process.output().length;
    const [stream, bystander] = await Promise.all([openStream(cookie), openStream(bystanderCookie)]);
    const logout = await fetch(`${stack.apps[0]!.url}/api/auth/logout`, { method: 'POST', headers: { cookie, 'x-csrf': '1' } });
    expect(logout.status).toBe(200);
    // Well inside the session check's interval, so it was not the check that ended it.
    expect(await Promise.race([stream.ended, new Promise((resolve) => setTimeout(resolve, CHECK_INTERVAL_SEC * 1000 - 500, 'still open'))])).toBe('cut');
    expect(await endedLines(since)).toEqual([expect.objectContaining({ reason: 'session_ended', detectedBy: 'this_process', api: 'demo' })]);
    const seen = bystander.events();
    await waitFor('the other user’s stream to go on', () => (bystander.events() > seen + 2 ? true : undefined), 5_000, 50);
    await bystander.cancel();
  });

  it('a logout on another instance cuts it at the next session check', async () => {
    const cookie = await login(stack.apps[0]!.url, 'stream-elsewhere');
    const since = stack.apps[0]!.process.output().length;
    const stream = await openStream(cookie);
    const logout = await fetch(`${stack.apps[1]!.url}/api/auth/logout`, { method: 'POST', headers: { cookie, 'x-csrf': '1' } });
    expect(logout.status).toBe(200);
    expect(await stream.ended).toBe('cut');
    // Cut, not run to its end (a minute of events).
    expect(stream.events()).toBeLessThan(300);
    expect(await endedLines(since)).toEqual([expect.objectContaining({ reason: 'session_ended', detectedBy: 'session_check' })]);
  });

  it('a session that ends while its calls wait for the API: a GET hears what a call made then hears, a POST keeps its status and none of the body', async () => {
    const cookie = await login(stack.apps[0]!.url, 'stream-in-flight');
    // A small answer (read whole) and an event stream, both coming 2.5 s after the call.
    const paths = ['/api/proxy/demo/slow?ms=2500', '/api/proxy/demo/events?count=50&intervalMs=0&delayMs=2500'];
    const calls = Promise.all([callCounting(paths[0]!, cookie), callCounting(paths[1]!, cookie), callCounting(paths[0]!, cookie, 'POST'), callCounting(paths[1]!, cookie, 'POST')]);
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    expect((await fetch(`${stack.apps[0]!.url}/api/auth/logout`, { method: 'POST', headers: { cookie, 'x-csrf': '1' } })).status).toBe(200);
    const [getWhole, getStream, postWhole, postStream] = await calls;
    const after = await callCounting('/api/proxy/demo/whoami', cookie);
    expect(after.status).toBe(401);
    for (const answer of [getWhole, getStream]) {
      expect({ status: answer.status, text: answer.text, clearsCookie: answer.clearsCookie }).toEqual({ status: 401, text: after.text, clearsCookie: after.clearsCookie });
    }
    // The API acted on the POSTs: an error would invite a second attempt.
    for (const answer of [postWhole, postStream]) expect({ status: answer.status, read: answer.read, bytes: answer.bytes }).toEqual({ status: 200, read: 'cut', bytes: 0 });
  });

  it('a new login in the same browser while a call waits: the GET hears session_replaced and the new cookie stays', async () => {
    const jars: CookieJars = new Map();
    const loginHere = async () => {
      const { rpCookies } = await loginThroughRp({ startUrl: `${stack.apps[0]!.url}/api/auth/login`, username: 'stream-relogin', jars });
      return `gatehouse=${rpCookies.get('gatehouse')}`;
    };
    const first = await loginHere();
    const waiting = callCounting('/api/proxy/demo/slow?ms=2500', first);
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    const second = await loginHere();
    expect(second).not.toBe(first);
    const answer = await waiting;
    // Clearing the cookie here would sign the browser out of the session it has just begun.
    expect({ status: answer.status, error: (JSON.parse(answer.text) as { error: string }).error, clearsCookie: answer.clearsCookie }).toEqual({ status: 401, error: 'session_replaced', clearsCookie: false });
    expect((await callCounting('/api/proxy/demo/whoami', second)).status).toBe(200);
  });
});
