//! The history of one topic: a contiguous run of positioned messages, bounded in bytes and age.
//!
//! A [`Log`] holds the newest messages of one epoch of a topic, oldest first, with no hole: the
//! entry at index `i` has offset `first() + i`, and the newest has offset `last`. `last` is kept
//! even when every entry was evicted, so a log always knows the topic's current position. The
//! same type serves the topic's sequencer (what it assigned), the node's delivery stream (what
//! its clients were sent) and recovery (what a resuming client missed).
//!
//! Pure: time is passed in, nothing is spawned.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};
use streamfarm_core::protocol::{Epoch, Position};

/// Which publish a message came from: the node it was published on and that node's count.
/// A sequencer that is sent the same publish twice (a retry after a sequencer changed) knows it
/// by this, and does not give it a second offset. Messages a node received as a topic's
/// subscriber carry the default (empty) id: only sequencers and replicas need it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct PublishId {
    /// Name of the node the message was published on.
    pub(crate) origin: String,
    /// That node's publish counter (per run of the node: `run` tells runs apart).
    pub(crate) seq: u64,
    /// The origin's start time in ms: a restarted node counts from 0 again.
    pub(crate) run: u64,
    /// The publisher's own key for it (`Idempotency-Key`), when it gave one: a publisher that
    /// sends the message again through another node is recognized by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<String>,
}

impl PublishId {
    /// Whether `other` is the same publish: the same publisher key, or else the same origin,
    /// run and count.
    pub(crate) fn same_publish(&self, other: &PublishId) -> bool {
        match (&self.key, &other.key) {
            (Some(a), Some(b)) => a == b,
            _ => self == other,
        }
    }
}

/// One message of the history.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Offset within the log's epoch.
    pub(crate) offset: u64,
    /// The publish it came from.
    pub(crate) id: PublishId,
    /// The `msg` frame as clients receive it (topic, data, epoch, offset), serialized once.
    pub(crate) frame: Utf8Bytes,
    /// When this node stored it (for the age limit).
    pub(crate) stored: Instant,
}

impl Entry {
    /// Bytes the entry holds, for the size limit (the frame dominates).
    pub(crate) fn bytes(&self) -> usize {
        self.frame.len() + self.id.origin.len() + 64
    }
}

/// How much history a log keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Most bytes of entries kept.
    pub(crate) bytes: usize,
    /// Entries older than this are dropped.
    pub(crate) age: Duration,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Log {
    epoch: Epoch,
    /// Offset of the newest message (0: none yet in this epoch).
    last: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
}

/// What [`Log::offer`] made of a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offered {
    /// It was the next one: appended.
    Appended,
    /// The log already holds it (or held it): nothing to do.
    Duplicate,
    /// Messages between the log's end and it are missing: offsets `from..=to`.
    Gap { from: u64, to: u64 },
    /// It belongs to another epoch.
    OtherEpoch,
}

impl Log {
    /// An empty log of `epoch` whose newest message is `last` (0: none yet).
    pub(crate) fn new(epoch: Epoch, last: u64) -> Self {
        Log {
            epoch,
            last,
            entries: VecDeque::new(),
            bytes: 0,
        }
    }

    /// The epoch.
    pub(crate) fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The position of the newest message.
    pub(crate) fn position(&self) -> Position {
        Position::new(self.epoch, self.last)
    }

