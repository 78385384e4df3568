//! Relay: the links between nodes, over which a topic's messages reach every node with
//! subscribers, and the broker's frames travel.
//!
//! The rest of the node sees only the [`Relay`] trait: `fanout` a message this node sends out as
//! its topic's replica, `send` a broker frame to a named peer, `sync_interest` before confirming a
//! subscription. What arrives goes to the [`Hub`] (messages, in order by position) or to the
//! broker (its frames). A broker-backed relay (NATS: a subject per topic for the replicas'
//! messages, one per node for the broker's frames) fits the same trait and is chosen at start-up
//! without touching sessions, HTTP or membership.
//!
//! # The embedded relay
//! [`EmbeddedRelay`] needs nothing but the nodes. Every node dials a *relay link* — a WebSocket
//! to the peer's `/internal/relay` endpoint, learned from gossip — to every live peer. On the link
//! it dials, a node sends its **interest** (the topics its clients subscribe to, as versioned
//! add/remove deltas) and receives the peer's messages on exactly those topics, each `msg` frame
//! byte-for-byte the one the peer's own subscribers get. Broker frames go both ways on either
//! link (the one the receiving node dialed first).
//!
//! A subscription is confirmed (`sync_interest`) once every peer linked now has acknowledged the
//! new interest and, on a node that has just started, once the membership has heard from the
//! farm; a peer that does not answer delays it at most [`SYNC_TIMEOUT`]. A peer not linked is not
//! waited for: its messages carry positions, and the hub fetches a hole (see `crate::broker`).
//!
//! Delivery is exactly once and in order per topic because of positions, not of the links: the
//! hub drops what it already delivered and holds back what comes after a hole until the hole is
//! fetched. A link whose queue fills is reset and counted (`relay_drops_total`); the messages it
//! dropped are fetched again by position.
//!
//! The link frames are internal (node to node) and documented in `docs/PROTOCOL.md`:
//! dialer → acceptor `{"type":"interest","version":3,"add":["t"],"remove":[]}`;
//! acceptor → dialer `{"type":"interest_ack","version":3}` and `msg` frames; both ways the
//! broker's frames ([`PeerFrame`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::broker::log::{Entry, PublishId};
use crate::broker::wire::PeerFrame;
use crate::broker::{self, BrokerInput};
use crate::hub::{Closer, FrameWakes, Hub, next_or_wake};
use crate::metrics::{self, Metrics};
use streamfarm_core::protocol::Epoch;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How long a subscription waits for peers to acknowledge the new interest.
const SYNC_TIMEOUT: Duration = Duration::from_secs(1);
/// Timeout to establish a relay link.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most frames written to a link between two flushes.
const WRITE_BURST: usize = 256;
/// Read buffer of a link we dial. tungstenite zero-fills the free part of its read buffer before
/// every read, so its default of 128 KiB cost a 128 KiB `memset` per read on the receiving node.
const LINK_READ_BUFFER: usize = 16 * 1024;
/// Delay before redialing a peer after a failed or lost link (with jitter up to twice this).
const REDIAL_DELAY: Duration = Duration::from_millis(200);

/// What the node needs from a relay. See the module docs.
pub(crate) trait Relay: Send + Sync + 'static {
    /// A message this node sends out as its topic's replica: send it to every other node that
    /// wants `topic`.
    fn fanout(&self, topic: &str, frame: &Utf8Bytes);
    /// Sends a frame of the broker (see [`crate::broker::wire`]) to node `peer`; false when no
    /// link to it is open now.
    fn send(&self, peer: &str, frame: Utf8Bytes) -> bool;
    /// Resolves once every reachable peer knows this node's current interest, or after a bounded
    /// wait.
    fn sync_interest(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Messages queued toward peers and not yet written, and open links from peers.
    fn stats(&self) -> (u64, u64);
}

/// The peers the relay should link to, as the membership sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Peers {
    /// The membership has heard from the farm (or given up waiting): until then a just-started
    /// node does not know whom to link to, and confirms no subscription.
    pub(crate) settled: bool,
    /// Peer name → relay url, for every peer that is live or may be (seen but not yet judged).
    pub(crate) relays: BTreeMap<String, String>,
}

/// Frames a dialer sends on a relay link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum LinkUp {
    /// Topics to start and stop sending, as of interest `version`.
    Interest {
        version: u64,
        #[serde(default)]
        add: Vec<String>,
        #[serde(default)]
        remove: Vec<String>,
    },
    /// A frame of the broker (parsed again as a [`PeerFrame`]).
    #[serde(other)]
    Broker,
}

