//! The NATS relay: the [`Relay`] of a farm that relays through an existing NATS (`relay =
//! "nats://…"`) instead of linking every node to every other.
//!
//! It owns this node's one connection to NATS, the subjects the farm uses there, the
//! subscriptions that follow this node's interest, and the authentication of frames sent through
//! NATS. It opens no relay link to any peer and accepts none (`/internal/relay` answers 404).
//! Positions, history and recovery stay the broker's (`crate::broker`): NATS core delivers at most
//! once, and this relay only has to behave like a link that may drop frames, which the broker
//! already repairs.
//!
//! # Subjects
//! Under a farm-wide prefix `P` (`relay_subject_prefix`, default `streamfarm.<cluster>`):
//! - `P.node.<name>` — the broker frames ([`PeerFrame`]) for node `name`: [`Relay::send`]
//!   publishes there, and each node subscribes to its own;
//! - `P.topic.<topic>` — the `msg` frames of a topic, byte-for-byte what clients get:
//!   [`Relay::fanout`] publishes there, and each node subscribes to the topics its clients want
//!   (its *interest*), and to nothing else;
//! - `P.probe.<name>.<peer>` — where NATS tells node `name` that nobody listens on `peer`'s node
//!   subject any more (below).
//!
//! Names and topics are written as one subject token each ([`token`]): letters, digits, `-` and
//! `_` as they are, every other byte as `~` and two hex digits, so dots, wildcards and spaces in
//! a topic cannot change the subject's meaning (`a.b` is `a~2Eb`).
//!
//! The connection sets `no_echo`: a replica does not get back its own messages. A broker frame
//! carries its sender's name in a header (`Sf-From`). With a farm secret every frame also
//! carries the sender's incarnation, a sequence number, the time and a tag
//! (`crate::trust::NatsAuth`); a frame whose tag does not verify, or that was seen before, or is
//! over [`MAX_FRAME_AGE`] old, is dropped and counted (`relay_auth_failures_total`). Without a
//! secret a `msg` frame travels with no header at all.
//!
//! # What the broker is told
//! - `sync_interest` resolves once NATS holds the subscriptions of the current interest (a
//!   flush: the server has processed them), or after [`SYNC_TIMEOUT`].
//! - `send` is false when the connection is down or the outgoing queue is full (a link that is
//!   not open, for the broker); a frame NATS drops later is repaired like one a reset link
//!   dropped: publishes are resent until acknowledged, holes are fetched by position.
//! - **A peer that died.** A killed process leaves its kernel to close its connection to NATS,
//!   and NATS then drops its subscriptions: a frame published to its node subject with a reply
//!   subject is answered at once with *no responders* (status 503). Each node probes the peers
//!   the farm lists `UP` this way (every [`PROBE_EVERY`], at most [`PROBE_RATE`] probes a
//!   second), and reports a peer refused as a relay link ended by its side ([`LinkEnds`]); a
//!   hung or cut-off peer keeps its subscription and is refused nothing, as with the embedded
//!   relay. Probes are not trusted for the first [`PROBE_GRACE`] (or `failure_timeout`, if
//!   shorter) after this node (re)connects to NATS: after a NATS restart its peers may not be
//!   back yet.
//!
//! # Bounds
//! Frames toward NATS wait in one queue of at most `relay_queue` frames and `relay_queue_bytes`
//! bytes (beyond, they are dropped and counted in `relay_drops_total`, and repaired as above),
//! then in async-nats' own command queue (2048 commands). Frames from NATS wait in each
//! subscription's queue, at most [`SUBSCRIPTION_CAPACITY`] frames (async-nats bounds it in frames,
//! not bytes: with NATS's `max_payload`, that bounds the bytes); beyond, async-nats drops them and
//! reports a slow consumer, and the node fetches what it missed.
//!
//! # NATS down
//! async-nats reconnects on its own (and re-subscribes); meanwhile `send` is false, publishes
//! wait for their acknowledgement (and time out after `publish_timeout` if NATS stays away),
//! and subscribers get nothing new. On reconnecting, and whenever NATS reports this node a slow
//! consumer (it dropped frames), the node fetches what follows its position in every topic it
//! delivers: its clients then get what they missed, in order, and nothing twice.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::{Client, ConnectOptions, Event, ServerAddr, StatusCode};
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{AbortHandle, Abortable, SelectAll};
use streamfarm_core::{FarmList, Status};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{Budget, FRAME_OVERHEAD, LinkDown, LinkEnds, Relay, SYNC_TIMEOUT};
use crate::broker::log::{Entry, PublishId};
use crate::broker::wire::PeerFrame;
use crate::broker::{self, BrokerInput};
use crate::hub::{FrameWakes, Hub, next_or_wake};
use crate::metrics::{self, Metrics};
use crate::trust::{NatsAuth, NatsFrame};

