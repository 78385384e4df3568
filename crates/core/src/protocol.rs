//! Frames of the streaming WebSocket, shared by the node and the client.
//!
//! Every frame is one WebSocket *text* message holding one JSON object whose `type` field names
//! the frame. `docs/PROTOCOL.md` is the normative description; this module is its code, and the
//! two must agree.
//!
//! Payloads are UTF-8 text in `data`; a payload that is not valid UTF-8 travels base64-encoded with
//! `"encoding":"base64"`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{FarmList, Status};

pub mod event_id;

/// Identifies one run of a topic's offsets: a topic keeps its epoch for as long as its history
/// survives, and starts a new one only when it was truly lost (every node that held it is gone).
///
/// On the wire an epoch is a string of 16 hexadecimal digits (a JSON number could not carry 64
/// bits into JavaScript); clients compare epochs only for equality. Nodes make a new epoch from
/// the wall clock's milliseconds and random low bits, so a newer epoch compares greater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for Epoch {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() || text.len() > 16 {
            return Err(format!("epoch {text:?} is not 1 to 16 hexadecimal digits"));
        }
        u64::from_str_radix(text, 16)
            .map(Epoch)
            .map_err(|_| format!("epoch {text:?} is not hexadecimal"))
    }
}

impl Serialize for Epoch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Epoch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a message stands in its topic: the same on every node of the farm, so a client can
/// resume on any node. Offsets count from 1 within an epoch; offset 0 is "before the first
/// message".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Position {
    /// The run of offsets this one belongs to.
    pub epoch: Epoch,
    /// The message's number within the epoch.
    pub offset: u64,
}

impl Position {
    /// The position `offset` of `epoch`.
    pub fn new(epoch: Epoch, offset: u64) -> Self {
        Position { epoch, offset }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

/// Why messages of a topic cannot be delivered (a [`ServerFrame::Gap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// The messages are older than the history the farm keeps (its size or age limit).
    HistoryExceeded,
    /// The topic's history was lost with the nodes that held it: a new epoch started.
    EpochLost,
    /// The node could not reach the topic's history in time (a partition, an overloaded farm).
    Unavailable,
}

impl GapReason {
    /// The name used on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            GapReason::HistoryExceeded => "history_exceeded",
            GapReason::EpochLost => "epoch_lost",
            GapReason::Unavailable => "unavailable",
        }
    }
}

/// WebSocket close codes the node uses, with what a client should do on each.
pub mod close {
    /// The node is shutting down (RFC 6455 "going away"): reconnect elsewhere, no retry here.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame broke the protocol (RFC 6455 "policy violation").
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame was larger than the node's maximum (RFC 6455 "message too big").
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The node is draining or rebalancing (or the client did not follow a `migrate` in time):
    /// reconnect to another server, do not retry this one.
    pub const RECONNECT_ELSEWHERE: u16 = 4000;
    /// The client did not read fast enough; its send queue filled up.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// The peer sent nothing within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;
    /// The node holds its maximum number of connections.
    pub const SERVER_FULL: u16 = 4003;
    /// The node requires a token and none came (not in the url, the `Authorization` header,
    /// nor an `auth` first frame within the deadline). Get a token, then reconnect.
    pub const AUTH_MISSING: u16 = 4010;
    /// The token is not valid here: malformed, bad signature, unknown key id, wrong algorithm,
    /// audience or issuer, or bad claims. Retrying with the same token is useless.
    pub const AUTH_INVALID: u16 = 4011;
    /// The token expired (at connect, or later without a `refresh` in time). Get a fresh token,
    /// then reconnect.
    pub const AUTH_EXPIRED: u16 = 4012;
    /// A valid token that no longer allows what the connection holds: a `refresh` naming another
    /// subject, or no longer allowing a topic it is subscribed to.
    pub const AUTH_FORBIDDEN: u16 = 4013;
}

/// How a message payload is carried in `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// `data` is the payload itself (valid UTF-8).
    #[default]
    Utf8,
    /// `data` is the payload in standard base64.
    Base64,
}

impl Encoding {
    /// Whether this is the default, [`Encoding::Utf8`] (left out of frames).
    pub fn is_utf8(&self) -> bool {
        *self == Encoding::Utf8
    }
}

