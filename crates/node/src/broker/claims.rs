//! Claims and fencing: a node that the farm places first for a topic, and does not sequence it
//! yet, raises the topic's term on every live node and continues from the newest log they hold.

use super::*;

/// A claim in progress.
pub(super) struct Claim {
    pub(super) term: u64,
    pub(super) waiting: HashSet<String>,
    /// Live peers the claim could not be sent to (no link now).
    pub(super) unreached: usize,
    pub(super) best: Option<LogState>,
}

/// A new epoch: the wall clock's milliseconds with random low bits, so newer compares greater.
fn new_epoch(unix_ms: u64, rng: &mut StdRng) -> Epoch {
    Epoch((unix_ms << 16) | u64::from(rng.random::<u16>()))
}

impl Core {
    /// Starts a claim of `topic` unless this node sequences it already or is claiming it.
    pub(super) fn ensure_active(&mut self, topic: &str) {
        if !self.settled {
            // Retried at the next tick (the publishes wait in the queue).
            self.timers.stalled.insert(topic.to_string());
            return;
        }
        // Every peer that is live or may be (just seen, not yet judged): a node that has just
        // (re)started lists its peers `DOWN` until their heartbeats are seen advancing, and
        // must not conclude meanwhile that nobody holds the topic.
        let mut peers: Vec<String> = self
            .live
            .iter()
            .filter(|n| **n != self.me)
            .cloned()
            .collect();
        for peer in &self.known {
            if !peers.contains(peer) {
                peers.push(peer.clone());
            }
        }
        let chain = self.chains.entry(topic.to_string()).or_default();
        if chain.seq.is_some() || chain.claim.is_some() {
            return;
        }
        let term = chain.fenced + 1;
        chain.fenced = term;
        let deadline = self.now + CLAIM_WAIT;
        chain.claim = Some(Claim {
            term,
            waiting: HashSet::new(),
            unreached: 0,
            best: None,
        });
        self.timers
            .claims
            .push_back((deadline, (topic.to_string(), term)));
        let mut waiting = HashSet::new();
        let mut unreached = 0;
        for peer in peers {
            let frame = PeerFrame::Claim {
                topic: topic.to_string(),
                term,
            };
            if self.send(&peer, frame) {
                waiting.insert(peer);
            } else {
                unreached += 1;
            }
        }
        debug!(%topic, term, peers = waiting.len(), unreached, "claiming");
        let empty = waiting.is_empty();
        if let Some(claim) = self.chains.get_mut(topic).and_then(|c| c.claim.as_mut()) {
            claim.waiting = waiting;
            claim.unreached = unreached;
        }
        if empty {
            self.finish_claim(topic);
        }
    }

    /// What this node holds of `topic` that went out: its replica log or its stream, the newer.
    /// Not its sequencer log: what a sequencer numbered but no replica stored never reached a
    /// client (a sequencer cut off from its replica may have numbered many such messages), and
    /// their publishers send them again.
    ///
    /// A delivery stream does not know its messages' publish ids; those this node numbered as
    /// their sequencer, or stored as their replica, are filled in (the same offset of the same
    /// epoch, with the same payload), so that a node continuing from this state recognizes a
    /// publish sent again under its key — the sequencer's replica may die in the handover, and
    /// with it the only other copy of the ids.
    pub(super) fn best_state(&self, topic: &str) -> Option<LogState> {
        let chain = self.chains.get(topic);
        let stored = chain
            .and_then(|c| c.stored.as_ref())
            .map(|log| LogState::of(log, None));
        let mut best = newer(stored.clone(), self.hub.state(topic, None))?;
        let numbered = chain
            .and_then(|c| c.numbered.as_ref())
            .map(|log| LogState::of(log, None));
        let mut known: HashMap<u64, &WireEntry> = HashMap::new();
        for source in [&numbered, &stored].into_iter().flatten() {
            if source.epoch == best.epoch {
                for entry in &source.entries {
                    known.entry(entry.offset).or_insert(entry);
                }
            }
        }
        for entry in best.entries.iter_mut().filter(|e| e.id.origin.is_empty()) {
            if let Some(found) = known.get(&entry.offset)
                && found.data == entry.data
                && found.encoding == entry.encoding
            {
                entry.id = found.id.clone();
            }
        }
        Some(best)
    }

