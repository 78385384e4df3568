//! The streaming node of the farm: `streamfarm serve`.
//!
//! A node holds persistent WebSocket connections (its *users*), pushes every message published to
//! a topic down the connections subscribed to it — wherever in the farm it was published — shares
//! its status and user count with every other node over gossip, and serves the farm list.
//! It owns sockets, tasks and time; the vocabulary (farm list, frames, close codes) is
//! `streamfarm-core`'s, and DNS is `streamfarm-dns`'s (fed by [`NodeHandle::farm`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), streamfarm_node::NodeError> {
//! use streamfarm_node::{NodeConfig, NodeHandle};
//! let mut config = NodeConfig::new("a");
//! config.listen = "127.0.0.1:0".parse().unwrap();
//! let node = NodeHandle::start(config).await?;
//! println!("streaming at {}", node.url());
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`config`] — [`NodeConfig`]: every setting, TOML with named defaults.
//! - `membership` — gossip (chitchat): advertises this node, builds the live [`FarmList`],
//!   lists silent peers `DOWN`.
//! - `broker` — the one owner of publishing and subscribing: positions (a sequencer and a replica
//!   per topic), history, recovery, claims and retries across node failures; a state machine fed
//!   by its task.
//! - `chaos` — the farm's deterministic simulation: broker cores on a simulated clock and
//!   network, faults drawn from a seed, the guarantees checked (`streamfarm chaos`, TESTING.md).
//! - `hub` — local topics, their delivery streams in offset order, and fan-out: one serialized
//!   frame shared by all subscribers, bounded per-connection queues, slow consumers closed.
//! - `relay` — the `Relay` interface and the embedded relay over links between nodes;
//!   `relay::nats`, the relay through NATS (`relay = "nats://…"`), which opens no links.
//! - `queue` — the per-connection send queue, bounded in frames and bytes.
//! - `trust` — the farm secret: signed gossip datagrams (`SignedUdp`), the relay handshake's
//!   proofs (`SECURITY.md`).
//! - `listener` — the accept loop: request-head deadlines, descriptors kept for `/healthz` and
//!   admin.
//! - `session` — one WebSocket connection: frames, heartbeats, limits, its token's grant and
//!   expiry.
//! - `sse` — one server-sent event stream (`GET /sse`, `POST /sse/{stream}`): a session whose
//!   frames are written as events, for networks that refuse WebSockets.
//! - [`auth`] — client tokens (JWT by `kid`), topic patterns, publish and admin credentials
//!   (`docs/AUTH.md`).
//! - `tls` — TLS for clients and relay links: certificate loading and reload, how relay dials
//!   trust their peers (a CA, or the farm secret bound to the session), mutual TLS.
//! - `http` — axum routes: stream, `/farm`, `/publish/{topic}`, `/topics/{topic}`,
//!   `/admin/status`, `/metrics`, `/healthz`, `/livez`, `/readyz`.
//! - `web` — what browsers get: `/client/streamfarm.js` (the browser client), `/dashboard`, and
//!   CORS for `/farm` and `/publish`.
//! - `rebalance` — active rebalancing (this node's row of the farm's plan), and moving every
//!   client off for `DRAINING` and shutdown: `migrate` frames, make-before-break.
//! - `drain` — paced, jittered scheduling of moves and closes.
//! - [`metrics`] — counters and their Prometheus rendering.
//! - `protocol_doc` (tests only) — checks every example of `docs/PROTOCOL.md` against the frames.
//! - `fuzz` (tests only) — property tests feeding random and mutated input to relay frames,
//!   gossip datagrams and the config.
//! - `examples/` — `idle_clients` (memory per idle connection) and `fanout` (deliveries per second).
//! - DNS: with `dns` set, a `streamfarm_dns::DnsServer` answers the service name from the live
//!   farm list; the handle owns it and stops it last.
//!
//! # Life cycle
//! [`NodeHandle::start`] binds the TCP listener and the gossip socket, then runs the HTTP server,
//! the membership loop, the relay and the broker as tasks of one [`TaskTracker`] under one
//! [`CancellationToken`]. [`NodeHandle::shutdown`] announces `DOWN`, closes the connections paced
//! over `shutdown_drain_ms` with `GOING_AWAY`, then cancels and joins everything. The membership
//! task owns gossip: it restarts it if it dies (`/healthz` is 503 meanwhile, see `membership`)
//! and stops it on cancel.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use streamfarm_core::protocol::{Encoding, close};
use streamfarm_core::{FarmList, Status};
use streamfarm_dns::DnsServer;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub mod auth;
mod broker;
pub mod chaos;
pub mod config;
mod drain;
#[cfg(test)]
mod fuzz;
mod http;
mod hub;
mod interest;
mod listener;
mod membership;
pub mod metrics;
#[cfg(test)]
mod protocol_doc;
mod queue;
mod rebalance;
mod relay;
mod session;
mod sse;
mod tls;
mod trust;
mod web;

