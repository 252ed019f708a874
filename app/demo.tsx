'use client';

import { useState } from 'react';
import { GatehouseClientError, api, login, logout } from 'gatehouse/client';
import { useSession } from 'gatehouse/client/react';

export function Demo() {
  const session = useSession();
  const [answer, setAnswer] = useState<string>('');
  const [busy, setBusy] = useState(false);

  const callApi = async () => {
    setBusy(true);
    try {
      setAnswer(JSON.stringify(await api('demo').get('whoami'), null, 2));
    } catch (error) {
      setAnswer(error instanceof GatehouseClientError ? `${error.code}: ${error.message}` : String(error));
    } finally {
      setBusy(false);
    }
  };

  const authError = typeof window !== 'undefined' ? new URLSearchParams(window.location.search).get('authError') : null;

  return (
    <main className="shell">
      <header className="bar">
        <h1>Gatehouse demo</h1>
        <p className="tagline">The tokens stay on the server. This page only has a cookie it cannot read.</p>
      </header>
      {authError && (
        <p role="alert" className="notice">
          Sign-in: {authError}
        </p>
      )}
      {session.status === 'loading' ? (
        <p aria-live="polite">Loading…</p>
      ) : session.status === 'authenticated' && session.user ? (
        <section className="card" aria-labelledby="who">
          <h2 id="who">
            Signed in as <span data-testid="user-name">{String(session.user.name ?? session.user.sub)}</span>
          </h2>
          <dl className="facts">
            <dt>Subject</dt>
            <dd data-testid="user-sub">{session.user.sub}</dd>
            {typeof session.user.email === 'string' && (
              <>
                <dt>Email</dt>
                <dd>{session.user.email}</dd>
              </>
            )}
            <dt>Session ends</dt>
            <dd data-testid="expires-at">{session.expiresAt ? new Date(session.expiresAt * 1000).toLocaleString() : '—'}</dd>
          </dl>
          <div className="actions">
            <button type="button" onClick={callApi} disabled={busy} data-testid="call-api">
              Call the demo API
            </button>
            <button type="button" className="secondary" onClick={() => void logout()} data-testid="logout">
              Log out
            </button>
          </div>
          {answer && (
            <pre className="answer" data-testid="api-answer" aria-live="polite">
              {answer}
            </pre>
          )}
        </section>
      ) : (
        <section className="card">
          <h2>You are not signed in</h2>
          <p>Sign in with the identity provider. You will come straight back here.</p>
          <button type="button" onClick={() => login('/')} data-testid="login">
            Log in
          </button>
        </section>
      )}
    </main>
  );
}
