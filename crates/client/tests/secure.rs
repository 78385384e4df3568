//! The client on a farm with TLS and tokens, over real sockets: it subscribes over `wss://` with
//! a test CA (made here with rcgen) and receives messages; it refreshes its token in band and
//! keeps its connection past the first token's expiry; it publishes over `https://` with its
//! token. The node serves a certificate swapped on disk without a restart, and keeps the old one
//! when the new files do not load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::json;
use streamfarm_client::{CertificateProblem, Client, ClientOptions, ErrorKind, Event, Rejection};
use streamfarm_node::{AuthKey, NodeConfig, NodeHandle};

const SECRET: &str = "secure-test-secret-0123456789-0123456789";
const STEP: Duration = Duration::from_secs(10);

/// A CA and a way to issue server certificates for 127.0.0.1 and localhost.
struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "streamfarm test CA");
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa { params, key, pem }
    }

    /// A server certificate (PEM) and its key (PEM), with `name` as its common name.
    fn issue(&self, name: &str) -> (String, String) {
        self.issue_naming(name, &[])
    }

    /// Same, also valid for the DNS names `also` (a node's name, for relay links).
    fn issue_naming(&self, name: &str, also: &[&str]) -> (String, String) {
        let mut names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        names.extend(also.iter().map(|n| n.to_string()));
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sf-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces a file in one step (write aside, rename), as a certificate manager does.
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(ttl: u64) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let claims = json!({"sub": "client-1", "iat": now(), "exp": now() + ttl,
                        "subscribe": ["a.*"], "publish": ["a.*"]});
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn tls_node(cert: &Path, key: &Path) -> NodeHandle {
    tls_node_joining("secure", cert, key, None).await
}

async fn tls_node_joining(
    name: &str,
    cert: &Path,
    key: &Path,
    join: Option<SocketAddr>,
) -> NodeHandle {
    tls_node_with(name, cert, key, join, |_| {}).await
}

async fn tls_node_with(
    name: &str,
    cert: &Path,
    key: &Path,
    join: Option<SocketAddr>,
    tweak: impl FnOnce(&mut NodeConfig),
) -> NodeHandle {
    let mut config = NodeConfig::new(name);
    config.join = join.map(|addr| addr.to_string()).into_iter().collect();
    config.gossip_interval_ms = 50;
    config.failure_timeout_ms = 1000;
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.shutdown_drain_ms = 100;
    config.tls_cert = Some(cert.to_path_buf());
    config.tls_key = Some(key.to_path_buf());
    config.tls_reload_ms = 100;
    config.auth_keys = vec![AuthKey {
        kid: "k1".into(),
        alg: "HS256".into(),
        secret: Some(SECRET.into()),
        secret_file: None,
        public_key_file: None,
    }];
    config.auth_leeway_s = 0;
    tweak(&mut config);
    NodeHandle::start(config).await.expect("node starts")
}

/// The next message event, within [`STEP`].
async fn next_message(client: &mut Client) -> (String, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .expect("a message in time")
            .expect("client running");
        match event {
            Event::Message { topic, payload, .. } => return (topic, payload),
            Event::Disconnected { cause, .. } => panic!("disconnected: {cause:?}"),
            _ => {}
        }
    }
}

/// The certificate a fresh TLS connection to `addr` is served, trusting `ca`.
async fn served_certificate(addr: SocketAddr, ca: &Path) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pem_certs(ca) {
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    Ok(session.peer_certificates().unwrap()[0].to_vec())
}

