import type { AuthorizationServer } from 'oauth4webapi';
import { describe, expect, it } from 'vitest';
import { browserEndpoint, pushedAuthorizationProblem } from '../../lib/oidc.ts';

/** What start-up and every login refuse: PAR required (by the IdP or OIDC_USE_PAR) with nowhere to push to. */
describe('pushedAuthorizationProblem', () => {
  const issuer = 'https://idp.example.com';
  const endpoint = { pushed_authorization_request_endpoint: `${issuer}/par` };

  it('names an IdP that requires PAR and publishes no endpoint, whatever OIDC_USE_PAR says', () => {
    const as: AuthorizationServer = { issuer, require_pushed_authorization_requests: true };
    for (const usePar of [false, true]) {
      expect(pushedAuthorizationProblem(as, usePar)).toBe(
        `OIDC_ISSUER: the IdP requires pushed authorization requests (require_pushed_authorization_requests: true) but publishes no pushed_authorization_request_endpoint (${issuer})`,
      );
    }
  });

  it('names OIDC_USE_PAR when the IdP publishes no endpoint', () => {
    expect(pushedAuthorizationProblem({ issuer }, true)).toBe(
      `OIDC_USE_PAR: is true, but the IdP publishes no pushed_authorization_request_endpoint; enable PAR at the IdP or unset OIDC_USE_PAR (${issuer})`,
    );
  });

  it('has nothing to say when there is an endpoint, or when nobody asks for PAR', () => {
    expect(pushedAuthorizationProblem({ issuer, ...endpoint, require_pushed_authorization_requests: true }, false)).toBeUndefined();
    expect(pushedAuthorizationProblem({ issuer, ...endpoint }, true)).toBeUndefined();
    expect(pushedAuthorizationProblem({ issuer }, false)).toBeUndefined();
    expect(pushedAuthorizationProblem({ issuer, require_pushed_authorization_requests: false }, false)).toBeUndefined();
  });
});

/** Where Gatehouse sends the browser on the IdP's word (its discovery document): only there if it is an absolute https URL. */
describe('browserEndpoint', () => {
  it('takes an absolute https URL, and http on loopback only where the issuer itself is http (on loopback)', () => {
    expect(browserEndpoint('https://idp.example.com/session/end?x=1', false)?.href).toBe('https://idp.example.com/session/end?x=1');
    expect(browserEndpoint('http://127.0.0.1:4000/session/end', true)?.href).toBe('http://127.0.0.1:4000/session/end');
    expect(browserEndpoint('http://localhost:4000/session/end', true)?.href).toBe('http://localhost:4000/session/end');
    expect(browserEndpoint('http://127.0.0.1:4000/session/end', false)).toBeUndefined();
    expect(browserEndpoint('http://idp.example.com/session/end', true)).toBeUndefined();
  });

  it('refuses what a broken or hostile document may hold: relative paths, other schemes, no string at all', () => {
    const hostile: unknown[] = ['/session/end', 'session/end', '//evil.example/x', 'javascript:alert(document.domain)', 'JavaScript:alert(1)', 'data:text/html,<script>1</script>', 'vbscript:x', 'file:///etc/passwd', 'ftp://idp.example.com/x', 'ws://idp.example.com/x', '', ' ', 42, null, {}, ['https://idp.example.com/x']];
    for (const value of hostile) for (const allowHttp of [false, true]) expect(browserEndpoint(value, allowHttp), JSON.stringify(value)).toBeUndefined();
  });
});
