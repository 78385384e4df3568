//! What `streamfarm cert` and `streamfarm token` make, checked by the node's own code: node
//! certificates pass its relay mutual-TLS checks (and one naming another node does not), and a
//! token the command prints is taken by a TLS node requiring tokens.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use streamfarm_client::{Client, ClientOptions, Event};
use streamfarm_node::{AuthKey, NodeConfig, NodeHandle};
use tokio::process::Command;

const STEP: Duration = Duration::from_secs(10);

/// Runs `streamfarm ARGS` to success within 30 s; its standard output.
async fn streamfarm(args: &[&str]) -> String {
    let run = Command::new(env!("CARGO_BIN_EXE_streamfarm"))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("streamfarm finished within 30 s")
        .expect("streamfarm ran");
    assert!(output.status.success(), "streamfarm {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

async fn node(name: &str, dir: &Path, certificate: &str, join: Option<&NodeHandle>) -> NodeHandle {
    let mut config = NodeConfig::new(name);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.join = join
        .map(|n| n.gossip_addr().to_string())
        .into_iter()
        .collect();
    config.gossip_interval_ms = 50;
    config.failure_timeout_ms = 1000;
    config.shutdown_drain_ms = 100;
    config.tls_cert = Some(dir.join(format!("{certificate}.pem")));
    config.tls_key = Some(dir.join(format!("{certificate}.key")));
    config.relay_ca_file = Some(dir.join("ca.pem"));
    config.relay_mtls = true;
    config.farm_secret = Some("certs-test-farm-secret-0123456789".to_string().into());
    config.auth_keys = vec![AuthKey {
        kid: "k1".into(),
        alg: "HS256".into(),
        secret: None,
        secret_file: Some(dir.join("k1.secret")),
        public_key_file: None,
    }];
    NodeHandle::start(config).await.expect("node starts")
}

fn relay_auth_failures(node: &NodeHandle) -> u64 {
    node.metrics().relay_auth_failures.load(Ordering::Relaxed)
}

/// Publishes on `from` until `client` receives it, within [`STEP`].
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_pass_the_relay_mtls_checks_and_tokens_verify() {
    let dir = std::env::temp_dir().join(format!("sf-certs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_str().unwrap();
    streamfarm(&["cert", "ca", dir_arg]).await;
    for name in ["a", "b", "x"] {
        streamfarm(&["cert", "node", name, "--host", "127.0.0.1", dir_arg]).await;
    }
    std::fs::write(
        dir.join("k1.secret"),
        "certs-test-token-key-0123456789-0123456789\n",
    )
    .unwrap();
    let key = dir.join("k1.secret");
    let token = streamfarm(&[
        "token",
        "--key",
        key.to_str().unwrap(),
        "--kid",
        "k1",
        "--sub",
        "tester",
        "--subscribe",
        "t.*",
    ])
    .await;

    let a = node("a", &dir, "a", None).await;
    let b = node("b", &dir, "b", Some(&a)).await;
    let options = ClientOptions::new()
        .ca_file(dir.join("ca.pem"))
        .unwrap()
        .token(token.trim())
        .subscribe(["t.mtls"]);
    let address = format!("wss://{}", b.listen_addr()).parse().unwrap();
    let mut client = Client::start(address, options);
    client
        .wait_connected(STEP)
        .await
        .expect("connected over wss with the printed token");
    assert!(crosses(&a, &mut client, "t.mtls", "across").await);
    assert_eq!(relay_auth_failures(&a) + relay_auth_failures(&b), 0);

    // A certificate of the same CA naming another node: its links are refused.
    let c = node("c", &dir, "x", Some(&a)).await;
    let deadline = tokio::time::Instant::now() + STEP;
    while relay_auth_failures(&a) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "c's links with x's certificate were not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(crosses(&a, &mut client, "t.mtls", "still").await);
    client.close().await;
    for node in [c, b, a] {
        node.shutdown().await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
