//! The sequencer's job: numbering each publish of a topic it has claimed (a publish sent again
//! keeps its offset), keeping the log, and sending the replica each message or the whole log.

use super::*;

/// What this node sequences of a topic.
pub(super) struct Sequencing {
    pub(super) term: u64,
    pub(super) log: Log,
    /// The replica that was last sent the whole log.
    pub(super) synced: Option<String>,
    /// The replica reported everything up to this offset stored: what went out, so this node can
    /// serve fetches up to it (the replica may be the node just lost).
    pub(super) replicated: u64,
    /// The highest publish sequence numbered for each origin's run, in the log it continues
    /// from or since: a first send at or below it was sent before — a copy of a frame, or a
    /// publish a hung node finds in its queue when it resumes, sent meanwhile to the sequencer
    /// that took over — and is searched for like a retry.
    pub(super) highest: HashMap<String, HashMap<u64, u64>>,
}

impl Sequencing {
    /// Sequencing in `term`, from `log`.
    pub(super) fn new(term: u64, log: Log) -> Sequencing {
        let mut highest = HashMap::new();
        for entry in log.after(0).filter(|e| !e.id.origin.is_empty()) {
            seen_before(&mut highest, &entry.id);
        }
        Sequencing {
            term,
            replicated: log.position().offset,
            log,
            synced: None,
            highest,
        }
    }

    /// Whether publish `id` may have been numbered before: sent again, or not above what its
    /// origin's run sent before. Notes `id` as seen.
    fn may_have_numbered(&mut self, id: &PublishId, retry: bool) -> bool {
        let copy = seen_before(&mut self.highest, id);
        retry || copy
    }
}

/// Whether `id` is at or below the highest sequence seen from its origin's run; notes it. On every
/// publish: the origin's name is copied only the first time that origin is seen.
fn seen_before(highest: &mut HashMap<String, HashMap<u64, u64>>, id: &PublishId) -> bool {
    let runs = match highest.get_mut(id.origin.as_str()) {
        Some(runs) => runs,
        None => highest.entry(id.origin.clone()).or_default(),
    };
    let seq = runs.entry(id.run).or_default();
    let before = id.seq <= *seq;
    *seq = (*seq).max(id.seq);
    before
}

impl Core {
    /// The topics this node sequences, each with its term.
    pub(crate) fn sequencing(&self) -> impl Iterator<Item = (&str, u64)> {
        self.chains
            .iter()
            .filter_map(|(topic, chain)| Some((topic.as_str(), chain.seq.as_ref()?.term)))
    }

    /// As sequencer: number the publish, or queue it while the claim runs.
    pub(super) fn on_pub(
        &mut self,
        from: String,
        topic: String,
        id: PublishId,
        data: String,
        encoding: Encoding,
        retry: bool,
    ) {
        if self.placement(&topic).sequencer != self.me {
            self.send(&from, PeerFrame::Nack { topic, id });
            return;
        }
        let chain = self.chains.entry(&topic);
        if chain.seq.is_none() {
            chain.queued.push((from, id, data, encoding, retry));
            self.ensure_active(&topic);
            return;
        }
        self.sequence(&topic, id, data, encoding, retry);
    }

