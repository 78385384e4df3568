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
        self.live = live;
        self.placements.borrow_mut().fill(None);
        // In a stable order, as every set the core sends from: the same inputs send the same
        // frames.
        let mut topics: Vec<String> = self.chains.keys().cloned().collect();
        topics.sort_unstable();
        // One line for every topic handed over (a node may hand over hundreds of thousands).
        let mut handed_over = 0;
        for topic in topics {
            let placement = self.placement(&topic);
            if placement.sequencer != self.me && self.stop_sequencing(&topic) {
                debug!(%topic, sequencer = %placement.sequencer, "no longer sequencing the topic");
                handed_over += 1;
            }
            let Some(chain) = self.chains.get_mut(&topic) else {
                continue;
            };
            if placement.sequencer != self.me {
                if let Some(claim) = chain.claim.take() {
                    debug!(%topic, term = claim.term, "claim abandoned");
                    self.timers.stalled.insert(topic.clone());
                }
            } else if let Some(seq) = &chain.seq {
                if seq.synced.as_ref() != Some(&placement.replica) {
                    self.sync_replica(&topic);
                }
            } else if let Some(claim) = &mut chain.claim {
                claim.waiting.retain(|peer| self.live.contains(peer));
                if claim.waiting.is_empty() {
                    self.finish_claim(&topic);
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
