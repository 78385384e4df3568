//! Holds many idle streaming connections to one node, for measuring the node's memory per
//! connection: `cargo run --release -p streamfarm-node --example idle_clients -- ws://127.0.0.1:7400/stream 10000`.
//!
//! Each connection reads its greeting, then only answers the node's pings. Prints how many are
//! open every second until Ctrl-C.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use streamfarm_core::protocol::{ClientFrame, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:7400/stream".into());
    let count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let open = Arc::new(AtomicUsize::new(0));
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    for _ in 0..count {
        let permit = limit.clone().acquire_owned().await.expect("semaphore open");
        let (url, open) = (url.clone(), open.clone());
        tokio::spawn(async move {
            let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await else {
                return;
            };
            drop(permit);
            open.fetch_add(1, Ordering::Relaxed);
            let (mut sink, mut stream) = ws.split();
            while let Some(Ok(Message::Text(text))) = stream.next().await {
                if let Ok(ServerFrame::Ping { id }) = serde_json::from_str(&text) {
                    let pong =
                        serde_json::to_string(&ClientFrame::Pong { id }).expect("serializes");
                    if sink.send(Message::text(pong)).await.is_err() {
                        break;
                    }
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    loop {
        println!("open {}", open.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
