//! `streamfarm list`, `sub`, `pub` and `load` against real nodes.

mod client_support;

use std::process::Stdio;
use std::time::Duration;

use client_support::{Farm, SERIAL, exe};
use streamfarm_core::FarmList;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

async fn streamfarm(args: &[&str]) -> std::process::Output {
    let run = Command::new(exe()).args(args).stdin(Stdio::null()).output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("streamfarm finished within 30 s")
        .expect("streamfarm ran")
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_the_farm_as_a_table_and_in_each_encoding() {
    let _serial = SERIAL.lock().await;
    let farm = Farm::start(&[("a", "A"), ("b", "B")]).await;
    let seeds = farm.seeds().to_string();

    let table = streamfarm(&["list", &seeds]).await;
    assert!(table.status.success(), "{table:?}");
    let text = stdout(&table);
    assert!(text.starts_with("NAME"), "{text}");
    for node in &farm.nodes {
        assert!(text.contains(&node.url()), "{text}");
    }
    assert!(text.contains("2 servers"), "{text}");

    let json = streamfarm(&["list", &seeds, "--format", "json"]).await;
    let list: FarmList = serde_json::from_slice(&json.stdout).expect("JSON list");
    assert_eq!(list.servers.len(), 2);

    let text = stdout(&streamfarm(&["list", &seeds, "--format", "text"]).await);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ws://")).count(),
        2,
        "{text}"
    );
    assert!(stdout(&streamfarm(&["list", &seeds, "--format", "xml"]).await).contains("<server"));
    assert!(stdout(&streamfarm(&["list", &seeds, "--format", "js"]).await).contains('('));
}

#[tokio::test]
async fn list_of_an_unreachable_service_says_so() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let output = streamfarm(&["list", &port.to_string(), "--connect-timeout-ms", "500"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no server of"), "{stderr}");
    let bad = streamfarm(&["list", "host:notaport"]).await;
    assert!(String::from_utf8_lossy(&bad.stderr).contains("port \"notaport\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_prints_what_pub_publishes() {
    let _serial = SERIAL.lock().await;
    let farm = Farm::start(&[("a", "A"), ("b", "A")]).await;
    let seeds = farm.seeds().to_string();
    let mut sub = Command::new(exe())
        .args(["sub", &seeds, "news", "--json", "--count", "1"])
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
    let connected: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(connected["event"], "connected", "{first}");

    // The other node may take a moment to relay to this subscription: publish until it lands.
    let received = async {
        loop {
            let published = streamfarm(&["pub", &seeds, "news", "hello farm"]).await;
            assert!(published.status.success(), "{published:?}");
            if let Ok(Ok(Some(line))) =
                tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await
            {
                return line;
            }
        }
    };
    let line = tokio::time::timeout(Duration::from_secs(10), received)
        .await
        .expect("the message arrives");
    let message: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(message["event"], "message");
    assert_eq!(message["topic"], "news");
    assert_eq!(message["data"], "hello farm");
    let status = tokio::time::timeout(Duration::from_secs(5), sub.wait())
        .await
        .expect("sub exits after --count 1")
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_holds_clients_and_summarises_them() {
    let _serial = SERIAL.lock().await;
    let farm = Farm::start(&[("a", "A"), ("b", "A")]).await;
    let seeds = farm.seeds().to_string();
    let output = streamfarm(&[
        "load",
        &seeds,
        "--clients",
        "40",
        "--topic",
        "t",
        "--duration",
        "1s",
        // From two extra loopback source addresses, as for more clients than one has ports.
        "--source-ips",
        "2",
    ])
    .await;
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert!(text.contains("connected now 40, ever 40"), "{text}");
    assert!(text.contains("failovers 0"), "{text}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("40 of 40 clients connected"), "{stderr}");
}
