//! The client: reach the service, choose a server, keep the connection, fail over.
//!
//! A [`Client`] is what an application embeds to receive a farm's streams. It reaches the farm
//! through its [`ServiceAddress`], reads the farm list from the first server that answers, picks
//! a server with a selection [`Policy`] (from `streamfarm_core::selection`, never re-implemented
//! here), keeps one connection to it with heartbeats, and when that server fails, fails over:
//! re-request the list at once (or, with `RetryMode::RetryOnce`, retry the same server once
//! first), select again without the servers that just failed, back off between rounds. Its topics are resubscribed on every new server from the position it holds, so
//! a failover loses nothing: the node sends what was missed, the client drops what it already
//! had, and the application hears about each step as an [`Event`] — [`Event::Recovered`] once
//! the missed messages are in, [`Event::Gap`] for what the farm no longer holds.
//!
//! ```no_run
//! use streamfarm_client::{ClientOptions, Event};
//! # async fn demo() -> Result<(), streamfarm_client::Error> {
//! let mut client = ClientOptions::new()
//!     .subscribe(["prices"])
//!     .start("127.0.0.1:7400,127.0.0.2:7400".parse()?);
//! while let Some(event) = client.next_event().await {
//!     match event {
//!         Event::Message { topic, payload, .. } => {
//!             println!("{topic}: {}", String::from_utf8_lossy(&payload))
//!         }
//!         Event::Gap { topic, from, to, reason, .. } => {
//!             eprintln!("{topic}: offsets {from}..={to:?} will never come ({reason})")
//!         }
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`address`] — [`ServiceAddress`] parsing, name resolution (system or a given DNS server).
//! - [`machine`] — the failover state machine: pure, every transition unit-tested.
//! - [`topics`] — the machine's topics and the position held in each: duplicates, recoveries, gaps.
//! - [`backoff`] — capped exponential backoff with full jitter.
//! - `connection` — one connection: greeting (`hello`, `farm`), subscribing, frame decoding.
//! - [`transport`] — WebSocket or event stream: the choice, pure; `event_stream` — one event
//!   stream (`GET /sse`, frames as `POST /sse/{stream}`).
//! - `client` — [`Client`], the handle; its task (`client::driver`) runs the machine over real
//!   sockets, one network operation (`client::dial`: a list, a connection) at a time.
//! - [`options`] — [`ClientOptions`], the builder.
//! - `http` — one-shot requests: [`fetch_list`] and [`publish`].
//! - [`error`] — [`Error`] and [`ErrorKind`].
//!
//! It owns no server code: the node and the wire protocol live in `streamfarm-node` and
//! `streamfarm_core::protocol`.

pub mod address;
pub mod backoff;
mod client;
mod connection;
pub mod error;
mod event_stream;
mod http;
pub mod machine;
pub mod options;
pub mod tls;
pub mod token;
pub mod topics;
pub mod transport;

pub use address::{Resolver, ServiceAddress};
pub use backoff::Backoff;
pub use client::{Client, Dials, Event};
pub use error::{Error, ErrorKind, Rejection};
pub use http::{fetch_list, publish};
pub use machine::{LossCause, RetryMode};
pub use options::ClientOptions;
pub use streamfarm_core::Policy;
pub use streamfarm_core::protocol::{Epoch, Position};
pub use tls::{CertificateProblem, TlsSettings};
pub use token::TokenSource;
pub use topics::TopicNotice;
pub use transport::{Transport, Transports};
