import { webResponseFrom } from '../../../../lib/adapters.ts';
import { apiRoute } from '../../../../lib/auth.ts';
import { getConfig } from '../../../../lib/config.ts';
import { GatehouseError } from '../../../../lib/errors.ts';
import { serveSpa } from '../../../../lib/spa.ts';

// SPA_DIR under next start and on Vercel: next.config.mjs rewrites every path outside /api and
// /_next here when SPA_DIR is set at build time. `npm start` serves the same from server.ts.
export const dynamic = 'force-dynamic';
export const runtime = 'nodejs';

async function handle(request: Request, context: { params: Promise<{ path?: string[] }> }): Promise<Response> {
  const { spa } = getConfig();
  const segments = (await context.params).path ?? [];
  const answer = spa ? await serveSpa(request.method, `/${segments.map(encodeURIComponent).join('/')}`, spa.dir, spa.contentSecurityPolicy) : null;
  if (!answer) throw new GatehouseError('not_found', 404, 'Nothing here.');
  return webResponseFrom(answer);
}

export const GET = apiRoute(handle, 'spa.failed');
export const HEAD = GET;
