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
export declare function seededRng(seed: number): Rng;
/** Shuffles `items` in place (Fisher–Yates) with `rng`. */
export declare function shuffle<T>(items: T[], rng: Rng): T[];
/**
 * The comparison that orders priority groups among `labels`, most preferred first: numeric when
 * every label is an integer, else plain string (code unit) order — decided for the whole set, as
 * `streamfarm_core::model::group_comparator` does.
 */
export declare function groupComparator(labels: string[]): (a: string, b: string) => number;
/** The distinct group labels, most preferred first. */
export declare function groupOrder(labels: string[]): string[];
