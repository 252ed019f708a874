import { apiRoute, checkHealth } from '../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export const GET = apiRoute(checkHealth, 'health_failed');