/// How often the peers listed `UP` are probed, when there are few.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Most probes a node sends per second: in a large farm each peer is probed less often.
const PROBE_RATE: usize = 100;
/// Frames older than this (by the sender's clock) are refused when frames are authenticated.
pub(crate) const MAX_FRAME_AGE: Duration = Duration::from_secs(60);
/// Frames a subscription holds before NATS drops more (async-nats' `SlowConsumer`): with NATS'
/// own `max_payload` (1 MB by default), the bound in bytes of what one subscription holds.
const SUBSCRIPTION_CAPACITY: usize = 8192;
/// How long start-up waits for the first connection to NATS before going on without it.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(2);
/// Longest time after this node (re)connects to NATS during which a probe NATS refuses is not
/// believed (peers may still be reconnecting after a NATS restart); shorter when
/// `failure_timeout` is (the membership would judge sooner anyway).
const PROBE_GRACE: Duration = Duration::from_secs(2);
/// Sequence numbers a receiver remembers per sender, for frames that arrive out of order (the
/// topic and node subscriptions are read side by side).
const REPLAY_WINDOW: u64 = 1024;

/// Header names of a frame.
mod header {
    pub(super) const FROM: &str = "Sf-From";
    pub(super) const INCARNATION: &str = "Sf-Inc";
    pub(super) const SEQ: &str = "Sf-Seq";
    pub(super) const SENT: &str = "Sf-Ts";
    pub(super) const TAG: &str = "Sf-Tag";
}

