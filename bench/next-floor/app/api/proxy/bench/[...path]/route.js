import http from 'node:http';
import { Readable } from 'node:stream';

// The same transport as Gatehouse's proxy (node:http with a keep-alive agent), so the difference
// between the two legs is Gatehouse's own work, not the HTTP client.
const agent = new http.Agent({ keepAlive: true, maxSockets: 512, maxFreeSockets: 64, scheduling: 'lifo', timeout: 30_000 });
const upstream = new URL(process.env.UPSTREAM_URL ?? 'http://127.0.0.1:1');

export const dynamic = 'force-dynamic';

export async function GET(request) {
  const url = new URL(request.url);
  const target = new URL(url.pathname.replace(/^\/api\/proxy\/bench/, '') + url.search, upstream);
  const answer = await new Promise((resolve, reject) => {
    const outgoing = http.request(target, { agent, headers: { authorization: request.headers.get('authorization') ?? '', host: target.host } }, resolve);
    outgoing.on('error', reject);
    outgoing.end();
  });
  const headers = new Headers();
  for (const [name, value] of Object.entries(answer.headers)) if (typeof value === 'string' && name !== 'connection' && name !== 'keep-alive') headers.set(name, value);
  return new Response(Readable.toWeb(answer), { status: answer.statusCode, headers });
}
