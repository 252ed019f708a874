import fc from 'fast-check';
import type { AuthorizationServer } from 'oauth4webapi';
import { describe, expect, it } from 'vitest';
import { browserEndpoint, cleartextEndpointProblem, pushedAuthorizationProblem } from '../../lib/oidc.ts';

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

/** What start-up and every discovery refuse: an endpoint Gatehouse calls with secrets, or trusts keys from, reached in clear text. */
describe('cleartextEndpointProblem', () => {
  const names = ['token_endpoint', 'pushed_authorization_request_endpoint', 'revocation_endpoint', 'userinfo_endpoint', 'jwks_uri'] as const;
  const loopbackIssuer = 'http://127.0.0.1:4000';
  const remoteHost = fc.domain().filter((host) => !['localhost', '127.0.0.1'].includes(host));

  it('names any such endpoint on http off loopback, even where a loopback issuer lets oauth4webapi call http', () => {
    fc.assert(
      fc.property(fc.constantFrom(...names), remoteHost, fc.webPath(), fc.boolean(), (name, host, path, allowHttp) => {
        const as: AuthorizationServer = { issuer: loopbackIssuer, [name]: `http://${host}${path}` };
        const problem = cleartextEndpointProblem(as, allowHttp);
        expect(problem).toMatch(new RegExp(`^OIDC_ISSUER: the IdP's discovery document names ${name} "http://`));
        expect(problem).toContain('only over https');
      }),
    );
  });

  it('names the endpoint without the user name and password a URL may carry', () => {
    const problem = cleartextEndpointProblem({ issuer: loopbackIssuer, token_endpoint: 'http://gatehouse:s3cr3t-pass@idp.internal/token' }, true);
    expect(problem).toContain('token_endpoint "http://idp.internal/token"');
    expect(problem).not.toMatch(/s3cr3t|gatehouse:/);
  });

  it('names what is not an absolute URL at all, and http on loopback where the issuer is https', () => {
    for (const value of ['/token', '//evil.example/token', 'javascript:alert(1)', 'ftp://idp.example.com/token', '', 42]) {
      expect(cleartextEndpointProblem({ issuer: loopbackIssuer, jwks_uri: value as string }, true), JSON.stringify(value)).toMatch(/names jwks_uri/);
    }
    expect(cleartextEndpointProblem({ issuer: 'https://idp.example.com', token_endpoint: 'http://127.0.0.1:4000/token' }, false)).toMatch(/names token_endpoint/);
  });

  it('has nothing to say of https endpoints anywhere, of http on loopback for a loopback issuer, nor of endpoints the IdP does not publish', () => {
    fc.assert(
      fc.property(fc.subarray([...names]), fc.domain(), fc.webPath(), (present, host, path) => {
        const https: AuthorizationServer = { issuer: 'https://idp.example.com', ...Object.fromEntries(present.map((name) => [name, `https://${host}${path}`])) };
        expect(cleartextEndpointProblem(https, false)).toBeUndefined();
        const local: AuthorizationServer = { issuer: loopbackIssuer, ...Object.fromEntries(present.map((name) => [name, `http://localhost:4000${path}`])) };
        expect(cleartextEndpointProblem(local, true)).toBeUndefined();
      }),
    );
  });
});
