//! The built-in DNS responder: the farm's common service name, answered with the UP servers.
//!
//! The seeds route a client's first request through DNS round-robin. This crate makes that part of
//! the farm: a node started with `--dns` answers, from its own live farm list,
//!
//! - `A`/`AAAA` for the service name with the addresses of the servers that are `UP` (never `DOWN`
//!   or `DRAINING`), rotated one place per answer, with a short TTL;
//! - `A`/`AAAA` for `NODE.SERVICE` with that node's address (while it is not `DOWN`);
//! - `SRV` for the service name and for `_streamfarm._tcp.SERVICE`: one record per UP server with
//!   target `NODE.SERVICE`, the port of its url, and priority = rank of its priority group, with
//!   the targets' addresses in the additional section;
//! - `SOA` at the service name; NOERROR with no records (and the SOA) for other types of existing
//!   names; NXDOMAIN (with the SOA) for other names in the zone; REFUSED for names outside it.
//!
//! Addresses come from the host of each server's `url`, which must be an IP literal: servers
//! whose url names a host are left out (see `docs/DNS.md`).
//!
//! It owns its sockets and tasks, and reads the farm list only through the `watch` it is given; it
//! never changes farm state.
//!
//! ```no_run
//! # async fn example(farm_rx: tokio::sync::watch::Receiver<streamfarm_core::FarmList>) -> Result<(), streamfarm_dns::DnsError> {
//! use streamfarm_dns::{DnsConfig, DnsServer};
//! let config = DnsConfig::new("127.0.0.1:5353".parse().unwrap(), "farm.example.com");
//! let dns = DnsServer::start(config, farm_rx).await?;
//! println!("answering on {}", dns.local_addr());
//! dns.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `zone` — the records of one farm list ([`Zone`](zone) snapshot), the lookup and the rotation;
//!   pure, unit-tested.
//! - `handler` — hickory-server's `RequestHandler`: EDNS, opcode and class checks, the in-flight
//!   bound, and the answer sent from the current zone.
//! - this file — configuration, errors, sockets and the task that rebuilds the zone when the farm
//!   list changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::Name;
use streamfarm_core::FarmList;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

mod handler;
mod zone;

use handler::FarmHandler;
use zone::{Zone, ZoneKey};

/// TTL of every record unless configured: short, so that a server that goes DOWN leaves caches
/// within seconds, yet long enough to spare the responder a query per connection attempt.
pub const DEFAULT_TTL: Duration = Duration::from_secs(2);

/// Most requests answered at once before new ones are dropped unanswered. Answering takes
/// microseconds, so this is only reached by a flood; the bound keeps that flood's share of the
/// node's runtime bounded.
pub const MAX_IN_FLIGHT: usize = 256;

/// A TCP client that sends nothing for this long is disconnected, so idle connections cannot pile up.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;

/// With port 0 the UDP port is chosen first and TCP must then get the same number; if some other
/// program holds that TCP port, try again with a fresh UDP port this many times.
const BIND_ATTEMPTS: usize = 8;

/// Where and for which name the responder answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// UDP and TCP address to answer on; port 0 picks a free port (the same for both).
    pub listen: SocketAddr,
    /// The service name, the apex of the zone we answer for (`farm.example.com`); with or
    /// without the final dot.
    pub service_name: String,
    /// TTL of every record and of negative answers; whole seconds are used.
    pub ttl: Duration,
}

impl DnsConfig {
    /// A configuration with the default TTL ([`DEFAULT_TTL`]).
    pub fn new(listen: SocketAddr, service_name: impl Into<String>) -> Self {
        DnsConfig {
            listen,
            service_name: service_name.into(),
            ttl: DEFAULT_TTL,
        }
    }
}