/// The answer (status line, headers and body) to a relay upgrade to `addr` as node `as_name`,
/// without a relay ticket, over TLS with the client certificate `client` (PEM chain and key) if
/// any.
async fn relay_upgrade_answer(
    addr: SocketAddr,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    as_name: &str,
) -> String {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pem_certs(ca) {
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                rustls_pem_certs(cert),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let request = format!(
        "GET /internal/relay?node={as_name} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let deadline = tokio::time::Instant::now() + STEP;
    // The node closes after its answer (the request asked for an upgrade it refuses).
    while !String::from_utf8_lossy(&answer).contains("refused")
        && !String::from_utf8_lossy(&answer).contains("certificate")
    {
        let mut chunk = [0u8; 512];
        match tokio::time::timeout_at(deadline, tls.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&chunk[..n]),
            Ok(Err(_)) => break,
            Err(_) => panic!("no answer in time: {}", String::from_utf8_lossy(&answer)),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn rustls_pem_certs(path: &Path) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_subscribes_over_wss_with_a_refreshed_token_and_publishes_over_https() {
    let dir = temp_dir("wss");
    let ca = TestCa::new();
    let (cert, key) = ca.issue("first");
    let (cert_path, key_path, ca_path) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let node = tls_node(&cert_path, &key_path).await;
    let port = node.listen_addr().port();
    assert_eq!(node.url(), format!("wss://127.0.0.1:{port}/stream"));
    let farm = node.farm().borrow().clone();
    assert!(farm.servers[0].url.starts_with("wss://"), "{farm:?}");

    // Tokens of 3 s: the client must refresh in band to stay connected.
    let issued = Arc::new(AtomicU32::new(0));
    let counter = issued.clone();
    let options = ClientOptions::new()
        .ca_file(&ca_path)
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .token_provider(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok(token(3)) }
        })
        .subscribe(["a.x"]);
    let address = format!("wss://127.0.0.1:{port}").parse().unwrap();
    let mut client = Client::start(address, options.clone());
    client
        .wait_connected(STEP)
        .await
        .expect("connected over wss");
    node.publish("a.x", "over tls").await.unwrap();
    assert_eq!(
        next_message(&mut client).await,
        ("a.x".to_string(), b"over tls".to_vec())
    );

    // Past the first token's expiry (plus a second), the same connection still delivers.
    let first_expiry = tokio::time::Instant::now() + Duration::from_secs(4);
    tokio::time::sleep_until(first_expiry).await;
    node.publish("a.x", "after expiry").await.unwrap();
    assert_eq!(next_message(&mut client).await.1, b"after expiry".to_vec());
    assert!(
        issued.load(Ordering::SeqCst) >= 2,
        "the provider was asked again"
    );

    // Publishing over https: with the token it goes through, without it the node says 401.
    let https = format!("https://127.0.0.1:{port}").parse().unwrap();
    streamfarm_client::publish(&https, &options, "a.x", b"via https".to_vec())
        .await
        .expect("published over https");
    assert_eq!(next_message(&mut client).await.1, b"via https".to_vec());
    let anonymous = ClientOptions::new().ca_file(&ca_path).unwrap();
    let err = streamfarm_client::publish(&https, &anonymous, "a.x", b"no".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Http);
    assert!(err.to_string().contains("401"), "{err}");

    // A client that does not trust the test CA cannot connect.
    let untrusting = ClientOptions::new()
        .token(token(60))
        .connect_timeout(Duration::from_secs(2));
    let address = format!("wss://127.0.0.1:{port}").parse().unwrap();
    let err = streamfarm_client::fetch_list(&address, &untrusting)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");

    client.close().await;
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_is_served_without_restart_and_a_bad_one_is_not() {
    let dir = temp_dir("reload");
    let ca = TestCa::new();
    let (first, first_key) = ca.issue("first");
    let (cert_path, key_path, ca_path) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_path, &first).unwrap();
    std::fs::write(&key_path, &first_key).unwrap();
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let node = tls_node(&cert_path, &key_path).await;
    let addr = node.listen_addr();
    assert_eq!(
        served_certificate(addr, &ca_path).await.unwrap(),
        der_of(&first)
    );

    let (second, second_key) = ca.issue("second");
    replace(&key_path, &second_key);
    replace(&cert_path, &second);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if served_certificate(addr, &ca_path).await.unwrap() == der_of(&second) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Garbage, then a certificate without its key: the second one stays in use.
    replace(&cert_path, "not a certificate");
    let (third, _third_key) = ca.issue("third");
    tokio::time::sleep(Duration::from_millis(400)).await;
    replace(&cert_path, &third);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served_certificate(addr, &ca_path).await.unwrap(),
        der_of(&second)
    );

    // Plain HTTP on the TLS port is told to use TLS (relay links included).
    let plain = reqwest::get(format!("http://{addr}/farm")).await.unwrap();
    assert_eq!(plain.status(), reqwest::StatusCode::BAD_REQUEST);
    assert!(plain.text().await.unwrap().contains("TLS"));

    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Publishes `payload` on `from` until `client` (subscribed to `topic`) receives it, within
/// [`STEP`]; earlier messages are skipped.
async fn crosses(from: &NodeHandle, client: &mut Client, topic: &str, payload: &str) -> bool {
    let deadline = tokio::time::Instant::now() + STEP;
    while tokio::time::Instant::now() < deadline {
        let _ = from.publish(topic, payload).await;
        let wait = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(event)) = tokio::time::timeout_at(wait, client.next_event()).await {
            if matches!(event, Event::Message { payload: got, .. } if got == payload.as_bytes()) {
                return true;
            }
        }
    }
    false
}

fn relay_auth_failures(node: &NodeHandle) -> u64 {
    node.metrics().relay_auth_failures.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_a_farm_of_tls_nodes_over_tls_relay_links() {
    let dir = temp_dir("farm");
    let ca = TestCa::new();
    let (cert, key) = ca.issue("farm");
    let (cert_path, key_path, ca_path) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    std::fs::write(&ca_path, &ca.pem).unwrap();
    // No relay CA: the farm secret authenticates the links, bound to their TLS sessions.
    let secret = |config: &mut NodeConfig| {
        config.farm_secret = Some("relay-tls-farm-secret-0123456789".to_string().into());
    };
    let a = tls_node_with("a", &cert_path, &key_path, None, secret).await;
    let b = tls_node_with("b", &cert_path, &key_path, Some(a.gossip_addr()), secret).await;
    let options = ClientOptions::new()
        .ca_file(&ca_path)
        .unwrap()
        .token(token(60))
        .subscribe(["a.farm"]);
    let address = format!("wss://{}", b.listen_addr()).parse().unwrap();
    let mut client = Client::start(address, options);
    client
        .wait_connected(STEP)
        .await
        .expect("connected over wss");
    // Published on a, delivered by whichever node the client chose.
    assert!(crosses(&a, &mut client, "a.farm", "across").await);
    let farm = b.farm().borrow().clone();
    assert!(
        farm.servers.iter().all(|s| s.url.starts_with("wss://")),
        "{farm:?}"
    );
    assert_eq!(relay_auth_failures(&a) + relay_auth_failures(&b), 0);
    // The relay endpoint is not served in plain text: a relay link is TLS or nothing.
    let plain = reqwest::get(format!("http://{}/internal/relay?node=b", a.listen_addr()))
        .await
        .unwrap();
    assert_eq!(plain.status(), reqwest::StatusCode::BAD_REQUEST);
    client.close().await;
    b.shutdown().await;
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_only_a_node_whose_certificate_names_it_links() {
    let dir = temp_dir("mtls");
    let ca = TestCa::new();
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    // Every node's certificate names the node; "c" holds one of the farm's CA naming "x".
    let mut paths = Vec::new();
    for (node, named) in [("a", "a"), ("b", "b"), ("c", "x")] {
        let (cert, key) = ca.issue_naming(node, &[named]);
        let (cert_path, key_path) = (
            dir.join(format!("{node}.pem")),
            dir.join(format!("{node}.key")),
        );
        std::fs::write(&cert_path, &cert).unwrap();
        std::fs::write(&key_path, &key).unwrap();
        paths.push((cert_path, key_path));
    }
    let mtls = |config: &mut NodeConfig| {
        config.farm_secret = Some("relay-mtls-farm-secret-0123456789".to_string().into());
        config.relay_ca_file = Some(ca_path.clone());
        config.relay_mtls = true;
    };
    let a = tls_node_with("a", &paths[0].0, &paths[0].1, None, mtls).await;
    let b = tls_node_with("b", &paths[1].0, &paths[1].1, Some(a.gossip_addr()), mtls).await;
    let options = ClientOptions::new()
        .ca_file(&ca_path)
        .unwrap()
        .token(token(60))
        .subscribe(["a.mtls", "a.x", "a.y", "a.z"]);
    // Clients need no certificate of their own.
    let address = format!("wss://{}", b.listen_addr()).parse().unwrap();
    let mut client = Client::start(address, options);
    client
        .wait_connected(STEP)
        .await
        .expect("connected over wss");
    assert!(crosses(&a, &mut client, "a.mtls", "first").await);
    assert_eq!(relay_auth_failures(&a) + relay_auth_failures(&b), 0);

    // The relay endpoint wants a certificate of the farm's CA naming the dialer: none, or one
    // for another name, is refused before any upgrade; b's own passes that check (and is then
    // refused for want of the farm secret's ticket, which this test does not make).
    let addr = a.listen_addr();
    let no_certificate = relay_upgrade_answer(addr, &ca_path, None, "c").await;
    assert!(
        no_certificate.starts_with("HTTP/1.1 403") && no_certificate.contains("certificate naming"),
        "{no_certificate}"
    );
    let x = Some((paths[2].0.as_path(), paths[2].1.as_path()));
    let other_name = relay_upgrade_answer(addr, &ca_path, x, "c").await;
    assert!(
        other_name.starts_with("HTTP/1.1 403") && other_name.contains("certificate naming"),
        "{other_name}"
    );
    let b_cert = Some((paths[1].0.as_path(), paths[1].1.as_path()));
    let named = relay_upgrade_answer(addr, &ca_path, b_cert, "b").await;
    assert!(
        named.starts_with("HTTP/1.1 403") && named.contains("relay link refused"),
        "{named}"
    );

    // c knows the farm secret and has a certificate of the farm's CA, but for another name:
    // a refuses its links (its client certificate does not name it) and b refuses to link to it
    // (its server certificate does not name it).
    let c = tls_node_with("c", &paths[2].0, &paths[2].1, Some(a.gossip_addr()), mtls).await;
    let deadline = tokio::time::Instant::now() + STEP;
    while relay_auth_failures(&a) == 0 || relay_auth_failures(&b) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "c's links were not refused: a {}, b {}",
            relay_auth_failures(&a),
            relay_auth_failures(&b)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Gossip lists c (it has the farm secret), but no link to it opens: a and b place no topic
    // on it, and still relay to each other.
    let deadline = tokio::time::Instant::now() + STEP;
    while !a
        .farm()
        .borrow()
        .servers
        .iter()
        .any(|s| s.name == "c" && s.status.as_str() == "UP")
    {
        assert!(tokio::time::Instant::now() < deadline, "c never listed UP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for topic in ["a.mtls", "a.x", "a.y", "a.z"] {
        assert!(crosses(&a, &mut client, topic, "second").await, "{topic}");
    }
    client.close().await;
    c.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_stalled_in_its_tls_handshake_is_closed_at_the_handshake_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("stall");
    let ca = TestCa::new();
    let (cert, key) = ca.issue("stall");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    let node = tls_node_with("stall", &cert_path, &key_path, None, |config| {
        config.handshake_timeout_ms = 500;
    })
    .await;
    // The first byte of a TLS handshake record, then nothing: a slowloris of the handshake.
    let mut tcp = tokio::net::TcpStream::connect(node.listen_addr())
        .await
        .unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(STEP, tcp.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the stalled handshake was never closed");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed only after {:?}",
        started.elapsed()
    );
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first [`Event::Rejected`] of `client`, within [`STEP`], and whether a `Retrying` followed.
async fn rejection_then_retry(client: &mut Client) -> (Rejection, bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    let mut rejected = None;
    loop {
        let event = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .expect("a rejection, then a retry, in time")
            .expect("client running");
        match event {
            Event::Rejected { rejection, .. } if rejected.is_none() => rejected = Some(rejection),
            Event::Retrying { .. } if rejected.is_some() => return (rejected.unwrap(), true),
            Event::Connected { server, .. } => panic!("connected to {server}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_problems_are_named_apart_from_unreachable_servers() {
    let dir = temp_dir("cert-problems");
    let ca = TestCa::new();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca_path = write("ca.pem", &ca.pem);
    let other_ca_path = write("other-ca.pem", &TestCa::new().pem);
    // What `openssl req -x509 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1` makes:
    // self-signed, marked as a CA.
    let self_signed_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let self_signed = params.self_signed(&self_signed_key).unwrap().pem();
    // Signed by the CA, naming only a node name.
    let only_n1_key = KeyPair::generate().unwrap();
    let only_n1 = CertificateParams::new(vec!["n1".to_string()])
        .unwrap()
        .signed_by(&only_n1_key, &Issuer::from_params(&ca.params, &ca.key))
        .unwrap()
        .pem();
    let (good_cert, good_key) = ca.issue("good");

    let serve = |name: &'static str, cert: String, key: String| {
        let cert = write(&format!("{name}.pem"), &cert);
        let key = write(&format!("{name}.key"), &key);
        async move { tls_node_joining(name, &cert, &key, None).await }
    };
    let good = serve("good", good_cert, good_key).await;
    let self_signed_node =
        serve("self", self_signed.clone(), self_signed_key.serialize_pem()).await;
    let wrong_name = serve("wrong", only_n1, only_n1_key.serialize_pem()).await;
    let self_signed_ca = write("self.pem", &self_signed);
    let cases = [
        (&good, &other_ca_path, CertificateProblem::UnknownIssuer),
        (
            &self_signed_node,
            &self_signed_ca,
            CertificateProblem::SelfSigned,
        ),
        (
            &wrong_name,
            &ca_path,
            CertificateProblem::WrongName {
                host: "127.0.0.1".into(),
                names: vec!["n1".into()],
            },
        ),
    ];
    for (node, trusted, problem) in cases {
        let address = format!("wss://{}", node.listen_addr()).parse().unwrap();
        let options = ClientOptions::new()
            .ca_file(trusted)
            .unwrap()
            .token(token(60));
        let err = streamfarm_client::fetch_list(&address, &options)
            .await
            .unwrap_err();
        assert_eq!(
            err.rejection(),
            Some(Rejection::Certificate(problem.clone())),
            "{err}"
        );
        assert!(
            err.to_string().contains("certificate of wss://127.0.0.1:"),
            "{err}"
        );
        // The library keeps its choice: it reports the rejection, then retries.
        let mut client = Client::start(address, options.subscribe(["a.x"]));
        assert_eq!(
            rejection_then_retry(&mut client).await,
            (Rejection::Certificate(problem), true)
        );
        client.close().await;
    }
    let self_signed_error = streamfarm_client::fetch_list(
        &format!("wss://{}", self_signed_node.listen_addr())
            .parse()
            .unwrap(),
        &ClientOptions::new().ca_file(&self_signed_ca).unwrap(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        self_signed_error.contains("self-signed") && self_signed_error.contains("streamfarm cert"),
        "{self_signed_error}"
    );

    // A token signed with another key: rejected with its close code.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("k1".into());
    let claims = json!({"sub": "mallory", "exp": now() + 60, "subscribe": ["**"]});
    let forged =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&[7; 32])).unwrap();
    let address = format!("wss://{}", good.listen_addr()).parse().unwrap();
    let options = ClientOptions::new()
        .ca_file(&ca_path)
        .unwrap()
        .token(forged)
        .subscribe(["a.x"]);
    let mut client = Client::start(address, options);
    assert_eq!(
        rejection_then_retry(&mut client).await,
        (Rejection::Token { code: 4011 }, true)
    );
    client.close().await;

    // A server that is not there is not a rejection: retrying may fix it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("wss://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = streamfarm_client::fetch_list(
        &address.parse().unwrap(),
        &ClientOptions::new().ca_file(&ca_path).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.rejection(), None, "{err}");
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");

    for node in [good, self_signed_node, wrong_name] {
        node.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