    /// Offset of the oldest message held (`last + 1` when none is held).
    pub(crate) fn first(&self) -> u64 {
        self.last + 1 - self.entries.len() as u64
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends `entry` if it is the next message of this epoch.
    pub(crate) fn offer(&mut self, epoch: Epoch, entry: Entry) -> Offered {
        if epoch != self.epoch {
            return Offered::OtherEpoch;
        }
        if entry.offset <= self.last {
            return Offered::Duplicate;
        }
        if entry.offset > self.last + 1 {
            return Offered::Gap {
                from: self.last + 1,
                to: entry.offset - 1,
            };
        }
        self.push(entry);
        Offered::Appended
    }

    /// Appends the next message; the caller made sure it is the next.
    pub(crate) fn push(&mut self, entry: Entry) {
        debug_assert_eq!(entry.offset, self.last + 1);
        self.last = entry.offset;
        self.bytes += entry.bytes();
        self.entries.push_back(entry);
    }

    /// Drops the oldest entries beyond `limits` at `now`.
    pub(crate) fn trim(&mut self, limits: Limits, now: Instant) {
        while let Some(oldest) = self.entries.front() {
            let too_old = now.saturating_duration_since(oldest.stored) > limits.age;
            if self.bytes <= limits.bytes && !too_old {
                break;
            }
            self.bytes -= oldest.bytes();
            self.entries.pop_front();
        }
    }

    /// The entries after `offset`, oldest first (those still held).
    pub(crate) fn after(&self, offset: u64) -> impl Iterator<Item = &Entry> {
        let skip = offset.saturating_sub(self.first() - 1) as usize;
        self.entries.iter().skip(skip)
    }

    /// The offset this log gave the publish `id`, if it holds it.
    pub(crate) fn offset_of(&self, id: &PublishId) -> Option<u64> {
        // Newest first: a retried publish is a recent one.
        self.entries
            .iter()
            .rev()
            .find(|e| e.id.same_publish(id))
            .map(|e| e.offset)
    }

    /// Adds entries older than the oldest held, when they join up with it (`older` sorted, of
    /// this epoch); returns how many were added. Newer or overlapping ones are ignored.
    pub(crate) fn prepend(&mut self, older: &[Entry]) -> usize {
        let first = self.first();
        let mut added = 0;
        for entry in older.iter().rev() {
            if entry.offset + 1 + added as u64 == first {
                self.bytes += entry.bytes();
                self.entries.push_front(entry.clone());
                added += 1;
            }
        }
        added
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(offset: u64, at: Instant) -> Entry {
        Entry {
            offset,
            id: PublishId {
                origin: "a".into(),
                seq: offset,
                run: 1,
                key: None,
            },
            frame: Utf8Bytes::from(format!("m{offset}")),
            stored: at,
        }
    }

    const E: Epoch = Epoch(7);

    #[test]
    fn messages_are_appended_in_order_and_gaps_and_duplicates_named() {
        let now = Instant::now();
        let mut log = Log::new(E, 0);
        assert_eq!(log.first(), 1);
        assert_eq!(log.offer(E, entry(1, now)), Offered::Appended);
        assert_eq!(log.offer(E, entry(2, now)), Offered::Appended);
        assert_eq!(log.offer(E, entry(2, now)), Offered::Duplicate);
        assert_eq!(log.offer(E, entry(5, now)), Offered::Gap { from: 3, to: 4 });
        assert_eq!(log.offer(Epoch(8), entry(3, now)), Offered::OtherEpoch);
        assert_eq!(log.position(), Position::new(E, 2));
        let after: Vec<u64> = log.after(1).map(|e| e.offset).collect();
        assert_eq!(after, vec![2]);
        assert_eq!(log.after(0).count(), 2);
        assert_eq!(log.after(2).count(), 0);
    }

    #[test]
    fn trimming_keeps_the_position_and_the_newest() {
        let start = Instant::now();
        let mut log = Log::new(E, 10);
        for offset in 11..=20 {
            log.push(entry(offset, start + Duration::from_secs(offset)));
        }
        let one = entry(11, start).bytes();
        log.trim(
            Limits {
                bytes: one * 4,
                age: Duration::from_secs(3600),
            },
            start,
        );
        assert_eq!((log.first(), log.position().offset), (17, 20));
        log.trim(
            Limits {
                bytes: usize::MAX,
                age: Duration::from_secs(1),
            },
            start + Duration::from_secs(20),
        );
        // 19 is exactly the limit old: kept.
        assert_eq!((log.first(), log.position().offset), (19, 20));
        log.trim(
            Limits {
                bytes: 0,
                age: Duration::ZERO,
            },
            start,
        );
        assert_eq!(
            (log.first(), log.position().offset, log.bytes()),
            (21, 20, 0)
        );
        // `after` an offset older than what is held gives what is held.
        assert_eq!(log.after(3).count(), 0);
    }

    #[test]
    fn older_entries_join_up_at_the_front() {
        let now = Instant::now();
        let mut log = Log::new(E, 4);
        log.push(entry(5, now));
        log.push(entry(6, now));
        let older: Vec<Entry> = (1..=5).map(|o| entry(o, now)).collect();
        assert_eq!(log.prepend(&older), 4);
        let all: Vec<u64> = log.after(0).map(|e| e.offset).collect();
        assert_eq!(all, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(log.offset_of(&entry(3, now).id), Some(3));
        // Not joining up: ignored.
        let mut log = Log::new(E, 10);
        log.push(entry(11, now));
        assert_eq!(log.prepend(&[entry(3, now)]), 0);
    }
}
