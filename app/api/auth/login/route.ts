import { pageRoute, startLogin } from '../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export const GET = pageRoute(startLogin, 'auth.login_failed');
