//! Following the farm: when the live nodes change, placements move, and what was sent to a node
//! that is no longer the one (publishes, fetches, claims, syncs) goes again to the new one.

use super::*;

impl Core {
    /// The farm list changed: follow the new placements.
    pub(super) fn view_changed(&mut self) {
        let mut live = self.farm_live.clone();
        // A peer whose links its side reset is as good as gone: its process is (a hung or cut-off
        // peer keeps them open, and waits for the failure timeout).
        live.retain(|n| *n == self.me || !self.ended.contains(n));
        if live == self.live {
            return;
        }
        // The partitions this node has a part in: placing all 4 096 on every change costs more
        // than the change itself in a farm of a few topics.
        let before: Vec<(usize, Option<Placement>)> = (0..PARTITIONS)
            .filter(|&p| self.chains.holds_partition(p) || self.parts[p].claim.is_some())
            .map(|p| (p, place_partition(p, &self.live)))
            .collect();
        self.live = live;
        self.placements.borrow_mut().fill(None);
        // Only the partitions whose sequencer or replica moved: a view change costs the topics
        // that move, not every topic held. In partition order, and each partition's topics in
        // order, as every set the core sends from: the same inputs send the same frames.
        // One line for every topic handed over (a node may hand over hundreds of thousands).
        let mut handed_over = 0;
        for (p, before) in before {
            let placement = self.partition_placement(p);
            let moved = before.as_ref() != Some(&placement);
            if !moved && self.parts[p].claim.as_ref().is_none_or(|c| c.done) {
                continue;
            }
            if placement.sequencer != self.me {
                if let Some(claim) = self.parts[p].claim.take() {
                    debug!(
                        partition = p,
                        term = claim.term,
                        "no longer claiming the partition"
                    );
                }
                for topic in self.chains.in_partition(p) {
                    if self.stop_sequencing(&topic) {
                        debug!(%topic, sequencer = %placement.sequencer, "no longer sequencing the topic");
                        handed_over += 1;
                    }
                    if self
                        .chains
                        .get(&topic)
                        .is_some_and(|c| !c.queued.is_empty())
                    {
                        self.timers.stalled.insert(topic);
                    }
                }
                continue;
            }
            let under_way = self.parts[p].claim.as_mut().filter(|c| !c.done);
            if let Some(claim) = under_way {
                claim.waiting.retain(|peer| self.live.contains(peer));
                if claim.waiting.is_empty() {
                    self.finish_claim(p);
                }
                continue;
            }
            if !moved {
                continue;
            }
            for topic in self.chains.in_partition(p) {
                let unsynced = self
                    .chains
                    .get(&topic)
                    .and_then(|c| c.seq.as_ref())
                    .is_some_and(|seq| seq.synced.as_ref() != Some(&placement.replica));
                if unsynced {
                    self.sync_replica(&topic);
                }
            }
        }
        if handed_over > 0 {
            info!(
                topics = handed_over,
                "no longer sequencing topics the farm now places on other nodes"
            );
        }
        // Publishes and fetches sent to a node that is no longer the one: again, now, in the
        // order they were published.
        let mut moved: Vec<PublishId> = self
            .pending
            .iter()
            .filter(|(_, p)| self.placement(&p.topic).sequencer != p.sent_to)
            .map(|(id, _)| id.clone())
            .collect();
        moved.sort_by_key(|id| id.seq);
        for id in moved {
            self.resend(&id);
        }
        let mut refetch: Vec<u64> = self
            .fetches
            .iter()
            .filter(|(_, f)| self.placement(&f.topic).replica != f.sent_to)
            .map(|(request, _)| *request)
            .collect();
        refetch.sort_unstable();
        for request in refetch {
            self.refetch(request);
        }
    }
}
