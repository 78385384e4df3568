//! Nodes in this process on 127.0.0.1 / .2 / .3 with real sockets: membership, users, relay,
//! limits, draining. Every wait polls a condition against a deadline.
//!
//! With `STREAMFARM_TEST_RELAY=nats` the same tests run with the nodes relaying through a real
//! `nats-server` (`scripts/test.sh` runs them both ways).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use streamfarm_core::protocol::{ClientFrame, Position, ServerFrame, close};
use streamfarm_core::{FarmList, Status};
use streamfarm_node::{NodeConfig, NodeHandle};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A config for a test node on `ip`, port 0 (gossip shares the port number), fast timers.
fn config(name: &str, ip: [u8; 4], join: &[SocketAddr]) -> NodeConfig {
    let mut config = NodeConfig::new(name);
    config.listen = SocketAddr::from((ip, 0));
    config.join = join.iter().map(|a| a.to_string()).collect();
    config.gossip_interval_ms = 50;
    config.failure_timeout_ms = 1_000;
    config.shutdown_drain_ms = 100;
    support::nats::use_test_relay(&mut config);
    config
}

async fn farm_of(ip_names: &[(&str, [u8; 4])], tweak: impl Fn(&mut NodeConfig)) -> Vec<NodeHandle> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for (name, ip) in ip_names {
        let seeds: Vec<SocketAddr> = nodes.first().map(|n| n.gossip_addr()).into_iter().collect();
        let mut config = config(name, *ip, &seeds);
        tweak(&mut config);
        nodes.push(NodeHandle::start(config).await.expect("node starts"));
    }
    nodes
}

async fn three_nodes(tweak: impl Fn(&mut NodeConfig)) -> Vec<NodeHandle> {
    farm_of(
        &[
            ("n1", [127, 0, 0, 1]),
            ("n2", [127, 0, 0, 2]),
            ("n3", [127, 0, 0, 3]),
        ],
        tweak,
    )
    .await
}

/// Awaits `future`, failing the test (instead of hanging it) after 10 s.
async fn step<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("step {what:?} took over 10 s"))
}

/// Polls `check` until it holds or `within` passes; returns how long it took.
async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn entry(list: &FarmList, name: &str) -> Option<(Status, u64)> {
    list.servers
        .iter()
        .find(|s| s.name == name)
        .map(|s| (s.status, s.users))
}

fn all_up(list: &FarmList, names: &[&str]) -> bool {
    list.servers.len() == names.len()
        && names
            .iter()
            .all(|n| entry(list, n).is_some_and(|(s, _)| s == Status::Up))
}

async fn wait_all_up(nodes: &[NodeHandle]) {
    let names: Vec<&str> = nodes.iter().map(|n| n.name()).collect();
    for node in nodes {
        let farm = node.farm();
        eventually(Duration::from_secs(5), "every node UP", || {
            all_up(&farm.borrow(), &names)
        })
        .await;
    }
}

async fn connect(node: &NodeHandle) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(node.url())
        .await
        .expect("connects");
    ws
}

/// Next server frame within 5 s, skipping pings (answered) and farm updates unless asked for.
async fn next_frame(ws: &mut Ws) -> ServerFrame {
    // One deadline for the whole wait: the server's pings must not keep extending it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("stream open")
            .expect("no error");
        match message {
            Message::Text(text) => {
                let frame: ServerFrame = serde_json::from_str(&text).expect("valid server frame");
                if let ServerFrame::Ping { id } = frame {
                    send(ws, &ClientFrame::Pong { id }).await;
                    continue;
                }
                return frame;
            }
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => continue,
        }
    }
}

async fn send(ws: &mut Ws, frame: &ClientFrame) {
    ws.send(Message::text(serde_json::to_string(frame).unwrap()))
        .await
        .expect("send");
}

/// Connects, reads hello + farm, subscribes to `topic` and waits for `subscribed`.
async fn subscriber(node: &NodeHandle, topic: &str) -> Ws {
    // `resume` fails the test unless `subscribed` gives the topic a position, even before any
    // message was published.
    resume(node, topic, None).await.0
}