/// The `relay` setting, parsed: where NATS is and which subjects are the farm's.
#[derive(Clone)]
pub(crate) struct NatsSettings {
    servers: Vec<ServerAddr>,
    /// User and password (or a token: a user without password) from the urls.
    credentials: Option<(String, Option<String>)>,
    prefix: String,
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("servers", &self.redacted())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl NatsSettings {
    /// Parses `relay` (comma-separated `nats://` or `tls://` urls) and the subject prefix (default
    /// `streamfarm.<cluster>`); on error, the setting at fault and why.
    pub(crate) fn parse(
        relay: &str,
        prefix: Option<&str>,
        cluster: &str,
    ) -> Result<Self, (&'static str, String)> {
        let bad = |problem: String| Err(("relay", problem));
        let mut servers = Vec::new();
        let mut credentials = None;
        for url in relay.split(',').map(str::trim) {
            if !(url.starts_with("nats://") || url.starts_with("tls://")) {
                return bad(format!(
                    "{:?} is neither \"embedded\" nor a nats:// or tls:// url",
                    redact(url)
                ));
            }
            let addr: ServerAddr = match url.parse() {
                Ok(addr) => addr,
                Err(err) => return bad(format!("{:?}: {err}", redact(url))),
            };
            if addr.host().is_empty() {
                return bad(format!("{:?} has no host", redact(url)));
            }
            if let Some(user) = addr.username() {
                let these = (user.to_string(), addr.password().map(str::to_string));
                if credentials.as_ref().is_some_and(|c| *c != these) {
                    return bad("the urls carry different credentials".into());
                }
                credentials = Some(these);
            }
            servers.push(addr);
        }
        let prefix = match prefix {
            Some(prefix) => {
                let tokens_ok = prefix.len() <= 128
                    && prefix.split('.').all(|t| {
                        !t.is_empty()
                            && t.chars().all(|c| {
                                !c.is_whitespace() && !c.is_control() && c != '*' && c != '>'
                            })
                    });
                if !tokens_ok {
                    return Err((
                        "relay_subject_prefix",
                        format!(
                            "{prefix:?} is not a NATS subject of plain tokens (non-empty, separated by dots, without spaces, * or >, at most 128 bytes)"
                        ),
                    ));
                }
                prefix.to_string()
            }
            None => format!("streamfarm.{}", token(cluster)),
        };
        Ok(NatsSettings {
            servers,
            credentials,
            prefix,
        })
    }

    /// The server urls without their passwords, for logs.
    pub(crate) fn redacted(&self) -> String {
        self.servers
            .iter()
            .map(|s| redact(s.as_url_str()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A url with whatever is between `://` and `@` (credentials) replaced by `***`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// `text` as one NATS subject token (see the module docs): injective, and never empty.
pub(crate) fn token(text: &str) -> String {
    use std::fmt::Write;
    if text.is_empty() {
        return "~".to_string();
    }
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(byte as char);
        } else {
            let _ = write!(out, "~{byte:02X}");
        }
    }
    out
}

/// The farm's subjects (see the module docs).
#[derive(Debug, Clone)]
struct Subjects {
    prefix: String,
}

impl Subjects {
    fn node(&self, name: &str) -> String {
        format!("{}.node.{}", self.prefix, token(name))
    }
    fn topic(&self, topic: &str) -> String {
        format!("{}.topic.{}", self.prefix, token(topic))
    }
    fn probe_reply(&self, me: &str, peer: &str) -> String {
        format!("{}.probe.{}.{}", self.prefix, token(me), token(peer))
    }
    fn probe_replies(&self, me: &str) -> String {
        format!("{}.probe.{}.*", self.prefix, token(me))
    }
}

/// A frame on its way to NATS.
struct Outgoing {
    subject: String,
    payload: Bytes,
    /// A broker frame for one node (its receiver needs to know the sender), not a `msg` frame.
    to_node: bool,
}

impl Outgoing {
    fn cost(&self) -> usize {
        FRAME_OVERHEAD + self.subject.len() + self.payload.len()
    }
}

/// The sequence numbers seen from one sender (RFC 4303's anti-replay window).
#[derive(Debug)]
struct Window {
    incarnation: u64,
    highest: u64,
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl Window {
    fn new(incarnation: u64) -> Self {
        Window {
            incarnation,
            highest: 0,
            seen: [0; (REPLAY_WINDOW / 64) as usize],
        }
    }

    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let at = seq % REPLAY_WINDOW;
        (&mut self.seen[(at / 64) as usize], 1 << (at % 64))
    }

    /// Whether frame `seq` of `incarnation` is new (and now seen).
    fn accept(&mut self, incarnation: u64, seq: u64) -> bool {
        if incarnation < self.incarnation {
            return false;
        }
        if incarnation > self.incarnation {
            *self = Window::new(incarnation);
        }
        if seq == 0 || seq + REPLAY_WINDOW <= self.highest {
            return false;
        }
        if seq > self.highest {
            let clear = (seq - self.highest).min(REPLAY_WINDOW);
            for s in seq + 1 - clear..=seq {
                let (word, bit) = self.bit(s);
                *word &= !bit;
            }
            self.highest = seq;
        }
        let (word, bit) = self.bit(seq);
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        true
    }
}

/// The NATS relay of the module docs.
pub(crate) struct NatsRelay {
    name: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    client: Client,
    subjects: Subjects,
    /// Frames toward NATS, and their bytes.
    out_tx: mpsc::Sender<Outgoing>,
    queued: Budget,
    queue_bytes: usize,
    /// Whether the connection to NATS is up now.
    connected: AtomicBool,
    /// The interest version NATS holds all of.
    synced: watch::Sender<u64>,
    auth: Option<NatsAuth>,
    incarnation: u64,
    /// The most history a topic keeps (a `sync` or fetch reply carries up to all of it).
    history_bytes: usize,
    /// Frames sent so far (the last sequence number).
    sent: AtomicU64,
    /// Per sender, the frames seen (with a farm secret only: unauthenticated senders are not
    /// remembered, so this is bounded by the farm's size).
    windows: Mutex<HashMap<String, Window>>,
}

impl std::fmt::Debug for NatsRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsRelay")
            .field("name", &self.name)
            .field("prefix", &self.subjects.prefix)
            .finish_non_exhaustive()
    }
}

/// What the NATS relay needs from the node.
pub(crate) struct NatsParts {
    pub(crate) name: String,
    pub(crate) hub: Arc<Hub>,
    pub(crate) broker: BrokerInput,
    pub(crate) link_ends: Arc<LinkEnds>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) farm: watch::Receiver<FarmList>,
    pub(crate) auth: Option<NatsAuth>,
    pub(crate) queue: usize,
    pub(crate) queue_bytes: usize,
    pub(crate) failure_timeout: Duration,
    pub(crate) history_bytes: usize,
}

