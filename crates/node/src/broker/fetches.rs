//! Fetches and recovery: what a subscription resuming from a position, or a stream with a hole,
//! needs from the topic's replica (or, asked again, from every live node), and the answers.

use super::*;

/// A fetch this node is waiting for.
pub(super) struct FetchWait {
    pub(super) topic: String,
    pub(super) after: Option<Position>,
    pub(super) sent_to: String,
    /// When it was last sent: sent again after [`RESEND_AFTER`] (links come and go).
    pub(super) sent_at: Instant,
    pub(super) deadline: Instant,
    /// A hole in the live stream (one fetch at a time per topic), not a subscription's.
    pub(super) fill: bool,
    /// The subscriptions waiting for the answer: every one whose messages it brings (see
    /// [`covers`]), however many clients resume at once.
    pub(super) waiters: Vec<oneshot::Sender<()>>,
}

/// A fetch that reached this node as replica before it had the topic's log.
pub(super) struct HeldFetch {
    pub(super) from: String,
    pub(super) request: u64,
    pub(super) after: Option<Position>,
    pub(super) deadline: Instant,
}

/// Whether the answer to a fetch of what follows `asked` brings everything a fetch of what
/// follows `needed` would: any answer gives the stream's position (all a live subscription
/// needs), and one from an earlier offset of the same epoch holds the later messages too.
pub(super) fn covers(asked: Option<Position>, needed: Option<Position>) -> bool {
    match (asked, needed) {
        (_, None) => true,
        (Some(asked), Some(needed)) => asked.epoch == needed.epoch && asked.offset <= needed.offset,
        (None, Some(_)) => false,
    }
}

impl Core {
    /// Asks the topic's replica for what follows `after` in the hub's stream of `topic`.
    pub(super) fn fetch(
        &mut self,
        topic: String,
        after: Option<Position>,
        done: Option<oneshot::Sender<()>>,
    ) {
        let now = self.now;
        let Some(done) = done else {
            // A hole: one fetch at a time per topic.
            if self.filling.get(&topic).is_some_and(|until| *until > now) {
                return;
            }
            self.filling.insert(topic.clone(), now + FETCH_WAIT);
            self.send_fetch(topic, after, true, Vec::new());
            return;
        };
        // A subscription waits on a fetch already asked for that brings what it needs: when a
        // node's clients fail over to this one, thousands resume the same topic within
        // milliseconds, and one fetch each would make the replica answer the same history
        // thousands of times — on a farm already busy with the failover — and every answer
        // late past `RESEND_AFTER` be asked again of every live node.
        let under_way = self.fetches_by_topic.get(&topic).and_then(|requests| {
            requests
                .iter()
                .copied()
                .find(|r| self.fetches.get(r).is_some_and(|w| covers(w.after, after)))
        });
        if let Some(wait) = under_way.and_then(|r| self.fetches.get_mut(&r)) {
            wait.waiters.push(done);
            return;
        }
        self.send_fetch(topic, after, false, vec![done]);
    }

    /// Sends a new fetch of what follows `after` in `topic` to its replica and waits for it.
    pub(super) fn send_fetch(
        &mut self,
        topic: String,
        after: Option<Position>,
        fill: bool,
        waiters: Vec<oneshot::Sender<()>>,
    ) {
        let now = self.now;
        self.next_request += 1;
        let request = self.next_request;
        // To the replica, which holds everything that went out; sent again (after
        // `RESEND_AFTER`) to every live node, the sequencer included, when it does not answer.
        let to = self.placement(&topic).replica.clone();
        self.send(
            &to,
            PeerFrame::Fetch {
                topic: topic.clone(),
                request,
                after,
            },
        );
        if !fill {
            self.fetches_by_topic
                .entry(topic.clone())
                .or_default()
                .push(request);
        }
        self.track_fetch(
            request,
            FetchWait {
                topic,
                after,
                sent_to: to,
                sent_at: now,
                deadline: now + FETCH_WAIT,
                fill,
                waiters,
            },
        );
    }

