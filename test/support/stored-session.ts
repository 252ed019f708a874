// The one place tests know the at-rest format of a session (a dir/A256GCM JWE under an
// HKDF-derived key): only so that "this refresh token was revoked" can be asked of the IdP itself.
import { compactDecrypt } from 'jose';
import { Redis } from 'ioredis';

export interface StoredSecrets {
  accessToken?: string;
  refreshToken?: string;
  /** With OIDC_DPOP: the session's private key (a P-256 JWK). */
  dpopKey?: { kty: string; crv: string; x: string; y: string; d: string };
}

export async function storedSecrets(redisUrl: string, key: string, sessionSecret: string): Promise<StoredSecrets> {
  const redis = new Redis(redisUrl, { lazyConnect: true, maxRetriesPerRequest: 1 });
  await redis.connect();
  const raw = await redis.get(key).finally(() => redis.disconnect());
  const { sealed } = JSON.parse(raw ?? '{}') as { sealed?: string };
  if (!sealed) throw new Error(`no session record at ${key}`);
  const encoder = new TextEncoder();
  const material = await crypto.subtle.importKey('raw', encoder.encode(sessionSecret), 'HKDF', false, ['deriveBits']);
  const bits = await crypto.subtle.deriveBits(
    { name: 'HKDF', hash: 'SHA-256', salt: encoder.encode('gatehouse'), info: encoder.encode('token encryption v1') },
    material,
    256,
  );
  const { plaintext } = await compactDecrypt(sealed, new Uint8Array(bits));
  return JSON.parse(new TextDecoder().decode(plaintext)) as StoredSecrets;
}

/** Asks the IdP's token endpoint to redeem a refresh token as Gatehouse's client would. */
export async function redeemRefreshToken(issuer: string, clientId: string, clientSecret: string, refreshToken: string): Promise<{ status: number; error?: string }> {
  const discovery = (await (await fetch(`${issuer}/.well-known/openid-configuration`)).json()) as { token_endpoint: string };
  const res = await fetch(discovery.token_endpoint, {
    method: 'POST',
    headers: {
      'content-type': 'application/x-www-form-urlencoded',
      authorization: `Basic ${Buffer.from(`${encodeURIComponent(clientId)}:${encodeURIComponent(clientSecret)}`).toString('base64')}`,
    },
    body: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: refreshToken }),
  });
  const body = (await res.json()) as { error?: string };
  return { status: res.status, error: body.error };
}
