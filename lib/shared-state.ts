/**
 * One home per process for state that must not be split. `npm start` runs server.ts, which loads
 * lib/ itself, next to Next's server bundle, which carries its own copy of lib/: module-level
 * variables would be two objects in one process — two in-memory stores that cannot see each
 * other's sessions, two single-flight maps that would let one process refresh a session twice.
 * Whatever is kept here is keyed on a global symbol, so every copy of a module finds the same one.
 */
const HOME = Symbol.for('gatehouse.shared-state');

type Home = Map<string, unknown>;

export function sharedState<T>(name: string, create: () => T): T {
  const holder = globalThis as typeof globalThis & { [HOME]?: Home };
  const home = (holder[HOME] ??= new Map());
  if (!home.has(name)) home.set(name, create());
  return home.get(name) as T;
}
