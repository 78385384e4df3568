//! The replica's job: storing what its sequencer sends (refusing sequencers of an older term),
//! sending each stored message out to every node that wants it, acknowledging it to its origin,
//! and telling the sequencer how far it has stored.

use super::*;

impl Core {
    /// As replica: store, then send out and acknowledge.
    pub(super) fn on_repl(
        &mut self,
        from: String,
        topic: String,
        term: u64,
        epoch: Epoch,
        wire: WireEntry,
    ) {
        let entry = hub::entry_from_wire(&topic, epoch, &wire);
        self.store(from, topic, term, epoch, entry);
    }

    /// As replica: store the entry (its frame built once), then send it out and acknowledge it.
    pub(super) fn store(
        &mut self,
        from: String,
        topic: String,
        term: u64,
        epoch: Epoch,
        entry: Entry,
    ) {
        if self.fenced_out(&from, &topic, term) {
            return;
        }
        let chain = self.chains.entry(&topic);
        let (id, offset) = (entry.id.clone(), entry.offset);
        let stored = match &mut chain.stored {
            Some(log) if log.epoch() == epoch => log,
            Some(log) if log.epoch() > epoch => return,
            slot => {
                if offset != 1 {
                    // Not the start and not the log this replica holds: ask for all of it.
                    self.send(&from, PeerFrame::Prime { topic });
                    return;
                }
                slot.insert(Log::new(epoch, 0))
            }
        };
        let limits = self.limits;
        match stored.offer(epoch, entry.clone()) {
            Offered::Appended => {
                stored.trim(limits, self.now);
                self.timers.unreported.insert(topic.clone());
                self.send_out(&topic, epoch, entry);
                self.ack(&topic, id, epoch, offset);
            }
            Offered::Duplicate => self.ack(&topic, id, epoch, offset),
            Offered::Gap { .. } => {
                self.send(&from, PeerFrame::Prime { topic });
            }
            Offered::OtherEpoch => {}
        }
    }

    pub(super) fn ack(&mut self, topic: &str, id: PublishId, epoch: Epoch, offset: u64) {
        let origin = id.origin.clone();
        self.send(
            &origin,
            PeerFrame::Ack {
                topic: topic.to_string(),
                id,
                epoch,
                offset,
            },
        );
    }

    /// As replica: sends a stored message to every node that wants it, this one included.
    pub(super) fn send_out(&mut self, topic: &str, epoch: Epoch, entry: Entry) {
        self.net.fanout(topic, &entry.frame);
        let delivered = self.hub.deliver(topic, epoch, entry, &mut self.wakes);
        if let Some(after) = delivered.missing_after {
            self.fetch(topic.to_string(), Some(after), None);
        }
    }

    /// A sequencer's frame of `term` for `topic`: refused (and the sender told `fenced`) when a
    /// newer claim fenced the topic's partition; otherwise the term is the newest this node has
    /// seen.
    pub(super) fn fenced_out(&mut self, from: &str, topic: &str, term: u64) -> bool {
        #[cfg(test)]
        if self.breaks.skip_fencing {
            return false;
        }
        let part = &mut self.parts[partition(topic)];
        if term < part.fenced {
            let fenced = part.fenced;
            self.send(
                from,
                PeerFrame::Fenced {
                    topic: topic.to_string(),
                    term: fenced,
                },
            );
            return true;
        }
        if term > part.fenced {
            part.fenced = term;
            part.holder = Some(from.to_string());
        }
        false
    }

    pub(super) fn on_sync(&mut self, from: String, topic: String, term: u64, state: LogState) {
        if self.fenced_out(&from, &topic, term) {
            return;
        }
        let chain = self.chains.entry(&topic);
        let current = chain.stored.as_ref().map(|log| LogState::of(log, None));
        let take = current
            .as_ref()
            .is_none_or(|c| (state.epoch, state.last) >= (c.epoch, c.last));
        if take {
            chain.stored = Some(log_from_state(&topic, &state));
            self.timers.unreported.insert(topic.clone());
        }
        let held = std::mem::take(&mut chain.held);
        // The newest message goes out again: a node that missed what came before sees the hole
        // and fetches it; one that has it drops the copy.
        let newest = chain.stored.as_ref().and_then(|log| {
            log.after(log.position().offset.saturating_sub(1))
                .next()
                .cloned()
        });
        let epoch = chain.stored.as_ref().map(Log::epoch);
        if let (Some(entry), Some(epoch)) = (newest, epoch) {
            self.send_out(&topic, epoch, entry);
        }
        for fetch in held {
            self.answer_fetch(&fetch.from, &topic, fetch.request, fetch.after);
        }
    }

    /// As replica: tell each sequencer how far this node has stored (for its fetches).
    pub(super) fn report_stored(&mut self) {
        for topic in std::mem::take(&mut self.timers.unreported) {
            let Some(chain) = self.chains.get_mut(&topic) else {
                continue;
            };
            let Some(at) = chain.stored.as_ref().map(Log::position) else {
                continue;
            };
            if at.offset <= chain.reported {
                continue;
            }
            chain.reported = at.offset;
            let sequencer = self.placement(&topic).sequencer.clone();
            self.send(
                &sequencer,
                PeerFrame::Stored {
                    topic,
                    epoch: at.epoch,
                    offset: at.offset,
                },
            );
        }
    }
}
