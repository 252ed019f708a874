import path from 'node:path';

/**
 * SPA_DIR for a build: on Vercel each route handler runs as a function that holds only the files
 * Next traced for it, so the SPA's files are listed for the SPA route. They must then live inside
 * the project (built there before `next build`); a folder outside it cannot ship with the function.
 */
function spaTracing() {
  if (!process.env.SPA_DIR) return {};
  const relative = path.relative(process.cwd(), path.resolve(process.env.SPA_DIR));
  if (!relative || relative.startsWith('..') || path.isAbsolute(relative)) {
    console.warn(`SPA_DIR ${process.env.SPA_DIR} is not a folder inside the project: next start on this machine serves it, a Vercel deployment would not contain it.`);
    return {};
  }
  // The key is a glob over route names, so the route's brackets cannot be spelled literally.
  return { outputFileTracingIncludes: { '/api/spa/**': [`${relative.split(path.sep).join('/')}/**/*`] } };
}

/**
 * One character of a path that decodes: anything but `%`, or an escape of UTF-8 as
 * decodeURIComponent reads it (middleware.ts's matcher holds the same, negated; a unit test checks both).
 */
export const DECODABLE =
  '(?:[^%]|%[0-7][0-9a-fA-F]|%[cC][2-9a-fA-F]%[89abAB][0-9a-fA-F]|%[dD][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[eE]0%[abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[eE][1-9a-cA-CefEF]%[89abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[eE][dD]%[89][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[fF]0%[9abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[fF][1-3]%[89abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F]|%[fF]4%8[0-9a-fA-F]%[89abAB][0-9a-fA-F]%[89abAB][0-9a-fA-F])';

/** @type {import('next').NextConfig} */
const nextConfig = {
  // Lets parallel builds (CI legs, benchmarks) keep separate outputs; the default is Next's own.
  distDir: process.env.NEXT_DIST_DIR || '.next',
  poweredByHeader: false,
  // `npm run typecheck` (tsc, strict) checks the whole project once in CI; the build need not repeat it.
  typescript: { ignoreBuildErrors: true },
  reactStrictMode: true,
  // Packages with native or dynamic requires stay outside the server bundle.
  // The OpenTelemetry SDK is loaded by instrumentation.ts from node_modules, as Node resolves it:
  // one copy of each package however many route bundles use the API.
  serverExternalPackages: ['ioredis', '@opentelemetry/api', '@opentelemetry/sdk-trace', '@opentelemetry/sdk-metrics', '@opentelemetry/exporter-prometheus', '@opentelemetry/exporter-trace-otlp-http', '@opentelemetry/exporter-trace-otlp-proto', '@opentelemetry/exporter-metrics-otlp-http', '@opentelemetry/exporter-metrics-otlp-proto', '@opentelemetry/resources', '@opentelemetry/core', '@opentelemetry/context-async-hooks'],
  ...spaTracing(),
  // Inlined into the build: instrumentation.ts stops a start whose SPA setting disagrees with the rewrite below.
  env: { GATEHOUSE_BUILT_WITH_SPA: process.env.SPA_DIR || process.env.SPA_UPSTREAM_URL ? '1' : '' },
  // SPA_DIR or SPA_UPSTREAM_URL (a built SPA served on this origin): known at build time here,
  // because Next compiles rewrites into the build. Everything outside /api and /_next goes to the
  // SPA route handler, which reads the source at run time.
  async rewrites() {
    if (!process.env.SPA_DIR && !process.env.SPA_UPSTREAM_URL) return [];
    // Only paths whose percent-escapes decode: Next fails on any other in the SPA route's segments
    // with a bare 500, and left alone it answers its readable 404 page (`npm start` 404s them too).
    return { beforeFiles: [{ source: `/:path((?!api/|api$|_next/)(?=${DECODABLE}*$).*)`, destination: '/api/spa/:path' }] };
  },
  async headers() {
    return [
      {
        source: '/:path*',
        headers: [
          { key: 'x-content-type-options', value: 'nosniff' },
          { key: 'referrer-policy', value: 'same-origin' },
          { key: 'x-frame-options', value: 'DENY' },
        ],
      },
    ];
  },
};

export default nextConfig;
