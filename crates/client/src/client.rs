//! [`Client`]: a handle over the task that drives one client's connection.
//!
//! The task (`driver`) feeds what happens on the network to the [`Machine`] and carries out the
//! actions it returns; it also keeps the heartbeats, delivers messages and turns the machine's
//! notices into [`Event`]s for the application. At most one network operation (`dial`: fetching a
//! list or connecting) runs at a time, besides the established connection.

mod dial;
mod driver;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use streamfarm_core::protocol::{Epoch, Position};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub(crate) use self::dial::discover;
use self::driver::Driver;
use crate::address::ServiceAddress;
use crate::error::{Error, Rejection};
use crate::machine::{LossCause, Machine};
use crate::options::ClientOptions;
use crate::transport::{Transport, TransportChoice};

/// What the client tells the application.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Connected to `server` (its url) with every topic subscribed, over `transport`.
    Connected {
        /// The server's url.
        server: String,
        /// A WebSocket, or an event stream where the WebSocket upgrade was refused.
        transport: Transport,
    },
    /// The connection to `server` ended; the client is failing over.
    Disconnected {
        /// The server's url.
        server: String,
        /// Why it ended.
        cause: LossCause,
    },
    /// Connected again after a loss: from `from` to `to` (the same server when its retry
    /// worked), `took` after the loss.
    FailedOver {
        /// The server lost.
        from: String,
        /// The server now connected.
        to: String,
        /// From the loss to being subscribed again.
        took: Duration,
    },
    /// Moved from `from` to `to` at `from`'s request (rebalancing, drain, shutdown),
    /// make-before-break: `to` was subscribed and caught up before `from` was closed, so nothing
    /// was missed and nothing is delivered twice. `took`: from the request to the switch.
    Migrated {
        /// The server left.
        from: String,
        /// The server now connected.
        to: String,
        /// Why `from` asked (`rebalance`, `drain`, `shutdown`).
        reason: String,
        /// From the request to the switch.
        took: Duration,
        /// How `to` is connected.
        transport: Transport,
    },
    /// A migration could not connect to `to`: the client stays on `server` for now.
    MigrationFailed {
        /// The server the client stays on.
        server: String,
        /// The server it could not reach.
        to: String,
        /// What went wrong.
        error: String,
    },
    /// After a failover (or any resubscription), every message of `topic` published while the
    /// client was away has been received: `count` of them, in order, before any newer one. A
    /// count of 0 says that nothing was missed.
    Recovered {
        /// The topic.
        topic: String,
        /// Messages received from the farm's history.
        count: u64,
    },
    /// Messages of `topic` that will never arrive: offsets `from..=to` of `epoch` (`to` absent:
    /// the rest of that epoch), and why. Nothing is ever missed without this event.
    Gap {
        /// The topic.
        topic: String,
        /// The epoch of the missing messages.
        epoch: Epoch,
        /// First missing offset.
        from: u64,
        /// Last missing offset, when known.
        to: Option<u64>,
        /// `history_exceeded` (older than the farm keeps), `epoch_lost` (the topic's history was
        /// lost with the nodes that held it), `unavailable` (the history could not be reached),
        /// or `unannounced` (offsets jumped without a `gap` frame).
        reason: String,
    },
    /// A server rejected the client for a reason that the client's retries meet again (see
    /// [`Rejection`]): its certificate was refused, or the token or a subscription was. The
    /// client carries on as for any failure — it fails over and retries, so a renewed
    /// certificate or token (`token_provider`) is picked up when it comes — and an application
    /// that has nothing to renew may stop here instead, as `streamfarm sub` does. Not sent for
    /// a migration's new server, which leaves the client connected ([`Event::MigrationFailed`]).
    Rejected {
        /// What was rejected.
        rejection: Rejection,
        /// The whole error, naming the server and the likely fix.
        error: String,
    },
    /// A round found no server; the client tries again after `delay`.
    Retrying {
        /// Why the round failed.
        reason: String,
        /// The backoff before the next round.
        delay: Duration,
    },
    /// A message on a subscribed topic.
    Message {
        /// The topic.
        topic: String,
        /// The payload.
        payload: Vec<u8>,
        /// Its position in the topic (none from a node without positions).
        position: Option<Position>,
    },
    /// Whether the connected server receives what the whole farm publishes: `complete: false`
    /// when it is cut off from the rest of the farm (messages published elsewhere do not reach
    /// this client for now; they arrive, in order, once it is back: `complete: true`). Also
    /// `complete: true` when, after a partial feed, the client is connected to a server whose
    /// feed is whole.
    Feed {
        /// The server's url.
        server: String,
        /// The feed is whole.
        complete: bool,
    },
    /// The connected server refused a frame (e.g. a bad topic name).
    ServerError {
        /// The server's url.
        server: String,
        /// The stable error code.
        code: String,
        /// What was wrong.
        message: String,
    },
}

