//! [`ClientOptions`]: how a client selects, retries, times out and where it resolves names.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use streamfarm_core::Policy;

use crate::address::{Resolver, ServiceAddress};
use crate::backoff::Backoff;
use crate::client::Client;
use crate::connection::Dialer;
use crate::error::Error;
use crate::machine::{MachineConfig, RetryMode};
use crate::tls::TlsSettings;
use crate::token::TokenSource;
use crate::transport::{TransportChoice, Transports};

/// The options of a [`Client`], built by chaining; every option has a default.
///
/// ```
/// use std::time::Duration;
/// use streamfarm_client::{ClientOptions, Policy};
/// let options = ClientOptions::new()
///     .policy(Policy::P2c)
///     .connect_timeout(Duration::from_secs(2))
///     .subscribe(["prices", "news"]);
/// assert_eq!(options.topics(), ["prices", "news"]);
/// ```
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub(crate) machine: MachineConfig,
    pub(crate) connect_timeout: Duration,
    pub(crate) heartbeat_timeout: Option<Duration>,
    pub(crate) list_refresh: Option<Duration>,
    pub(crate) retry_timeout: Duration,
    /// Shared by every clone of these options, so a thousand clients share one DNS client.
    pub(crate) resolver: Resolver,
    pub(crate) source_address: Option<IpAddr>,
    pub(crate) seed: Option<u64>,
    pub(crate) topics: Vec<String>,
    pub(crate) event_capacity: usize,
    pub(crate) tls: TlsSettings,
    pub(crate) token: Option<TokenSource>,
    pub(crate) transports: Transports,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            machine: MachineConfig::default(),
            connect_timeout: Duration::from_secs(1),
            heartbeat_timeout: None,
            list_refresh: Some(Duration::from_secs(5)),
            retry_timeout: Duration::from_millis(250),
            resolver: Resolver::system(),
            source_address: None,
            seed: None,
            topics: Vec::new(),
            event_capacity: 1024,
            tls: TlsSettings::default(),
            token: None,
            transports: Transports::Auto,
        }
    }
}

impl ClientOptions {
    /// The defaults: `weighted` policy, immediate re-request, 10 s cool-down, 100 ms–5 s backoff, 1 s connect
    /// timeout, the node's heartbeat timeout, the system resolver.
    ///
    /// ```
    /// use streamfarm_client::{ClientOptions, Policy};
    /// assert_eq!(ClientOptions::new().policy_used(), Policy::Weighted);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The selection policy.
    ///
    /// ```
    /// use streamfarm_client::{ClientOptions, Policy};
    /// let options = ClientOptions::new().policy(Policy::Random);
    /// assert_eq!(options.policy_used(), Policy::Random);
    /// ```
    pub fn policy(mut self, policy: Policy) -> Self {
        self.machine.policy = policy;
        self
    }

