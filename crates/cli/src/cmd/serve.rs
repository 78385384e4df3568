//! `streamfarm serve`: run a farm node until SIGTERM or Ctrl-C, then stop gracefully.
//!
//! Settings come from, in order of precedence: flags, `STREAMFARM_*` environment variables, the
//! TOML file of `--config`, defaults (see `crates/node/node.example.toml`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use streamfarm_node::{AuthKey, NodeConfig, NodeHandle};
use tracing::info;

/// Arguments of `streamfarm serve`. Each flag is also `STREAMFARM_<FLAG>` and a key of the file.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    // Boxed: the settings are many, and the subcommand enum keeps its variants small.
    #[command(flatten)]
    settings: Box<Settings>,
}

/// Every setting of `streamfarm serve`.
#[derive(Debug, clap::Args)]
struct Settings {
    /// TOML config file; flags and environment override it.
    #[arg(long, env = "STREAMFARM_CONFIG")]
    config: Option<PathBuf>,
    /// Node name, unique in the farm.
    #[arg(long, env = "STREAMFARM_NAME")]
    name: Option<String>,
    /// HTTP/WebSocket listen address (default 127.0.0.1:7400).
    #[arg(long, env = "STREAMFARM_LISTEN")]
    listen: Option<SocketAddr>,
    /// UDP gossip address (default: the listen address, same port number over UDP).
    #[arg(long, env = "STREAMFARM_GOSSIP")]
    gossip: Option<SocketAddr>,
    /// Gossip address of a node to join through; repeat for several (env: comma-separated).
    #[arg(long, env = "STREAMFARM_JOIN", value_delimiter = ',')]
    join: Vec<String>,
    /// Priority group label (default A).
    #[arg(long, env = "STREAMFARM_PRIORITY")]
    priority: Option<String>,
    /// Streaming url advertised to clients (default ws://LISTEN/stream).
    #[arg(long, env = "STREAMFARM_URL")]
    url: Option<String>,
    /// How messages travel between nodes: `embedded` (default: links between the nodes) or a
    /// NATS server to relay through, `nats://[user:pass@]host:port` (comma-separated for several).
    #[arg(long, env = "STREAMFARM_RELAY", hide_env_values = true)]
    relay: Option<String>,
    /// With a NATS relay: the prefix of the farm's subjects (default `streamfarm.CLUSTER`).
    #[arg(long, env = "STREAMFARM_RELAY_SUBJECT_PREFIX")]
    relay_subject_prefix: Option<String>,
    /// Cluster name; nodes only gossip within their cluster.
    #[arg(long, env = "STREAMFARM_CLUSTER")]
    cluster: Option<String>,
    /// Users advertised as capacity (default: max connections).
    #[arg(long, env = "STREAMFARM_CAPACITY")]
    capacity: Option<u64>,
    /// Gossip round period, ms.
    #[arg(long, env = "STREAMFARM_GOSSIP_INTERVAL_MS")]
    gossip_interval_ms: Option<u64>,
    /// A peer silent for this long is listed DOWN, ms.
    #[arg(long, env = "STREAMFARM_FAILURE_TIMEOUT_MS")]
    failure_timeout_ms: Option<u64>,
    /// The node pings an idle client after this long, ms.
    #[arg(long, env = "STREAMFARM_HEARTBEAT_INTERVAL_MS")]
    heartbeat_interval_ms: Option<u64>,
    /// The node closes a client silent for this long, ms.
    #[arg(long, env = "STREAMFARM_HEARTBEAT_TIMEOUT_MS")]
    heartbeat_timeout_ms: Option<u64>,
    /// Connections the kernel queues for the listener before they are accepted (default 4096;
    /// Linux caps it at net.core.somaxconn).
    #[arg(long, env = "STREAMFARM_LISTEN_BACKLOG")]
    listen_backlog: Option<u32>,
    /// Most streaming connections held at once.
    #[arg(long, env = "STREAMFARM_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Largest frame accepted from a client, bytes.
    #[arg(long, env = "STREAMFARM_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Frames queued toward one client before it is closed as a slow consumer.
    #[arg(long, env = "STREAMFARM_SEND_QUEUE")]
    send_queue: Option<usize>,
    /// Most topics one connection may subscribe to at once.
    #[arg(long, env = "STREAMFARM_MAX_SUBSCRIPTIONS")]
    max_subscriptions: Option<usize>,
    /// Frames queued toward one peer node before its relay link is reset.
    #[arg(long, env = "STREAMFARM_RELAY_QUEUE")]
    relay_queue: Option<usize>,
    /// Bytes queued toward one client before it is closed as a slow consumer (default 4 MiB).
    #[arg(long, env = "STREAMFARM_SEND_QUEUE_BYTES")]
    send_queue_bytes: Option<usize>,
    /// Bytes queued toward one peer node before its relay link is reset (default 64 MiB).
    #[arg(long, env = "STREAMFARM_RELAY_QUEUE_BYTES")]
    relay_queue_bytes: Option<usize>,
    /// Most topics in this node's interest, and in a peer's interest on a relay link.
    #[arg(long, env = "STREAMFARM_MAX_INTEREST_TOPICS")]
    max_interest_topics: Option<usize>,
    /// Deadline for a connection's HTTP request head and a relay link's handshake, ms.
    #[arg(long, env = "STREAMFARM_HANDSHAKE_TIMEOUT_MS")]
    handshake_timeout_ms: Option<u64>,
    /// Farm secret (at least 16 bytes) authenticating gossip and relay links; the same on every
    /// node. Prefer --farm-secret-file: a flag shows in the process list.
    #[arg(long, env = "STREAMFARM_FARM_SECRET", hide_env_values = true)]
    farm_secret: Option<String>,
    /// File holding the farm secret (trailing newline ignored).
    #[arg(long, env = "STREAMFARM_FARM_SECRET_FILE", value_name = "PATH")]
    farm_secret_file: Option<PathBuf>,
    /// Start without a farm secret although the listen or gossip address is not loopback:
    /// gossip and relay links are then open to anyone who reaches the ports.
    #[arg(long, env = "STREAMFARM_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    insecure: Option<bool>,
    /// Most bytes of history kept per topic, for clients that resume after a failover.
    #[arg(long, env = "STREAMFARM_HISTORY_BYTES")]
    history_bytes: Option<usize>,
    /// Messages older than this (milliseconds) are dropped from a topic's history.
    #[arg(long, env = "STREAMFARM_HISTORY_AGE_MS")]
    history_age_ms: Option<u64>,
    /// How long a publish may wait for its topic's sequencer and replica (milliseconds).
    #[arg(long, env = "STREAMFARM_PUBLISH_TIMEOUT_MS")]
    publish_timeout_ms: Option<u64>,
    /// Whether clients may publish over the WebSocket.
    #[arg(long, env = "STREAMFARM_ALLOW_CLIENT_PUBLISH")]
    allow_client_publish: Option<bool>,
    /// Period over which a DRAINING node closes its connections, ms.
    #[arg(long, env = "STREAMFARM_DRAIN_PERIOD_MS")]
    drain_period_ms: Option<u64>,
    /// Period over which a node shutting down moves (or closes) its connections, ms.
    #[arg(long, env = "STREAMFARM_SHUTDOWN_DRAIN_MS")]
    shutdown_drain_ms: Option<u64>,
    /// How long shutdown then waits for moving clients to leave before closing them, ms.
    #[arg(long, env = "STREAMFARM_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    /// Whether this node moves its surplus clients to servers under their fair share.
    #[arg(long, env = "STREAMFARM_REBALANCE")]
    rebalance: Option<bool>,
    /// Most clients moved per second when rebalancing (default 50).
    #[arg(long, env = "STREAMFARM_REBALANCE_RATE")]
    rebalance_rate: Option<f64>,
    /// Fraction above its fair share a node may hold before it moves clients (default 0.03).
    #[arg(long, env = "STREAMFARM_REBALANCE_TOLERANCE")]
    rebalance_tolerance: Option<f64>,
    /// No client is moved twice, and no node goes from receiving to sending, within this, ms.
    #[arg(long, env = "STREAMFARM_REBALANCE_COOLDOWN_MS")]
    rebalance_cooldown_ms: Option<u64>,
    /// How long a client told to move has before it is closed with 4000, ms.
    #[arg(long, env = "STREAMFARM_MIGRATE_DEADLINE_MS")]
    migrate_deadline_ms: Option<u64>,
    /// Bearer token for POST /admin/status (admin API disabled without one).
    #[arg(long, env = "STREAMFARM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// A key that verifies client tokens, as KID:ALG:FILE (ALG HS256 with FILE holding the
    /// secret, or ES256/RS256 with FILE the PEM public key); repeat for several (rotation).
    /// Any key makes tokens required (docs/AUTH.md).
    #[arg(
        long = "auth-key",
        env = "STREAMFARM_AUTH_KEYS",
        value_delimiter = ',',
        value_name = "KID:ALG:FILE"
    )]
    auth_keys: Vec<AuthKey>,
    /// When set, a token's `aud` claim must name it.
    #[arg(long, env = "STREAMFARM_AUTH_AUDIENCE")]
    auth_audience: Option<String>,
    /// When set, a token's `iss` claim must be it.
    #[arg(long, env = "STREAMFARM_AUTH_ISSUER")]
    auth_issuer: Option<String>,
    /// Clock skew allowed on exp, nbf and iat, whole seconds (default 5).
    #[arg(long, env = "STREAMFARM_AUTH_LEEWAY_S")]
    auth_leeway_s: Option<u64>,
    /// With --auth-key: also accept clients without a token (they may subscribe to
    /// --anonymous-topics and publish nothing).
    #[arg(long, env = "STREAMFARM_ALLOW_ANONYMOUS", num_args = 0..=1, default_missing_value = "true")]
    allow_anonymous: Option<bool>,
    /// Topic patterns anonymous clients may subscribe to, comma-separated (default **: all).
    #[arg(
        long,
        env = "STREAMFARM_ANONYMOUS_TOPICS",
        value_delimiter = ',',
        value_name = "PATTERN"
    )]
    anonymous_topics: Option<Vec<String>>,
    /// Bearer token allowed to POST /publish on any topic (at least 16 characters); repeat for
    /// several. With neither this nor --auth-key, publishing is open.
    #[arg(
        long = "publish-token",
        env = "STREAMFARM_PUBLISH_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    publish_tokens: Vec<String>,
    /// PEM certificate chain: with --tls-key, clients connect over wss:// and https://.
    #[arg(long, env = "STREAMFARM_TLS_CERT", value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "STREAMFARM_TLS_KEY", value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// How often the certificate files are checked for changes (reloaded without restart), ms.
    #[arg(long, env = "STREAMFARM_TLS_RELOAD_MS")]
    tls_reload_ms: Option<u64>,
    /// PEM CA certificates that peers' certificates must chain to (and name the peer) on the
    /// relay links of a TLS farm. Without it the farm secret authenticates those links.
    #[arg(long, env = "STREAMFARM_RELAY_CA_FILE", value_name = "PATH")]
    relay_ca_file: Option<PathBuf>,
    /// Mutual TLS on relay links: dialing peers must present a certificate naming them, chained
    /// to --relay-ca-file; this node presents --tls-cert.
    #[arg(long, env = "STREAMFARM_RELAY_MTLS", num_args = 0..=1, default_missing_value = "true")]
    relay_mtls: Option<bool>,
    /// UDP and TCP address of the built-in DNS responder (see docs/DNS.md); none runs none.
    #[arg(long, env = "STREAMFARM_DNS", value_name = "IP:PORT")]
    dns: Option<SocketAddr>,
    /// The service name the DNS responder answers (`farm.example.com`); required with --dns.
    #[arg(long, env = "STREAMFARM_SERVICE_NAME", value_name = "NAME")]
    service_name: Option<String>,
    /// TTL of the DNS answers, whole seconds (default 2).
    #[arg(long, env = "STREAMFARM_DNS_TTL", value_name = "SECONDS")]
    dns_ttl: Option<u64>,
    /// Origins whose pages may read GET /farm, comma-separated: * (default) or scheme://host[:port].
    #[arg(
        long,
        env = "STREAMFARM_CORS_FARM_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    cors_farm_origins: Option<Vec<String>>,
    /// Origins whose pages may POST /publish/{topic}, comma-separated (default none).
    #[arg(
        long,
        env = "STREAMFARM_CORS_PUBLISH_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    cors_publish_origins: Option<Vec<String>>,
}

