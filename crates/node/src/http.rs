//! The node's HTTP surface (axum): the streaming WebSocket, the list service, publishing, admin,
//! metrics and health.
//!
//! | route | what |
//! |---|---|
//! | `GET <url path>` (default `/stream`) | the streaming WebSocket (`docs/PROTOCOL.md`) |
//! | `GET /farm` | the farm list: JSON, `?format=text\|xml\|js` (`?callback=` for js), or `Accept` |
//! | `POST /publish/{topic}` | body = message, published farm-wide (bearer credential when configured, `docs/AUTH.md`) |
//! | `GET /topics/{topic}` | the topic's sequencer, replica and (when delivered here) position |
//! | `GET /rebalance` | the farm's rebalancing plan as this node sees it: targets, surpluses, flows, moves |
//! | `POST /admin/status` | `UP`, `DOWN` or `DRAINING` (bearer token from config) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | the node's status; `503` while its gossip is down |
//! | `GET /livez` | `200` while the process serves HTTP (a liveness probe) |
//! | `GET /readyz` | `200` when the node should get new clients; `503` with the reason otherwise |
//! | `GET /sse?topics=…`, `POST /sse/{stream}` | the streaming connection as server-sent events, and its client's frames (`sse`) |
//! | `GET /internal/relay?node=NAME` | relay link from a peer node (not for clients) |
//!
//! The browser routes (`/client/streamfarm.js`, `/dashboard`) and the CORS layers of `/farm` and
//! `/publish` are the `web` module's.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use base64::Engine;
use streamfarm_core::Status;
use streamfarm_core::encoding::{self, Format};
use streamfarm_core::protocol::{Encoding, close};
use tracing::info;

use crate::auth::{self, PublisherCheck};
use crate::broker::{PublishError, placement};
use crate::session::{self, check_topic};
use crate::tls::TlsInfo;
use crate::{Shared, metrics, sse, web};

/// Path of the relay endpoint on every node.
pub(crate) const RELAY_PATH: &str = "/internal/relay";
/// Largest message body accepted by `POST /publish` beyond `max_frame_bytes`: the JSON envelope.
const ENVELOPE_SLACK: usize = 1024;
/// tungstenite's read buffer, allocated per connection: small, so idle connections are cheap.
const READ_BUFFER_BYTES: usize = 256;
/// Frames tungstenite gathers before it writes to the socket by itself; the session's writer
/// flushes after each burst anyway. Not 0: with 0, tungstenite writes every frame with its own
/// `send` syscall, whatever the writer's bursts, and `perf` showed that as three quarters of the
/// node's CPU under fan-out (BENCHMARKS.md, *Fan-out*). The buffer grows only as far as a burst
/// needs it, so an idle connection pays nothing for it.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// The router of one node.
pub(crate) fn router(shared: Arc<Shared>, stream_path: &str) -> Router {
    let body_limit = shared.config.max_frame_bytes + ENVELOPE_SLACK;
    // A request body sent a byte at a time holds a connection no longer than a request head may.
    let body_timeout =
        tower_http::timeout::RequestBodyTimeoutLayer::new(shared.config.handshake_timeout());
    Router::new()
        .route(stream_path, get(stream))
        .route(RELAY_PATH, get(relay))
        .route("/farm", web::farm_cors(get(farm), &shared.config))
        .route(
            "/publish/{topic}",
            web::publish_cors(
                post(publish).layer(DefaultBodyLimit::max(body_limit)),
                &shared.config,
            ),
        )
        // No topic: 400, as documented, rather than no route (404).
        .route("/publish/", post(publish_no_topic))
        .route("/publish", post(publish_no_topic))
        .route("/topics/{topic}", get(topic_info))
        .route("/rebalance", get(rebalance_plan))
        .route("/admin/status", post(admin_status))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/sse", web::farm_cors(get(sse::open), &shared.config))
        .route(
            "/sse/{stream}",
            web::stream_post_cors(
                post(sse::post).layer(DefaultBodyLimit::max(shared.config.max_frame_bytes)),
                &shared.config,
            ),
        )
        .with_state(shared)
        .merge(web::router())
        .layer(body_timeout)
}

async fn publish_no_topic() -> Response {
    (
        StatusCode::BAD_REQUEST,
        "topic must not be empty: POST /publish/{topic}\n",
    )
        .into_response()
}

async fn rebalance_plan(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(crate::rebalance::view(&shared)).into_response()
}

/// The router of plain-text connections to a node that serves over TLS (clients and relay
/// links alike): `/healthz`, `/livez` and `/readyz` for probes, and for anything else a `400`
/// saying to use TLS.
pub(crate) fn plain_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (
                StatusCode::BAD_REQUEST,
                "this node serves clients over TLS: use https:// and wss://\n",
            )
        })
        .with_state(shared)
}