    /// The connection token (a JWT, `docs/AUTH.md`), the same for every connection. It travels in
    /// the `Authorization` header of the WebSocket upgrade, and as the bearer credential of
    /// [`publish`](crate::publish). A fixed token is not refreshed: use
    /// [`token_provider`](Self::token_provider) for connections that outlive it.
    ///
    /// ```
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().token("eyJhbGciOi…");
    /// assert!(options.has_token());
    /// ```
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(TokenSource::fixed(token));
        self
    }

    /// Asks `provider` for a token before every connection and, while connected, for a fresh
    /// one before the current token expires (30 s before its `exp`, or half-way through a token
    /// that lives less than a minute), sent to the node in a `refresh` frame.
    ///
    /// ```
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().token_provider(|| async {
    ///     // e.g. ask the application's backend for a token
    ///     Ok::<_, String>("eyJhbGciOi…".to_string())
    /// });
    /// assert!(options.has_token());
    /// ```
    pub fn token_provider<F, Fut>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<String, String>> + Send + 'static,
    {
        self.token = Some(TokenSource::provider(provider));
        self
    }

    /// Whether a token (or a token provider) is set.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Trusts only the CA certificates of this PEM file for `wss://` and `https://` farms (a
    /// private CA), instead of the Mozilla roots.
    ///
    /// ```no_run
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().ca_file("/etc/streamfarm/ca.pem")?;
    /// # Ok::<(), streamfarm_client::Error>(())
    /// ```
    pub fn ca_file(mut self, path: impl AsRef<std::path::Path>) -> Result<Self, Error> {
        self.tls = TlsSettings::from_ca_file(path.as_ref())?;
        Ok(self)
    }

    /// How connections are opened (source address, TLS roots, token).
    pub(crate) fn dialer(&self) -> Dialer {
        Dialer {
            source: self.source_address,
            tls: self.tls.clone(),
            token: self.token.clone(),
            plan: TransportChoice::new(self.transports).plan(),
        }
    }

    /// Which transports the client may use: [`Transports::Auto`] (the default) opens a
    /// WebSocket, or an event stream on the same node when the upgrade is refused, and tries a
    /// WebSocket again at each failover; [`Transports::WebSocket`] and
    /// [`Transports::EventStream`] use one only.
    ///
    /// ```
    /// use streamfarm_client::{ClientOptions, Transports};
    /// let options = ClientOptions::new().transports(Transports::EventStream);
    /// assert_eq!(options.transports_used(), Transports::EventStream);
    /// ```
    pub fn transports(mut self, transports: Transports) -> Self {
        self.transports = transports;
        self
    }

    /// The transports these options allow.
    pub fn transports_used(&self) -> Transports {
        self.transports
    }

    /// The policy these options select with.
    pub fn policy_used(&self) -> Policy {
        self.machine.policy
    }

    /// Re-request the list at once on failure (the default), or retry the same server once first.
    ///
    /// ```
    /// use streamfarm_client::{ClientOptions, RetryMode};
    /// let options = ClientOptions::new().retry(RetryMode::Immediate);
    /// assert_eq!(options.retry_mode(), RetryMode::Immediate);
    /// ```
    pub fn retry(mut self, mode: RetryMode) -> Self {
        self.machine.retry = mode;
        self
    }

    /// Shorthand: `true` re-requests the list at once on failure ([`RetryMode::Immediate`]).
    ///
    /// ```
    /// use streamfarm_client::{ClientOptions, RetryMode};
    /// assert_eq!(ClientOptions::new().immediate(true).retry_mode(), RetryMode::Immediate);
    /// assert_eq!(ClientOptions::new().immediate(false).retry_mode(), RetryMode::RetryOnce);
    /// ```
    pub fn immediate(self, immediate: bool) -> Self {
        self.retry(if immediate {
            RetryMode::Immediate
        } else {
            RetryMode::RetryOnce
        })
    }

    /// The retry mode these options use.
    pub fn retry_mode(&self) -> RetryMode {
        self.machine.retry
    }

    /// How long a server that failed is left out of selection.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().cool_down(Duration::from_secs(30));
    /// ```
    pub fn cool_down(mut self, cool_down: Duration) -> Self {
        self.machine.cool_down = cool_down;
        self
    }

    /// The backoff between failed rounds.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamfarm_client::{Backoff, ClientOptions};
    /// let options = ClientOptions::new()
    ///     .backoff(Backoff::new(Duration::from_millis(50), Duration::from_secs(2)));
    /// ```
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.machine.backoff = backoff;
        self
    }

    /// The limit for opening a connection: TCP, WebSocket handshake and the node's greeting.
    /// A hung node costs this much per attempt, so keep it short.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().connect_timeout(Duration::from_millis(500));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Declare the server dead when nothing arrived from it for this long (default: the timeout
    /// the node announces in its `hello`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().heartbeat_timeout(Duration::from_secs(2));
    /// ```
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = Some(timeout);
        self
    }

    /// How old the farm list may grow while connected (default 5 s; `None`: never refreshed).
    /// When the list is older, the client's next heartbeat asks for the list instead of a pong:
    /// no extra frame, and on failover the client knows the survivors and asks one of them
    /// directly (see [`crate::machine`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().list_refresh(Some(Duration::from_secs(30)));
    /// ```
    pub fn list_refresh(mut self, every: Option<Duration>) -> Self {
        self.list_refresh = every;
        self
    }

    /// The connect timeout of the one retry of a server just lost or refused (default 250 ms,
    /// never more than the connect timeout). A server that was fine a moment ago answers at once
    /// or, dying, may leave the connect hanging: after this the client re-requests the list.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().retry_timeout(Duration::from_millis(500));
    /// ```
    pub fn retry_timeout(mut self, timeout: Duration) -> Self {
        self.retry_timeout = timeout;
        self
    }

    /// Resolve names through this DNS server instead of the system resolver.
    ///
    /// ```
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().dns_server("127.0.0.1:5353".parse().unwrap());
    /// ```
    pub fn dns_server(mut self, server: SocketAddr) -> Self {
        self.resolver = Resolver::with_dns_server(server);
        self
    }

    /// Open connections from this local IP address (e.g. one of 127.0.0.x, to hold more
    /// connections to one node than one source address has ports).
    ///
    /// ```
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().source_address("127.0.0.9".parse().unwrap());
    /// ```
    pub fn source_address(mut self, ip: IpAddr) -> Self {
        self.source_address = Some(ip);
        self
    }

    /// Seed the client's RNG (selection, jitter, address order), for reproducible runs. Unseeded
    /// clients draw their seed from the operating system.
    ///
    /// ```
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().seed(42);
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Topics to subscribe from the first connection on (more can be added on the [`Client`]).
    ///
    /// ```
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().subscribe(["a"]).subscribe(vec!["b".to_string()]);
    /// assert_eq!(options.topics(), ["a", "b"]);
    /// ```
    pub fn subscribe<I, T>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.topics.extend(topics.into_iter().map(Into::into));
        self
    }

    /// The topics to subscribe from the start.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    /// How many events wait for the application before the client stops reading from the node
    /// (a full queue holds the connection back; the node then treats the client as slow).
    ///
    /// ```
    /// use streamfarm_client::ClientOptions;
    /// let options = ClientOptions::new().event_capacity(16);
    /// ```
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// The resolver these options call for.
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// Starts a client of `address` with these options (see [`Client::start`]).
    pub fn start(self, address: ServiceAddress) -> Client {
        Client::start(address, self)
    }
}