    /// Keeps `wait` as fetch `request` (sent at `wait.sent_at`) until its answer or deadline.
    pub(super) fn track_fetch(&mut self, request: u64, wait: FetchWait) {
        self.timers
            .resends
            .push_back((wait.sent_at + RESEND_AFTER, request));
        self.timers
            .fetch_deadlines
            .push_back((wait.deadline, request));
        self.fetches.insert(request, wait);
    }

    /// Forgets fetch `request`: answered, or past its deadline.
    pub(super) fn untrack_fetch(&mut self, request: u64) -> Option<FetchWait> {
        let wait = self.fetches.remove(&request)?;
        if let Some(requests) = self.fetches_by_topic.get_mut(&wait.topic) {
            requests.retain(|r| *r != request);
            if requests.is_empty() {
                self.fetches_by_topic.remove(&wait.topic);
            }
        }
        if wait.fill {
            self.filling.remove(&wait.topic);
        }
        Some(wait)
    }

    /// Sends fetch `request` again, to the topic's replica of the moment.
    ///
    /// Sent again, it goes to every other live node too: the replica may be the node that just
    /// died, still listed, and any node that delivers the topic holds what went out of it.
    pub(super) fn refetch(&mut self, request: u64) {
        let Some(wait) = self.fetches.get(&request) else {
            return;
        };
        let replica = self.placement(&wait.topic).replica.clone();
        let frame = PeerFrame::Fetch {
            topic: wait.topic.clone(),
            request,
            after: wait.after,
        };
        let others: Vec<String> = self
            .live
            .iter()
            .filter(|n| **n != self.me && **n != replica)
            .cloned()
            .collect();
        for peer in others {
            self.send(&peer, frame.clone());
        }
        self.send(&replica, frame);
        if let Some(wait) = self.fetches.get_mut(&request) {
            wait.sent_to = replica;
            wait.sent_at = self.now;
            self.timers
                .resends
                .push_back((wait.sent_at + RESEND_AFTER, request));
        }
    }

    pub(super) fn on_fetch(
        &mut self,
        from: String,
        topic: String,
        request: u64,
        after: Option<Position>,
    ) {
        let placement = self.placement(&topic);
        let chain = self.chains.entry(&topic);
        if chain.stored.is_none() && placement.replica == self.me {
            // The topic's replica has no log yet (nothing published since it became replica):
            // the sequencer sends it one, then the fetch is answered.
            let now = self.now;
            chain.held.push(HeldFetch {
                from,
                request,
                after,
                deadline: now + FETCH_WAIT,
            });
            self.timers
                .held_deadlines
                .push_back((now + FETCH_WAIT, topic.clone()));
            self.timers
                .primes
                .push_back((now + PRIME_AGAIN, topic.clone()));
            self.send(&placement.sequencer, PeerFrame::Prime { topic });
            return;
        }
        self.answer_fetch(&from, &topic, request, after);
    }

    /// Answers a fetch from the replica log, or else the stream this node delivers.
    pub(super) fn answer_fetch(
        &mut self,
        to: &str,
        topic: &str,
        request: u64,
        after: Option<Position>,
    ) {
        let state = self.fetch_state(topic, after);
        self.send(
            to,
            PeerFrame::FetchReply {
                topic: topic.to_string(),
                request,
                state,
            },
        );
    }

    /// What a fetch of what follows `after` gets here: from the replica log, else the
    /// sequencer's log up to what its replica stored, else the stream this node delivers.
    pub(super) fn fetch_state(&self, topic: &str, after: Option<Position>) -> Option<LogState> {
        let of = |log: &Log| LogState::answering(log, after);
        let chain = self.chains.get(topic);
        match (
            chain.and_then(|c| c.stored.as_ref()),
            chain.and_then(|c| c.seq.as_ref()),
        ) {
            (Some(log), _) => Some(of(log)),
            // The sequencer serves what its replica reported stored, nothing beyond: a message
            // not yet stored may never go out.
            (None, Some(seq)) => {
                let mut state = of(&seq.log);
                state.entries.retain(|e| e.offset <= seq.replicated);
                state.last = seq.replicated;
                Some(state)
            }
            (None, None) => self.hub.with_log(topic, of),
        }
    }