    pub(super) fn on_claim(&mut self, from: String, topic: String, term: u64) {
        let granted = term > self.chains.entry(topic.clone()).or_default().fenced;
        if granted && self.stop_sequencing(&topic) {
            debug!(%topic, claimant = %from, "topic claimed by another node: no longer sequencing it");
        }
        let state = self.best_state(&topic);
        let chain = self.chains.entry(topic.clone()).or_default();
        if granted {
            chain.fenced = term;
            chain.claim = None;
        }
        let queued = if granted {
            std::mem::take(&mut chain.queued)
        } else {
            Vec::new()
        };
        let fenced = chain.fenced;
        self.send(
            &from,
            PeerFrame::ClaimReply {
                topic: topic.clone(),
                term: if granted { term } else { fenced },
                granted,
                state: if granted { state } else { None },
            },
        );
        for (origin, id, ..) in queued {
            self.send(
                &origin,
                PeerFrame::Nack {
                    topic: topic.clone(),
                    id,
                },
            );
        }
    }

    pub(super) fn on_claim_reply(
        &mut self,
        from: String,
        topic: String,
        term: u64,
        granted: bool,
        state: Option<LogState>,
    ) {
        let Some(chain) = self.chains.get_mut(&topic) else {
            return;
        };
        let Some(claim) = &mut chain.claim else {
            return;
        };
        if !granted {
            if term >= claim.term {
                // Someone claimed higher: this claim is over; a later publish starts another.
                chain.fenced = chain.fenced.max(term);
                chain.claim = None;
                self.timers.stalled.insert(topic);
            }
            return;
        }
        if term != claim.term {
            return;
        }
        claim.best = newer(claim.best.take(), state);
        claim.waiting.remove(&from);
        if claim.waiting.is_empty() {
            self.finish_claim(&topic);
        }
    }

    /// Ends a claim: sequences from the newest log found (a new epoch if none), syncs the
    /// replica, and numbers the publishes that waited.
    pub(super) fn finish_claim(&mut self, topic: &str) {
        let own = self.best_state(topic);
        let Some(chain) = self.chains.get_mut(topic) else {
            return;
        };
        let Some(claim) = chain.claim.take() else {
            return;
        };
        let heard_all = claim.waiting.is_empty() && claim.unreached == 0;
        if claim.best.is_none() && own.is_none() && !heard_all {
            // Nobody that answered holds the topic, but not every live peer answered: a new
            // epoch now could start beside one a silent peer holds. Claim again at the next tick
            // (by then the silent peer answers, or is listed DOWN and left out).
            debug!(%topic, term = claim.term, "claim found no history and not every peer answered: again");
            self.timers.stalled.insert(topic.to_string());
            return;
        }
        #[cfg(test)]
        let claim = Claim {
            best: claim.best.filter(|_| !self.breaks.ignore_claim_answers),
            ..claim
        };
        let log = match newer(claim.best, own) {
            Some(state) => log_from_state(topic, &state),
            None => {
                let epoch = new_epoch(self.unix_ms, &mut self.rng);
                debug!(%topic, %epoch, "no node holds the topic: a new epoch");
                Log::new(epoch, 0)
            }
        };
        debug!(%topic, term = claim.term, position = %log.position(), "sequencing");
        chain.seq = Some(Sequencing::new(claim.term, log));
        let queued = std::mem::take(&mut chain.queued);
        self.sync_replica(topic);
        for (_, id, data, encoding, retry) in queued {
            self.sequence(topic, id, data, encoding, retry);
        }
    }

    /// Claims at their deadline, and claims to start again.
    pub(super) fn claims_due(&mut self, now: Instant) {
        // Claims that waited long enough go on with the answers they have.
        for (topic, term) in due(&mut self.timers.claims, now) {
            let running = self
                .chains
                .get(&topic)
                .and_then(|c| c.claim.as_ref())
                .is_some_and(|claim| claim.term == term);
            if running {
                self.finish_claim(&topic);
            }
        }
        // Publishes queued for a claim that ended without sequencing: claim again, or send them
        // back.
        for topic in std::mem::take(&mut self.timers.stalled) {
            let stalled = self
                .chains
                .get(&topic)
                .is_some_and(|c| !c.queued.is_empty() && c.seq.is_none() && c.claim.is_none());
            if !stalled {
                continue;
            }
            if self.placement(&topic).sequencer == self.me {
                self.ensure_active(&topic);
            } else if let Some(chain) = self.chains.get_mut(&topic) {
                for (origin, id, ..) in std::mem::take(&mut chain.queued) {
                    self.send(
                        &origin,
                        PeerFrame::Nack {
                            topic: topic.clone(),
                            id,
                        },
                    );
                }
            }
        }
    }
}
