//! Server-sent events: a streaming connection over plain HTTP, for clients whose network refuses
//! the WebSocket upgrade (`docs/PROTOCOL.md`, Server-sent events).
//!
//! `GET /sse?topics=…` answers `text/event-stream`. The stream is a [`Session`] like any
//! WebSocket's — the same send queue and byte budget, the same registration in the hub (it is a
//! user, rebalanced and drained like the others), the same handling of client frames, token
//! expiry and limits — whose queued frames are written as events instead of WebSocket messages:
//! - a `msg` frame is an unnamed event (`onmessage` in a browser) whose `data` is the frame's
//!   JSON and whose `id` is every topic's position after it ([`event_id`]), so a request
//!   carrying it back as `Last-Event-ID` resumes every topic exactly, on any node;
//! - every other frame is an event named by its `type` (`hello`, `farm`, `subscribed`, `gap`,
//!   `feed`, `migrate`, `ping`, `error`, …); `subscribed`, `unsubscribed` and `gap` carry an
//!   `id` too, since they move positions;
//! - the close a WebSocket would get is an event `close` (`{"code":4000,"reason":"…"}`), and
//!   the response ends.
//!
//! The client's frames (`sub`, `unsub`, `pub`, `list`, `refresh`, `hello`, `ping`) come as
//! `POST /sse/{stream}` to the node serving the stream: `stream` is a random key named in the
//! `hello` event, known only to the client, and the frames wait in a small bounded inbox, which
//! holds no buffer while empty. The stream is the response body: on a plain connection it is
//! written on the socket past hyper, in a task of its own ([`serve_plain`]); over TLS, by
//! hyper's connection task.
//!
//! # A delivery's cost
//! A WebSocket subscriber is handed the message's frame serialized once for every subscriber.
//! An event stream shares as much: what an event of a `msg` frame holds that is the same on every
//! stream — its `data` lines, its topic and position, and that topic's entry of the id
//! (`TOPIC:EPOCH:OFFSET`, percent-encoded) — is rendered once per message, on the first stream
//! that writes it, and kept in a small cache of the node ([`RenderedMsgs`], bounded in entries
//! and bytes) for the other streams. The cache is keyed by the frame's buffer: the fan-out hands
//! every subscriber a handle to the same buffer, and an entry holds one too, so an address names
//! one frame for as long as its entry lives. A frame not found (evicted, or too large to keep)
//! is rendered again, for that stream alone.
//!
//! The id stays per stream, since it carries every topic's position, but costs a copy rather than
//! formatting: each stream holds every topic's id entry encoded ([`Held`]), a `msg` replaces its
//! topic's entry with the message's rendered one, and the id is the entries joined, as
//! [`event_id::encode`] would write them. An event is then a few copies into the burst's buffer,
//! which is sized before it is written: one allocation per burst of up to [`WRITE_BURST`] events,
//! as a WebSocket writer fills one buffer per burst.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, Utf8Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use futures_util::task::AtomicWaker;
use futures_util::{FutureExt, Stream};
use http_body_util::BodyExt;
use serde::Deserialize;
use streamfarm_core::Status;
use streamfarm_core::protocol::{
    ClientFrame, Epoch, Position, ServerFrame, close, event_id, feature,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info};

use crate::auth::AuthError;
use crate::hub::{Closer, encode};
use crate::listener::HttpSlot;
use crate::queue::Cost;
use crate::session::{Session, check_topic};
use crate::{Shared, metrics};

/// Client frames that may wait for a stream to take them; beyond, `POST` answers `429`.
const INBOX_FRAMES: usize = 16;
/// Most frames written into one chunk of the response (one write to the socket).
const WRITE_BURST: usize = 64;
/// How long a browser waits before reconnecting by itself (the `retry` field), in ms.
const RETRY_MS: u64 = 1000;

/// The client's frames for one stream, waiting for the stream to take them: at most
/// [`INBOX_FRAMES`]. Empty, it holds no buffer: an idle stream pays a few words for it, where a
/// tokio channel would hold a block of 32 slots for every stream.
#[derive(Debug, Default)]
struct Inbox {
    frames: Mutex<VecDeque<String>>,
    /// The stream's task, woken by a frame.
    waker: AtomicWaker,
}

impl Inbox {
    fn frames(&self) -> MutexGuard<'_, VecDeque<String>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame; false when [`INBOX_FRAMES`] already wait.
    fn put(&self, frame: String) -> bool {
        {
            let mut frames = self.frames();
            if frames.len() >= INBOX_FRAMES {
                return false;
            }
            frames.push_back(frame);
        }
        self.waker.wake();
        true
    }

    /// The next frame, or `None` with `cx` woken when one comes.
    fn take(&self, cx: &mut Context<'_>) -> Option<String> {
        self.waker.register(cx.waker());
        self.frames().pop_front()
    }
}

/// The open event streams of this node, by key: where `POST /sse/{stream}` puts a frame.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    inboxes: Mutex<HashMap<String, Arc<Inbox>>>,
    /// The `msg` events the streams are writing, rendered once for all of them.
    rendered: RenderedMsgs,
}

impl Streams {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Inbox>>> {
        self.inboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new stream's key and inbox.
    fn open(&self) -> (String, Arc<Inbox>) {
        let inbox = Arc::new(Inbox::default());
        let key = format!("{:032x}", rand::random::<u128>());
        self.lock().insert(key.clone(), inbox.clone());
        (key, inbox)
    }

