//! Active rebalancing end to end: real nodes of this process on 127.0.0.x, real clients, messages
//! published all along. A node above its fair share moves just its surplus, make-before-break:
//! each moved client is subscribed and caught up on its new server before it closes the old
//! connection, so it misses nothing, receives nothing twice and never disconnects; a less
//! preferred group gives its clients back to the preferred one (failback); a draining node moves
//! every client off the same way; and a farm that is even stays still.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use streamfarm_client::{Client, ClientOptions, Event, ServiceAddress};
use streamfarm_core::Status;
use streamfarm_node::{NodeConfig, NodeHandle};
use tokio::task::JoinHandle;

mod support;
use support::eventually;

const TOPIC: &str = "moving";

fn config(name: &str, ip: u8, priority: &str, join: Option<SocketAddr>) -> NodeConfig {
    let mut config = NodeConfig::new(name);
    config.listen = SocketAddr::from(([127, 0, 0, ip], 0));
    config.join = join.iter().map(|a| a.to_string()).collect();
    config.priority = priority.to_string();
    config.gossip_interval_ms = 50;
    config.failure_timeout_ms = 1_000;
    config.heartbeat_interval_ms = 300;
    config.heartbeat_timeout_ms = 1_500;
    config.shutdown_drain_ms = 300;
    config.drain_period_ms = 500;
    config.rebalance_cooldown_ms = 0;
    config.rebalance_rate = 50.0;
    config.migrate_deadline_ms = 5_000;
    config
}

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    numbers: Vec<u64>,
    migrations: Vec<(String, String, String)>,
    disconnects: usize,
    gaps: usize,
}

struct Subscriber {
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

async fn subscriber(seeds: &ServiceAddress, seed: u64) -> Subscriber {
    let options = ClientOptions::new()
        .subscribe([TOPIC])
        .seed(seed)
        .connect_timeout(Duration::from_millis(800));
    let mut client = Client::start(seeds.clone(), options);
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .expect("client connects");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(event) = client.next_event().await {
            let mut seen = recorder.lock().unwrap();
            match event {
                Event::Message { payload, .. } => {
                    let text = String::from_utf8_lossy(&payload).into_owned();
                    if let Ok(n) = text.parse() {
                        seen.numbers.push(n);
                    }
                }
                Event::Migrated {
                    from, to, reason, ..
                } => seen.migrations.push((from, to, reason)),
                Event::Disconnected { .. } => seen.disconnects += 1,
                Event::Gap { .. } => seen.gaps += 1,
                _ => {}
            }
        }
    });
    Subscriber { seen, task }
}

/// Publishes 0, 1, 2… on `node` every 5 ms until aborted; the last acknowledged number is in
/// the returned cell.
fn publisher(node: Arc<NodeHandle>) -> (Arc<Mutex<Option<u64>>>, JoinHandle<()>) {
    let last = Arc::new(Mutex::new(None));
    let task = tokio::spawn({
        let last = last.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            for n in 0u64.. {
                tick.tick().await;
                node.publish(TOPIC, &n.to_string())
                    .await
                    .expect("publish acknowledged");
                *last.lock().unwrap() = Some(n);
            }
        }
    });
    (last, task)
}

fn lists_up(node: &NodeHandle, names: &[&str]) -> bool {
    let list = node.farm().borrow().clone();
    names.iter().all(|name| {
        list.servers
            .iter()
            .any(|s| s.name == *name && s.status == Status::Up)
    })
}

