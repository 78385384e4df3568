//! The network operations the driver runs one at a time: fetching a farm list (from the service
//! address or from the servers of the last list) and connecting to a server with the client's
//! topics subscribed from their positions.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use streamfarm_core::protocol::ServerFrame;
use tokio::time::Instant;
use tracing::debug;

use super::DialCounters;
use crate::address::{Endpoint, Resolver, ServiceAddress, Target};
use crate::connection::{self, Conn, Dialer};
use crate::error::Error;
use crate::machine::ListSource;
use crate::topics::Topics;

/// The result of the one network operation in flight.
pub(super) enum Done {
    List(Result<Conn, Error>),
    Connect {
        server: String,
        result: Result<Subscribed, Error>,
    },
}

/// A connection with its topics subscribed.
pub(super) struct Subscribed {
    pub(super) conn: Conn,
    /// The topics subscribed on it: those of the client when the connect began.
    pub(super) topics: Vec<String>,
    /// The `subscribed` frame, then messages that arrived while subscribing.
    pub(super) early: Vec<ServerFrame>,
}

/// Subscribing may take this many connect timeouts.
const SUBSCRIBE_TIMEOUT_FACTOR: u32 = 3;

/// How a connection to the chosen server comes about.
pub(super) enum Way {
    /// A new dial.
    Dial,
    /// The connection the list came over, already open to that server.
    ListConnection(Box<Conn>),
    /// A new dial, as the new end of a migration (its `hello` says so).
    Migration,
}

/// Connects to `server` (or uses the list connection it already has) and subscribes the topics,
/// each from the position held in it.
pub(super) async fn connect(
    dials: Arc<DialCounters>,
    server: String,
    way: Way,
    subscription: Topics,
    resolver: Resolver,
    dialer: Dialer,
    timeout: Duration,
) -> Done {
    let migrating = matches!(way, Way::Migration);
    let reused = match way {
        Way::ListConnection(conn) => Some(*conn),
        Way::Dial | Way::Migration => None,
    };
    let was_reused = reused.is_some();
    let topics = subscription.names();
    let positions = subscription.positions();
    let result = async {
        let mut conn = match reused {
            Some(conn) => {
                dials.reused.fetch_add(1, Ordering::Relaxed);
                conn
            }
            None => connection::dial_url(&server, &resolver, &dialer, timeout).await?,
        };
        // A node confirms a subscription once its linked peers hold the interest and it has the
        // topic's history from the client's position: when the topic's replica was the node just
        // lost, that history is fetched from the others (`docs/PROTOCOL.md`, section 5). Give
        // subscribing more room than a connect, or a failover storm turns that wait into a
        // failed server and another attempt.
        let allowed = timeout.saturating_mul(SUBSCRIBE_TIMEOUT_FACTOR);
        let started = Instant::now();
        let (topics, early) = tokio::time::timeout(
            allowed,
            connection::subscribe(&mut conn, &topics, &positions, migrating),
        )
        .await
        .map_err(|_| Error::TimedOut {
            what: "subscribing",
            url: server.clone(),
            after: allowed,
        })??;
        debug!(%server, took_ms = started.elapsed().as_millis() as u64, "subscribed");
        Ok(Subscribed {
            conn,
            topics,
            early,
        })
    }
    .await;
    if !was_reused {
        dials.count(false, &result);
    }
    Done::Connect { server, result }
}

/// A subscription to send on the connection to `server` as soon as it answers a list request,
/// before the machine decides to keep it (see [`connection::send_subscription`]).
pub(super) struct Ahead {
    pub(super) server: String,
    pub(super) topics: Topics,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn fetch_list(
    dials: Arc<DialCounters>,
    address: ServiceAddress,
    resolver: Resolver,
    source: ListSource,
    dialer: Dialer,
    timeout: Duration,
    seed: u64,
    ahead: Option<Ahead>,
) -> Done {
    Done::List(match source {
        ListSource::ServiceAddress { avoid } => {
            let mut rng = StdRng::seed_from_u64(seed);
            let count = |result: &Result<Conn, Error>| dials.count(true, result);
            match discover(
                &address, &resolver, &avoid, &dialer, timeout, &mut rng, count,
            )
            .await
            {
                Ok(mut conn) => connection::ask_list(&mut conn, timeout)
                    .await
                    .map(|()| conn),
                Err(err) => Err(err),
            }
        }
        ListSource::Servers(urls) => {
            let mut last = None;
            let mut found = None;
            for url in &urls {
                let started = Instant::now();
                let mut result = connection::dial_url(url, &resolver, &dialer, timeout).await;
                debug!(%url, ok = result.is_ok(), took_ms = started.elapsed().as_millis() as u64, "list dial");
                dials.count(true, &result);
                if let Ok(conn) = &mut result
                    && let Err(err) = connection::ask_list(conn, timeout).await
                {
                    result = Err(err);
                }
                if let (Ok(conn), Some(ahead)) = (&mut result, &ahead)
                    && ahead.server == *url
                {
                    let (names, positions) = (ahead.topics.names(), ahead.topics.positions());
                    // A failure here is the connection's: the wait for `subscribed` reports it.
                    let _ = connection::send_subscription(conn, &names, &positions, false).await;
                }
                match result {
                    Ok(conn) => {
                        found = Some(conn);
                        break;
                    }
                    Err(err) => last = Some(err),
                }
            }
            found.ok_or_else(|| Error::Unreachable {
                address: urls.join(","),
                tried: urls.len(),
                last: Box::new(last.unwrap_or(Error::Closed)),
            })
        }
    })
}

/// First contact: a greeted connection to one server of `address`, trying its addresses in a
/// shuffled order, those of the servers in `avoid` last. `counted` sees every attempt's result.
pub(crate) async fn discover<R: Rng + ?Sized>(
    address: &ServiceAddress,
    resolver: &Resolver,
    avoid: &[String],
    dialer: &Dialer,
    timeout: Duration,
    rng: &mut R,
    mut counted: impl FnMut(&Result<Conn, Error>),
) -> Result<Conn, Error> {
    let mut endpoints = resolver.resolve(address, rng).await?;
    let avoided: Vec<Target> = avoid.iter().filter_map(|u| Target::parse(u).ok()).collect();
    // A stable sort keeps the shuffled order within each half.
    endpoints.sort_by_key(|e| avoided.iter().any(|t| is_endpoint_of(e, t)));
    let tried = endpoints.len();
    let mut last = None;
    for endpoint in &endpoints {
        let result = connection::dial(endpoint, dialer, timeout).await;
        counted(&result);
        match result {
            Ok(conn) => return Ok(conn),
            Err(err) => {
                debug!(endpoint = %endpoint.addr, %err, "no list here");
                // A rejection says more than a server that did not answer: keep it.
                let rejected = last
                    .as_ref()
                    .is_some_and(|l: &Error| l.rejection().is_some());
                if !rejected || err.rejection().is_some() {
                    last = Some(err);
                }
            }
        }
    }
    Err(Error::Unreachable {
        address: address.to_string(),
        tried,
        last: Box::new(last.unwrap_or(Error::Closed)),
    })
}

fn is_endpoint_of(endpoint: &Endpoint, target: &Target) -> bool {
    endpoint.addr.port() == target.port
        && match target.host.parse::<IpAddr>() {
            Ok(ip) => ip == endpoint.addr.ip(),
            Err(_) => target.host.eq_ignore_ascii_case(&endpoint.target.host),
        }
}