    fn close(&self, key: &str) {
        self.lock().remove(key);
    }

    fn inbox(&self, key: &str) -> Option<Arc<Inbox>> {
        self.lock().get(key).cloned()
    }
}

/// A response for a request that opens no stream: a status and why, as text.
fn refuse(code: StatusCode, why: impl Into<String>) -> Response {
    (code, format!("{}\n", why.into())).into_response()
}

/// `GET /sse?topics=T1,T2[&token=…][&lastEventId=…][&features=migrate][&migrating=true]`.
pub(crate) async fn open(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    slot: Option<Extension<HttpSlot>>,
    headers: HeaderMap,
) -> Response {
    match *shared.status.borrow() {
        Status::Up => {}
        status => {
            metrics::inc(&shared.metrics.connections_refused);
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("node is {status}: connect to another server"),
            );
        }
    }
    let last_id = headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::to_string))
        .or_else(|| query.get("lastEventId").cloned().map(Ok));
    let resume = match last_id {
        None => BTreeMap::new(),
        Some(Err(_)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Last-Event-ID: not visible ASCII (send back the id of the last event as it came)",
            );
        }
        Some(Ok(id)) => match event_id::parse(&id) {
            Ok(positions) => positions,
            Err(why) => return refuse(StatusCode::BAD_REQUEST, format!("Last-Event-ID: {why}")),
        },
    };
    // The topics of the url, and those of the id: a browser reconnecting by itself sends the
    // url it opened, and the id names the topics subscribed since.
    let mut topics: Vec<String> = query
        .get("topics")
        .map(|t| {
            t.split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    topics.extend(resume.keys().cloned());
    topics.sort();
    topics.dedup();
    if let Some(problem) = topics.iter().find_map(|t| check_topic(t).err()) {
        return refuse(StatusCode::BAD_REQUEST, format!("topics: {problem}"));
    }
    let token = crate::http::presented_token(&query, &headers);
    let grant = match shared.auth.admit(token.as_deref()) {
        Ok(Some(grant)) => grant,
        // No `auth` frame over this transport: the token comes with the request or not at all.
        Ok(None) => return auth_refused(&shared, &AuthError::Missing),
        Err(err) => return auth_refused(&shared, &err),
    };
    let Ok(permit) = shared.connection_limit.clone().try_acquire_owned() else {
        metrics::inc(&shared.metrics.connections_refused);
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "server full: connect to another server",
        );
    };
    let flag = |name: &str| query.get(name).map(String::as_str);
    let migrates = flag("features").is_some_and(|f| f.split(',').any(|f| f == feature::MIGRATE));
    let migrating = flag("migrating") == Some("true");

    // A stream from now on: under the streaming limit, no longer among the HTTP connections
    // that a flood of new ones may close.
    let (key, inbox) = shared.sse.open();
    let mut session = Session::new(shared.clone(), grant);
    let ended = CancellationToken::new();
    if let Some(Extension(slot)) = slot {
        slot.give_back();
        shared.tracker.spawn(drop_if_stuck(
            &shared,
            session.closer().clone(),
            slot,
            ended.clone(),
        ));
    }
    let hello = hello_with_stream(&session, &key);
    session.greet_with(hello);
    session.register();
    shared.hub.hello(session.id(), migrates, migrating);
    metrics::inc(&shared.metrics.sse_connections);
    debug!(conn = session.id(), "event stream open");
    if shared.cancel.is_cancelled() {
        session
            .closer()
            .close(close::GOING_AWAY, "node shutting down");
    }
    let positions: BTreeMap<String, Option<Position>> = topics
        .iter()
        .map(|t| (t.clone(), None))
        .chain(resume)
        .collect();
    if !topics.is_empty() {
        let held = positions
            .iter()
            .filter_map(|(t, p)| p.map(|p| (t.clone(), p)))
            .collect();
        session.subscribe(topics, held);
    }
    let deadline = session.ping_or_expiry();
    let events = EventStream {
        session,
        key,
        inbox,
        timer: Box::pin(sleep_until(deadline)),
        held: Held::new(positions),
        preamble: true,
        done: false,
        _ended: ended.drop_guard(),
        _permit: permit,
    };
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
            // The connection has left the HTTP connections' count: it ends with the stream.
            (header::CONNECTION, "close"),
            // Proxies that buffer responses (nginx) pass this one through as it comes.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

/// `401` or `403` for a token the stream cannot have, counted like a WebSocket's refusal.
fn auth_refused(shared: &Shared, err: &AuthError) -> Response {
    let code = if matches!(err, AuthError::Forbidden(_)) {
        metrics::inc(&shared.metrics.auth_forbidden);
        StatusCode::FORBIDDEN
    } else {
        metrics::inc(&shared.metrics.auth_failures);
        StatusCode::UNAUTHORIZED
    };
    info!(code = err.close_code(), reason = %err, "refusing event stream");
    (
        code,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        format!(
            "{} ({}): present a token as ?token= or Authorization: Bearer\n",
            err.close_reason(),
            err.close_code()
        ),
    )
        .into_response()
}

/// The `hello` frame with the stream's key, which the client's `POST`s name: the frame's JSON
/// with one more field (after `type`, which stays first, as nodes write it).
fn hello_with_stream(session: &Session, key: &str) -> Message {
    let Message::Text(hello) = encode(&session.hello()) else {
        unreachable!("frames are text");
    };
    let fields = hello.strip_suffix('}').unwrap_or(&hello);
    // The key is hexadecimal: nothing in it needs escaping.
    Message::Text(Utf8Bytes::from(format!(r#"{fields},"stream":"{key}"}}"#)))
}

/// `POST /sse/{stream}`: one client frame (JSON) for the stream `stream` of this node.
pub(crate) async fn post(
    State(shared): State<Arc<Shared>>,
    Path(key): Path<String>,
    body: String,
) -> Response {
    if let Err(err) = serde_json::from_str::<ClientFrame>(&body) {
        metrics::inc(&shared.metrics.bad_frames);
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("not a client frame: {err}"),
        );
    }
    let Some(inbox) = shared.sse.inbox(&key) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "no such stream on this node: it ended, or another node serves it \
             (post to the node whose hello named the stream)",
        );
    };
    if inbox.put(body) {
        (StatusCode::ACCEPTED, "accepted\n").into_response()
    } else {
        refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{INBOX_FRAMES} frames already wait for this stream: send the next one after an answer"
            ),
        )
    }
}