/// The connections a client has opened, by purpose, since it started (see [`Client::dials`]).
/// One dial is one attempt at a url or at one address of the service address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dials {
    /// Dials to fetch a list (each server or address tried counts).
    pub list: u64,
    /// Those of them that failed.
    pub list_failed: u64,
    /// Dials to a chosen server (its list connection could not be kept).
    pub stream: u64,
    /// Those of them that failed (connect, greeting or subscribing).
    pub stream_failed: u64,
    /// Chosen servers subscribed on the connection their list came over: no dial.
    pub reused: u64,
}

/// The counters behind [`Dials`], shared by the handle and the driver.
#[derive(Debug, Default)]
struct DialCounters {
    list: AtomicU64,
    list_failed: AtomicU64,
    stream: AtomicU64,
    stream_failed: AtomicU64,
    reused: AtomicU64,
}

impl DialCounters {
    fn count<T, E>(&self, list: bool, result: &Result<T, E>) {
        let (dials, failed) = if list {
            (&self.list, &self.list_failed)
        } else {
            (&self.stream, &self.stream_failed)
        };
        dials.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Dials {
        Dials {
            list: self.list.load(Ordering::Relaxed),
            list_failed: self.list_failed.load(Ordering::Relaxed),
            stream: self.stream.load(Ordering::Relaxed),
            stream_failed: self.stream_failed.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
        }
    }
}

/// What the handle asks of the driver task.
#[derive(Debug)]
enum Command {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    Stop,
}

/// A client of the farm: finds a server, keeps a connection to it, fails over, resubscribes.
///
/// Dropping the handle stops the client; [`Client::close`] stops it and waits until the
/// connection is closed.
#[derive(Debug)]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::Receiver<Event>,
    server: watch::Receiver<Option<String>>,
    dials: Arc<DialCounters>,
    task: JoinHandle<()>,
}

impl Client {
    /// Starts a client of `address` on the current Tokio runtime; it connects in the background
    /// and reports through [`Client::next_event`].
    pub fn start(address: ServiceAddress, options: ClientOptions) -> Client {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, events) = mpsc::channel(options.event_capacity);
        let (server_tx, server) = watch::channel(None);
        let seed = options.seed.unwrap_or_else(rand::random);
        let dials = Arc::new(DialCounters::default());
        let options_transports = options.transports;
        let mut machine = Machine::new(options.machine.clone(), seed);
        machine
            .topics_mut()
            .subscribe(options.topics.iter().cloned());
        let driver = Driver {
            dials: dials.clone(),
            machine,
            rng: StdRng::seed_from_u64(seed.rotate_left(17) ^ 0x5eed),
            resolver: options.resolver.clone(),
            address,
            options,
            events: event_tx,
            server: server_tx,
            commands: command_rx,
            feed_partial: false,
            transport: TransportChoice::new(options_transports),
            in_use: Transport::WebSocket,
        };
        let task = tokio::spawn(driver.run());
        Client {
            commands,
            events,
            server,
            dials,
            task,
        }
    }

    /// The next event; `None` once the client has stopped and every event was read.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Subscribes to more topics, now and on every later server.
    pub fn subscribe<I, T>(&self, topics: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let topics = topics.into_iter().map(Into::into).collect();
        self.commands
            .send(Command::Subscribe(topics))
            .map_err(|_| Error::Closed)
    }

    /// Stops receiving topics.
    pub fn unsubscribe<I, T>(&self, topics: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let topics = topics.into_iter().map(Into::into).collect();
        self.commands
            .send(Command::Unsubscribe(topics))
            .map_err(|_| Error::Closed)
    }

    /// The url of the server the client is connected and subscribed to, if it is.
    pub fn server(&self) -> Option<String> {
        self.server.borrow().clone()
    }

    /// The connections opened so far, by purpose: what a failover cost (the benchmarks read it).
    pub fn dials(&self) -> Dials {
        self.dials.snapshot()
    }

    /// A receiver that sees every change of [`Client::server`].
    pub fn watch_server(&self) -> watch::Receiver<Option<String>> {
        self.server.clone()
    }

    /// Waits until the client is connected, for at most `timeout`, and returns the server's url.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<String, Error> {
        let mut server = self.server.clone();
        let wait = server.wait_for(Option::is_some);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(url)) => Ok(url.clone().unwrap_or_default()),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::TimedOut {
                what: "waiting for a connection",
                url: "the service".to_string(),
                after: timeout,
            }),
        }
    }

    /// Stops the client: closes its connection and waits for its task to end.
    pub async fn close(self) {
        let _ = self.commands.send(Command::Stop);
        drop(self.events);
        let _ = self.task.await;
    }
}
