//! The client's driver over real sockets, against scripted stand-in nodes that speak the
//! protocol of `streamfarm_core::protocol` and can be killed, hung or told to close with a code.
//! (Tests against real `streamfarm serve` nodes are in the CLI crate.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use streamfarm_client::{ClientOptions, Event, LossCause, RetryMode, ServiceAddress};
use streamfarm_core::protocol::{ClientFrame, ServerFrame};
use streamfarm_core::{FarmList, ServerEntry, Status};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

mod support;
use support::eventually;

/// What the stand-in node's connections are told to do.
#[derive(Debug, Clone)]
enum Control {
    Publish {
        topic: String,
        data: String,
    },
    Close(u16),
    /// Stop reading and writing, keep the socket: a SIGSTOPped process.
    Hang,
}

struct FakeNode {
    url: String,
    addr: SocketAddr,
    control: broadcast::Sender<Control>,
    accepted: Arc<AtomicUsize>,
    /// `list` requests answered.
    lists: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FakeNode {
    async fn start(ip: &str, farm: Arc<Mutex<FarmList>>) -> FakeNode {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("ws://{addr}/stream");
        let (control, _) = broadcast::channel(64);
        let accepted = Arc::new(AtomicUsize::new(0));
        let lists = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (url, control, accepted, lists) = (
                url.clone(),
                control.clone(),
                accepted.clone(),
                lists.clone(),
            );
            async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let rx = control.subscribe();
                    let served = (farm.clone(), lists.clone());
                    connections.spawn(serve(stream, url.clone(), served, rx));
                }
            }
        });
        FakeNode {
            url,
            addr,
            control,
            accepted,
            lists,
            task,
        }
    }

    fn send(&self, control: Control) {
        let _ = self.control.send(control);
    }

    /// Every connection and the listener gone at once, like a SIGKILL.
    fn kill(&self) {
        self.task.abort();
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(
    stream: tokio::net::TcpStream,
    url: String,
    (farm, lists): (Arc<Mutex<FarmList>>, Arc<AtomicUsize>),
    mut control: broadcast::Receiver<Control>,
) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let send = |frame: ServerFrame| Message::text(serde_json::to_string(&frame).unwrap());
    let hello = ServerFrame::Hello {
        server: url.clone(),
        url: url.clone(),
        status: Status::Up,
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 1000,
        max_frame_bytes: 65536,
    };
    let list = farm.lock().unwrap().clone();
    if ws.send(send(hello)).await.is_err() || ws.send(send(ServerFrame::Farm(list))).await.is_err()
    {
        return;
    }
    let mut topics: Vec<String> = Vec::new();
    // Whether the connection has set up its watch of the list.
    let mut watching = false;
    loop {
        tokio::select! {
            message = ws.next() => {
                let Some(Ok(Message::Text(text))) = message else { return };
                match serde_json::from_str::<ClientFrame>(text.as_str()) {
                    Ok(ClientFrame::Sub { topics: new, .. }) => {
                        topics.extend(new.iter().cloned());
                        let subscribed = ServerFrame::Subscribed { topics: new, positions: Default::default() };
                        let _ = ws.send(send(subscribed)).await;
                    }
                    Ok(ClientFrame::Ping { id }) => {
                        let _ = ws.send(send(ServerFrame::Pong { id })).await;
                    }
                    Ok(ClientFrame::List { watch, .. }) => {
                        let list = farm.lock().unwrap().clone();
                        // Counted: the requests of a refresh, not the list a client chooses from nor
                        // the watch set up on connecting.
                        if watch && watching {
                            lists.fetch_add(1, Ordering::SeqCst);
                        }
                        watching |= watch;
                        let _ = ws.send(send(ServerFrame::Farm(list))).await;
                    }
                    _ => {}
                }
            }
            control = control.recv() => match control {
                Ok(Control::Publish { topic, data }) if topics.contains(&topic) => {
                    // These stand-ins are nodes without positions: messages carry none.
                    let msg = ServerFrame::Msg { topic, data, encoding: Default::default(), epoch: None, offset: None, ts: None };
                    let _ = ws.send(send(msg)).await;
                }
                Ok(Control::Close(code)) => {
                    let frame = CloseFrame { code: code.into(), reason: "bye".into() };
                    let _ = ws.close(Some(frame)).await;
                    return;
                }
                Ok(Control::Hang) => {
                    std::future::pending::<()>().await;
                }
                _ => {}
            }
        }
    }
}