/// The response body of one event stream: see the module docs.
struct EventStream {
    session: Session,
    key: String,
    inbox: Arc<Inbox>,
    /// The next ping, or the token's expiry.
    timer: Pin<Box<Sleep>>,
    /// Each subscribed topic's position after the last event written: the events' `id`.
    held: Held,
    /// The `retry` field is still to be written.
    preamble: bool,
    /// The `close` event is written: the body ends.
    done: bool,
    /// Tells [`drop_if_stuck`] the stream is gone.
    _ended: DropGuard,
    _permit: OwnedSemaphorePermit,
}

/// Drops the connection of a stream asked to close that has not ended `heartbeat_timeout` later,
/// as a WebSocket session gives up its close: hyper writes the body only as the client reads, so
/// a client that stopped reading (a slow consumer) would otherwise keep the stream, its user and
/// its descriptor for as long as its TCP connection lives. Ends with the stream (`ended`).
fn drop_if_stuck(
    shared: &Shared,
    closer: Closer,
    slot: HttpSlot,
    ended: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let grace = shared.config.heartbeat_timeout();
    async move {
        tokio::select! {
            () = ended.cancelled() => {}
            () = async {
                closer.closed().await;
                tokio::time::sleep(grace).await;
            } => {
                debug!("dropping an event stream that did not end after its close");
                slot.close_connection();
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.shared().sse.close(&self.key);
        metrics::dec(&self.shared().metrics.sse_connections);
        self.session.unregister();
        self.session.outlet().queue.close();
        debug!(conn = self.session.id(), "event stream closed");
    }
}

impl EventStream {
    fn shared(&self) -> &Arc<Shared> {
        self.session.shared()
    }

    /// The last chunk: what is still queued (unless the client is too slow for it) and the
    /// `close` event.
    fn closing(&mut self, out: &mut Vec<u8>) {
        let (code, reason) = self
            .session
            .closer()
            .reason()
            .unwrap_or((1000, String::new()));
        let queue = self.session.outlet().queue.clone();
        queue.close();
        let mut left = Vec::new();
        while let Some(message) = queue.try_pop() {
            if code != close::SLOW_CONSUMER {
                left.push(message);
            }
        }
        self.write_events(out, &left);
        let data = serde_json::json!({"code": code, "reason": reason});
        out.extend_from_slice(format!("event: close\ndata: {data}\n\n").as_bytes());
    }

    /// Appends `messages` to `out`, one event each: `msg` frames from their shared rendering.
    fn write_events(&mut self, out: &mut Vec<u8>, messages: &[Message]) {
        if messages.is_empty() {
            return;
        }
        let rendered = self.shared().sse.rendered.render(messages);
        let id_len = self.held.id_len();
        out.reserve(
            messages
                .iter()
                .zip(&rendered)
                .map(|(message, msg)| match msg {
                    Some(msg) => EVENT_FIELDS_BYTES + id_len + msg.data.len(),
                    None => EVENT_FIELDS_BYTES + id_len + message_len(message),
                })
                .sum(),
        );
        for (message, msg) in messages.iter().zip(rendered) {
            match msg {
                Some(msg) => self.held.write_msg(out, &msg),
                None => {
                    if let Message::Text(text) = message {
                        self.held.write_frame(out, text);
                    }
                }
            }
        }
    }

    /// Serves the client's frames waiting in the inbox, while no `sub` or `pub` is in progress.
    fn take_inbox(&mut self, cx: &mut Context<'_>) {
        while !self.session.busy() {
            match self.inbox.take(cx) {
                Some(text) => {
                    self.session.handle(Message::Text(Utf8Bytes::from(text)));
                }
                None => return,
            }
        }
    }

    /// Fires the timer: the token's expiry closes the stream, the heartbeat queues a `ping`.
    fn poll_timer(&mut self, cx: &mut Context<'_>) {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if self.session.expired(now) {
                metrics::inc(&self.shared().metrics.auth_failures);
                let err = AuthError::Expired;
                self.session
                    .closer()
                    .close(err.close_code(), &err.close_reason());
                return;
            }
            self.session.ping_if_quiet(now);
            let deadline = self.session.ping_or_expiry();
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl Stream for EventStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut out = Vec::new();
        if this.preamble {
            this.preamble = false;
            out.extend_from_slice(format!("retry: {RETRY_MS}\n\n").as_bytes());
        }
        this.session.poll_pending(cx);
        this.take_inbox(cx);
        this.poll_timer(cx);
        if this.session.closer().poll_closed(cx).is_ready() {
            this.done = true;
            this.closing(&mut out);
            return Poll::Ready(Some(Ok(Bytes::from(out))));
        }
        let queue = this.session.outlet().queue.clone();
        let mut burst = Vec::new();
        while burst.len() < WRITE_BURST {
            let message = match queue.try_pop() {
                Some(message) => message,
                None => match queue.poll_pop(cx) {
                    Poll::Ready(Some(message)) => message,
                    Poll::Ready(None) | Poll::Pending => break,
                },
            };
            if burst.is_empty() {
                burst.reserve_exact(WRITE_BURST);
            }
            burst.push(message);
        }
        let written = burst.len();
        let cost = burst.iter().map(Cost::cost).sum();
        this.write_events(&mut out, &burst);
        drop(burst);
        // The chunk goes to the connection, which takes the next one only once the socket has
        // taken this one: at most one burst is out of the queue's byte count.
        queue.written(cost);
        if written > 0 {
            this.session.sent(Instant::now());
            if this.session.ping_or_expiry() < this.timer.deadline() {
                let deadline = this.session.ping_or_expiry();
                this.timer.as_mut().reset(deadline);
            }
        }
        if out.is_empty() {
            return Poll::Pending;
        }
        if written == WRITE_BURST {
            // More may be queued: come back after this chunk.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Some(Ok(Bytes::from(out))))
    }
}

/// How a plain connection's first request starts when it opens an event stream.
const PLAIN_REQUEST: &[u8] = b"GET /sse";
/// Longest request head read for an event stream served past hyper.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in that head.
const MAX_HEADERS: usize = 64;
/// Longest body of a refusal written past hyper.
const MAX_REFUSAL_BYTES: usize = 64 * 1024;
/// Most bytes of ready chunks gathered into one write.
const GATHER_BYTES: usize = 64 * 1024;
/// How long an event stream goes on once the node stops (its session is closed meanwhile).
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Serves a plain connection whose first request opens an event stream (`GET /sse`) past hyper;
/// returns any other connection untouched, for hyper.
///
/// hyper keeps an HTTP/1 connection's read buffer and write buffer (8 KiB each, none smaller)
/// for as long as its response lasts, and an event stream's lasts as long as the stream: most of
/// an idle stream's memory. Here the request head is read and parsed once, the router answers it
/// as it answers hyper's requests, and the response is written on the socket as it comes — a
/// chunk per burst of events, as a WebSocket session writes its frames — with no buffer held
/// between chunks. The response is delimited by the connection's end (`connection: close`),
/// which every HTTP/1.1 client reads. A connection silent for `head_timeout`, or whose head is
/// not complete by then, is closed, as hyper closes it.
pub(crate) async fn serve_plain(
    tcp: TcpStream,
    router: &Router,
    slot: &HttpSlot,
    head_timeout: Duration,
    stop: &CancellationToken,
) -> Option<TcpStream> {
    let deadline = Instant::now() + head_timeout;
    let mut start = [0u8; PLAIN_REQUEST.len() + 1];
    let peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut start)).await;
    match peeked {
        Ok(Ok(n)) if n == start.len() && start.starts_with(PLAIN_REQUEST) => {
            // `/sse` or `/sse?…`, not `/sse/…` (a frame's POST) nor `/ssex`.
            if !matches!(start[PLAIN_REQUEST.len()], b' ' | b'?') {
                return Some(tcp);
            }
        }
        // Nothing by the deadline: closed, as hyper would.
        Err(_) | Ok(Err(_)) => return None,
        // Another request, or a first segment too short to tell: hyper's.
        Ok(Ok(_)) => return Some(tcp),
    }
    let mut tcp = tcp;
    let head = match tokio::time::timeout_at(deadline, read_head(&mut tcp)).await {
        Ok(Ok(head)) => head,
        Ok(Err(why)) => {
            let _ = write_plain(&mut tcp, StatusCode::BAD_REQUEST, why).await;
            return None;
        }
        Err(_) => return None,
    };
    let request = match parse_head(&head) {
        Ok(mut request) => {
            request.extensions_mut().insert(slot.clone());
            request
        }
        Err(why) => {
            let _ = write_plain(&mut tcp, StatusCode::BAD_REQUEST, &why).await;
            return None;
        }
    };
    drop(head);
    let mut router = router.clone();
    let Ok(response) = tower_service::Service::call(&mut router, request).await;
    // The stream gets a task of its own, and the connection's task ends here: that task's
    // state is sized for hyper's connection and a TLS handshake too, more than a stream needs.
    let closed = slot.connection_closed();
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = write_response(&mut tcp, response, &stop) => {}
            () = closed => {}
        }
    });
    None
}

