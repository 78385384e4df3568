//! The frames nodes send each other about topics: publishing, replication, claims and fetches.
//!
//! They travel on the relay links (see [`crate::relay`]) as JSON text messages beside the
//! `interest`/`interest_ack`/`msg` frames; `docs/PROTOCOL.md` section 9 lists them.

use serde::{Deserialize, Serialize};
use streamfarm_core::protocol::{Encoding, Epoch, Position};

use super::log::{Log, PublishId};

/// A message of a log as it travels between nodes: its payload, not the client frame (the
/// receiver rebuilds that once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WireEntry {
    pub(crate) offset: u64,
    pub(crate) id: PublishId,
    pub(crate) data: String,
    #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
    pub(crate) encoding: Encoding,
    /// When its sequencer gave it its position (ms since the Unix epoch): the `msg` frame's `ts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ts: Option<u64>,
}

/// A log as it travels between nodes: its position and the entries it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct LogState {
    pub(crate) epoch: Epoch,
    /// Offset of the newest message (the entries end there, when there are any).
    pub(crate) last: u64,
    #[serde(default)]
    pub(crate) entries: Vec<WireEntry>,
}

impl LogState {
    /// Offset of the oldest message carried (`last + 1` when none is).
    pub(crate) fn first(&self) -> u64 {
        self.entries.first().map_or(self.last + 1, |e| e.offset)
    }
}

/// Frames between nodes about topics (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum PeerFrame {
    /// Origin → sequencer: give this message an offset. `retry`: it may have been numbered
    /// already (sent again, or under a publisher's key); the sequencer looks for it first.
    Pub {
        topic: String,
        id: PublishId,
        data: String,
        #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
        encoding: Encoding,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        retry: bool,
    },
    /// Sequencer → replica: store this message, then send it out.
    Repl {
        topic: String,
        term: u64,
        epoch: Epoch,
        entry: WireEntry,
    },
    /// Sequencer → replica: the whole log, when the replica is new to it.
    Sync {
        topic: String,
        term: u64,
        state: LogState,
    },
    /// Replica → origin: the message is stored and sent out at this position.
    Ack {
        topic: String,
        id: PublishId,
        epoch: Epoch,
        offset: u64,
    },
    /// Replica → sequencer: everything up to `offset` of `epoch` is stored here (sent now and
    /// then, not per message): the sequencer may serve fetches up to it.
    Stored {
        topic: String,
        epoch: Epoch,
        offset: u64,
    },
    /// Sequencer → origin: not sequenced here (not the sequencer, or no longer): try again.
    Nack { topic: String, id: PublishId },
    /// Replica → sequencer: a newer sequencer has claimed the topic's partition; stop sequencing
    /// it.
    Fenced { topic: String, term: u64 },
    /// Replica → sequencer: I have no log of this topic yet; send me one.
    Prime { topic: String },
    /// New sequencer → every live node: stop sequencing the topics of `partition` below `term`,
    /// send me what you hold of them.
    Claim { partition: u32, term: u64 },
    /// Answer to a claim, in one or more frames (`done` on the last): granted with what the node
    /// holds of the partition's topics, or refused (a higher term fenced it).
    ClaimReply {
        partition: u32,
        term: u64,
        granted: bool,
        #[serde(default)]
        states: Vec<(String, LogState)>,
        done: bool,
    },
    /// Any node → replica: the messages after `after` (none: only the current position).
    Fetch {
        topic: String,
        request: u64,
        #[serde(default)]
        after: Option<Position>,
    },
    /// Answer to a fetch; no state: the topic's history cannot be reached from here now.
    FetchReply {
        topic: String,
        request: u64,
        #[serde(default)]
        state: Option<LogState>,
    },
    /// Any node → every live node: for each topic, what you hold after this position (see
    /// `broker::catch_up`).
    CatchUp {
        request: u64,
        topics: Vec<(String, Position)>,
    },
    /// Answer to a catch-up, in one or more frames: the topics whose history here goes beyond
    /// the position asked, with what follows it; `done` on the last frame.
    CatchUpReply {
        request: u64,
        states: Vec<(String, LogState)>,
        done: bool,
    },
}

impl LogState {
    /// What a fetch asking for the messages after `after` gets of `log`: those after it in the
    /// same epoch; all that is held when `after` is of another epoch (it was lost); none, just
    /// the position, when `after` is `None`.
    pub(crate) fn answering(log: &Log, after: Option<Position>) -> Self {
        let from = match after {
            Some(p) if p.epoch == log.epoch() => Some(p.offset),
            Some(_) => None,
            None => Some(log.position().offset),
        };
        LogState::of(log, from)
    }

    /// A log's state with the entries after `after` (all when `None`).
    pub(crate) fn of(log: &Log, after: Option<u64>) -> Self {
        LogState {
            epoch: log.epoch(),
            last: log.position().offset,
            entries: log
                .after(after.unwrap_or(0))
                .map(super::entry_to_wire)
                .collect(),
        }
    }
}
