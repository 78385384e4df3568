//! Server-sent event streams (`GET /sse`, `POST /sse/{stream}`) against real nodes
//! (`streamfarm serve` child processes on 127.0.0.x): events and their positions, upstream
//! frames, limits and refusals, and a stream resumed with `Last-Event-ID` on another node after
//! its own was killed, with nothing lost or duplicated.

mod client_support;

use std::net::SocketAddr;
use std::time::Duration;

use client_support::{Farm, Publisher, SERIAL, Seen, eventually, losses, publish};
use serde_json::Value;
use tokio::time::{Instant, timeout};

/// One event as a browser's `EventSource` sees it.
#[derive(Debug, Clone)]
struct Event {
    /// `message` for an unnamed event.
    name: String,
    data: Value,
}

/// A reader of one event stream, keeping the last event id as a browser does.
struct Events {
    response: reqwest::Response,
    buffer: String,
    last_id: Option<String>,
}

impl Events {
    /// Opens `GET /sse?{query}` on `node`, with `Last-Event-ID` when given; panics unless `200`
    /// `text/event-stream`.
    async fn open(node: SocketAddr, query: &str, last_id: Option<&str>) -> Events {
        let response = get_sse(node, query, last_id).await;
        assert_eq!(response.status(), 200, "GET /sse?{query}");
        let kind = response.headers()[reqwest::header::CONTENT_TYPE].clone();
        assert_eq!(kind, "text/event-stream");
        Events {
            response,
            buffer: String::new(),
            last_id: None,
        }
    }

    /// The next event within 10 s (panics after); `None` once the stream ended or broke.
    async fn next(&mut self) -> Option<Event> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = self.parse(&block) {
                    return Some(event);
                }
                continue;
            }
            let chunk = timeout(deadline - Instant::now(), self.response.chunk())
                .await
                .expect("an event within 10 s");
            match chunk {
                Ok(Some(bytes)) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next event named `name`, skipping others (pings, farm lists).
    async fn next_named(&mut self, name: &str) -> Event {
        loop {
            let event = self.next().await.expect("the stream goes on");
            if event.name == name {
                return event;
            }
        }
    }

    /// The next `msg` event whose payload is `data`, skipping others.
    async fn next_message(&mut self, data: &str) -> Event {
        loop {
            let event = self.next_named("message").await;
            if event.data["data"] == data {
                return event;
            }
        }
    }

    fn parse(&mut self, block: &str) -> Option<Event> {
        let (mut name, mut data) = ("message".to_string(), Vec::new());
        for line in block.lines() {
            let (field, value) = line.split_once(": ").unwrap_or((line, ""));
            match field {
                "id" => self.last_id = Some(value.to_string()),
                "event" => name = value.to_string(),
                "data" => data.push(value),
                _ => {}
            }
        }
        if data.is_empty() {
            return None;
        }
        let data = serde_json::from_str(&data.join("\n")).expect("event data is JSON");
        Some(Event { name, data })
    }
}

async fn get_sse(node: SocketAddr, query: &str, last_id: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(format!("http://{node}/sse?{query}"));
    if let Some(id) = last_id {
        request = request.header("last-event-id", id);
    }
    request.send().await.expect("GET /sse")
}

