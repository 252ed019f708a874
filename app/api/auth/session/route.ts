import { apiRoute, describeSession } from '../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export const GET = apiRoute(describeSession, 'auth.session_failed');