/// Why the responder could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The service name is not a domain name.
    #[error("invalid DNS service name {name:?}: {reason}")]
    InvalidServiceName {
        /// The name as configured.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A socket could not be bound (address in use, or a port below 1024 without privilege).
    #[error("cannot bind DNS {protocol} socket on {addr}: {source}")]
    Bind {
        /// The address we tried.
        addr: SocketAddr,
        /// `UDP` or `TCP`.
        protocol: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// A running responder: a handle over hickory-server's socket tasks and the task that follows
/// the farm list. Dropping it stops everything; [`DnsServer::shutdown`] also waits for the tasks.
pub struct DnsServer {
    local_addr: SocketAddr,
    server: hickory_server::Server<FarmHandler>,
    follower: JoinHandle<()>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `config.listen` (port 0 allowed) and answers from the latest farm
    /// list in `farm`. When `farm`'s sender is dropped, the last list keeps being answered.
    pub async fn start(
        config: DnsConfig,
        farm: watch::Receiver<FarmList>,
    ) -> Result<DnsServer, DnsError> {
        let apex = parse_service_name(&config.service_name)?;
        let ttl = u32::try_from(config.ttl.as_secs()).unwrap_or(u32::MAX);
        let (udp, tcp) = bind(config.listen).await?;
        let local_addr = udp.local_addr().map_err(|source| DnsError::Bind {
            addr: config.listen,
            protocol: "UDP",
            source,
        })?;

        let key = ZoneKey::of(&farm.borrow());
        let first = Zone::build(&apex, ttl, 1, &farm.borrow());
        let (zone_tx, zone_rx) = watch::channel(Arc::new(first));
        let follower = tokio::spawn(follow_farm(farm, zone_tx, apex.clone(), ttl, key));

        let mut server = hickory_server::Server::new(FarmHandler::new(zone_rx, MAX_IN_FLIGHT));
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        info!(addr = %local_addr, zone = %apex, ttl, "DNS responder started");
        Ok(DnsServer {
            local_addr,
            server,
            follower,
        })
    }

    /// The address answering on UDP; TCP answers on the same address and port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops answering and waits for the socket tasks to end.
    pub async fn shutdown(mut self) {
        self.follower.abort();
        if let Err(error) = self.server.shutdown_gracefully().await {
            warn!(%error, "DNS responder stopped with an error");
        }
        debug!(addr = %self.local_addr, "DNS responder stopped");
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // The socket tasks live in hickory's JoinSet, which aborts them when dropped; the follower
        // is ours to stop.
        self.follower.abort();
    }
}

/// The service name as a fully qualified, lower-case domain name with at least one label.
fn parse_service_name(service_name: &str) -> Result<Name, DnsError> {
    let invalid = |reason: String| DnsError::InvalidServiceName {
        name: service_name.to_string(),
        reason,
    };
    let mut name = Name::from_utf8(service_name).map_err(|e| invalid(e.to_string()))?;
    if name.num_labels() == 0 {
        return Err(invalid("the root cannot be a service name".to_string()));
    }
    if name.iter().any(|label| label == b"*") {
        return Err(invalid("wildcards are not allowed".to_string()));
    }
    name.set_fqdn(true);
    // The zone's longest owner names must fit in a domain name too.
    let longest = name
        .prepend_label(zone::SRV_LABELS[1])
        .and_then(|n| n.prepend_label(zone::SRV_LABELS[0]));
    if let Err(e) = longest {
        return Err(invalid(format!("too long to hold _streamfarm._tcp: {e}")));
    }
    Ok(name.to_lowercase())
}

/// Binds UDP, then TCP on the same address and port.
async fn bind(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|source| DnsError::Bind {
                addr: listen,
                protocol: "UDP",
                source,
            })?;
        let addr = udp.local_addr().map_err(|source| DnsError::Bind {
            addr: listen,
            protocol: "UDP",
            source,
        })?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error)
                if listen.port() == 0
                    && error.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < BIND_ATTEMPTS =>
            {
                debug!(%addr, "TCP port taken; choosing another port");
            }
            Err(source) => {
                return Err(DnsError::Bind {
                    addr,
                    protocol: "TCP",
                    source,
                });
            }
        }
    }
}

/// Rebuilds the zone whenever what DNS depends on (names, urls, statuses, groups) changes.
async fn follow_farm(
    mut farm: watch::Receiver<FarmList>,
    zone_tx: watch::Sender<Arc<Zone>>,
    apex: Name,
    ttl: u32,
    mut key: ZoneKey,
) {
    let mut serial: u32 = 1;
    while farm.changed().await.is_ok() {
        let zone = {
            let list = farm.borrow_and_update();
            let new_key = ZoneKey::of(&list);
            if new_key == key {
                continue;
            }
            key = new_key;
            serial = serial.wrapping_add(1);
            Zone::build(&apex, ttl, serial, &list)
        };
        zone_tx.send_replace(Arc::new(zone));
        debug!(serial, "DNS zone rebuilt");
    }
    debug!("farm list closed; DNS keeps answering from the last list");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_checked_and_made_absolute() {
        assert_eq!(
            parse_service_name("Farm.Example.com").unwrap().to_string(),
            "farm.example.com."
        );
        assert_eq!(
            parse_service_name("farm.test.").unwrap().to_string(),
            "farm.test."
        );
        let long = vec!["x".repeat(60); 4].join(".");
        for bad in [".", "", "*.farm.test", "a..b", long.as_str()] {
            let error = parse_service_name(bad).unwrap_err();
            assert!(
                matches!(error, DnsError::InvalidServiceName { .. }),
                "{bad:?}: {error}"
            );
        }
    }
}
