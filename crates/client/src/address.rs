//! The service address: where a client first reaches the farm.
//!
//! A [`ServiceAddress`] is one or more comma-separated targets; each is a WebSocket or HTTP URL
//! (`ws://farm.example:7400/stream`, `http://10.0.0.1:7400`) or a bare `host[:port]`
//! (`farm.example:7400`, `127.0.0.1`, `[::1]:7400`). A bare target uses port [`DEFAULT_PORT`];
//! every target without a WebSocket path uses [`DEFAULT_PATH`]. Each host may resolve to several
//! addresses — DNS round-robin, the seeds' way of mapping one service name to every server — and
//! [`Resolver::resolve`] returns all of them, over all targets, in a shuffled order so that clients
//! spread over the farm even when the DNS server hands every client the same order.
//!
//! Names resolve through the system resolver, or through one DNS server given by address
//! ([`Resolver::with_dns_server`], e.g. the farm's own responder). With a DNS server, a name given
//! without a port is first looked up as SRV (`_streamfarm._tcp.NAME`), so servers on different
//! ports share one service name; without SRV records, its A/AAAA records with the default port.
//!
//! ```
//! use streamfarm_client::ServiceAddress;
//! let address: ServiceAddress = "127.0.0.1:7401, ws://127.0.0.2:7402/stream".parse().unwrap();
//! assert_eq!(address.targets().len(), 2);
//! assert_eq!(address.targets()[0].url(), "ws://127.0.0.1:7401/stream");
//! assert!("farm.example:http".parse::<ServiceAddress>().is_err());
//! ```

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use rand::Rng;
use rand::seq::SliceRandom;
use streamfarm_core::address::{default_port, split_url};

use crate::error::Error;

/// The port a bare `host` target uses: the node's default listen port.
pub const DEFAULT_PORT: u16 = 7400;
/// The streaming path a target without one uses: the node's default.
pub const DEFAULT_PATH: &str = "/stream";

/// One target of a service address: a host (name or IP), a port and a WebSocket path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// A DNS name or an IP address (IPv6 without brackets).
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// The port was written in the address (else `port` is the default, and a DNS server that
    /// has SRV records for the name gives each server's own port).
    pub explicit_port: bool,
    /// The WebSocket path, starting with `/`.
    pub path: String,
    /// Over TLS (`wss://`, `https://`): the server's certificate is checked against `host`.
    pub tls: bool,
}

impl Target {
    /// Parses one target: a `ws://`, `wss://`, `http://` or `https://` URL, or `host[:port]`
    /// (plain, no TLS).
    ///
    /// ```
    /// use streamfarm_client::address::Target;
    /// let t = Target::parse("ws://[::1]:9000/live").unwrap();
    /// assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("::1", 9000, "/live"));
    /// let t = Target::parse("farm.example").unwrap();
    /// assert_eq!((t.port, t.path.as_str()), (7400, "/stream"));
    /// let t = Target::parse("https://farm.example").unwrap();
    /// assert_eq!((t.port, t.tls, t.url().as_str()), (443, true, "wss://farm.example:443/stream"));
    /// ```
    pub fn parse(text: &str) -> Result<Target, Error> {
        let text = text.trim();
        let invalid = |reason: &str| Error::InvalidAddress {
            input: text.to_string(),
            reason: reason.to_string(),
        };
        if text.is_empty() {
            return Err(invalid("empty target"));
        }
        let parts = split_url(text).map_err(|err| invalid(&err.to_string()))?;
        let scheme = parts.scheme.map(str::to_ascii_lowercase);
        let default_port = match scheme.as_deref() {
            None => DEFAULT_PORT,
            Some(scheme) => default_port(scheme)
                .ok_or_else(|| invalid("the scheme must be ws://, wss://, http:// or https://"))?,
        };
        let tls = matches!(scheme.as_deref(), Some("wss") | Some("https"));
        // Only a ws:// URL names the streaming path; anything else (an HTTP base, `/farm`) means
        // the node's default endpoint.
        let path =
            if matches!(scheme.as_deref(), Some("ws") | Some("wss")) && !parts.path.is_empty() {
                parts.path.to_string()
            } else {
                DEFAULT_PATH.to_string()
            };
        let (host, port) = (parts.host.to_string(), parts.port);
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        if parts.userinfo.is_some() || host.contains(' ') {
            return Err(invalid("the host has characters a host name cannot have"));
        }
        Ok(Target {
            host,
            port: port.unwrap_or(default_port),
            explicit_port: port.is_some(),
            path,
            tls,
        })
    }