/// Stops publishing, waits until every client has the last message, and checks that each got
/// every message from its first one on, once and in order, with no disconnection or gap.
async fn every_message_once(
    subscribers: &[Subscriber],
    last: &Mutex<Option<u64>>,
    publisher: JoinHandle<()>,
) {
    publisher.abort();
    let _ = publisher.await;
    let last = last.lock().unwrap().expect("messages were published");
    eventually(
        Duration::from_secs(10),
        "every client has the last message",
        || {
            subscribers
                .iter()
                .all(|s| s.seen.lock().unwrap().numbers.contains(&last))
        },
    )
    .await;
    for (i, s) in subscribers.iter().enumerate() {
        let seen = s.seen.lock().unwrap();
        let first = *seen.numbers.first().expect("received messages");
        let expected: Vec<u64> = (first..=last).collect();
        let got: Vec<u64> = seen
            .numbers
            .iter()
            .copied()
            .filter(|n| *n <= last)
            .collect();
        assert_eq!(
            got.len(),
            expected.len(),
            "client {i}: {} messages, expected {} ({} lost or duplicated)",
            got.len(),
            expected.len(),
            expected.len().abs_diff(got.len())
        );
        assert_eq!(got, expected, "client {i}: out of order, lost or twice");
        assert_eq!(seen.disconnects, 0, "client {i} was disconnected");
        assert_eq!(seen.gaps, 0, "client {i} was told of a gap");
    }
}

fn metric(
    node: &NodeHandle,
    pick: impl Fn(&streamfarm_node::Metrics) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    pick(node.metrics()).load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_gets_just_the_surplus_moved_make_before_break() {
    let a = Arc::new(NodeHandle::start(config("a", 1, "A", None)).await.unwrap());
    let seeds: ServiceAddress = a.listen_addr().to_string().parse().unwrap();
    let mut subscribers = Vec::new();
    for i in 0..12 {
        subscribers.push(subscriber(&seeds, i).await);
    }
    assert_eq!(a.users(), 12);
    let (last, publishing) = publisher(a.clone());
    eventually(
        Duration::from_secs(5),
        "a first publish acknowledged",
        || last.lock().unwrap().is_some(),
    )
    .await;

    let b = NodeHandle::start(config("b", 2, "A", Some(a.gossip_addr())))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "a and b hold 6 clients each",
        || a.users() == 6 && b.users() == 6,
    )
    .await;
    every_message_once(&subscribers, &last, publishing).await;

    // Just the surplus moved: six clients, each once, each to b, each told to by a.
    let moves: Vec<(String, String, String)> = subscribers
        .iter()
        .flat_map(|s| s.seen.lock().unwrap().migrations.clone())
        .collect();
    assert_eq!(moves.len(), 6, "{moves:?}");
    assert!(
        moves
            .iter()
            .all(|(from, to, why)| *from == a.url() && to == b.url() && why == "rebalance"),
        "{moves:?}"
    );
    assert_eq!(metric(&a, |m| &m.migrations_started), 6);
    assert_eq!(metric(&a, |m| &m.migrations_completed), 6);
    assert_eq!(metric(&a, |m| &m.migrations_timed_out), 0);
    assert_eq!(metric(&b, |m| &m.migrations_received), 6);

    // Even now: nothing moves any more (cooldown 0, so only the plan keeps it still).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(metric(&a, |m| &m.migrations_started), 6);
    assert_eq!(metric(&b, |m| &m.migrations_started), 0);

    for s in subscribers {
        s.task.abort();
    }
    b.shutdown().await;
    Arc::into_inner(a).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preferred_node_coming_back_gets_the_clients_back() {
    let b = Arc::new(NodeHandle::start(config("b", 3, "B", None)).await.unwrap());
    let seeds: ServiceAddress = b.listen_addr().to_string().parse().unwrap();
    let mut subscribers = Vec::new();
    for i in 0..5 {
        subscribers.push(subscriber(&seeds, 100 + i).await);
    }
    let (last, publishing) = publisher(b.clone());
    let a = NodeHandle::start(config("a", 4, "A", Some(b.gossip_addr())))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "every client back on group A",
        || a.users() == 5 && b.users() == 0,
    )
    .await;
    every_message_once(&subscribers, &last, publishing).await;
    for s in &subscribers {
        let seen = s.seen.lock().unwrap();
        assert_eq!(
            seen.migrations,
            vec![(b.url().to_string(), a.url().to_string(), "rebalance".into())]
        );
    }
    for s in subscribers {
        s.task.abort();
    }
    a.shutdown().await;
    Arc::into_inner(b).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_and_shutdown_move_every_client_without_a_disconnection() {
    let a = NodeHandle::start(config("a", 5, "A", None)).await.unwrap();
    let b = Arc::new(
        NodeHandle::start(config("b", 6, "A", Some(a.gossip_addr())))
            .await
            .unwrap(),
    );
    let c = NodeHandle::start(config("c", 7, "A", Some(a.gossip_addr())))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the farm is up", || {
        lists_up(&a, &["a", "b", "c"]) && lists_up(&c, &["a", "b", "c"])
    })
    .await;
    let seeds: ServiceAddress = a.listen_addr().to_string().parse().unwrap();
    let mut subscribers = Vec::new();
    for i in 0..9 {
        subscribers.push(subscriber(&seeds, 200 + i).await);
    }
    let (last, publishing) = publisher(b.clone());
    // Draining: a's clients move to b and c.
    a.set_status(Status::Draining);
    eventually(Duration::from_secs(10), "a drained", || a.users() == 0).await;
    // Shutdown: c's clients move to b.
    c.shutdown().await;
    eventually(Duration::from_secs(10), "every client on b", || {
        b.users() == 9
    })
    .await;
    every_message_once(&subscribers, &last, publishing).await;
    assert_eq!(metric(&a, |m| &m.migrations_timed_out), 0);
    let reasons: Vec<String> = subscribers
        .iter()
        .flat_map(|s| s.seen.lock().unwrap().migrations.clone())
        .map(|(_, _, why)| why)
        .collect();
    assert!(reasons.iter().any(|r| r == "drain"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "shutdown"), "{reasons:?}");
    for s in subscribers {
        s.task.abort();
    }
    a.shutdown().await;
    Arc::into_inner(b).unwrap().shutdown().await;
}

