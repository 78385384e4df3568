//! The client's errors: one enum, each variant naming what failed and where, with a [`kind`]
//! for code that branches on the category rather than the text.
//!
//! [`kind`]: Error::kind

use std::time::Duration;

use streamfarm_core::SelectionError;
use streamfarm_core::protocol::close;

use crate::tls::CertificateProblem;

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
    /// The server refused a subscription (an `error` frame: a topic the token does not allow,
    /// a bad topic name).
    #[error("{url} refused the subscription: {code}: {message}")]
    SubscribeRefused {
        /// The server's url.
        url: String,
        /// The error code (`forbidden`, `bad_topic`, …).
        code: String,
        /// What the server said.
        message: String,
    },
    /// The server's TLS certificate was not accepted.
    #[error("the certificate of {url} was refused: {problem}")]
    Certificate {
        /// The server's url.
        url: String,
        /// What is wrong with it, and the likely fix.
        problem: CertificateProblem,
    },
    /// No server of the service address answered.
    #[error("no server of {address} answered ({tried} tried); last error: {last}")]
    Unreachable {
        /// The service address.
        address: String,
        /// How many addresses were tried.
        tried: usize,
        /// The last error seen; the last [rejection](Error::rejection) when a server rejected
        /// the client, as that says more than a server that did not answer.
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
    /// See [`Error::Refused`] and [`Error::SubscribeRefused`].
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
    /// See [`Error::Certificate`].
    Certificate,
    /// See [`Error::Closed`].
    Closed,
}

/// Why a server rejected this client where a retry, with the same settings, meets the same
/// answer: the client's own retries cannot fix it, only a new certificate, CA file or token can.
/// See [`Error::rejection`] and [`Event::Rejected`](crate::Event::Rejected).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The server's certificate was not accepted.
    Certificate(CertificateProblem),
    /// The server refused the token: close code `4010` (missing), `4011` (invalid), `4012`
    /// (expired) or `4013` (forbidden), as `docs/AUTH.md` lists them.
    Token {
        /// The close code.
        code: u16,
    },
    /// The server refused a subscription with this error code (`forbidden`: the token does not
    /// allow the topic; `bad_topic`).
    Subscription {
        /// The error code.
        code: String,
    },
}

impl Error {
    /// The server refused with a close code that sends clients to another server.
    pub fn sends_elsewhere(&self) -> bool {
        matches!(self, Error::Refused { code, .. } if crate::machine::sends_elsewhere(*code))
    }

    /// Why the server rejected the client, when a retry with the same settings cannot help
    /// (looking inside [`Error::Unreachable`]); `None` for everything a retry may fix (an
    /// unreachable, draining or full server, a timeout).
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            Error::Certificate { problem, .. } => Some(Rejection::Certificate(problem.clone())),
            Error::Refused { code, .. }
                if matches!(
                    *code,
                    close::AUTH_MISSING
                        | close::AUTH_INVALID
                        | close::AUTH_EXPIRED
                        | close::AUTH_FORBIDDEN
                ) =>
            {
                Some(Rejection::Token { code: *code })
            }
            Error::SubscribeRefused { code, .. } => {
                Some(Rejection::Subscription { code: code.clone() })
            }
            Error::Unreachable { last, .. } => last.rejection(),
            _ => None,
        }
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidAddress { .. } => ErrorKind::InvalidAddress,
            Error::Resolve { .. } => ErrorKind::Resolve,
            Error::Connect { .. } | Error::WebSocket { .. } => ErrorKind::Connect,
            Error::TimedOut { .. } => ErrorKind::TimedOut,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::Refused { .. } | Error::SubscribeRefused { .. } => ErrorKind::Refused,
            Error::Certificate { .. } => ErrorKind::Certificate,
            Error::Unreachable { .. } => ErrorKind::Unreachable,
            Error::Selection(_) => ErrorKind::NoServerAvailable,
            Error::Http { .. } => ErrorKind::Http,
            Error::Token { .. } => ErrorKind::Token,
            Error::Tls { .. } => ErrorKind::Tls,
            Error::Closed => ErrorKind::Closed,
        }
    }
}
