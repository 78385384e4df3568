//! Claims and fencing, per partition: a node that the farm places first for a partition, and
//! needs to sequence one of its topics, raises the partition's term on every live node and
//! continues each of its topics from the newest log they hold.
//!
//! # Why per partition
//! A claim used to cover one topic: a feed's first subscription to each of 10^5 new topics cost
//! two frames per peer before its first message, and a node failure one claim per topic it
//! sequenced. A claim of a partition (as Kafka, Redpanda and JetStream elect and fence per
//! partition) asks once for every topic of it; the answers come in bounded frames. Once every
//! live peer has answered, the claimant knows every topic of the partition that has a history
//! anywhere: a topic it does not hold is one nobody holds, and starts at once in a new epoch —
//! a new topic costs no claim at all. Fencing follows: a replica refuses a sequencer whose term
//! is below the highest claim of the topic's partition it has seen.
//!
//! A done claim starts each topic when it is first needed (a publish, or its replica asking for
//! its log), from the newest state the answers held: a claim costs the topics that are used, not
//! a `sync` for every topic of the partition.
//!
//! A claim not answered by every live peer in [`CLAIM_WAIT`] goes on with what it has (a peer
//! may be hung): the topics found start, but a topic nobody answered for waits — its publishes
//! queued — until the silent peers answer (the claim is sent to them again, in the same term) or
//! leave the farm, lest a new epoch start beside one a silent peer holds.

use std::collections::BTreeSet;

use super::*;

/// A claim of a partition, under way or done.
pub(super) struct Claim {
    pub(super) term: u64,
    /// Peers whose answer is not all in yet.
    pub(super) waiting: HashSet<String>,
    /// Peers the claim could not be sent to (no link then).
    pub(super) unreached: HashSet<String>,
    /// The newest state found of each topic this node does not sequence yet: a topic starts
    /// from it when it is first needed (published to, or asked for by its replica), not when
    /// the claim is done — a partition of a million-topic farm holds hundreds of topics, and
    /// starting them all would send their replica one `sync` each at every claim.
    pub(super) best: HashMap<String, LogState>,
    /// Done: every peer answered, or the deadline passed; this node sequences the partition.
    pub(super) done: bool,
    /// When the claim was last sent to the peers that have not answered.
    pub(super) asked_at: Instant,
    /// Topics asked for while the claim was under way (published to, or a replica asked for
    /// their log): started when it is done, whether anybody holds them or not.
    pub(super) wanted: BTreeSet<String>,
}

/// A new epoch: the wall clock's milliseconds with random low bits, so newer compares greater.
fn new_epoch(unix_ms: u64, rng: &mut StdRng) -> Epoch {
    Epoch((unix_ms << 16) | u64::from(rng.random::<u16>()))
}

impl Core {
    /// Makes this node sequence `topic`: at once when its partition is claimed and every peer
    /// answered; otherwise once the partition's claim (started here if none is) is done.
    pub(super) fn ensure_active(&mut self, topic: &str) {
        if !self.settled {
            // Retried at the next tick (the publishes wait in the queue).
            self.timers.stalled.insert(topic.to_string());
            return;
        }
        if self.chains.get(topic).is_some_and(|c| c.seq.is_some()) {
            return;
        }
        let p = partition(topic);
        match &self.parts[p].claim {
            None => self.claim_partition(p),
            // Under way: the topic starts (its publishes waiting in its queue) when it is done.
            Some(claim) if !claim.done => {
                let topic = topic.to_string();
                if let Some(claim) = self.parts[p].claim.as_mut() {
                    claim.wanted.insert(topic);
                }
            }
            Some(_) => {
                if !self.start_found(p, topic) {
                    self.ask_again(p);
                    self.timers.stalled.insert(topic.to_string());
                }
            }
        }
    }

    /// Whether every peer that is or may be live answered this node's claim of partition `p`.
    fn heard_all(&self, p: usize) -> bool {
        let Some(claim) = &self.parts[p].claim else {
            return false;
        };
        claim
            .waiting
            .iter()
            .chain(&claim.unreached)
            .all(|peer| !self.live.contains(peer) && !self.known.contains(peer))
    }

