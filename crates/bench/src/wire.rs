//! The wire clients the benchmarks drive, kept minimal so the bench process spends little CPU
//! beside the servers it measures: a raw streamfarm WebSocket client (frames of
//! `docs/PROTOCOL.md`, no failover — that is the client library's job, measured separately) and a
//! NATS TCP client speaking the text protocol (`INFO`, `CONNECT`, `SUB`, `PUB`, `MSG`,
//! `PING`/`PONG`), a reader of the node's server-sent event stream, and a keep-alive HTTP/1.1
//! connection for a publisher that posts thousands of messages a second (`POST /publish/{topic}`). Plus the timestamped payload they all carry.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// How long one connect-and-greet may take before it counts as failed.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Nanoseconds since the first call in this process: the clock in the payloads (publisher and
/// subscribers share the process, so one monotonic clock serves both ends).
pub(crate) fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A payload of `size` bytes (at least 32): the sequence number and the send time as 16 hex digits
/// each, padded with `x` (plain ASCII, so it travels unchanged in a JSON string and a NATS `MSG`).
pub(crate) fn payload(seq: u64, size: usize) -> String {
    let mut text = format!("{seq:016x}{:016x}", now_ns());
    while text.len() < size {
        text.push('x');
    }
    text
}

/// The (sequence, send time) at the start of a payload, or `None`.
pub(crate) fn parse_payload(bytes: &[u8]) -> Option<(u64, u64)> {
    let hex = |b: &[u8]| u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok();
    if bytes.len() < 32 {
        return None;
    }
    Some((hex(&bytes[..16])?, hex(&bytes[16..32])?))
}

/// The payload inside a streamfarm `msg` frame's `data` (no JSON parse: the bench's payloads have
/// no escapes), or `None` for another frame.
pub(crate) fn msg_data(frame: &str) -> Option<&[u8]> {
    let start = frame.find("\"data\":\"")? + 8;
    frame.as_bytes().get(start..)
}

/// A TCP connection to `server`, from `source` when given (to spread ports over 127.0.0.x).
pub(crate) async fn tcp(server: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A streamfarm event stream (`GET /sse`, `docs/PROTOCOL.md` section 10), read as lines: the
/// benchmarks need only the `data` lines. The response is chunked, and every chunk the node
/// writes holds whole events, so a chunk's size line is a line of its own and never starts with
/// `data: `: the lines can be read without decoding the chunks.
pub(crate) struct Sse {
    reader: BufReader<TcpStream>,
    line: Vec<u8>,
}

/// Opens the event stream of the node at `server` subscribed to `topic`, and reads until the
/// `subscribed` event. `read_buffer`: the client's buffer, as for [`ws_connect`].
pub(crate) async fn sse_connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    topic: &str,
    read_buffer: usize,
) -> anyhow::Result<Sse> {
    let open = async {
        let mut stream = tcp(server, source).await?;
        let request = format!("GET /sse?topics={topic} HTTP/1.1\r\nHost: {server}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut sse = Sse {
            reader: BufReader::with_capacity(read_buffer, stream),
            line: Vec::new(),
        };
        let status = sse.next_line().await?.to_vec();
        if !status.starts_with(b"HTTP/1.1 200") {
            bail!(
                "GET /sse on {server}: {}",
                String::from_utf8_lossy(&status).trim()
            );
        }
        while sse.next_line().await? != b"event: subscribed".as_slice() {}
        anyhow::Ok(sse)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .with_context(|| format!("event stream from {server}: timed out"))?
}

impl Sse {
    /// The next line, without its line end; an error once the stream ends.
    async fn next_line(&mut self) -> anyhow::Result<&[u8]> {
        self.line.clear();
        if self.reader.read_until(b'\n', &mut self.line).await? == 0 {
            bail!("the event stream ended");
        }
        while matches!(self.line.last(), Some(b'\n' | b'\r')) {
            self.line.pop();
        }
        Ok(&self.line)
    }

    /// The `data` of the next event that has one (the frame's JSON).
    pub(crate) async fn next_data(&mut self) -> anyhow::Result<&str> {
        loop {
            self.next_line().await?;
            if self.line.starts_with(b"data: ") {
                return std::str::from_utf8(&self.line[6..]).context("event data is not UTF-8");
            }
        }
    }
}

/// A streamfarm WebSocket.
pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Opens the streaming WebSocket of the node at `server` and reads its greeting (`hello`, `farm`).
/// `read_buffer` is the client's read buffer (tungstenite's default, 128 KiB, would make the
/// bench process, not the node, the memory hog of the idle benchmark).
pub(crate) async fn ws_connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    read_buffer: usize,
) -> anyhow::Result<Ws> {
    let greet = async {
        let stream = tcp(server, source).await?;
        let config = WebSocketConfig::default().read_buffer_size(read_buffer);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(
            format!("ws://{server}/stream"),
            stream,
            Some(config),
        )
        .await?;
        for expected in ["\"hello\"", "\"farm\""] {
            let text = ws_text(&mut ws).await?;
            if !text.contains(expected) {
                bail!("expected {expected} from {server}, got {text:.80}");
            }
        }
        anyhow::Ok(ws)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, greet)
        .await
        .with_context(|| format!("connect to {server}: timed out"))?
}

