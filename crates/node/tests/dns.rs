//! A node with its DNS responder under a flood: the WebSocket clients of that node keep receiving
//! what is published, and the responder answers again once the flood is over.

use std::net::{SocketAddr, TcpStream as StdTcpStream, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use streamfarm_core::protocol::{ClientFrame, ServerFrame};
use streamfarm_node::{NodeConfig, NodeHandle};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SERVICE: &str = "farm.test";
const MESSAGES: usize = 50;

/// A DNS query for `farm.test A` with this id, built by hand (RFC 1035 4.1).
fn query(id: u16) -> Vec<u8> {
    let mut packet = Vec::with_capacity(32);
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in SERVICE.split('.') {
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.extend_from_slice(&[0, 0, 1, 0, 1]); // root; type A; class IN
    packet
}

/// Asks `farm.test A` once; the number of answers when a NOERROR answer to our id came back.
async fn answer_count(dns: SocketAddr) -> Option<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    socket.send_to(&query(0x4242), dns).await.ok()?;
    let mut buffer = [0u8; 1024];
    let len = timeout(Duration::from_millis(500), socket.recv(&mut buffer))
        .await
        .ok()?
        .ok()?;
    let answer = &buffer[..len];
    let is_ours = len >= 12 && answer[..2] == [0x42, 0x42] && answer[2] & 0x80 != 0;
    (is_ours && answer[3] & 0x0f == 0).then(|| u16::from_be_bytes([answer[6], answer[7]]))
}

async fn subscriber(node: &NodeHandle, topic: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(node.url())
        .await
        .expect("connects");
    let sub = ClientFrame::Sub {
        positions: Default::default(),
        topics: vec![topic.into()],
    };
    ws.send(Message::text(serde_json::to_string(&sub).unwrap()))
        .await
        .unwrap();
    loop {
        if let ServerFrame::Subscribed { .. } = next_frame(&mut ws).await {
            return ws;
        }
    }
}

/// The next frame, answering pings on the way.
async fn next_frame(ws: &mut Ws) -> ServerFrame {
    loop {
        let message = timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("stream open")
            .expect("no error");
        if let Message::Text(text) = message {
            let frame: ServerFrame = serde_json::from_str(&text).expect("valid frame");
            if let ServerFrame::Ping { id } = frame {
                let pong = serde_json::to_string(&ClientFrame::Pong { id }).unwrap();
                ws.send(Message::text(pong)).await.unwrap();
                continue;
            }
            return frame;
        }
    }
}

/// Sends queries (and every tenth packet noise) at `dns` from its own OS thread, as an outside
/// attacker would, until `stop`; counts the packets sent.
fn blaster(
    dns: SocketAddr,
    seed: u16,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        let noise: Vec<u8> = (0..40u16)
            .map(|i| (i.wrapping_mul(37) ^ seed) as u8)
            .collect();
        let mut i: u16 = 0;
        while !stop.load(Ordering::Relaxed) {
            i = i.wrapping_add(1);
            let packet = if i.is_multiple_of(10) {
                noise.clone()
            } else {
                query(i ^ seed)
            };
            if socket.send_to(&packet, dns).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_flood_does_not_stop_the_nodes_streams() {
    let mut config = NodeConfig::new("solo");
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.dns = Some("127.0.0.1:0".parse().unwrap());
    config.service_name = Some(SERVICE.into());
    config.shutdown_drain_ms = 100;
    let node = NodeHandle::start(config).await.expect("node starts");
    let dns = node.dns_addr().expect("DNS configured");
    assert_eq!(
        answer_count(dns).await,
        Some(1),
        "the node answers for itself"
    );

    let mut ws = subscriber(&node, "prices").await;

    // The flood: two threads of queries and noise, and a pile of idle TCP connections.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let blasters: Vec<_> = (0..2)
        .map(|seed| blaster(dns, seed, stop.clone(), sent.clone()))
        .collect();
    let idle: Vec<StdTcpStream> = (0..100)
        .map(|_| StdTcpStream::connect(dns).expect("TCP connect"))
        .collect();

    // Publish over HTTP during the flood; every message must reach the WebSocket client.
    let http = reqwest::Client::new();
    for i in 0..MESSAGES {
        let response = http
            .post(format!("http://{}/publish/prices", node.listen_addr()))
            .body(format!("m{i}"))
            .send()
            .await
            .expect("publish during the flood");
        assert!(response.status().is_success());
        loop {
            match next_frame(&mut ws).await {
                ServerFrame::Msg { topic, data, .. } => {
                    assert_eq!(
                        (topic.as_str(), data.as_str()),
                        ("prices", format!("m{i}").as_str())
                    );
                    break;
                }
                _ => continue,
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for blaster in blasters {
        blaster.join().unwrap();
    }
    eprintln!(
        "{MESSAGES} messages delivered while {} DNS packets were sent at the node",
        sent.load(Ordering::Relaxed)
    );
    assert!(sent.load(Ordering::Relaxed) > 0);
    drop(idle);

    // The responder is still there once the flood is over.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answer_count(dns).await != Some(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "DNS answers again after the flood"
        );
    }
    node.shutdown().await;
}