/// The order of a migration, against two scripted stand-in nodes: the client subscribes on the
/// new node (from its position), keeps reading the old one until that one has delivered
/// everything up to where the new one starts, and only then closes the old connection; each
/// message arrives once, in order, and the application hears `Migrated`, never a disconnection.
mod order {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use streamfarm_client::{Client, ClientOptions, Epoch, Event, Position};
    use streamfarm_core::protocol::{ClientFrame, ServerFrame};
    use streamfarm_core::{FarmList, ServerEntry, Status};
    use tokio::net::TcpListener;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;

    const E: Epoch = Epoch(9);
    type Log = Arc<Mutex<Vec<String>>>;
    type Ws = WebSocketStream<tokio::net::TcpStream>;

    fn text(frame: &ServerFrame) -> Message {
        Message::text(serde_json::to_string(frame).unwrap())
    }

    fn msg(offset: u64) -> Message {
        text(&ServerFrame::Msg {
            topic: "t".into(),
            data: offset.to_string(),
            encoding: Default::default(),
            epoch: Some(E),
            offset: Some(offset),
            ts: None,
        })
    }

    async fn accept(listener: &TcpListener, url: &str, list: &FarmList) -> Ws {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let hello = ServerFrame::Hello {
            server: url.into(),
            url: url.into(),
            status: Status::Up,
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 5000,
            max_frame_bytes: 65536,
        };
        ws.send(text(&hello)).await.unwrap();
        ws.send(text(&ServerFrame::Farm(list.clone())))
            .await
            .unwrap();
        ws
    }

    /// The client frames up to and including its `sub`; a list asked for is answered with
    /// `list`, as a node answers a client that chooses from it.
    async fn until_sub(ws: &mut Ws, list: &FarmList) -> Vec<ClientFrame> {
        let mut frames = Vec::new();
        while let Some(Ok(message)) = ws.next().await {
            let Message::Text(body) = message else {
                continue;
            };
            let frame: ClientFrame = serde_json::from_str(&body).unwrap();
            if let ClientFrame::List { watch: false, .. } = frame {
                ws.send(text(&ServerFrame::Farm(list.clone())))
                    .await
                    .unwrap();
            }
            let done = matches!(frame, ClientFrame::Sub { .. });
            frames.push(frame);
            if done {
                return frames;
            }
        }
        panic!("no sub");
    }