pub use auth::{AuthKey, Grant, Pattern};
pub use config::{ConfigError, NodeConfig};
/// What a node gossips and with which chitchat settings (for in-memory farms in benchmarks).
pub use membership::{USERS_KEY, chitchat_config, gossip_key_values};
pub use metrics::Metrics;

use crate::broker::Broker;
use crate::hub::Hub;
use crate::relay::EmbeddedRelay;

/// How long shutdown waits, after announcing `DOWN`, for the news to spread (in gossip rounds).
const ANNOUNCE_ROUNDS: u32 = 3;
/// Relay links that may be in their handshake at once: a farm has few nodes dialing one node at
/// the same moment (more get `503` and redial within half a second), and each handshake may hold
/// up to one relay message's worth of memory until it fails.
const RELAY_HANDSHAKES: usize = 16;
/// Extra time shutdown gives connections to finish closing after the drain period.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP/WebSocket listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Gossip could not start (usually: its UDP address is taken).
    #[error("cannot gossip on {addr}: {message}")]
    Gossip {
        /// The gossip address.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// The NATS relay (`relay = "nats://…"`) could not start.
    #[error("relay: {0}")]
    Relay(String),
    /// The DNS responder (`dns`) could not start.
    #[error(transparent)]
    Dns(#[from] streamfarm_dns::DnsError),
}

/// State shared by every task of one node.
pub(crate) struct Shared {
    pub(crate) config: NodeConfig,
    /// Who may connect, subscribe and publish (tokens, anonymous access, publish tokens).
    pub(crate) auth: auth::Auth,
    /// This node's streaming url.
    pub(crate) url: String,
    pub(crate) metrics: Arc<Metrics>,
    /// Local connections and topics (the broker's, shared for drain and counts).
    pub(crate) hub: Arc<Hub>,
    /// Publishing and subscribing.
    pub(crate) broker: Arc<Broker>,
    /// The embedded relay, when that is the relay in use (it accepts links over HTTP).
    pub(crate) embedded: Option<Arc<EmbeddedRelay>>,
    pub(crate) status: watch::Sender<Status>,
    pub(crate) farm_rx: watch::Receiver<FarmList>,
    /// When this node handed out its recent lists to clients.
    pub(crate) handed_out: membership::HandedOut,
    /// Changes with the farm's membership (not its users): pushed to clients watching the list.
    pub(crate) members_rx: watch::Receiver<u64>,
    /// True while this node is cut off from the farm (see `membership`).
    pub(crate) isolated_rx: watch::Receiver<bool>,
    /// Whom the membership has heard of: `settled` once a joining node has heard from the farm.
    pub(crate) peers_rx: watch::Receiver<relay::Peers>,
    /// Peers whose relay links their side ended: gone before the list says so.
    pub(crate) link_ends: Arc<relay::LinkEnds>,
    pub(crate) connection_limit: Arc<Semaphore>,
    /// Relay links still in their handshake: bounded, so that links which never complete it
    /// cannot hold descriptors by the thousand for `handshake_timeout_ms` each.
    pub(crate) relay_handshakes: Arc<Semaphore>,
    /// Cancels the drain in progress, if any.
    pub(crate) drain: Mutex<Option<CancellationToken>>,
    /// When the clients told to move were told (for the migration histogram).
    pub(crate) move_clock: rebalance::MoveClock,
    /// Open server-sent event streams, where their clients' `POST`s go.
    pub(crate) sse: sse::Streams,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

impl Shared {
    /// The farm list, stamped now (its counts' ages grown by the time since it was made).
    pub(crate) fn farm_now(&self) -> FarmList {
        let mut list = self.farm_rx.borrow().clone();
        list.restamp(now_ms());
        list
    }

    /// The farm list for a client that may choose from it: stamped now, with the lists handed
    /// out since this node's own count was true (`in_flight`, `docs/PROTOCOL.md`) and a draw of
    /// its own for the client's pick (`draw`). Only for a list that goes to one client.
    pub(crate) fn list_for_client(&self) -> FarmList {
        let mut list = self.farm_now();
        let since = list
            .by_url(&self.url)
            .and_then(|own| own.users_age_ms)
            .map_or(Duration::ZERO, Duration::from_millis);
        let handout = self.handed_out.record(tokio::time::Instant::now(), since);
        list.in_flight = Some(handout.in_flight);
        list.draw = Some(handout.draw);
        list
    }

    /// Sets this node's status. `DRAINING` starts moving connections to other servers paced over
    /// the drain period (`migrate`, or `RECONNECT_ELSEWHERE` for clients that cannot follow
    /// one); any other status stops a drain in progress.
    pub(crate) fn set_status(self: &Arc<Self>, status: Status) {
        let previous = self.status.send_replace(status);
        if previous != status {
            info!(from = %previous, to = %status, "status");
        }
        let mut drain = self.drain.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = drain.take() {
            token.cancel();
        }
        if status == Status::Draining {
            let token = self.cancel.child_token();
            *drain = Some(token.clone());
            self.tracker.spawn(rebalance::move_all(
                self.clone(),
                self.config.drain_period(),
                rebalance::Why::Drain,
                token,
            ));
        }
    }
}

/// How fast a node that finds itself cut off sends its clients elsewhere.
const ISOLATION_DRAIN: Duration = Duration::from_secs(1);

/// A node cut off from the farm asks its clients to move to the rest of it (`migrate`, paced over
/// [`ISOLATION_DRAIN`]; a client without the feature is closed with `4000`). Those that reach
/// another node move make-before-break and resume there from their positions; those that cannot
/// stay, told the feed is partial, and are not closed for it. Once back in touch, the node
/// forgets the moves not made and fetches what its streams missed meanwhile.
async fn follow_isolation(shared: Arc<Shared>, mut isolated: watch::Receiver<bool>) {
    let mut moving: Option<CancellationToken> = None;
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            changed = isolated.changed() => if changed.is_err() { return },
        }
        if *isolated.borrow_and_update() {
            let cancel = shared.cancel.child_token();
            moving = Some(cancel.clone());
            shared.tracker.spawn(rebalance::move_all(
                shared.clone(),
                ISOLATION_DRAIN,
                rebalance::Why::CutOff,
                cancel,
            ));
        } else {
            if let Some(moving) = moving.take() {
                moving.cancel();
            }
            shared.hub.forget_moves();
            shared.move_clock.forget();
            shared.broker.catch_up().await;
        }
    }
}