    /// Every peer that is live or may be (just seen, not yet judged): a node that has just
    /// (re)started lists its peers `DOWN` until their heartbeats are seen advancing, and must not
    /// conclude meanwhile that nobody holds a topic.
    fn claim_peers(&self) -> Vec<String> {
        let mut peers: Vec<String> = self
            .live
            .iter()
            .filter(|n| **n != self.me)
            .cloned()
            .collect();
        for peer in &self.known {
            if !peers.contains(peer) && *peer != self.me {
                peers.push(peer.clone());
            }
        }
        peers
    }

    /// Claims partition `p` in a term above any seen.
    fn claim_partition(&mut self, p: usize) {
        let peers = self.claim_peers();
        let part = &mut self.parts[p];
        let term = part.fenced + 1;
        part.fenced = term;
        part.holder = Some(self.me.clone());
        let mut claim = Claim {
            term,
            waiting: HashSet::new(),
            unreached: HashSet::new(),
            best: HashMap::new(),
            done: false,
            asked_at: self.now,
            wanted: BTreeSet::new(),
        };
        for peer in peers {
            let frame = PeerFrame::Claim {
                partition: p as u32,
                term,
            };
            if self.send(&peer, frame) {
                claim.waiting.insert(peer);
            } else {
                claim.unreached.insert(peer);
            }
        }
        debug!(
            partition = p,
            term,
            peers = claim.waiting.len(),
            unreached = claim.unreached.len(),
            "claiming"
        );
        let empty = claim.waiting.is_empty();
        self.parts[p].claim = Some(claim);
        self.timers
            .claims
            .push_back((self.now + CLAIM_WAIT, (p, term)));
        if empty {
            self.finish_claim(p);
        }
    }

    /// Sends a done claim of `p` again, in its term, to the peers that have not answered it
    /// (at most once per [`CLAIM_WAIT`]).
    fn ask_again(&mut self, p: usize) {
        let now = self.now;
        let Some(claim) = self.parts[p].claim.as_mut() else {
            return;
        };
        if now < claim.asked_at + CLAIM_WAIT {
            return;
        }
        claim.asked_at = now;
        let term = claim.term;
        let mut missing: Vec<String> = claim.waiting.union(&claim.unreached).cloned().collect();
        missing.sort_unstable();
        for peer in missing {
            let frame = PeerFrame::Claim {
                partition: p as u32,
                term,
            };
            if self.send(&peer, frame)
                && let Some(claim) = self.parts[p].claim.as_mut()
                && claim.unreached.remove(&peer)
            {
                claim.waiting.insert(peer);
            }
        }
    }

    /// The topics of partition `p` this node has anything of: a chain, or subscribers.
    fn topics_held(&self, p: usize) -> BTreeSet<String> {
        let mut topics = self.chains.in_partition(p);
        topics.extend(self.hub.topics_in_partition(p));
        topics
    }

