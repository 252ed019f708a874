import { apiError, checkHealth } from '../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export async function GET(): Promise<Response> {
  try {
    return await checkHealth();
  } catch (error) {
    return apiError(error, 'health_failed');
  }
}
