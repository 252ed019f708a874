import { apiRoute, endOtherSessions, listSessions } from '../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export const GET = apiRoute(listSessions, 'auth.sessions_failed');
/** Sign out everywhere else. */
export const DELETE = apiRoute(endOtherSessions, 'auth.sessions_failed');