/// The request head, up to its blank line.
async fn read_head(tcp: &mut TcpStream) -> Result<Vec<u8>, &'static str> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = tcp.read(&mut buf).await.map_err(|_| "read failed")?;
        if n == 0 {
            return Err("the connection ended in the request head");
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err("request head too large");
        }
    }
}

/// The request of a head, with no body.
fn parse_head(head: &[u8]) -> Result<axum::http::Request<Body>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete request head".into()),
        Err(err) => return Err(format!("bad request head: {err}")),
    }
    let version = match parsed.version {
        Some(0) => axum::http::Version::HTTP_10,
        _ => axum::http::Version::HTTP_11,
    };
    let mut request = axum::http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"))
        .version(version);
    for header in parsed.headers.iter() {
        request = request.header(header.name, header.value);
    }
    request
        .body(Body::empty())
        .map_err(|err| format!("bad request head: {err}"))
}

/// A small response of its own, and the end of the connection.
async fn write_plain(tcp: &mut TcpStream, status: StatusCode, why: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{why}\n",
        why.len() + 1
    );
    tcp.write_all(head.as_bytes()).await
}

/// Writes the router's response: a refusal whole, with its length; an event stream as its
/// chunks come, until it ends, the client goes, or the node has stopped for [`STOP_GRACE`].
async fn write_response(
    tcp: &mut TcpStream,
    response: Response,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    let (parts, mut body) = response.into_parts();
    let streaming = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut head = format!("HTTP/1.1 {}\r\n", parts.status).into_bytes();
    for (name, value) in &parts.headers {
        if name == header::CONNECTION || name == header::CONTENT_LENGTH {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"connection: close\r\n");
    if !streaming {
        let whole = http_body_util::Limited::new(body, MAX_REFUSAL_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        head.extend_from_slice(format!("content-length: {}\r\n\r\n", whole.len()).as_bytes());
        head.extend_from_slice(&whole);
        return tcp.write_all(&head).await;
    }
    head.extend_from_slice(b"\r\n");
    tcp.write_all(&head).await?;
    drop(head);
    let (mut reader, mut writer) = tcp.split();
    let mut stopped = pin!(async {
        stop.cancelled().await;
        tokio::time::sleep(STOP_GRACE).await;
    });
    loop {
        let mut byte = [0u8; 1];
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    // Chunks ready now leave in one write, as hyper gathers them.
                    let mut more = None;
                    while let Some(Some(Ok(frame))) = body.frame().now_or_never() {
                        let Ok(next) = frame.into_data() else { continue };
                        let gathered: &mut Vec<u8> = more.get_or_insert_with(|| data.to_vec());
                        gathered.extend_from_slice(&next);
                        if gathered.len() >= GATHER_BYTES {
                            break;
                        }
                    }
                    writer.write_all(more.as_deref().unwrap_or(&data)).await?;
                }
                Some(Err(_)) | None => break,
            },
            // The client sends nothing on an event stream: its end, or anything, ends it.
            _ = reader.read(&mut byte) => break,
            () = &mut stopped => break,
        }
    }
    writer.shutdown().await
}

