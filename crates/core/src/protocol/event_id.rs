//! The positions a server-sent event stream has delivered, as an event `id` (`docs/PROTOCOL.md`,
//! Server-sent events): what a client sends back as `Last-Event-ID` to resume every topic
//! exactly, on any node.
//!
//! An id is the stream's topics joined by `,`, each `TOPIC:EPOCH:OFFSET`, or `TOPIC` alone for a
//! topic subscribed without a known position (it resumes live). `TOPIC` is percent-encoded
//! (everything but ASCII letters, digits and `-._~`), so an id is visible ASCII: fit for an HTTP
//! header and a query parameter as it is, and it never holds a `,` or `:` of a topic name.
//!
//! ```
//! use std::collections::BTreeMap;
//! use streamfarm_core::protocol::{Epoch, Position, event_id};
//! let mut positions = BTreeMap::new();
//! positions.insert("prices".to_string(), Some(Position::new(Epoch(0x19ad1a0b2e7), 21)));
//! positions.insert("news, eu".to_string(), None);
//! let id = event_id::encode(&positions);
//! assert_eq!(id, "news%2C%20eu,prices:0000019ad1a0b2e7:21");
//! assert_eq!(event_id::parse(&id).unwrap(), positions);
//! ```

use std::collections::BTreeMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use super::Position;

/// Longest id accepted, in bytes: room for a few hundred topics of long names.
pub const MAX_EVENT_ID_BYTES: usize = 64 * 1024;

/// Bytes of a topic name kept verbatim in an id: the URL-unreserved characters.
const ENCODED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Each topic's position (`None`: subscribed, no position known) → an event id.
pub fn encode(positions: &BTreeMap<String, Option<Position>>) -> String {
    let mut id = String::new();
    for (topic, position) in positions {
        if !id.is_empty() {
            id.push(',');
        }
        id.extend(utf8_percent_encode(topic, ENCODED));
        if let Some(Position { epoch, offset }) = position {
            id.push_str(&format!(":{epoch}:{offset}"));
        }
    }
    id
}

/// An event id → each topic's position. The error says which part is wrong, and how.
pub fn parse(id: &str) -> Result<BTreeMap<String, Option<Position>>, String> {
    if id.len() > MAX_EVENT_ID_BYTES {
        return Err(format!(
            "event id of {} bytes is longer than {MAX_EVENT_ID_BYTES}",
            id.len()
        ));
    }
    let mut positions = BTreeMap::new();
    for (index, entry) in id.split(',').enumerate().filter(|(_, e)| !e.is_empty()) {
        let at = || format!("event id entry {} ({entry:?})", index + 1);
        let mut parts = entry.split(':');
        let topic = parts.next().unwrap_or_default();
        let topic = percent_decode_str(topic)
            .decode_utf8()
            .map_err(|_| format!("{}: the topic is not percent-encoded UTF-8", at()))?
            .into_owned();
        if topic.is_empty() {
            return Err(format!("{}: no topic", at()));
        }
        let position = match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => None,
            (Some(epoch), Some(offset), None) => {
                let epoch = epoch.parse().map_err(|e| format!("{}: {e}", at()))?;
                let offset = offset
                    .parse()
                    .map_err(|_| format!("{}: offset {offset:?} is not a whole number", at()))?;
                Some(Position::new(epoch, offset))
            }
            _ => return Err(format!("{}: expected TOPIC or TOPIC:EPOCH:OFFSET", at())),
        };
        positions.insert(topic, position);
    }
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Epoch;

    #[test]
    fn ids_round_trip_whatever_the_topic_names() {
        let mut positions = BTreeMap::new();
        for (i, topic) in ["a", "a:b,c", "%41", "ünï", "x=y~z"].iter().enumerate() {
            positions.insert(topic.to_string(), Some(Position::new(Epoch(7), i as u64)));
        }
        positions.insert("live".to_string(), None);
        let id = encode(&positions);
        assert!(id.bytes().all(|b| b.is_ascii_graphic()), "{id}");
        assert_eq!(parse(&id).unwrap(), positions);
        assert_eq!(parse("").unwrap(), BTreeMap::new());
    }

    #[test]
    fn a_bad_id_says_where_and_what() {
        let err = parse("a:0000000000000007:1,b:zz:2").unwrap_err();
        assert!(
            err.contains("entry 2") && err.contains("hexadecimal"),
            "{err}"
        );
        let err = parse("a:7").unwrap_err();
        assert!(err.contains("TOPIC:EPOCH:OFFSET"), "{err}");
        let err = parse("a:7:-1").unwrap_err();
        assert!(err.contains("whole number"), "{err}");
        let err = parse(":7:1").unwrap_err();
        assert!(err.contains("no topic"), "{err}");
        assert!(parse(&"a".repeat(MAX_EVENT_ID_BYTES + 1)).is_err());
    }
}
