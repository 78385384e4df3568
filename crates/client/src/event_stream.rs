//! One event stream to a node (`docs/PROTOCOL.md`, Server-sent events): the stream's events read
//! as the WebSocket messages they stand for, and the client's frames sent as `POST /sse/{stream}`.
//!
//! The stream is opened with no topics: the client then sends `hello`, `sub` (with its
//! positions) and `list` as it does on a WebSocket, so greeting, subscribing, heartbeats and
//! resuming are the same code for both transports. Each event's `data` is the frame's JSON; the
//! event `close` becomes a close message. The `id`s are not needed here: the frames carry the
//! positions the client keeps.

use std::collections::VecDeque;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use streamfarm_core::protocol::close;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::address::Endpoint;
use crate::connection::{Dialer, open_stream};
use crate::error::Error;

/// Longest line, and longest event, read from a stream: a frame bigger than this ends it.
const MAX_EVENT_BYTES: usize = 4 << 20;
/// Most of a refusal's body kept for its error.
const MAX_REFUSAL_BYTES: usize = 1024;
/// Longest a frame's `POST` may take, retries included.
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// The node takes a few frames at a time: when its inbox is full (`429`), wait this long.
const INBOX_FULL_WAIT: Duration = Duration::from_millis(20);

/// Aborts a hyper connection's task when dropped: its socket closes with it.
#[derive(Debug)]
struct Driver(JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An open event stream; see the module docs.
#[derive(Debug)]
pub(crate) struct EventStream {
    url: String,
    endpoint: Endpoint,
    dialer: Dialer,
    body: Incoming,
    _stream_driver: Driver,
    events: EventParser,
    /// Where frames are posted, once the `hello` event has named the stream.
    key: Option<String>,
    /// The connection frames are posted on, kept between posts.
    poster: Option<(SendRequest<Full<Bytes>>, Driver)>,
}

/// A hyper HTTP/1 connection to `endpoint` (TLS for a TLS target).
async fn http_connection(
    endpoint: &Endpoint,
    dialer: &Dialer,
    url: &str,
) -> Result<(SendRequest<Full<Bytes>>, Driver), Error> {
    let stream = open_stream(endpoint, dialer, url).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Http {
            method: "GET",
            url: url.to_string(),
            detail: e.to_string(),
        })?;
    let driver = Driver(tokio::spawn(async move {
        let _ = connection.await;
    }));
    Ok((sender, driver))
}

fn host_header(endpoint: &Endpoint) -> String {
    let target = &endpoint.target;
    match target.host.contains(':') {
        true => format!("[{}]:{}", target.host, target.port),
        false => format!("{}:{}", target.host, target.port),
    }
}

/// Opens an event stream on `endpoint`, its token in an `Authorization: Bearer` header. A node
/// that refuses it answers with a status: `401`/`403` for the token (as the close code its body
/// names), `503` when it is not taking clients.
pub(crate) async fn open(
    endpoint: &Endpoint,
    dialer: &Dialer,
    token: Option<&str>,
) -> Result<EventStream, Error> {
    let url = format!("{}/sse", endpoint.target.http_base(endpoint.addr));
    let (mut sender, driver) = http_connection(endpoint, dialer, &url).await?;
    let http_error = |detail: String| Error::Http {
        method: "GET",
        url: url.clone(),
        detail,
    };
    let mut request = hyper::Request::get("/sse")
        .header(hyper::header::HOST, host_header(endpoint))
        .header(hyper::header::ACCEPT, "text/event-stream");
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .map_err(|_| Error::Token {
            url: url.clone(),
            detail: "the token has characters a header cannot carry".into(),
        })?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| http_error(e.to_string()))?;
    let status = response.status();
    if status != StatusCode::OK {
        let body = read_refusal(response.into_body()).await;
        return Err(refusal(&url, status, body, http_error));
    }
    Ok(EventStream {
        url,
        endpoint: endpoint.clone(),
        dialer: dialer.clone(),
        body: response.into_body(),
        _stream_driver: driver,
        events: EventParser::default(),
        key: None,
        poster: None,
    })
}

