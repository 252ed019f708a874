import { after } from 'next/server';
import { inboundFromWeb, webResponseFrom } from '../../../../lib/adapters.ts';
import { forwardRequest } from '../../../../lib/proxy.ts';
import { finishRefreshesWith } from '../../../../lib/tokens.ts';

// The Vercel / `next start` adapter. On Node hosts `npm start` serves /api/proxy/* from the same
// core without passing through Next (server.ts).
export const dynamic = 'force-dynamic';
// The proxy core uses node:http, node:stream and node:zlib.
export const runtime = 'nodejs';
// Vercel ends a function at maxDuration (300 s is the default on every plan with Fluid compute;
// Pro and Enterprise may raise it to 800): a server-sent event stream through the proxy ends
// there, and the SPA opens it again (README, "Deploying to Vercel").
export const maxDuration = 300;
// A refresh the caller stopped waiting for (REFRESH_WAIT_MS) runs on after the response: on
// Vercel only work handed to after() is not frozen with the function.
finishRefreshesWith(after);

async function handle(request: Request): Promise<Response> {
  return webResponseFrom(await forwardRequest(inboundFromWeb(request, undefined)));
}

export { handle as GET, handle as HEAD, handle as POST, handle as PUT, handle as PATCH, handle as DELETE, handle as OPTIONS };
