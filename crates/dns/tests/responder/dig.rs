//! The responder checked with the tool operators use: `dig`.

use std::net::SocketAddr;

use tokio::process::Command;

use crate::support::*;

/// `dig @ADDR -p PORT NAME A +short [+tcp]`: the addresses, one per line.
async fn dig_short(server: SocketAddr, name: &str, tcp: bool) -> Vec<String> {
    let mut command = Command::new("dig");
    command
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args([name, "A", "+short", "+tries=1", "+time=2"]);
    if tcp {
        command.arg("+tcp");
    }
    let output = tokio::time::timeout(EXCHANGE_TIMEOUT * 2, command.kill_on_drop(true).output())
        .await
        .expect("dig finishes")
        .expect("dig runs: install bind9-dnsutils (scripts/test.sh does)");
    assert!(output.status.success(), "dig failed: {output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn dig_shows_the_three_servers_rotated() {
    let (server, _farm_tx) = start(farm3()).await;
    let addr = server.local_addr();
    let first = dig_short(addr, "farm.test", false).await;
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    let second = dig_short(addr, "farm.test", false).await;
    assert_eq!(second, rotate_left(&first), "the second answer is rotated");
    let third = dig_short(addr, "farm.test", true).await;
    assert_eq!(third, rotate_left(&second), "TCP continues the rotation");
    assert_eq!(
        dig_short(addr, "a.farm.test", false).await,
        vec!["127.0.0.1"]
    );
    server.shutdown().await;
}