/// The start of a refusal's body, as text.
async fn read_refusal(mut body: Incoming) -> String {
    let mut text = Vec::new();
    while text.len() < MAX_REFUSAL_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    text.extend_from_slice(&data);
                }
            }
            _ => break,
        }
    }
    text.truncate(MAX_REFUSAL_BYTES);
    String::from_utf8_lossy(&text).trim().to_string()
}

/// The error for a node's answer other than `200`.
fn refusal(
    url: &str,
    status: StatusCode,
    body: String,
    http_error: impl Fn(String) -> Error,
) -> Error {
    let refused = |code| Error::Refused {
        url: url.to_string(),
        code,
        reason: body.clone(),
    };
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            let fallback = if status == StatusCode::FORBIDDEN {
                close::AUTH_FORBIDDEN
            } else {
                close::AUTH_INVALID
            };
            refused(close_code_in(&body).unwrap_or(fallback))
        }
        StatusCode::SERVICE_UNAVAILABLE => refused(close::RECONNECT_ELSEWHERE),
        status => http_error(format!("{status}: {body}")),
    }
}

/// The close code a node's refusal names in parentheses, e.g. `invalid token (4011): …`.
fn close_code_in(body: &str) -> Option<u16> {
    body.split('(')
        .skip(1)
        .find_map(|rest| rest.split(')').next()?.parse().ok())
}

impl EventStream {
    /// The next message the stream stands for; `None` once it has ended.
    pub(crate) async fn next(&mut self) -> Option<Result<Message, WsError>> {
        loop {
            if let Some(message) = self.events.ready.pop_front() {
                return Some(Ok(message));
            }
            let data = match self.body.frame().await? {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Err(err) => return Some(Err(stream_error(format!("read failed: {err}")))),
            };
            if let Err(detail) = self.events.push(&data) {
                return Some(Err(stream_error(detail)));
            }
            if self.key.is_none() {
                self.key = self.events.stream_key.take();
            }
        }
    }

    /// Sends a text message as a frame (`POST /sse/{stream}`); other messages have no meaning
    /// here (a close is the end of the stream: dropping it).
    pub(crate) async fn send(&mut self, message: Message) -> Result<(), WsError> {
        let Message::Text(text) = message else {
            return Ok(());
        };
        let body = Bytes::from(text.as_str().to_string());
        tokio::time::timeout(POST_TIMEOUT, self.post(body))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {POST_TIMEOUT:?}")))
            .map_err(|detail| stream_error(format!("POST to {}: {detail}", self.url)))
    }

    async fn post(&mut self, body: Bytes) -> Result<(), String> {
        let key = self
            .key
            .clone()
            .ok_or("the node has not named the stream yet")?;
        let path = format!("/sse/{key}");
        // A kept connection the node has closed since is opened again, once.
        let mut fresh = false;
        loop {
            if self
                .poster
                .as_ref()
                .is_none_or(|(sender, _)| sender.is_closed())
            {
                fresh = true;
                let connection = http_connection(&self.endpoint, &self.dialer, &self.url)
                    .await
                    .map_err(|e| e.to_string())?;
                self.poster = Some(connection);
            }
            let (sender, _) = self.poster.as_mut().expect("opened above");
            sender.ready().await.map_err(|e| e.to_string())?;
            let request = hyper::Request::post(path.as_str())
                .header(hyper::header::HOST, host_header(&self.endpoint))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
                .map_err(|e| e.to_string())?;
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(err) if !fresh => {
                    tracing::debug!(%err, "the kept POST connection failed; opening another");
                    self.poster = None;
                    continue;
                }
                Err(err) => return Err(err.to_string()),
            };
            let status = response.status();
            let answer = read_refusal(response.into_body()).await;
            match status {
                StatusCode::ACCEPTED | StatusCode::OK => return Ok(()),
                StatusCode::TOO_MANY_REQUESTS => tokio::time::sleep(INBOX_FULL_WAIT).await,
                status => return Err(format!("{status}: {answer}")),
            }
        }
    }
}

fn stream_error(detail: String) -> WsError {
    WsError::Io(std::io::Error::other(format!("event stream: {detail}")))
}