/// Subscribes to `topic` and waits for `subscribed`.
pub(crate) async fn ws_subscribe(ws: &mut Ws, topic: &str) -> anyhow::Result<()> {
    let frame = serde_json::json!({"type": "sub", "topics": [topic]}).to_string();
    ws.send(Message::text(frame)).await?;
    let wait = async {
        loop {
            let text = ws_text(ws).await?;
            if text.contains("\"subscribed\"") {
                return anyhow::Ok(());
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, wait)
        .await
        .context("subscribed: timed out")?
}

/// The next text frame, answering the node's pings on the way.
pub(crate) async fn ws_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                if text.contains("\"type\":\"ping\"") {
                    let pong = text.replace("\"ping\"", "\"pong\"");
                    ws.send(Message::text(pong)).await?;
                    continue;
                }
                return Ok(text.as_str().to_string());
            }
            Some(Ok(Message::Close(frame))) => bail!("closed by the node: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(err.into()),
            None => bail!("connection ended"),
        }
    }
}

/// A `pub` frame.
pub(crate) fn ws_pub_frame(topic: &str, data: &str) -> Message {
    Message::text(format!(
        "{{\"type\":\"pub\",\"topic\":\"{topic}\",\"data\":\"{data}\"}}"
    ))
}

/// A NATS connection: the reading half buffered, the writing half raw.
#[derive(Debug)]
pub(crate) struct Nats {
    pub(crate) reader: BufReader<OwnedReadHalf>,
    pub(crate) writer: OwnedWriteHalf,
    /// Client urls of the cluster's servers, as the last `INFO` gave them (`connect_urls`).
    pub(crate) connect_urls: Vec<String>,
    line: String,
}

/// What a NATS connection read.
#[derive(Debug, PartialEq)]
pub(crate) enum NatsEvent {
    /// A `MSG`; its payload is in the buffer given to [`Nats::next`].
    Msg,
    /// An `INFO` (its `connect_urls` are now in [`Nats::connect_urls`]).
    Info,
    /// `PONG`.
    Pong,
}

impl Nats {
    /// Connects, reads `INFO`, sends `CONNECT` and `PING`, waits for `PONG`.
    pub(crate) async fn connect(
        server: SocketAddr,
        source: Option<IpAddr>,
    ) -> anyhow::Result<Nats> {
        let greet = async {
            let (read, writer) = tcp(server, source).await?.into_split();
            let mut nats = Nats {
                reader: BufReader::with_capacity(64 * 1024, read),
                writer,
                connect_urls: Vec::new(),
                line: String::new(),
            };
            let mut scratch = Vec::new();
            if nats.next(&mut scratch).await? != NatsEvent::Info {
                bail!("nats-server at {server} did not start with INFO");
            }
            nats.writer
                .write_all(
                    b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1}\r\nPING\r\n",
                )
                .await?;
            nats.until_pong().await?;
            anyhow::Ok(nats)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, greet)
            .await
            .with_context(|| format!("connect to nats-server {server}: timed out"))?
    }

    /// Subscribes (`SUB`) and waits until the server has it (a `PING` answered after it).
    pub(crate) async fn subscribe(&mut self, subject: &str, sid: u64) -> anyhow::Result<()> {
        self.writer
            .write_all(format!("SUB {subject} {sid}\r\nPING\r\n").as_bytes())
            .await?;
        self.until_pong().await
    }

    /// Publishes `data` on `subject` and waits until the server has read it (a `PING` answered
    /// after the `PUB`): the NATS counterpart of an HTTP publish answered `2xx`.
    pub(crate) async fn publish_confirmed(
        &mut self,
        subject: &str,
        data: &str,
    ) -> anyhow::Result<()> {
        let mut buf = Vec::with_capacity(data.len() + 32);
        nats_pub(&mut buf, subject, data);
        buf.extend_from_slice(b"PING\r\n");
        self.writer.write_all(&buf).await?;
        self.until_pong().await
    }

    /// Reads until the server's `PONG`.
    pub(crate) async fn until_pong(&mut self) -> anyhow::Result<()> {
        let mut scratch = Vec::new();
        loop {
            if self.next(&mut scratch).await? == NatsEvent::Pong {
                return Ok(());
            }
        }
    }

    /// Reads until a `MSG` (payload into `payload`), `INFO` or `PONG`; answers `PING`s.
    pub(crate) async fn next(&mut self, payload: &mut Vec<u8>) -> anyhow::Result<NatsEvent> {
        loop {
            self.line.clear();
            if self.reader.read_line(&mut self.line).await? == 0 {
                bail!("nats-server closed the connection");
            }
            let line = self.line.trim_end();
            if let Some(rest) = line.strip_prefix("MSG ") {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let size: usize = rest
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("bad MSG line {line:?}"))?;
                payload.resize(size + 2, 0);
                self.reader.read_exact(payload).await?;
                payload.truncate(size);
                return Ok(NatsEvent::Msg);
            } else if let Some(info) = line.strip_prefix("INFO ") {
                let info: serde_json::Value = serde_json::from_str(info)?;
                if let Some(urls) = info.get("connect_urls").and_then(|u| u.as_array()) {
                    self.connect_urls = urls
                        .iter()
                        .filter_map(|u| u.as_str().map(str::to_string))
                        .collect();
                }
                return Ok(NatsEvent::Info);
            } else if line == "PING" {
                self.writer.write_all(b"PONG\r\n").await?;
            } else if line == "PONG" {
                return Ok(NatsEvent::Pong);
            } else if line.starts_with("-ERR") {
                bail!("nats-server: {line}");
            }
        }
    }
}

