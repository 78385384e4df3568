//! Node configuration: one struct, read from TOML, with a named default for every optional field.
//!
//! The CLI layers its sources as flag > `STREAMFARM_*` environment > `--config` file > default:
//! it parses the file with [`NodeConfig::from_toml`] and then overwrites the fields the user gave
//! on the command line or in the environment. Unknown keys are errors, so a typo in a config file
//! is reported instead of silently ignored.
//!
//! ```
//! use streamfarm_node::NodeConfig;
//! let config = NodeConfig::from_toml(r#"
//!     name = "a"
//!     listen = "127.0.0.1:7400"
//!     join = ["127.0.0.1:7500"]
//! "#).unwrap();
//! assert_eq!(config.priority, "A");
//! assert_eq!(config.stream_url(config.listen), "ws://127.0.0.1:7400/stream");
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything a node needs to start. Durations are whole milliseconds (`*_ms`), except the DNS
/// TTL, which DNS counts in whole seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name, unique in the farm; also its gossip identity.
    pub name: String,
    /// TCP address of the HTTP/WebSocket listener. Port 0 picks a free port.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// UDP address for gossip. Default: the listen address (same IP and port number, over UDP).
    #[serde(default)]
    pub gossip: Option<SocketAddr>,
    /// Gossip addresses (`host:port`) of nodes to join through; none starts a new farm.
    #[serde(default)]
    pub join: Vec<String>,
    /// Priority group label (`A` is preferred to `B`).
    #[serde(default = "default_priority")]
    pub priority: String,
    /// Streaming url advertised to clients. Default `ws://LISTEN/stream` (with the actual port).
    /// Its path is where the node serves the WebSocket.
    #[serde(default)]
    pub url: Option<String>,
    /// Farm identity: nodes only gossip with nodes of the same cluster.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Users advertised as capacity. Default: `max_connections`.
    #[serde(default)]
    pub capacity: Option<u64>,
    /// How often the node gossips with its peers.
    #[serde(default = "default_gossip_interval_ms")]
    pub gossip_interval_ms: u64,
    /// A peer whose gossip heartbeat has not advanced for this long is listed `DOWN`.
    #[serde(default = "default_failure_timeout_ms")]
    pub failure_timeout_ms: u64,
    /// The node pings a client it has sent nothing to for this long; clients should do the same.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// The node closes a connection that sent nothing for this long.
    #[serde(default = "default_heartbeat_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
    /// Connections the kernel may hold ready for the listener before it accepts them (the listen
    /// backlog). After a mass failover every client of a dead node dials the survivors at once;
    /// a full queue drops their SYNs, and each dropped client waits a 1 s SYN retry. Linux caps it
    /// at `net.core.somaxconn`.
    #[serde(default = "default_listen_backlog")]
    pub listen_backlog: u32,
    /// Most streaming connections held at once; more are refused with `SERVER_FULL`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest WebSocket message accepted from a client, in bytes.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Frames queued toward one client before it is closed as a slow consumer.
    #[serde(default = "default_send_queue")]
    pub send_queue: usize,
    /// Most topics one connection may subscribe to at once.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: usize,
    /// Frames queued toward one peer node before that relay link is reset.
    #[serde(default = "default_relay_queue")]
    pub relay_queue: usize,
    /// Bytes queued toward one client before it is closed as a slow consumer (`4001`): the most
    /// memory one client that stops reading can hold on the node, whatever its frames' size
    /// (frames handed to the socket count until the socket has taken them).
    #[serde(default = "default_send_queue_bytes")]
    pub send_queue_bytes: usize,
    /// Bytes queued toward one peer node before that relay link is reset.
    #[serde(default = "default_relay_queue_bytes")]
    pub relay_queue_bytes: usize,
    /// Most topics in this node's interest (topics its clients subscribe to), and in the
    /// interest a peer node may declare on a relay link. A subscription beyond it is refused
    /// (`too_many_topics`); a peer beyond it loses its link.
    #[serde(default = "default_max_interest_topics")]
    pub max_interest_topics: usize,
    /// How long a new TCP connection may take to send its HTTP request head (and a keep-alive
    /// connection to send the next one), and a relay link to complete its handshake: silent and
    /// slowloris connections are closed after it.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// The farm secret (at least 16 bytes; 32 random bytes are a good choice): authenticates
    /// gossip and relay links between nodes (`SECURITY.md`). Every node of the farm needs the
    /// same one. Without it (and without `farm_secret_file`) node traffic is not authenticated.
    #[serde(default)]
    pub farm_secret: Option<Secret>,
    /// A file holding the farm secret (trailing newline ignored): keeps it out of the config
    /// file, the command line and the environment. Not with `farm_secret`.
    #[serde(default)]
    pub farm_secret_file: Option<PathBuf>,
    /// Run without a farm secret although the listen or gossip address is not loopback: node
    /// traffic is then open to anyone who reaches the ports. Without it such a node refuses to
    /// start (secure by default); loopback farms need neither.
    #[serde(default)]
    pub insecure: bool,
    /// Most bytes of history kept per topic (on its sequencer, its replica, and every node
    /// delivering it), for clients that resume after a failover.
    #[serde(default = "default_history_bytes")]
    pub history_bytes: usize,
    /// Messages older than this are dropped from a topic's history.
    #[serde(default = "default_history_age_ms")]
    pub history_age_ms: u64,
    /// How long a publish may wait for its topic's sequencer and replica before it is given up
    /// (`POST /publish` answers `504`); it covers a sequencer's failure and detection.
    #[serde(default = "default_publish_timeout_ms")]
    pub publish_timeout_ms: u64,
    /// Whether clients may publish over the WebSocket (`pub` frames).
    #[serde(default = "default_true")]
    pub allow_client_publish: bool,
    /// Period over which a `DRAINING` node closes its connections.
    #[serde(default = "default_drain_period_ms")]
    pub drain_period_ms: u64,
    /// Period over which a node shutting down moves (or closes) its connections.
    #[serde(default = "default_shutdown_drain_ms")]
    pub shutdown_drain_ms: u64,
    /// How long shutdown waits, after the paced moves, for the clients told to move to leave
    /// before it closes them with `1001`: with `shutdown_drain_ms`, the bound on a graceful stop.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Whether this node moves its surplus clients to servers under their fair share (active
    /// rebalancing, see `streamfarm_core::balance`).
    #[serde(default = "default_true")]
    pub rebalance: bool,
    /// Most clients this node moves per second when rebalancing (jittered).
    #[serde(default = "default_rebalance_rate")]
    pub rebalance_rate: f64,
    /// How far above its fair share a node may be, as a fraction of it, before it moves clients.
    #[serde(default = "default_rebalance_tolerance")]
    pub rebalance_tolerance: f64,
    /// A connection younger than this is not moved, and a node that received a moved client
    /// within it does not send any: no client is moved twice within it, and no node switches
    /// from receiving to sending within it.
    #[serde(default = "default_rebalance_cooldown_ms")]
    pub rebalance_cooldown_ms: u64,
    /// How long a client told to move (`migrate`) has to leave before it is closed with `4000`.
    #[serde(default = "default_migrate_deadline_ms")]
    pub migrate_deadline_ms: u64,
    /// Bearer token for `POST /admin/status`; without one the admin API is disabled. At least
    /// 16 characters.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Keys that verify client connection tokens (JWT), by `kid` (`docs/AUTH.md`). None: the
    /// node checks no tokens and every client may do everything (as before tokens existed).
    #[serde(default)]
    pub auth_keys: Vec<crate::auth::AuthKey>,
    /// When set, a token's `aud` must name it.
    #[serde(default)]
    pub auth_audience: Option<String>,
    /// When set, a token's `iss` must be it.
    #[serde(default)]
    pub auth_issuer: Option<String>,
    /// Clock skew allowed when checking `exp`, `nbf` and `iat`, in whole seconds.
    #[serde(default = "default_auth_leeway_s")]
    pub auth_leeway_s: u64,
    /// With `auth_keys` set: whether clients without a token may connect (and subscribe to
    /// `anonymous_topics`, publish nothing). Off by default.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Topic patterns anonymous clients may subscribe to (default `**`: all).
    #[serde(default = "default_anonymous_topics")]
    pub anonymous_topics: Vec<String>,
    /// Bearer tokens that may `POST /publish/{topic}` on any topic (at least 16 characters
    /// each). With neither these nor `auth_keys`, publishing is open.
    #[serde(default)]
    pub publish_tokens: Vec<String>,
    /// PEM certificate chain: with `tls_key`, clients connect over `wss://` and `https://`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// How often the node looks at the certificate and key files for changes, to serve the new
    /// ones without a restart.
    #[serde(default = "default_tls_reload_ms")]
    pub tls_reload_ms: u64,
    /// PEM CA certificates that peer nodes' certificates must chain to, on the relay links of a
    /// TLS farm; a peer's certificate must then name the peer (a DNS subject alternative name
    /// equal to its node name). Without it, relay links are still TLS but their certificates are
    /// not checked: the farm secret authenticates each link and is bound to its TLS session.
    #[serde(default)]
    pub relay_ca_file: Option<PathBuf>,
    /// Mutual TLS on relay links: a node dialing this one must present a certificate that chains
    /// to `relay_ca_file` and names the node it says it is; this node presents `tls_cert` when it
    /// dials. Needs `tls_cert`, `tls_key` and `relay_ca_file`.
    #[serde(default)]
    pub relay_mtls: bool,
    /// UDP and TCP address of the built-in DNS responder (`docs/DNS.md`); none runs none.
    #[serde(default)]
    pub dns: Option<SocketAddr>,
    /// The service name the DNS responder answers (`farm.example.com`); required with `dns`.
    #[serde(default)]
    pub service_name: Option<String>,
    /// TTL of the DNS answers, in whole seconds: short, so a node that goes DOWN leaves caches soon.
    #[serde(default = "default_dns_ttl")]
    pub dns_ttl: u64,
    /// Origins whose pages may read `GET /farm` (CORS): `*` (the default; the list is public) or
    /// `scheme://host[:port]` values. Empty: no other origin.
    #[serde(default = "default_cors_farm_origins")]
    pub cors_farm_origins: Vec<String>,
    /// Origins whose pages may `POST /publish/{topic}` (CORS). Default none: publishing changes
    /// state, so it is opened to browsers only on purpose.
    #[serde(default)]
    pub cors_publish_origins: Vec<String>,
    /// How messages travel between nodes: `embedded` (the default: links between the nodes
    /// themselves, a full mesh) or a NATS server to relay through —
    /// `nats://[user:pass@]host:port` (or `tls://…`), several separated by commas — for farms too
    /// large for a full mesh (`docs/NATS.md`).
    #[serde(default = "default_relay")]
    pub relay: String,
    /// With a NATS relay: the first tokens of every subject the farm uses on NATS (default
    /// `streamfarm.` and the cluster name), so that several farms can share one NATS.
    #[serde(default)]
    pub relay_subject_prefix: Option<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}