/// Binds the HTTP/WebSocket listener with room for `backlog` connections not yet accepted.
fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does on Unix: a restarted node rebinds at once despite TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    #[cfg(target_os = "linux")]
    if let Some(cap) = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        && cap < backlog
    {
        warn!(
            listen_backlog = backlog,
            somaxconn = cap,
            "the kernel caps the listen backlog at net.core.somaxconn"
        );
    }
    socket.listen(backlog)
}

/// This machine's wall clock in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    streamfarm_core::time::unix_ms(SystemTime::now())
}

/// A running node. Dropping it stops the node abruptly; [`NodeHandle::shutdown`] stops it
/// gracefully.
pub struct NodeHandle {
    shared: Arc<Shared>,
    listen_addr: SocketAddr,
    gossip_addr: SocketAddr,
    /// The DNS responder, answering from `farm_rx`, when `dns` is configured.
    dns: Option<DnsServer>,
}

impl NodeHandle {
    /// Validates `config`, binds the listener and gossip sockets, and starts serving.
    pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
        config.validate()?;
        let auth = auth::Auth::from_config(&config)?;
        let listener = bind_listener(config.listen, config.listen_backlog).map_err(|source| {
            NodeError::Listen {
                addr: config.listen,
                source,
            }
        })?;
        let listen_addr = listener.local_addr().map_err(|source| NodeError::Listen {
            addr: config.listen,
            source,
        })?;
        // Gossip goes over UDP, so by default it shares the listener's port number.
        let gossip_addr = config.gossip.unwrap_or(listen_addr);
        let url = config.stream_url(listen_addr);
        let stream_path = config.stream_path(listen_addr);
        let me = membership::SelfInfo {
            name: config.name.clone(),
            url: url.clone(),
            relay_url: format!(
                "{}://{listen_addr}{}",
                if config.tls() { "wss" } else { "ws" },
                http::RELAY_PATH
            ),
            priority: config.priority.clone(),
            capacity: config.capacity.unwrap_or(config.max_connections as u64),
        };
        let keys = config
            .farm_secret_bytes()?
            .map(|secret| trust::FarmKeys::derive(&secret, &config.cluster));
        if keys.is_none() {
            warn!(
                "no farm secret: gossip and relay links between nodes are NOT authenticated; anyone who can reach this node's ports can read every message, inject messages and rewrite the farm list (set farm_secret or farm_secret_file on every node, see SECURITY.md)"
            );
        }
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::default());
        let hub = Arc::new(Hub::new(metrics.clone(), config.history_limits()));
        let (status_tx, status_rx) = watch::channel(Status::Up);
        // Listed at once, before the first gossip round.
        let initial = FarmList::new(vec![membership::self_entry(&me, Status::Up, 0, 0.0)]);
        let (farm_tx, farm_rx) = watch::channel(initial);
        let (members_tx, members_rx) = watch::channel(0);
        let (isolated_tx, isolated_rx) = watch::channel(false);
        let link_ends = Arc::new(relay::LinkEnds::default());
        let (peers_tx, peers_rx) = watch::channel(relay::Peers::default());
        let membership_loop = membership::Loop {
            setup: membership::GossipSetup {
                config: config.clone(),
                me,
                addr: gossip_addr,
                transport: Arc::new(trust::SignedUdp::new(
                    keys.clone(),
                    metrics.gossip_rejected.clone(),
                )),
            },
            metrics: metrics.clone(),
            hub: hub.clone(),
            status_rx,
            farm_tx,
            members_tx,
            peers_tx,
            gossip_interval: config.gossip_interval(),
            failure_timeout: config.failure_timeout(),
            alone: config.join.is_empty(),
            isolated_tx,
            link_ends: link_ends.clone(),
        };
        // Gossip runs from here; dropping `membership` (an early return) stops it.
        let membership = membership_loop
            .start(cancel.clone())
            .await
            .map_err(|message| NodeError::Gossip {
                addr: gossip_addr,
                message,
            })?;
        let dns = match config.dns_config() {
            Some(dns_config) => Some(DnsServer::start(dns_config, farm_rx.clone()).await?),
            None => None,
        };
        tracker.spawn(membership);
        let (broker_input, broker_inbox) = Broker::channel();
        // TLS: loaded now, so that a bad pair stops the start; reloaded while the node runs. The
        // relay links of a TLS node are TLS too.
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(
                tls::start_reloading(
                    cert.clone(),
                    key.clone(),
                    Duration::from_millis(config.tls_reload_ms),
                    cancel.clone(),
                    &tracker,
                )
                .map_err(|problem| ConfigError::Invalid {
                    field: "tls_cert",
                    problem,
                })?,
            ),
            _ => None,
        };
        let relay_roots = |field| match &config.relay_ca_file {
            None => Ok(None),
            Some(path) => tls::load_roots(path)
                .map(Some)
                .map_err(|problem| ConfigError::Invalid { field, problem }),
        };
        let dialer = tls::relay_dialer(
            relay_roots("relay_ca_file")?,
            tls.clone().filter(|_| config.relay_mtls),
        )
        .map_err(|problem| ConfigError::Invalid {
            field: "relay_ca_file",
            problem,
        })?;
        let server_tls = match &tls {
            None => None,
            Some(resolver) => Some(
                tls::server_config(
                    resolver.clone(),
                    relay_roots("relay_ca_file")?.filter(|_| config.relay_mtls),
                )
                .map_err(|problem| ConfigError::Invalid {
                    field: "relay_ca_file",
                    problem,
                })?,
            ),
        };
        // One relay: the embedded one (links between the nodes), or NATS (no links at all).
        let mut embedded = None;
        let relay: Arc<dyn relay::Relay> = match config.nats_relay()? {
            None => {
                let relay = EmbeddedRelay::start(
                    config.name.clone(),
                    hub.clone(),
                    broker_input.clone(),
                    link_ends.clone(),
                    metrics.clone(),
                    relay::LinkSettings::new(
                        &config,
                        keys.clone().map(trust::RelayAuth::new),
                        dialer,
                    ),
                    peers_rx.clone(),
                    cancel.clone(),
                    &tracker,
                );
                embedded = Some(relay.clone());
                relay
            }
            Some(settings) => relay::NatsRelay::start(
                settings,
                relay::NatsParts {
                    name: config.name.clone(),
                    hub: hub.clone(),
                    broker: broker_input.clone(),
                    link_ends: link_ends.clone(),
                    metrics: metrics.clone(),
                    farm: farm_rx.clone(),
                    auth: keys.clone().map(trust::NatsAuth::new),
                    queue: config.relay_queue,
                    queue_bytes: config.relay_queue_bytes,
                    failure_timeout: config.failure_timeout(),
                    history_bytes: config.history_bytes,
                },
                cancel.clone(),
                &tracker,
            )
            .await
            .map_err(NodeError::Relay)?,
        };

        let broker = Broker::start(
            config.name.clone(),
            (broker_input, broker_inbox),
            hub.clone(),
            metrics.clone(),
            relay,
            farm_rx.clone(),
            peers_rx.clone(),
            link_ends.clone(),
            config.history_limits(),
            config.publish_timeout(),
            cancel.clone(),
            &tracker,
        );
        let descriptors = listener::descriptor_limit();
        let stream_cap = listener::stream_limit(config.max_connections, descriptors);
        let shared = Arc::new(Shared {
            auth,
            connection_limit: Arc::new(Semaphore::new(stream_cap)),
            relay_handshakes: Arc::new(Semaphore::new(RELAY_HANDSHAKES)),
            config,
            url,
            metrics,
            hub,
            broker,
            embedded,
            status: status_tx,
            farm_rx,
            handed_out: membership::HandedOut::default(),
            members_rx,
            isolated_rx: isolated_rx.clone(),
            peers_rx,
            link_ends,
            drain: Mutex::new(None),
            move_clock: rebalance::MoveClock::default(),
            sse: sse::Streams::default(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        });
        shared
            .tracker
            .spawn(follow_isolation(shared.clone(), isolated_rx));
        shared.tracker.spawn(session::follow_node(shared.clone()));
        shared.tracker.spawn(rebalance::run(shared.clone()));
        let router = http::router(shared.clone(), &stream_path);
        let listener_tls = server_tls.map(|config| listener::Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            plain_router: http::plain_router(shared.clone()),
        });
        tracker.spawn(listener::serve(
            listener,
            router,
            listener_tls,
            shared.config.handshake_timeout(),
            {
                // What streams leave of the descriptors (see `listener`).
                let streams = shared.connection_limit.clone();
                let cap = stream_cap;
                Arc::new(move || {
                    listener::http_room(descriptors, cap - streams.available_permits())
                })
            },
            cancel.clone(),
        ));
        info!(
            name = %shared.config.name,
            listen = %listen_addr,
            gossip = %gossip_addr,
            url = %shared.url,
            "node started"
        );
        Ok(NodeHandle {
            shared,
            listen_addr,
            gossip_addr,
            dns,
        })
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.shared.config
    }

    /// The address the HTTP/WebSocket listener is bound to (the actual port when 0 was asked).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// The UDP address of gossip.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip_addr
    }

    /// The address the DNS responder answers on (UDP and TCP), when `dns` is configured.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().map(DnsServer::local_addr)
    }

    /// The streaming url this node advertises.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// The live farm list as this node sees it; changes whenever a member's facts change.
    pub fn farm(&self) -> watch::Receiver<FarmList> {
        self.shared.farm_rx.clone()
    }

    /// This node's status.
    pub fn status(&self) -> Status {
        *self.shared.status.borrow()
    }

    /// Sets this node's status, as `POST /admin/status` does.
    pub fn set_status(&self, status: Status) {
        self.shared.set_status(status);
    }

    /// Open streaming connections.
    pub fn users(&self) -> u64 {
        self.shared.hub.users()
    }

    /// The node's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Publishes a UTF-8 message to `topic` farm-wide, as `POST /publish/{topic}` does, and
    /// waits until it is stored and sent out; returns its position.
    pub async fn publish(
        &self,
        topic: &str,
        message: &str,
    ) -> Result<streamfarm_core::protocol::Position, String> {
        self.shared
            .broker
            .publish(topic, message.to_string(), Encoding::Utf8, None)
            .await
            .map_err(|err| err.to_string())
    }

    /// Graceful stop: announce `DRAINING`, move every client to other servers paced over
    /// `shutdown_drain_ms` (make-before-break `migrate`; `4000` for clients that cannot follow
    /// one), wait up to `shutdown_grace_ms` for them to leave, close the rest with `GOING_AWAY`,
    /// announce `DOWN`, then stop every task.
    pub async fn shutdown(mut self) {
        let shared = self.shared.clone();
        info!(name = %shared.config.name, "shutting down");
        // Not `set_status`: the moves below are the shutdown's, over its own period.
        if let Some(token) = shared
            .drain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            token.cancel();
        }
        shared.status.send_replace(Status::Draining);
        if shared.hub.users() > 0 {
            // The others must see this node DRAINING (its target 0) before its clients arrive.
            tokio::time::sleep(shared.config.gossip_interval() * ANNOUNCE_ROUNDS).await;
            rebalance::move_all(
                shared.clone(),
                shared.config.shutdown_drain(),
                rebalance::Why::Shutdown,
                shared.cancel.clone(),
            )
            .await;
            let deadline = tokio::time::Instant::now() + shared.config.shutdown_grace();
            while self.users() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drain::run(
                shared.hub.sessions(),
                Duration::ZERO,
                close::GOING_AWAY,
                "node shutting down",
                shared.cancel.clone(),
            )
            .await;
            let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
            while self.users() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        shared.status.send_replace(Status::Down);
        tokio::time::sleep(shared.config.gossip_interval() * ANNOUNCE_ROUNDS).await;
        shared.cancel.cancel();
        shared.tracker.close();
        if tokio::time::timeout(CLOSE_GRACE, shared.tracker.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not stop in time");
        }
        if let Some(dns) = self.dns.take()
            && tokio::time::timeout(CLOSE_GRACE, dns.shutdown())
                .await
                .is_err()
        {
            warn!("DNS responder did not stop in time");
        }
        info!(name = %shared.config.name, "stopped");
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        // The membership task stops gossip; if the runtime is gone, dropping it aborts gossip.
        self.shared.cancel.cancel();
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The listen backlog the kernel applies to `listener`, as `ss` reports it (its `Send-Q`
    /// column, for a listening socket). `ss` is iproute2's, on every Linux with `ip`.
    fn kernel_backlog(listener: &TcpListener) -> u32 {
        let port = listener.local_addr().unwrap().port();
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .next()
            .unwrap_or_else(|| panic!("ss lists :{port}: {text:?}"));
        // State Recv-Q Send-Q Local Peer
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn the_configured_backlog_reaches_the_listening_socket() {
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let default = NodeConfig::new("a").listen_backlog;
        for backlog in [7, 300, default] {
            let listener = bind_listener(addr, backlog).unwrap();
            assert_eq!(kernel_backlog(&listener), backlog.min(somaxconn));
        }
    }
}
