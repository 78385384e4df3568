/**
 * Server selection, ported from `streamfarm_core::selection` (and tested on the same shared
 * vectors): which server of a farm list a client connects to.
 *
 * Every policy starts with {@link candidates}: the `UP` servers the client has not excluded, of
 * the most preferred priority group that has any. The policies differ in how they weigh those:
 * `weighted` (the default; `patent`, the seeds' name, is an alias), `random`, `least-users`, `p2c` and `waterfill`
 * (staleness-aware). Pure functions: no clock, the RNG is passed in (a list's `draw` stands in for
 * it, as in Rust).
 */
import { type FarmList, type Rng, type Status } from './model.js';
/**
 * A way of weighing the live servers of the preferred group, by name or by an alias
 * ({@link POLICY_ALIASES}). `weighted`: every live server, weighted by the share of the users
 * connected elsewhere (`Policy::Weighted` in Rust, where the name is argued).
 */
export type Policy = 'weighted' | 'random' | 'least-users' | 'p2c' | 'waterfill' | PolicyAlias;
/** Other names of a policy: `patent`, the seeds' name of `weighted`, which options and scripts use. */
export type PolicyAlias = 'patent';
/** The policy each alias names (`Policy::ALIASES` in Rust). */
export declare const POLICY_ALIASES: Readonly<Record<PolicyAlias, Policy>>;
/** Every policy, in the order the Rust CLI lists them. */
export declare const POLICIES: readonly Policy[];
/** How the first step judged one server. */
export type Verdict = {
    kind: 'candidate';
} | {
    kind: 'not_up';
    status: Status;
} | {
    kind: 'excluded';
} | {
    kind: 'less_preferred_group';
};
/** Why no server could be chosen (code `no_server_available`, as in the vectors). */
export declare class NoServerAvailable extends Error {
    readonly listed: number;
    readonly notUp: number;
    readonly excluded: number;
    readonly code = "no_server_available";
    constructor(listed: number, notUp: number, excluded: number);
}
/** The candidates (indices into `list.servers`, list order), the group kept, and every verdict. */
export interface Candidates {
    indices: number[];
    group: string;
    verdicts: Verdict[];
}
/** What a client knows about its list besides the list itself; only `waterfill` uses it. */
export interface Context {
    /** How old the list is, in seconds. */
    listAgeS: number;
    /** Farm-wide arrivals per second, when the client knows better than the list's `join_rate`s. */
    arrivalRate?: number;
}
/** The first step of every policy; throws {@link NoServerAvailable}. */
export declare function candidates(list: FarmList, exclude?: readonly string[]): Candidates;
/** The exact probability with which `policy` chooses each server (list order; 0 for non-candidates). */
export declare function probabilities(policy: Policy, list: FarmList, exclude?: readonly string[], context?: Context): number[];
/**
 * The candidates' users brought to the instant of the freshest count among them (each older
 * count plus its join rate times the difference in age), each plus an even share of the other
 * clients in flight (`in_flight` less this list's own client, over the candidates), and that
 * count's age in seconds (`FarmList::users_at_one_instant` in Rust, sum for sum).
 */
export declare function usersAtOneInstant(list: FarmList, indices: number[]): {
    users: number[];
    ageS: number;
};
/** A server chosen by a policy, with the reasons. */
export interface Choice {
    /** Index of the chosen server in `list.servers`. */
    index: number;
    /** The probability of every server of the list under the policy. */
    probabilities: number[];
    /** How each server was judged before weighing. */
    candidates: Candidates;
}
/**
 * Chooses a server of `list` with `policy`; throws {@link NoServerAvailable}. The pick samples with
 * the list's `draw` when it is in `[0, 1)`, else with a draw from `rng` (`choose_with` in Rust).
 */
export declare function choose(policy: Policy, list: FarmList, exclude: readonly string[], rng: Rng, context?: Context): Choice;
/**
 * The context of a client whose server `lost` just went away: everyone that server had is
 * reconnecting too, over the reconnect window (`Context::reconnecting` in Rust).
 */
export declare function reconnectingContext(list: FarmList, lost: string, listAgeS: number, reconnectWindowS: number): Context;
