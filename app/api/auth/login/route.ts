import { errorPage, startLogin } from '../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export async function GET(request: Request): Promise<Response> {
  try {
    return await startLogin(request);
  } catch (error) {
    return errorPage(error, 'auth.login_failed');
  }
}