fn default_priority() -> String {
    "A".to_string()
}
fn default_cluster() -> String {
    "streamfarm".to_string()
}
fn default_gossip_interval_ms() -> u64 {
    100
}
fn default_failure_timeout_ms() -> u64 {
    2_000
}
fn default_heartbeat_interval_ms() -> u64 {
    1_000
}
fn default_heartbeat_timeout_ms() -> u64 {
    3_000
}
fn default_listen_backlog() -> u32 {
    4096
}
fn default_max_connections() -> usize {
    100_000
}
fn default_max_frame_bytes() -> usize {
    64 * 1024
}
fn default_max_subscriptions() -> usize {
    1024
}
/// Frames, not bytes: a queued frame is a pointer to a buffer shared with every other
/// subscriber, so a deep queue costs little, and a publisher's burst must fit in it.
fn default_send_queue() -> usize {
    8192
}
/// Frames, like `send_queue`; the bound that matters is `relay_queue_bytes`. A subscription of
/// many new topics at once sends a few small frames per topic to each peer: the queue must hold
/// as many as the bytes allow, or a link is reset for frames that would fit.
fn default_relay_queue() -> usize {
    1 << 20
}
/// 4 MiB: a few seconds of a busy topic for a client that is merely slow; the bound on what a
/// client that never reads costs.
fn default_send_queue_bytes() -> usize {
    4 << 20
}
/// 64 MiB: a link carries every topic a peer wants; a peer that stops reading costs no more.
fn default_relay_queue_bytes() -> usize {
    64 << 20
}
/// A million: the topics of a large market-data feed. Every peer holds this node's interest
/// (about the topic's name in bytes per topic), and the node holds what its subscribers need.
fn default_max_interest_topics() -> usize {
    1 << 20
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
/// 1 MiB: about 10 000 small messages, or a few seconds of a busy topic.
fn default_history_bytes() -> usize {
    1 << 20
}
fn default_history_age_ms() -> u64 {
    300_000
}
fn default_publish_timeout_ms() -> u64 {
    10_000
}
fn default_true() -> bool {
    true
}
fn default_drain_period_ms() -> u64 {
    10_000
}
fn default_shutdown_drain_ms() -> u64 {
    1_000
}
fn default_shutdown_grace_ms() -> u64 {
    5_000
}
fn default_rebalance_rate() -> f64 {
    50.0
}
fn default_rebalance_tolerance() -> f64 {
    0.03
}
fn default_rebalance_cooldown_ms() -> u64 {
    10_000
}
fn default_migrate_deadline_ms() -> u64 {
    10_000
}
fn default_cors_farm_origins() -> Vec<String> {
    vec!["*".to_string()]
}
fn default_auth_leeway_s() -> u64 {
    5
}
fn default_anonymous_topics() -> Vec<String> {
    vec!["**".to_string()]
}
fn default_tls_reload_ms() -> u64 {
    5_000
}
fn default_relay() -> String {
    EMBEDDED_RELAY.to_string()
}
fn default_dns_ttl() -> u64 {
    streamfarm_dns::DEFAULT_TTL.as_secs()
}

/// The `relay` value of the embedded relay.
pub const EMBEDDED_RELAY: &str = "embedded";

/// Largest `max_frame_bytes` accepted: beyond it a frame could not be buffered safely (and a
/// value that overflows once the JSON envelope is added is caught).
const MAX_FRAME_BYTES: usize = 64 << 20;
/// Longest node name, in bytes.
const MAX_NAME_BYTES: usize = 128;

/// What is wrong with a node name, if anything: it appears in lists, logs, URLs and gossip, so it
/// is printable, without spaces, and short.
pub(crate) fn check_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Some(format!("must be at most {MAX_NAME_BYTES} bytes"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '&' | '?' | '#' | '/' | '%'))
    {
        return Some(format!(
            "{name:?} contains {bad:?}: names are printable, without spaces or any of & ? # / %"
        ));
    }
    None
}

