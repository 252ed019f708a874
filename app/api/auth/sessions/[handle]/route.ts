import { apiError, endSessionByHandle } from '../../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export async function DELETE(request: Request, context: { params: Promise<{ handle: string }> }): Promise<Response> {
  try {
    return await endSessionByHandle(request, (await context.params).handle);
  } catch (error) {
    return apiError(error, 'auth.sessions_failed');
  }
}
