//! Relay: the links between nodes, over which a topic's messages reach every node with
//! subscribers, and the broker's frames travel.
//!
//! The rest of the node sees only the [`Relay`] trait: `fanout` a message this node sends out as
//! its topic's replica, `send` a broker frame to a named peer, `sync_interest` before confirming a
//! subscription. What arrives goes to the [`Hub`] (messages, in order by position) or to the
//! broker (its frames). The NATS relay ([`nats`]: a subject per topic for the replicas'
//! messages, one per node for the broker's frames) fits the same trait and is chosen at start-up
//! (`relay`) without touching sessions, HTTP or membership.
//!
//! # The embedded relay
//! [`EmbeddedRelay`] needs nothing but the nodes. Every node dials a *relay link* — a WebSocket
//! to the peer's `/internal/relay` endpoint, learned from gossip — to every live peer. On the link
//! it dials, a node sends its **interest** (the topics its clients subscribe to, as versioned
//! add/remove deltas in bounded frames; the peer keeps what it learnt across link resets, and a
//! new link sends only what changed since: see `crate::interest`) and receives the peer's messages on exactly those topics, each `msg` frame
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
//! On a TLS node the links are TLS (`wss://`), on the same port as clients: see `crate::tls` for
//! how a dialer trusts its peer, and how the farm secret's handshake is bound to the session.
//!
//! The link frames are internal (node to node) and documented in `docs/PROTOCOL.md`:
//! acceptor → dialer first `{"type":"interest_held","run":8,"version":2}`;
//! dialer → acceptor `{"type":"interest","version":3,"run":8,"add":["t"],"remove":[]}` (with
//! `"reset":true` on the first frame of a whole set);
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
use tokio::net::TcpStream;
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
use crate::interest::{self, InterestFrame, PeerInterest};
use crate::metrics::{self, Metrics};
use crate::trust::{RelayAuth, Side, Transcript};
use streamfarm_core::protocol::Epoch;
use tokio_tungstenite::tungstenite::Message as WsMessage;

mod nats;
pub(crate) use nats::{NatsParts, NatsRelay, NatsSettings};

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
/// How long a dialer waits for the acceptor to say what interest it holds before sending the
/// whole set anyway.
const HELD_WAIT: Duration = Duration::from_secs(2);
/// How long an acceptor keeps what a peer's closed link taught it of the peer's interest, for
/// the next link to send only what changed meanwhile.
const HELD_FOR: Duration = Duration::from_secs(120);
/// Close code for a relay link refused: failed handshake, or interest over the limit.
const POLICY_VIOLATION: u16 = 1008;
/// Bytes counted for a queued frame beyond its text: the queue slot and message header.
const FRAME_OVERHEAD: usize = 64;

/// How links are run: queue bounds, interest bound, handshake.
#[derive(Debug, Clone)]
pub(crate) struct LinkSettings {
    /// Frames queued toward a peer before its link is reset.
    pub(crate) queue: usize,
    /// Bytes queued toward a peer before its link is reset.
    pub(crate) queue_bytes: usize,
    /// Most topics a peer may declare interest in.
    pub(crate) max_interest_topics: usize,
    /// Deadline of the handshake.
    pub(crate) handshake_timeout: Duration,
    /// The farm key's handshake; `None`: links are not authenticated.
    pub(crate) auth: Option<RelayAuth>,
    /// This process's incarnation (start time, ms): a link from an older incarnation of a peer
    /// never replaces one from a newer.
    pub(crate) incarnation: u64,
    /// How `wss://` peers are dialed.
    pub(crate) dialer: crate::tls::RelayDialer,
}

impl LinkSettings {
    pub(crate) fn new(
        config: &crate::NodeConfig,
        auth: Option<RelayAuth>,
        dialer: crate::tls::RelayDialer,
    ) -> Self {
        LinkSettings {
            queue: config.relay_queue,
            queue_bytes: config.relay_queue_bytes,
            max_interest_topics: config.max_interest_topics,
            handshake_timeout: config.handshake_timeout(),
            auth,
            incarnation: crate::now_ms(),
            dialer,
        }
    }
}

