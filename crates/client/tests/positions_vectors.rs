//! The shared positions vectors (`tests/data/positions_vectors.json`): event ids as
//! `streamfarm_core::protocol::event_id` writes and reads them, and the position-keeping of
//! [`Topics`]. The browser client (`clients/browser/src/eventid.ts`, `src/positions.ts`) runs the
//! same file, so the two clients cannot drift apart unnoticed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};
use streamfarm_client::topics::{TopicNotice, Topics};
use streamfarm_core::protocol::{GapReason, Position, event_id};

fn load() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/positions_vectors.json");
    let text = std::fs::read_to_string(&path).expect("the vector file is readable");
    serde_json::from_str(&text).expect("the vector file is JSON")
}

fn position_map(v: &Value) -> BTreeMap<String, Option<Position>> {
    serde_json::from_value(v.clone()).expect("topics and positions")
}

fn notice_json(notice: &TopicNotice) -> Value {
    match notice {
        TopicNotice::Recovered { topic, count } => {
            json!({"type": "recovered", "topic": topic, "count": count})
        }
        TopicNotice::Gap {
            topic,
            epoch,
            from,
            to,
            reason,
        } => {
            let mut gap = json!({"type": "gap", "topic": topic, "epoch": epoch.to_string(),
                "from": from, "reason": reason});
            if let Some(to) = to {
                gap["to"] = json!(to);
            }
            gap
        }
    }
}

fn gap_reason(text: &str) -> GapReason {
    serde_json::from_value(json!(text)).expect("a gap reason")
}

/// Runs one `topics` vector; the error names the step and what differed.
fn run(vector: &Value) -> Result<(), String> {
    let mut topics = Topics::default();
    for (i, step) in vector["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .enumerate()
    {
        let names = || -> Vec<String> {
            serde_json::from_value(step["topics"].clone()).expect("topic names")
        };
        let (notices, deliver) = match step["op"].as_str().expect("an op") {
            "subscribe" => {
                topics.subscribe(names());
                (Vec::new(), None)
            }
            "unsubscribe" => {
                topics.unsubscribe(names());
                (Vec::new(), None)
            }
            "lost" => {
                topics.on_lost();
                (Vec::new(), None)
            }
            "subscribed" => {
                let current: BTreeMap<String, Position> =
                    serde_json::from_value(step["positions"].clone()).expect("positions");
                (topics.on_subscribed(&current), None)
            }
            "message" => {
                let position: Option<Position> =
                    serde_json::from_value(step["position"].clone()).expect("a position");
                let topic = step["topic"].as_str().expect("topic");
                let verdict = topics.on_message(topic, position);
                (verdict.notice.into_iter().collect(), Some(verdict.deliver))
            }
            "gap" => {
                let epoch = step["epoch"]
                    .as_str()
                    .expect("epoch")
                    .parse()
                    .expect("epoch");
                let notices = topics.on_gap(
                    step["topic"].as_str().expect("topic"),
                    epoch,
                    step["from"].as_u64().expect("from"),
                    step["to"].as_u64(),
                    gap_reason(step["reason"].as_str().expect("reason")),
                );
                (notices, None)
            }
            other => panic!("unknown op {other}"),
        };
        let got: Vec<Value> = notices.iter().map(notice_json).collect();
        let want = step.get("notices").cloned().unwrap_or(json!([]));
        if json!(got) != want {
            return Err(format!(
                "step {i} ({}): notices {got:?}, expected {want}",
                step["op"]
            ));
        }
        if let Some(want) = step.get("deliver")
            && deliver != want.as_bool()
        {
            return Err(format!("step {i}: deliver {deliver:?}, expected {want}"));
        }
        if let Some(want) = step.get("held") {
            let got = json!(topics.positions());
            if got != *want {
                return Err(format!("step {i}: positions {got}, expected {want}"));
            }
        }
    }
    Ok(())
}

#[test]
fn event_ids_encode_and_parse_as_the_vectors_say() {
    let file = load();
    for case in file["event_ids"].as_array().expect("event_ids") {
        let positions = position_map(&case["positions"]);
        let id = event_id::encode(&positions);
        if let Some(want) = case["id"].as_str() {
            assert_eq!(id, want, "{case}");
        }
        assert!(id.bytes().all(|b| b.is_ascii_graphic()), "{id}");
        assert_eq!(event_id::parse(&id).expect("its own id parses"), positions);
    }
    for case in file["parsed"].as_array().expect("parsed") {
        let id = case["id"].as_str().expect("id");
        let parsed = event_id::parse(id).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(parsed, position_map(&case["positions"]), "{id}");
    }
    for case in file["bad_ids"].as_array().expect("bad_ids") {
        let id = match case["id_of_as"].as_u64() {
            Some(n) => "a".repeat(n as usize),
            None => case["id"].as_str().expect("id").to_string(),
        };
        let err = event_id::parse(&id).expect_err("a bad id is refused");
        for word in case["error_contains"].as_array().expect("error_contains") {
            let word = word.as_str().expect("a word");
            assert!(err.contains(word), "{id:.40}: {err:?} lacks {word:?}");
        }
    }
}

#[test]
fn every_topics_vector_passes() {
    let file = load();
    let vectors = file["topics"].as_array().expect("topics");
    assert!(!vectors.is_empty());
    let failures: Vec<String> = vectors
        .iter()
        .filter_map(|v| run(v).err().map(|why| format!("{}: {why}", v["name"])))
        .collect();
    assert!(
        failures.is_empty(),
        "failing vectors:\n{}",
        failures.join("\n")
    );
}
