/**
 * Message positions and recovery, the client's duties of the positions protocol:
 * remember per topic the last position received, drop duplicates, send the held positions in
 * every (re)subscription, and report what was recovered and what was lost.
 *
 * A position is an `epoch` (opaque, compared only for equality) and an `offset` (1 for the first
 * message of an epoch, +1 per message). A node that does not send positions (an older build)
 * leaves every message without one: then nothing is held, nothing is dropped, and a
 * resubscription after a failover can only say that messages *may* have been missed.
 *
 * Pure: no sockets, no clock. The driver feeds it frames and asks it for the `sub` positions.
 */
/** Where a topic stands: the last message received, or offset 0 for "none yet in this epoch". */
export interface Position {
    epoch: string;
    offset: number;
}
/** An unrecoverable range of a topic, as the node reports it (`to` absent: to the epoch's end). */
export interface Gap {
    topic: string;
    epoch: string;
    from: number;
    to?: number;
    reason: string;
}
/** What the client makes of a `msg` frame. */
export type Verdict = 
/** Deliver it; `recovered` when it is one of the missed messages the node replays. */
{
    deliver: true;
    recovered: boolean;
}
/** A message already received (same epoch, offset not past the held one): drop it. */
 | {
    deliver: false;
};
/** A topic's recovery after a resubscription, reported once it is complete. */
export interface Recovery {
    topic: string;
    /** Messages replayed by the node. */
    recovered: number;
    /** The position the client held when it resubscribed. */
    from: Position;
    /** The position the node had reached when it confirmed the subscription. */
    to: Position;
}
/** Per-topic positions of one client (see the module documentation). */
export declare class Positions {
    private held;
    private pending;
    /** The position held for `topic`, if any. */
    get(topic: string): Position | undefined;
    /** Forgets a topic (unsubscribed). */
    forget(topic: string): void;
    /** The `positions` field of a `sub` for these topics: those with a held position. */
    forSub(topics: readonly string[]): Record<string, Position> | undefined;
    /** The connection broke: recoveries in progress start over on the next server. */
    lost(): void;
    /**
     * A `subscribed` frame arrived with these current positions (absent from old nodes). Returns
     * the recoveries that are already complete (nothing was missed).
     */
    subscribed(topics: readonly string[], positions: Record<string, Position> | undefined): Recovery[];
    /**
     * A `msg` on `topic` with this position (either may be absent: an old node). Returns whether to
     * deliver it, the recovery it completes, if any, and a jump in offsets that no `gap` frame
     * announced (which a node never sends), so that nothing is ever lost silently.
     */
    message(topic: string, epoch: unknown, offset: unknown): {
        verdict: Verdict;
        recovery?: Recovery;
        gap?: Gap;
    };
    /** A `gap` frame: what cannot be recovered. Moves the held position past it; returns the
     * recovery it completes, if any. */
    gap(gap: Gap): Recovery | undefined;
}
