//! Membership against real gossip on loopback sockets: a dying gossip task restarted as a new
//! generation, the own entry's counts and join rate, a peer's entry read from its keys.

use super::*;
use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, UdpTransport};

/// Real UDP whose sockets the test can break: once a socket's token is cancelled, its `recv`
/// fails the way a broken socket does (chitchat's gossip task then ends).
#[derive(Default)]
struct BreakableUdp {
    opened: std::sync::Mutex<Vec<CancellationToken>>,
}

impl BreakableUdp {
    fn opened(&self) -> Vec<CancellationToken> {
        self.opened.lock().unwrap().clone()
    }
}

struct Breakable {
    inner: Box<dyn Socket>,
    broken: CancellationToken,
}

#[async_trait]
impl Transport for BreakableUdp {
    async fn open(&self, addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = UdpTransport.open(addr).await?;
        let broken = CancellationToken::new();
        self.opened.lock().unwrap().push(broken.clone());
        Ok(Box::new(Breakable { inner, broken }))
    }
}

#[async_trait]
impl Socket for Breakable {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.inner.send(to, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        tokio::select! {
            _ = self.broken.cancelled() => Err(anyhow::anyhow!("injected: socket broken")),
            received = self.inner.recv() => received,
        }
    }
}

/// A free UDP address on loopback (bound, then released for chitchat to bind).
fn free_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

struct TestNode {
    metrics: Arc<Metrics>,
    status: watch::Sender<Status>,
    farm: watch::Receiver<FarmList>,
}

async fn node(
    name: &str,
    addr: SocketAddr,
    join: Option<SocketAddr>,
    transport: Arc<dyn Transport>,
    cancel: &CancellationToken,
) -> TestNode {
    let mut config = NodeConfig::new(name);
    config.join = join.iter().map(ToString::to_string).collect();
    config.gossip_interval_ms = 50;
    config.failure_timeout_ms = 1_000;
    let me = SelfInfo {
        name: name.into(),
        url: format!("ws://{addr}/stream"),
        relay_url: format!("ws://{addr}/internal/relay"),
        priority: "A".into(),
        capacity: 10,
    };
    let metrics = Arc::new(Metrics::default());
    let (status, status_rx) = watch::channel(Status::Up);
    let (farm_tx, farm) = watch::channel(FarmList::new(Vec::new()));
    let run = Loop {
        setup: GossipSetup {
            me,
            addr,
            transport,
            config: config.clone(),
        },
        metrics: metrics.clone(),
        hub: Arc::new(Hub::new(metrics.clone(), config.history_limits())),
        status_rx,
        farm_tx,
        members_tx: watch::channel(0).0,
        peers_tx: watch::channel(Peers::default()).0,
        gossip_interval: config.gossip_interval(),
        failure_timeout: config.failure_timeout(),
        alone: join.is_none(),
        isolated_tx: watch::channel(false).0,
        link_ends: Arc::default(),
    }
    .start(cancel.clone())
    .await
    .expect("gossip starts");
    tokio::spawn(run);
    TestNode {
        metrics,
        status,
        farm,
    }
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn listed(farm: &watch::Receiver<FarmList>, name: &str) -> Option<Status> {
    let list = farm.borrow();
    list.servers
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_that_dies_is_reported_and_restarted_as_a_new_generation() {
    let cancel = CancellationToken::new();
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let udp = Arc::new(BreakableUdp::default());
    let b = node("b", b_addr, None, Arc::new(UdpTransport), &cancel).await;
    let a = node("a", a_addr, Some(b_addr), udp.clone(), &cancel).await;
    until("b lists a UP", || listed(&b.farm, "a") == Some(Status::Up)).await;
    assert_eq!(a.metrics.gossip_up.load(Ordering::Relaxed), 1);

    udp.opened()[0].cancel();
    until("a's gossip restarted", || {
        a.metrics.gossip_failures.load(Ordering::Relaxed) == 1
            && a.metrics.gossip_up.load(Ordering::Relaxed) == 1
            && udp.opened().len() == 2
    })
    .await;
    // Only the new generation can carry news now: b hears it.
    a.status.send_replace(Status::Draining);
    until("b lists a DRAINING", || {
        listed(&b.farm, "a") == Some(Status::Draining)
    })
    .await;
    assert_eq!(b.metrics.gossip_up.load(Ordering::Relaxed), 1);
    cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn own_count_is_listed_as_of_the_peers_instant() {
    let start = Instant::now();
    let counts: VecDeque<(Instant, u64)> = (0..10)
        .map(|k| (start + Duration::from_millis(50 * k), 100 * k))
        .collect();
    let now = start + Duration::from_millis(450);
    let peer = |age| {
        let mut s = ServerEntry::new("p", "ws://p/", Status::Up, 0, "A");
        s.users_age_ms = Some(age);
        s
    };
    // Peers 90, 120 and 400 ms old: the median, 120 ms, falls between the samples of 400
    // and 300 ms ago; the newest count at least that old is the one of 150 ms ago.
    let list = [peer(90), peer(120), peer(400)];
    assert_eq!(
        own_count_as_of(&counts, &list, now),
        (600, Duration::from_millis(150))
    );
    // No live peer: the count of now.
    assert_eq!(own_count_as_of(&counts, &[], now), (900, Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn join_rate_counts_recent_arrivals_per_second() {
    let mut samples = VecDeque::new();
    let start = Instant::now();
    assert_eq!(join_rate(&mut samples, start, 0), 0.0);
    assert_eq!(
        join_rate(&mut samples, start + Duration::from_secs(2), 20),
        10.0
    );
    // Old samples leave the window.
    assert_eq!(
        join_rate(&mut samples, start + Duration::from_secs(8), 20),
        0.0
    );
}

#[test]
fn peer_entry_reads_every_key() {
    let entry = Entry {
        heartbeat: 3,
        url: Some("ws://b/stream".into()),
        status: Some("DRAINING".into()),
        users: Some("12".into()),
        sse_users: Some("5".into()),
        priority: Some("B".into()),
        capacity: Some("100".into()),
        join_rate: Some("1.5".into()),
        relay: None,
    };
    let server = entry.server("b").unwrap();
    assert_eq!(server.status, Status::Draining);
    assert_eq!(server.users, 12);
    assert_eq!(server.extra["sse_users"], 5);
    assert_eq!(server.priority, "B");
    assert_eq!(server.capacity, Some(100));
    assert_eq!(server.join_rate, Some(1.5));
    let no_url = Entry { url: None, ..entry };
    assert!(no_url.server("b").is_none());
}
