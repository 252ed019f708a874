import { apiError, describeSession } from '../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export async function GET(request: Request): Promise<Response> {
  try {
    return await describeSession(request);
  } catch (error) {
    return apiError(error, 'auth.session_failed');
  }
}
