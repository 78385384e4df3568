//! Start, stop, and a farm list that goes away.

use hickory_resolver::proto::rr::RecordType;
use streamfarm_dns::{DnsConfig, DnsError, DnsServer};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use crate::support::*;

#[tokio::test]
async fn shutdown_releases_both_sockets() {
    let (server, _farm_tx) = start(farm3()).await;
    let addr = server.local_addr();
    server.shutdown().await;
    // Both the UDP and the TCP port are free again at once.
    UdpSocket::bind(addr).await.expect("UDP port released");
    TcpListener::bind(addr).await.expect("TCP port released");
}

#[tokio::test]
async fn the_last_list_is_answered_after_its_sender_is_gone() {
    let (server, farm_tx) = start(farm3()).await;
    drop(farm_tx);
    // The follower task sees the channel closed and ends; answers must go on unchanged.
    for _ in 0..5 {
        tokio::task::yield_now().await;
        let answer = ask_udp(server.local_addr(), "farm.test.", RecordType::A).await;
        assert_eq!(answer_ips(&answer).len(), 3);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_taken_port_and_a_bad_name_are_reported() {
    let taken = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (_farm_tx, farm_rx) = watch::channel(farm3());
    let error = DnsServer::start(
        DnsConfig::new(taken.local_addr().unwrap(), "farm.test"),
        farm_rx.clone(),
    )
    .await
    .expect_err("port in use");
    assert!(
        matches!(
            error,
            DnsError::Bind {
                protocol: "UDP",
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains(&taken.local_addr().unwrap().to_string())
    );

    let error = DnsServer::start(
        DnsConfig::new("127.0.0.1:0".parse().unwrap(), "bad name!.test"),
        farm_rx,
    )
    .await
    .expect_err("not a domain name");
    assert!(
        matches!(error, DnsError::InvalidServiceName { .. }),
        "{error}"
    );
}
