import { webResponseFrom } from '../../../../lib/adapters.ts';
import { apiRoute } from '../../../../lib/auth.ts';
import { getConfig } from '../../../../lib/config.ts';
import { GatehouseError } from '../../../../lib/errors.ts';
import { serveSpaFrom } from '../../../../lib/spa.ts';

// SPA_DIR or SPA_UPSTREAM_URL under next start: next.config.mjs rewrites every path outside /api
// and /_next here when either is set at build time. `npm start` serves the same from server.ts.
export const dynamic = 'force-dynamic';
export const runtime = 'nodejs';

async function handle(request: Request, context: { params: Promise<{ path?: string[] }> }): Promise<Response> {
  const { spa, proxy } = getConfig();
  const segments = (await context.params).path ?? [];
  const url = new URL(request.url);
  const rawUrl = `/${segments.map(encodeURIComponent).join('/')}${url.search}`;
  const answer = spa ? await serveSpaFrom(spa, request.method, rawUrl, (name) => request.headers.get(name) ?? undefined, proxy.sendTimeoutMs) : null;
  if (!answer) throw new GatehouseError('not_found', 404, 'Nothing here.');
  return webResponseFrom(answer);
}

export const GET = apiRoute(handle, 'spa.failed');
export const HEAD = GET;
