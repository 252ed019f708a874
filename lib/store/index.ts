import type { Store } from './types.ts';
import { createMemoryStore } from './memory.ts';
import { createRedisStore } from './redis.ts';
import { createUpstashStore } from './upstash.ts';

export type { Store };

export type StoreConfig =
  | { kind: 'memory' }
  | { kind: 'redis'; url: string; tlsCa?: string; sentinelPassword?: string }
  | { kind: 'upstash'; url: string; token: string };

export function createStore(config: StoreConfig): Store {
  switch (config.kind) {
    case 'memory':
      return createMemoryStore();
    case 'redis':
      return createRedisStore(config.url, { tlsCa: config.tlsCa, sentinelPassword: config.sentinelPassword });
    case 'upstash':
      return createUpstashStore(config.url, config.token);
  }
}
