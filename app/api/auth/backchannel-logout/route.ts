import { apiError, backchannelLogout } from '../../../../lib/auth.ts';

// Server-to-server from the IdP: no cookie, no CSRF header; the signed logout token is the proof.
export const dynamic = 'force-dynamic';

export async function POST(request: Request): Promise<Response> {
  try {
    return await backchannelLogout(request);
  } catch (error) {
    return apiError(error, 'auth.backchannel_logout_failed');
  }
}