/// The connection token a client presented when upgrading: `?token=` (browsers cannot set
/// headers on a WebSocket) or `Authorization: Bearer`.
pub(crate) fn presented_token(
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Option<String> {
    query.get("token").cloned().or_else(|| {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer)
            .map(str::to_string)
    })
}

async fn stream(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let token = presented_token(&query, &headers);
    // The transport admits up to twice the limit so that a frame just over it is read whole and
    // answered with an error frame and a clean close; beyond that the transport cuts it off.
    let max = shared.config.max_frame_bytes * 2 + ENVELOPE_SLACK;
    let upgrade = upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES);
    let status = *shared.status.borrow();
    let refusal = match status {
        Status::Up => None,
        Status::Draining => Some("node is draining"),
        Status::Down => Some("node is down"),
    };
    let permit = shared.connection_limit.clone().try_acquire_owned();
    let tracker = shared.tracker.clone();
    upgrade.on_upgrade(move |socket| async move {
        if let Some(reason) = refusal {
            metrics::inc(&shared.metrics.connections_refused);
            let refused = session::refuse(socket, close::RECONNECT_ELSEWHERE, reason);
            return tracker.track_future(refused).await;
        }
        let Ok(permit) = permit else {
            metrics::inc(&shared.metrics.connections_refused);
            let refused = session::refuse(socket, close::SERVER_FULL, "server full");
            return tracker.track_future(refused).await;
        };
        // The session gets a task of its own, and axum's upgrade task ends here: run inside it,
        // the session would also keep the upgrade's state (its config, the finished upgrade
        // future, this closure) for the connection's whole life, on every idle connection.
        // Spawned as it is, not wrapped in an `async` block that would hold a second copy of
        // the socket.
        tracker.spawn(session::serve(socket, shared, token, permit));
    })
}

async fn relay(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    tls: Option<Extension<Arc<TlsInfo>>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let (Some(relay), Some(peer)) = (shared.embedded.clone(), query.get("node").cloned()) else {
        return (StatusCode::NOT_FOUND, "no embedded relay here\n").into_response();
    };
    if let Some(problem) = crate::config::check_name(&peer) {
        metrics::inc(&shared.metrics.relay_auth_failures);
        return (StatusCode::BAD_REQUEST, format!("node name: {problem}\n")).into_response();
    }
    // Mutual TLS: the certificate the handshake verified must name the node the dialer says it is.
    if shared.config.relay_mtls && !tls.as_ref().is_some_and(|info| info.names(&peer)) {
        metrics::inc(&shared.metrics.relay_auth_failures);
        return (
            StatusCode::FORBIDDEN,
            format!("relay links need a client certificate naming {peer:?}\n"),
        )
            .into_response();
    }
    let binding = tls.map(|info| info.binding.clone()).unwrap_or_default();
    // With a farm secret, only a holder of it is upgraded: an outsider cannot send a relay
    // message (up to the relay limit) before it fails the handshake.
    let ticket = headers
        .get(crate::relay::RELAY_TICKET)
        .and_then(|v| v.to_str().ok());
    if !relay.admits(&peer, ticket, &binding) {
        return (StatusCode::FORBIDDEN, "relay link refused\n").into_response();
    }
    let Ok(handshake) = shared.relay_handshakes.clone().try_acquire_owned() else {
        metrics::inc(&shared.metrics.relay_auth_failures);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many relay links in their handshake\n",
        )
            .into_response();
    };
    let cancel = shared.cancel.clone();
    let tracker = shared.tracker.clone();
    upgrade
        .max_message_size(relay_message_limit(shared.config.history_bytes))
        .on_upgrade(move |socket| {
            tracker.track_future(relay.accept(socket, peer, binding, handshake, cancel))
        })
}

/// Largest message accepted on a relay link: the largest a peer sends is a topic's whole history
/// (`sync`, `claim_reply`, `fetch_reply`), so a few times `history_bytes`, within 16 to 64 MiB.
/// Bounded low because a link that has not yet authenticated may already send one.
fn relay_message_limit(history_bytes: usize) -> usize {
    history_bytes
        .saturating_mul(4)
        .saturating_add(1 << 20)
        .clamp(16 << 20, 64 << 20)
}

