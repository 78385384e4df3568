/**
 * The failover state machine, ported from `crates/client/src/machine.rs`: what a client does
 * next, as a pure function of what just happened. Same states, inputs, actions and transitions;
 * time is passed in (milliseconds), the RNG is injected.
 *
 * 1. **Round**: fetch the farm list; select a server with the policy, excluding servers that
 *    failed within the cool-down (unless the list has no other candidate); connect. When the
 *    list came over a connection to the very server picked, that connection is kept.
 * 2. **Immediate or retry once**: by default a failed connect, or a lost connection, goes
 *    straight to a new round; `retry: 'retry-once'` first tries the same server once more. A
 *    server that closes with 4000, 1001, 4003 or 1008 is never retried ({@link sendsElsewhere}).
 * 3. **Re-request**: a server that failed its retry is excluded for the cool-down and a new round
 *    starts: the client selects on its last list and asks that pick for a fresh list, then the
 *    list's other servers in a random order, then the service address. When the fresh list comes
 *    from the pick and still shows it as a candidate, the pick stands (one connection per failover).
 * 4. **Backoff**: the first round after a good connection starts at once; each further round
 *    waits a full-jitter delay, uniform in `[0, min(cap, base · 2^n))`.
 * 5. **Migration** (make-before-break): a server that asks its client to move (`migrate_asked`)
 *    names where, or leaves it to the policy (without the asking server). The machine asks for a
 *    `migrate` action — a second connection, subscribed from the held positions while the first
 *    keeps delivering — and is connected to the new server once the driver reports it caught up
 *    (`migrated`). A migration whose connection fails leaves the client where it was, with the
 *    target excluded; losing the old server meanwhile makes the migration's connection the
 *    failover's.
 */