    pub(super) fn on_fetch_reply(
        &mut self,
        from: &str,
        topic: String,
        request: u64,
        state: Option<LogState>,
    ) {
        // The first answer with history wins; an empty one (a node that does not hold the topic)
        // leaves the fetch to the others and its deadline.
        if state.is_none() {
            debug!(%topic, request, "a node holds no history of the topic");
            return;
        }
        // An answer a little behind (a node that delivers the topic a little late, a sequencer
        // whose replica reported a tick ago) is taken: what it lacks comes with the live stream,
        // whose hole is then fetched; waiting for a better one could wait out the failure timeout.
        let Some(wait) = self.untrack_fetch(request) else {
            return;
        };
        debug!(
            %topic,
            %from,
            waiters = wait.waiters.len(),
            took_ms = self.now.duration_since(wait.deadline - FETCH_WAIT).as_millis() as u64,
            "fetch answered"
        );
        if let Some(state) = state {
            self.hub.merge(&topic, &state, &mut self.wakes);
        }
        for done in wait.waiters {
            let _ = done.send(());
        }
    }

    /// Fetches to send again or give up, replicas to prime, held fetches past their deadline.
    pub(super) fn fetches_due(&mut self, now: Instant) {
        // Fetches not answered yet are sent again (the link may not have been up); those past
        // their deadline are given up.
        for request in due(&mut self.timers.resends, now) {
            let again = self
                .fetches
                .get(&request)
                .is_some_and(|f| now < f.deadline && now.duration_since(f.sent_at) >= RESEND_AFTER);
            if again {
                self.refetch(request);
            }
        }
        for request in due(&mut self.timers.fetch_deadlines, now) {
            if self
                .fetches
                .get(&request)
                .is_some_and(|f| now >= f.deadline)
                && let Some(wait) = self.untrack_fetch(request)
            {
                debug!(topic = %wait.topic, "fetch not answered in time");
            }
        }
        // A replica still waiting for a log asks its sequencer again.
        for topic in due(&mut self.timers.primes, now) {
            let waiting = self
                .chains
                .get(&topic)
                .is_some_and(|c| c.stored.is_none() && !c.held.is_empty());
            if waiting {
                let sequencer = self.placement(&topic).sequencer.clone();
                self.send(
                    &sequencer,
                    PeerFrame::Prime {
                        topic: topic.clone(),
                    },
                );
                self.timers.primes.push_back((now + PRIME_AGAIN, topic));
            }
        }
        // Fetches held for a log that did not come in time are answered empty.
        for topic in due(&mut self.timers.held_deadlines, now) {
            let Some(chain) = self.chains.get_mut(&topic) else {
                continue;
            };
            let (late, kept): (Vec<HeldFetch>, Vec<HeldFetch>) =
                chain.held.drain(..).partition(|f| now >= f.deadline);
            chain.held = kept;
            for fetch in late {
                self.send(
                    &fetch.from,
                    PeerFrame::FetchReply {
                        topic: topic.clone(),
                        request: fetch.request,
                        state: None,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_covers_live_subscriptions_and_later_offsets_of_its_epoch() {
        let e1 = Epoch(1);
        let e2 = Epoch(2);
        let at = |epoch, offset| Some(Position { epoch, offset });
        assert!(covers(None, None));
        assert!(covers(at(e1, 5), None));
        assert!(covers(at(e1, 5), at(e1, 5)));
        assert!(covers(at(e1, 5), at(e1, 9)));
        assert!(!covers(at(e1, 5), at(e1, 4)));
        assert!(!covers(at(e1, 5), at(e2, 9)));
        // A fetch of the position alone brings no messages.
        assert!(!covers(None, at(e1, 9)));
    }
}