/// The close code the server ends the stream with, skipping other frames.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("closed within 5 s");
        match next {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code.into()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_find_each_other_from_one_seed() {
    let nodes = three_nodes(|_| {}).await;
    wait_all_up(&nodes).await;
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_users_show_in_another_nodes_list_within_a_second() {
    let nodes = three_nodes(|_| {}).await;
    wait_all_up(&nodes).await;
    let far = nodes[2].farm();
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(connect(&nodes[0]).await);
    }
    let took = eventually(Duration::from_secs(1), "users:30 on n1 seen by n3", || {
        entry(&far.borrow(), "n1") == Some((Status::Up, 30))
    })
    .await;
    eprintln!("users 0 -> 30 seen by n3 after {took:?}");
    drop(clients);
    let took = eventually(Duration::from_secs(1), "users:0 on n1 seen by n3", || {
        entry(&far.borrow(), "n1") == Some((Status::Up, 0))
    })
    .await;
    eprintln!("users 30 -> 0 seen by n3 after {took:?}");
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_on_one_node_reaches_every_node_once() {
    let nodes = three_nodes(|_| {}).await;
    wait_all_up(&nodes).await;
    let mut subs = Vec::new();
    for node in &nodes {
        subs.push(subscriber(node, "prices").await);
        subs.push(subscriber(node, "prices").await);
    }
    let mut other = subscriber(&nodes[1], "other").await;
    // Published in order by one publisher: HTTP on n1, then the WebSocket of a client on n1.
    let http = reqwest::Client::new();
    for i in 0..5 {
        let response = http
            .post(format!("http://{}/publish/prices", nodes[0].listen_addr()))
            .body(format!("m{i}"))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
    let mut publisher = connect(&nodes[0]).await;
    for i in 5..10 {
        send(
            &mut publisher,
            &ClientFrame::Pub {
                topic: "prices".into(),
                data: format!("m{i}"),
                encoding: Default::default(),
            },
        )
        .await;
    }
    for ws in &mut subs {
        for i in 0..10 {
            match next_frame(ws).await {
                ServerFrame::Msg { topic, data, .. } => {
                    assert_eq!((topic.as_str(), data), ("prices", format!("m{i}")));
                }
                other => panic!("expected msg m{i}, got {other:?}"),
            }
        }
    }
    // Exactly once: nothing more arrives, on any subscriber (a ping round trip proves the
    // connection has caught up with everything queued before it).
    for ws in subs.iter_mut().chain([&mut other]) {
        send(ws, &ClientFrame::Ping { id: Some(99) }).await;
        assert_eq!(next_frame(ws).await, ServerFrame::Pong { id: Some(99) });
    }
    // The topic's replica sends each message out: to each of the 2 other nodes, and to none
    // without subscribers of the topic (through NATS: once, and NATS delivers it to both).
    let total = |counter: fn(&streamfarm_node::Metrics) -> &std::sync::atomic::AtomicU64| -> u64 {
        nodes
            .iter()
            .map(|n| counter(n.metrics()).load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    };
    let received = total(|m| &m.relay_messages_in);
    assert_eq!(received, 20, "10 messages to each of 2 peers");
    let sent_out = total(|m| &m.relay_messages_out);
    let publishes = if support::nats::nats_wanted() { 10 } else { 20 };
    assert_eq!(
        sent_out, publishes,
        "sent out once per peer, or once to NATS"
    );
    for node in nodes {
        node.shutdown().await;
    }
}

/// A client slower than the publisher, but reading, is never taken for a slow consumer: what
/// its writer has sent stops counting against the byte budget once the socket has it, however
/// many budgets' worth pass through over the connection's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_that_keeps_reading_is_not_closed() {
    const BUDGET: usize = 256 * 1024;
    const MESSAGES: usize = 200;
    let nodes = farm_of(&[("solo", [127, 0, 0, 1])], |c| c.send_queue_bytes = BUDGET).await;
    let node = &nodes[0];
    let mut slow = subscriber(node, "t").await;
    // 16 KiB messages: 200 of them are 12 budgets.
    let payload = "y".repeat(16 * 1024);
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < MESSAGES {
            match next_frame(&mut slow).await {
                ServerFrame::Msg { .. } => {
                    got += 1;
                    progress_tx.send_replace(got);
                    // Slower than the publisher could go.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                ServerFrame::Ping { .. } | ServerFrame::Farm(_) | ServerFrame::Feed { .. } => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
        got
    });
    for i in 0..MESSAGES {
        // At most 4 messages (64 KiB, a quarter of the budget) ahead of the reader.
        progress
            .wait_for(|got| got + 4 >= i)
            .await
            .expect("reader alive");
        node.publish("t", &payload).await.expect("published");
    }
    let got = timeout(Duration::from_secs(30), reader)
        .await
        .expect("the reader gets every message in time")
        .unwrap();
    assert_eq!(got, MESSAGES);
    let slow_consumers = &node.metrics().slow_consumers;
    assert_eq!(slow_consumers.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_closed_and_the_others_keep_receiving() {
    let nodes = farm_of(&[("solo", [127, 0, 0, 1])], |c| c.send_queue = 16).await;
    let node = &nodes[0];
    let mut fast = subscriber(node, "t").await;
    // The slow client subscribes, then never reads again.
    let mut slow = subscriber(node, "t").await;
    let payload = "x".repeat(32 * 1024);
    // The fast client reads everything; the publisher stays at most a few messages ahead of
    // it, so only the slow client can fall a whole queue behind.
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let fast_reader = tokio::spawn(async move {
        let mut got = 0;
        while got < 500 {
            if let ServerFrame::Msg { .. } = next_frame(&mut fast).await {
                got += 1;
                progress_tx.send_replace(got);
            }
        }
        (got, fast)
    });
    for i in 0..500 {
        progress
            .wait_for(|got| got + 4 >= i)
            .await
            .expect("fast reader alive");
        node.publish("t", &payload).await.expect("published");
    }
    let (got, _fast) = fast_reader.await.unwrap();
    assert_eq!(got, 500, "the fast client got every message");
    let slow_consumers = &node.metrics().slow_consumers;
    eventually(Duration::from_secs(5), "slow consumer closed", || {
        slow_consumers.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(close_code(&mut slow).await, Some(close::SLOW_CONSUMER));
    eventually(
        Duration::from_secs(2),
        "slow client no longer a user",
        || node.users() == 1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_the_node_keeps_serving() {
    let nodes = farm_of(&[("solo", [127, 0, 0, 1])], |c| c.max_frame_bytes = 1024).await;
    let node = &nodes[0];
    let mut ws = subscriber(node, "t").await;
    for bad in [
        "{not json",
        r#"{"type":"dance"}"#,
        r#"{"type":"sub","topics":"t"}"#,
    ] {
        ws.send(Message::text(bad)).await.unwrap();
        match next_frame(&mut ws).await {
            ServerFrame::Error { code, .. } => assert_eq!(code, "bad_frame", "for {bad}"),
            other => panic!("expected an error frame for {bad}, got {other:?}"),
        }
    }
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert!(
        matches!(next_frame(&mut ws).await, ServerFrame::Error { code, .. } if code == "bad_frame")
    );
    send(
        &mut ws,
        &ClientFrame::Sub {
            topics: vec!["has space".into()],
            positions: Default::default(),
        },
    )
    .await;
    assert!(
        matches!(next_frame(&mut ws).await, ServerFrame::Error { code, .. } if code == "bad_topic")
    );
    // Still serving this connection.
    send(&mut ws, &ClientFrame::Ping { id: Some(1) }).await;
    assert_eq!(next_frame(&mut ws).await, ServerFrame::Pong { id: Some(1) });

    // An oversized frame: error frame, then close 1009.
    let mut big = subscriber(node, "t").await;
    big.send(Message::text(format!(
        r#"{{"type":"pub","topic":"t","data":"{}"}}"#,
        "y".repeat(1500)
    )))
    .await
    .unwrap();
    let mut saw_error = false;
    let code = loop {
        match timeout(Duration::from_secs(5), big.next())
            .await
            .expect("answer")
        {
            Some(Ok(Message::Text(text))) => {
                if let Ok(ServerFrame::Error { code, .. }) = serde_json::from_str(&text) {
                    assert_eq!(code, "too_big");
                    saw_error = true;
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert_eq!(code, Some(close::MESSAGE_TOO_BIG));
    assert!(saw_error, "an error frame precedes the close");
    // The node still serves: the first connection still receives messages.
    node.publish("t", "after").await.expect("published");
    assert!(matches!(next_frame(&mut ws).await, ServerFrame::Msg { data, .. } if data == "after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_for_heartbeat_timeout() {
    let nodes = farm_of(&[("solo", [127, 0, 0, 1])], |c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 300;
    })
    .await;
    let mut ws = connect(&nodes[0]).await;
    // Read without ever answering: the node pings, then gives up.
    let mut pings = 0;
    let code = loop {
        match timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("frames")
        {
            Some(Ok(Message::Text(text))) => {
                if let Ok(ServerFrame::Ping { .. }) = serde_json::from_str(&text) {
                    pings += 1;
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    assert_eq!(code, Some(close::HEARTBEAT_TIMEOUT));
    assert!(pings >= 1, "the node pinged the idle client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_moves_clients_away_and_refuses_new_ones() {
    let nodes = three_nodes(|c| {
        c.drain_period_ms = 300;
        c.admin_token = Some("secret-admin-token-16".into());
    })
    .await;
    wait_all_up(&nodes).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut ws = connect(&nodes[0]).await;
        assert!(matches!(
            next_frame(&mut ws).await,
            ServerFrame::Hello { .. }
        ));
        clients.push(ws);
    }
    let http = reqwest::Client::new();
    let admin = format!("http://{}/admin/status", nodes[0].listen_addr());
    let denied = http.post(&admin).body("DRAINING").send().await.unwrap();
    assert_eq!(denied.status(), 401);
    let ok = http
        .post(&admin)
        .bearer_auth("secret-admin-token-16")
        .body(r#"{"status":"DRAINING"}"#)
        .send()
        .await
        .unwrap();
    assert!(ok.status().is_success());
    for ws in &mut clients {
        assert_eq!(close_code(ws).await, Some(close::RECONNECT_ELSEWHERE));
    }
    let mut late = connect(&nodes[0]).await;
    assert_eq!(
        close_code(&mut late).await,
        Some(close::RECONNECT_ELSEWHERE)
    );
    let far = nodes[2].farm();
    eventually(Duration::from_secs(1), "n1 DRAINING in n3's list", || {
        entry(&far.borrow(), "n1").is_some_and(|(s, _)| s == Status::Draining)
    })
    .await;
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_maximum_are_refused_as_server_full() {
    let nodes = farm_of(&[("solo", [127, 0, 0, 1])], |c| c.max_connections = 2).await;
    let _a = connect(&nodes[0]).await;
    let _b = connect(&nodes[0]).await;
    let mut c = connect(&nodes[0]).await;
    assert_eq!(close_code(&mut c).await, Some(close::SERVER_FULL));
    assert_eq!(nodes[0].users(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutting_down_moves_its_clients_then_is_listed_down() {
    let nodes = three_nodes(|c| c.shutdown_grace_ms = 500).await;
    wait_all_up(&nodes).await;
    // A client without the `migrate` feature is closed with 4000; one with it is told to move
    // to a server below its share, and closed with 1001 if still there after the grace period.
    let mut plain = connect(&nodes[0]).await;
    let mut mover = connect(&nodes[0]).await;
    send(
        &mut mover,
        &ClientFrame::Hello {
            features: vec!["migrate".into()],
            migrating: false,
        },
    )
    .await;
    hello_read(&mut mover).await;
    let others: Vec<String> = nodes[1..].iter().map(|n| n.url().to_string()).collect();
    let mut nodes = nodes.into_iter();
    let first = nodes.next().unwrap();
    let rest: Vec<NodeHandle> = nodes.collect();
    let far = rest[1].farm();
    let shutdown = tokio::spawn(first.shutdown());
    eventually(Duration::from_secs(1), "n1 DRAINING in n3's list", || {
        entry(&far.borrow(), "n1").is_some_and(|(s, _)| s == Status::Draining)
    })
    .await;
    assert_eq!(
        close_code(&mut plain).await,
        Some(close::RECONNECT_ELSEWHERE)
    );
    let told = loop {
        if let ServerFrame::Migrate {
            to,
            reason,
            deadline_ms,
        } = next_frame(&mut mover).await
        {
            assert_eq!(reason, "shutdown");
            assert!(deadline_ms > 0);
            break to;
        }
    };
    assert!(told.is_some_and(|to| others.contains(&to)));
    // It does not move: the grace period ends it.
    assert_eq!(close_code(&mut mover).await, Some(close::GOING_AWAY));
    eventually(Duration::from_secs(2), "n1 DOWN in n3's list", || {
        entry(&far.borrow(), "n1").is_some_and(|(s, _)| s == Status::Down)
    })
    .await;
    shutdown.await.unwrap();
    for node in rest {
        node.shutdown().await;
    }
}

/// Waits until the node has read what was sent so far: it reads frames in order, so an answered
/// ping means the frames before it were read.
async fn hello_read(ws: &mut Ws) {
    send(ws, &ClientFrame::Ping { id: Some(7) }).await;
    while next_frame(ws).await != (ServerFrame::Pong { id: Some(7) }) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_move_is_closed_at_the_migrate_deadline() {
    let nodes = farm_of(&[("m1", [127, 0, 0, 1]), ("m2", [127, 0, 0, 2])], |c| {
        c.migrate_deadline_ms = 300;
        c.drain_period_ms = 100;
    })
    .await;
    wait_all_up(&nodes).await;
    let mut ws = connect(&nodes[0]).await;
    send(
        &mut ws,
        &ClientFrame::Hello {
            features: vec!["migrate".into()],
            migrating: false,
        },
    )
    .await;
    hello_read(&mut ws).await;
    nodes[0].set_status(Status::Draining);
    let told_at = std::time::Instant::now();
    loop {
        if let ServerFrame::Migrate { to, reason, .. } = next_frame(&mut ws).await {
            assert_eq!(to.as_deref(), Some(nodes[1].url()));
            assert_eq!(reason, "drain");
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await, Some(close::RECONNECT_ELSEWHERE));
    assert!(told_at.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        nodes[0]
            .metrics()
            .migrations_timed_out
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_farm_list_is_served_over_http_and_the_websocket() {
    let nodes = farm_of(&[("solo", [127, 0, 0, 1])], |_| {}).await;
    let node = &nodes[0];
    let body = reqwest::get(format!("http://{}/farm", node.listen_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list: FarmList = serde_json::from_str(&body).unwrap();
    assert_eq!(entry(&list, "solo"), Some((Status::Up, 0)));
    assert_eq!(list.servers[0].url, node.url());
    let mut ws = connect(node).await;
    match next_frame(&mut ws).await {
        ServerFrame::Hello {
            server,
            url,
            status,
            ..
        } => {
            assert_eq!(
                (server.as_str(), url.as_str(), status),
                ("solo", node.url(), Status::Up)
            );
        }
        other => panic!("expected hello, got {other:?}"),
    }
    assert!(matches!(next_frame(&mut ws).await, ServerFrame::Farm(_)));
    // Watching: a node joins the farm, and the update arrives unasked.
    send(
        &mut ws,
        &ClientFrame::List {
            watch: true,
            users: false,
        },
    )
    .await;
    assert!(matches!(next_frame(&mut ws).await, ServerFrame::Farm(_)));
    let _other = connect(node).await;
    let joined = NodeHandle::start(config("late", [127, 0, 0, 2], &[node.gossip_addr()]))
        .await
        .expect("starts");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        assert!(
            Instant::now() < deadline,
            "no farm update listing the new node"
        );
        if let ServerFrame::Farm(list) = next_frame(&mut ws).await
            && entry(&list, "late").is_some_and(|(status, _)| status == Status::Up)
        {
            break;
        }
    }
    // Users are asked for: this list counts the second client.
    send(
        &mut ws,
        &ClientFrame::List {
            watch: false,
            users: false,
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        assert!(Instant::now() < deadline, "no list with users:2");
        if let ServerFrame::Farm(list) = next_frame(&mut ws).await
            && entry(&list, "solo") == Some((Status::Up, 2))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(
            &mut ws,
            &ClientFrame::List {
                watch: false,
                users: false,
            },
        )
        .await;
    }
    joined.shutdown().await;
    let health = reqwest::get(format!("http://{}/healthz", node.listen_addr()))
        .await
        .unwrap();
    assert!(health.status().is_success());
    let metrics = reqwest::get(format!("http://{}/metrics", node.listen_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("streamfarm_connections 2"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_farm_list_comes_in_every_format() {
    use streamfarm_core::encoding::{self, Format};
    let nodes = farm_of(&[("solo", [127, 0, 0, 1])], |_| {}).await;
    let base = format!("http://{}/farm", nodes[0].listen_addr());
    let http = reqwest::Client::new();
    let get = |query: &'static str, accept: &'static str| {
        let request = http.get(format!("{base}{query}")).header("accept", accept);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (status, content_type, response.text().await.unwrap())
        }
    };
    for (query, accept, format) in [
        ("", "", Format::Json),
        ("?format=text", "", Format::Text),
        ("?format=xml", "application/json", Format::Xml),
        ("?format=js", "", Format::Js),
        ("", "text/plain", Format::Text),
        ("", "application/xml", Format::Xml),
    ] {
        let (status, content_type, body) = get(query, accept).await;
        assert_eq!(status, 200, "{query} {accept}");
        assert_eq!(content_type, format.content_type(), "{query} {accept}");
        let list = encoding::parse(&body, format).unwrap();
        assert_eq!(
            entry(&list, "solo").map(|e| e.0),
            Some(Status::Up),
            "{body}"
        );
    }
    let (status, _, body) = get("?callback=app.onFarm", "").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("app.onFarm("), "{body}");
    assert_eq!(get("?callback=alert(1)", "").await.0, 400);
    assert_eq!(get("?format=yaml", "").await.0, 400);
    assert_eq!(get("", "image/png").await.0, 406);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_per_connection_are_capped() {
    let nodes = farm_of(&[("solo", [127, 0, 0, 1])], |c| c.max_subscriptions = 2).await;
    let mut ws = subscriber(&nodes[0], "a").await;
    send(
        &mut ws,
        &ClientFrame::Sub {
            topics: vec!["b".into(), "c".into()],
            positions: Default::default(),
        },
    )
    .await;
    assert!(
        matches!(next_frame(&mut ws).await, ServerFrame::Error { code, .. } if code == "too_many_topics")
    );
    // Re-subscribing to held topics costs nothing; one more still fits.
    send(
        &mut ws,
        &ClientFrame::Sub {
            topics: vec!["a".into(), "b".into()],
            positions: Default::default(),
        },
    )
    .await;
    assert!(matches!(
        next_frame(&mut ws).await,
        ServerFrame::Subscribed { .. }
    ));
}

// The new n2 must not confirm a subscription before n1 — live, but not yet judged live by the
// just-started n2 — holds the new n2's interest; otherwise n1's message is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_gets_each_message_once_over_its_new_link() {
    let mut nodes = farm_of(&[("n1", [127, 0, 0, 1]), ("n2", [127, 0, 0, 2])], |_| {}).await;
    wait_all_up(&nodes).await;
    let seed = nodes[0].gossip_addr();
    let old = nodes.pop().unwrap();
    let old_url = old.url().to_string();
    step("old n2 shuts down", old.shutdown()).await;
    // Same name, new process (new port, new generation).
    nodes.push(
        step(
            "n2 restarts",
            NodeHandle::start(config("n2", [127, 0, 0, 2], &[seed])),
        )
        .await
        .expect("restarts"),
    );
    let near = nodes[0].farm();
    let new_url = nodes[1].url().to_string();
    eventually(Duration::from_secs(5), "n1 lists the new n2 UP", || {
        near.borrow()
            .servers
            .iter()
            .any(|s| s.name == "n2" && s.url == new_url && s.status == Status::Up)
    })
    .await;
    assert_ne!(old_url, new_url);
    let mut sub = step("subscribe on the new n2", subscriber(&nodes[1], "t")).await;
    nodes[0].publish("t", "once").await.expect("published");
    assert!(matches!(next_frame(&mut sub).await, ServerFrame::Msg { data, .. } if data == "once"));
    send(&mut sub, &ClientFrame::Ping { id: Some(5) }).await;
    assert_eq!(
        next_frame(&mut sub).await,
        ServerFrame::Pong { id: Some(5) }
    );
    for node in nodes {
        step("shutdown", node.shutdown()).await;
    }
}

/// Subscribes on `node` to `topic` resuming after `after` (none: live); returns the connection
/// and the position `subscribed` gave.
async fn resume(node: &NodeHandle, topic: &str, after: Option<Position>) -> (Ws, Position) {
    let mut ws = connect(node).await;
    assert!(matches!(
        next_frame(&mut ws).await,
        ServerFrame::Hello { .. }
    ));
    assert!(matches!(next_frame(&mut ws).await, ServerFrame::Farm(_)));
    let positions = after.map(|p| (topic.to_string(), p)).into_iter().collect();
    send(
        &mut ws,
        &ClientFrame::Sub {
            topics: vec![topic.into()],
            positions,
        },
    )
    .await;
    match next_frame(&mut ws).await {
        ServerFrame::Subscribed { topics, positions } => {
            assert_eq!(topics, vec![topic.to_string()]);
            let at = *positions
                .get(topic)
                .expect("a position, even before any message");
            (ws, at)
        }
        other => panic!("expected subscribed, got {other:?}"),
    }
}

/// The next `msg` frame's payload and position.
async fn next_msg(ws: &mut Ws) -> (String, Position) {
    loop {
        match next_frame(ws).await {
            frame @ ServerFrame::Msg { .. } => {
                let at = frame.position().expect("messages carry positions");
                let ServerFrame::Msg { data, .. } = frame else {
                    unreachable!()
                };
                return (data, at);
            }
            ServerFrame::Farm(_) => continue,
            other => panic!("expected a msg, got {other:?}"),
        }
    }
}

/// Nothing more is queued for `ws`: a ping round trip comes back first.
async fn nothing_more(ws: &mut Ws) {
    send(ws, &ClientFrame::Ping { id: Some(77) }).await;
    assert_eq!(next_frame(ws).await, ServerFrame::Pong { id: Some(77) });
}

/// The sequencer and replica of `topic` as `node` sees the farm (`GET /topics/{topic}`).
async fn placement(node: &NodeHandle, topic: &str) -> (String, String) {
    let text = reqwest::get(format!("http://{}/topics/{topic}", node.listen_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    (
        body["sequencer"].as_str().unwrap().to_string(),
        body["replica"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_from_its_position() {
    let nodes = three_nodes(|_| {}).await;
    wait_all_up(&nodes).await;
    let (mut first, start) = step("subscribe on n1", resume(&nodes[0], "r", None)).await;
    assert_eq!(
        start.offset, 0,
        "nothing published yet, and still a position"
    );
    for i in 1..=3 {
        nodes[1]
            .publish("r", &format!("m{i}"))
            .await
            .expect("published");
    }
    let mut held = start;
    for i in 1..=3 {
        let (data, at) = next_msg(&mut first).await;
        assert_eq!((data, at), (format!("m{i}"), Position::new(start.epoch, i)));
        held = at;
    }
    drop(first);
    for i in 4..=6 {
        nodes[2]
            .publish("r", &format!("m{i}"))
            .await
            .expect("published");
    }
    // On another node, from where it was: what it missed, in order, then live.
    let (mut again, now) = step("resume on n3", resume(&nodes[2], "r", Some(held))).await;
    assert_eq!(now, Position::new(start.epoch, 6));
    for i in 4..=6 {
        assert_eq!(next_msg(&mut again).await.0, format!("m{i}"));
    }
    nodes[0].publish("r", "m7").await.expect("published");
    assert_eq!(
        next_msg(&mut again).await,
        ("m7".into(), Position::new(start.epoch, 7))
    );
    nothing_more(&mut again).await;
    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_older_than_the_history_are_reported_as_a_gap_with_their_range() {
    // Room for about three 100-byte messages.
    let nodes = farm_of(&[("solo", [127, 0, 0, 1])], |c| c.history_bytes = 700).await;
    let node = &nodes[0];
    let (first, start) = resume(node, "h", None).await;
    drop(first);
    // A subscriber that stays keeps the topic's stream on this node.
    let (_stay, _) = resume(node, "h", None).await;
    let payload = |i: u64| format!("{i:0>100}");
    for i in 1..=10 {
        node.publish("h", &payload(i)).await.expect("published");
    }
    let (mut again, now) = resume(node, "h", Some(start)).await;
    assert_eq!(now.offset, 10);
    let first_kept = match next_frame(&mut again).await {
        ServerFrame::Gap {
            topic,
            epoch,
            from,
            to,
            reason,
        } => {
            assert_eq!((topic.as_str(), epoch, from), ("h", start.epoch, 1));
            assert_eq!(
                reason,
                streamfarm_core::protocol::GapReason::HistoryExceeded
            );
            let to = to.expect("a bounded range");
            assert!(
                (5..10).contains(&to),
                "kept only the newest few: gap to {to}"
            );
            to + 1
        }
        other => panic!("expected a gap, got {other:?}"),
    };
    for i in first_kept..=10 {
        assert_eq!(
            next_msg(&mut again).await,
            (payload(i), Position::new(start.epoch, i))
        );
    }
    nothing_more(&mut again).await;
    let history = node
        .metrics()
        .history_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        history > 0 && history <= 3 * 700,
        "history bytes bounded: {history}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_sequencer_keeps_the_epoch_and_loses_nothing() {
    let mut nodes = three_nodes(|_| {}).await;
    wait_all_up(&nodes).await;
    // A topic whose sequencer is not n1 (n1 publishes and survives in every case below).
    let mut topic = String::new();
    let mut roles = (String::new(), String::new());
    for i in 0.. {
        topic = format!("seq{i}");
        roles = placement(&nodes[0], &topic).await;
        if roles.0 != "n1" {
            break;
        }
    }
    let (sequencer, replica) = roles;
    // The subscriber is on the node that is neither, or on n1.
    let watcher = nodes
        .iter()
        .position(|n| n.name() != sequencer && n.name() != replica)
        .unwrap_or(0);
    let (mut sub, start) = resume(&nodes[watcher], &topic, None).await;
    for i in 1..=5 {
        nodes[0]
            .publish(&topic, &format!("m{i}"))
            .await
            .expect("published");
    }
    let victim = nodes.iter().position(|n| n.name() == sequencer).unwrap();
    drop(nodes.remove(victim));
    // Published while the farm still lists the dead sequencer: held by n1 and sent again to
    // the next sequencer (the replica) once the dead one is listed DOWN.
    let dropped = Instant::now();
    for i in 6..=10 {
        step("publish", nodes[0].publish(&topic, &format!("m{i}")))
            .await
            .expect("published");
    }
    eprintln!(
        "sequencer {sequencer} lost: 5 publishes acknowledged {:?} later (failure timeout 1 s; its links reset at once)",
        dropped.elapsed()
    );
    for i in 1..=10 {
        assert_eq!(
            next_msg(&mut sub).await,
            (format!("m{i}"), Position::new(start.epoch, i)),
            "message {i}: same epoch, next offset"
        );
    }
    nothing_more(&mut sub).await;
    // Once the farm lists the dead node DOWN, every view agrees: the replica sequences now.
    let deadline = Instant::now() + Duration::from_secs(5);
    while placement(&nodes[0], &topic).await.0 != replica {
        assert!(Instant::now() < deadline, "the replica took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        placement(&nodes[0], &topic).await.0,
        replica,
        "the replica took over"
    );
}