    /// The WebSocket URL of this target.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!(
            "{scheme}://{}:{}{}",
            bracketed(&self.host),
            self.port,
            self.path
        )
    }

    /// The HTTP base URL of this target's node at `addr` (`https://` over TLS).
    pub fn http_base(&self, addr: SocketAddr) -> String {
        if self.tls {
            format!("https://{}:{}", bracketed(&self.host), self.port)
        } else {
            format!("http://{addr}")
        }
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

/// Where a client first reaches the farm: one or more targets (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAddress {
    targets: Vec<Target>,
}

impl ServiceAddress {
    /// The targets, in the order given.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }
}

impl FromStr for ServiceAddress {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let targets = s
            .split(',')
            .map(Target::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ServiceAddress { targets })
    }
}

impl fmt::Display for ServiceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.targets.iter().map(Target::url).collect();
        f.write_str(&urls.join(","))
    }
}

/// One address to connect to, with the URL to ask for there (its host names the `Host` header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The socket address to connect to.
    pub addr: SocketAddr,
    /// The target it came from.
    pub target: Target,
}

impl Endpoint {
    /// The WebSocket URL to request on this endpoint.
    pub fn url(&self) -> String {
        self.target.url()
    }
}

/// Resolves host names: the system resolver, or one DNS server.
#[derive(Clone, Default)]
pub struct Resolver {
    /// `None`: the system resolver (`getaddrinfo`, with `/etc/hosts`).
    dns: Option<TokioResolver>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dns {
            None => f.write_str("Resolver(system)"),
            Some(_) => f.write_str("Resolver(dns server)"),
        }
    }
}

impl Resolver {
    /// The system resolver.
    pub fn system() -> Self {
        Resolver { dns: None }
    }

    /// Resolves every name through the DNS server at `server` (UDP, falling back to TCP), without
    /// caching, since a farm's DNS answers follow its servers' status.
    pub fn with_dns_server(server: SocketAddr) -> Self {
        let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
        for connection in &mut name_server.connections {
            connection.port = server.port();
        }
        let config = ResolverConfig::from_parts(None, vec![], vec![name_server]);
        let mut builder = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioRuntimeProvider::default(),
        );
        let options = builder.options_mut();
        options.cache_size = 0;
        options.timeout = Duration::from_secs(2);
        options.attempts = 1;
        // Names like `farm` are the farm's own, not relative to the host's search domains.
        options.ndots = 0;
        let dns = builder.build().ok();
        Resolver { dns }
    }

    /// The addresses of one target: itself when its host is an IP address, else every address
    /// its name resolves to.
    pub async fn lookup(&self, target: &Target) -> Result<Vec<SocketAddr>, Error> {
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, target.port)]);
        }
        let resolve_error = |detail: String| Error::Resolve {
            host: target.host.clone(),
            detail,
        };
        let addrs: Vec<SocketAddr> = match &self.dns {
            Some(dns) => {
                let by_srv = if target.explicit_port {
                    Vec::new()
                } else {
                    srv_addresses(dns, &target.host).await
                };
                if by_srv.is_empty() {
                    dns.lookup_ip(target.host.as_str())
                        .await
                        .map_err(|e| resolve_error(e.to_string()))?
                        .iter()
                        .map(|ip| SocketAddr::new(ip, target.port))
                        .collect()
                } else {
                    by_srv
                }
            }
            None => tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map_err(|e| resolve_error(e.to_string()))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(resolve_error("no addresses".to_string()));
        }
        Ok(addrs)
    }

    /// Every endpoint of `address`, shuffled with `rng`. Fails only when no target resolves.
    pub async fn resolve<R: Rng + ?Sized>(
        &self,
        address: &ServiceAddress,
        rng: &mut R,
    ) -> Result<Vec<Endpoint>, Error> {
        let mut endpoints = Vec::new();
        let mut last_error = None;
        for target in address.targets() {
            match self.lookup(target).await {
                Ok(addrs) => endpoints.extend(addrs.into_iter().map(|addr| Endpoint {
                    addr,
                    target: target.clone(),
                })),
                Err(err) => last_error = Some(err),
            }
        }
        if endpoints.is_empty() {
            return Err(last_error.unwrap_or_else(|| Error::InvalidAddress {
                input: address.to_string(),
                reason: "no targets".to_string(),
            }));
        }
        endpoints.dedup();
        endpoints.shuffle(rng);
        Ok(endpoints)
    }
}

