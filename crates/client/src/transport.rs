//! Which transport carries a connection: a WebSocket, or an event stream (`GET /sse`, with the
//! client's frames as `POST /sse/{stream}`) for networks that refuse the WebSocket upgrade.
//!
//! [`TransportChoice`] is the decision, pure like [`crate::machine`]: a client tries a WebSocket
//! first; when a node's upgrade is refused (an HTTP status instead of `101`, the socket closed
//! before the greeting, or nothing within the connect timeout) it opens an event stream on the
//! same node, and keeps to event streams for the rest of that connection's life. At the next
//! failover it tries a WebSocket again, so a network that lets upgrades through again gets the
//! client back on WebSockets; the failover resubscribes from the positions held, so the change
//! loses and repeats nothing.

use std::fmt;
use std::str::FromStr;

/// How a connection carries the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A WebSocket (`/stream`).
    WebSocket,
    /// Server-sent events (`GET /sse`), the client's frames sent as `POST /sse/{stream}`.
    EventStream,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::WebSocket => "websocket",
            Transport::EventStream => "sse",
        })
    }
}

/// Which transports a client may use ([`ClientOptions::transports`](crate::ClientOptions::transports)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transports {
    /// A WebSocket, or an event stream where the upgrade is refused (the default).
    #[default]
    Auto,
    /// WebSockets only: a refused upgrade is a failed connection.
    WebSocket,
    /// Event streams only.
    EventStream,
}

impl FromStr for Transports {
    type Err = String;

    /// `auto`, `ws` (or `websocket`), `sse`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Transports::Auto),
            "ws" | "websocket" => Ok(Transports::WebSocket),
            "sse" => Ok(Transports::EventStream),
            other => Err(format!(
                "unknown transport {other:?}: expected auto, ws or sse"
            )),
        }
    }
}

/// How to open the next connection: which transport first, and whether a refused upgrade falls
/// back to an event stream on the same node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) first: Transport,
    pub(crate) fall_back: bool,
}

/// The client's transport decision for its session; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TransportChoice {
    allowed: Transports,
    /// A refused upgrade sent the client to event streams, until the next failover.
    fell_back: bool,
}

impl TransportChoice {
    pub(crate) fn new(allowed: Transports) -> Self {
        TransportChoice {
            allowed,
            fell_back: false,
        }
    }

    /// How the next connection is opened.
    pub(crate) fn plan(&self) -> Plan {
        match self.allowed {
            Transports::WebSocket => Plan {
                first: Transport::WebSocket,
                fall_back: false,
            },
            Transports::EventStream => Plan {
                first: Transport::EventStream,
                fall_back: false,
            },
            Transports::Auto if self.fell_back => Plan {
                first: Transport::EventStream,
                fall_back: false,
            },
            Transports::Auto => Plan {
                first: Transport::WebSocket,
                fall_back: true,
            },
        }
    }

    /// A connection was opened over `used`: an event stream where WebSockets were allowed means
    /// the upgrade was refused, and later connections go straight to event streams.
    pub(crate) fn opened(&mut self, used: Transport) {
        if self.allowed == Transports::Auto {
            self.fell_back = used == Transport::EventStream;
        }
    }

    /// The connection was lost: the next one tries a WebSocket again.
    pub(crate) fn failover(&mut self) {
        self.fell_back = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(first: Transport, fall_back: bool) -> Plan {
        Plan { first, fall_back }
    }

    #[test]
    fn auto_falls_back_keeps_to_event_streams_and_tries_websockets_at_each_failover() {
        let mut choice = TransportChoice::new(Transports::Auto);
        assert_eq!(choice.plan(), plan(Transport::WebSocket, true));
        choice.opened(Transport::EventStream);
        assert_eq!(choice.plan(), plan(Transport::EventStream, false));
        // A migration's or a list's connection opened meanwhile changes nothing.
        choice.opened(Transport::EventStream);
        assert_eq!(choice.plan(), plan(Transport::EventStream, false));
        choice.failover();
        assert_eq!(choice.plan(), plan(Transport::WebSocket, true));
        choice.opened(Transport::WebSocket);
        assert_eq!(choice.plan(), plan(Transport::WebSocket, true));
    }

    #[test]
    fn a_forced_transport_never_changes() {
        for (allowed, first) in [
            (Transports::WebSocket, Transport::WebSocket),
            (Transports::EventStream, Transport::EventStream),
        ] {
            let mut choice = TransportChoice::new(allowed);
            for step in [Transport::EventStream, Transport::WebSocket] {
                choice.opened(step);
                assert_eq!(choice.plan(), plan(first, false));
                choice.failover();
                assert_eq!(choice.plan(), plan(first, false));
            }
        }
    }

    #[test]
    fn transports_parse_from_their_names() {
        assert_eq!("auto".parse(), Ok(Transports::Auto));
        assert_eq!("ws".parse(), Ok(Transports::WebSocket));
        assert_eq!("sse".parse(), Ok(Transports::EventStream));
        let err = "http".parse::<Transports>().unwrap_err();
        assert!(err.contains("auto, ws or sse"), "{err}");
    }
}
