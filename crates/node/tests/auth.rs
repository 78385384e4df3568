//! Client tokens and publisher credentials over real sockets (`docs/AUTH.md`): the close codes of
//! missing, invalid, expired and forbidden tokens, topic patterns, refresh, key rotation by `kid`,
//! the first-frame `auth`, anonymous access, and `POST /publish` with and without credentials.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use streamfarm_node::{AuthKey, NodeConfig, NodeHandle};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest any single step of these tests may take.
const STEP: Duration = Duration::from_secs(5);
const SECRET: &str = "k1-secret-0123456789-0123456789-0123456789";
const PUBLISH_TOKEN: &str = "publisher-token-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256_key(kid: &str) -> AuthKey {
    AuthKey {
        kid: kid.into(),
        alg: "HS256".into(),
        secret: Some(SECRET.into()),
        secret_file: None,
        public_key_file: None,
    }
}

/// An HS256 token of key `k1` with these claims.
fn token(claims: Value) -> String {
    sign(
        "k1",
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

fn sign(kid: &str, alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

/// A user's claims: subscribe to `a.*`, publish on `a.chat`, valid for `ttl` seconds.
fn user(ttl: u64) -> Value {
    json!({"sub": "user-1", "iat": now(), "exp": now() + ttl,
           "subscribe": ["a.*"], "publish": ["a.chat"]})
}

async fn node(tweak: impl FnOnce(&mut NodeConfig)) -> NodeHandle {
    let mut config = NodeConfig::new("auth");
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.shutdown_drain_ms = 100;
    config.auth_keys = vec![hs256_key("k1")];
    config.auth_leeway_s = 0;
    tweak(&mut config);
    NodeHandle::start(config).await.expect("node starts")
}

async fn connect(url: &str, bearer: Option<&str>) -> Ws {
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = bearer {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(request))
        .await
        .expect("connects in time")
        .expect("WebSocket upgrade");
    ws
}

/// The next protocol frame (pings answered on the way), or the close code and reason.
async fn next(ws: &mut Ws) -> Result<Value, (u16, String)> {
    next_within(ws, STEP).await
}

async fn next_within(ws: &mut Ws, within: Duration) -> Result<Value, (u16, String)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a frame or a close in time");
        match message {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                if frame["type"] == "ping" {
                    send(ws, json!({"type": "pong", "id": frame["id"]})).await;
                    continue;
                }
                return Ok(frame);
            }
            Some(Ok(Message::Close(Some(close)))) => {
                return Err((u16::from(close.code), close.reason.to_string()));
            }
            Some(Ok(Message::Close(None))) | None => return Err((1005, String::new())),
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err((0, err.to_string())),
        }
    }
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// Reads the greeting (`hello`, `farm`).
async fn greeted(ws: &mut Ws) {
    assert_eq!(next(ws).await.unwrap()["type"], "hello");
    assert_eq!(next(ws).await.unwrap()["type"], "farm");
}

/// The next frame of `kind`, skipping farm lists.
async fn expect(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let frame = next(ws)
            .await
            .unwrap_or_else(|c| panic!("closed {c:?}, wanted {kind}"));
        if frame["type"] == kind {
            return frame;
        }
        assert!(
            frame["type"] == "farm" || frame["type"] == "feed",
            "wanted {kind}, got {frame}"
        );
    }
}

