//! Publishes made on this node, from their first send to the sequencer until their
//! acknowledgement: sent again to the sequencer of the moment, given up at their deadline.

use super::*;

/// A publish made on this node, until its acknowledgement.
pub(super) struct Pending {
    pub(super) topic: String,
    pub(super) data: String,
    pub(super) encoding: Encoding,
    /// The sequencer it was last sent to, and when.
    pub(super) sent_to: String,
    pub(super) sent_at: Instant,
    pub(super) deadline: Instant,
    pub(super) done: Option<oneshot::Sender<Result<Position, PublishError>>>,
}

impl Core {
    pub(super) fn publish(
        &mut self,
        topic: String,
        data: String,
        encoding: Encoding,
        key: Option<String>,
        done: Option<oneshot::Sender<Result<Position, PublishError>>>,
    ) {
        if self.pending_bytes + data.len() > MAX_PENDING_BYTES {
            metrics::inc(&self.metrics.publish_failures);
            if let Some(done) = done {
                let _ = done.send(Err(PublishError::Overloaded));
            }
            return;
        }
        metrics::inc(&self.metrics.messages_published);
        self.next_seq += 1;
        let retry = key.is_some();
        let id = PublishId {
            origin: self.me.clone(),
            seq: self.next_seq,
            run: self.run,
            key,
        };
        let to = self.placement(&topic).sequencer.clone();
        let now = self.now;
        self.pending_bytes += data.len();
        self.send(
            &to,
            PeerFrame::Pub {
                topic: topic.clone(),
                id: id.clone(),
                data: data.clone(),
                encoding,
                retry,
            },
        );
        self.pending.insert(
            id,
            Pending {
                topic,
                data,
                encoding,
                sent_to: to,
                sent_at: now,
                deadline: now + self.publish_timeout,
                done,
            },
        );
    }

    /// As origin: the publish is acknowledged at `position`.
    pub(super) fn on_ack(&mut self, id: &PublishId, position: Position) {
        if let Some(pending) = self.pending.remove(id) {
            self.pending_bytes -= pending.data.len();
            if let Some(done) = pending.done {
                let _ = done.send(Ok(position));
            }
        }
    }

    /// As origin: the node sent the publish is not its sequencer (or no longer): sent again at
    /// the next tick, to the sequencer of the moment.
    pub(super) fn on_nack(&mut self, id: &PublishId) {
        if let Some(pending) = self.pending.get_mut(id) {
            pending.sent_at = self.now - RESEND_AFTER + TICK;
        }
    }

    pub(super) fn resend(&mut self, id: &PublishId) {
        let Some(pending) = self.pending.get(id) else {
            return;
        };
        let to = self.placement(&pending.topic).sequencer.clone();
        let frame = PeerFrame::Pub {
            topic: pending.topic.clone(),
            id: id.clone(),
            data: pending.data.clone(),
            encoding: pending.encoding,
            retry: true,
        };
        self.send(&to, frame);
        if let Some(pending) = self.pending.get_mut(id) {
            pending.sent_to = to;
            pending.sent_at = self.now;
        }
    }

    /// Publishes: retried, or given up at their deadline.
    pub(super) fn publishes_due(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut again = Vec::new();
        for (id, pending) in &self.pending {
            if now >= pending.deadline {
                expired.push(id.clone());
            } else if now.duration_since(pending.sent_at) >= RESEND_AFTER {
                again.push(id.clone());
            }
        }
        again.sort_by_key(|id| id.seq);
        for id in expired {
            if let Some(pending) = self.pending.remove(&id) {
                self.pending_bytes -= pending.data.len();
                metrics::inc(&self.metrics.publish_failures);
                warn!(topic = %pending.topic, "publish not acknowledged in time");
                if let Some(done) = pending.done {
                    let _ = done.send(Err(PublishError::TimedOut(self.publish_timeout)));
                }
            }
        }
        for id in again {
            self.resend(&id);
        }
    }
}
