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
  | { deliver: true; recovered: boolean }
  /** A message already received (same epoch, offset not past the held one): drop it. */
  | { deliver: false };

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

interface Pending {
  from: Position;
  to: Position;
  count: number;
}

/** Per-topic positions of one client (see the module documentation). */
export class Positions {
  private held = new Map<string, Position>();
  private pending = new Map<string, Pending>();

  /** The position held for `topic`, if any. */
  get(topic: string): Position | undefined {
    return this.held.get(topic);
  }

  /** Forgets a topic (unsubscribed). */
  forget(topic: string): void {
    this.held.delete(topic);
    this.pending.delete(topic);
  }

  /** The `positions` field of a `sub` for these topics: those with a held position. */
  forSub(topics: readonly string[]): Record<string, Position> | undefined {
    const out: Record<string, Position> = {};
    let any = false;
    for (const t of topics) {
      const p = this.held.get(t);
      if (p) {
        out[t] = { epoch: p.epoch, offset: p.offset };
        any = true;
      }
    }
    return any ? out : undefined;
  }

  /**
   * A `subscribed` frame arrived with these current positions (absent from old nodes). Returns
   * the recoveries that are already complete (nothing was missed).
   */
  subscribed(topics: readonly string[], positions: Record<string, Position> | undefined): Recovery[] {
    const done: Recovery[] = [];
    if (!positions) return done;
    for (const topic of topics) {
      const now = positions[topic];
      if (!now || typeof now.epoch !== 'string' || typeof now.offset !== 'number') continue;
      const held = this.held.get(topic);
      if (!held) {
        // Nothing held: live delivery starts after `now`, which is where the client stands.
        this.held.set(topic, { epoch: now.epoch, offset: now.offset });
        continue;
      }
      if (held.epoch !== now.epoch) continue; // the node reports the lost epoch as a gap
      if (now.offset <= held.offset) {
        done.push({ topic, recovered: 0, from: held, to: now });
      } else {
        this.pending.set(topic, { from: { ...held }, to: { ...now }, count: 0 });
      }
    }
    return done;
  }

  /**
   * A `msg` on `topic` with this position (either may be absent: an old node). Returns whether to
   * deliver it, and the recovery it completes, if any.
   */
  message(topic: string, epoch: unknown, offset: unknown): { verdict: Verdict; recovery?: Recovery } {
    if (typeof epoch !== 'string' || typeof offset !== 'number') {
      return { verdict: { deliver: true, recovered: false } };
    }
    const held = this.held.get(topic);
    if (held && held.epoch === epoch && offset <= held.offset) {
      return { verdict: { deliver: false } };
    }
    this.held.set(topic, { epoch, offset });
    const pending = this.pending.get(topic);
    if (!pending) return { verdict: { deliver: true, recovered: false } };
    const replayed = epoch === pending.to.epoch && offset <= pending.to.offset;
    if (replayed) pending.count += 1;
    if (replayed && offset < pending.to.offset) {
      return { verdict: { deliver: true, recovered: true } };
    }
    // The last replayed message, or a live one past it: recovery is over.
    this.pending.delete(topic);
    return {
      verdict: { deliver: true, recovered: replayed },
      recovery: { topic, recovered: pending.count, from: pending.from, to: pending.to },
    };
  }

  /** A `gap` frame: what cannot be recovered. Moves the held position past it. */
  gap(gap: Gap): Recovery | undefined {
    const topic = gap.topic;
    if (gap.to === undefined) {
      // The epoch is lost: the next message starts the new epoch.
      this.held.delete(topic);
    } else {
      const held = this.held.get(topic);
      if (!held || held.epoch !== gap.epoch || held.offset < gap.to) {
        this.held.set(topic, { epoch: gap.epoch, offset: gap.to });
      }
    }
    const pending = this.pending.get(topic);
    if (pending && (gap.to === undefined || (gap.epoch === pending.to.epoch && gap.to >= pending.to.offset))) {
      this.pending.delete(topic);
      return { topic, recovered: pending.count, from: pending.from, to: pending.to };
    }
    return undefined;
  }
}
