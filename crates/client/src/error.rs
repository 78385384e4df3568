//! The client's errors: one enum, each variant naming what failed and where, with a [`kind`]
//! for code that branches on the category rather than the text.
//!
//! [`kind`]: Error::kind

use std::time::Duration;

use streamfarm_core::SelectionError;

/// What went wrong in the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service address (or a server url) could not be parsed.
    #[error("invalid address {input:?}: {reason}")]
    InvalidAddress {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A host name did not resolve.
    #[error("cannot resolve {host:?}: {detail}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's answer.
        detail: String,
    },
    /// The TCP connection could not be opened.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The server's url.
        url: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The WebSocket handshake or the connection failed.
    #[error("WebSocket to {url} failed: {source}")]
    WebSocket {
        /// The server's url.
        url: String,
        /// The WebSocket error.
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// A step did not finish in time.
    #[error("{what} at {url} timed out after {after:?}")]
    TimedOut {
        /// What was being done.
        what: &'static str,
        /// The server's url.
        url: String,
        /// The limit.
        after: Duration,
    },
    /// The server sent something the protocol does not allow there, or closed early.
    #[error("protocol error from {url}: {detail}")]
    Protocol {
        /// The server's url.
        url: String,
        /// What was wrong.
        detail: String,
    },
    /// The server closed the connection before it was ready (draining, full, …).
    #[error("{url} refused the connection: closed ({code}) {reason}")]
    Refused {
        /// The server's url.
        url: String,
        /// The close code (see `streamfarm_core::protocol::close`).
        code: u16,
        /// The reason the server gave.
        reason: String,
    },
    /// No server of the service address answered.
    #[error("no server of {address} answered ({tried} tried); last error: {last}")]
    Unreachable {
        /// The service address.
        address: String,
        /// How many addresses were tried.
        tried: usize,
        /// The last error seen.
        last: Box<Error>,
    },
    /// The list had no server to choose.
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// An HTTP request to a node failed or was refused.
    #[error("HTTP {method} {url} failed: {detail}")]
    Http {
        /// The method.
        method: &'static str,
        /// The url requested.
        url: String,
        /// The status and body, or the transport error.
        detail: String,
    },
    /// The token source gave no token.
    #[error("no token for {url}: {detail}")]
    Token {
        /// The server's url.
        url: String,
        /// Why (the provider's error).
        detail: String,
    },
    /// The TLS settings are not usable (a bad CA file).
    #[error("TLS: {detail}")]
    Tls {
        /// What is wrong.
        detail: String,
    },
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
}

/// The category of an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// See [`Error::InvalidAddress`].
    InvalidAddress,
    /// See [`Error::Resolve`].
    Resolve,
    /// See [`Error::Connect`] and [`Error::WebSocket`].
    Connect,
    /// See [`Error::TimedOut`].
    TimedOut,
    /// See [`Error::Protocol`].
    Protocol,
    /// See [`Error::Refused`].
    Refused,
    /// See [`Error::Unreachable`].
    Unreachable,
    /// See [`Error::Selection`].
    NoServerAvailable,
    /// See [`Error::Http`].
    Http,
    /// See [`Error::Token`].
    Token,
    /// See [`Error::Tls`].
    Tls,
    /// See [`Error::Closed`].
    Closed,
}

impl Error {
    /// The server refused with a close code that sends clients to another server.
    pub fn sends_elsewhere(&self) -> bool {
        matches!(self, Error::Refused { code, .. } if crate::machine::sends_elsewhere(*code))
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidAddress { .. } => ErrorKind::InvalidAddress,
            Error::Resolve { .. } => ErrorKind::Resolve,
            Error::Connect { .. } | Error::WebSocket { .. } => ErrorKind::Connect,
            Error::TimedOut { .. } => ErrorKind::TimedOut,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::Refused { .. } => ErrorKind::Refused,
            Error::Unreachable { .. } => ErrorKind::Unreachable,
            Error::Selection(_) => ErrorKind::NoServerAvailable,
            Error::Http { .. } => ErrorKind::Http,
            Error::Token { .. } => ErrorKind::Token,
            Error::Tls { .. } => ErrorKind::Tls,
            Error::Closed => ErrorKind::Closed,
        }
    }
}
