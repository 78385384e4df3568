//! The farm as data: what every other streamfarm crate agrees on.
//!
//! This crate owns the vocabulary of the system of `DESIGN.md`: a server entry (identity, status,
//! connected users, priority group, capacity, join rate), the farm list and its encodings, the
//! frames of the streaming protocol, and client-side server selection. It is pure code — no I/O,
//! no clock, no global RNG — so the node, the client, the simulator and the CLI all share one
//! implementation and tests can drive it deterministically.
//!
//! # Layout
//! - [`address`] — a server url (or `host[:port]`) cut into scheme, host, port and path.
//! - [`model`] — [`ServerEntry`], [`Status`], [`FarmList`] and the priority-group order.
//! - [`encoding`] — the list's encodings (JSON, text, XML, JavaScript): [`Format`], [`render`](encoding::render),
//!   [`parse`](encoding::parse), format detection and HTTP `Accept` negotiation.
//! - [`selection`] — the policies (`weighted`, `random`, `least-users`, `p2c`, `waterfill`) as pure
//!   functions of (list, exclusions, RNG, and for `waterfill` the list's age), with exact
//!   probabilities and an explanation.
//! - [`balance`] — active rebalancing: every server's fair share of the list and who moves how many
//!   clients where, computed alike by every node, the CLI and the simulator.
//! - [`protocol`] — the JSON frames exchanged on the streaming WebSocket (see `docs/PROTOCOL.md`).
//! - [`stats`] — the nearest-rank quantile that load runs and benchmarks report.
//! - [`time`] — a wall-clock instant as milliseconds since the Unix epoch.
//!
//! It must not touch sockets, files or time: callers pass those in.

pub mod address;
pub mod balance;
pub mod encoding;
pub mod model;
pub mod protocol;
pub mod selection;
pub mod stats;
pub mod time;

pub use encoding::{Format, ParseError};
pub use model::{FarmList, ServerEntry, Status};
pub use selection::{Choice, Policy, SelectionError};