/// The relay handshake's frames (with a farm secret only; see `crate::trust`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Handshake {
    /// Acceptor → dialer, first: who it is, and a fresh nonce.
    Challenge { node: String, nonce: String },
    /// Dialer → acceptor: who it is, its incarnation, its nonce, and its proof.
    Hello {
        node: String,
        incarnation: u64,
        nonce: String,
        proof: String,
    },
    /// Acceptor → dialer: the acceptor's proof. The link is open.
    Welcome { proof: String },
}

/// Bytes queued on a link and not yet written.
#[derive(Debug, Default)]
struct Budget(std::sync::atomic::AtomicUsize);

impl Budget {
    /// Takes `bytes` if that keeps the total within `max`.
    fn take(&self, bytes: usize, max: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.0
            .fetch_update(Relaxed, Relaxed, |used| {
                (used + bytes <= max).then_some(used + bytes)
            })
            .is_ok()
    }

    fn give(&self, bytes: usize) {
        self.0
            .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

fn text_cost(message: &Message) -> usize {
    FRAME_OVERHEAD
        + match message {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) => bytes.len(),
            _ => 0,
        }
}

fn ws_cost(message: &WsMessage) -> usize {
    FRAME_OVERHEAD + message.len()
}

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
    /// Topics to start and stop sending, as of interest `version` (see `crate::interest`).
    Interest(InterestFrame),
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
    /// What the acceptor holds of the dialer's interest when a link opens: the dialer's run and
    /// version it learnt on earlier links (0 and 0: nothing).
    InterestHeld { run: u64, version: u64 },
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
/// node's topics move at once, not after the failure timeout. A peer whose links are refused for
/// want of trust (its certificate or its proofs) is counted here too: listed `UP` by gossip or not,
/// nothing can reach it over a link, so it can neither sequence nor replicate a topic.
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

