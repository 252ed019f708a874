/** @type {import('next').NextConfig} */
const nextConfig = {
  // Lets parallel builds (CI legs, benchmarks) keep separate outputs; the default is Next's own.
  distDir: process.env.NEXT_DIST_DIR || '.next',
  poweredByHeader: false,
  // `npm run typecheck` (tsc, strict) checks the whole project once in CI; the build need not repeat it.
  typescript: { ignoreBuildErrors: true },
  reactStrictMode: true,
  // Packages with native or dynamic requires stay outside the server bundle.
  serverExternalPackages: ['ioredis'],
  // SPA_DIR or SPA_UPSTREAM_URL (a built SPA served on this origin): known at build time here,
  // because Next compiles rewrites into the build. Everything outside /api and /_next goes to the
  // SPA route handler, which reads the source at run time.
  async rewrites() {
    if (!process.env.SPA_DIR && !process.env.SPA_UPSTREAM_URL) return [];
    return { beforeFiles: [{ source: '/:path((?!api/|api$|_next/).*)', destination: '/api/spa/:path' }] };
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
