import { apiRoute, backchannelLogout } from '../../../../lib/auth.ts';

// Server-to-server from the IdP: no cookie, no CSRF header; the signed logout token is the proof.
export const dynamic = 'force-dynamic';

export const POST = apiRoute(backchannelLogout, 'auth.backchannel_logout_failed');
