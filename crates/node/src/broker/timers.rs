//! Time in the core: what each [`Input::Tick`](super::Input::Tick) looks at, queued when it was
//! set so that a tick costs what is due, not what is held, and the housekeeping that does touch
//! every topic, less often the more topics there are.

use std::collections::BTreeSet;

use super::*;

/// What the broker's tick looks at, each queued when it was set so that a tick costs what is due,
/// not what is held: with a million topics, scanning every chain 20 times a second took all of a
/// node's time. Each queue holds `(when, what)` with a constant delay per queue, so it is in time
/// order; an entry whose subject has moved on since (a claim finished, a fetch answered or sent
/// again) is skipped when it comes due.
#[derive(Default)]
pub(super) struct Timers {
    /// Claims of partitions by deadline, with their term.
    pub(super) claims: VecDeque<(Instant, (usize, u64))>,
    /// Fetches by when they may be sent again ([`RESEND_AFTER`] after they were last sent).
    pub(super) resends: VecDeque<(Instant, u64)>,
    /// Fetches by deadline.
    pub(super) fetch_deadlines: VecDeque<(Instant, u64)>,
    /// Topics whose replica holds fetches for a log it has not got: by when to ask the sequencer
    /// again.
    pub(super) primes: VecDeque<(Instant, String)>,
    /// Topics whose replica holds fetches: by when the oldest is answered empty.
    pub(super) held_deadlines: VecDeque<(Instant, String)>,
    /// Topics whose claim ended without sequencing them: publishes may wait in their queue.
    pub(super) stalled: BTreeSet<String>,
    /// Topics whose replica log grew since it was last reported to the sequencer.
    pub(super) unreported: BTreeSet<String>,
}

/// Pops the entries of `queue` due at `now`.
pub(super) fn due<T>(queue: &mut VecDeque<(Instant, T)>, now: Instant) -> Vec<T> {
    let mut out = Vec::new();
    while queue.front().is_some_and(|(at, _)| *at <= now) {
        if let Some((_, item)) = queue.pop_front() {
            out.push(item);
        }
    }
    out
}

impl Core {
    /// Time passed: what is due now, each job's in turn.
    pub(super) fn tick(&mut self) {
        let now = self.now;
        self.catch_up_due(now);
        self.publishes_due(now);
        self.claims_due(now);
        self.fetches_due(now);
        self.report_stored();
        self.housekeeping(now);
    }

    /// History beyond its age; chains this node no longer has a part in: every topic held, so
    /// every [`HOUSEKEEPING`] or less often.
    pub(super) fn housekeeping(&mut self, now: Instant) {
        if now < self.housekeeping_at {
            return;
        }
        let rounds = 1 + (self.chains.len() / HOUSEKEEPING_TOPICS) as u32;
        self.housekeeping_at = now + HOUSEKEEPING * rounds;
        let std_now = self.now;
        let limits = self.limits;
        let involved: Vec<bool> = (0..PARTITIONS)
            .map(|p| {
                self.chains.holds_partition(p) && {
                    let placement = self.partition_placement(p);
                    placement.sequencer == self.me || placement.replica == self.me
                }
            })
            .collect();
        self.chains.retain(|topic, chain| {
            if let Some(seq) = &mut chain.seq {
                seq.log.trim(limits, std_now);
            }
            if let Some(log) = &mut chain.stored {
                log.trim(limits, std_now);
            }
            involved[partition(topic)]
                || chain.seq.is_some()
                || !chain.queued.is_empty()
                || chain.stored.as_ref().is_some_and(|l| l.bytes() > 0)
        });
        self.hub.trim(std_now);
    }
}
