//! Frames of the streaming WebSocket, shared by the node and the client.
//!
//! Every frame is one WebSocket *text* message holding one JSON object whose `type` field names
//! the frame. `docs/PROTOCOL.md` is the normative description; this module is its code, and the
//! two must agree.
//!
//! Payloads are UTF-8 text in `data`; a payload that is not valid UTF-8 travels base64-encoded with
//! `"encoding":"base64"`.

use serde::{Deserialize, Serialize};

use crate::model::{FarmList, Status};

/// WebSocket close codes the node uses, with what a client should do on each.
pub mod close {
    /// The node is shutting down (RFC 6455 "going away"): reconnect elsewhere, no retry here.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame broke the protocol (RFC 6455 "policy violation").
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame was larger than the node's maximum (RFC 6455 "message too big").
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The node is draining or rebalancing: reconnect to another server, do not retry this one.
    pub const RECONNECT_ELSEWHERE: u16 = 4000;
    /// The client did not read fast enough; its send queue filled up.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// The peer sent nothing within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;
    /// The node holds its maximum number of connections.
    pub const SERVER_FULL: u16 = 4003;
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
    fn is_utf8(&self) -> bool {
        *self == Encoding::Utf8
    }
}

/// A frame from client to node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Subscribe to topics. The node answers with [`ServerFrame::Subscribed`].
    Sub {
        /// Topic names.
        topics: Vec<String>,
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
    /// Ask for the farm list now; with `watch`, also whenever it changes.
    List {
        /// Keep sending updates.
        #[serde(default)]
        watch: bool,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_tagged_json() {
        let frame = ClientFrame::Sub {
            topics: vec!["prices".into()],
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
                encoding: Encoding::Utf8
            }
        );
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
