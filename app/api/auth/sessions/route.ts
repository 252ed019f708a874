import { apiError, endOtherSessions, listSessions } from '../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export async function GET(request: Request): Promise<Response> {
  try {
    return await listSessions(request);
  } catch (error) {
    return apiError(error, 'auth.sessions_failed');
  }
}

/** Sign out everywhere else. */
export async function DELETE(request: Request): Promise<Response> {
  try {
    return await endOtherSessions(request);
  } catch (error) {
    return apiError(error, 'auth.sessions_failed');
  }
}
