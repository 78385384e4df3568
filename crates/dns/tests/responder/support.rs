//! Shared helpers: a farm of three servers on 127.0.0.1/.2/.3, a responder over it, a resolver
//! aimed at it, and a raw client for hand-made packets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use streamfarm_core::{FarmList, ServerEntry, Status};
use streamfarm_dns::{DnsConfig, DnsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;

/// The zone every test serves.
pub(crate) const SERVICE: &str = "farm.test";

/// How long any single exchange may take before the test fails.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a change of the farm list may take to show in answers.
pub(crate) const CHANGE_DEADLINE: Duration = Duration::from_secs(5);

/// `127.0.0.N`.
pub(crate) fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// Servers a, b, c on 127.0.0.1, .2, .3 (port 7400), all UP, all in group A.
pub(crate) fn farm3() -> FarmList {
    FarmList::new(
        ["a", "b", "c"]
            .iter()
            .zip(1u8..)
            .map(|(name, n)| {
                ServerEntry::new(
                    *name,
                    format!("ws://{}:7400/stream", ip(n)),
                    Status::Up,
                    10,
                    "A",
                )
            })
            .collect(),
    )
}

/// A responder on 127.0.0.1:0 for [`SERVICE`] over `list`, and the sender that changes the list.
pub(crate) async fn start(list: FarmList) -> (DnsServer, watch::Sender<FarmList>) {
    let (farm_tx, farm_rx) = watch::channel(list);
    let config = DnsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        service_name: SERVICE.to_string(),
        ttl: Duration::from_secs(2),
    };
    let server = DnsServer::start(config, farm_rx)
        .await
        .expect("responder starts");
    (server, farm_tx)
}

/// Which transport a resolver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// A hickory resolver that asks only `server`, over `transport`, and caches nothing (so that
/// every lookup reaches the responder and rotation shows).
pub(crate) fn resolver(server: SocketAddr, transport: Transport) -> TokioResolver {
    let mut name_server = match transport {
        Transport::Udp => NameServerConfig::udp(server.ip()),
        Transport::Tcp => NameServerConfig::tcp(server.ip()),
    };
    for connection in &mut name_server.connections {
        connection.port = server.port();
    }
    let mut options = ResolverOpts::default();
    options.cache_size = 0;
    options.positive_max_ttl = Some(Duration::ZERO);
    options.negative_max_ttl = Some(Duration::ZERO);
    options.timeout = EXCHANGE_TIMEOUT;
    options.attempts = 1;
    TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![name_server]),
        TokioRuntimeProvider::default(),
    )
    .with_options(options)
    .build()
    .expect("resolver builds")
}

/// The A records the resolver gets for `name`, in answer order.
pub(crate) async fn resolve_a(resolver: &TokioResolver, name: &str) -> Vec<Ipv4Addr> {
    let lookup = tokio::time::timeout(EXCHANGE_TIMEOUT, resolver.lookup(name, RecordType::A))
        .await
        .expect("lookup in time")
        .unwrap_or_else(|e| panic!("lookup {name} A: {e}"));
    lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// A query message for `name`/`record_type` with this id, encoded.
pub(crate) fn query_bytes(id: u16, name: &str, record_type: RecordType) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    message.to_vec().unwrap()
}

/// Sends `bytes` over UDP and waits up to `wait` for one answer.
pub(crate) async fn udp_exchange(
    server: SocketAddr,
    bytes: &[u8],
    wait: Duration,
) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, server).await.unwrap();
    let mut buffer = vec![0u8; 65_535];
    let len = tokio::time::timeout(wait, socket.recv(&mut buffer))
        .await
        .ok()?
        .ok()?;
    Some(Message::from_vec(&buffer[..len]).expect("the responder sends well-formed answers"))
}

/// Asks `name`/`record_type` over UDP; fails the test when there is no answer.
pub(crate) async fn ask_udp(server: SocketAddr, name: &str, record_type: RecordType) -> Message {
    udp_exchange(
        server,
        &query_bytes(0x5f5f, name, record_type),
        EXCHANGE_TIMEOUT,
    )
    .await
    .unwrap_or_else(|| panic!("no UDP answer for {name} {record_type}"))
}

/// Asks `name`/`record_type` over a new TCP connection (two-byte length prefix, RFC 1035 4.2.2).
pub(crate) async fn ask_tcp(server: SocketAddr, name: &str, record_type: RecordType) -> Message {
    let exchange = async {
        let mut stream = TcpStream::connect(server).await.unwrap();
        let bytes = query_bytes(0x7a7a, name, record_type);
        let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
        stream.write_all(&len).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut buffer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buffer).await.unwrap();
        Message::from_vec(&buffer).unwrap()
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no TCP answer for {name} {record_type}"))
}

/// The addresses in a message's answer section, in order.
pub(crate) fn answer_ips(message: &Message) -> Vec<IpAddr> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// `items` rotated left by one.
pub(crate) fn rotate_left<T: Clone>(items: &[T]) -> Vec<T> {
    let mut rotated = items.to_vec();
    if !rotated.is_empty() {
        rotated.rotate_left(1);
    }
    rotated
}

/// Polls `check` every 50 ms until it returns true or `deadline` passes.
pub(crate) async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "not within {deadline:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
