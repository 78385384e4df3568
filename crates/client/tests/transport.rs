//! The client's transports against real nodes of this process on 127.0.0.1–3, each behind a
//! small proxy of this test that forwards plain HTTP and, while told to, answers every WebSocket
//! upgrade with `403`, as a network that refuses upgrades does. The nodes advertise the proxies'
//! addresses, so every connection of the client goes through one.
//!
//! A client that meets refused upgrades streams over event streams (`GET /sse`); when its node is
//! killed it fails over over event streams again, or over a WebSocket once upgrades pass again;
//! either way each acknowledged message arrives exactly once, in order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use streamfarm_client::{Client, ClientOptions, Event, ServiceAddress, Transport, Transports};
use streamfarm_node::{NodeConfig, NodeHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const TOPIC: &str = "fallback";
const NODES: u8 = 3;
/// Longest request head the proxy reads.
const MAX_HEAD: usize = 16 * 1024;

/// Forwards connections to a node; answers WebSocket upgrades with `403` while `refusing`.
struct Proxy {
    addr: SocketAddr,
    refused: Arc<AtomicU64>,
    /// The accept loop and every forwarded connection: aborting them cuts the node off at once.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Serves `listener`, forwarding to `node`.
    fn start(listener: TcpListener, node: SocketAddr, refusing: Arc<AtomicBool>) -> Proxy {
        let addr = listener.local_addr().unwrap();
        let refused = Arc::new(AtomicU64::new(0));
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (refusing, refused, tasks) = (refusing.clone(), refused.clone(), tasks.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let connection = tokio::spawn(forward(
                        client,
                        node,
                        refusing.load(Ordering::SeqCst),
                        refused.clone(),
                    ));
                    tasks.lock().unwrap().push(connection);
                }
            }
        });
        tasks.lock().unwrap().push(accept);
        Proxy {
            addr,
            refused,
            tasks,
        }
    }

    /// Cuts every connection and stops accepting: the node behind is gone for clients.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// One proxied connection: the request head, then `403` for an upgrade when refusing, or both
/// directions copied to the node.
async fn forward(mut client: TcpStream, node: SocketAddr, refusing: bool, refused: Arc<AtomicU64>) {
    let mut head = Vec::new();
    let read_head = async {
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = client.read(&mut buf).await.ok()?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    if timeout(Duration::from_secs(5), read_head)
        .await
        .ok()
        .flatten()
        .is_none()
    {
        return;
    }
    let upgrade = String::from_utf8_lossy(&head)
        .to_ascii_lowercase()
        .contains("upgrade: websocket");
    if refusing && upgrade {
        refused.fetch_add(1, Ordering::SeqCst);
        let answer = "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let _ = client.write_all(answer.as_bytes()).await;
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(node).await else {
        return;
    };
    if upstream.write_all(&head).await.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

struct Farm {
    /// `None` once killed.
    nodes: Vec<Option<NodeHandle>>,
    proxies: Vec<Proxy>,
    /// Whether the proxies refuse upgrades (for connections they accept from now on).
    refusing: Arc<AtomicBool>,
}

impl Farm {
    async fn start(refusing: bool) -> Farm {
        let refusing = Arc::new(AtomicBool::new(refusing));
        let mut nodes = Vec::new();
        let mut proxies = Vec::new();
        for i in 1..=NODES {
            let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, i], 0)))
                .await
                .unwrap();
            let public = listener.local_addr().unwrap();
            let mut config = NodeConfig::new(format!("n{i}"));
            config.listen = SocketAddr::from(([127, 0, 0, i], 0));
            config.url = Some(format!("ws://{public}/stream"));
            config.join = nodes
                .first()
                .and_then(Option::as_ref)
                .map(|n: &NodeHandle| n.gossip_addr().to_string())
                .into_iter()
                .collect();
            config.gossip_interval_ms = 50;
            config.failure_timeout_ms = 1_000;
            config.heartbeat_interval_ms = 300;
            config.heartbeat_timeout_ms = 1_000;
            config.shutdown_drain_ms = 100;
            let node = NodeHandle::start(config).await.expect("node starts");
            proxies.push(Proxy::start(listener, node.listen_addr(), refusing.clone()));
            nodes.push(Some(node));
        }
        let farm = Farm {
            nodes,
            proxies,
            refusing,
        };
        farm.wait_until_every_live_node_lists(NODES as usize).await;
        farm
    }

    fn service(&self) -> ServiceAddress {
        let seeds: Vec<String> = self.proxies.iter().map(|p| p.addr.to_string()).collect();
        seeds.join(",").parse().unwrap()
    }

    /// Waits until every live node lists exactly `up` nodes `UP`.
    async fn wait_until_every_live_node_lists(&self, up: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let settled = self.nodes.iter().flatten().all(|n| {
                let list = n.farm().borrow().clone();
                list.servers
                    .iter()
                    .filter(|s| s.status.as_str() == "UP")
                    .count()
                    == up
            });
            if settled {
                return;
            }
            assert!(Instant::now() < deadline, "the farm did not settle");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the node whose advertised url is `url`: its proxy cuts every connection at once,
    /// and the node stops.
    fn kill(&mut self, url: &str) {
        let i = self
            .nodes
            .iter()
            .position(|n| n.as_ref().is_some_and(|n| n.url() == url))
            .unwrap_or_else(|| panic!("no live node at {url}"));
        self.proxies[i].cut();
        self.nodes[i] = None;
    }

    fn refused_upgrades(&self) -> u64 {
        self.proxies
            .iter()
            .map(|p| p.refused.load(Ordering::SeqCst))
            .sum()
    }
}

/// Publishes numbered messages through the farm's live nodes: each attempt gets a new number,
/// and the numbers a node acknowledged are kept.
struct Publisher {
    next: u64,
    acked: Vec<u64>,
}

