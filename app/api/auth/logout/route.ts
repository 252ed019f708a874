import { apiError, errorPage, logoutByApi, logoutByNavigation } from '../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export async function GET(request: Request): Promise<Response> {
  try {
    return await logoutByNavigation(request);
  } catch (error) {
    return errorPage(error, 'auth.logout_failed', '/');
  }
}

export async function POST(request: Request): Promise<Response> {
  try {
    return await logoutByApi(request);
  } catch (error) {
    return apiError(error, 'auth.logout_failed');
  }
}
