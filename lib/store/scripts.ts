/*
 * The Lua scripts behind the Store's compare-and-act methods, shared by the Redis (TCP, Cluster)
 * and Upstash stores so both run the very same server-side step. The memory store mirrors them.
 */

/**
 * KEYS[1]: deletes the key and returns what it held (nil when gone). GETDEL does the same, but only
 * from Redis 6.2 on and under its own ACL permission; GET and DEL in a script need neither.
 */
export const TAKE_LUA = `
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('DEL', KEYS[1])
end
return value
`;

/** KEYS[1]: GET inside a script, which runs where writes do (the primary), never on a read replica. */
export const GET_LATEST_LUA = `return redis.call('GET', KEYS[1])`;

/** KEYS[1] lock, ARGV[1] owner: deletes the lock only while it is still the owner's. */
export const DEL_IF_EQUALS_LUA = `
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
`;

/** KEYS[1] lock, ARGV[1] owner, ARGV[2] ttl in ms: renews the lease only while it is still the owner's. */
export const EXPIRE_IF_EQUALS_LUA = `
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
`;

/**
 * KEYS[1] value key, KEYS[2] its lock (same hash tag, so one Cluster slot), ARGV[1] value,
 * ARGV[2] owner: SET XX KEEPTTL only while the lock is still the owner's.
 */
export const REPLACE_IF_HELD_LUA = `
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
if redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL', 'XX') then
  return 1
end
return 0
`;
