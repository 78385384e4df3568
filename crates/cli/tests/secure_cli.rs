//! `streamfarm serve` with TLS and tokens, and `streamfarm sub` / `pub` / `list` against it over
//! `wss://` and `https://` with `--ca-file` and `--token` (a CA made here with rcgen).

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const SECRET: &str = "cli-test-secret-0123456789-0123456789";
const PUBLISH_TOKEN: &str = "cli-publish-token-0123456789";

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_streamfarm")
}

async fn streamfarm(args: &[&str]) -> std::process::Output {
    let run = Command::new(exe()).args(args).stdin(Stdio::null()).output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("streamfarm finished within 30 s")
        .expect("streamfarm ran")
}

fn token(subscribe: &[&str]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({"sub": "cli", "exp": now + 300, "subscribe": subscribe});
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_and_pub_reach_a_tls_farm_with_a_ca_file_and_tokens() {
    let dir = std::env::temp_dir().join(format!("sf-cli-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params
        .signed_by(&key, &Issuer::from_params(&ca_params, &ca_key))
        .unwrap();
    let (ca, cert_path, key_path, secret) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("k1.secret"),
    );
    std::fs::write(&ca, ca_pem).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&secret, SECRET).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut node = Command::new(exe())
        .args(["serve", "--name", "tls", "--listen", &listen])
        .args(["--tls-cert", cert_path.to_str().unwrap()])
        .args(["--tls-key", key_path.to_str().unwrap()])
        .args(["--auth-key", &format!("k1:HS256:{}", secret.display())])
        .args(["--publish-token", PUBLISH_TOKEN])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut node_out = BufReader::new(node.stdout.take().unwrap()).lines();
    let started = tokio::time::timeout(Duration::from_secs(10), node_out.next_line())
        .await
        .expect("the node starts")
        .unwrap()
        .unwrap();
    assert!(
        started.contains(&format!("wss://{listen}/stream")),
        "{started}"
    );

    let service = format!("wss://{listen}");
    let ca_file = ca.to_str().unwrap();
    let list = streamfarm(&[
        "list",
        &service,
        "--ca-file",
        ca_file,
        "--token",
        &token(&[]),
    ])
    .await;
    assert!(list.status.success(), "{list:?}");
    assert!(String::from_utf8_lossy(&list.stdout).contains("wss://"));

    let reader = token(&["news.*"]);
    let mut sub = Command::new(exe())
        .args(["sub", &service, "news.uk", "--json", "--count", "1"])
        .args(["--ca-file", ca_file, "--token", &reader])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("sub connects")
        .unwrap()
        .unwrap();
    assert!(first.contains("connected"), "{first}");

    let https = format!("https://{listen}");
    let refused = streamfarm(&["pub", &https, "news.uk", "x", "--ca-file", ca_file]).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{refused:?}"
    );
    let published = streamfarm(&[
        "pub",
        &https,
        "news.uk",
        "hello tls",
        "--ca-file",
        ca_file,
        "--token",
        PUBLISH_TOKEN,
    ])
    .await;
    assert!(published.status.success(), "{published:?}");
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the message arrives")
        .unwrap()
        .unwrap();
    let message: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(message["data"], "hello tls", "{line}");
    let _ = tokio::time::timeout(Duration::from_secs(5), sub.wait()).await;
    node.start_kill().unwrap();
    let _ = node.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}