async fn farm(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    // `?format=` wins over `Accept`; `?callback=` alone asks for JavaScript.
    let format = match query.get("format") {
        Some(name) => match Format::from_name(name) {
            Some(format) => format,
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("unknown format {name:?}: expected json, text, xml or js\n"),
                )
                    .into_response();
            }
        },
        None if query.contains_key("callback") => Format::Js,
        None => {
            let accept = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            match Format::from_accept(accept) {
                Some(format) => format,
                None => {
                    return (
                        StatusCode::NOT_ACCEPTABLE,
                        "acceptable: application/json, text/plain, application/xml, application/javascript\n",
                    )
                        .into_response();
                }
            }
        }
    };
    let list = shared.list_for_client();
    let body = match (format, query.get("callback")) {
        (Format::Js, Some(callback)) => match encoding::render_js(&list, callback) {
            Ok(body) => body,
            Err(err) => return (StatusCode::BAD_REQUEST, format!("{err}\n")).into_response(),
        },
        _ => encoding::render(&list, format),
    };
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::CACHE_CONTROL, "no-store"),
            (header::VARY, "Accept"),
        ],
        body,
    )
        .into_response()
}

/// Longest `Idempotency-Key` accepted, in bytes.
const MAX_IDEMPOTENCY_KEY: usize = 128;

async fn publish(
    State(shared): State<Arc<Shared>>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = std::time::Instant::now();
    if let Err(problem) = check_topic(&topic) {
        return (StatusCode::BAD_REQUEST, format!("{problem}\n")).into_response();
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match shared.auth.check_publisher(authorization, &topic) {
        PublisherCheck::Allowed => {}
        PublisherCheck::Unauthorized(why) => {
            metrics::inc(&shared.metrics.auth_failures);
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                format!("{why}\n"),
            )
                .into_response();
        }
        PublisherCheck::Forbidden(why) => {
            metrics::inc(&shared.metrics.auth_forbidden);
            return (StatusCode::FORBIDDEN, format!("{why}\n")).into_response();
        }
    }
    // A publisher that sends a message again (its node died before answering) names it with
    // the same key, and the farm does not publish it twice.
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(key)) if !key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY => {
            Some(key.to_string())
        }
        Some(_) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters\n"
                ),
            )
                .into_response();
        }
    };
    let (data, encoding) = match String::from_utf8(body.to_vec()) {
        Ok(text) => (text, Encoding::Utf8),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&body),
            Encoding::Base64,
        ),
    };
    match shared.broker.publish(&topic, data, encoding, key).await {
        Ok(position) => {
            metrics::observe_since(&shared.metrics.publish_seconds, arrived);
            published(&topic, position)
        }
        Err(err @ PublishError::TimedOut(_)) => {
            (StatusCode::GATEWAY_TIMEOUT, format!("{err}\n")).into_response()
        }
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, format!("{err}\n")).into_response(),
    }
}

/// The answer to a publish the farm acknowledged.
fn published(topic: &str, position: streamfarm_core::protocol::Position) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!(
            "{}\n",
            serde_json::json!({"topic": topic, "epoch": position.epoch, "offset": position.offset})
        ),
    )
        .into_response()
}

/// Where a topic lives: its sequencer and replica as this node sees the farm, and its position
/// when this node delivers it.
async fn topic_info(State(shared): State<Arc<Shared>>, Path(topic): Path<String>) -> Response {
    if let Err(problem) = check_topic(&topic) {
        return (StatusCode::BAD_REQUEST, format!("{problem}\n")).into_response();
    }
    let live = placement::live_nodes(&shared.farm_rx.borrow());
    let placed = placement::place(&topic, &live);
    let position = shared
        .hub
        .state(&topic, None)
        .map(|s| serde_json::json!({"epoch": s.epoch, "offset": s.last}));
    let body = serde_json::json!({
        "topic": topic,
        "sequencer": placed.as_ref().map(|p| &p.sequencer),
        "replica": placed.as_ref().map(|p| &p.replica),
        "position": position,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

async fn admin_status(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let Some(token) = &shared.config.admin_token else {
        return (
            StatusCode::FORBIDDEN,
            "admin API disabled: no admin_token configured\n",
        )
            .into_response();
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer);
    if !presented.is_some_and(|p| auth::constant_time_eq(p.as_bytes(), token.as_bytes())) {
        metrics::inc(&shared.metrics.auth_failures);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "bad or missing bearer token\n",
        )
            .into_response();
    }
    // Either `{"status":"DRAINING"}` or the bare word.
    let wanted = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("status").and_then(|s| s.as_str()).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    let status = match wanted.parse::<Status>() {
        Ok(status) => status,
        Err(err) => return (StatusCode::BAD_REQUEST, format!("{err}\n")).into_response(),
    };
    info!(status = %status, "admin status change");
    shared.set_status(status);
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"status\":\"{status}\"}}\n"),
    )
        .into_response()
}

