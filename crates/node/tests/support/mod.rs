//! What the abuse tests share: nodes on 127.0.0.x, clients, a control subscriber.
#![allow(dead_code, unreachable_pub)]

pub mod nats;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use streamfarm_core::Status;
use streamfarm_core::protocol::{ClientFrame, ServerFrame};
use streamfarm_node::{NodeConfig, NodeHandle};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const SECRET: &str = "abuse-test-farm-secret-0123456789";

/// A test node on `ip`, port 0, fast timers, with the farm secret when `secret` is given.
pub fn config(name: &str, ip: [u8; 4], join: &[SocketAddr], secret: Option<&str>) -> NodeConfig {
    let mut config = NodeConfig::new(name);
    config.listen = SocketAddr::from((ip, 0));
    config.join = join.iter().map(|a| a.to_string()).collect();
    config.gossip_interval_ms = 50;
    config.failure_timeout_ms = 1_000;
    config.shutdown_drain_ms = 100;
    config.farm_secret = secret.map(|s| s.to_string().into());
    config
}

pub async fn start(config: NodeConfig) -> NodeHandle {
    NodeHandle::start(config).await.expect("node starts")
}

/// Two nodes `a` (127.0.0.1) and `b` (127.0.0.2) sharing the farm secret, both listed UP by both.
pub async fn two_nodes(tweak: impl Fn(&mut NodeConfig)) -> (NodeHandle, NodeHandle) {
    let mut a = config("a", [127, 0, 0, 1], &[], Some(SECRET));
    tweak(&mut a);
    let a = start(a).await;
    let mut b = config("b", [127, 0, 0, 2], &[a.gossip_addr()], Some(SECRET));
    tweak(&mut b);
    let b = start(b).await;
    for node in [&a, &b] {
        let farm = node.farm();
        eventually(Duration::from_secs(10), "a and b UP", || {
            let list = farm.borrow();
            ["a", "b"]
                .iter()
                .all(|n| status(&list, n) == Some(Status::Up))
        })
        .await;
    }
    (a, b)
}

pub fn status(list: &streamfarm_core::FarmList, name: &str) -> Option<Status> {
    list.servers
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.status)
}

/// Polls `check` until it holds; fails the test after `within`.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

pub async fn send(ws: &mut Ws, frame: &ClientFrame) {
    ws.send(Message::text(serde_json::to_string(frame).unwrap()))
        .await
        .expect("send");
}

/// Next server frame within 5 s, answering pings.
pub async fn next_frame(ws: &mut Ws) -> ServerFrame {
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

/// A client of `node` subscribed to `topic`, its `subscribed` frame read.
pub async fn subscriber(node: &NodeHandle, topic: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(node.url())
        .await
        .expect("connects");
    send(
        &mut ws,
        &ClientFrame::Sub {
            topics: vec![topic.into()],
            positions: Default::default(),
        },
    )
    .await;
    loop {
        if let ServerFrame::Subscribed { .. } = next_frame(&mut ws).await {
            return ws;
        }
    }
}

/// What a control subscriber keeps of a message: its first 24 characters (so that a test with
/// large messages does not measure its own copies of them).
pub fn short(data: &str) -> String {
    data.chars().take(24).collect()
}

/// A control subscriber: reads every message of its topic in a task; `finish` checks it got
/// exactly `expected`, in order.
pub struct Control {
    got: tokio::sync::watch::Receiver<Vec<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Control {
    pub async fn on(node: &NodeHandle, topic: &str) -> Control {
        let mut ws = subscriber(node, topic).await;
        let (tx, got) = tokio::sync::watch::channel(Vec::new());
        let task = tokio::spawn(async move {
            while let Some(Ok(message)) = ws.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                match serde_json::from_str::<ServerFrame>(&text) {
                    Ok(ServerFrame::Msg { data, .. }) => {
                        tx.send_modify(|got| got.push(short(&data)))
                    }
                    Ok(ServerFrame::Ping { id }) => {
                        let pong = serde_json::to_string(&ClientFrame::Pong { id }).unwrap();
                        if ws.send(Message::text(pong)).await.is_err() {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        });
        Control { got, task }
    }

    /// Waits (10 s at most) until it has `count` messages.
    pub async fn has(&mut self, count: usize) {
        timeout(
            Duration::from_secs(10),
            self.got.wait_for(|got| got.len() >= count),
        )
        .await
        .expect("the control subscriber keeps up")
        .expect("control task alive");
    }

    /// Messages received so far.
    pub fn count(&self) -> usize {
        self.got.borrow().len()
    }

    /// Waits (10 s at most) until the last messages received are `expected`, in order.
    pub async fn finish_ending_with(mut self, expected: &[String]) {
        let waited = timeout(
            Duration::from_secs(10),
            self.got.wait_for(|got| got.ends_with(expected)),
        )
        .await
        .map(|_| ());
        let got = self.got.borrow().clone();
        assert!(
            waited.is_ok(),
            "control subscriber got {got:?}, expected to end with {expected:?}"
        );
        self.task.abort();
    }

    /// Waits (10 s at most) for exactly `expected`, in order.
    pub async fn finish(mut self, expected: &[String]) {
        let waited = timeout(
            Duration::from_secs(10),
            self.got.wait_for(|got| got.len() >= expected.len()),
        )
        .await
        .map(|_| ());
        let got = self.got.borrow().clone();
        assert!(
            waited.is_ok(),
            "control subscriber got {} of {} messages",
            got.len(),
            expected.len()
        );
        assert_eq!(got, expected, "the control subscriber missed nothing");
        self.task.abort();
    }
}

/// Publishes `count` messages `prefix-i` on `node`, one at a time.
pub async fn publish(node: &NodeHandle, topic: &str, prefix: &str, count: usize) -> Vec<String> {
    let mut sent = Vec::new();
    for i in 0..count {
        let message = format!("{prefix}-{i}");
        node.publish(topic, &message).await.expect("published");
        sent.push(message);
    }
    sent
}

pub fn relay_url(node: &NodeHandle, as_name: &str) -> String {
    format!("ws://{}/internal/relay?node={as_name}", node.listen_addr())
}

/// Reads what an outsider's relay link gets until it closes (5 s at most): every text frame,
/// and the close code.
pub async fn outsider_reads(ws: &mut Ws) -> (Vec<String>, Option<u16>) {
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return (frames, None),
            Ok(Some(Ok(Message::Text(text)))) => frames.push(text.to_string()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return (frames, frame.map(|f| f.code.into()));
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return (frames, None),
        }
    }
}
