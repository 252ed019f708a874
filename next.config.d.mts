// Types for what tests import from next.config.mjs (allowJs is off).
import type { NextConfig } from 'next';

/** One character of a path that decodes (see next.config.mjs). */
export declare const DECODABLE: string;
declare const nextConfig: NextConfig & { rewrites(): Promise<{ beforeFiles: Array<{ source: string; destination: string }> } | []> };
export default nextConfig;
