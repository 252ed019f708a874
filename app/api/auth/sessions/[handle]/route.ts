import { apiRoute, endSessionByHandle } from '../../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export const DELETE = apiRoute(
  async (request: Request, context: { params: Promise<{ handle: string }> }) => endSessionByHandle(request, (await context.params).handle),
  'auth.sessions_failed',
);