    fn subscribed(offset: u64) -> Message {
        text(&ServerFrame::Subscribed {
            topics: vec!["t".into()],
            positions: BTreeMap::from([("t".to_string(), Position::new(E, offset))]),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_old_connection_closes_only_once_the_new_one_took_over() {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let a_url = format!("ws://{}/stream", a.local_addr().unwrap());
        let b_url = format!("ws://{}/stream", b.local_addr().unwrap());
        let list = FarmList::new(vec![
            ServerEntry::new("a", &a_url, Status::Up, 1, "A"),
            ServerEntry::new("b", &b_url, Status::Up, 0, "A"),
        ]);
        let log: Log = Arc::default();
        let note = |log: &Log, what: &str| log.lock().unwrap().push(what.to_string());
        let (b_subscribed_tx, b_subscribed) = tokio::sync::oneshot::channel();

        let old = tokio::spawn({
            let (log, list, b_url, a_url) =
                (log.clone(), list.clone(), b_url.clone(), a_url.clone());
            async move {
                let mut ws = accept(&a, &a_url, &list).await;
                until_sub(&mut ws, &list).await;
                ws.send(subscribed(0)).await.unwrap();
                for offset in 1..=3 {
                    ws.send(msg(offset)).await.unwrap();
                }
                let migrate = ServerFrame::Migrate {
                    to: Some(b_url),
                    reason: "rebalance".into(),
                    deadline_ms: 10_000,
                };
                ws.send(text(&migrate)).await.unwrap();
                // The new node subscribes the client at 5: this one is still at 3.
                b_subscribed.await.unwrap();
                // For a while it sends nothing more, reading: a client that closed now would
                // close before it caught up.
                if let Ok(Some(Ok(Message::Close(_)))) =
                    tokio::time::timeout(Duration::from_millis(200), ws.next()).await
                {
                    note(&log, "a closed by the client before it caught up");
                    return;
                }
                if ws.send(msg(4)).await.is_err() || ws.send(msg(5)).await.is_err() {
                    note(&log, "a lost the client before it could send 4 and 5");
                    return;
                }
                note(&log, "a sends 4 and 5");
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Close(_) = message {
                        note(&log, "a closed by the client");
                        return;
                    }
                }
                note(&log, "a lost the client without a close");
            }
        });
        let new = tokio::spawn({
            let (log, list, b_url) = (log.clone(), list.clone(), b_url.clone());
            async move {
                let mut ws = accept(&b, &b_url, &list).await;
                let frames = until_sub(&mut ws, &list).await;
                assert!(
                    frames.contains(&ClientFrame::Hello {
                        features: vec!["migrate".into()],
                        migrating: true
                    }),
                    "{frames:?}"
                );
                let Some(ClientFrame::Sub { positions, .. }) = frames.last() else {
                    unreachable!()
                };
                assert_eq!(
                    positions["t"],
                    Position::new(E, 3),
                    "resumes from its position"
                );
                ws.send(subscribed(5)).await.unwrap();
                note(&log, "b subscribed at 5");
                let _ = b_subscribed_tx.send(());
                // What the client missed (4, 5), then live (6).
                for offset in 4..=6 {
                    ws.send(msg(offset)).await.unwrap();
                }
                ws
            }
        });

        let options = ClientOptions::new().subscribe(["t"]).seed(3);
        let mut client = Client::start(a_url.parse().unwrap(), options);
        let mut offsets = Vec::new();
        let mut migrated = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while offsets.last() != Some(&6) {
            let event = tokio::time::timeout_at(deadline, client.next_event())
                .await
                .expect("events within 10 s")
                .expect("client running");
            match event {
                Event::Message { position, .. } => offsets.push(position.unwrap().offset),
                Event::Migrated { from, to, .. } => migrated = Some((from, to)),
                Event::Disconnected { .. } | Event::FailedOver { .. } => {
                    panic!("a migration is not a disconnection: {event:?}")
                }
                _ => {}
            }
        }
        assert_eq!(offsets, [1, 2, 3, 4, 5, 6], "each once, in order");
        assert_eq!(migrated, Some((a_url, b_url)));
        tokio::time::timeout(Duration::from_secs(5), old)
            .await
            .expect("the old connection ends")
            .unwrap();
        let _new = new.await.unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "b subscribed at 5",
                "a sends 4 and 5",
                "a closed by the client"
            ],
            "the old connection is closed once it caught up with the new one, not before"
        );
        client.close().await;
    }
}