impl NatsRelay {
    /// Connects to NATS (waiting at most [`FIRST_CONNECT_WAIT`] for the first connection, then
    /// going on while async-nats keeps trying) and starts the relay's tasks.
    pub(crate) async fn start(
        settings: NatsSettings,
        parts: NatsParts,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Self>, String> {
        let (event_tx, event_rx) = mpsc::channel::<Event>(64);
        let mut options = ConnectOptions::new()
            .name(format!("streamfarm {}", parts.name))
            .no_echo()
            .retry_on_initial_connect()
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .event_callback(move |event| {
                let event_tx = event_tx.clone();
                async move {
                    // Events are hints (the state is read again): one lost when full is fine.
                    let _ = event_tx.try_send(event);
                }
            });
        if let Some((user, password)) = settings.credentials.clone() {
            options = match password {
                Some(password) => options.user_and_password(user, password),
                None => options.token(user),
            };
        }
        let client = options
            .connect(settings.servers.clone())
            .await
            .map_err(|err| format!("cannot connect to NATS at {}: {err}", settings.redacted()))?;
        let (out_tx, out_rx) = mpsc::channel(parts.queue);
        let relay = Arc::new(NatsRelay {
            name: parts.name.clone(),
            hub: parts.hub.clone(),
            metrics: parts.metrics.clone(),
            client: client.clone(),
            subjects: Subjects {
                prefix: settings.prefix.clone(),
            },
            out_tx,
            queued: Budget::default(),
            queue_bytes: parts.queue_bytes,
            connected: AtomicBool::new(false),
            synced: watch::channel(0).0,
            auth: parts.auth.clone(),
            incarnation: crate::now_ms(),
            history_bytes: parts.history_bytes,
            sent: AtomicU64::new(0),
            windows: Mutex::new(HashMap::new()),
        });
        let node_sub = client
            .subscribe(relay.subjects.node(&relay.name))
            .await
            .map_err(|err| format!("cannot subscribe on NATS: {err}"))?;
        let probe_sub = client
            .subscribe(relay.subjects.probe_replies(&relay.name))
            .await
            .map_err(|err| format!("cannot subscribe on NATS: {err}"))?;
        // Up now, or soon: the node starts either way, and says so.
        let deadline = Instant::now() + FIRST_CONNECT_WAIT;
        while client.connection_state() != async_nats::connection::State::Connected
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if client.connection_state() == async_nats::connection::State::Connected {
            relay.connected.store(true, Ordering::Relaxed);
            info!(nats = %settings.redacted(), prefix = %settings.prefix, "relaying through NATS");
            relay.check_max_payload();
        } else {
            warn!(nats = %settings.redacted(), "NATS not reachable yet: relaying nothing until it is (retrying)");
        }
        let grace = parts.failure_timeout.min(PROBE_GRACE);
        let trusted_from = Arc::new(Mutex::new(Instant::now() + grace));
        tracker.spawn(write(relay.clone(), out_rx, cancel.clone()));
        tracker.spawn(read(
            relay.clone(),
            parts.broker,
            node_sub,
            event_rx,
            trusted_from.clone(),
            grace,
            cancel.clone(),
        ));
        tracker.spawn(probe(
            relay.clone(),
            probe_sub,
            parts.farm,
            parts.link_ends,
            trusted_from,
            cancel,
        ));
        Ok(relay)
    }

    /// Warns when NATS refuses frames as large as the largest a node sends (a topic's history).
    fn check_max_payload(&self) {
        let max = self.client.server_info().max_payload;
        let history = self.history_bytes;
        if max < history.saturating_mul(2) {
            warn!(
                max_payload = max,
                history_bytes = history,
                "NATS max_payload is under twice history_bytes: a topic's whole history (sync, fetch replies) may not fit in one frame; raise max_payload in the NATS server's config (docs/NATS.md)"
            );
        }
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Queues `payload` for `subject`; false when the queue is full.
    fn offer(&self, subject: String, payload: Bytes, to_node: bool) -> bool {
        let out = Outgoing {
            subject,
            payload,
            to_node,
        };
        let cost = out.cost();
        if !self.queued.take(cost, self.queue_bytes) {
            metrics::inc(&self.metrics.relay_drops);
            return false;
        }
        if self.out_tx.try_send(out).is_err() {
            self.queued.give(cost);
            metrics::inc(&self.metrics.relay_drops);
            return false;
        }
        true
    }

    /// The headers of the next frame `out`: with a farm secret, the sender, its incarnation and
    /// sequence number, the time and the tag; without, the sender of a broker frame only (a
    /// `msg` frame needs none: every byte a header costs is paid per message).
    fn headers(&self, out: &Outgoing) -> Option<HeaderMap> {
        let mut headers = HeaderMap::new();
        let Some(auth) = &self.auth else {
            if !out.to_node {
                return None;
            }
            headers.insert(header::FROM, self.name.as_str());
            return Some(headers);
        };
        let seq = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        let sent_ms = crate::now_ms();
        headers.insert(header::FROM, self.name.as_str());
        headers.insert(header::INCARNATION, self.incarnation.to_string().as_str());
        headers.insert(header::SEQ, seq.to_string().as_str());
        headers.insert(header::SENT, sent_ms.to_string().as_str());
        let tag = auth.tag(&NatsFrame {
            subject: &out.subject,
            from: &self.name,
            incarnation: self.incarnation,
            seq,
            sent_ms,
            payload: &out.payload,
        });
        headers.insert(header::TAG, tag.as_str());
        Some(headers)
    }

    /// The sender of `message`, when it is a frame of the farm (authenticated, new, recent when
    /// there is a farm secret); `None` (counted) otherwise.
    fn sender(&self, message: &async_nats::Message) -> Option<String> {
        let get = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str())
        };
        let number = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok());
        let from = get(header::FROM).unwrap_or_default().to_string();
        let Some(auth) = &self.auth else {
            // Unauthenticated: a `msg` frame carries no sender (an empty name), a broker frame
            // its sender's name (checked where it is used).
            return Some(from);
        };
        let refused = |why: &str| {
            metrics::inc(&self.metrics.relay_auth_failures);
            debug!(from = %from, why, "NATS frame refused");
            None
        };
        let (Some(incarnation), Some(seq), Some(sent_ms), Some(tag)) = (
            number(header::INCARNATION),
            number(header::SEQ),
            number(header::SENT),
            get(header::TAG),
        ) else {
            return refused("no tag: is the farm secret set on every node?");
        };
        let frame = NatsFrame {
            subject: message.subject.as_str(),
            from: &from,
            incarnation,
            seq,
            sent_ms,
            payload: &message.payload,
        };
        if !auth.verify(&frame, tag) {
            return refused("tag does not verify: wrong or no farm secret");
        }
        if crate::now_ms().abs_diff(sent_ms) > MAX_FRAME_AGE.as_millis() as u64 {
            return refused("sent too long ago (a replay, or clocks far apart)");
        }
        let new = self
            .windows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(from.clone())
            .or_insert_with(|| Window::new(incarnation))
            .accept(incarnation, seq);
        if !new {
            return refused("seen before (a replay)");
        }
        Some(from)
    }
}