    /// The peers whose link ended and has not opened again.
    pub(crate) fn ended_peers(&self) -> HashSet<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.ends.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A link a peer opened to us: we send it the messages it wants, and broker frames.
#[derive(Debug)]
struct Inbound {
    /// What the peer told us of its interest, kept in `EmbeddedRelay::held` between links.
    interest: RwLock<PeerInterest>,
    tx: mpsc::Sender<Message>,
    /// Bytes in `tx`.
    queued: Budget,
    closer: Closer,
    /// The peer's incarnation (0 without a handshake).
    incarnation: u64,
}

/// Why a frame was not queued on a link.
enum Refused {
    Full,
    Closed,
}

impl Inbound {
    fn offer(&self, message: Message, max_bytes: usize) -> Result<(), Refused> {
        let cost = text_cost(&message);
        if !self.queued.take(cost, max_bytes) {
            return Err(Refused::Full);
        }
        match self.tx.try_send(message) {
            Ok(()) => Ok(()),
            Err(err) => {
                self.queued.give(cost);
                Err(match err {
                    mpsc::error::TrySendError::Full(_) => Refused::Full,
                    mpsc::error::TrySendError::Closed(_) => Refused::Closed,
                })
            }
        }
    }
}

/// A link we opened to a peer: we may send it broker frames too.
#[derive(Debug)]
struct Outbound {
    tx: mpsc::Sender<WsMessage>,
    /// Bytes in `tx`.
    queued: Budget,
}

/// The embedded relay of the module docs.
#[derive(Debug)]
pub(crate) struct EmbeddedRelay {
    name: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    settings: LinkSettings,
    /// Whether a refused link was logged at `warn` already (later ones at `debug`: an outsider
    /// must not be able to flood the log).
    warned_refusal: std::sync::atomic::AtomicBool,
    /// Links from peers, by peer name.
    inbound: RwLock<HashMap<String, Arc<Inbound>>>,
    /// Links to peers, by peer name.
    outbound: RwLock<HashMap<String, Arc<Outbound>>>,
    /// Where frames for the broker go.
    broker: BrokerInput,
    /// Links that peers ended (for the membership's isolation verdict).
    link_ends: Arc<LinkEnds>,
    /// What closed links from peers taught us of their interest, with when they closed.
    held: Mutex<HashMap<String, (PeerInterest, std::time::Instant)>>,
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
        settings: LinkSettings,
        peers: watch::Receiver<Peers>,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Arc<Self> {
        let relay = Arc::new(EmbeddedRelay {
            name,
            hub,
            metrics,
            settings,
            warned_refusal: std::sync::atomic::AtomicBool::new(false),
            inbound: RwLock::new(HashMap::new()),
            outbound: RwLock::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
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
        mut socket: WebSocket,
        peer: String,
        binding: Vec<u8>,
        handshake_slot: tokio::sync::OwnedSemaphorePermit,
        cancel: CancellationToken,
    ) {
        let incarnation = match &self.settings.auth {
            None => 0,
            Some(auth) => {
                let handshake = timeout_at(
                    Instant::now() + self.settings.handshake_timeout,
                    self.handshake_accept(auth, &mut socket, &peer, &binding),
                )
                .await
                .unwrap_or_else(|_| Err("handshake not completed in time".into()));
                match handshake {
                    Ok(incarnation) => incarnation,
                    Err(why) => {
                        self.refused(&peer, &why);
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            socket.send(Message::Close(Some(axum::extract::ws::CloseFrame {
                                code: POLICY_VIOLATION,
                                reason: "relay authentication failed".into(),
                            }))),
                        )
                        .await;
                        return;
                    }
                }
            }
        };
        drop(handshake_slot);
        let (tx, mut rx) = mpsc::channel(self.settings.queue);
        let held = self
            .lock_held()
            .remove(&peer)
            .map(|(interest, _)| interest)
            .unwrap_or_default();
        let held_frame = LinkDown::InterestHeld {
            run: held.run,
            version: held.version,
        };
        let link = Arc::new(Inbound {
            interest: RwLock::new(held),
            tx,
            queued: Budget::default(),
            closer: Closer::default(),
            incarnation,
        });
        {
            let mut inbound = self.inbound.write().unwrap_or_else(|e| e.into_inner());
            if let Some(current) = inbound.get(&peer)
                && current.incarnation > incarnation
                && !current.closer.is_closed()
            {
                drop(inbound);
                self.refused(&peer, "an older incarnation of a linked peer");
                return;
            }
            if let Some(old) = inbound.insert(peer.clone(), link.clone()) {
                // One link per peer, or a message would reach that peer twice.
                old.closer.close(1000, "replaced by a newer link");
            }
        }
        info!(peer = %peer, "relay link accepted");
        let held_frame = serde_json::to_string(&held_frame).expect("frames always serialize");
        if link
            .offer(Message::Text(held_frame.into()), self.settings.queue_bytes)
            .is_err()
        {
            return;
        }
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
                    Ok(LinkUp::Interest(frame)) => {
                        let valid = frame
                            .add
                            .iter()
                            .all(|t| crate::session::check_topic(t).is_ok());
                        let (fits, version) = {
                            let mut interest =
                                link.interest.write().unwrap_or_else(|e| e.into_inner());
                            let version = interest.apply(frame);
                            (
                                valid && interest.topics.len() <= self.settings.max_interest_topics,
                                version,
                            )
                        };
                        if !fits {
                            let why = format!(
                                "interest over max_interest_topics ({}) or with a bad topic",
                                self.settings.max_interest_topics
                            );
                            self.refused(&peer, &why);
                            link.closer
                                .close(POLICY_VIOLATION, "interest over the limit");
                            break;
                        }
                        let ack = serde_json::to_string(&LinkDown::InterestAck { version })
                            .expect("frames always serialize");
                        if link
                            .offer(Message::Text(ack.into()), self.settings.queue_bytes)
                            .is_err()
                        {
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
                link.queued.give(text_cost(&message));
                // One flush per burst of queued frames.
                let burst = async {
                    sink.feed(message).await?;
                    for _ in 1..WRITE_BURST {
                        let Ok(next) = rx.try_recv() else { break };
                        link.queued.give(text_cost(&next));
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
            let (code, reason) = link.closer.reason().unwrap_or((1000, String::new()));
            let frame = axum::extract::ws::CloseFrame {
                code,
                reason: reason.into(),
            };
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                sink.send(Message::Close(Some(frame))),
            )
            .await;
        };
        tokio::join!(reader, writer);
        {
            let mut inbound = self.inbound.write().unwrap_or_else(|e| e.into_inner());
            if inbound.get(&peer).is_some_and(|l| Arc::ptr_eq(l, &link)) {
                inbound.remove(&peer);
            }
        }
        // What the peer taught this link waits for its next one (a refused interest is not
        // kept: the next link starts over).
        let interest =
            std::mem::take(&mut *link.interest.write().unwrap_or_else(|e| e.into_inner()));
        let now = std::time::Instant::now();
        let mut held = self.lock_held();
        held.retain(|_, (_, closed)| now.duration_since(*closed) < HELD_FOR);
        if link
            .closer
            .reason()
            .is_none_or(|(code, _)| code != POLICY_VIOLATION)
        {
            held.insert(peer.clone(), (interest, now));
        }
        drop(held);
        info!(peer = %peer, "relay link from peer closed");
    }

    fn lock_held(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (PeerInterest, std::time::Instant)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether to upgrade a relay request from `peer`: with a farm secret, its upgrade ticket
    /// must verify (bound to the TLS session's `binding`, empty when plain). Counted and logged
    /// when not.
    pub(crate) fn admits(&self, peer: &str, ticket: Option<&str>, binding: &[u8]) -> bool {
        let Some(auth) = &self.settings.auth else {
            return true;
        };
        match auth.check_ticket(ticket, &self.name, peer, crate::now_ms(), binding) {
            Ok(()) => true,
            Err(why) => {
                self.refused(peer, why);
                false
            }
        }
    }

    /// Logs and counts a refused link: at `warn` the first time, then at `debug`.
    fn refused(&self, peer: &str, why: &str) {
        metrics::inc(&self.metrics.relay_auth_failures);
        if self
            .warned_refusal
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            debug!(peer = %peer, why, "relay link refused");
        } else {
            warn!(peer = %peer, why, "relay link refused (further refusals are logged at debug level and counted in streamfarm_relay_auth_failures_total)");
        }
    }

    /// The acceptor's side of the handshake; the dialer's incarnation, or why it failed.
    async fn handshake_accept(
        &self,
        auth: &RelayAuth,
        socket: &mut WebSocket,
        peer: &str,
        binding: &[u8],
    ) -> Result<u64, String> {
        let nonce = crate::trust::nonce();
        let challenge = Handshake::Challenge {
            node: self.name.clone(),
            nonce: nonce.clone(),
        };
        let text = serde_json::to_string(&challenge).expect("frames always serialize");
        socket
            .send(Message::Text(text.into()))
            .await
            .map_err(|err| format!("cannot send the challenge: {err}"))?;
        let text = loop {
            match socket.recv().await {
                Some(Ok(Message::Text(text))) => break text,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(_)) => return Err("expected a hello frame".into()),
                Some(Err(err)) => return Err(format!("read failed: {err}")),
                None => return Err("closed during the handshake".into()),
            }
        };
        let Ok(Handshake::Hello {
            node,
            incarnation,
            nonce: dialer_nonce,
            proof,
        }) = serde_json::from_str::<Handshake>(&text)
        else {
            return Err("expected a hello frame".into());
        };
        if node != peer {
            return Err(format!("hello names {node:?}, the url {peer:?}"));
        }
        let transcript = Transcript {
            acceptor: &self.name,
            acceptor_nonce: &nonce,
            dialer: &node,
            incarnation,
            dialer_nonce: &dialer_nonce,
            binding,
        };
        if dialer_nonce.len() < 32 || !auth.verify(Side::Hello, &transcript, &proof) {
            return Err("proof does not verify: wrong or no farm secret".into());
        }
        let welcome = Handshake::Welcome {
            proof: auth.prove(Side::Welcome, &transcript),
        };
        let text = serde_json::to_string(&welcome).expect("frames always serialize");
        socket
            .send(Message::Text(text.into()))
            .await
            .map_err(|err| format!("cannot send the welcome: {err}"))?;
        Ok(incarnation)
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
            return match link.offer(Message::Text(frame), self.settings.queue_bytes) {
                Ok(()) => true,
                Err(Refused::Full) => {
                    self.reset_full(peer, &link);
                    false
                }
                Err(Refused::Closed) => false,
            };
        }
        let outbound = self
            .outbound
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .cloned();
        match outbound {
            Some(link) => {
                let message = WsMessage::Text(frame.as_str().into());
                let cost = ws_cost(&message);
                if !link.queued.take(cost, self.settings.queue_bytes) {
                    return false;
                }
                let sent = link.tx.try_send(message).is_ok();
                if !sent {
                    link.queued.give(cost);
                }
                sent
            }
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
                .topics
                .contains(topic);
            if !wanted {
                continue;
            }
            match link.offer(Message::Text(frame.clone()), self.settings.queue_bytes) {
                Ok(()) => metrics::inc(&self.metrics.relay_messages_out),
                Err(Refused::Full) => self.reset_full(peer, link),
                Err(Refused::Closed) => {}
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

/// The header of a relay upgrade request that carries the dialer's ticket (`crate::trust`).
pub(crate) const RELAY_TICKET: &str = "streamfarm-relay-ticket";

/// Why a dial did not give a link.
enum DialFailure {
    /// Refused or reset before the peer said anything: its process is gone.
    Gone(String),
    /// The peer answered but the link was refused. Not a sign that the peer died; `untrusted`
    /// when it failed TLS or the farm secret's proofs, either way: no link to it can open, so
    /// it cannot sequence or replicate (see [`LinkEnds`]), whatever gossip says of it.
    Refused { why: String, untrusted: bool },
    /// No answer within the deadline.
    TimedOut,
}

/// A relay link's stream: plain TCP, or TLS to a `wss://` peer.
type LinkIo = tokio_util::either::Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;
type ClientSocket = tokio_tungstenite::WebSocketStream<LinkIo>;

/// Opens the WebSocket of a link to `peer` at `url`: TCP, TLS for `wss://`, the upgrade, and the
/// farm secret's handshake (bound to the TLS session) when there is a secret.
async fn open_link(
    relay: &EmbeddedRelay,
    peer: &str,
    url: &str,
) -> Result<ClientSocket, DialFailure> {
    use tokio_tungstenite::tungstenite::{Error as WsError, client::IntoClientRequest};
    let gone = |err: &dyn std::fmt::Display| DialFailure::Gone(err.to_string());
    let mut request = format!("{url}?node={}", relay.name)
        .into_client_request()
        .map_err(|err| gone(&err))?;
    let tls = request.uri().scheme_str() == Some("wss");
    let host = request
        .uri()
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = request
        .uri()
        .port_u16()
        .unwrap_or(if tls { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|err| gone(&err))?;
    // Frames are small and latency matters: no Nagle delay.
    let _ = tcp.set_nodelay(true);
    let (io, binding) = if tls {
        let (stream, binding) = relay
            .settings
            .dialer
            .connect(peer, tcp)
            .await
            .map_err(|err| DialFailure::Refused {
                why: format!("TLS: {err}"),
                untrusted: true,
            })?;
        (LinkIo::Right(stream), binding)
    } else {
        (LinkIo::Left(tcp), Vec::new())
    };
    if let Some(auth) = &relay.settings.auth {
        let ticket = auth.ticket(peer, &relay.name, crate::now_ms(), &binding);
        if let Ok(value) = ticket.parse() {
            request.headers_mut().insert(RELAY_TICKET, value);
        }
    }
    let config = WebSocketConfig::default().read_buffer_size(LINK_READ_BUFFER);
    let (mut socket, _) = tokio_tungstenite::client_async_with_config(request, io, Some(config))
        .await
        .map_err(|err| match err {
            WsError::Http(response) => DialFailure::Refused {
                untrusted: response.status() == 403,
                why: format!(
                    "the peer answered {} {}",
                    response.status(),
                    String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).trim()
                ),
            },
            other => gone(&other),
        })?;
    if let Some(auth) = &relay.settings.auth {
        let handshake = tokio::time::timeout(
            relay.settings.handshake_timeout,
            handshake_dial(relay, auth, &mut socket, peer, &binding),
        );
        if let Err(why) = handshake
            .await
            .unwrap_or_else(|_| Err("handshake timed out".into()))
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
            return Err(DialFailure::Refused {
                why: format!("{why} (is the farm secret the same on both nodes?)"),
                untrusted: true,
            });
        }
    }
    Ok(socket)
}

/// Dials one peer again and again until `cancel` fires.
async fn dial(relay: Arc<EmbeddedRelay>, peer: String, url: String, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        let connect = tokio::time::timeout(
            CONNECT_TIMEOUT + relay.settings.handshake_timeout,
            open_link(&relay, &peer, &url),
        );
        let connected = tokio::select! {
            _ = cancel.cancelled() => break,
            connected = connect => connected.unwrap_or(Err(DialFailure::TimedOut)),
        };
        match connected {
            Ok(socket) => {
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
            Err(DialFailure::Gone(why)) => {
                // Refused (nothing listens there any more) or reset: the peer's process is gone.
                relay.link_ends.ended(&peer);
                debug!(peer = %peer, why, "relay dial failed");
            }
            Err(DialFailure::Refused { why, untrusted }) => {
                if untrusted {
                    relay.link_ends.ended(&peer);
                }
                metrics::inc(&relay.metrics.relay_auth_failures);
                warn!(peer = %peer, url = %url, why, "relay link refused");
            }
            Err(DialFailure::TimedOut) => debug!(peer = %peer, "relay dial timed out"),
        }
        let jitter = rand::random_range(0..=REDIAL_DELAY.as_millis() as u64);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(REDIAL_DELAY + Duration::from_millis(jitter)) => {}
        }
    }
}

/// The dialer's side of the handshake with `peer` (see `crate::trust`).
async fn handshake_dial(
    relay: &EmbeddedRelay,
    auth: &RelayAuth,
    socket: &mut ClientSocket,
    peer: &str,
    binding: &[u8],
) -> Result<(), String> {
    async fn next_text(socket: &mut ClientSocket) -> Result<String, String> {
        loop {
            match socket.next().await {
                Some(Ok(WsMessage::Text(text))) => return Ok(text.as_str().to_string()),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Ok(WsMessage::Close(frame))) => {
                    return Err(format!(
                        "the peer closed the link: {}",
                        frame.map(|f| f.reason.to_string()).unwrap_or_default()
                    ));
                }
                Some(Ok(_)) => return Err("unexpected frame".into()),
                Some(Err(err)) => return Err(format!("read failed: {err}")),
                None => return Err("closed during the handshake".into()),
            }
        }
    }
    let Ok(Handshake::Challenge { node, nonce }) =
        serde_json::from_str::<Handshake>(&next_text(socket).await?)
    else {
        return Err("expected a challenge (does the peer have a farm secret?)".into());
    };
    if node != peer {
        return Err(format!("the peer says it is {node:?}"));
    }
    if nonce.len() < 32 {
        return Err("the challenge's nonce is too short".into());
    }
    let my_nonce = crate::trust::nonce();
    let transcript = Transcript {
        acceptor: peer,
        acceptor_nonce: &nonce,
        dialer: &relay.name,
        incarnation: relay.settings.incarnation,
        dialer_nonce: &my_nonce,
        binding,
    };
    let hello = Handshake::Hello {
        node: relay.name.clone(),
        incarnation: relay.settings.incarnation,
        nonce: my_nonce.clone(),
        proof: auth.prove(Side::Hello, &transcript),
    };
    let text = serde_json::to_string(&hello).expect("frames always serialize");
    socket
        .send(WsMessage::text(text))
        .await
        .map_err(|err| format!("cannot send hello: {err}"))?;
    let Ok(Handshake::Welcome { proof }) =
        serde_json::from_str::<Handshake>(&next_text(socket).await?)
    else {
        return Err("expected a welcome".into());
    };
    if !auth.verify(Side::Welcome, &transcript, &proof) {
        return Err("the peer's proof does not verify: it does not hold the farm secret".into());
    }
    Ok(())
}

/// One established link we dialed: send interest, receive messages.
async fn run_link(
    relay: &Arc<EmbeddedRelay>,
    peer: &str,
    socket: ClientSocket,
    cancel: &CancellationToken,
) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<WsMessage>(relay.settings.queue);
    let outbound = Arc::new(Outbound {
        tx,
        queued: Budget::default(),
    });
    relay
        .outbound
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(peer.to_string(), outbound.clone());
    run_link_io(
        relay,
        peer,
        &outbound,
        &mut sink,
        &mut stream,
        &mut rx,
        cancel,
    )
    .await;
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
    outbound: &Outbound,
    sink: &mut LinkSink,
    stream: &mut LinkStream,
    rx: &mut mpsc::Receiver<WsMessage>,
    cancel: &CancellationToken,
) {
    let mut interest_rx = relay.hub.interest_watch();
    // The interest's run and version the peer holds once it has applied what was sent: unknown
    // until it says what it kept from earlier links (`interest_held`), or after [`HELD_WAIT`].
    let mut held: Option<(u64, u64)> = None;
    let held_wait = tokio::time::sleep(HELD_WAIT);
    tokio::pin!(held_wait);
    // Messages read at once from the link are delivered as one batch (see `next_or_wake`).
    let mut wakes = FrameWakes::default();
    let mut dirty = false;
    loop {
        if let Some((run, version)) = held.filter(|_| dirty) {
            dirty = false;
            wakes.wake_all();
            interest_rx.mark_unchanged();
            // What changed since the version the peer holds, or else the whole set.
            let frames = match relay.hub.interest_since(run, version) {
                Some((now, add, remove)) => {
                    held = Some((run, now));
                    interest::frames(run, version, now, false, add, remove)
                }
                None => {
                    let (run, now, all) = relay.hub.interest();
                    held = Some((run, now));
                    interest::frames(run, 0, now, true, all, Vec::new())
                }
            };
            for frame in frames {
                let text = serde_json::to_string(&LinkUp::Interest(frame))
                    .expect("frames always serialize");
                if sink.feed(WsMessage::text(text)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let next = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                return;
            }
            _ = &mut held_wait, if held.is_none() => {
                debug!(peer, "the peer did not say what interest it holds: sending all of it");
                held = Some((0, 0));
                dirty = true;
                continue;
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
                outbound.queued.give(ws_cost(&out));
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
            Ok(LinkDown::InterestHeld { run, version }) => {
                if held.is_none() {
                    held = Some((run, version));
                    dirty = true;
                }
            }
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
            LinkSettings::new(
                &crate::NodeConfig::new("me"),
                None,
                crate::tls::relay_dialer(None, None).unwrap(),
            ),
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