/// The position held after a `gap` of `epoch` up to `to` (to the end of the epoch: `None`).
fn after_gap(held: Option<Position>, epoch: Epoch, to: Option<u64>) -> Option<Position> {
    match (held, to) {
        // The rest of the held epoch is gone: whatever epoch comes next is taken as it is.
        (Some(held), None) if held.epoch == epoch => None,
        (Some(held), Some(to)) if held.epoch == epoch && to > held.offset => {
            Some(Position::new(epoch, to))
        }
        (None, Some(to)) => Some(Position::new(epoch, to)),
        (held, _) => held,
    }
}

/// Bytes of an event's fields besides its id's entries and its frame: `id: `, `event: ` and the
/// longest name, `data: `, the line ends.
const EVENT_FIELDS_BYTES: usize = 40;
/// Most `msg` events kept rendered ([`RenderedMsgs`]).
const RENDERED_EVENTS: usize = 1024;
/// Most bytes the rendered events hold, their frames counted (an entry keeps its frame alive):
/// a few bursts of every stream, which write the same messages at about the same time.
const RENDERED_BYTES: usize = 1024 * 1024;
/// Most bytes one message may take of [`RENDERED_BYTES`]; a larger one is rendered per stream.
const RENDERED_MAX_ONE: usize = RENDERED_BYTES / 16;
/// How the node writes a `msg` frame's JSON.
const MSG_PREFIX: &str = r#"{"type":"msg","#;

/// What an event of a `msg` frame holds that is the same on every stream.
#[derive(Debug)]
struct RenderedMsg {
    topic: String,
    position: Option<Position>,
    /// The topic's entry of the event id after this message (`TOPIC:EPOCH:OFFSET`).
    id_entry: String,
    /// The `data` lines and the blank line that ends the event.
    data: Vec<u8>,
}

impl RenderedMsg {
    /// The rendering of a `msg` frame; `None` for any other frame.
    fn of(text: &str) -> Option<Self> {
        let head = msg_head(text)?;
        let position = match (head.epoch, head.offset) {
            (Some(epoch), Some(offset)) => Some(Position::new(epoch, offset)),
            _ => None,
        };
        let mut data = Vec::with_capacity(text.len() + EVENT_FIELDS_BYTES);
        push_data(&mut data, text);
        Some(RenderedMsg {
            id_entry: id_entry(&head.topic, position),
            topic: head.topic.into_owned(),
            position,
            data,
        })
    }