fn stream_url(node: &NodeHandle) -> String {
    node.url().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_invalid_and_expired_tokens_get_their_close_codes() {
    let node = node(|_| {}).await;
    let url = stream_url(&node);

    // Missing: no token in the url, the header, nor a first frame.
    let mut ws = connect(&url, None).await;
    send(&mut ws, json!({"type": "sub", "topics": ["a.x"]})).await;
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4010);

    // Invalid: garbage, a bad signature, an unknown kid.
    let mut ws = connect(&format!("{url}?token=not-a-jwt"), None).await;
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4011);
    let forged = sign(
        "k1",
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-0123456789-0123456789"),
        user(60),
    );
    let mut ws = connect(&url, Some(&forged)).await;
    let (code, reason) = next(&mut ws).await.unwrap_err();
    assert_eq!(
        (code, reason.as_str()),
        (4011, "invalid token: bad signature")
    );
    assert!(!reason.contains(&forged));
    let unknown = sign(
        "k9",
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        user(60),
    );
    let mut ws = connect(&url, Some(&unknown)).await;
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4011);

    // Expired.
    let mut claims = user(60);
    claims["exp"] = json!(now() - 10);
    let mut ws = connect(&format!("{url}?token={}", token(claims)), None).await;
    assert_eq!(
        next(&mut ws).await.unwrap_err(),
        (4012, "token expired".into())
    );

    // A token without exp is refused: every token expires.
    let mut ws = connect(&url, Some(&token(json!({"sub": "u", "subscribe": ["**"]})))).await;
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4011);

    let metrics = reqwest::get(format!("http://{}/metrics", node.listen_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("streamfarm_auth_failures_total 6"),
        "{metrics}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_a_star_subscribes_a_x_and_not_b_x_and_publishes_only_where_allowed() {
    let node = node(|_| {}).await;
    let url = stream_url(&node);
    let mut ws = connect(&format!("{url}?token={}", token(user(60))), None).await;
    greeted(&mut ws).await;

    send(&mut ws, json!({"type": "sub", "topics": ["b.x"]})).await;
    let refused = expect(&mut ws, "error").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    send(&mut ws, json!({"type": "sub", "topics": ["a.x", "b.x"]})).await;
    assert_eq!(expect(&mut ws, "error").await["code"], "forbidden");
    // Nothing of a refused frame was done; the connection is still open and may subscribe a.*.
    send(&mut ws, json!({"type": "sub", "topics": ["a.x", "a.chat"]})).await;
    assert_eq!(
        expect(&mut ws, "subscribed").await["topics"],
        json!(["a.x", "a.chat"])
    );

    node.publish("a.x", "hello a").await.unwrap();
    node.publish("b.x", "hello b").await.unwrap();
    let msg = expect(&mut ws, "msg").await;
    assert_eq!(
        (msg["topic"].as_str(), msg["data"].as_str()),
        (Some("a.x"), Some("hello a"))
    );

    // Publishing over the WebSocket: a.chat is allowed, a.x is not.
    send(
        &mut ws,
        json!({"type": "pub", "topic": "a.x", "data": "no"}),
    )
    .await;
    assert_eq!(expect(&mut ws, "error").await["code"], "forbidden");
    send(
        &mut ws,
        json!({"type": "pub", "topic": "a.chat", "data": "yes"}),
    )
    .await;
    let msg = expect(&mut ws, "msg").await;
    assert_eq!(
        (msg["topic"].as_str(), msg["data"].as_str()),
        (Some("a.chat"), Some("yes"))
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_a_connection_past_its_first_tokens_expiry() {
    let node = node(|_| {}).await;
    let url = stream_url(&node);
    let first_exp = now() + 2;
    let mut claims = user(2);
    claims["exp"] = json!(first_exp);

    // Without a refresh: closed 4012 once exp passes.
    let mut lapsing = connect(&url, Some(&token(claims.clone()))).await;
    greeted(&mut lapsing).await;

    // With one: lives on.
    let mut ws = connect(&url, Some(&token(claims))).await;
    greeted(&mut ws).await;
    send(&mut ws, json!({"type": "sub", "topics": ["a.x"]})).await;
    expect(&mut ws, "subscribed").await;
    send(
        &mut ws,
        json!({"type": "refresh", "token": token(user(60))}),
    )
    .await;
    let refreshed = expect(&mut ws, "refreshed").await;
    assert!(
        refreshed["exp"].as_u64().unwrap() >= now() + 59,
        "{refreshed}"
    );

    let closed = loop {
        match next_within(&mut lapsing, Duration::from_secs(6)).await {
            Ok(_) => continue,
            Err(close) => break close,
        }
    };
    assert_eq!(closed, (4012, "token expired".into()));
    assert!(now() >= first_exp, "closed before its exp");

    // Past the first token's expiry, the refreshed connection still serves.
    send(&mut ws, json!({"type": "ping", "id": 9})).await;
    assert_eq!(expect(&mut ws, "pong").await["id"], 9);
    node.publish("a.x", "still here").await.unwrap();
    assert_eq!(expect(&mut ws, "msg").await["data"], "still here");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_drops_a_subscribed_topic_or_changes_subject_is_forbidden() {
    let node = node(|_| {}).await;
    let url = stream_url(&node);
    let mut ws = connect(&url, Some(&token(user(60)))).await;
    greeted(&mut ws).await;
    send(&mut ws, json!({"type": "sub", "topics": ["a.x"]})).await;
    expect(&mut ws, "subscribed").await;
    let narrower = json!({"sub": "user-1", "exp": now() + 60, "subscribe": ["a.y"]});
    send(
        &mut ws,
        json!({"type": "refresh", "token": token(narrower)}),
    )
    .await;
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4013);

    let mut ws = connect(&url, Some(&token(user(60)))).await;
    greeted(&mut ws).await;
    let mut other = user(60);
    other["sub"] = json!("user-2");
    send(&mut ws, json!({"type": "refresh", "token": token(other)})).await;
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4013);

    // An invalid refresh closes 4011.
    let mut ws = connect(&url, Some(&token(user(60)))).await;
    greeted(&mut ws).await;
    send(&mut ws, json!({"type": "refresh", "token": "garbage"})).await;
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4011);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_by_kid_hmac_and_ecdsa_side_by_side() {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = std::env::temp_dir().join(format!("sf-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let public = dir.join("k2.pub.pem");
    std::fs::write(&public, pair.public_key_pem()).unwrap();
    let secret_file = dir.join("k3.secret");
    std::fs::write(&secret_file, "k3-secret-from-a-file-0123456789-abcdef\n").unwrap();
    let spec = format!("k2:ES256:{}", public.display());
    let node = node(|c| {
        c.auth_keys.push(spec.parse().unwrap());
        c.auth_keys.push(AuthKey {
            kid: "k3".into(),
            alg: "HS256".into(),
            secret: None,
            secret_file: Some(secret_file.clone()),
            public_key_file: None,
        });
    })
    .await;
    let url = stream_url(&node);
    let ec = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let k3 = EncodingKey::from_secret(b"k3-secret-from-a-file-0123456789-abcdef");

    for signed in [
        token(user(60)),
        sign("k2", Algorithm::ES256, &ec, user(60)),
        sign("k3", Algorithm::HS256, &k3, user(60)),
    ] {
        let mut ws = connect(&url, Some(&signed)).await;
        greeted(&mut ws).await;
        send(&mut ws, json!({"type": "sub", "topics": ["a.x"]})).await;
        expect(&mut ws, "subscribed").await;
    }
    // A token signed with k1's secret but naming k2, or with k2's algorithm swapped: refused.
    let mut ws = connect(&url, Some(&sign("k2", Algorithm::HS256, &k3, user(60)))).await;
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4011);
    let mut ws = connect(
        &url,
        Some(&sign("k3", Algorithm::HS256, &ec_as_hmac(), user(60))),
    )
    .await;
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4011);
    // With several keys, a token must name its key.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = None;
    let anonymous_kid = jsonwebtoken::encode(&header, &user(60), &k3).unwrap();
    let mut ws = connect(&url, Some(&anonymous_kid)).await;
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4011);
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn ec_as_hmac() -> EncodingKey {
    EncodingKey::from_secret(b"not-k3-secret-0123456789-0123456789")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_may_come_in_a_first_auth_frame() {
    let node = node(|_| {}).await;
    let mut ws = connect(&stream_url(&node), None).await;
    send(&mut ws, json!({"type": "auth", "token": token(user(60))})).await;
    greeted(&mut ws).await;
    send(&mut ws, json!({"type": "sub", "topics": ["a.x"]})).await;
    expect(&mut ws, "subscribed").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_presents_a_token_is_closed_after_the_heartbeat_timeout() {
    let node = node(|c| {
        c.heartbeat_interval_ms = 100;
        c.heartbeat_timeout_ms = 400;
    })
    .await;
    let mut ws = connect(&stream_url(&node), None).await;
    let started = tokio::time::Instant::now();
    // Nothing is said to a connection without a token: no hello, just the close.
    assert_eq!(next(&mut ws).await.unwrap_err().0, 4010);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_get_the_anonymous_topics_when_allowed() {
    let node = node(|c| {
        c.allow_anonymous = true;
        c.anonymous_topics = vec!["public.**".into()];
    })
    .await;
    let url = stream_url(&node);
    let mut ws = connect(&url, None).await;
    greeted(&mut ws).await;
    send(
        &mut ws,
        json!({"type": "sub", "topics": ["public.news.uk"]}),
    )
    .await;
    expect(&mut ws, "subscribed").await;
    send(&mut ws, json!({"type": "sub", "topics": ["a.x"]})).await;
    assert_eq!(expect(&mut ws, "error").await["code"], "forbidden");
    send(
        &mut ws,
        json!({"type": "pub", "topic": "public.x", "data": "no"}),
    )
    .await;
    assert_eq!(expect(&mut ws, "error").await["code"], "forbidden");
    // An anonymous connection can be given a token in band; a bad token still closes it.
    let mut claims = user(60);
    claims["subscribe"] = json!(["a.*", "public.**"]);
    send(&mut ws, json!({"type": "auth", "token": token(claims)})).await;
    expect(&mut ws, "refreshed").await;
    send(&mut ws, json!({"type": "sub", "topics": ["a.x"]})).await;
    expect(&mut ws, "subscribed").await;
    let mut bad = connect(&format!("{url}?token=garbage"), None).await;
    assert_eq!(next(&mut bad).await.unwrap_err().0, 4011);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_over_http_needs_a_publish_token_or_a_token_with_publish_rights() {
    let node = node(|c| c.publish_tokens = vec![PUBLISH_TOKEN.into()]).await;
    let http = reqwest::Client::new();
    let publish = |topic: &str, bearer: Option<String>| {
        let mut request = http
            .post(format!("http://{}/publish/{topic}", node.listen_addr()))
            .body("m");
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        request.send()
    };
    let status = |r: reqwest::Response| r.status();
    let none = publish("a.chat", None).await.unwrap();
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        status(
            publish("a.chat", Some("wrong-token-0123456789".into()))
                .await
                .unwrap()
        ),
        StatusCode::UNAUTHORIZED
    );
    // A valid connection token that does not allow the topic: forbidden.
    assert_eq!(
        status(publish("a.x", Some(token(user(60)))).await.unwrap()),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(publish("a.chat", Some(token(user(60)))).await.unwrap()),
        StatusCode::OK
    );
    assert_eq!(
        status(
            publish("any.topic", Some(PUBLISH_TOKEN.into()))
                .await
                .unwrap()
        ),
        StatusCode::OK
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_keys_checks_nothing_and_weak_credentials_do_not_start() {
    // No keys, no publish tokens: open, as before tokens; a token presented is ignored.
    let node = node(|c| c.auth_keys.clear()).await;
    let mut ws = connect(&format!("{}?token=whatever", node.url()), None).await;
    greeted(&mut ws).await;
    send(&mut ws, json!({"type": "sub", "topics": ["b.x"]})).await;
    expect(&mut ws, "subscribed").await;
    let response = reqwest::Client::new()
        .post(format!("http://{}/publish/b.x", node.listen_addr()))
        .body("open")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(expect(&mut ws, "msg").await["data"], "open");
    node.shutdown().await;

    for (field, tweak) in [
        (
            "publish_tokens",
            Box::new(|c: &mut NodeConfig| c.publish_tokens = vec!["short".into()])
                as Box<dyn FnOnce(&mut NodeConfig)>,
        ),
        (
            "admin_token",
            Box::new(|c| c.admin_token = Some(String::new())),
        ),
        (
            "auth_keys",
            Box::new(|c| c.auth_keys[0].secret = Some("too-short".into())),
        ),
    ] {
        let mut config = NodeConfig::new("weak");
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.auth_keys = vec![hs256_key("k1")];
        tweak(&mut config);
        let err = NodeHandle::start(config).await.err().expect("refused");
        assert!(err.to_string().contains(field), "{err}");
    }
}

/// The body of an event stream, read until it holds `wanted` (within [`STEP`]).
async fn stream_until(response: &mut reqwest::Response, wanted: &str) -> String {
    let mut body = String::new();
    let read = async {
        while !body.contains(wanted) {
            match response.chunk().await {
                Ok(Some(bytes)) => body.push_str(&String::from_utf8_lossy(&bytes)),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(STEP, read).await;
    assert!(body.contains(wanted), "no {wanted:?} in {body}");
    body
}

#[tokio::test]
async fn event_streams_take_the_same_tokens_as_websockets() {
    let node = node(|_| {}).await;
    let sse = |query: String| {
        let url = format!("http://{}/sse?{query}", node.listen_addr());
        async move { reqwest::get(url).await.expect("GET /sse") }
    };
    // No `auth` frame over this transport: without a token, refused at once, saying why.
    let refused = sse("topics=a.x".into()).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let why = refused.text().await.unwrap();
    assert!(why.contains("4010") && why.contains("token"), "{why}");
    let refused = sse("topics=a.x&token=not-a-jwt".into()).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.text().await.unwrap().contains("4011"));
    let expired = token(json!({"sub": "u", "exp": now() - 60, "subscribe": ["a.*"]}));
    let refused = sse(format!("topics=a.x&token={expired}")).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.text().await.unwrap().contains("4012"));
    // A valid token: its topics, and no others.
    let good = token(user(60));
    let mut allowed = sse(format!("topics=a.x&token={good}")).await;
    assert_eq!(allowed.status(), StatusCode::OK);
    stream_until(&mut allowed, "event: subscribed").await;
    let mut forbidden = sse(format!("topics=b.x&token={good}")).await;
    assert_eq!(forbidden.status(), StatusCode::OK);
    let body = stream_until(&mut forbidden, "\"code\":\"forbidden\"").await;
    assert!(!body.contains("event: subscribed"), "{body}");
    node.shutdown().await;
}
