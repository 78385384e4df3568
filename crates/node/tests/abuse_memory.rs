//! A client that never reads, alone in this test binary so that the process's resident memory
//! measures the node and nothing else running beside it.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use streamfarm_core::protocol::{ClientFrame, close};
use support::*;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

/// Resident memory of this process, bytes.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_with_4001_within_its_byte_budget() {
    // Large beside what else moves the RSS of this process (the test's own buffers, the
    // allocator's pools), so that the measure is the node's.
    const BUDGET: usize = 16 << 20;
    let mut config = config("solo", [127, 0, 0, 1], &[], None);
    config.send_queue_bytes = BUDGET;
    config.history_bytes = 256 * 1024;
    let node = start(config).await;
    let mut control = Control::on(&node, "t").await;
    // Control characters grow 6x when escaped into JSON: the budget counts the frame's bytes.
    let payload: String = "\u{1}".repeat(8 * 1024);
    let mut sent = Vec::new();
    // First as many messages with only the control subscriber: what the node holds whoever
    // reads (history, buffers, the allocator's pools) is in the baseline, not in the growth.
    for i in 0..200 {
        control.has(sent.len().saturating_sub(4)).await;
        let message = format!("w{i}{payload}");
        node.publish("t", &message).await.expect("published");
        sent.push(short(&message));
    }
    control.has(sent.len()).await;
    // The slow client subscribes, then never reads; it keeps sending heartbeats.
    let slow = subscriber(&node, "t").await;
    let (mut slow_sink, mut slow_stream) = slow.split();
    let heartbeats = tokio::spawn(async move {
        loop {
            let ping = serde_json::to_string(&ClientFrame::Ping { id: None }).unwrap();
            if slow_sink.send(Message::text(ping)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let rss_before = rss_bytes();
    let slow_consumers = &node.metrics().slow_consumers;
    let mut peak = 0u64;
    let warm = sent.len();
    for i in 0.. {
        if load(slow_consumers) == 1 {
            break;
        }
        assert!(i < 4_000, "never closed as a slow consumer");
        // The publisher stays a few messages ahead of the control subscriber, so that only the
        // client that does not read at all can fall a whole budget behind.
        control.has(sent.len().saturating_sub(4)).await;
        let message = format!("s{i}{payload}");
        node.publish("t", &message).await.expect("published");
        sent.push(short(&message));
        if let (Some(before), Some(now)) = (rss_before, rss_bytes()) {
            peak = peak.max(now.saturating_sub(before));
        }
    }
    println!(
        "slow consumer closed after {} messages of ~48 KiB frames; RSS grew at most {} KiB meanwhile (budget {} KiB)",
        sent.len() - warm,
        peak / 1024,
        BUDGET / 1024
    );
    // Everything the node holds for the connection counts against its budget: the queue, and
    // what the socket writer took from it and has not written yet. (The probe grew by 1 MiB/s
    // without end; before the writer's bytes counted, it grew 1.1 times the budget.)
    assert!(
        peak < BUDGET as u64,
        "RSS grew by {peak} bytes for a budget of {BUDGET}"
    );
    // Reading again, the client gets what was in flight and then its 4001 close frame (not a
    // reset), even though it kept sending heartbeats throughout.
    let code = timeout(Duration::from_secs(10), async {
        while let Some(next) = slow_stream.next().await {
            match next {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(err) => panic!("the slow client got an error, not its close: {err}"),
            }
        }
        None
    })
    .await
    .expect("the close arrives within 10 s");
    assert_eq!(code, Some(close::SLOW_CONSUMER));
    heartbeats.abort();
    control.finish(&sent).await;
    node.shutdown().await;
}