    /// Bytes it holds.
    fn bytes(&self) -> usize {
        size_of::<Self>() + self.topic.len() + self.id_entry.len() + self.data.len()
    }
}

/// The `msg` events being written, rendered once for every stream (see the module docs).
#[derive(Debug, Default)]
struct RenderedMsgs(Mutex<RenderCache>);

#[derive(Debug, Default)]
struct RenderCache {
    /// By the address and length of the frame's buffer.
    by_frame: HashMap<(usize, usize), Arc<RenderedMsg>>,
    /// The frames of `by_frame`, oldest first, each with the bytes its entry counts. Held, so
    /// that no other frame takes the address of one while its entry lives.
    oldest_first: VecDeque<(Utf8Bytes, usize)>,
    /// Bytes of the entries.
    bytes: usize,
}

impl RenderedMsgs {
    /// Each message's rendering (`None` for a frame other than `msg`), under one lock.
    fn render(&self, messages: &[Message]) -> Vec<Option<Arc<RenderedMsg>>> {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        messages
            .iter()
            .map(|message| match message {
                Message::Text(frame) => cache.get_or_render(frame),
                _ => None,
            })
            .collect()
    }
}

impl RenderCache {
    fn get_or_render(&mut self, frame: &Utf8Bytes) -> Option<Arc<RenderedMsg>> {
        if !frame.as_str().starts_with(MSG_PREFIX) {
            return None;
        }
        let key = frame_key(frame);
        if let Some(msg) = self.by_frame.get(&key) {
            return Some(msg.clone());
        }
        let msg = Arc::new(RenderedMsg::of(frame)?);
        let cost = frame.len() + msg.bytes();
        if cost > RENDERED_MAX_ONE {
            return Some(msg);
        }
        while self.by_frame.len() >= RENDERED_EVENTS || self.bytes + cost > RENDERED_BYTES {
            let Some((old, old_cost)) = self.oldest_first.pop_front() else {
                break;
            };
            self.by_frame.remove(&frame_key(&old));
            self.bytes -= old_cost;
        }
        self.by_frame.insert(key, msg.clone());
        self.oldest_first.push_back((frame.clone(), cost));
        self.bytes += cost;
        Some(msg)
    }
}

/// What names a frame's buffer while a handle to it is held: its address and length.
fn frame_key(frame: &Utf8Bytes) -> (usize, usize) {
    (frame.as_str().as_ptr() as usize, frame.len())
}

/// Appends `text` as the `data` lines of an event, and the blank line that ends it. The node's
/// JSON holds no line break; were there one, each line is a `data` line.
fn push_data(out: &mut Vec<u8>, text: &str) {
    for line in text.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// Bytes of a queued frame's payload.
fn message_len(message: &Message) -> usize {
    match message {
        Message::Text(text) => text.len(),
        _ => 0,
    }
}

/// One topic's entry of an event id: [`event_id::encode`] of that topic alone.
fn id_entry(topic: &str, position: Option<Position>) -> String {
    event_id::encode(&BTreeMap::from([(topic.to_string(), position)]))
}

/// Each subscribed topic's position after the last event written, with its entry of the event
/// id encoded: an id is these entries joined by `,` in the topics' order, as
/// [`event_id::encode`] writes them, copied rather than formatted.
#[derive(Debug, Default)]
struct Held(BTreeMap<String, HeldTopic>);

#[derive(Debug)]
struct HeldTopic {
    position: Option<Position>,
    entry: String,
}

impl Held {
    fn new(positions: BTreeMap<String, Option<Position>>) -> Self {
        let mut held = Held::default();
        for (topic, position) in positions {
            held.set(&topic, position);
        }
        held
    }

    fn position(&self, topic: &str) -> Option<Position> {
        self.0.get(topic).and_then(|held| held.position)
    }

    fn set(&mut self, topic: &str, position: Option<Position>) {
        self.set_encoded(topic, position, &id_entry(topic, position));
    }

    /// Holds `position` for `topic`, whose id entry `entry` is already encoded.
    fn set_encoded(&mut self, topic: &str, position: Option<Position>, entry: &str) {
        match self.0.get_mut(topic) {
            Some(held) => {
                held.position = position;
                held.entry.clear();
                held.entry.push_str(entry);
            }
            None => {
                let entry = entry.to_string();
                self.0
                    .insert(topic.to_string(), HeldTopic { position, entry });
            }
        }
    }

    /// Bytes of the id's entries and their separators.
    fn id_len(&self) -> usize {
        self.0.values().map(|held| held.entry.len() + 1).sum()
    }

    /// Appends the `id` line.
    fn write_id(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"id: ");
        for (i, held) in self.0.values().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(held.entry.as_bytes());
        }
        out.push(b'\n');
    }

    /// Appends the event of a `msg` frame, its topic's position moved to the message's.
    fn write_msg(&mut self, out: &mut Vec<u8>, msg: &RenderedMsg) {
        if let Some(position) = msg.position {
            self.set_encoded(&msg.topic, Some(position), &msg.id_entry);
        }
        self.write_id(out);
        out.extend_from_slice(&msg.data);
    }

    /// Appends the event of a frame other than `msg`: named by its `type`, with an id if it
    /// moves a position.
    fn write_frame(&mut self, out: &mut Vec<u8>, text: &str) {
        let (name, moves) = match serde_json::from_str::<ServerFrame>(text) {
            Ok(frame) => (Some(frame_type(&frame)), self.follow(frame)),
            Err(_) => (None, false),
        };
        if moves {
            self.write_id(out);
        }
        if let Some(name) = name {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(name.as_bytes());
            out.push(b'\n');
        }
        push_data(out, text);
    }

    /// Follows the positions a frame other than `msg` moves; returns whether it moved any.
    fn follow(&mut self, frame: ServerFrame) -> bool {
        match frame {
            ServerFrame::Subscribed { topics, positions } => {
                for topic in topics {
                    // A position is taken only for a topic without one.
                    if self.position(&topic).is_none() {
                        self.set(&topic, positions.get(&topic).copied());
                    }
                }
                true
            }
            ServerFrame::Unsubscribed { topics } => {
                for topic in &topics {
                    self.0.remove(topic);
                }
                true
            }
            ServerFrame::Gap {
                topic, epoch, to, ..
            } => {
                let moved = after_gap(self.position(&topic), epoch, to);
                self.set(&topic, moved);
                true
            }
            _ => false,
        }
    }

    /// Each topic's position, as [`event_id::encode`] takes them.
    #[cfg(test)]
    fn positions(&self) -> BTreeMap<String, Option<Position>> {
        self.0
            .iter()
            .map(|(topic, held)| (topic.clone(), held.position))
            .collect()
    }
}