async fn post_frame(node: SocketAddr, stream: &str, frame: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("http://{node}/sse/{stream}"))
        .body(frame.to_string())
        .send()
        .await
        .expect("POST /sse/{stream}");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn users(node: SocketAddr) -> u64 {
    let text = reqwest::get(format!("http://{node}/healthz"))
        .await
        .expect("GET /healthz")
        .text()
        .await
        .expect("a body");
    let health: Value = serde_json::from_str(&text).expect("JSON");
    health["users"].as_u64().expect("users")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_carries_frames_as_events_with_positions_and_takes_frames_by_post() {
    let _serial = SERIAL.lock().await;
    let farm = Farm::start(&[("a", "A"), ("b", "A")]).await;
    let (a, b) = (farm.nodes[0].listen, farm.nodes[1].listen);
    let mut events = Events::open(a, "topics=t1", None).await;
    let hello = events.next().await.expect("hello");
    assert_eq!(hello.name, "hello");
    assert_eq!(hello.data["server"], "a");
    let stream = hello.data["stream"]
        .as_str()
        .expect("the stream's key")
        .to_string();
    assert_eq!(events.next().await.expect("farm").name, "farm");
    let subscribed = events.next_named("subscribed").await;
    assert_eq!(subscribed.data["topics"][0], "t1");
    let id = events.last_id.clone().expect("subscribed carries an id");
    assert!(id.starts_with("t1:") && id.ends_with(":0"), "{id}");
    // A user like any other.
    assert_eq!(users(a).await, 1);

    // Published on another node: an unnamed event holding the `msg` frame, its id the position.
    // Published a few times: a subscription confirmed to the client may not yet be known to
    // every node.
    let node_b = &farm.nodes[1];
    for _ in 0..5 {
        publish(node_b, "t1", "m1").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let message = events.next_message("m1").await;
    assert_eq!(message.data["type"], "msg");
    let offset = message.data["offset"].as_u64().expect("an offset");
    let id = events.last_id.clone().unwrap();
    assert!(
        id.ends_with(&format!(":{offset}")),
        "{id} after offset {offset}"
    );

    // Frames upstream: a second topic on the live stream, then a publish on it.
    let (code, _) = post_frame(a, &stream, r#"{"type":"sub","topics":["t2"]}"#).await;
    assert_eq!(code, 202);
    let subscribed = events.next_named("subscribed").await;
    assert_eq!(subscribed.data["topics"][0], "t2");
    let id = events.last_id.clone().unwrap();
    assert!(id.starts_with("t1:") && id.contains(",t2:"), "{id}");
    let (code, _) = post_frame(a, &stream, r#"{"type":"pub","topic":"t2","data":"up"}"#).await;
    assert_eq!(code, 202);
    let message = events.next_message("up").await;
    assert_eq!(message.data["topic"], "t2");
    // A frame the session refuses is answered on the stream, as on a WebSocket.
    post_frame(a, &stream, r#"{"type":"sub","topics":["bad topic"]}"#).await;
    let error = events.next_named("error").await;
    assert_eq!(error.data["code"], "bad_topic");

    // What is wrong is said, with where.
    let (code, why) = post_frame(a, &stream, "{not json").await;
    assert_eq!(code, 400, "{why}");
    assert!(why.contains("not a client frame"), "{why}");
    let (code, why) = post_frame(b, &stream, r#"{"type":"ping"}"#).await;
    assert_eq!(code, 404, "the stream lives on a, not b: {why}");
    let refused = get_sse(a, "topics=t1", Some("t1:zz:1")).await;
    assert_eq!(refused.status(), 400);
    let why = refused.text().await.unwrap();
    assert!(
        why.contains("Last-Event-ID") && why.contains("hexadecimal"),
        "{why}"
    );
    let refused = get_sse(a, "topics=a%20b", None).await;
    assert_eq!(refused.status(), 400);

    // Gone when it goes.
    drop(events);
    let gone = eventually(Duration::from_secs(5), || async { users(a).await == 0 }).await;
    assert!(gone, "the stream's user is not released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_moves_its_event_streams_and_refuses_new_ones() {
    let _serial = SERIAL.lock().await;
    let farm = Farm::start(&[("a", "A"), ("b", "A")]).await;
    let a = farm.nodes[0].listen;
    let mut events = Events::open(a, "topics=t", None).await;
    events.next_named("subscribed").await;
    let mut follower = Events::open(a, "topics=t&features=migrate", None).await;
    follower.next_named("subscribed").await;
    farm.nodes[0].set_status("DRAINING").await;
    // With the `migrate` feature it is told to move (a drain names no server: the client
    // picks one), make-before-break.
    let migrate = follower.next_named("migrate").await;
    assert_eq!(migrate.data["reason"], "drain", "{:?}", migrate.data);
    // Without it, it is told to reconnect elsewhere, as a WebSocket would be.
    let close = events.next_named("close").await;
    assert_eq!(close.data["code"], 4000, "{:?}", close.data);
    assert!(
        events.next().await.is_none(),
        "the response ends after close"
    );
    let refused = get_sse(a, "topics=t", None).await;
    assert_eq!(refused.status(), 503);
}

/// The payload numbers (`n 12`) of the `msg` events read until `until` returns true or the
/// stream ends.
async fn read_numbers(events: &mut Events, seen: &mut Seen, until: impl Fn(&Seen) -> bool) {
    while !until(seen) {
        let Some(event) = events.next().await else {
            return;
        };
        if event.name == "gap" {
            seen.gaps += 1;
        }
        if event.name == "message" {
            seen.messages
                .push(event.data["data"].as_str().expect("text").to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumes_exactly_on_another_node_after_its_node_is_killed() {
    let _serial = SERIAL.lock().await;
    let mut farm = Farm::start(&[("a", "A"), ("b", "A"), ("c", "A")]).await;
    let (a, b, c) = (
        farm.nodes[0].listen,
        farm.nodes[1].listen,
        farm.nodes[2].listen,
    );
    let publisher = Publisher::start(vec![b, c], "t", Duration::from_millis(20));
    let mut events = Events::open(a, "topics=t", None).await;
    let mut seen = Seen::default();
    read_numbers(&mut events, &mut seen, |s| s.messages.len() >= 20).await;

    farm.nodes[0].kill();
    // What was in flight on the dead connection is read; the rest comes from the new node.
    read_numbers(&mut events, &mut seen, |_| false).await;
    let before = seen.messages.len();
    let last_id = events.last_id.clone().expect("an id");
    // The farm goes on publishing meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut events = Events::open(b, "topics=t", Some(&last_id)).await;
    let resumed_at = publisher.acked().last().copied().unwrap_or(0);
    read_numbers(&mut events, &mut seen, |s| {
        s.messages
            .iter()
            .any(|m| m == &format!("n {}", resumed_at + 20))
    })
    .await;
    let acked = publisher.stop();
    // Whatever was acknowledged up to the stop arrives too.
    let last = *acked.last().unwrap();
    read_numbers(&mut events, &mut seen, |s| {
        s.messages.iter().any(|m| m == &format!("n {last}"))
    })
    .await;
    eprintln!(
        "{} messages before the kill, {} after resuming on b with {last_id:?}",
        before,
        seen.messages.len() - before
    );
    assert!(seen.messages.len() > before + 20, "{seen:?}");
    assert_eq!(losses(&seen, &acked), None, "{:?}", seen.messages);
}