/// Two stand-in nodes on 127.0.0.1 and 127.0.0.2, both listed UP in group A.
async fn two_nodes() -> (FakeNode, FakeNode) {
    let farm = Arc::new(Mutex::new(FarmList::default()));
    let a = FakeNode::start("127.0.0.1", farm.clone()).await;
    let b = FakeNode::start("127.0.0.2", farm.clone()).await;
    *farm.lock().unwrap() = FarmList::new(vec![
        ServerEntry::new("a", &a.url, Status::Up, 0, "A"),
        ServerEntry::new("b", &b.url, Status::Up, 0, "A"),
    ]);
    (a, b)
}

fn seeds(a: &FakeNode, b: &FakeNode) -> ServiceAddress {
    format!("{},{}", a.addr, b.addr).parse().unwrap()
}

/// The next event that `pick` accepts, skipping others, within 5 s.
async fn expect<T>(
    client: &mut streamfarm_client::Client,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    let wait = async {
        while let Some(event) = client.next_event().await {
            if let Some(found) = pick(&event) {
                return found;
            }
        }
        panic!("client stopped before {what}");
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("no {what} within 5 s"))
}

async fn connected(client: &mut streamfarm_client::Client) -> String {
    expect(client, "connection", |e| match e {
        Event::Connected { server, .. } => Some(server.clone()),
        _ => None,
    })
    .await
}

async fn failed_over(client: &mut streamfarm_client::Client) -> (String, String, Duration) {
    expect(client, "failover", |e| match e {
        Event::FailedOver { from, to, took } => Some((from.clone(), to.clone(), *took)),
        _ => None,
    })
    .await
}

/// Publishes on the node until the client has the message (a subscription may still be in
/// flight on the node's side when the client hears `subscribed`; here it is not, but keep the
/// test honest about ordering anyway by waiting for this exact payload).
async fn message_arrives(client: &mut streamfarm_client::Client, node: &FakeNode, data: &str) {
    node.send(Control::Publish {
        topic: "t".into(),
        data: data.into(),
    });
    expect(client, "message", |e| match e {
        Event::Message { topic, payload, .. } if topic == "t" && payload == data.as_bytes() => {
            Some(())
        }
        _ => None,
    })
    .await;
}

fn node_of<'a>(url: &str, a: &'a FakeNode, b: &'a FakeNode) -> (&'a FakeNode, &'a FakeNode) {
    if url == a.url { (a, b) } else { (b, a) }
}

#[tokio::test]
async fn connects_through_a_seed_list_and_receives_messages() {
    let (a, b) = two_nodes().await;
    let mut client = ClientOptions::new()
        .subscribe(["t"])
        .seed(1)
        .start(seeds(&a, &b));
    let server = connected(&mut client).await;
    assert!(server == a.url || server == b.url);
    assert_eq!(client.server(), Some(server.clone()));
    // First contact: one list connection, kept when it is the pick, else one more dial.
    let dials = client.dials();
    assert_eq!(dials.list, 1, "{dials:?}");
    assert_eq!(dials.reused + dials.stream, 1, "{dials:?}");
    assert_eq!(a.accepted() + b.accepted(), 1 + dials.stream as usize);
    let (on, _) = node_of(&server, &a, &b);
    message_arrives(&mut client, on, "hello").await;
    client.close().await;
}

#[tokio::test]
async fn killed_server_fails_over_resubscribes_and_reports_the_gap() {
    let (a, b) = two_nodes().await;
    let mut client = ClientOptions::new()
        .subscribe(["t"])
        .seed(2)
        .start(seeds(&a, &b));
    let server = connected(&mut client).await;
    let (on, other) = node_of(&server, &a, &b);
    let (dials_before, other_before) = (client.dials(), other.accepted());
    on.kill();
    let cause = expect(&mut client, "disconnection", |e| match e {
        Event::Disconnected { cause, .. } => Some(cause.clone()),
        _ => None,
    })
    .await;
    assert!(matches!(cause, LossCause::Broken(_)), "{cause:?}");
    let (from, to, _took) = failed_over(&mut client).await;
    assert_eq!(
        (from.as_str(), to.as_str()),
        (on.url.as_str(), other.url.as_str())
    );
    // What it cost (the default, immediate re-request): one connection to the survivor, asked
    // for the list as the pick of the last list and kept; the dead server is not tried again.
    let dials = client.dials();
    assert_eq!(other.accepted() - other_before, 1, "{dials:?}");
    assert_eq!(dials.stream, dials_before.stream, "{dials:?}");
    assert_eq!(dials.stream_failed, dials_before.stream_failed, "{dials:?}");
    assert_eq!(dials.list - dials_before.list, 1, "{dials:?}");
    assert_eq!(dials.list_failed, dials_before.list_failed, "{dials:?}");
    assert_eq!(dials.reused - dials_before.reused, 1, "{dials:?}");
    message_arrives(&mut client, other, "after").await;
    client.close().await;
}

