//! `docs/PROTOCOL.md` matches the code: every JSON example on the page, tagged with the direction
//! it travels (`json client`, `json server`, `json farm-list`, `json relay-up`, `json relay-down`,
//! `json relay-handshake`,
//! `json peer` for the broker's frames between nodes),
//! parses as that direction's frame type and serializes back to the same JSON; and every close code
//! and error code of the code appears on the page.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use streamfarm_core::FarmList;
use streamfarm_core::protocol::{ClientFrame, ServerFrame, close};

use crate::broker::wire::PeerFrame;
use crate::relay::{LinkDown, LinkUp};

const PAGE: &str = include_str!("../../../docs/PROTOCOL.md");

/// (info string tag, body) of every fenced `json …` block.
fn examples() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = PAGE.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```json") else {
            continue;
        };
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        out.push((info.trim().to_string(), body.join("\n")));
    }
    out
}

fn round_trips<T: DeserializeOwned + Serialize>(tag: &str, body: &str) {
    let frame: T = serde_json::from_str(body)
        .unwrap_or_else(|err| panic!("`json {tag}` example does not parse: {err}\n{body}"));
    let again: Value = serde_json::to_value(&frame).unwrap();
    let original: Value = serde_json::from_str(body).unwrap();
    assert_eq!(again, original, "`json {tag}` example does not round-trip");
}

#[test]
fn every_example_frame_round_trips_through_the_code() {
    let examples = examples();
    let mut counts = std::collections::BTreeMap::new();
    for (tag, body) in &examples {
        match tag.as_str() {
            "client" => round_trips::<ClientFrame>(tag, body),
            "server" => round_trips::<ServerFrame>(tag, body),
            "farm-list" => round_trips::<FarmList>(tag, body),
            "relay-up" => round_trips::<LinkUp>(tag, body),
            "relay-down" => round_trips::<LinkDown>(tag, body),
            "relay-handshake" => round_trips::<crate::relay::Handshake>(tag, body),
            "peer" => round_trips::<PeerFrame>(tag, body),
            other => panic!(
                "json block tagged {other:?}: tag it client, server, farm-list, relay-up, relay-down, relay-handshake or peer"
            ),
        }
        *counts.entry(tag.as_str()).or_insert(0) += 1;
    }
    assert!(counts["client"] >= 6 && counts["server"] >= 8, "{counts:?}");
}

#[test]
fn every_frame_type_is_documented() {
    let client_types = [
        "sub", "unsub", "pub", "list", "auth", "refresh", "ping", "pong",
    ];
    let server_types = [
        "hello",
        "farm",
        "subscribed",
        "unsubscribed",
        "msg",
        "gap",
        "feed",
        "refreshed",
        "error",
        "ping",
        "pong",
    ];
    let documented = |tag: &str| -> Vec<String> {
        examples()
            .into_iter()
            .filter(|(t, _)| t == tag)
            .map(|(_, body)| {
                let value: Value = serde_json::from_str(&body).unwrap();
                value["type"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let client = documented("client");
    let server = documented("server");
    let peer = documented("peer");
    for t in [
        "pub",
        "repl",
        "ack",
        "claim",
        "claim_reply",
        "fetch",
        "fetch_reply",
    ] {
        assert!(peer.iter().any(|d| d == t), "peer frame {t} has no example");
    }
    let table = PAGE.split("## 9.").nth(1).unwrap_or("");
    for t in [
        "pub",
        "repl",
        "sync",
        "ack",
        "nack",
        "fenced",
        "prime",
        "claim",
        "claim_reply",
        "fetch",
        "fetch_reply",
    ] {
        assert!(
            table.contains(&format!("| `{t}` |")),
            "peer frame {t} not in the table"
        );
    }
    for t in client_types {
        assert!(
            client.iter().any(|d| d == t),
            "client frame {t} has no example"
        );
    }
    for t in server_types {
        assert!(
            server.iter().any(|d| d == t),
            "server frame {t} has no example"
        );
    }
}

#[test]
fn every_close_code_and_error_code_is_documented() {
    for code in [
        close::GOING_AWAY,
        close::POLICY_VIOLATION,
        close::MESSAGE_TOO_BIG,
        close::RECONNECT_ELSEWHERE,
        close::SLOW_CONSUMER,
        close::HEARTBEAT_TIMEOUT,
        close::SERVER_FULL,
        close::AUTH_MISSING,
        close::AUTH_INVALID,
        close::AUTH_EXPIRED,
        close::AUTH_FORBIDDEN,
    ] {
        assert!(
            PAGE.contains(&format!("| {code} |")),
            "close code {code} missing from the table"
        );
    }
    for code in [
        "bad_frame",
        "bad_topic",
        "not_allowed",
        "forbidden",
        "too_big",
        "too_many_topics",
    ] {
        assert!(
            PAGE.contains(&format!("| `{code}` |")),
            "error code {code} missing from the table"
        );
    }
}

#[test]
fn the_text_list_example_parses_with_its_header_and_fields() {
    let doc = PAGE;
    let start = doc.find("#@ generated_at_ms=").expect("the text example");
    let block = &doc[start..start + doc[start..].find("```").expect("block end")];
    let list = streamfarm_core::encoding::parse(block, streamfarm_core::encoding::Format::Text)
        .expect("the documented text list parses");
    assert_eq!(list.generated_at_ms, Some(1_795_323_461_389));
    assert_eq!(list.servers.len(), 2);
    assert_eq!(list.servers[0].name, "a");
    assert_eq!(list.servers[0].capacity, Some(100_000));
    assert_eq!(list.servers[0].users_age_ms, Some(130));
    assert_eq!(list.in_flight, Some(3));
    assert_eq!(list.servers[1].priority, "B");
}
