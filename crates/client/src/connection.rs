//! One connection to a node: open it, read its greeting (`hello`, then `farm`), subscribe, and
//! turn incoming messages into protocol frames.
//!
//! A connection is a [`Channel`]: a WebSocket, or an event stream whose events read as the same
//! messages (`crate::event_stream`). The greeting and subscription steps are generic over the
//! WebSocket's byte stream, so they are tested over an in-memory pipe; [`dial`] adds the TCP
//! part (optionally from a chosen source address) and the transport plan: a WebSocket first, an
//! event stream on the same node when its upgrade is refused (`crate::transport`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use streamfarm_core::FarmList;
use streamfarm_core::protocol::{ClientFrame, Position, ServerFrame, feature};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tracing::debug;

use crate::address::{Endpoint, Resolver, Target};
use crate::error::Error;
use crate::event_stream::{self, EventStream};
use crate::tls::{ClientStream, TlsSettings};
use crate::token::TokenSource;
use crate::transport::{Plan, Transport, Transports};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What a node said about itself in its `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    /// The node's streaming url, as its farm list names it.
    pub(crate) url: String,
    /// The node pings when it has sent nothing for this long; the client does the same.
    pub(crate) heartbeat_interval: Duration,
    /// The node closes a connection silent for this long.
    pub(crate) heartbeat_timeout: Duration,
}

/// What carries a connection's messages.
#[derive(Debug)]
pub(crate) enum Channel<S = ClientStream> {
    WebSocket(WebSocketStream<S>),
    EventStream(EventStream),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    pub(crate) fn transport(&self) -> Transport {
        match self {
            Channel::WebSocket(_) => Transport::WebSocket,
            Channel::EventStream(_) => Transport::EventStream,
        }
    }

    /// The next message; `None` once the connection has ended. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Option<Result<Message, WsError>> {
        match self {
            Channel::WebSocket(ws) => ws.next().await,
            Channel::EventStream(events) => events.next().await,
        }
    }

    /// Sends a message, and everything fed before it.
    pub(crate) async fn send(&mut self, message: Message) -> Result<(), WsError> {
        match self {
            Channel::WebSocket(ws) => ws.send(message).await,
            Channel::EventStream(events) => events.send(message).await,
        }
    }

    /// Queues a message for the next [`Channel::send`] (an event stream posts it at once).
    async fn feed(&mut self, message: Message) -> Result<(), WsError> {
        match self {
            Channel::WebSocket(ws) => ws.feed(message).await,
            Channel::EventStream(events) => events.send(message).await,
        }
    }
}

/// An open, greeted connection.
#[derive(Debug)]
pub(crate) struct Conn<S = ClientStream> {
    pub(crate) channel: Channel<S>,
    pub(crate) hello: Hello,
    /// The list the node sent right after `hello`.
    pub(crate) list: FarmList,
    /// When the token the connection was opened with expires (seconds since the Unix epoch).
    pub(crate) token_exp: Option<u64>,
    /// The topics a subscription was already sent for on this connection, ahead of the
    /// decision to keep it (see [`send_subscription`]).
    pub(crate) subscription_sent: Option<Vec<String>>,
    /// Frames read before the subscription was confirmed and kept for the caller, as
    /// [`confirmed`] keeps them (a `feed` sent while the client waited for its list).
    pub(crate) early: Vec<ServerFrame>,
}

/// How the client opens connections: from which address, trusting which TLS roots, with
/// which token, over which transport.
#[derive(Debug, Clone)]
pub(crate) struct Dialer {
    pub(crate) source: Option<IpAddr>,
    pub(crate) tls: TlsSettings,
    pub(crate) token: Option<TokenSource>,
    pub(crate) plan: Plan,
}

impl Default for Dialer {
    fn default() -> Self {
        Dialer {
            source: None,
            tls: TlsSettings::default(),
            token: None,
            plan: crate::transport::TransportChoice::new(Transports::Auto).plan(),
        }
    }
}

impl Dialer {
    /// A token from the source, when there is one.
    pub(crate) async fn token(&self, url: &str) -> Result<Option<String>, Error> {
        match &self.token {
            None => Ok(None),
            Some(source) => source
                .fetch()
                .await
                .map(Some)
                .map_err(|detail| Error::Token {
                    url: url.to_string(),
                    detail,
                }),
        }
    }
}

/// A WebSocket message, decoded.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming {
    /// A protocol frame.
    Frame(ServerFrame),
    /// The node closed the connection.
    Closed { code: u16, reason: String },
    /// Nothing for the protocol (a WebSocket-level ping or pong).
    Nothing,
    /// A message that is not a frame of the protocol.
    Invalid(String),
}

pub(crate) fn decode(message: Message) -> Incoming {
    match message {
        Message::Text(text) => match ServerFrame::from_json(text.as_str()) {
            Ok(frame) => Incoming::Frame(frame),
            Err(err) => Incoming::Invalid(format!("bad frame ({err})")),
        },
        Message::Close(frame) => {
            let (code, reason) = frame
                .map(|f| (u16::from(f.code), f.reason.to_string()))
                .unwrap_or((1005, String::new()));
            Incoming::Closed { code, reason }
        }
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Incoming::Nothing,
        Message::Binary(_) => Incoming::Invalid("binary message".to_string()),
    }
}

pub(crate) async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Channel<S>,
    frame: &ClientFrame,
) -> Result<(), WsError> {
    ws.send(message(frame)).await
}

/// Queues a frame to go out with the next [`send`]: frames sent together leave in one write
/// (one segment, one wake-up of the node) rather than one each.
async fn feed<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Channel<S>,
    frame: &ClientFrame,
) -> Result<(), WsError> {
    ws.feed(message(frame)).await
}

fn message(frame: &ClientFrame) -> Message {
    Message::text(serde_json::to_string(frame).expect("client frames always serialize"))
}

/// Closes with a normal close frame, not waiting long for the node's answer; an event stream
/// ends with its connection.
pub(crate) async fn close<S: AsyncRead + AsyncWrite + Unpin>(channel: Channel<S>) {
    let Channel::WebSocket(mut ws) = channel else {
        return;
    };
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(Some(frame))).await;
}

/// Reads the greeting: `hello` first, then `farm`, answering pings on the way.
pub(crate) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    mut ws: Channel<S>,
    url: &str,
) -> Result<Conn<S>, Error> {
    let protocol = |detail: String| Error::Protocol {
        url: url.to_string(),
        detail,
    };
    let mut hello = None;
    loop {
        let frame = match next_frame(&mut ws, url).await? {
            ServerFrame::Ping { id } => {
                send(&mut ws, &ClientFrame::Pong { id })
                    .await
                    .map_err(|e| ws_error(url, e))?;
                continue;
            }
            frame => frame,
        };
        match (frame, hello.take()) {
            (
                ServerFrame::Hello {
                    url: node_url,
                    heartbeat_interval_ms,
                    heartbeat_timeout_ms,
                    ..
                },
                None,
            ) => {
                hello = Some(Hello {
                    url: node_url,
                    heartbeat_interval: Duration::from_millis(heartbeat_interval_ms.max(1)),
                    heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms.max(1)),
                });
            }
            (ServerFrame::Farm(list), Some(hello)) => {
                return Ok(Conn {
                    channel: ws,
                    hello,
                    list,
                    token_exp: None,
                    subscription_sent: None,
                    early: Vec::new(),
                });
            }
            (frame, None) => return Err(protocol(format!("expected hello first, got {frame:?}"))),
            (frame, Some(_)) => {
                return Err(protocol(format!(
                    "expected farm after hello, got {frame:?}"
                )));
            }
        }
    }
}

/// Subscribes `topics` (resuming those with a position in `positions`), asks the node to push
/// the farm list as it changes, and waits until the node confirms every topic. Returns the
/// `subscribed` frames, then the messages that arrived meanwhile, in order, for the caller to
/// deliver. When a subscription was already sent on `conn` ([`send_subscription`]), it is not
/// sent again: this waits for the topics it named, and returns them in place of `topics`.
pub(crate) async fn subscribe<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    topics: &[String],
    positions: &BTreeMap<String, Position>,
    migrating: bool,
) -> Result<(Vec<String>, Vec<ServerFrame>), Error> {
    let topics = match conn.subscription_sent.clone() {
        Some(sent) => sent,
        None => {
            send_subscription(conn, topics, positions, migrating).await?;
            topics.to_vec()
        }
    };
    let early = confirmed(conn, &topics).await?;
    Ok((topics, early))
}

/// Sends the client's `hello`, the `sub` of `topics` (resuming those with a position in
/// `positions`) and the request to watch the farm list, without waiting for anything.
///
/// A failing-over client sends these on the connection to its pick as soon as that answers,
/// before it has read the list and decided to keep the connection (it keeps it for nearly every
/// client, see `crate::machine`): the node then works on the subscription while the client
/// decides, instead of after. A connection not kept is closed, which ends the subscription.
pub(crate) async fn send_subscription<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    topics: &[String],
    positions: &BTreeMap<String, Position>,
    migrating: bool,
) -> Result<(), Error> {
    let url = conn.hello.url.clone();
    conn.subscription_sent = Some(topics.to_vec());
    // What this client can do: the node moves it with `migrate` frames rather than closes.
    let hello = ClientFrame::Hello {
        features: vec![feature::MIGRATE.to_string()],
        migrating,
    };
    if topics.is_empty() {
        return send(&mut conn.channel, &hello)
            .await
            .map_err(|e| ws_error(&url, e));
    }
    feed(&mut conn.channel, &hello)
        .await
        .map_err(|e| ws_error(&url, e))?;
    let sub = ClientFrame::Sub {
        topics: topics.to_vec(),
        positions: positions
            .iter()
            .filter(|(topic, _)| topics.contains(topic))
            .map(|(topic, p)| (topic.clone(), *p))
            .collect(),
    };
    feed(&mut conn.channel, &sub)
        .await
        .map_err(|e| ws_error(&url, e))?;
    // A connected client keeps its list current: the node pushes it when the farm changes.
    send(
        &mut conn.channel,
        &ClientFrame::List {
            watch: true,
            users: false,
        },
    )
    .await
    .map_err(|e| ws_error(&url, e))
}

/// Asks the node of a list connection for a list to choose from, and keeps it as the
/// connection's list: the greeting's list is the one every connection gets, without the draw and
/// the clients in flight a list server hands out with a list a client chooses from
/// (`docs/PROTOCOL.md`, "The farm list"). Sent before any subscription: what else comes meanwhile
/// is answered (pings) or kept (a `feed`) as [`confirmed`] does.
pub(crate) async fn ask_list<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    within: Duration,
) -> Result<(), Error> {
    let url = conn.hello.url.clone();
    let ask = ClientFrame::List {
        watch: false,
        users: false,
    };
    send(&mut conn.channel, &ask)
        .await
        .map_err(|e| ws_error(&url, e))?;
    let answer = async {
        loop {
            match next_frame(&mut conn.channel, &url).await? {
                ServerFrame::Ping { id } => send(&mut conn.channel, &ClientFrame::Pong { id })
                    .await
                    .map_err(|e| ws_error(&url, e))?,
                ServerFrame::Farm(list) => return Ok::<_, Error>(list),
                frame @ ServerFrame::Feed { .. } => conn.early.push(frame),
                _ => {}
            }
        }
    };
    conn.list = tokio::time::timeout(within, answer)
        .await
        .map_err(|_| Error::Protocol {
            url: url.clone(),
            detail: format!("no farm list within {within:?} of asking"),
        })??;
    Ok(())
}

/// Waits until the node confirms every one of `topics`; returns the `subscribed` frames, then
/// the messages that arrived meanwhile, in order.
async fn confirmed<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    topics: &[String],
) -> Result<Vec<ServerFrame>, Error> {
    let url = conn.hello.url.clone();
    let mut early = std::mem::take(&mut conn.early);
    let mut missing: Vec<&String> = topics.iter().collect();
    while !missing.is_empty() {
        match next_frame(&mut conn.channel, &url).await? {
            frame @ ServerFrame::Subscribed { .. } => {
                if let ServerFrame::Subscribed { topics, .. } = &frame {
                    missing.retain(|t| !topics.contains(t));
                }
                early.push(frame);
            }
            ServerFrame::Ping { id } => send(&mut conn.channel, &ClientFrame::Pong { id })
                .await
                .map_err(|e| ws_error(&url, e))?,
            ServerFrame::Error { code, message } => {
                return Err(Error::SubscribeRefused { url, code, message });
            }
            ServerFrame::Farm(list) => conn.list = list,
            frame @ (ServerFrame::Msg { .. } | ServerFrame::Feed { .. }) => early.push(frame),
            _ => {}
        }
    }
    Ok(early)
}

async fn next_frame<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut Channel<S>,
    url: &str,
) -> Result<ServerFrame, Error> {
    let protocol = |detail: String| Error::Protocol {
        url: url.to_string(),
        detail,
    };
    loop {
        let message = match ws.next().await {
            Some(Ok(message)) => message,
            Some(Err(err)) => return Err(ws_error(url, err)),
            None => return Err(protocol("connection ended".to_string())),
        };
        match decode(message) {
            Incoming::Frame(frame) => return Ok(frame),
            Incoming::Nothing => {}
            Incoming::Closed { code, reason } => {
                return Err(Error::Refused {
                    url: url.to_string(),
                    code,
                    reason,
                });
            }
            Incoming::Invalid(detail) => return Err(protocol(detail)),
        }
    }
}

fn ws_error(url: &str, source: WsError) -> Error {
    Error::WebSocket {
        url: url.to_string(),
        source: Box::new(source),
    }
}

/// The TCP connection to `endpoint` (from the dialer's source address), over TLS for a TLS
/// target.
pub(crate) async fn open_stream(
    endpoint: &Endpoint,
    dialer: &Dialer,
    url: &str,
) -> Result<ClientStream, Error> {
    let connect_error = |source| Error::Connect {
        url: url.to_string(),
        source,
    };
    let tcp = tcp_connect(endpoint.addr, dialer.source)
        .await
        .map_err(connect_error)?;
    let _ = tcp.set_nodelay(true);
    if !endpoint.target.tls {
        return Ok(ClientStream::Plain(tcp));
    }
    let host = &endpoint.target.host;
    crate::tls::connect(&dialer.tls, host, tcp)
        .await
        .map_err(
            |source| match crate::tls::certificate_problem(&source, host) {
                Some(problem) => Error::Certificate {
                    url: url.to_string(),
                    problem,
                },
                None => connect_error(source),
            },
        )
}

/// Opens a greeted connection to `endpoint` within `timeout`, by the dialer's transport plan
/// (with its token in an `Authorization: Bearer` header): a WebSocket, or an event stream, or a
/// WebSocket and, when the node was reached but its upgrade refused, an event stream on the same
/// node within another `timeout`.
pub(crate) async fn dial(
    endpoint: &Endpoint,
    dialer: &Dialer,
    timeout: Duration,
) -> Result<Conn, Error> {
    let url = endpoint.url();
    if dialer.plan.first == Transport::EventStream {
        let attempt = dial_event_stream(endpoint, dialer, &url);
        return within(timeout, &url, "connecting", attempt).await;
    }
    let mut reached = false;
    let attempt = dial_websocket(endpoint, dialer, &url, &mut reached);
    let result = within(timeout, &url, "connecting", attempt).await;
    match result {
        Err(err) if dialer.plan.fall_back && reached && upgrade_refused(&err) => {
            debug!(%url, %err, "WebSocket refused; opening an event stream");
            let attempt = dial_event_stream(endpoint, dialer, &url);
            within(timeout, &url, "opening an event stream", attempt)
                .await
                // Both failed: the WebSocket's error says more when the event stream found no
                // stream at all (an old node), the event stream's when it was refused too.
                .map_err(|sse| match sse {
                    Error::Http { .. } => err,
                    sse => sse,
                })
        }
        result => result,
    }
}

/// `attempt`, given up after `timeout`.
async fn within(
    timeout: Duration,
    url: &str,
    what: &'static str,
    attempt: impl Future<Output = Result<Conn, Error>>,
) -> Result<Conn, Error> {
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| Error::TimedOut {
            what,
            url: url.to_string(),
            after: timeout,
        })?
}

/// A WebSocket attempt that reached the node (TCP and TLS up) failed in a way that an event
/// stream may not: the upgrade was answered with a status, the socket closed before the
/// greeting, or nothing came in time. A node that closed it with a code answered over the
/// WebSocket: its refusal stands.
fn upgrade_refused(err: &Error) -> bool {
    match err {
        Error::WebSocket { source, .. } => !matches!(
            **source,
            WsError::Tls(_) | WsError::Url(_) | WsError::AttackAttempt
        ),
        Error::Protocol { .. } | Error::TimedOut { .. } => true,
        _ => false,
    }
}

async fn dial_websocket(
    endpoint: &Endpoint,
    dialer: &Dialer,
    url: &str,
    reached: &mut bool,
) -> Result<Conn, Error> {
    let token = dialer.token(url).await?;
    let stream = open_stream(endpoint, dialer, url).await?;
    *reached = true;
    let mut request = url.into_client_request().map_err(|e| ws_error(url, e))?;
    if let Some(token) = &token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Token {
                url: url.to_string(),
                detail: "the token has characters a header cannot carry".into(),
            })?;
        request.headers_mut().insert("authorization", value);
    }
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
            .await
            .map_err(|e| ws_error(url, e))?;
    let mut conn = greet(Channel::WebSocket(ws), url).await?;
    conn.token_exp = token.as_deref().and_then(crate::token::expiry);
    Ok(conn)
}

async fn dial_event_stream(endpoint: &Endpoint, dialer: &Dialer, url: &str) -> Result<Conn, Error> {
    let token = dialer.token(url).await?;
    let events = event_stream::open(endpoint, dialer, token.as_deref()).await?;
    let mut conn = greet(Channel::EventStream(events), url).await?;
    conn.token_exp = token.as_deref().and_then(crate::token::expiry);
    Ok(conn)
}

/// Small buffers: a process may hold thousands of idle connections (`streamfarm load`), and
/// tungstenite's default 128 KiB read buffer, allocated up front, would cost 128 KiB each.
/// Frames are small; a bigger message just takes more reads. Writes wait in a buffer only until
/// the next flush, and every [`send`] flushes ([`feed`] lets a few frames share one write).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
}

pub(crate) async fn tcp_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// Dials a server by its url (as a farm list names it), trying each address its host resolves to.
pub(crate) async fn dial_url(
    url: &str,
    resolver: &Resolver,
    dialer: &Dialer,
    timeout: Duration,
) -> Result<Conn, Error> {
    let target = Target::parse(url)?;
    let mut last = None;
    for addr in resolver.lookup(&target).await? {
        let endpoint = Endpoint {
            addr,
            target: target.clone(),
        };
        match dial(&endpoint, dialer, timeout).await {
            Ok(conn) => return Ok(conn),
            Err(err) => last = Some(err),
        }
    }
    Err(last.expect("lookup returns at least one address"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use streamfarm_core::{ServerEntry, Status};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// Both ends of an in-memory WebSocket: the client's and the node's.
    pub(crate) async fn pipe() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let node = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (client, node)
    }

    pub(crate) async fn node_sends(node: &mut WebSocketStream<DuplexStream>, frame: &ServerFrame) {
        node.send(Message::text(serde_json::to_string(frame).unwrap()))
            .await
            .unwrap();
    }

    pub(crate) fn hello(url: &str) -> ServerFrame {
        ServerFrame::Hello {
            server: "a".into(),
            url: url.into(),
            status: Status::Up,
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_ms: 3000,
            max_frame_bytes: 65536,
        }
    }

    pub(crate) fn farm(url: &str) -> ServerFrame {
        ServerFrame::Farm(FarmList::new(vec![ServerEntry::new(
            "a",
            url,
            Status::Up,
            0,
            "A",
        )]))
    }

    async fn node_reads(node: &mut WebSocketStream<DuplexStream>) -> ClientFrame {
        loop {
            if let Message::Text(t) = node.next().await.unwrap().unwrap() {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn greeting_is_hello_then_farm_with_pings_answered() {
        let (client, mut node) = pipe().await;
        node_sends(&mut node, &ServerFrame::Ping { id: Some(1) }).await;
        node_sends(&mut node, &hello("ws://a/stream")).await;
        node_sends(&mut node, &farm("ws://a/stream")).await;
        let conn = greet(Channel::WebSocket(client), "ws://127.0.0.1:1/stream")
            .await
            .unwrap();
        assert_eq!(conn.hello.url, "ws://a/stream");
        assert_eq!(conn.hello.heartbeat_timeout, Duration::from_secs(3));
        assert_eq!(conn.list.servers.len(), 1);
        assert_eq!(
            node_reads(&mut node).await,
            ClientFrame::Pong { id: Some(1) }
        );
    }

    #[tokio::test]
    async fn a_list_asked_for_replaces_the_greetings_and_a_feed_meanwhile_is_kept() {
        let (client, mut node) = pipe().await;
        node_sends(&mut node, &hello("ws://a/stream")).await;
        node_sends(&mut node, &farm("ws://a/stream")).await;
        // A node cut off from the farm says so right after its greeting.
        node_sends(&mut node, &ServerFrame::Feed { complete: false }).await;
        node_sends(&mut node, &farm("ws://b/stream")).await;
        let mut conn = greet(Channel::WebSocket(client), "ws://127.0.0.1:1/stream")
            .await
            .unwrap();
        ask_list(&mut conn, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            node_reads(&mut node).await,
            ClientFrame::List {
                watch: false,
                users: false
            }
        );
        assert_eq!(conn.list.servers[0].url, "ws://b/stream");
        assert_eq!(conn.early, vec![ServerFrame::Feed { complete: false }]);
    }

    #[tokio::test]
    async fn greeting_out_of_order_is_a_protocol_error() {
        let (client, mut node) = pipe().await;
        node_sends(&mut node, &farm("ws://a/stream")).await;
        let err = greet(Channel::WebSocket(client), "ws://x/stream")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Protocol);
        assert!(err.to_string().contains("expected hello first"), "{err}");
    }

    #[tokio::test]
    async fn close_during_greeting_names_the_code() {
        let (client, mut node) = pipe().await;
        node.close(Some(CloseFrame {
            code: CloseCode::from(4003),
            reason: "full".into(),
        }))
        .await
        .unwrap();
        let err = greet(Channel::WebSocket(client), "ws://x/stream")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("closed (4003) full"), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::Refused);
        assert!(err.sends_elsewhere());
    }

    #[tokio::test]
    async fn subscribe_resumes_waits_for_every_topic_and_keeps_early_frames() {
        let (client, mut node) = pipe().await;
        node_sends(&mut node, &hello("ws://a/stream")).await;
        node_sends(&mut node, &farm("ws://a/stream")).await;
        let mut conn = greet(Channel::WebSocket(client), "ws://a/stream")
            .await
            .unwrap();
        let topics = vec!["t1".to_string(), "t2".to_string()];
        let at = Position::new(streamfarm_core::protocol::Epoch(3), 9);
        let node_task = tokio::spawn(async move {
            assert_eq!(
                node_reads(&mut node).await,
                ClientFrame::Hello {
                    features: vec!["migrate".into()],
                    migrating: false
                }
            );
            let sub = node_reads(&mut node).await;
            assert_eq!(
                sub,
                ClientFrame::Sub {
                    topics: vec!["t1".into(), "t2".into()],
                    positions: BTreeMap::from([("t2".to_string(), at)]),
                }
            );
            assert_eq!(
                node_reads(&mut node).await,
                ClientFrame::List {
                    watch: true,
                    users: false
                }
            );
            node_sends(
                &mut node,
                &ServerFrame::Subscribed {
                    topics: vec!["t1".into()],
                    positions: BTreeMap::new(),
                },
            )
            .await;
            let msg = ServerFrame::Msg {
                topic: "t1".into(),
                data: "early".into(),
                encoding: Default::default(),
                epoch: None,
                offset: None,
                ts: None,
            };
            node_sends(&mut node, &msg).await;
            node_sends(
                &mut node,
                &ServerFrame::Subscribed {
                    topics: vec!["t2".into()],
                    positions: BTreeMap::new(),
                },
            )
            .await;
            node
        });
        // A position for a topic not subscribed here is not sent.
        let positions = BTreeMap::from([("t2".to_string(), at), ("gone".to_string(), at)]);
        let (subscribed, early) = subscribe(&mut conn, &topics, &positions, false)
            .await
            .unwrap();
        assert_eq!(subscribed, topics);
        assert!(
            matches!(&early[..], [ServerFrame::Subscribed { .. }, ServerFrame::Msg { data, .. }, ServerFrame::Subscribed { .. }] if data == "early"),
            "{early:?}"
        );
        node_task.await.unwrap();
    }

    #[tokio::test]
    async fn a_subscription_sent_ahead_is_not_sent_again_and_names_its_topics() {
        let (client, mut node) = pipe().await;
        node_sends(&mut node, &hello("ws://a/stream")).await;
        node_sends(&mut node, &farm("ws://a/stream")).await;
        let mut conn = greet(Channel::WebSocket(client), "ws://a/stream")
            .await
            .unwrap();
        let ahead = vec!["t1".to_string()];
        send_subscription(&mut conn, &ahead, &BTreeMap::new(), false)
            .await
            .unwrap();
        let node_task = tokio::spawn(async move {
            let mut frames = Vec::new();
            for _ in 0..3 {
                frames.push(node_reads(&mut node).await);
            }
            node_sends(
                &mut node,
                &ServerFrame::Subscribed {
                    topics: vec!["t1".into()],
                    positions: BTreeMap::new(),
                },
            )
            .await;
            // Nothing more comes: the client's next frame is its close.
            let more = tokio::time::timeout(Duration::from_millis(200), node.next()).await;
            (frames, more)
        });
        // Asked for other topics since: it waits for the ones sent, and says which.
        let now = vec!["t1".to_string(), "t2".to_string()];
        let (subscribed, early) = subscribe(&mut conn, &now, &BTreeMap::new(), false)
            .await
            .unwrap();
        assert_eq!(subscribed, ahead);
        assert_eq!(early.len(), 1, "{early:?}");
        let (frames, more) = node_task.await.unwrap();
        let subs = frames
            .iter()
            .filter(|f| matches!(f, ClientFrame::Sub { .. }))
            .count();
        assert_eq!(subs, 1, "{frames:?}");
        assert!(more.is_err(), "a second frame came: {more:?}");
    }

    #[tokio::test]
    async fn refused_subscription_is_an_error() {
        let (client, mut node) = pipe().await;
        node_sends(&mut node, &hello("ws://a/stream")).await;
        node_sends(&mut node, &farm("ws://a/stream")).await;
        let mut conn = greet(Channel::WebSocket(client), "ws://a/stream")
            .await
            .unwrap();
        node_sends(
            &mut node,
            &ServerFrame::Error {
                code: "bad_topic".into(),
                message: "empty topic".into(),
            },
        )
        .await;
        let err = subscribe(&mut conn, &["".to_string()], &BTreeMap::new(), false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("bad_topic"), "{err}");
        assert_eq!(
            err.rejection(),
            Some(crate::error::Rejection::Subscription {
                code: "bad_topic".into()
            })
        );
    }

    #[tokio::test]
    async fn dial_to_a_closed_port_is_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let endpoint = Endpoint {
            addr,
            target: Target::parse(&addr.to_string()).unwrap(),
        };
        let err = dial(&endpoint, &Dialer::default(), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Connect, "{err}");
    }

    #[tokio::test]
    async fn dial_to_a_silent_server_times_out() {
        // Accepts TCP, never answers the WebSocket handshake: a hung node.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoint = Endpoint {
            addr,
            target: Target::parse(&addr.to_string()).unwrap(),
        };
        let err = dial(&endpoint, &Dialer::default(), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::TimedOut, "{err}");
        drop(listener);
    }
}
