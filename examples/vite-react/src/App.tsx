import { useState } from 'react';
import { GatehouseClientError, api, login, logout } from '@gatehouse/client';
import { useSession } from '@gatehouse/client/react';

// "demo" is the name of the API in Gatehouse's BFF_APIS; the zero-config `npm run dev` defines it.
// The call goes to /api/proxy/demo/whoami on this origin, and Gatehouse attaches the access token.
const demoApi = api('demo');

export function App() {
  const session = useSession();
  const [answer, setAnswer] = useState<string | null>(null);
  const [failure, setFailure] = useState<string | null>(null);

  async function callApi() {
    setFailure(null);
    try {
      setAnswer(JSON.stringify(await demoApi.get('whoami'), null, 2));
    } catch (error) {
      // A session that ended is also announced to useSession, which then shows the signed-out view.
      setFailure(error instanceof GatehouseClientError ? `${error.code}: ${error.message}` : String(error));
    }
  }

  if (session.status === 'loading') return <main aria-busy="true" />;

  if (session.status === 'unauthenticated') {
    return (
      <main>
        <h1 data-testid="title">Orders</h1>
        {session.signedOutReason ? <p role="status">{session.signedOutReason}</p> : <p>Sign in to see your orders.</p>}
        <button data-testid="login" onClick={() => login()}>
          Sign in
        </button>
      </main>
    );
  }

  const name = typeof session.user?.name === 'string' ? session.user.name : session.user?.sub;
  return (
    <main>
      <h1 data-testid="title">Orders</h1>
      <p>
        Signed in as <strong data-testid="user-sub">{session.user?.sub}</strong>
        {name !== session.user?.sub ? ` (${name})` : null}. The browser holds only an HTTP-only cookie; the
        tokens stay on the server.
      </p>
      <button data-testid="call-api" onClick={() => void callApi()}>
        Call the API
      </button>
      <button data-testid="logout" className="secondary" onClick={() => void logout()}>
        Sign out
      </button>
      {failure ? <p role="alert">{failure}</p> : null}
      {answer ? <pre data-testid="api-answer">{answer}</pre> : null}
    </main>
  );
}