#[tokio::test]
async fn the_list_refreshed_on_heartbeats_lets_a_failover_ask_a_survivor_directly() {
    // A is alone when the client connects (through A's address only); B joins later.
    let farm = Arc::new(Mutex::new(FarmList::default()));
    let a = FakeNode::start("127.0.0.1", farm.clone()).await;
    let b = FakeNode::start("127.0.0.2", farm.clone()).await;
    let entry = |name: &str, node: &FakeNode| ServerEntry::new(name, &node.url, Status::Up, 0, "A");
    *farm.lock().unwrap() = FarmList::new(vec![entry("a", &a)]);
    let mut client = ClientOptions::new()
        .subscribe(["t"])
        .list_refresh(Some(Duration::from_millis(200)))
        .seed(9)
        .start(a.addr.to_string().parse().unwrap());
    assert_eq!(connected(&mut client).await, a.url);
    *farm.lock().unwrap() = FarmList::new(vec![entry("a", &a), entry("b", &b)]);
    // Wait until A has answered a list request made after the change.
    let asked_before = a.lists.load(Ordering::SeqCst);
    eventually(Duration::from_secs(5), "a list request", || {
        a.lists.load(Ordering::SeqCst) > asked_before
    })
    .await;
    // The answer is in flight or read; one more heartbeat round makes sure it was read.
    eventually(Duration::from_secs(5), "a second list request", || {
        a.lists.load(Ordering::SeqCst) >= asked_before + 2
    })
    .await;
    let before = client.dials();
    a.kill();
    let (from, to, _) = failed_over(&mut client).await;
    assert_eq!(
        (from.as_str(), to.as_str()),
        (a.url.as_str(), b.url.as_str())
    );
    // B came from the refreshed list: asked directly, its connection kept, the service
    // address (A's, dead) never asked for a list.
    let dials = client.dials();
    assert_eq!(dials.list - before.list, 1, "{dials:?}");
    assert_eq!(dials.list_failed, before.list_failed, "{dials:?}");
    assert_eq!(dials.reused - before.reused, 1, "{dials:?}");
    assert_eq!(b.accepted(), 1);
    message_arrives(&mut client, &b, "via the refreshed list").await;
    client.close().await;
}

#[tokio::test]
async fn reconnect_elsewhere_is_not_retried() {
    let (a, b) = two_nodes().await;
    let mut client = ClientOptions::new().seed(3).start(seeds(&a, &b));
    let server = connected(&mut client).await;
    let (on, other) = node_of(&server, &a, &b);
    let accepted_before = on.accepted();
    on.send(Control::Close(4000));
    let (from, to, _) = failed_over(&mut client).await;
    assert_eq!(
        (from.as_str(), to.as_str()),
        (on.url.as_str(), other.url.as_str())
    );
    // Neither retried nor asked for the list: the drained server saw no new connection.
    assert_eq!(on.accepted(), accepted_before);
    client.close().await;
}

#[tokio::test]
async fn retry_once_reconnects_to_the_same_server() {
    let (a, b) = two_nodes().await;
    let mut client = ClientOptions::new()
        .retry(RetryMode::RetryOnce)
        .subscribe(["t"])
        .seed(4)
        .start(seeds(&a, &b));
    let server = connected(&mut client).await;
    let (on, _) = node_of(&server, &a, &b);
    on.send(Control::Close(1011));
    let (from, to, _) = failed_over(&mut client).await;
    assert_eq!(from, to, "the retry of the same server worked");
    message_arrives(&mut client, on, "again").await;
    client.close().await;
}

