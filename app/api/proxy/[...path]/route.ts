import { inboundFromWeb, webResponseFrom } from '../../../../lib/adapters.ts';
import { forwardRequest } from '../../../../lib/proxy.ts';

// The Vercel / `next start` adapter. On Node hosts `npm start` serves /api/proxy/* from the same
// core without passing through Next (server.ts).
export const dynamic = 'force-dynamic';

async function handle(request: Request): Promise<Response> {
  return webResponseFrom(await forwardRequest(inboundFromWeb(request, undefined)));
}

export { handle as GET, handle as HEAD, handle as POST, handle as PUT, handle as PATCH, handle as DELETE, handle as OPTIONS };
