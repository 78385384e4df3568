//! Fan-out throughput of one node: S subscribers of one topic, one publisher sending M messages
//! over the WebSocket; prints deliveries per second once every subscriber has every message.
//!
//! `cargo run --release -p streamfarm-node --example fanout -- ws://127.0.0.1:7400/stream 1000 1000`
//!
//! Subscribers and publisher run in this process, so on a small machine they compete with the
//! node for CPU: the figure is a lower bound of the node's own rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use streamfarm_core::protocol::{ClientFrame, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

const TOPIC: &str = "bench";

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:7400/stream".into());
    let subscribers: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let messages: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let received = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicU64::new(0));
    for _ in 0..subscribers {
        let (url, received, ready) = (url.clone(), received.clone(), ready.clone());
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connects");
        tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let sub = ClientFrame::Sub {
                positions: Default::default(),
                topics: vec![TOPIC.into()],
            };
            sink.send(Message::text(serde_json::to_string(&sub).unwrap()))
                .await
                .unwrap();
            while let Some(Ok(Message::Text(text))) = stream.next().await {
                // Cheap check first: message frames start with {"type":"msg".
                if text.starts_with(r#"{"type":"msg""#) {
                    received.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match serde_json::from_str(&text) {
                    Ok(ServerFrame::Subscribed { .. }) => {
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(ServerFrame::Ping { id }) => {
                        let pong = serde_json::to_string(&ClientFrame::Pong { id }).unwrap();
                        let _ = sink.send(Message::text(pong)).await;
                    }
                    _ => {}
                }
            }
        });
    }
    while ready.load(Ordering::Relaxed) < subscribers {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut publisher, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connects");
    let expected = subscribers * messages;
    let start = Instant::now();
    for i in 0..messages {
        let frame = ClientFrame::Pub {
            topic: TOPIC.into(),
            data: format!("message {i:08}"),
            encoding: Default::default(),
        };
        publisher
            .feed(Message::text(serde_json::to_string(&frame).unwrap()))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    while received.load(Ordering::Relaxed) < expected {
        if start.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let got = received.load(Ordering::Relaxed);
    println!(
        "{subscribers} subscribers x {messages} messages: {got} of {expected} deliveries in {:.3} s = {:.0} deliveries/s",
        elapsed.as_secs_f64(),
        got as f64 / elapsed.as_secs_f64()
    );
}
