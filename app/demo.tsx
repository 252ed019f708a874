'use client';

import { useCallback, useEffect, useRef, useState } from 'react';
import {
  GatehouseClientError,
  StepUpRequiredError,
  api,
  endOtherSessions,
  endSession,
  listSessions,
  login,
  logout,
  streamEvents,
  type SessionEntry,
} from 'gatehouse/client';
import { useSession } from 'gatehouse/client/react';

/** The demo SPA: everything it does goes through gatehouse/client; it never sees a token. */
export function Demo() {
  const session = useSession();
  const authError = authErrorText(useSearchParam('authError'));

  return (
    <main className="shell">
      <header className="bar">
        <div>
          <h1>Gatehouse demo</h1>
          <p className="tagline">The tokens stay on the server. This page only has a cookie it cannot read.</p>
        </div>
        {session.status === 'authenticated' && (
          <button type="button" className="secondary" onClick={() => void logout()} data-testid="logout">
            Log out
          </button>
        )}
      </header>
      {authError && (
        <p role="alert" className="notice">
          Sign-in: {authError}
        </p>
      )}
      {session.status === 'loading' ? (
        <p aria-live="polite">Loading…</p>
      ) : session.status === 'authenticated' && session.user ? (
        <>
          <UserCard user={session.user} expiresAt={session.expiresAt} acr={session.acr} authTime={session.authTime} />
          <ApiCard />
          <StepUpCard />
          <EventsCard />
          <SessionsCard />
        </>
      ) : (
        <section className="card" aria-labelledby="signed-out">
          <h2 id="signed-out">You are not signed in</h2>
          {session.signedOutReason && (
            <p role="status" className="notice" data-testid="signed-out-reason">
              {session.signedOutReason}
            </p>
          )}
          <p>Sign in with the identity provider. You will come straight back here.</p>
          <button type="button" onClick={() => login()} data-testid="login">
            Log in
          </button>
        </section>
      )}
    </main>
  );
}

/**
 * What a silent login's `authError` says, in words of this page: the parameter is in a URL anyone
 * can link to, so its text is never shown (a link could make the app's own page say anything).
 */
const AUTH_ERRORS: Record<string, string> = {
  login_required: 'you are not signed in at the identity provider.',
  interaction_required: 'the identity provider needs you to sign in there first.',
  consent_required: 'the identity provider needs your consent first.',
  account_selection_required: 'the identity provider needs you to choose an account.',
  access_denied: 'it was refused.',
};

function authErrorText(code: string | null): string | null {
  if (code === null) return null;
  return Object.hasOwn(AUTH_ERRORS, code) ? (AUTH_ERRORS[code] as string) : 'it did not complete.';
}

function useSearchParam(name: string): string | null {
  const [value, setValue] = useState<string | null>(null);
  useEffect(() => setValue(new URLSearchParams(window.location.search).get(name)), [name]);
  return value;
}

function UserCard({ user, expiresAt, acr, authTime }: { user: Record<string, unknown> & { sub: string }; expiresAt: number | null; acr: string | null; authTime: number | null }) {
  return (
    <section className="card" aria-labelledby="who">
      <h2 id="who">
        Signed in as <span data-testid="user-name">{String(user.name ?? user.sub)}</span>
      </h2>
      <dl className="facts">
        <dt>Subject</dt>
        <dd data-testid="user-sub">{user.sub}</dd>
        {typeof user.email === 'string' && (
          <>
            <dt>Email</dt>
            <dd>{user.email}</dd>
          </>
        )}
        <dt>Signed in with</dt>
        <dd>
          <code data-testid="user-acr">{acr ?? 'unknown'}</code>
          {authTime !== null && <> at {new Date(authTime * 1000).toLocaleTimeString()}</>}
        </dd>
        <dt>Session ends</dt>
        <dd data-testid="expires-at">{expiresAt ? <Countdown until={expiresAt} /> : '—'}</dd>
      </dl>
    </section>
  );
}

function Countdown({ until }: { until: number }) {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), 30_000);
    return () => clearInterval(timer);
  }, []);
  const minutes = Math.max(0, Math.round((until * 1000 - now) / 60_000));
  const when = new Date(until * 1000).toLocaleString();
  return (
    <time dateTime={new Date(until * 1000).toISOString()} title={when}>
      {when} ({minutes >= 120 ? `in ${Math.round(minutes / 60)} h` : `in ${minutes} min`}, extended while you use it)
    </time>
  );
}