    /// A claim of partition `p` in `term` reached this node, or a replica refused an older term:
    /// this node stops sequencing the partition below `term`, and its own claim below it ends.
    /// `holder`: the claimant, when it is a claim.
    pub(super) fn step_down(&mut self, p: usize, term: u64, holder: Option<&str>) {
        let part = &mut self.parts[p];
        if term > part.fenced {
            part.fenced = term;
            part.holder = holder.map(str::to_string);
        }
        if part.claim.as_ref().is_some_and(|c| c.term < term) {
            part.claim = None;
            debug!(
                partition = p,
                term, "the partition was claimed by another node"
            );
        }
        for topic in self.chains.in_partition(p) {
            let Some(chain) = self.chains.get_mut(&topic) else {
                continue;
            };
            if chain.seq.as_ref().is_some_and(|s| s.term < term) {
                self.stop_sequencing(&topic);
            }
            if self
                .chains
                .get(&topic)
                .is_some_and(|c| !c.queued.is_empty())
            {
                // Sent back to their origins, or claimed again (see `claims_due`).
                self.timers.stalled.insert(topic);
            }
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
        let state = |log: Option<&Log>| log.map(|log| LogState::of(log, None));
        // `newer` gives the stream the ids of what this node stored; then those it numbered.
        let stored = state(chain.and_then(|c| c.stored.as_ref()));
        let mut best = newer(stored, self.hub.state(topic, None))?;
        if let Some(numbered) = state(chain.and_then(|c| c.numbered.as_ref())) {
            take_ids(&mut best, &numbered);
        }
        Some(best)
    }

    pub(super) fn on_claim(&mut self, from: String, p: u32, term: u64) {
        let p = p as usize;
        if p >= PARTITIONS {
            warn!(peer = %from, partition = p, "a claim of a partition that does not exist: ignored");
            return;
        }
        let part = &self.parts[p];
        let granted =
            term > part.fenced || (term == part.fenced && part.holder.as_deref() == Some(&from));
        if !granted {
            let fenced = part.fenced;
            self.send(
                &from,
                PeerFrame::ClaimReply {
                    partition: p as u32,
                    term: fenced,
                    granted: false,
                    states: Vec::new(),
                    done: true,
                },
            );
            return;
        }
        self.step_down(p, term, Some(&from));
        // Publishes queued here for a claim of this node's: to their origins again, which send
        // them to the sequencer they see.
        for topic in self.chains.in_partition(p) {
            self.send_back_queued(&topic);
        }
        let mut states = Vec::new();
        for topic in self.topics_held(p) {
            if let Some(state) = self.best_state(&topic) {
                states.push((topic, state));
            }
        }
        let pieces = catch_up::cut(states);
        let last = pieces.len() - 1;
        for (i, states) in pieces.into_iter().enumerate() {
            self.send(
                &from,
                PeerFrame::ClaimReply {
                    partition: p as u32,
                    term,
                    granted: true,
                    states,
                    done: i == last,
                },
            );
        }
    }

    pub(super) fn on_claim_reply(
        &mut self,
        from: String,
        p: u32,
        term: u64,
        granted: bool,
        states: Vec<(String, LogState)>,
        done: bool,
    ) {
        let p = p as usize;
        let Some(claim) = self.parts.get_mut(p).and_then(|part| part.claim.as_mut()) else {
            return;
        };
        if !granted {
            if term >= claim.term {
                // Someone claimed higher: this claim is over; a later publish starts another.
                self.step_down(p, term, None);
                self.parts[p].claim = None;
            }
            return;
        }
        if term != claim.term {
            return;
        }
        for (topic, state) in states {
            // A late answer (the claim went on without it) counts for the topics not started.
            let started = claim.done && self.chains.get(&topic).is_some_and(|c| c.seq.is_some());
            if partition(&topic) != p || started {
                continue;
            }
            let best = claim.best.remove(&topic);
            if let Some(newest) = newer(best, Some(state)) {
                claim.best.insert(topic, newest);
            }
        }
        if !done {
            return;
        }
        let Some(claim) = self.parts[p].claim.as_mut() else {
            return;
        };
        claim.waiting.remove(&from);
        claim.unreached.remove(&from);
        if !claim.done && claim.waiting.is_empty() {
            self.finish_claim(p);
        } else if claim.done {
            self.start_waiting_topics(p);
        }
    }

    /// Ends the claim of partition `p` (every peer answered, or its deadline passed): the topics
    /// wanted meanwhile start, each from the newest log found; the others when first needed.
    pub(super) fn finish_claim(&mut self, p: usize) {
        let Some(claim) = self.parts[p].claim.as_mut() else {
            return;
        };
        if claim.done {
            return;
        }
        claim.done = true;
        #[cfg(test)]
        if self.breaks.ignore_claim_answers {
            claim.best.clear();
        }
        debug!(
            partition = p,
            term = claim.term,
            found = claim.best.len(),
            "sequencing the partition"
        );
        self.start_waiting_topics(p);
    }

    /// Starts `topic` of done claim `p` from the newest state found of it (this node's own
    /// included), or in a new epoch when none was found and every peer answered; false when it
    /// must wait for peers that have not answered.
    fn start_found(&mut self, p: usize, topic: &str) -> bool {
        let Some(claim) = self.parts[p].claim.as_mut() else {
            return false;
        };
        let term = claim.term;
        let found = claim.best.remove(topic);
        let state = newer(found, self.best_state(topic));
        if state.is_none() && !self.heard_all(p) {
            return false;
        }
        self.begin(topic, term, state);
        true
    }

    /// The topics of claimed partition `p` that were wanted or whose publishes wait: started from
    /// what was found, or in a new epoch once every peer answered (until then, asked again).
    fn start_waiting_topics(&mut self, p: usize) {
        let Some(claim) = self.parts[p].claim.as_mut() else {
            return;
        };
        let mut waiting = std::mem::take(&mut claim.wanted);
        waiting.extend(
            self.chains
                .in_partition(p)
                .into_iter()
                .filter(|t| self.chains.get(t).is_some_and(|c| !c.queued.is_empty())),
        );
        waiting.retain(|t| self.chains.get(t).is_none_or(|c| c.seq.is_none()));
        let mut unheard = false;
        for topic in waiting {
            if !self.start_found(p, &topic) {
                unheard = true;
                self.timers.stalled.insert(topic);
            }
        }
        if unheard {
            debug!(
                partition = p,
                "claim not answered by every peer: topics nobody answered for wait"
            );
            self.ask_again(p);
        }
    }

    /// Sequences `topic` in `term` from `state` (a new epoch when none), syncs its replica and
    /// numbers the publishes that waited.
    fn begin(&mut self, topic: &str, term: u64, state: Option<LogState>) {
        let log = match state {
            Some(state) => log_from_state(topic, &state),
            None => {
                let epoch = new_epoch(self.unix_ms, &mut self.rng);
                debug!(%topic, %epoch, "no node holds the topic: a new epoch");
                Log::new(epoch, 0)
            }
        };
        debug!(%topic, term, position = %log.position(), "sequencing");
        let chain = self.chains.entry(topic);
        chain.seq = Some(Sequencing::new(term, log));
        let queued = std::mem::take(&mut chain.queued);
        self.sync_replica(topic);
        for (_, id, data, encoding, retry) in queued {
            self.sequence(topic, id, data, encoding, retry);
        }
    }

    /// Claims at their deadline, and topics whose publishes wait.
    pub(super) fn claims_due(&mut self, now: Instant) {
        // Claims that waited long enough go on with the answers they have.
        for (p, term) in due(&mut self.timers.claims, now) {
            let running = self.parts[p]
                .claim
                .as_ref()
                .is_some_and(|claim| claim.term == term && !claim.done);
            if running {
                self.finish_claim(p);
            }
        }
        // Publishes queued for a claim that ended without sequencing: claim again, or send them
        // back.
        for topic in std::mem::take(&mut self.timers.stalled) {
            let stalled = self
                .chains
                .get(&topic)
                .is_some_and(|c| !c.queued.is_empty() && c.seq.is_none());
            if !stalled {
                continue;
            }
            if self.placement(&topic).sequencer == self.me {
                self.ensure_active(&topic);
            } else {
                self.send_back_queued(&topic);
            }
        }
    }

    /// The publishes queued here for `topic` go back to their origins (`nack`), which send them
    /// to the sequencer they see.
    fn send_back_queued(&mut self, topic: &str) {
        let Some(chain) = self.chains.get_mut(topic) else {
            return;
        };
        for (origin, id, ..) in std::mem::take(&mut chain.queued) {
            self.send(
                &origin,
                PeerFrame::Nack {
                    topic: topic.to_string(),
                    id,
                },
            );
        }
    }
}
