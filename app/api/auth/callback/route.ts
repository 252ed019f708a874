import { errorPage, finishLogin } from '../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export async function GET(request: Request): Promise<Response> {
  try {
    return await finishLogin(request);
  } catch (error) {
    return errorPage(error, 'auth.callback_failed');
  }
}