#[tokio::test]
async fn immediate_mode_goes_to_another_server_at_once() {
    let (a, b) = two_nodes().await;
    let mut client = ClientOptions::new()
        .retry(RetryMode::Immediate)
        .subscribe(["t"])
        .seed(5)
        .start(seeds(&a, &b));
    let server = connected(&mut client).await;
    let (on, other) = node_of(&server, &a, &b);
    on.send(Control::Close(1011));
    let (from, to, _) = failed_over(&mut client).await;
    assert_eq!(
        (from.as_str(), to.as_str()),
        (on.url.as_str(), other.url.as_str())
    );
    message_arrives(&mut client, other, "moved").await;
    client.close().await;
}

#[tokio::test]
async fn hung_server_is_left_after_the_heartbeat_timeout() {
    let (a, b) = two_nodes().await;
    let timeout = Duration::from_millis(400);
    let mut client = ClientOptions::new()
        .heartbeat_timeout(timeout)
        .connect_timeout(Duration::from_millis(300))
        .subscribe(["t"])
        .seed(6)
        .start(seeds(&a, &b));
    let server = connected(&mut client).await;
    let (on, other) = node_of(&server, &a, &b);
    on.send(Control::Hang);
    let cause = expect(&mut client, "disconnection", |e| match e {
        Event::Disconnected { cause, .. } => Some(cause.clone()),
        _ => None,
    })
    .await;
    assert_eq!(cause, LossCause::HeartbeatTimeout);
    let (_, to, _) = failed_over(&mut client).await;
    // The retry reaches the hung node's listener, which still accepts (it is only hung for
    // existing connections here); either way the client ends up subscribed and receiving.
    let (now_on, _) = node_of(&to, &a, &b);
    if now_on.url == other.url {
        message_arrives(&mut client, other, "alive").await;
    }
    client.close().await;
}

#[tokio::test]
async fn nothing_reachable_backs_off_and_reports_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut client = ClientOptions::new()
        .seed(7)
        .start(addr.to_string().parse().unwrap());
    let (reason, delay) = expect(&mut client, "retry report", |e| match e {
        Event::Retrying { reason, delay } => Some((reason.clone(), *delay)),
        _ => None,
    })
    .await;
    assert!(reason.contains(&addr.to_string()), "{reason}");
    assert!(delay < streamfarm_client::Backoff::default().ceiling(0));
    client.close().await;
}

#[tokio::test]
async fn service_name_resolves_through_the_farm_dns_with_srv_ports() {
    let (a, b) = two_nodes().await;
    let list = FarmList::new(vec![
        ServerEntry::new("a", &a.url, Status::Up, 0, "A"),
        ServerEntry::new("b", &b.url, Status::Up, 0, "A"),
    ]);
    let (_farm_tx, farm_rx) = tokio::sync::watch::channel(list);
    let config = streamfarm_dns::DnsConfig::new("127.0.0.1:0".parse().unwrap(), "farm.test");
    let dns = streamfarm_dns::DnsServer::start(config, farm_rx)
        .await
        .unwrap();

    // The two nodes listen on different ports: only the SRV records can say which.
    let options = ClientOptions::new().dns_server(dns.local_addr()).seed(8);
    let address: ServiceAddress = "farm.test".parse().unwrap();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let mut endpoints: Vec<SocketAddr> = options
        .resolver()
        .resolve(&address, &mut rng)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.addr)
        .collect();
    endpoints.sort();
    assert_eq!(endpoints, vec![a.addr, b.addr]);

    let mut client = options.subscribe(["t"]).start(address);
    let server = connected(&mut client).await;
    assert!(server == a.url || server == b.url);
    client.close().await;
    dns.shutdown().await;
}

#[tokio::test]
async fn topics_changed_while_connecting_are_applied_once_connected() {
    let (a, b) = two_nodes().await;
    let mut client = ClientOptions::new()
        .subscribe(["old"])
        .seed(9)
        .start(seeds(&a, &b));
    // Most likely while the first connection is being made.
    client.subscribe(["t"]).unwrap();
    client.unsubscribe(["old"]).unwrap();
    let server = connected(&mut client).await;
    let (on, _) = node_of(&server, &a, &b);
    message_arrives(&mut client, on, "late topic").await;
    client.close().await;
}
