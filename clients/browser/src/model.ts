/**
 * The farm model, as the node sends it (`docs/PROTOCOL.md` section 1): the same shape as
 * `streamfarm_core::FarmList`. Unknown fields are kept and ignored.
 */

/** A server's status. Only `UP` servers may be chosen. */
export type Status = 'UP' | 'DOWN' | 'DRAINING';

/** One server of the farm list. */
export interface ServerEntry {
  /** Node name. */
  name?: string;
  /** Its streaming WebSocket url (the identity a client uses). */
  url: string;
  status: Status;
  /** Connected users. */
  users: number;
  /** Priority group: `A` before `B`; labels that are all integers compare as numbers. */
  priority: string;
  /** Users the server is sized for, when it says. */
  capacity?: number;
  /** Recent arrivals per second, when it says. */
  join_rate?: number;
  /** How long before `generated_at_ms` the `users` count was true, ms (absent: as old as the list). */
  users_age_ms?: number;
}

/** The farm list. */
export interface FarmList {
  servers: ServerEntry[];
  /** When the list server made it, ms since the Unix epoch. */
  generated_at_ms?: number;
  /** Lists the list server handed out since its own count, this one included: clients in flight. */
  in_flight?: number;
  /**
   * A number in `[0, 1)` the list server gave this list alone: the pick samples with it in place
   * of the client's own draw. Absent, or outside `[0, 1)`: the client draws for itself.
   */
  draw?: number;
}

/** A source of uniform numbers in `[0, 1)`: `Math.random`, or a seeded one in tests. */
export type Rng = () => number;

/** A small seeded RNG (mulberry32), for tests and reproducible runs. */
export function seededRng(seed: number): Rng {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Shuffles `items` in place (Fisher–Yates) with `rng`. */
export function shuffle<T>(items: T[], rng: Rng): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1));
    const t = items[i]!;
    items[i] = items[j]!;
    items[j] = t;
  }
  return items;
}

function allNumeric(labels: string[]): boolean {
  return labels.every((l) => l.length > 0 && /^[0-9]+$/.test(l));
}

function compareNumeric(a: string, b: string): number {
  const x = a.replace(/^0+/, '');
  const y = b.replace(/^0+/, '');
  if (x.length !== y.length) return x.length - y.length;
  return x < y ? -1 : x > y ? 1 : 0;
}

/**
 * The comparison that orders priority groups among `labels`, most preferred first: numeric when
 * every label is an integer, else plain string (code unit) order — decided for the whole set, as
 * `streamfarm_core::model::group_comparator` does.
 */
export function groupComparator(labels: string[]): (a: string, b: string) => number {
  const numeric = allNumeric(labels);
  return (a, b) => (numeric ? compareNumeric(a, b) : a < b ? -1 : a > b ? 1 : 0);
}

/** The distinct group labels, most preferred first. */
export function groupOrder(labels: string[]): string[] {
  const compare = groupComparator(labels);
  const sorted = [...labels].sort(compare);
  return sorted.filter((g, i) => i === 0 || compare(sorted[i - 1]!, g) !== 0);
}