/// The servers of `_streamfarm._tcp.NAME` SRV records (each target's addresses with the record's
/// port); empty when there are none or the lookup fails, so the caller falls back to A/AAAA.
async fn srv_addresses(dns: &TokioResolver, host: &str) -> Vec<SocketAddr> {
    use hickory_resolver::proto::rr::RData;
    let name = format!("_streamfarm._tcp.{}", host.trim_end_matches('.'));
    let Ok(lookup) = dns.srv_lookup(name.as_str()).await else {
        return Vec::new();
    };
    let mut addrs = Vec::new();
    for record in lookup.answers() {
        let RData::SRV(srv) = &record.data else {
            continue;
        };
        if let Ok(ips) = dns.lookup_ip(srv.target.clone()).await {
            addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, srv.port)));
        }
    }
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn target(text: &str) -> (String, u16, String) {
        let t = Target::parse(text).unwrap();
        (t.host, t.port, t.path)
    }

    #[test]
    fn targets_of_every_shape() {
        let s = |x: &str| x.to_string();
        assert_eq!(
            target("127.0.0.1:7401"),
            (s("127.0.0.1"), 7401, s("/stream"))
        );
        assert_eq!(
            target("farm.example"),
            (s("farm.example"), 7400, s("/stream"))
        );
        assert_eq!(target("ws://farm:9/live?x=1"), (s("farm"), 9, s("/live")));
        assert_eq!(target("ws://farm"), (s("farm"), 80, s("/stream")));
        assert_eq!(
            target("HTTP://farm:8080/farm"),
            (s("farm"), 8080, s("/stream"))
        );
        assert_eq!(target("[::1]:7400"), (s("::1"), 7400, s("/stream")));
        assert_eq!(target("::1"), (s("::1"), 7400, s("/stream")));
        assert_eq!(
            Target::parse("[::1]:7").unwrap().url(),
            "ws://[::1]:7/stream"
        );
    }

    #[test]
    fn bad_targets_say_what_is_wrong() {
        for (text, why) in [
            ("", "empty"),
            ("host:http", "port \"http\""),
            ("host:70000", "65535"),
            ("ftp://host", "ws://, wss://"),
            ("[::1", "without its ]"),
            (":7400", "no host"),
        ] {
            let err = Target::parse(text).unwrap_err();
            assert!(err.to_string().contains(why), "{text:?}: {err}");
            assert_eq!(err.kind(), crate::ErrorKind::InvalidAddress);
        }
    }

    #[test]
    fn seed_lists_split_on_commas() {
        let address: ServiceAddress = "a:1, b:2 ,ws://c:3/s".parse().unwrap();
        let hosts: Vec<&str> = address.targets().iter().map(|t| t.host.as_str()).collect();
        assert_eq!(hosts, vec!["a", "b", "c"]);
        assert_eq!(
            address.to_string(),
            "ws://a:1/stream,ws://b:2/stream,ws://c:3/s"
        );
        assert!("a:1,,b:2".parse::<ServiceAddress>().is_err());
    }

    #[tokio::test]
    async fn ip_targets_resolve_to_themselves_shuffled() {
        let address: ServiceAddress = "127.0.0.1:1,127.0.0.2:2,127.0.0.3:3,127.0.0.4:4"
            .parse()
            .unwrap();
        let resolver = Resolver::system();
        let mut orders = std::collections::HashSet::new();
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let endpoints = resolver.resolve(&address, &mut rng).await.unwrap();
            let mut ports: Vec<u16> = endpoints.iter().map(|e| e.addr.port()).collect();
            orders.insert(ports.clone());
            ports.sort();
            assert_eq!(ports, vec![1, 2, 3, 4]);
        }
        assert!(orders.len() > 5, "the order is shuffled: {orders:?}");
    }

    #[tokio::test]
    async fn localhost_resolves_through_the_system() {
        let address: ServiceAddress = "localhost:7400".parse().unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let endpoints = Resolver::system()
            .resolve(&address, &mut rng)
            .await
            .unwrap();
        assert!(endpoints.iter().all(|e| e.addr.ip().is_loopback()));
        assert_eq!(endpoints[0].url(), "ws://localhost:7400/stream");
    }

    #[tokio::test]
    async fn an_unanswered_dns_server_is_a_resolve_error() {
        // A bound UDP socket that never answers stands in for a dead DNS server.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let resolver = Resolver::with_dns_server(silent.local_addr().unwrap());
        let address: ServiceAddress = "farm.test:7400".parse().unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let err = resolver.resolve(&address, &mut rng).await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Resolve);
        assert!(err.to_string().contains("farm.test"), "{err}");
    }
}