/// Reads events out of the stream's bytes, bounded by [`MAX_EVENT_BYTES`].
#[derive(Debug, Default)]
struct EventParser {
    /// Bytes of a line not yet complete.
    line: Vec<u8>,
    /// The current event's name and data.
    name: String,
    data: String,
    /// Messages of the events complete so far.
    ready: VecDeque<Message>,
    /// The stream's key, from its `hello` event.
    stream_key: Option<String>,
}

impl EventParser {
    fn push(&mut self, bytes: &[u8]) -> Result<(), String> {
        for chunk in bytes.split_inclusive(|b| *b == b'\n') {
            self.line.extend_from_slice(chunk);
            if self.line.len() > MAX_EVENT_BYTES {
                return Err(format!("a line over {MAX_EVENT_BYTES} bytes"));
            }
            if self.line.last() != Some(&b'\n') {
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = std::str::from_utf8(line).map_err(|_| "a line that is not UTF-8")?;
            self.line_complete(line)?;
        }
        Ok(())
    }

    fn line_complete(&mut self, line: &str) -> Result<(), String> {
        if line.is_empty() {
            self.dispatch();
            return Ok(());
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.name = value.to_string(),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                if self.data.len() > MAX_EVENT_BYTES {
                    return Err(format!("an event over {MAX_EVENT_BYTES} bytes"));
                }
            }
            // Comments (`:`), `id` and `retry`: the frames carry what the client needs.
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self) {
        let name = std::mem::take(&mut self.name);
        let data = std::mem::take(&mut self.data);
        if data.is_empty() {
            return;
        }
        match name.as_str() {
            "close" => {
                let close: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                let code = close["code"].as_u64().unwrap_or(1005) as u16;
                let reason = close["reason"].as_str().unwrap_or_default().to_string();
                self.ready.push_back(Message::Close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                })));
            }
            _ => {
                if name == "hello" {
                    let hello: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                    self.stream_key = hello["stream"].as_str().map(str::to_string);
                }
                self.ready.push_back(Message::text(data));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(parser: &mut EventParser) -> Vec<String> {
        parser
            .ready
            .drain(..)
            .map(|m| match m {
                Message::Text(t) => t.as_str().to_string(),
                Message::Close(Some(frame)) => format!("close {} {}", frame.code, frame.reason),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn events_become_messages_across_chunks() {
        let mut parser = EventParser::default();
        let stream = "retry: 1000\n\nevent: hello\ndata: {\"type\":\"hello\",\"stream\":\"ab12\"}\n\n\
                      id: t=1.2\ndata: {\"type\":\"msg\"}\r\n\r\n: a comment\n\n\
                      event: close\ndata: {\"code\":4000,\"reason\":\"moving\"}\n\n";
        // Every split point: events do not depend on how the bytes were chunked.
        for split in 0..stream.len() {
            let (a, b) = stream.as_bytes().split_at(split);
            parser.push(a).unwrap();
            parser.push(b).unwrap();
            assert_eq!(
                texts(&mut parser),
                [
                    r#"{"type":"hello","stream":"ab12"}"#,
                    r#"{"type":"msg"}"#,
                    "close 4000 moving",
                ],
                "split at {split}"
            );
            assert_eq!(parser.stream_key.take().as_deref(), Some("ab12"));
        }
    }

    #[test]
    fn a_line_past_the_bound_is_an_error() {
        let mut parser = EventParser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        let err = parser.push(&big).unwrap_err();
        assert!(err.contains("bytes"), "{err}");
    }

    #[test]
    fn refusals_name_the_close_code_of_their_body() {
        assert_eq!(
            close_code_in("token expired (4012): present a token"),
            Some(4012)
        );
        assert_eq!(close_code_in("no code here"), None);
        let http = |detail| Error::Http {
            method: "GET",
            url: "u".into(),
            detail,
        };
        let err = refusal("u", StatusCode::FORBIDDEN, "forbidden".into(), http);
        assert!(
            matches!(err, Error::Refused { code, .. } if code == close::AUTH_FORBIDDEN),
            "{err}"
        );
        let err = refusal("u", StatusCode::SERVICE_UNAVAILABLE, "full".into(), http);
        assert!(err.sends_elsewhere(), "{err}");
        let err = refusal("u", StatusCode::NOT_FOUND, "no".into(), http);
        assert!(err.to_string().contains("404"), "{err}");
    }
}
