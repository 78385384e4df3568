//! Hostile input, on real sockets: each probe asserting its outcome and
//! that a control subscriber on the same node misses nothing meanwhile.
//!
//! Nodes run in this process on 127.0.0.x, port 0. Every wait polls a condition against a
//! deadline; nothing sleeps and hopes. The memory bound of a client that never reads is
//! measured in its own test binary (`abuse_memory.rs`), alone in its process.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::SinkExt;
use streamfarm_core::Status;
use streamfarm_core::protocol::{ClientFrame, ServerFrame};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Milliseconds since the epoch, as an upgrade ticket carries them.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsider_relay_link_reads_nothing_and_cannot_hijack_a_peers_link() {
    let (a, b) = two_nodes(|_| {}).await;
    let control_a = Control::on(&a, "t").await;
    let control_b = Control::on(&b, "t").await;

    // An outsider asks a for a relay link, as "eve" and as "b", with no ticket and with a made-up
    // one: refused before the upgrade, so it can send no relay message, let alone read one.
    let made_up = format!("{}.{}", now_ms(), "ab".repeat(32));
    for name in ["eve", "b"] {
        for ticket in [None, Some(made_up.as_str())] {
            let mut request = relay_url(&a, name).into_client_request().unwrap();
            if let Some(ticket) = ticket {
                request
                    .headers_mut()
                    .insert("streamfarm-relay-ticket", ticket.parse().unwrap());
            }
            match tokio_tungstenite::connect_async(request).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status().as_u16(), 403, "{name} {ticket:?}");
                }
                other => panic!("{name} {ticket:?}: not refused: {:?}", other.map(|_| ())),
            }
        }
    }
    // Meanwhile it keeps dialing a as "b", as the probe did every 300 ms.
    let hijacker = {
        let url = relay_url(&a, "b");
        tokio::spawn(async move {
            loop {
                let _ = tokio_tungstenite::connect_async(&url).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let sent = publish(&a, "t", "m", 100).await;

    hijacker.abort();
    control_a.finish(&sent).await;
    control_b.finish(&sent).await;
    assert!(load(&a.metrics().relay_auth_failures) >= 5);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_node_without_the_secret_can_neither_join_nor_take_a_name() {
    let (a, b) = two_nodes(|_| {}).await;
    let a_url = a.url().to_string();
    let control = Control::on(&b, "t").await;
    // Two rogues join through b's gossip address: one named "a" without the secret, one named
    // "a" with another secret (a newer generation than the real a: it would win by age).
    let rogue = start(config("a", [127, 0, 0, 4], &[b.gossip_addr()], None)).await;
    let wrong = start(config(
        "a",
        [127, 0, 0, 5],
        &[b.gossip_addr()],
        Some("another-secret-0123456789"),
    ))
    .await;
    let rejected = &b.metrics().gossip_rejected;
    eventually(Duration::from_secs(5), "b drops the rogues' gossip", || {
        load(rejected) >= 20
    })
    .await;
    let sent = publish(&a, "t", "m", 50).await;
    for node in [&a, &b] {
        let list = node.farm().borrow().clone();
        let entry = list
            .servers
            .iter()
            .find(|s| s.name == "a")
            .expect("a listed");
        assert_eq!(entry.url, a_url, "a's url, not a rogue's");
        assert_eq!(entry.status, Status::Up);
        assert_eq!(list.servers.len(), 2, "no rogue listed: {list:?}");
    }
    // Killed, the rogues leave nothing behind: a stays UP with its url.
    rogue.shutdown().await;
    wrong.shutdown().await;
    let list = b.farm().borrow().clone();
    assert_eq!(status(&list, "a"), Some(Status::Up));
    control.finish(&sent).await;
    // And the rogue never heard of the farm either.
    a.shutdown().await;
    b.shutdown().await;
}

/// Process CPU time (user + system) so far, from `/proc/self/stat`, in milliseconds.
fn cpu_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks * 10)
}

/// A gossip datagram (chitchat's wire format: magic, version, `Ack`) whose delta is compressed
/// blocks of zeros: ~60 KiB that would inflate to ~150 MB.
fn bomb() -> Vec<u8> {
    let block = zstd::bulk::compress(&vec![0u8; 65_535], 19).unwrap();
    let mut datagram = Vec::new();
    datagram.extend(45_139u16.to_le_bytes());
    datagram.push(0); // protocol version
    datagram.push(2); // Ack
    while datagram.len() + block.len() + 4 < 60_000 {
        datagram.push(1); // a compressed block
        datagram.extend((block.len() as u16).to_le_bytes());
        datagram.extend(&block);
    }
    datagram.push(0); // no more blocks
    datagram
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_inflating_gossip_is_dropped_cheaply_and_counted() {
    let (a, b) = two_nodes(|_| {}).await;
    let control = Control::on(&a, "t").await;
    let udp = UdpSocket::bind("127.0.0.9:0").await.unwrap();
    let rejected = &a.metrics().gossip_rejected;
    let before = load(rejected);
    let bomb = bomb();
    let count = 200u64;
    let cpu_before = cpu_ms();
    let started = Instant::now();
    for i in 0..count {
        let datagram: Vec<u8> = match i % 4 {
            0 => b"junk".to_vec(),
            1 => (0..1000).map(|_| rand::random::<u8>()).collect(),
            _ => bomb.clone(),
        };
        udp.send_to(&datagram, a.gossip_addr()).await.unwrap();
        // One at a time: a socket's receive buffer holds only a few 60 KiB datagrams.
        let target = before + i + 1;
        eventually(Duration::from_secs(5), "datagrams counted", || {
            load(rejected) >= target
        })
        .await;
    }
    eventually(Duration::from_secs(5), "every datagram counted", || {
        load(rejected) >= before + count
    })
    .await;
    let elapsed = started.elapsed();
    if let (Some(before), Some(after)) = (cpu_before, cpu_ms()) {
        let per_datagram = (after - before) as f64 / count as f64;
        // The whole process, other tests included: printed, not asserted. The cost of one
        // datagram is asserted on one thread by the `trust` module's unit test.
        println!(
            "{count} forged datagrams (half of them ~60 KiB bombs) in {elapsed:?}: {per_datagram:.2} ms CPU each (whole process)"
        );
    }
    let sent = publish(&b, "t", "m", 50).await;
    control.finish(&sent).await;
    for node in [&a, &b] {
        let list = node.farm().borrow().clone();
        assert_eq!(status(&list, "a"), Some(Status::Up));
        assert_eq!(status(&list, "b"), Some(Status::Up));
    }
    let metrics = reqwest::get(format!("http://{}/metrics", a.listen_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("streamfarm_gossip_rejected_total"),
        "{metrics}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_an_inflating_datagram_is_refused_and_counted() {
    let node = start(config("solo", [127, 0, 0, 1], &[], None)).await;
    let udp = UdpSocket::bind("127.0.0.9:0").await.unwrap();
    let rejected = &node.metrics().gossip_rejected;
    let bomb = bomb();
    let count = 50u64;
    let cpu_before = cpu_ms();
    for i in 0..count {
        udp.send_to(&bomb, node.gossip_addr()).await.unwrap();
        let target = i + 1;
        eventually(Duration::from_secs(5), "bomb refused", || {
            load(rejected) >= target
        })
        .await;
    }
    if let (Some(before), Some(after)) = (cpu_before, cpu_ms()) {
        let per_datagram = (after - before) as f64 / count as f64;
        println!("{count} bombs, no secret: {per_datagram:.2} ms CPU each (whole process)");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slowloris_connections_are_closed_after_the_handshake_deadline() {
    let mut config = config("solo", [127, 0, 0, 1], &[], None);
    config.handshake_timeout_ms = 500;
    let node = start(config).await;
    let control = Control::on(&node, "t").await;
    let addr = node.listen_addr();
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut slowloris = Vec::new();
    for _ in 0..10 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slowloris.push(tcp);
    }
    // The slowloris clients keep trickling header bytes, one every 100 ms.
    let trickle = tokio::spawn(async move {
        let mut closed = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            closed = 0;
            for tcp in &mut slowloris {
                if tcp.write_all(b"X-A: b\r\n").await.is_err() {
                    closed += 1;
                }
            }
            if closed == slowloris.len() {
                break;
            }
        }
        closed
    });
    // /healthz answers meanwhile.
    let health = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert!(health.status().is_success());
    let sent = publish(&node, "t", "m", 20).await;
    for mut tcp in silent {
        let mut buf = [0u8; 64];
        let read = timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("closed within 5 s");
        assert!(matches!(read, Ok(0) | Err(_)), "silent connection closed");
    }
    let closed = timeout(Duration::from_secs(10), trickle)
        .await
        .expect("slowloris closed")
        .unwrap();
    assert_eq!(closed, 10, "every slowloris connection closed");
    let elapsed = started.elapsed();
    println!("100 silent and 10 slowloris connections closed within {elapsed:?} (deadline 500 ms)");
    assert!(elapsed < Duration::from_secs(5));
    control.finish(&sent).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_declaring_too_much_interest_loses_its_link_and_publishing_without_a_topic_is_400() {
    let mut config = config("solo", [127, 0, 0, 1], &[], None);
    config.max_interest_topics = 100;
    let node = start(config).await;
    let control = Control::on(&node, "t").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(relay_url(&node, "eve"))
        .await
        .unwrap();
    let topics: Vec<String> = (0..1000).map(|i| format!("x{i}")).collect();
    let interest = serde_json::json!({"type":"interest","version":1,"add":topics,"remove":[]});
    ws.send(Message::text(interest.to_string())).await.unwrap();
    let (frames, code) = outsider_reads(&mut ws).await;
    assert_eq!(code, Some(1008), "{frames:?}");
    // Nothing but the greeting that says what interest the node holds for it (none).
    assert!(
        frames.iter().all(|f| f.contains("\"interest_held\"")),
        "{frames:?}"
    );
    assert_eq!(load(&node.metrics().relay_auth_failures), 1);
    // A node name that is not one is refused before the upgrade.
    let bad_name = format!("{}x%0a", relay_url(&node, "eve"));
    assert!(tokio_tungstenite::connect_async(bad_name).await.is_err());
    assert_eq!(load(&node.metrics().relay_auth_failures), 2);
    let client = reqwest::Client::new();
    for path in ["/publish/", "/publish"] {
        let response = client
            .post(format!("http://{}{path}", node.listen_addr()))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{path}");
    }
    let sent = publish(&node, "t", "m", 10).await;
    control.finish(&sent).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_the_secret_relay_across_a_restart_with_a_split_interest() {
    let (a, b) = two_nodes(|c| c.max_subscriptions = 5_000).await;
    // b's interest: 6 000 topics of 60 bytes, more than one interest frame holds (1 MiB, each
    // topic counted at its worst-case JSON size). Few topics, long names: every new topic costs
    // the farm a claim and a fetch.
    let mut many = Vec::new();
    for c in 0..2 {
        let (mut ws, _) = tokio_tungstenite::connect_async(b.url()).await.unwrap();
        let padding = "x".repeat(46);
        let topics: Vec<String> = (0..3_000)
            .map(|i| format!("bulk-{c}-{i:06}-{padding}"))
            .collect();
        // In sub frames of 500 topics: a frame must fit max_frame_bytes.
        for chunk in topics.chunks(500) {
            send(
                &mut ws,
                &ClientFrame::Sub {
                    topics: chunk.to_vec(),
                    positions: Default::default(),
                },
            )
            .await;
            loop {
                if let ServerFrame::Subscribed { .. } = next_frame(&mut ws).await {
                    break;
                }
            }
        }
        many.push(ws);
    }
    let control = Control::on(&b, "t").await;
    let sent = publish(&a, "t", "m", 10).await;
    control.finish(&sent).await;
    // a restarts (same name, new process): b links to it again, interest and all.
    let a_gossip = a.gossip_addr();
    a.shutdown().await;
    let mut again = config("a", [127, 0, 0, 1], &[b.gossip_addr()], Some(SECRET));
    again.listen = SocketAddr::from(([127, 0, 0, 1], a_gossip.port()));
    let a = start(again).await;
    let farm = b.farm();
    eventually(Duration::from_secs(10), "b lists the new a UP", || {
        let list = farm.borrow();
        list.servers
            .iter()
            .any(|s| s.name == "a" && s.status == Status::Up && s.url == a.url())
    })
    .await;
    // Listed UP is not yet linked: until b's link to the new a is open and its interest (in
    // several frames) acknowledged, a sends b nothing. Once a message gets through, all do.
    let control = Control::on(&b, "t2").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut warm = 0;
    while control.count() == 0 {
        assert!(Instant::now() < deadline, "b never linked to the new a");
        publish(&a, "t2", &format!("warm{warm}"), 1).await;
        warm += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = publish(&a, "t2", "n", 10).await;
    control.finish_ending_with(&sent).await;
    drop(many);
    a.shutdown().await;
    b.shutdown().await;
}

/// Not a timed test (timings are measured, not asserted): run it with `--ignored` to see that
/// each subscription to 1 024 new topics takes about as long as the first, however many topics
/// the node already holds (it once grew to seconds, with the broker's per-tick work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn subscription_time_stays_flat_as_topics_grow() {
    let (_a, b) = two_nodes(|c| c.max_subscriptions = 5_000).await;
    let mut keep = Vec::new();
    for c in 0..12 {
        let topics: Vec<String> = (0..1024).map(|i| format!("t-{c}-{i:06}")).collect();
        let (mut ws, _) = tokio_tungstenite::connect_async(b.url()).await.unwrap();
        let started = Instant::now();
        send(
            &mut ws,
            &ClientFrame::Sub {
                topics,
                positions: Default::default(),
            },
        )
        .await;
        loop {
            if let ServerFrame::Subscribed { .. } = next_frame(&mut ws).await {
                break;
            }
        }
        println!(
            "subscription {c} (1 024 new topics, {} held before): {:?}",
            c * 1024,
            started.elapsed()
        );
        keep.push(ws);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_link_that_never_reads_is_reset_at_its_byte_bound() {
    // No secret: anyone may link (the farm warns it is open), but not hold the node's memory.
    let mut config = config("solo", [127, 0, 0, 1], &[], None);
    config.relay_queue_bytes = 1 << 20;
    let node = start(config).await;
    let mut control = Control::on(&node, "t").await;
    // A link that declares interest in t, reads the acknowledgement, then nothing more; its
    // socket's receive buffer is small, so the node's queue is what fills.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(node.listen_addr()).await.unwrap();
    let (mut link, _) = tokio_tungstenite::client_async(relay_url(&node, "eve"), tcp)
        .await
        .unwrap();
    let interest = r#"{"type":"interest","version":1,"add":["t"],"remove":[]}"#;
    link.send(Message::text(interest)).await.unwrap();
    // The node says what interest it holds for this peer (none), then acknowledges.
    let ack = timeout(Duration::from_secs(5), async {
        loop {
            let frame = futures_util::StreamExt::next(&mut link)
                .await
                .expect("open")
                .expect("no error");
            if !frame.to_string().contains("interest_held") {
                return frame;
            }
        }
    })
    .await
    .expect("an answer");
    assert!(ack.to_string().contains("interest_ack"), "{ack}");
    let drops = &node.metrics().relay_drops;
    let payload = "x".repeat(64 * 1024);
    let mut sent = Vec::new();
    for i in 0.. {
        if load(drops) == 1 {
            break;
        }
        assert!(i < 1_000, "the link was never reset");
        control.has(sent.len().saturating_sub(4)).await;
        let message = format!("{i}-{payload}");
        node.publish("t", &message).await.expect("published");
        sent.push(short(&message));
    }
    println!(
        "a relay link that never reads was reset after {} messages of 64 KiB (relay_queue_bytes 1 MiB)",
        sent.len()
    );
    let more = publish(&node, "t", "after", 10).await;
    sent.extend(more);
    control.finish(&sent).await;
    node.shutdown().await;
}