    /// Numbers a publish (a `retry` that was numbered before keeps its offset) and sends it to
    /// the replica.
    pub(super) fn sequence(
        &mut self,
        topic: &str,
        id: PublishId,
        data: String,
        encoding: Encoding,
        retry: bool,
    ) {
        if self
            .chains
            .get(topic)
            .and_then(|c| c.seq.as_ref())
            .and_then(|s| s.synced.as_ref())
            != Some(&self.placement(topic).replica)
        {
            self.sync_replica(topic);
        }
        let replica = self.placement(topic).replica.clone();
        let limits = self.limits;
        let Some(seq) = self.chains.get_mut(topic).and_then(|c| c.seq.as_mut()) else {
            return;
        };
        let epoch = seq.log.epoch();
        // When the farm accepted it: the `msg` frame's `ts`, for publish-to-delivery latency.
        let accepted = Some(self.unix_ms);
        // Only a retry, or a copy of a frame seen before, can have been numbered before: a first
        // send skips the search.
        let before = if seq.may_have_numbered(&id, retry) {
            seq.log.offset_of(&id)
        } else {
            None
        };
        let wire = match before {
            // Sequenced before: the replica is sent it again (with this sender's id, so that the
            // acknowledgement reaches it) and acknowledges it without sending it out again.
            Some(offset) => WireEntry {
                offset,
                id,
                data,
                encoding,
                ts: accepted,
            },
            None => {
                let offset = seq.log.position().offset + 1;
                let frame = hub::msg_frame(
                    topic,
                    data.clone(),
                    encoding,
                    Some(Position::new(epoch, offset)),
                    accepted,
                );
                seq.log.push(Entry {
                    offset,
                    id: id.clone(),
                    frame,
                    stored: self.now,
                });
                seq.log.trim(limits, self.now);
                WireEntry {
                    offset,
                    id,
                    data,
                    encoding,
                    ts: accepted,
                }
            }
        };
        let term = seq.term;
        if replica == self.me {
            // Its own replica (a farm of one): the frame built above goes out as it is.
            let frame = seq
                .log
                .after(wire.offset - 1)
                .next()
                .map(|e| e.frame.clone());
            let frame = frame.unwrap_or_else(|| {
                hub::msg_frame(
                    topic,
                    wire.data.clone(),
                    wire.encoding,
                    Some(Position::new(epoch, wire.offset)),
                    wire.ts,
                )
            });
            let entry = Entry {
                offset: wire.offset,
                id: wire.id,
                frame,
                stored: self.now,
            };
            let me = self.me.clone();
            self.store(me, topic.to_string(), term, epoch, entry);
            return;
        }
        self.send(
            &replica,
            PeerFrame::Repl {
                topic: topic.to_string(),
                term,
                epoch,
                entry: wire,
            },
        );
    }

    /// Sends the replica the whole log of a topic this node sequences.
    pub(super) fn sync_replica(&mut self, topic: &str) {
        let replica = self.placement(topic).replica.clone();
        let Some(seq) = self.chains.get_mut(topic).and_then(|c| c.seq.as_mut()) else {
            return;
        };
        let frame = PeerFrame::Sync {
            topic: topic.to_string(),
            term: seq.term,
            state: LogState::of(&seq.log, None),
        };
        seq.synced = Some(replica.clone());
        if !self.send(&replica, frame)
            && let Some(seq) = self.chains.get_mut(topic).and_then(|c| c.seq.as_mut())
        {
            // Not linked yet: tried again with the next publish.
            seq.synced = None;
        }
    }

    /// As sequencer: the replica holds the topic up to `offset`.
    pub(super) fn on_stored(&mut self, topic: &str, epoch: Epoch, offset: u64) {
        if let Some(seq) = self.chains.get_mut(topic).and_then(|c| c.seq.as_mut())
            && seq.log.epoch() == epoch
        {
            seq.replicated = seq.replicated.max(offset.min(seq.log.position().offset));
        }
    }

    /// A node claimed the topic's partition in `term`: a sequencer of an older term steps down.
    pub(super) fn on_fenced(&mut self, topic: String, term: u64) {
        debug!(%topic, term, "a replica refused an older term of the topic's partition");
        self.step_down(partition(&topic), term, None);
    }

    /// The replica asks for the whole log: sent, or the topic claimed first.
    pub(super) fn on_prime(&mut self, topic: String) {
        let chain = self.chains.entry(&topic);
        if let Some(seq) = &mut chain.seq {
            seq.synced = None;
            self.sync_replica(&topic);
        } else if self.placement(&topic).sequencer == self.me {
            self.ensure_active(&topic);
        }
    }

    /// Stops sequencing `topic`; what it numbered is kept aside, for the publish ids of what
    /// went out (see [`Core::best_state`]). Whether it was sequencing.
    pub(super) fn stop_sequencing(&mut self, topic: &str) -> bool {
        let Some(chain) = self.chains.get_mut(topic) else {
            return false;
        };
        let Some(seq) = chain.seq.take() else {
            return false;
        };
        chain.numbered = Some(seq.log);
        true
    }
}
