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

  /** The connection broke: recoveries in progress start over on the next server. */
  lost(): void {
    this.pending.clear();
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
      if (held.epoch === now.epoch && now.offset <= held.offset) {
        done.push({ topic, recovered: 0, from: held, to: now });
      } else {
        this.pending.set(topic, { from: { ...held }, to: { ...now }, count: 0 });
      }
    }
    return done;
  }

  /**
   * A `msg` on `topic` with this position (either may be absent: an old node). Returns whether to
   * deliver it, the recovery it completes, if any, and a jump in offsets that no `gap` frame
   * announced (which a node never sends), so that nothing is ever lost silently.
   */
  message(topic: string, epoch: unknown, offset: unknown): { verdict: Verdict; recovery?: Recovery; gap?: Gap } {
    if (typeof epoch !== 'string' || typeof offset !== 'number') {
      return { verdict: { deliver: true, recovered: false } };
    }
    const held = this.held.get(topic);
    let gap: Gap | undefined;
    if (held && held.epoch === epoch) {
      if (offset <= held.offset) return { verdict: { deliver: false } };
      if (offset > held.offset + 1) {
        gap = { topic, epoch, from: held.offset + 1, to: offset - 1, reason: 'unannounced' };
      }
    } else if (held) {
      gap = { topic, epoch: held.epoch, from: held.offset + 1, reason: 'unannounced' };
    }
    this.held.set(topic, { epoch, offset });
    const pending = this.pending.get(topic);
    const replayed = pending !== undefined && epoch === pending.to.epoch && offset <= pending.to.offset;
    if (!pending || !replayed) {
      const out: { verdict: Verdict; gap?: Gap } = { verdict: { deliver: true, recovered: false } };
      if (gap) out.gap = gap;
      return out;
    }
    pending.count += 1;
    const out: { verdict: Verdict; recovery?: Recovery; gap?: Gap } = { verdict: { deliver: true, recovered: true } };
    if (gap) out.gap = gap;
    if (offset === pending.to.offset) {
      this.pending.delete(topic);
      out.recovery = { topic, recovered: pending.count, from: pending.from, to: pending.to };
    }
    return out;
  }

  /** A `gap` frame: what cannot be recovered. Moves the held position past it; returns the
   * recovery it completes, if any. */
  gap(gap: Gap): Recovery | undefined {
    const topic = gap.topic;
    const held = this.held.get(topic);
    if (gap.to === undefined) {
      // The rest of the held epoch is gone: whatever epoch comes next is taken as it is.
      if (held && held.epoch === gap.epoch) this.held.delete(topic);
    } else if (!held || (held.epoch === gap.epoch && gap.to > held.offset)) {
      this.held.set(topic, { epoch: gap.epoch, offset: gap.to });
    }
    const now = this.held.get(topic);
    const pending = this.pending.get(topic);
    if (pending && now && now.epoch === pending.to.epoch && now.offset === pending.to.offset) {
      this.pending.delete(topic);
      return { topic, recovered: pending.count, from: pending.from, to: pending.to };
    }
    return undefined;
  }
}