/// Checks a `join` seed: `host:port`, with a port number.
fn check_seed(seed: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{seed:?} is not host:port ({why})"));
    if seed.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = seed.rsplit_once(':') else {
        return bad("no port");
    };
    if port.parse::<u16>().is_err() {
        return bad("the port is not a number from 0 to 65535");
    }
    if host.is_empty()
        || host.len() > 253
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return bad("the host is neither an IP address nor a DNS name");
    }
    Ok(())
}

/// A secret value: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

/// Longest DNS TTL accepted, seconds: longer would let caches hand out dead nodes for minutes
/// (and a value in milliseconds by mistake would be caught).
const MAX_DNS_TTL: u64 = 300;

/// The configuration is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML text did not parse or has unknown keys.
    #[error("config: {0}")]
    Toml(#[from] toml::de::Error),
    /// A value is out of its range.
    #[error("config: {field}: {problem}")]
    Invalid {
        /// The offending key.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl NodeConfig {
    /// A config with this name and every other field at its default.
    pub fn new(name: impl Into<String>) -> Self {
        NodeConfig {
            name: name.into(),
            listen: default_listen(),
            gossip: None,
            join: Vec::new(),
            priority: default_priority(),
            url: None,
            cluster: default_cluster(),
            capacity: None,
            gossip_interval_ms: default_gossip_interval_ms(),
            failure_timeout_ms: default_failure_timeout_ms(),
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            heartbeat_timeout_ms: default_heartbeat_timeout_ms(),
            listen_backlog: default_listen_backlog(),
            max_connections: default_max_connections(),
            max_frame_bytes: default_max_frame_bytes(),
            send_queue: default_send_queue(),
            max_subscriptions: default_max_subscriptions(),
            relay_queue: default_relay_queue(),
            send_queue_bytes: default_send_queue_bytes(),
            relay_queue_bytes: default_relay_queue_bytes(),
            max_interest_topics: default_max_interest_topics(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            farm_secret: None,
            farm_secret_file: None,
            insecure: false,
            history_bytes: default_history_bytes(),
            history_age_ms: default_history_age_ms(),
            publish_timeout_ms: default_publish_timeout_ms(),
            allow_client_publish: true,
            drain_period_ms: default_drain_period_ms(),
            shutdown_drain_ms: default_shutdown_drain_ms(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            rebalance: true,
            rebalance_rate: default_rebalance_rate(),
            rebalance_tolerance: default_rebalance_tolerance(),
            rebalance_cooldown_ms: default_rebalance_cooldown_ms(),
            migrate_deadline_ms: default_migrate_deadline_ms(),
            admin_token: None,
            auth_keys: Vec::new(),
            auth_audience: None,
            auth_issuer: None,
            auth_leeway_s: default_auth_leeway_s(),
            allow_anonymous: false,
            anonymous_topics: default_anonymous_topics(),
            publish_tokens: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_reload_ms: default_tls_reload_ms(),
            relay_ca_file: None,
            relay_mtls: false,
            dns: None,
            service_name: None,
            dns_ttl: default_dns_ttl(),
            cors_farm_origins: default_cors_farm_origins(),
            cors_publish_origins: Vec::new(),
            relay: default_relay(),
            relay_subject_prefix: None,
        }
    }

    /// Parses a TOML config; unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Checks the ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: &str| {
            Err(ConfigError::Invalid {
                field,
                problem: problem.to_string(),
            })
        };
        if let Some(problem) = check_name(&self.name) {
            return invalid("name", &problem);
        }
        if self.cluster.is_empty() || self.cluster.chars().any(|c| c.is_control()) {
            return invalid("cluster", "must be non-empty, without control characters");
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1");
        }
        if let Some(token) = &self.admin_token
            && token.trim().is_empty()
        {
            return invalid(
                "admin_token",
                "must not be empty (leave it out to disable the admin API)",
            );
        }
        for seed in &self.join {
            if let Err(problem) = check_seed(seed) {
                return invalid("join", &problem);
            }
        }
        if self.send_queue_bytes < 64 * 1024 {
            return invalid("send_queue_bytes", "must be at least 65536");
        }
        if self.relay_queue_bytes < 1 << 20 {
            return invalid("relay_queue_bytes", "must be at least 1048576");
        }
        if self.max_interest_topics == 0 {
            return invalid("max_interest_topics", "must be at least 1");
        }
        if self.handshake_timeout_ms < 100 {
            return invalid("handshake_timeout_ms", "must be at least 100");
        }
        if self.farm_secret_bytes()?.is_none()
            && !self.insecure
            && let Some(exposed) = self.exposed_address()
        {
            return invalid(
                "farm_secret",
                &format!(
                    "{exposed} is not a loopback address and the node has no farm secret: make one with `streamfarm secret new PATH` and give every node --farm-secret-file PATH, or pass --insecure (insecure = true) to leave node traffic open"
                ),
            );
        }
        if self.priority.is_empty() || self.priority.contains(char::is_whitespace) {
            return invalid("priority", "must be a non-empty label without spaces");
        }
        if self.gossip_interval_ms == 0 {
            return invalid("gossip_interval_ms", "must be positive");
        }
        if self.failure_timeout_ms < 2 * self.gossip_interval_ms {
            return invalid(
                "failure_timeout_ms",
                "must be at least twice gossip_interval_ms",
            );
        }
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_timeout_ms <= self.heartbeat_interval_ms
        {
            return invalid(
                "heartbeat_timeout_ms",
                "must be greater than heartbeat_interval_ms, which must be positive",
            );
        }
        if self.listen_backlog == 0 || self.listen_backlog > i32::MAX as u32 {
            return invalid("listen_backlog", "must be between 1 and 2147483647");
        }
        if self.max_frame_bytes < 256 || self.max_frame_bytes > MAX_FRAME_BYTES {
            return invalid(
                "max_frame_bytes",
                &format!("must be between 256 and {MAX_FRAME_BYTES} (64 MiB)"),
            );
        }
        if self.send_queue == 0 || self.relay_queue == 0 {
            return invalid("send_queue", "queues must hold at least one frame");
        }
        if self.publish_timeout_ms < 100 {
            return invalid("publish_timeout_ms", "must be at least 100");
        }
        if !(self.rebalance_rate.is_finite() && self.rebalance_rate > 0.0) {
            return invalid(
                "rebalance_rate",
                "must be a positive number of moves per second",
            );
        }
        if !(0.0..=1.0).contains(&self.rebalance_tolerance) {
            return invalid("rebalance_tolerance", "must be a fraction between 0 and 1");
        }
        if self.migrate_deadline_ms < 100 {
            return invalid("migrate_deadline_ms", "must be at least 100");
        }
        if let Some(url) = &self.url
            && !(url.starts_with("ws://") || url.starts_with("wss://"))
        {
            return invalid("url", "must start with ws:// or wss://");
        }
        if let Some(token) = &self.admin_token {
            crate::auth::check_secret("admin_token", token)?;
        }
        for token in &self.publish_tokens {
            crate::auth::check_secret("publish_tokens", token)?;
        }
        if self.auth_leeway_s > 300 {
            return invalid("auth_leeway_s", "must be at most 300 (whole seconds)");
        }
        // Loads the keys: a missing file or a bad PEM is reported now, with the key named.
        crate::auth::Auth::from_config(self)?;
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return invalid("tls_key", "is required with tls_cert"),
            (None, Some(_)) => return invalid("tls_cert", "is required with tls_key"),
            (Some(cert), Some(key)) => {
                crate::tls::load(cert, key).map_err(|problem| ConfigError::Invalid {
                    field: "tls_cert",
                    problem,
                })?;
                if let Some(url) = &self.url
                    && !url.starts_with("wss://")
                {
                    return invalid("url", "must start with wss:// when tls_cert is set");
                }
            }
            (None, None) => {}
        }
        if self.tls_reload_ms < 100 {
            return invalid("tls_reload_ms", "must be at least 100");
        }
        if let Some(ca) = &self.relay_ca_file {
            if !self.tls() {
                return invalid("relay_ca_file", "needs tls_cert and tls_key");
            }
            crate::tls::load_roots(ca).map_err(|problem| ConfigError::Invalid {
                field: "relay_ca_file",
                problem,
            })?;
            // Peers are checked by name: the name must be one a certificate can carry.
            if rustls_pki_types::DnsName::try_from(self.name.as_str()).is_err() {
                return invalid(
                    "name",
                    "must be a DNS name (letters, digits, '-', '.') with relay_ca_file: peers check it against this node's certificate",
                );
            }
        }
        if self.relay_mtls && self.relay_ca_file.is_none() {
            return invalid("relay_mtls", "needs relay_ca_file (and tls_cert, tls_key)");
        }
        if self.dns.is_some() && self.service_name.as_deref().is_none_or(str::is_empty) {
            return invalid("service_name", "is required when dns is set");
        }
        if self.dns_ttl > MAX_DNS_TTL {
            return invalid("dns_ttl", "must be at most 300 (whole seconds)");
        }
        for (field, origins) in [
            ("cors_farm_origins", &self.cors_farm_origins),
            ("cors_publish_origins", &self.cors_publish_origins),
        ] {
            if let Some(bad) = origins.iter().find(|o| !crate::web::is_origin(o)) {
                return invalid(
                    field,
                    &format!("{bad:?} is neither * nor scheme://host[:port]"),
                );
            }
        }
        self.nats_relay()?;
        Ok(())
    }

    /// The NATS relay's settings when `relay` names NATS servers; `None` for the embedded relay.
    pub(crate) fn nats_relay(&self) -> Result<Option<crate::relay::NatsSettings>, ConfigError> {
        if self.relay == EMBEDDED_RELAY {
            return Ok(None);
        }
        crate::relay::NatsSettings::parse(
            &self.relay,
            self.relay_subject_prefix.as_deref(),
            &self.cluster,
        )
        .map(Some)
        .map_err(|(field, problem)| ConfigError::Invalid { field, problem })
    }

    /// The first of the listen and gossip addresses that is not loopback, if any: other machines
    /// may reach it, so node traffic through it needs the farm secret. An unspecified address
    /// (`0.0.0.0`, `::`) listens on every interface.
    pub fn exposed_address(&self) -> Option<SocketAddr> {
        [Some(self.listen), self.gossip]
            .into_iter()
            .flatten()
            .find(|addr| !addr.ip().is_loopback())
    }

    /// The farm secret, read from `farm_secret` or `farm_secret_file`; `None` when neither is set.
    pub fn farm_secret_bytes(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let invalid = |field, problem: String| ConfigError::Invalid { field, problem };
        let secret = match (&self.farm_secret, &self.farm_secret_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "farm_secret_file",
                    "give farm_secret or farm_secret_file, not both".into(),
                ));
            }
            (Some(secret), None) => (secret.0.as_bytes().to_vec(), "farm_secret"),
            (None, Some(path)) => {
                let text = std::fs::read(path).map_err(|err| {
                    invalid(
                        "farm_secret_file",
                        format!("cannot read {}: {err}", path.display()),
                    )
                })?;
                let mut text = text;
                while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    text.pop();
                }
                (text, "farm_secret_file")
            }
            (None, None) => return Ok(None),
        };
        let (bytes, field) = secret;
        if bytes.len() < crate::trust::MIN_SECRET_BYTES {
            return Err(invalid(
                field,
                format!(
                    "the farm secret must be at least {} bytes (it is {})",
                    crate::trust::MIN_SECRET_BYTES,
                    bytes.len()
                ),
            ));
        }
        Ok(Some(bytes))
    }

    /// See [`NodeConfig::handshake_timeout_ms`].
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The streaming url for a node listening on `bound` (the actual address, after port 0).
    pub fn stream_url(&self, bound: SocketAddr) -> String {
        match &self.url {
            Some(url) => url.clone(),
            None if self.tls() => format!("wss://{bound}/stream"),
            None => format!("ws://{bound}/stream"),
        }
    }

    /// Whether clients connect over TLS (`tls_cert` and `tls_key` set).
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some()
    }

    /// The HTTP path of the WebSocket: the path of the url, `/stream` by default.
    pub fn stream_path(&self, bound: SocketAddr) -> String {
        let url = self.stream_url(bound);
        match streamfarm_core::address::split_url(&url) {
            Ok(parts) if !parts.path.is_empty() => parts.path.to_string(),
            _ => "/".to_string(),
        }
    }

    /// See [`NodeConfig::gossip_interval_ms`].
    pub fn gossip_interval(&self) -> Duration {
        Duration::from_millis(self.gossip_interval_ms)
    }
    /// See [`NodeConfig::failure_timeout_ms`].
    pub fn failure_timeout(&self) -> Duration {
        Duration::from_millis(self.failure_timeout_ms)
    }
    /// See [`NodeConfig::heartbeat_interval_ms`].
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    /// See [`NodeConfig::heartbeat_timeout_ms`].
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }
    /// How much history a topic keeps: [`NodeConfig::history_bytes`] and
    /// [`NodeConfig::history_age_ms`].
    pub(crate) fn history_limits(&self) -> crate::broker::log::Limits {
        crate::broker::log::Limits {
            bytes: self.history_bytes,
            age: Duration::from_millis(self.history_age_ms),
        }
    }

    /// See [`NodeConfig::publish_timeout_ms`].
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
    /// See [`NodeConfig::drain_period_ms`].
    pub fn drain_period(&self) -> Duration {
        Duration::from_millis(self.drain_period_ms)
    }
    /// See [`NodeConfig::shutdown_drain_ms`].
    pub fn shutdown_drain(&self) -> Duration {
        Duration::from_millis(self.shutdown_drain_ms)
    }
    /// See [`NodeConfig::shutdown_grace_ms`].
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
    /// See [`NodeConfig::rebalance_cooldown_ms`].
    pub fn rebalance_cooldown(&self) -> Duration {
        Duration::from_millis(self.rebalance_cooldown_ms)
    }
    /// See [`NodeConfig::migrate_deadline_ms`].
    pub fn migrate_deadline(&self) -> Duration {
        Duration::from_millis(self.migrate_deadline_ms)
    }
    /// The DNS responder's settings, when `dns` is set.
    pub fn dns_config(&self) -> Option<streamfarm_dns::DnsConfig> {
        Some(streamfarm_dns::DnsConfig {
            listen: self.dns?,
            service_name: self.service_name.clone().unwrap_or_default(),
            ttl: Duration::from_secs(self.dns_ttl),
        })
    }
}

#[cfg(test)]
mod tests;