/// What an event needs of a `msg` frame, read without its payload.
#[derive(Deserialize)]
struct MsgHead<'a> {
    #[serde(borrow)]
    topic: std::borrow::Cow<'a, str>,
    #[serde(default)]
    epoch: Option<Epoch>,
    #[serde(default)]
    offset: Option<u64>,
}

/// The topic and position of a `msg` frame as the node writes it (`type` first); `None` for any
/// other frame.
fn msg_head(text: &str) -> Option<MsgHead<'_>> {
    if !text.starts_with(MSG_PREFIX) {
        return None;
    }
    serde_json::from_str(text).ok()
}

/// The event name of a frame: its `type`.
fn frame_type(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Hello { .. } => "hello",
        ServerFrame::Farm(_) => "farm",
        ServerFrame::Subscribed { .. } => "subscribed",
        ServerFrame::Unsubscribed { .. } => "unsubscribed",
        ServerFrame::Msg { .. } => "msg",
        ServerFrame::Gap { .. } => "gap",
        ServerFrame::Feed { .. } => "feed",
        ServerFrame::Migrate { .. } => "migrate",
        ServerFrame::Refreshed { .. } => "refreshed",
        ServerFrame::Error { .. } => "error",
        ServerFrame::Ping { .. } => "ping",
        ServerFrame::Pong { .. } => "pong",
    }
}

#[cfg(test)]
mod tests {
    use streamfarm_core::protocol::GapReason;

    use super::*;

    /// A `msg` frame as the hub queues it.
    fn msg_frame(topic: &str, epoch: u64, offset: u64, data: &str) -> Utf8Bytes {
        text(&ServerFrame::Msg {
            topic: topic.into(),
            data: data.into(),
            encoding: Default::default(),
            epoch: Some(Epoch(epoch)),
            offset: Some(offset),
            ts: None,
        })
    }

    fn text(frame: &ServerFrame) -> Utf8Bytes {
        match encode(frame) {
            Message::Text(text) => text,
            _ => panic!("frames are text"),
        }
    }

    /// The `id` lines of events written to `out`.
    fn ids(out: &[u8]) -> Vec<String> {
        std::str::from_utf8(out)
            .expect("events are text")
            .lines()
            .filter_map(|line| line.strip_prefix("id: "))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_msg_event_is_the_id_and_the_frame_as_data() {
        let frame = msg_frame("prices", 0x19ad1a0b2e7, 21, r#"{"bid":101.5}"#);
        let mut held = Held::new(BTreeMap::from([("prices".to_string(), None)]));
        let mut out = Vec::new();
        let msg = RenderedMsg::of(&frame).expect("a msg frame");
        held.write_msg(&mut out, &msg);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "id: prices:0000019ad1a0b2e7:21\ndata: {}\n\n",
                frame.as_str()
            )
        );
    }

    #[test]
    fn every_event_id_is_what_event_id_encodes_for_every_topic() {
        let e = 0x19ad1a0b2e7;
        let at = |offset| Some(Position::new(Epoch(e), offset));
        let mut expected = BTreeMap::from([
            ("news/eu".to_string(), at(3)),
            ("prices".to_string(), None),
            ("quiet".to_string(), None),
        ]);
        let mut held = Held::new(expected.clone());
        let mut out = Vec::new();
        let mut check = |held: &mut Held,
                         event: &dyn Fn(&mut Held, &mut Vec<u8>),
                         expected: &BTreeMap<String, Option<Position>>| {
            out.clear();
            event(held, &mut out);
            assert_eq!(ids(&out), vec![event_id::encode(expected)]);
            assert_eq!(&held.positions(), expected);
        };
        let write_msg = |topic: &'static str, offset| {
            move |held: &mut Held, out: &mut Vec<u8>| {
                let frame = msg_frame(topic, e, offset, "x");
                held.write_msg(out, &RenderedMsg::of(&frame).unwrap());
            }
        };
        let write_frame = |frame: ServerFrame| {
            move |held: &mut Held, out: &mut Vec<u8>| held.write_frame(out, &text(&frame))
        };