function describeError(error: unknown): string {
  return error instanceof GatehouseClientError ? `${error.code}: ${error.message}` : String(error);
}

function ApiCard() {
  const [answers, setAnswers] = useState<Record<string, string>>({});
  const [busy, setBusy] = useState<string | null>(null);
  const call = async (name: string, path: string) => {
    setBusy(name);
    try {
      setAnswers((all) => ({ ...all, [name]: '…' }));
      const body = await api(name).get(path);
      setAnswers((all) => ({ ...all, [name]: JSON.stringify(body, null, 2) }));
    } catch (error) {
      setAnswers((all) => ({ ...all, [name]: describeError(error) }));
    } finally {
      setBusy(null);
    }
  };
  return (
    <section className="card" aria-labelledby="apis">
      <h2 id="apis">Call an API through the proxy</h2>
      <p className="muted">
        <code>/api/proxy/demo</code> needs a signed-in user; <code>/api/proxy/public</code> takes the user&apos;s token when there is one.
      </p>
      <div className="actions">
        <button type="button" onClick={() => void call('demo', 'whoami')} disabled={busy !== null} data-testid="call-api">
          Call the demo API
        </button>
        <button type="button" onClick={() => void call('public', 'hello')} disabled={busy !== null} data-testid="call-public">
          Call the public API
        </button>
      </div>
      {Object.entries(answers).map(([name, text]) => (
        <figure key={name} className="answer-block">
          <figcaption>{name}</figcaption>
          <pre className="answer" data-testid={name === 'demo' ? 'api-answer' : `${name}-answer`} aria-live="polite">
            {text}
          </pre>
        </figure>
      ))}
    </section>
  );
}

/** Where a step-up sign-in comes back to: this page, told to make the call that needed it again. */
const RETRY_AFTER_STEP_UP = '/?retry=mfa';

/**
 * Step-up (RFC 9470): the demo API's mfa/* routes need a sign-in with a second factor. The call
 * fails with StepUpRequiredError; signing in again as it says comes back here, and the call is made
 * again by itself.
 */
function StepUpCard() {
  const [answer, setAnswer] = useState<string | null>(null);
  const [stepUp, setStepUp] = useState<StepUpRequiredError | null>(null);
  const [busy, setBusy] = useState(false);
  const callMfa = useCallback(async () => {
    setBusy(true);
    setStepUp(null);
    setAnswer('…');
    try {
      setAnswer(JSON.stringify(await api('demo').get('mfa/whoami'), null, 2));
    } catch (error) {
      if (error instanceof StepUpRequiredError) setStepUp(error);
      setAnswer(describeError(error));
    } finally {
      setBusy(false);
    }
  }, []);
  useEffect(() => {
    const url = new URL(window.location.href);
    if (url.searchParams.get('retry') !== 'mfa') return;
    url.searchParams.delete('retry');
    window.history.replaceState(null, '', url.pathname + url.search + url.hash);
    void callMfa();
  }, [callMfa]);
  return (
    <section className="card" aria-labelledby="step-up">
      <h2 id="step-up">Step-up: an API that needs a second factor</h2>
      <p className="muted">
        <code>/api/proxy/demo/mfa/whoami</code> answers only to a sign-in with a second factor; a password sign-in gets <code>step_up_required</code>.
      </p>
      <div className="actions">
        <button type="button" onClick={() => void callMfa()} disabled={busy} data-testid="call-mfa">
          Call the MFA-protected API
        </button>
        {stepUp && (
          <button type="button" onClick={() => login({ acrValues: stepUp.acrValues, maxAge: stepUp.maxAge, returnTo: RETRY_AFTER_STEP_UP })} data-testid="step-up">
            Sign in with a second factor
          </button>
        )}
      </div>
      {answer !== null && (
        <pre className="answer" data-testid="mfa-answer" aria-live="polite">
          {answer}
        </pre>
      )}
    </section>
  );
}

interface StreamedEvent {
  n: number;
  at: number;
  receivedAt: number;
}

