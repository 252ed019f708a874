import { apiRoute, logoutByApi, logoutByNavigation, pageRoute } from '../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

/** A top-level navigation from the session's own logoutUrl. */
export const GET = pageRoute(logoutByNavigation, 'auth.logout_failed', { retryPath: '/', action: 'out' });
/** For SPAs: X-CSRF, answers { redirectTo }. */
export const POST = apiRoute(logoutByApi, 'auth.logout_failed');