/// Frames an acceptor sends on a relay link (besides `msg` frames, which it sends pre-serialized).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum LinkDown {
    /// The acceptor now sends by interest `version`.
    InterestAck { version: u64 },
    /// A message as clients receive it; only the topic and position are read here, the frame
    /// itself is delivered unchanged.
    Msg {
        topic: String,
        epoch: Epoch,
        offset: u64,
    },
    /// A frame of the broker (parsed again as a [`PeerFrame`]).
    #[serde(other)]
    Broker,
}

/// When each peer's relay link last ended because the peer closed or reset it, or refused a new
/// one: the sign of a peer that *died* (its process is gone, its kernel answers for it). A peer
/// cut off by the network, or hung, leaves its links open and silent instead — which is how the
/// membership tells "my peers died" from "I am cut off" (see `crate::membership`).
///
/// The broker also places no topic on a peer whose link ended and was not opened again: a killed
/// node's topics move at once, not after the failure timeout.
#[derive(Debug)]
pub(crate) struct LinkEnds {
    ends: Mutex<HashMap<String, Instant>>,
    /// Bumped whenever a peer's link ends or opens again.
    changes: watch::Sender<u64>,
}

impl Default for LinkEnds {
    fn default() -> Self {
        LinkEnds {
            ends: Mutex::default(),
            changes: watch::channel(0).0,
        }
    }
}

impl LinkEnds {
    fn ended(&self, peer: &str) {
        let new = self
            .lock()
            .insert(peer.to_string(), Instant::now())
            .is_none();
        if new {
            self.changes.send_modify(|v| *v += 1);
        }
    }

    fn opened(&self, peer: &str) {
        if self.lock().remove(peer).is_some() {
            self.changes.send_modify(|v| *v += 1);
        }
    }

    /// Whether `peer`'s link ended by its side and has not opened again.
    pub(crate) fn is_ended(&self, peer: &str) -> bool {
        self.lock().contains_key(peer)
    }