impl Relay for NatsRelay {
    fn fanout(&self, topic: &str, frame: &Utf8Bytes) {
        if !self.is_connected() {
            // Fetched by position once NATS is back (see the module docs).
            metrics::inc(&self.metrics.relay_drops);
            return;
        }
        let payload = Bytes::from(frame.clone());
        if self.offer(self.subjects.topic(topic), payload, false) {
            metrics::inc(&self.metrics.relay_messages_out);
        }
    }

    fn send(&self, peer: &str, frame: Utf8Bytes) -> bool {
        self.is_connected() && self.offer(self.subjects.node(peer), Bytes::from(frame), true)
    }

    fn sync_interest(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let target = self.hub.interest_version();
            let mut synced = self.synced.subscribe();
            let deadline = Instant::now() + SYNC_TIMEOUT;
            if timeout_at(deadline, synced.wait_for(|v| *v >= target))
                .await
                .is_err()
            {
                debug!(target, "NATS did not confirm the interest in time");
            }
        })
    }

    fn stats(&self) -> (u64, u64) {
        let depth = (self.out_tx.max_capacity() - self.out_tx.capacity()) as u64;
        (depth, 0)
    }
}

/// Writes queued frames to NATS, in order, each with its headers.
async fn write(
    relay: Arc<NatsRelay>,
    mut out_rx: mpsc::Receiver<Outgoing>,
    cancel: CancellationToken,
) {
    loop {
        let out = tokio::select! {
            _ = cancel.cancelled() => break,
            out = out_rx.recv() => match out {
                Some(out) => out,
                None => break,
            },
        };
        relay.queued.give(out.cost());
        let publish = async {
            match relay.headers(&out) {
                Some(headers) => {
                    relay
                        .client
                        .publish_with_headers(out.subject, headers, out.payload)
                        .await
                }
                None => relay.client.publish(out.subject, out.payload).await,
            }
        };
        let published = tokio::select! {
            _ = cancel.cancelled() => break,
            published = publish => published,
        };
        if let Err(err) = published {
            metrics::inc(&relay.metrics.relay_drops);
            warn!(error = %err, "NATS refused a frame");
        }
    }
    // The connection ends with the node: its subscriptions go with it at once.
    let _ = tokio::time::timeout(Duration::from_secs(1), relay.client.drain()).await;
}

