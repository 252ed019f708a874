import { finishLogin, pageRoute } from '../../../../lib/auth.ts';

export const dynamic = 'force-dynamic';

export const GET = pageRoute(finishLogin, 'auth.callback_failed');