impl Publisher {
    async fn publish(&mut self, farm: &Farm, count: usize) {
        for _ in 0..count {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                self.next += 1;
                let n = self.next;
                let text = n.to_string();
                let mut acked = false;
                for node in farm.nodes.iter().flatten() {
                    let published = timeout(Duration::from_secs(3), node.publish(TOPIC, &text));
                    if matches!(published.await, Ok(Ok(_))) {
                        acked = true;
                        break;
                    }
                }
                if acked {
                    self.acked.push(n);
                    break;
                }
                assert!(Instant::now() < deadline, "no node acknowledged a publish");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What the client saw.
#[derive(Debug, Default)]
struct Seen {
    numbers: Vec<u64>,
    /// Every `Connected` event: server and transport.
    connected: Vec<(String, Transport)>,
    gaps: usize,
}

struct Subscriber {
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

fn subscriber(farm: &Farm, transports: Transports) -> Subscriber {
    let options = ClientOptions::new()
        .subscribe([TOPIC])
        .seed(7)
        .transports(transports)
        .connect_timeout(Duration::from_millis(800));
    let mut client = Client::start(farm.service(), options);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(event) = client.next_event().await {
            let mut seen = recorder.lock().unwrap();
            match event {
                Event::Message { payload, .. } => {
                    let n = String::from_utf8_lossy(&payload).parse().expect("a number");
                    seen.numbers.push(n);
                }
                Event::Connected { server, transport } => seen.connected.push((server, transport)),
                Event::Gap { .. } => seen.gaps += 1,
                _ => {}
            }
        }
    });
    Subscriber { seen, task }
}

impl Subscriber {
    /// Waits until `check` holds of what the client saw.
    async fn wait_for(&self, what: &str, check: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !check(&self.seen.lock().unwrap()) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within 15 s; saw {:?}",
                self.seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The connection it holds now: its server and transport.
    fn connection(&self) -> (String, Transport) {
        self.seen
            .lock()
            .unwrap()
            .connected
            .last()
            .cloned()
            .expect("connected")
    }

    /// Every acknowledged number arrived once, in order, and nothing else twice.
    async fn received_exactly(&self, acked: &[u64]) {
        let last = *acked.last().expect("something published");
        self.wait_for("the last acknowledged message", |s| {
            s.numbers.contains(&last)
        })
        .await;
        let seen = self.seen.lock().unwrap();
        assert_eq!(seen.gaps, 0, "{seen:?}");
        assert!(
            seen.numbers.windows(2).all(|w| w[0] < w[1]),
            "duplicated or out of order: {:?}",
            seen.numbers
        );
        let lost: Vec<u64> = acked
            .iter()
            .filter(|n| !seen.numbers.contains(n))
            .copied()
            .collect();
        assert!(lost.is_empty(), "lost {lost:?} of {:?}", seen.numbers);
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_upgrades_are_refused_gets_its_first_message_over_an_event_stream() {
    let farm = Farm::start(true).await;
    let client = subscriber(&farm, Transports::Auto);
    client
        .wait_for("connected", |s| !s.connected.is_empty())
        .await;
    let (_, transport) = client.connection();
    assert_eq!(transport, Transport::EventStream);
    assert!(
        farm.refused_upgrades() > 0,
        "a WebSocket was not tried first"
    );
    let mut publisher = Publisher {
        next: 0,
        acked: Vec::new(),
    };
    publisher.publish(&farm, 1).await;
    client.received_exactly(&publisher.acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_websocket_does_not_fall_back() {
    let farm = Farm::start(true).await;
    let client = subscriber(&farm, Transports::WebSocket);
    // Every proxy refuses it, again and again: it never connects.
    let deadline = Instant::now() + Duration::from_secs(10);
    while farm.refused_upgrades() < 2 * NODES as u64 {
        assert!(Instant::now() < deadline, "the client stopped trying");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(client.seen.lock().unwrap().connected.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_an_event_stream_loses_and_repeats_nothing() {
    let mut farm = Farm::start(true).await;
    let client = subscriber(&farm, Transports::Auto);
    client
        .wait_for("connected", |s| !s.connected.is_empty())
        .await;
    let mut publisher = Publisher {
        next: 0,
        acked: Vec::new(),
    };
    publisher.publish(&farm, 20).await;
    let (server, transport) = client.connection();
    assert_eq!(transport, Transport::EventStream);
    farm.kill(&server);
    // Published while the client is failing over: it resumes them from its position.
    publisher.publish(&farm, 20).await;
    client
        .wait_for("connected again", |s| s.connected.len() >= 2)
        .await;
    let (again, transport) = client.connection();
    assert_ne!(again, server);
    assert_eq!(transport, Transport::EventStream);
    publisher.publish(&farm, 20).await;
    client.received_exactly(&publisher.acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_allowed_again_move_the_client_to_a_websocket_at_its_next_failover() {
    let mut farm = Farm::start(true).await;
    let client = subscriber(&farm, Transports::Auto);
    client
        .wait_for("connected", |s| !s.connected.is_empty())
        .await;
    let mut publisher = Publisher {
        next: 0,
        acked: Vec::new(),
    };
    publisher.publish(&farm, 20).await;
    let (server, transport) = client.connection();
    assert_eq!(transport, Transport::EventStream);
    farm.refusing.store(false, Ordering::SeqCst);
    farm.kill(&server);
    publisher.publish(&farm, 20).await;
    client
        .wait_for("connected again", |s| s.connected.len() >= 2)
        .await;
    let (again, transport) = client.connection();
    assert_ne!(again, server);
    assert_eq!(transport, Transport::WebSocket);
    publisher.publish(&farm, 20).await;
    client.received_exactly(&publisher.acked).await;
}