/// A NATS `PUB` command.
pub(crate) fn nats_pub(buf: &mut Vec<u8>, subject: &str, data: &str) {
    buf.extend_from_slice(format!("PUB {subject} {}\r\n", data.len()).as_bytes());
    buf.extend_from_slice(data.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// One keep-alive HTTP/1.1 connection: requests one at a time, each answer read in full (a node
/// answers with a `Content-Length`; chunked answers are not supported). [`streamfarm_localfarm::http`]
/// opens a connection per request, too slow for a publisher at a thousand requests a second.
#[derive(Debug)]
pub(crate) struct HttpConn {
    stream: BufReader<TcpStream>,
    server: SocketAddr,
    line: String,
    /// The server said `Connection: close`: the connection must not be used again.
    closing: bool,
}

impl HttpConn {
    /// Connects to `server`, from `source` when given, within [`CONNECT_TIMEOUT`] or `within`,
    /// whichever is shorter.
    pub(crate) async fn connect(
        server: SocketAddr,
        source: Option<IpAddr>,
        within: Duration,
    ) -> anyhow::Result<HttpConn> {
        let stream = tokio::time::timeout(within.min(CONNECT_TIMEOUT), tcp(server, source))
            .await
            .with_context(|| format!("connect to {server}: timed out"))??;
        Ok(HttpConn {
            stream: BufReader::new(stream),
            server,
            line: String::new(),
            closing: false,
        })
    }

    /// `POST path` with `body` (and an `Idempotency-Key` header when `key` is given: a message
    /// sent again through another node is then not published twice); the status code of the
    /// answer (its body is read and dropped). After an error, or when [`HttpConn::reusable`] turns
    /// false, drop the connection.
    pub(crate) async fn post(
        &mut self,
        path: &str,
        body: &str,
        key: Option<&str>,
    ) -> anyhow::Result<u16> {
        let key = key.map_or(String::new(), |key| format!("Idempotency-Key: {key}\r\n"));
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{key}Content-Length: {}\r\n\r\n{body}",
            self.server,
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        self.line.clear();
        if self.stream.read_line(&mut self.line).await? == 0 {
            bail!("{} closed the connection", self.server);
        }
        let status: u16 = self
            .line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("bad status line {:?}", self.line.trim_end()))?;
        let mut length = 0usize;
        let mut close = false;
        loop {
            self.line.clear();
            if self.stream.read_line(&mut self.line).await? == 0 {
                bail!("{} closed the connection in the headers", self.server);
            }
            let header = self.line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().context("bad Content-Length")?;
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
            {
                close = true;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                bail!("{} answered with Transfer-Encoding {value}", self.server);
            }
        }
        let mut skip = vec![0; length];
        self.stream.read_exact(&mut skip).await?;
        self.closing = close;
        Ok(status)
    }

    /// Whether another request may go on this connection.
    pub(crate) fn reusable(&self) -> bool {
        !self.closing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_has_its_size() {
        let p = payload(42, 64);
        assert_eq!(p.len(), 64);
        let (seq, t) = parse_payload(p.as_bytes()).unwrap();
        assert_eq!(seq, 42);
        assert!(t <= now_ns());
        assert_eq!(payload(1, 1024).len(), 1024);
        assert!(parse_payload(b"short").is_none());
    }

    #[test]
    fn msg_data_finds_the_payload() {
        let frame = r#"{"type":"msg","topic":"f","data":"00000000000000010000000000000002xx"}"#;
        assert_eq!(parse_payload(msg_data(frame).unwrap()), Some((1, 2)));
        assert!(msg_data(r#"{"type":"pong"}"#).is_none());
    }
}