import { type FarmList, type Rng } from './model.js';
import { type Policy } from './selection.js';
/** Close codes of `docs/PROTOCOL.md` section 6. */
export declare const CLOSE: {
    readonly NORMAL: 1000;
    readonly GOING_AWAY: 1001;
    readonly POLICY_VIOLATION: 1008;
    readonly MESSAGE_TOO_BIG: 1009;
    readonly RECONNECT_ELSEWHERE: 4000;
    readonly SLOW_CONSUMER: 4001;
    readonly HEARTBEAT_TIMEOUT: 4002;
    readonly SERVER_FULL: 4003;
    /** Tokens (`docs/AUTH.md`): none came, not valid, expired, valid but not allowing it. */
    readonly AUTH_MISSING: 4010;
    readonly AUTH_INVALID: 4011;
    readonly AUTH_EXPIRED: 4012;
    readonly AUTH_FORBIDDEN: 4013;
};
/** Whether a close code sends the client to another server rather than a retry of this one. */
export declare function sendsElsewhere(code: number): boolean;
/** Exponential backoff with full jitter, capped (`crates/client/src/backoff.rs`). */
export interface Backoff {
    baseMs: number;
    capMs: number;
}
/** The window before round `round`: `min(cap, base · 2^round)`. */
export declare function backoffCeiling(b: Backoff, round: number): number;
/** A delay uniform in `[0, ceiling(round))`. */
export declare function backoffDelay(b: Backoff, round: number, rng: Rng): number;
/** What to do when a connect fails or a connection is lost. */
export type RetryMode = 'retry-once' | 'immediate';
/** The knobs of the machine. */
export interface MachineConfig {
    policy: Policy;
    retry: RetryMode;
    /** How long a server that failed stays excluded, ms. */
    coolDownMs: number;
    backoff: Backoff;
}
/** The defaults of the Rust client: weighted, immediate, 10 s cool-down, 100 ms doubling to 5 s. */
export declare const DEFAULT_MACHINE_CONFIG: MachineConfig;
/** Why an established connection ended. */
export type LossCause = {
    kind: 'closed';
    code: number;
    reason: string;
} | {
    kind: 'heartbeat_timeout';
} | {
    kind: 'broken';
    detail: string;
};
/** Renders a loss cause as the Rust client does. */
export declare function describeLoss(cause: LossCause): string;
/** Where a list is to be fetched from. */
export type ListSource = {
    kind: 'service_address';
    avoid: string[];
} | {
    kind: 'servers';
    urls: string[];
};
/** Something that happened, reported by the driver. */
export type Input = {
    type: 'start';
} | {
    type: 'list_fetched';
    list: FarmList;
    via: string;
    ageMs: number;
} | {
    type: 'list_failed';
    error: string;
} | {
    type: 'list_updated';
    list: FarmList;
} | {
    type: 'connected';
    server: string;
    list?: FarmList;
} | {
    type: 'connect_failed';
    server: string;
    error: string;
    elsewhere: boolean;
} | {
    type: 'lost';
    server: string;
    cause: LossCause;
}
/** The connected server asked the client to move (a `migrate` frame): to `to`, or anywhere else. */
 | {
    type: 'migrate_asked';
    server: string;
    to?: string;
    reason: string;
}
/** The migration's new connection caught up and the old one is closed. */
 | {
    type: 'migrated';
    server: string;
} | {
    type: 'timer_fired';
    timer: number;
} | {
    type: 'stop';
};
/** What the application is told. */
export type Notice = {
    type: 'connected';
    server: string;
} | {
    type: 'disconnected';
    server: string;
    cause: LossCause;
} | {
    type: 'failed_over';
    from: string;
    to: string;
    tookMs: number;
}
/** Moved from `from` to `to` at `from`'s request, make-before-break; `tookMs` from the request. */
 | {
    type: 'migrated';
    from: string;
    to: string;
    reason: string;
    tookMs: number;
}
/** A migration's new connection failed: the client stays on `server`. */
 | {
    type: 'migration_failed';
    server: string;
    to: string;
    error: string;
} | {
    type: 'retrying';
    reason: string;
    delayMs: number;
};
/** Something for the driver to do. */
export type Action = {
    type: 'fetch_list';
    source: ListSource;
} | {
    type: 'connect';
    server: string;
    reuseListConnection: boolean;
    retry: boolean;
}
/** Connect to `server` and subscribe from the held positions while the old connection keeps
 * delivering; report `migrated` once caught up and the old one closed, or `connect_failed`. */
 | {
    type: 'migrate';
    server: string;
} | {
    type: 'drop_list_connection';
} | {
    type: 'sleep';
    delayMs: number;
    timer: number;
} | {
    type: 'notify';
    notice: Notice;
} | {
    type: 'close';
};
/** Where the machine is. */
export type State = {
    type: 'idle';
} | {
    type: 'fetching_list';
    fromServiceAddress: boolean;
    fallback: boolean;
} | {
    type: 'connecting';
    server: string;
    retry: boolean;
} | {
    type: 'connected';
    server: string;
}
/** Connected to `from`, connecting to `to` to move there. */
 | {
    type: 'migrating';
    from: string;
    to: string;
    reason: string;
    since: number;
} | {
    type: 'waiting';
    timer: number;
} | {
    type: 'stopped';
};
/** The failover state machine (see the module documentation). */
export declare class Machine {
    readonly config: MachineConfig;
    private readonly rng;
    private state;
    private lastList;
    /** Servers that failed, with the end of their cool-down (ms). */
    private excludedUntil;
    /** Failed rounds since the last good connection. */
    private round;
    /** The server lost and when, until connected again. */
    private away;
    private holdingListConnection;
    /** The pick of the last list that was asked for a new one. */
    private asked;
    private nextTimer;
    constructor(config: MachineConfig, rng: Rng);
    /** The current state. */
    current(): State;
    /** The most recent farm list, if any arrived. */
    list(): FarmList | undefined;
    /** Servers excluded from selection at `now`. */
    excluded(now: number): string[];
    /**
     * The servers selection on `list` leaves out at `now`: those excluded, unless that leaves `list`
     * no candidate, when none is. A cool-down steers a client away from a failed server while
     * another can take it; it never keeps a client from the only servers it has (a lone server
     * that restarts): those are tried again, paced by the backoff.
     */
    private excludedOn;
    /** Takes in what happened at `now` (ms) and returns what to do, in order. */
    handle(input: Input, now: number): Action[];
    private select;
    private context;
    private nextRound;
    private requestList;
    private fetchFromServiceAddress;
    /** Servers of the last list that may answer a list request: not `DOWN`, not excluded. */
    private otherServers;
    /** Where to move from `from`: the server named, unless the client just failed to reach it;
     * else the policy's pick on the last list, without `from`. */
    private migrationTarget;
    private exclude;
    private dropListConnection;
}
