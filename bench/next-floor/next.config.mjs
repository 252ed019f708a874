/**
 * The framework's own floor for the route-handler leg of `npm run bench`: a bare Next app whose only
 * route forwards to the bench upstream, with no session, no token and no checks. Gatehouse's
 * `next start` leg is measured against it (target: ≥ 0.75× its req/s, ≤ 1.4× its CPU per request).
 */
const nextConfig = { poweredByHeader: false, distDir: '.next' };

export default nextConfig;