    /// Watches ends and re-openings.
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether `peer` closed, reset or refused a link within the last `within`.
    pub(crate) fn ended_within(&self, peer: &str, within: Duration) -> bool {
        self.lock()
            .get(peer)
            .is_some_and(|at| at.elapsed() <= within)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.ends.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A link a peer opened to us: we send it the messages it wants, and broker frames.
#[derive(Debug)]
struct Inbound {
    interest: RwLock<HashSet<String>>,
    tx: mpsc::Sender<Message>,
    closer: Closer,
}

/// A link we opened to a peer: we may send it broker frames too.
#[derive(Debug)]
struct Outbound {
    tx: mpsc::Sender<WsMessage>,
}

/// The embedded relay of the module docs.
#[derive(Debug)]
pub(crate) struct EmbeddedRelay {
    name: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    queue: usize,
    /// Links from peers, by peer name.
    inbound: RwLock<HashMap<String, Arc<Inbound>>>,
    /// Links to peers, by peer name.
    outbound: RwLock<HashMap<String, Arc<Outbound>>>,
    /// Where frames for the broker go.
    broker: BrokerInput,
    /// Links that peers ended (for the membership's isolation verdict).
    link_ends: Arc<LinkEnds>,
    /// Our links to peers: the interest version each acknowledged (absent: not connected).
    acked: Mutex<HashMap<String, u64>>,
    /// Ticks whenever `acked` changes.
    progress: watch::Sender<u64>,
    /// The membership's peer list: `sync_interest` waits for each of them.
    peers: watch::Receiver<Peers>,
}

impl EmbeddedRelay {
    /// Starts dialing the peers `peers` lists (name → relay url) for as long as `cancel` allows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        name: String,
        hub: Arc<Hub>,
        broker: BrokerInput,
        link_ends: Arc<LinkEnds>,
        metrics: Arc<Metrics>,
        queue: usize,
        peers: watch::Receiver<Peers>,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Arc<Self> {
        let relay = Arc::new(EmbeddedRelay {
            name,
            hub,
            metrics,
            queue,
            inbound: RwLock::new(HashMap::new()),
            outbound: RwLock::new(HashMap::new()),
            broker,
            link_ends,
            acked: Mutex::new(HashMap::new()),
            progress: watch::channel(0).0,
            peers: peers.clone(),
        });
        tracker.spawn(manage_links(relay.clone(), peers, cancel, tracker.clone()));
        relay
    }

    fn lock_acked(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.acked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_acked(&self, peer: &str, version: Option<u64>) {
        {
            let mut acked = self.lock_acked();
            match version {
                Some(version) => acked.insert(peer.to_string(), version),
                None => acked.remove(peer),
            };
        }
        self.progress.send_modify(|tick| *tick += 1);
    }

    /// A link whose queue is full is reset (its peer fetches what it misses, by position).
    fn reset_full(&self, peer: &str, link: &Inbound) {
        if !link.closer.is_closed() {
            metrics::inc(&self.metrics.relay_drops);
            warn!(peer = %peer, "relay link queue full: resetting the link");
            link.closer.close(1000, "relay queue full");
        }
    }

    /// Serves a link a peer opened to us, until it closes or `cancel` fires.
    pub(crate) async fn accept(
        self: Arc<Self>,
        socket: WebSocket,
        peer: String,
        cancel: CancellationToken,
    ) {
        let (tx, mut rx) = mpsc::channel(self.queue);
        let link = Arc::new(Inbound {
            interest: RwLock::new(HashSet::new()),
            tx,
            closer: Closer::default(),
        });
        let replaced = self
            .inbound
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer.clone(), link.clone());
        if let Some(old) = replaced {
            // One link per peer, or a message would reach that peer twice.
            old.closer.close(1000, "replaced by a newer link");
        }
        info!(peer = %peer, "relay link accepted");
        let (mut sink, mut stream) = socket.split();
        let reader = async {
            loop {
                let next = tokio::select! {
                    _ = link.closer.closed() => break,
                    _ = cancel.cancelled() => break,
                    next = stream.next() => next,
                };
                let text = match next {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                match serde_json::from_str::<LinkUp>(&text) {
                    Ok(LinkUp::Broker) => match serde_json::from_str::<PeerFrame>(&text) {
                        Ok(frame) => self.broker.peer(&peer, frame).await,
                        Err(err) => warn!(peer = %peer, error = %err, "bad relay frame"),
                    },
                    Ok(LinkUp::Interest {
                        version,
                        add,
                        remove,
                    }) => {
                        {
                            let mut interest =
                                link.interest.write().unwrap_or_else(|e| e.into_inner());
                            for topic in remove {
                                interest.remove(&topic);
                            }
                            interest.extend(add);
                        }
                        let ack = serde_json::to_string(&LinkDown::InterestAck { version })
                            .expect("frames always serialize");
                        if link.tx.try_send(Message::Text(ack.into())).is_err() {
                            break;
                        }
                    }
                    Err(err) => warn!(peer = %peer, error = %err, "bad relay frame"),
                }
            }
            link.closer.close(1000, "");
        };
        let writer = async {
            loop {
                let message = tokio::select! {
                    _ = link.closer.closed() => break,
                    message = rx.recv() => match message {
                        Some(message) => message,
                        None => break,
                    },
                };
                // One flush per burst of queued frames.
                let burst = async {
                    sink.feed(message).await?;
                    for _ in 1..WRITE_BURST {
                        let Ok(next) = rx.try_recv() else { break };
                        sink.feed(next).await?;
                    }
                    sink.flush().await
                };
                let sent = tokio::select! {
                    sent = burst => sent,
                    _ = link.closer.closed() => break,
                };
                if sent.is_err() {
                    break;
                }
            }
            link.closer.close(1000, "");
            let _ = sink.close().await;
        };
        tokio::join!(reader, writer);
        let mut inbound = self.inbound.write().unwrap_or_else(|e| e.into_inner());
        if inbound.get(&peer).is_some_and(|l| Arc::ptr_eq(l, &link)) {
            inbound.remove(&peer);
        }
        info!(peer = %peer, "relay link from peer closed");
    }
}

impl Relay for EmbeddedRelay {
    fn send(&self, peer: &str, frame: Utf8Bytes) -> bool {
        // The link the peer opened to us, else the one we opened to it.
        let inbound = self
            .inbound
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .cloned();
        if let Some(link) = inbound {
            return match link.tx.try_send(Message::Text(frame)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.reset_full(peer, &link);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            };
        }
        let outbound = self
            .outbound
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .cloned();
        match outbound {
            Some(link) => link
                .tx
                .try_send(WsMessage::Text(frame.as_str().into()))
                .is_ok(),
            None => false,
        }
    }

    fn fanout(&self, topic: &str, frame: &Utf8Bytes) {
        let inbound = self.inbound.read().unwrap_or_else(|e| e.into_inner());
        for (peer, link) in inbound.iter() {
            let wanted = link
                .interest
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(topic);
            if !wanted {
                continue;
            }
            match link.tx.try_send(Message::Text(frame.clone())) {
                Ok(()) => metrics::inc(&self.metrics.relay_messages_out),
                Err(mpsc::error::TrySendError::Full(_)) => self.reset_full(peer, link),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    fn sync_interest(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let target = self.hub.interest_version();
            let deadline = Instant::now() + SYNC_TIMEOUT;
            let mut progress = self.progress.subscribe();
            let mut peers = self.peers.clone();
            loop {
                // Every peer linked now. A peer whose link is down (dead, hung, cut off, or
                // just seen and not linked yet) is not waited for: whatever it sends once
                // linked carries positions, and a hole is fetched (see `crate::broker`).
                let synced = {
                    let peers = peers.borrow_and_update();
                    let acked = self.lock_acked();
                    peers.settled
                        && peers
                            .relays
                            .keys()
                            .filter_map(|peer| acked.get(peer))
                            .all(|v| *v >= target)
                };
                if synced {
                    return;
                }
                // `false`: the node is stopping (the membership is gone).
                let changed = async {
                    tokio::select! {
                        changed = progress.changed() => changed.is_ok(),
                        changed = peers.changed() => changed.is_ok(),
                    }
                };
                match timeout_at(deadline, changed).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(_) => {
                        debug!(target, "peers did not all acknowledge interest in time");
                        return;
                    }
                }
            }
        })
    }

    fn stats(&self) -> (u64, u64) {
        let inbound = self.inbound.read().unwrap_or_else(|e| e.into_inner());
        let depth = inbound
            .values()
            .map(|l| (l.tx.max_capacity() - l.tx.capacity()) as u64)
            .sum();
        (depth, inbound.len() as u64)
    }
}

/// Keeps one dialing task per live peer, following the membership's peer list.
async fn manage_links(
    relay: Arc<EmbeddedRelay>,
    mut peers: watch::Receiver<Peers>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let mut links: HashMap<String, (String, CancellationToken)> = HashMap::new();
    loop {
        let wanted = peers.borrow_and_update().relays.clone();
        links.retain(|name, (url, token)| {
            let keep = wanted.get(name) == Some(url);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (name, url) in wanted {
            if links.contains_key(&name) {
                continue;
            }
            let token = cancel.child_token();
            tracker.spawn(dial(
                relay.clone(),
                name.clone(),
                url.clone(),
                token.clone(),
            ));
            links.insert(name, (url, token));
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = peers.changed() => if changed.is_err() { return },
        }
    }
}

/// Dials one peer again and again until `cancel` fires.
async fn dial(relay: Arc<EmbeddedRelay>, peer: String, url: String, cancel: CancellationToken) {
    let target = format!("{url}?node={}", relay.name);
    while !cancel.is_cancelled() {
        let connect = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(
                &target,
                Some(WebSocketConfig::default().read_buffer_size(LINK_READ_BUFFER)),
                true,
            ),
        );
        let connected = tokio::select! {
            _ = cancel.cancelled() => break,
            connected = connect => connected,
        };
        match connected {
            Ok(Ok((socket, _))) => {
                info!(peer = %peer, url = %url, "relay link open");
                relay.link_ends.opened(&peer);
                relay.set_acked(&peer, Some(0));
                run_link(&relay, &peer, socket, &cancel).await;
                relay.set_acked(&peer, None);
                if !cancel.is_cancelled() {
                    relay.link_ends.ended(&peer);
                }
                info!(peer = %peer, "relay link to peer closed");
            }
            Ok(Err(err)) => {
                // Refused (nothing listens there any more) or reset: the peer's process is gone.
                relay.link_ends.ended(&peer);
                debug!(peer = %peer, error = %err, "relay dial failed");
            }
            Err(_) => debug!(peer = %peer, "relay dial timed out"),
        }
        let jitter = rand::random_range(0..=REDIAL_DELAY.as_millis() as u64);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(REDIAL_DELAY + Duration::from_millis(jitter)) => {}
        }
    }
}

type ClientSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One established link we dialed: send interest, receive messages.
async fn run_link(
    relay: &Arc<EmbeddedRelay>,
    peer: &str,
    socket: ClientSocket,
    cancel: &CancellationToken,
) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<WsMessage>(relay.queue);
    let outbound = Arc::new(Outbound { tx });
    relay
        .outbound
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(peer.to_string(), outbound.clone());
    run_link_io(relay, peer, &mut sink, &mut stream, &mut rx, cancel).await;
    let mut links = relay.outbound.write().unwrap_or_else(|e| e.into_inner());
    if links.get(peer).is_some_and(|l| Arc::ptr_eq(l, &outbound)) {
        links.remove(peer);
    }
}

type LinkSink = futures_util::stream::SplitSink<ClientSocket, WsMessage>;
type LinkStream = futures_util::stream::SplitStream<ClientSocket>;

async fn run_link_io(
    relay: &Arc<EmbeddedRelay>,
    peer: &str,
    sink: &mut LinkSink,
    stream: &mut LinkStream,
    rx: &mut mpsc::Receiver<WsMessage>,
    cancel: &CancellationToken,
) {
    let mut interest_rx = relay.hub.interest_watch();
    let mut sent: HashSet<String> = HashSet::new();
    // Messages read at once from the link are delivered as one batch (see `next_or_wake`).
    let mut wakes = FrameWakes::default();
    // The whole interest goes out first; afterwards only deltas.
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            wakes.wake_all();
            interest_rx.mark_unchanged();
            let (version, now) = relay.hub.interest();
            let add: Vec<String> = now.difference(&sent).cloned().collect();
            let remove: Vec<String> = sent.difference(&now).cloned().collect();
            sent = now;
            let frame = serde_json::to_string(&LinkUp::Interest {
                version,
                add,
                remove,
            })
            .expect("frames always serialize");
            if sink.send(WsMessage::text(frame)).await.is_err() {
                return;
            }
        }
        let next = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = sink.close().await;
                return;
            }
            changed = interest_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                dirty = true;
                continue;
            }
            out = rx.recv() => {
                let Some(out) = out else { return };
                if sink.send(out).await.is_err() {
                    return;
                }
                continue;
            }
            next = next_or_wake(stream, &mut wakes) => next,
        };
        let text = match next {
            Some(Ok(WsMessage::Text(text))) => text,
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
            Some(Ok(_)) => continue,
        };
        match serde_json::from_str::<LinkDown>(&text) {
            Ok(LinkDown::Msg {
                topic,
                epoch,
                offset,
            }) => {
                metrics::inc(&relay.metrics.relay_messages_in);
                match Utf8Bytes::try_from(bytes::Bytes::from(text)) {
                    Ok(frame) => {
                        let entry = Entry {
                            offset,
                            id: PublishId::default(),
                            frame,
                            stored: std::time::Instant::now(),
                        };
                        broker::deliver_from_peer(
                            &relay.hub,
                            &relay.broker,
                            &topic,
                            epoch,
                            entry,
                            &mut wakes,
                        );
                    }
                    Err(err) => warn!(error = %err, "relay frame is not UTF-8"),
                }
            }
            Ok(LinkDown::InterestAck { version }) => relay.set_acked(peer, Some(version)),
            Ok(LinkDown::Broker) => match serde_json::from_str::<PeerFrame>(&text) {
                Ok(frame) => {
                    wakes.wake_all();
                    relay.broker.peer(peer, frame).await;
                }
                Err(err) => warn!(peer, error = %err, "bad relay frame"),
            },
            Err(err) => warn!(peer, error = %err, "bad relay frame"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay whose peer list the test drives; no peer it lists ever answers.
    fn relay(peers: watch::Receiver<Peers>) -> (Arc<EmbeddedRelay>, CancellationToken) {
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(Hub::new(
            metrics.clone(),
            crate::NodeConfig::new("me").history_limits(),
        ));
        let cancel = CancellationToken::new();
        let relay = EmbeddedRelay::start(
            "me".into(),
            hub,
            crate::broker::Broker::channel().0,
            Arc::default(),
            metrics,
            8,
            peers,
            cancel.clone(),
            &TaskTracker::new(),
        );
        (relay, cancel)
    }

    #[tokio::test(start_paused = true)]
    async fn a_settled_node_without_peers_confirms_at_once() {
        let (_tx, rx) = watch::channel(Peers {
            settled: true,
            relays: BTreeMap::new(),
        });
        let (relay, cancel) = relay(rx);
        let start = Instant::now();
        relay.sync_interest().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_listed_peer_without_a_link_is_not_waited_for() {
        // Port 1 on loopback refuses: the peer is listed but never linked, never acknowledges.
        let relays = BTreeMap::from([("p".to_string(), "ws://127.0.0.1:1/r".to_string())]);
        let (_tx, rx) = watch::channel(Peers {
            settled: true,
            relays,
        });
        let (relay, cancel) = relay(rx);
        let start = Instant::now();
        relay.sync_interest().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_has_not_heard_from_the_farm_waits_until_it_has() {
        let (tx, rx) = watch::channel(Peers::default());
        let (relay, cancel) = relay(rx);
        let start = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send_modify(|peers| peers.settled = true);
            // Kept open: a closed membership would end the wait too.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        relay.sync_interest().await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        cancel.cancel();
    }
}