/// Follows the interest with subscriptions, reads every subscription, and follows the
/// connection's events.
async fn read(
    relay: Arc<NatsRelay>,
    broker: BrokerInput,
    node_sub: async_nats::Subscriber,
    mut events: mpsc::Receiver<Event>,
    trusted_from: Arc<Mutex<Instant>>,
    grace: Duration,
    cancel: CancellationToken,
) {
    let mut interest_rx = relay.hub.interest_watch();
    // This node's subject and its topics' subjects, read as one stream (the node's subscription
    // stays for the node's life).
    let mut subscriptions: SelectAll<Abortable<async_nats::Subscriber>> = SelectAll::new();
    let (_node_handle, registration) = AbortHandle::new_pair();
    subscriptions.push(Abortable::new(node_sub, registration));
    let mut subscribed: HashMap<String, AbortHandle> = HashMap::new();
    // The interest's run and version `subscribed` follows: later changes come as deltas.
    let mut followed: Option<(u64, u64)> = None;
    let mut wakes = FrameWakes::default();
    let mut dirty = true;
    // A second catch-up, once peers that reconnected later than this node are back too.
    let mut catch_up_again: Option<Instant> = None;
    loop {
        if dirty {
            dirty = false;
            wakes.wake_all();
            interest_rx.mark_unchanged();
            follow_interest(&relay, &mut subscriptions, &mut subscribed, &mut followed).await;
        }
        let again = async {
            match catch_up_again {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let message = tokio::select! {
            _ = cancel.cancelled() => return,
            changed = interest_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                dirty = true;
                continue;
            }
            _ = again => {
                catch_up_again = None;
                catch_up(&broker).await;
                continue;
            }
            event = events.recv() => {
                let Some(event) = event else { return };
                match event {
                    Event::Connected => {
                        relay.connected.store(true, Ordering::Relaxed);
                        let settled = Instant::now() + grace;
                        *trusted_from.lock().unwrap_or_else(|e| e.into_inner()) = settled;
                        info!("NATS connected: fetching what was missed meanwhile");
                        relay.check_max_payload();
                        // async-nats subscribed again on its own; the interest is confirmed
                        // once NATS has those subscriptions.
                        dirty = true;
                        catch_up(&broker).await;
                        catch_up_again = Some(settled);
                    }
                    Event::Disconnected => {
                        relay.connected.store(false, Ordering::Relaxed);
                        metrics::inc(&relay.metrics.relay_disconnects);
                        warn!("NATS disconnected: nothing is relayed until it is back (async-nats reconnects)");
                    }
                    Event::SlowConsumer(sid) => {
                        metrics::inc(&relay.metrics.relay_drops);
                        warn!(sid, "NATS dropped frames for this node (slow consumer): fetching what was missed");
                        catch_up(&broker).await;
                    }
                    other => debug!(event = %other, "NATS event"),
                }
                continue;
            }
            message = next_or_wake(&mut subscriptions, &mut wakes) => {
                let Some(message) = message else { return };
                message
            }
        };
        relay.receive(message, &broker, &mut wakes).await;
    }
}

impl NatsRelay {
    /// A frame from NATS: a message for the hub, or a frame for the broker.
    async fn receive(
        &self,
        message: async_nats::Message,
        broker: &BrokerInput,
        wakes: &mut FrameWakes,
    ) {
        // A probe (see `probe`): its only purpose is to have been received.
        if message.payload.is_empty() {
            return;
        }
        let Some(from) = self.sender(&message) else {
            return;
        };
        let Ok(text) = std::str::from_utf8(&message.payload) else {
            warn!(from = %from, "NATS frame is not UTF-8");
            return;
        };
        match serde_json::from_str::<LinkDown>(text) {
            Ok(LinkDown::Msg {
                topic,
                epoch,
                offset,
            }) => {
                // A frame of one topic published on another's subject is nobody's.
                if message.subject.as_str() != self.subjects.topic(&topic) {
                    warn!(from = %from, "a msg frame on another topic's subject");
                    return;
                }
                metrics::inc(&self.metrics.relay_messages_in);
                let Ok(frame) = Utf8Bytes::try_from(message.payload.clone()) else {
                    return;
                };
                let entry = Entry {
                    offset,
                    id: PublishId::default(),
                    frame,
                    stored: std::time::Instant::now(),
                };
                broker::deliver_from_peer(&self.hub, broker, &topic, epoch, entry, wakes);
            }
            Ok(LinkDown::Broker)
                if !from.is_empty()
                    && message.subject.as_str() == self.subjects.node(&self.name) =>
            {
                match serde_json::from_str::<PeerFrame>(text) {
                    Ok(frame) => {
                        wakes.wake_all();
                        broker.peer(&from, frame).await;
                    }
                    Err(err) => warn!(from = %from, error = %err, "bad NATS frame"),
                }
            }
            Ok(_) => warn!(from = %from, "a NATS frame out of place"),
            Err(err) => warn!(from = %from, error = %err, "bad NATS frame"),
        }
    }
}

/// Subscribes to the topics of the interest and unsubscribes from the others, then confirms the
/// interest once NATS has processed it. Only what changed since `followed` is looked at, when the
/// interest's log still holds it (see `crate::interest`).
async fn follow_interest(
    relay: &NatsRelay,
    topics: &mut SelectAll<Abortable<async_nats::Subscriber>>,
    subscribed: &mut HashMap<String, AbortHandle>,
    followed: &mut Option<(u64, u64)>,
) {
    let delta = followed.and_then(|(run, version)| relay.hub.interest_since(run, version));
    let (version, add, remove) = match delta {
        Some(delta) => delta,
        None => {
            let (run, version, now) = relay.hub.interest();
            *followed = Some((run, 0));
            let now: std::collections::HashSet<String> = now.into_iter().collect();
            let remove = subscribed
                .keys()
                .filter(|t| !now.contains(*t))
                .cloned()
                .collect();
            (version, now.into_iter().collect(), remove)
        }
    };
    for topic in remove {
        if let Some(handle) = subscribed.remove(&topic) {
            // The stream ends, `SelectAll` drops it, and the subscriber's drop unsubscribes.
            handle.abort();
        }
    }
    for topic in add {
        if subscribed.contains_key(&topic) {
            continue;
        }
        match relay.client.subscribe(relay.subjects.topic(&topic)).await {
            Ok(subscriber) => {
                let (handle, registration) = AbortHandle::new_pair();
                topics.push(Abortable::new(subscriber, registration));
                subscribed.insert(topic, handle);
            }
            Err(err) => {
                warn!(topic = %topic, error = %err, "cannot subscribe on NATS");
                // Looked at whole next time.
                *followed = None;
                return;
            }
        }
    }
    if let Some((_, followed_version)) = followed {
        *followed_version = version;
    }
    if relay.is_connected() {
        let flushed = tokio::time::timeout(SYNC_TIMEOUT, relay.client.flush()).await;
        if matches!(flushed, Ok(Ok(()))) {
            relay.synced.send_replace(version);
        }
    }
}

/// Fetches, for every topic this node delivers, what follows its position, from every live node
/// (in bounded frames: see `crate::broker`'s catch-up).
async fn catch_up(broker: &BrokerInput) {
    broker.catch_up().await;
}

/// Probes the peers listed `UP` (see the module docs): a peer NATS says nobody listens for has
/// ended its links; one that is listened for again has opened them.
async fn probe(
    relay: Arc<NatsRelay>,
    mut replies: async_nats::Subscriber,
    farm: watch::Receiver<FarmList>,
    link_ends: Arc<LinkEnds>,
    trusted_from: Arc<Mutex<Instant>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Per peer: whether NATS refused its last probe.
    let mut refused: HashMap<String, bool> = HashMap::new();
    // The peer each reply subject is for.
    let mut reply_peer: HashMap<String, String> = HashMap::new();
    let mut next = 0usize;
    let batch = (PROBE_RATE * PROBE_EVERY.as_millis() as usize / 1000).max(1);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            reply = replies.next() => {
                let Some(reply) = reply else { return };
                if reply.status != Some(StatusCode::NO_RESPONDERS) {
                    continue;
                }
                let Some(peer) = reply_peer.get(reply.subject.as_str()) else { continue };
                refused.insert(peer.clone(), true);
                let trusted = Instant::now() >= *trusted_from.lock().unwrap_or_else(|e| e.into_inner());
                if trusted && relay.is_connected() && !link_ends.is_ended(peer) {
                    info!(peer = %peer, "the peer no longer listens on NATS: its process is gone");
                    link_ends.ended(peer);
                }
            }
            _ = tick.tick() => {
                if !relay.is_connected() {
                    continue;
                }
                let up: Vec<String> = farm
                    .borrow()
                    .servers
                    .iter()
                    .filter(|s| s.status != Status::Down && s.name != relay.name)
                    .map(|s| s.name.clone())
                    .collect();
                let wanted: HashSet<&String> = up.iter().collect();
                refused.retain(|peer, _| wanted.contains(peer));
                reply_peer.retain(|_, peer| wanted.contains(peer));
                for i in 0..batch.min(up.len()) {
                    let peer = &up[(next + i) % up.len()];
                    // Its last probe was not refused: someone listens for it.
                    if refused.insert(peer.clone(), false) == Some(false) && link_ends.is_ended(peer) {
                        info!(peer = %peer, "the peer listens on NATS again");
                        link_ends.opened(peer);
                    }
                    let reply = relay.subjects.probe_reply(&relay.name, peer);
                    reply_peer.insert(reply.clone(), peer.clone());
                    let _ = relay
                        .client
                        .publish_with_reply(relay.subjects.node(peer), reply, Bytes::new())
                        .await;
                }
                next = next.wrapping_add(batch);
            }
        }
    }
}

#[cfg(test)]
mod tests;