async fn metrics_text(State(shared): State<Arc<Shared>>) -> Response {
    let (depth, links) = shared.broker.relay().stats();
    let text = shared
        .metrics
        .render(&shared.farm_rx.borrow(), depth, links);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let status = *shared.status.borrow();
    let users = shared.hub.users();
    let gossip_up = shared.metrics.gossip_up.load(Ordering::Relaxed) == 1;
    let (code, body) = health(status, users, gossip_up);
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `/healthz`: `503` while gossip is down — the farm no longer hears from this node, whatever it
/// still serves — else `200`.
fn health(status: Status, users: u64, gossip_up: bool) -> (StatusCode, String) {
    let (code, gossip) = if gossip_up {
        (StatusCode::OK, "up")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "down")
    };
    (
        code,
        format!("{{\"status\":\"{status}\",\"users\":{users},\"gossip\":\"{gossip}\"}}\n"),
    )
}

/// `/livez`: the process serves HTTP. Nothing else is checked, so that a liveness probe restarts
/// only a node that is truly stuck, never one that is merely cut off or draining (restarting
/// those would lose what they still serve).
async fn livez() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"live\":true}\n",
    )
        .into_response()
}

/// What a readiness check looks at, read from the node's state at one moment.
#[derive(Debug, Clone, Copy)]
struct Readiness {
    /// This node's own status.
    status: Status,
    /// This node's status in the farm list it serves to clients (`None`: not in it).
    listed: Option<Status>,
    /// Gossip is running.
    gossip_up: bool,
    /// Every peer fell silent at once (see `membership`).
    cut_off: bool,
    /// A joining node has heard from the farm (or had nobody to hear from).
    joined: bool,
}

impl Readiness {
    /// Why the node should get no new clients now, if it should not.
    fn not_ready_because(&self) -> Option<String> {
        if self.status != Status::Up {
            return Some(format!("status is {}", self.status));
        }
        if !self.gossip_up {
            return Some("gossip is down: the farm does not hear from this node".into());
        }
        if !self.joined {
            return Some("joining: has not heard from the farm yet".into());
        }
        if self.cut_off {
            return Some("cut off from the farm: every peer fell silent".into());
        }
        match self.listed {
            Some(Status::Up) => None,
            Some(other) => Some(format!("listed {other} in the farm list")),
            None => Some("not in the farm list".into()),
        }
    }
}

/// `/readyz`: `200` when this node should get new clients (load balancers, Kubernetes readiness
/// probes): `UP`, listed `UP`, gossiping, joined and not cut off; else `503` with the reason.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let readiness = Readiness {
        status: *shared.status.borrow(),
        listed: shared
            .farm_rx
            .borrow()
            .servers
            .iter()
            .find(|s| s.name == shared.config.name)
            .map(|s| s.status),
        gossip_up: shared.metrics.gossip_up.load(Ordering::Relaxed) == 1,
        cut_off: *shared.isolated_rx.borrow(),
        joined: shared.peers_rx.borrow().settled,
    };
    let (code, body) = match readiness.not_ready_because() {
        None => (StatusCode::OK, serde_json::json!({"ready": true})),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"ready": false, "reason": reason}),
        ),
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_the_first_reason_to_send_clients_elsewhere() {
        let ready = Readiness {
            status: Status::Up,
            listed: Some(Status::Up),
            gossip_up: true,
            cut_off: false,
            joined: true,
        };
        assert_eq!(ready.not_ready_because(), None);
        let cases: [(Readiness, &str); 6] = [
            (
                Readiness {
                    status: Status::Draining,
                    ..ready
                },
                "status is DRAINING",
            ),
            (
                Readiness {
                    gossip_up: false,
                    ..ready
                },
                "gossip is down",
            ),
            (
                Readiness {
                    joined: false,
                    ..ready
                },
                "joining",
            ),
            (
                Readiness {
                    cut_off: true,
                    ..ready
                },
                "cut off",
            ),
            (
                Readiness {
                    listed: Some(Status::Down),
                    ..ready
                },
                "listed DOWN",
            ),
            (
                Readiness {
                    listed: None,
                    ..ready
                },
                "not in the farm list",
            ),
        ];
        for (readiness, reason) in cases {
            let why = readiness.not_ready_because().expect("not ready");
            assert!(why.contains(reason), "{why:?} should say {reason:?}");
        }
    }

    #[test]
    fn health_fails_while_gossip_is_down() {
        let (code, body) = health(Status::Up, 12, true);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body, "{\"status\":\"UP\",\"users\":12,\"gossip\":\"up\"}\n");
        let (code, body) = health(Status::Up, 12, false);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"gossip\":\"down\""), "{body}");
    }
}