function EventsCard() {
  const [events, setEvents] = useState<StreamedEvent[]>([]);
  const [state, setState] = useState<'idle' | 'streaming' | 'done' | 'stopped' | string>('idle');
  const controller = useRef<AbortController | null>(null);
  useEffect(() => () => controller.current?.abort(), []);

  const start = async () => {
    controller.current?.abort();
    controller.current = new AbortController();
    setEvents([]);
    setState('streaming');
    try {
      await streamEvents(
        '/api/proxy/demo/events?count=8&intervalMs=400',
        (data) => {
          const event = JSON.parse(data) as { n: number; at: number };
          setEvents((all) => [...all, { ...event, receivedAt: Date.now() }]);
        },
        controller.current.signal,
      );
      setState('done');
    } catch (error) {
      // Stopped by the button: say so, and keep what arrived on screen.
      setState(controller.current?.signal.aborted ? 'stopped' : describeError(error));
    }
  };

  return (
    <section className="card" aria-labelledby="events">
      <h2 id="events">Live events</h2>
      <p className="muted">Server-sent events from the demo API arrive one by one through the proxy.</p>
      <div className="actions">
        <button type="button" onClick={() => void start()} disabled={state === 'streaming'} data-testid="start-stream">
          {state === 'streaming' ? 'Streaming…' : 'Start the stream'}
        </button>
        {state === 'streaming' && (
          <button type="button" className="secondary" onClick={() => controller.current?.abort()} data-testid="stop-stream">
            Stop
          </button>
        )}
      </div>
      <ol className="events" data-testid="events" aria-live="polite">
        {events.map((event) => (
          <li key={event.n} data-testid="event">
            Event {event.n} <span className="muted">after {event.receivedAt - (events[0]?.receivedAt ?? event.receivedAt)} ms</span>
          </li>
        ))}
      </ol>
      {state !== 'idle' && state !== 'streaming' && (
        <p className="muted" data-testid="stream-state">
          {state === 'done' ? 'Stream finished.' : state === 'stopped' ? `Stream stopped after ${events.length} event${events.length === 1 ? '' : 's'}.` : state}
        </p>
      )}
    </section>
  );
}

function SessionsCard() {
  const session = useSession();
  const [sessions, setSessions] = useState<SessionEntry[] | null>(null);
  const [message, setMessage] = useState('');
  const load = useCallback(async () => {
    try {
      setSessions(await listSessions());
    } catch (error) {
      setMessage(describeError(error));
    }
  }, []);
  useEffect(() => {
    void load();
  }, [load]);

  const signOutElsewhere = async () => {
    try {
      const ended = await endOtherSessions();
      setMessage(ended === 1 ? 'Signed out 1 other session.' : `Signed out ${ended} other sessions.`);
      await load();
    } catch (error) {
      setMessage(describeError(error));
    }
  };
  const end = async (entry: SessionEntry) => {
    try {
      await endSession(entry.handle);
      if (entry.current) await session.refresh();
      else await load();
    } catch (error) {
      setMessage(describeError(error));
    }
  };

  return (
    <section className="card" aria-labelledby="devices">
      <h2 id="devices">Your sessions</h2>
      {sessions === null ? (
        <p aria-live="polite">Loading…</p>
      ) : (
        <ul className="sessions" data-testid="sessions">
          {sessions.map((entry) => (
            <li key={entry.handle} data-testid="session-entry" data-current={entry.current}>
              <div>
                <strong>{entry.device}</strong> {entry.current && <span className="badge">this browser</span>}
                <div className="muted">
                  signed in {new Date(entry.createdAt * 1000).toLocaleString()} · last used {new Date(entry.lastUsedAt * 1000).toLocaleString()}
                </div>
              </div>
              <button type="button" className="secondary small" onClick={() => void end(entry)} aria-label={`Sign out ${entry.device}${entry.current ? ' (this browser)' : ''}`}>
                Sign out
              </button>
            </li>
          ))}
        </ul>
      )}
      <div className="actions">
        <button type="button" onClick={() => void signOutElsewhere()} data-testid="sign-out-elsewhere">
          Sign out everywhere else
        </button>
        <button type="button" className="secondary" onClick={() => void load()}>
          Refresh list
        </button>
      </div>
      {message && (
        <p className="muted" role="status" data-testid="sessions-message">
          {message}
        </p>
      )}
    </section>
  );
}