        expected.insert("prices".into(), at(21));
        check(&mut held, &write_msg("prices", 21), &expected);
        expected.insert("news/eu".into(), at(4));
        check(&mut held, &write_msg("news/eu", 4), &expected);
        // A position is taken only for a topic without one.
        expected.insert("quiet".into(), at(7));
        let subscribed = ServerFrame::Subscribed {
            topics: vec!["quiet".into(), "prices".into()],
            positions: BTreeMap::from([
                ("quiet".to_string(), Position::new(Epoch(e), 7)),
                ("prices".to_string(), Position::new(Epoch(e), 1)),
            ]),
        };
        check(&mut held, &write_frame(subscribed), &expected);
        let gap = |topic: &str, to| ServerFrame::Gap {
            topic: topic.into(),
            epoch: Epoch(e),
            from: 5,
            to,
            reason: GapReason::HistoryExceeded,
        };
        expected.insert("news/eu".into(), at(9));
        check(&mut held, &write_frame(gap("news/eu", Some(9))), &expected);
        expected.insert("prices".into(), None);
        check(&mut held, &write_frame(gap("prices", None)), &expected);
        expected.remove("quiet");
        let unsubscribed = ServerFrame::Unsubscribed {
            topics: vec!["quiet".into()],
        };
        check(&mut held, &write_frame(unsubscribed), &expected);
        expected.insert("prices".into(), at(22));
        check(&mut held, &write_msg("prices", 22), &expected);

        // A frame that moves no position has no id, and is named by its type.
        out.clear();
        held.write_frame(&mut out, &text(&ServerFrame::Ping { id: Some(1) }));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: ping\ndata: {\"type\":\"ping\",\"id\":1}\n\n"
        );
    }

    #[test]
    fn a_message_is_rendered_once_for_every_stream() {
        let mut cache = RenderCache::default();
        let frame = msg_frame("t", 1, 2, "hello");
        let first = cache.get_or_render(&frame.clone()).expect("a msg frame");
        let again = cache.get_or_render(&frame.clone()).expect("a msg frame");
        assert!(Arc::ptr_eq(&first, &again), "rendered twice");
        assert_eq!(
            first.data,
            format!("data: {}\n\n", frame.as_str()).as_bytes()
        );
        assert_eq!(first.id_entry, "t:0000000000000001:2");
        // The same text in another buffer is another frame, rendered alike.
        let copy = Utf8Bytes::from(frame.as_str().to_string());
        let other = cache.get_or_render(&copy).expect("a msg frame");
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(first.data, other.data);
        let ping = text(&ServerFrame::Ping { id: None });
        assert!(cache.get_or_render(&ping).is_none());
    }

    #[test]
    fn the_rendered_messages_are_bounded_in_entries_and_bytes() {
        let mut cache = RenderCache::default();
        let frames: Vec<Utf8Bytes> = (1..=2 * RENDERED_EVENTS as u64)
            .map(|offset| msg_frame("t", 1, offset, &"x".repeat(offset as usize % 3000)))
            .collect();
        for frame in &frames {
            let msg = cache.get_or_render(frame).expect("a msg frame");
            assert_eq!(msg.data, format!("data: {}\n\n", frame.as_str()).as_bytes());
            assert!(
                cache.by_frame.len() <= RENDERED_EVENTS,
                "{}",
                cache.by_frame.len()
            );
            assert!(cache.bytes <= RENDERED_BYTES, "{}", cache.bytes);
            assert_eq!(cache.oldest_first.len(), cache.by_frame.len());
        }
        // An evicted frame is rendered again, as it was.
        let first = cache.get_or_render(&frames[0]).expect("a msg frame");
        assert_eq!(first.position, Some(Position::new(Epoch(1), 1)));
        // A message too large to keep is rendered, not kept.
        let large = msg_frame("t", 1, 9, &"y".repeat(RENDERED_MAX_ONE));
        assert!(cache.get_or_render(&large).is_some());
        assert!(!cache.by_frame.contains_key(&frame_key(&large)));
    }

    #[test]
    fn a_msg_frame_is_read_without_its_payload() {
        let frame = ServerFrame::Msg {
            topic: "prices".into(),
            data: "{\"bid\":1}".into(),
            encoding: Default::default(),
            epoch: Some(Epoch(9)),
            offset: Some(4),
            ts: None,
        };
        let text = encode(&frame);
        let Message::Text(text) = text else {
            panic!("a text frame")
        };
        let head = msg_head(&text).expect("a msg frame");
        assert_eq!(
            (&*head.topic, head.epoch, head.offset),
            ("prices", Some(Epoch(9)), Some(4))
        );
        assert!(msg_head(r#"{"type":"gap","topic":"t"}"#).is_none());
    }

    #[test]
    fn gaps_move_the_held_position_as_a_client_does() {
        let e = Epoch(3);
        let at = |o| Some(Position::new(e, o));
        assert_eq!(after_gap(at(2), e, Some(7)), at(7));
        assert_eq!(after_gap(at(9), e, Some(7)), at(9));
        assert_eq!(after_gap(at(2), e, None), None);
        assert_eq!(after_gap(None, e, Some(7)), at(7));
        assert_eq!(after_gap(at(2), Epoch(4), None), at(2));
    }
}