/// What a client can do beyond the base protocol, named in its [`ClientFrame::Hello`].
pub mod feature {
    /// The client follows [`ServerFrame::Migrate`](super::ServerFrame::Migrate): it connects to
    /// its new server, resumes there and only then closes the old connection. A node closes
    /// clients without it with `4000` when it moves them.
    pub const MIGRATE: &str = "migrate";
}

/// A frame from client to node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Optional first frame: what the client can do (see [`feature`]), and whether this
    /// connection is the new end of a migration.
    Hello {
        /// Features the client supports.
        #[serde(default)]
        features: Vec<String>,
        /// This connection replaces one the client is moving away from, at its old node's request.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        migrating: bool,
    },
    /// Subscribe to topics. The node answers with [`ServerFrame::Subscribed`].
    Sub {
        /// Topic names.
        topics: Vec<String>,
        /// Per topic, the position of the last message the client holds: the node sends what
        /// came after it before any live message (see `docs/PROTOCOL.md`, recovery).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        positions: BTreeMap<String, Position>,
    },
    /// Stop receiving topics. The node answers with [`ServerFrame::Unsubscribed`].
    Unsub {
        /// Topic names.
        topics: Vec<String>,
    },
    /// Publish a message, when the node allows publishing over the WebSocket.
    Pub {
        /// Topic to publish on.
        topic: String,
        /// The payload.
        data: String,
        /// How `data` is encoded.
        #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
        encoding: Encoding,
    },
    /// Ask for the farm list now; with `watch`, also whenever the farm's membership changes
    /// (with `users` too, whenever anything in it changes, users included).
    List {
        /// Keep sending updates.
        #[serde(default)]
        watch: bool,
        /// Watch users too: a list on every change (dashboards, measurements).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        users: bool,
    },
    /// A connection token (JWT), as the first frame of a connection that did not carry one in
    /// its url or `Authorization` header; the node answers with `hello` once it is accepted.
    Auth {
        /// The token.
        token: String,
    },
    /// A new token for an open connection, before the current one expires; the node answers
    /// [`ServerFrame::Refreshed`], or closes (`4011`, `4012`, `4013`).
    Refresh {
        /// The token.
        token: String,
    },
    /// Heartbeat; the node answers with [`ServerFrame::Pong`].
    Ping {
        /// Opaque value echoed back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// Answer to a [`ServerFrame::Ping`].
    Pong {
        /// The ping's value.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

/// A frame from node to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every connection: who the node is and how it expects heartbeats.
    Hello {
        /// Node name.
        server: String,
        /// The node's streaming url.
        url: String,
        /// The node's status at connect time.
        status: Status,
        /// The node sends a ping when it has sent nothing for this long; the client should too.
        heartbeat_interval_ms: u64,
        /// The node closes a connection that sent nothing for this long.
        heartbeat_timeout_ms: u64,
        /// Largest frame the node accepts, in bytes.
        max_frame_bytes: usize,
    },
    /// The farm list, sent after `hello` and on request (see [`ClientFrame::List`]).
    Farm(FarmList),
    /// Topics are now subscribed.
    Subscribed {
        /// Topic names.
        topics: Vec<String>,
        /// Per topic, the position of the last message published before live delivery to this
        /// connection starts (offset 0: none yet in that epoch).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        positions: BTreeMap<String, Position>,
    },
    /// Topics are no longer subscribed.
    Unsubscribed {
        /// Topic names.
        topics: Vec<String>,
    },
    /// A message published on a subscribed topic.
    Msg {
        /// Topic it was published on.
        topic: String,
        /// The payload.
        data: String,
        /// How `data` is encoded.
        #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
        encoding: Encoding,
        /// The epoch of the message's position (absent only from nodes older than positions).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<Epoch>,
        /// The offset of the message's position within `epoch`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// When the farm accepted the message: its sequencer's wall clock when it gave the
        /// position, in milliseconds since the Unix epoch (absent from nodes that do not stamp).
        /// Last, so that a node reads it from the end of the frame without parsing the payload.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ts: Option<u64>,
    },
    /// Messages of `topic` that will never be delivered: offsets `from..=to` of `epoch` (`to`
    /// absent: to the end of that epoch). Sent in place of them, before what follows them.
    Gap {
        /// The topic.
        topic: String,
        /// The epoch the missing messages belong to.
        epoch: Epoch,
        /// First missing offset.
        from: u64,
        /// Last missing offset; absent when the rest of the epoch is gone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<u64>,
        /// Why.
        reason: GapReason,
    },
    /// Whether this node receives what the whole farm publishes. `complete: false`: the node is
    /// cut off from the rest of the farm, so messages published elsewhere do not reach it for
    /// now (they are delivered, from history, once it is back in touch: `complete: true`).
    Feed {
        /// The feed is whole again.
        complete: bool,
    },
    /// Move to another server (rebalancing, draining, shutdown): connect to `to` — or, without
    /// it, to a server of the client's own choosing other than this one — resume every topic
    /// there from its position, and close this connection once caught up. This node keeps
    /// delivering meanwhile, and closes with `4000` after `deadline_ms`. Sent only to clients
    /// that announced [`feature::MIGRATE`].
    Migrate {
        /// The server to move to (its streaming url).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        /// Why: `rebalance`, `drain`, `shutdown`.
        reason: String,
        /// How long this node waits for the client to leave before closing it with `4000`.
        deadline_ms: u64,
    },
    /// The token of a `refresh` is accepted: the connection lives on until its expiry.
    Refreshed {
        /// The new token's expiry, seconds since the Unix epoch (absent on a node that checks
        /// no tokens).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    },
    /// A frame could not be served; the connection stays open unless a close follows.
    Error {
        /// Stable machine-readable code (`bad_frame`, `too_big`, `not_allowed`, …).
        code: String,
        /// What was wrong, for a person.
        message: String,
    },
    /// Heartbeat; the client answers with [`ClientFrame::Pong`].
    Ping {
        /// Opaque value echoed back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// Answer to a [`ClientFrame::Ping`].
    Pong {
        /// The ping's value.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

impl ServerFrame {
    /// Reads a frame from its JSON text.
    ///
    /// The same as `serde_json::from_str`, faster for `msg` frames, which are nearly all a
    /// client reads: serde reads an internally tagged enum by first buffering every field of the
    /// object into a tree of its own, then reading the variant from that tree. A text that opens
    /// with the `msg` tag (as every node writes it) is read straight into the message's fields.
    ///
    /// ```
    /// use streamfarm_core::protocol::ServerFrame;
    /// let text = r#"{"type":"msg","topic":"t","data":"hi","epoch":"0000000000000001","offset":2}"#;
    /// assert_eq!(ServerFrame::from_json(text).unwrap(), serde_json::from_str(text).unwrap());
    /// ```
    pub fn from_json(text: &str) -> Result<ServerFrame, serde_json::Error> {
        if text.starts_with(MSG_TAG) {
            let MsgFields {
                topic,
                data,
                encoding,
                epoch,
                offset,
                ts,
            } = serde_json::from_str(text)?;
            return Ok(ServerFrame::Msg {
                topic,
                data,
                encoding,
                epoch,
                offset,
                ts,
            });
        }
        serde_json::from_str(text)
    }

    /// The position of a `msg` frame, when it carries one.
    pub fn position(&self) -> Option<Position> {
        match self {
            ServerFrame::Msg {
                epoch: Some(epoch),
                offset: Some(offset),
                ..
            } => Some(Position::new(*epoch, *offset)),
            _ => None,
        }
    }
}

/// How every node opens a `msg` frame (serde writes the tag first).
const MSG_TAG: &str = r#"{"type":"msg","#;

/// The fields of [`ServerFrame::Msg`], read without the enum's buffering (the `type` field,
/// already checked, is skipped like any other unknown field).
#[derive(Deserialize)]
struct MsgFields {
    topic: String,
    data: String,
    #[serde(default)]
    encoding: Encoding,
    #[serde(default)]
    epoch: Option<Epoch>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    ts: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The fast path for `msg` frames reads exactly what serde reads, for any message, and
        /// any other frame goes through serde.
        #[test]
        fn from_json_reads_what_serde_reads(
            topic in "[a-z./\"\\\\ é]{0,12}",
            data in "\\PC{0,40}",
            base64 in proptest::bool::ANY,
            position in proptest::option::of((0u64..u64::MAX, 0u64..u64::MAX)),
            ts in proptest::option::of(0u64..u64::MAX),
        ) {
            let frame = ServerFrame::Msg {
                topic: topic.clone(),
                data,
                encoding: if base64 { Encoding::Base64 } else { Encoding::Utf8 },
                epoch: position.map(|(e, _)| Epoch(e)),
                offset: position.map(|(_, o)| o),
                ts,
            };
            let text = serde_json::to_string(&frame).unwrap();
            proptest::prop_assert!(text.starts_with(MSG_TAG));
            proptest::prop_assert_eq!(ServerFrame::from_json(&text).unwrap(), frame);
            let other = ServerFrame::Unsubscribed { topics: vec![topic] };
            let text = serde_json::to_string(&other).unwrap();
            proptest::prop_assert_eq!(ServerFrame::from_json(&text).unwrap(), other);
        }
    }

    #[test]
    fn from_json_refuses_what_serde_refuses() {
        for text in [
            r#"{"type":"msg","topic":"t"}"#,
            r#"{"type":"msg","topic":"t","data":7}"#,
            r#"{"type":"msg","topic":"t","data":"x","encoding":"rot13"}"#,
            r#"{"type":"msg","#,
            r#"{"type":"nope"}"#,
        ] {
            assert!(serde_json::from_str::<ServerFrame>(text).is_err(), "{text}");
            assert!(ServerFrame::from_json(text).is_err(), "{text}");
        }
        // Fields in another order still read, through serde.
        let text = r#"{"topic":"t","data":"x","type":"msg"}"#;
        assert_eq!(
            ServerFrame::from_json(text).unwrap(),
            serde_json::from_str::<ServerFrame>(text).unwrap()
        );
    }

    #[test]
    fn frames_are_tagged_json() {
        let frame = ClientFrame::Sub {
            topics: vec!["prices".into()],
            positions: BTreeMap::new(),
        };
        assert_eq!(
            serde_json::to_string(&frame).unwrap(),
            r#"{"type":"sub","topics":["prices"]}"#
        );
        let msg: ServerFrame =
            serde_json::from_str(r#"{"type":"msg","topic":"t","data":"hi"}"#).unwrap();
        assert_eq!(
            msg,
            ServerFrame::Msg {
                topic: "t".into(),
                data: "hi".into(),
                encoding: Encoding::Utf8,
                epoch: None,
                offset: None,
                ts: None,
            }
        );
    }

    #[test]
    fn positions_travel_as_hex_epochs_and_integer_offsets() {
        let frame = ServerFrame::Msg {
            topic: "t".into(),
            data: "hi".into(),
            encoding: Encoding::Utf8,
            epoch: Some(Epoch(0x5f3a)),
            offset: Some(17),
            ts: None,
        };
        let text = serde_json::to_string(&frame).unwrap();
        assert_eq!(
            text,
            r#"{"type":"msg","topic":"t","data":"hi","epoch":"0000000000005f3a","offset":17}"#
        );
        let back: ServerFrame = serde_json::from_str(&text).unwrap();
        assert_eq!(back.position(), Some(Position::new(Epoch(0x5f3a), 17)));
        let sub: ClientFrame = serde_json::from_str(
            r#"{"type":"sub","topics":["t"],"positions":{"t":{"epoch":"5f3a","offset":17}}}"#,
        )
        .unwrap();
        let ClientFrame::Sub { positions, .. } = sub else {
            panic!("a sub frame")
        };
        assert_eq!(positions["t"], Position::new(Epoch(0x5f3a), 17));
        assert!("xyz".parse::<Epoch>().is_err());
        assert!("".parse::<Epoch>().is_err());
        assert!("12345678901234567".parse::<Epoch>().is_err());
    }

    #[test]
    fn farm_frame_carries_the_list_inline() {
        let frame = ServerFrame::Farm(FarmList::default());
        assert_eq!(
            serde_json::to_string(&frame).unwrap(),
            r#"{"type":"farm","servers":[]}"#
        );
    }
}