impl Settings {
    /// The file's config (or defaults) with every given flag or variable laid over it.
    fn into_config(self) -> anyhow::Result<NodeConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                NodeConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?
            }
            None => {
                let name = self
                    .name
                    .clone()
                    .context("--name (or STREAMFARM_NAME, or name in --config) is required")?;
                NodeConfig::new(name)
            }
        };
        macro_rules! overlay {
            ($($field:ident),*) => {$(
                if let Some(value) = self.$field {
                    config.$field = value;
                }
            )*};
        }
        macro_rules! overlay_option {
            ($($field:ident),*) => {$(
                if self.$field.is_some() {
                    config.$field = self.$field;
                }
            )*};
        }
        overlay!(
            name,
            listen,
            priority,
            cluster,
            relay,
            gossip_interval_ms,
            failure_timeout_ms,
            heartbeat_interval_ms,
            heartbeat_timeout_ms,
            listen_backlog,
            max_connections,
            max_frame_bytes,
            send_queue,
            max_subscriptions,
            relay_queue,
            send_queue_bytes,
            relay_queue_bytes,
            max_interest_topics,
            handshake_timeout_ms,
            history_bytes,
            history_age_ms,
            publish_timeout_ms,
            allow_client_publish,
            drain_period_ms,
            shutdown_drain_ms,
            shutdown_grace_ms,
            rebalance,
            rebalance_rate,
            rebalance_tolerance,
            rebalance_cooldown_ms,
            migrate_deadline_ms,
            dns_ttl,
            cors_farm_origins,
            cors_publish_origins,
            auth_leeway_s,
            allow_anonymous,
            anonymous_topics,
            tls_reload_ms,
            relay_mtls,
            insecure
        );
        overlay_option!(
            gossip,
            url,
            relay_subject_prefix,
            capacity,
            admin_token,
            dns,
            service_name,
            auth_audience,
            auth_issuer,
            tls_cert,
            tls_key,
            relay_ca_file
        );
        if !self.auth_keys.is_empty() {
            config.auth_keys = self.auth_keys;
        }
        if !self.publish_tokens.is_empty() {
            config.publish_tokens = self.publish_tokens;
        }
        if self.farm_secret.is_some() && self.farm_secret_file.is_some() {
            anyhow::bail!("give --farm-secret or --farm-secret-file, not both");
        }
        // A secret given here replaces the file's, whichever way the file gave it.
        if let Some(secret) = self.farm_secret {
            config.farm_secret = Some(secret.into());
            config.farm_secret_file = None;
        }
        if self.farm_secret_file.is_some() {
            config.farm_secret_file = self.farm_secret_file;
            config.farm_secret = None;
        }
        if !self.join.is_empty() {
            config.join = self.join;
        }
        config.validate()?;
        Ok(config)
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = args.settings.into_config()?;
    let node = NodeHandle::start(config).await?;
    // One line on stdout that scripts can wait for.
    println!(
        "streamfarm node {} serving {} (listen {}, gossip {})",
        node.name(),
        node.url(),
        node.listen_addr(),
        node.gossip_addr()
    );
    if let Some(dns) = node.dns_addr() {
        println!(
            "streamfarm dns answering {} on {dns} (UDP and TCP)",
            node.config().service_name.as_deref().unwrap_or_default()
        );
    }
    wait_for_stop_signal().await?;
    info!("stop signal: shutting down gracefully");
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(unix)]
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("cannot watch Ctrl-C")?,
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_stop_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await.context("cannot watch Ctrl-C")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn auth_and_tls_flags_reach_the_config_and_weak_tokens_are_refused() {
        let dir =
            std::env::temp_dir().join(format!("streamfarm-serve-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("k1.secret");
        std::fs::write(&secret, "a-secret-of-at-least-32-bytes-0123456789\n").unwrap();
        let key = format!("k1:HS256:{}", secret.display());
        let cli = Cli::try_parse_from([
            "serve",
            "--name",
            "a",
            "--auth-key",
            &key,
            "--allow-anonymous",
            "--anonymous-topics",
            "public.**,news.*",
            "--publish-token",
            "publisher-token-0123456789",
        ])
        .unwrap();
        let config = cli.args.settings.into_config().unwrap();
        assert_eq!(config.auth_keys[0].kid, "k1");
        assert!(config.allow_anonymous);
        assert_eq!(config.anonymous_topics, vec!["public.**", "news.*"]);
        assert_eq!(config.publish_tokens.len(), 1);

        let cli =
            Cli::try_parse_from(["serve", "--name", "a", "--publish-token", "short"]).unwrap();
        let err = cli.args.settings.into_config().unwrap_err();
        assert!(err.to_string().contains("publish_tokens"), "{err}");
        let cli = Cli::try_parse_from(["serve", "--name", "a", "--admin-token", ""]).unwrap();
        let err = cli.args.settings.into_config().unwrap_err();
        assert!(err.to_string().contains("admin_token"), "{err}");
        let cli = Cli::try_parse_from(["serve", "--name", "a", "--tls-cert", "/nonexistent.pem"])
            .unwrap();
        let err = cli.args.settings.into_config().unwrap_err();
        assert!(err.to_string().contains("tls_key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("streamfarm-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        std::fs::write(
            &path,
            "name = \"file\"\npriority = \"B\"\nfailure_timeout_ms = 1500\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--name",
            "flag",
            "--join",
            "127.0.0.1:1",
            "--join",
            "127.0.0.1:2",
        ])
        .unwrap();
        let config = cli.args.settings.into_config().unwrap();
        assert_eq!(config.name, "flag");
        assert_eq!(config.priority, "B");
        assert_eq!(config.failure_timeout_ms, 1500);
        assert_eq!(config.join, vec!["127.0.0.1:1", "127.0.0.1:2"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_listen_backlog_comes_from_the_file_or_a_flag() {
        let dir = std::env::temp_dir().join(format!("streamfarm-backlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        std::fs::write(&path, "name = \"a\"\nlisten_backlog = 8192\n").unwrap();
        let from_file = |extra: &[&str]| {
            let mut argv = vec!["serve", "--config", path.to_str().unwrap()];
            argv.extend(extra);
            Cli::try_parse_from(argv)
                .unwrap()
                .args
                .settings
                .into_config()
                .unwrap()
                .listen_backlog
        };
        assert_eq!(from_file(&[]), 8192);
        assert_eq!(from_file(&["--listen-backlog", "16384"]), 16384);
        std::fs::remove_dir_all(&dir).unwrap();
        let cli = Cli::try_parse_from(["serve", "--name", "a", "--listen-backlog", "0"]).unwrap();
        let err = cli.args.settings.into_config().unwrap_err();
        assert!(err.to_string().contains("listen_backlog"), "{err}");
    }

    #[test]
    fn cors_origins_come_from_flags() {
        let cli = Cli::try_parse_from([
            "serve",
            "--name",
            "a",
            "--cors-publish-origins",
            "https://a.example.com,http://127.0.0.1:8080",
        ])
        .unwrap();
        let config = cli.args.settings.into_config().unwrap();
        assert_eq!(config.cors_farm_origins, vec!["*"]);
        assert_eq!(
            config.cors_publish_origins,
            vec!["https://a.example.com", "http://127.0.0.1:8080"]
        );
    }

    #[test]
    fn a_name_is_required() {
        let cli = Cli::try_parse_from(["serve"]).unwrap();
        let err = cli.args.settings.into_config().unwrap_err();
        assert!(err.to_string().contains("--name"), "{err}");
    }

    #[test]
    fn dns_flags_configure_the_responder() {
        let cli = Cli::try_parse_from([
            "serve",
            "--name",
            "a",
            "--dns",
            "127.0.0.1:8600",
            "--service-name",
            "farm.test",
            "--dns-ttl",
            "5",
        ])
        .unwrap();
        let dns = cli
            .args
            .settings
            .into_config()
            .unwrap()
            .dns_config()
            .unwrap();
        assert_eq!(dns.listen, "127.0.0.1:8600".parse().unwrap());
        assert_eq!(dns.service_name, "farm.test");
        assert_eq!(dns.ttl, std::time::Duration::from_secs(5));

        let cli = Cli::try_parse_from(["serve", "--name", "a", "--dns", "127.0.0.1:8600"]).unwrap();
        let err = cli.args.settings.into_config().unwrap_err();
        assert!(err.to_string().contains("service_name"), "{err}");
    }
}
