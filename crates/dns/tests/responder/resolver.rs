//! What a resolver sees: the UP servers, rotated; node names; SRV; NXDOMAIN and REFUSED.

use std::net::IpAddr;

use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use streamfarm_core::Status;

use crate::support::*;

#[tokio::test]
async fn service_name_answers_every_up_server_over_udp_and_tcp() {
    let (server, _farm_tx) = start(farm3()).await;
    for transport in [Transport::Udp, Transport::Tcp] {
        let resolver = resolver(server.local_addr(), transport);
        let mut addresses = resolve_a(&resolver, "farm.test.").await;
        addresses.sort();
        assert_eq!(addresses, vec![ip(1), ip(2), ip(3)], "{transport:?}");
    }
    let answer = ask_udp(server.local_addr(), "farm.test.", RecordType::A).await;
    assert!(answer.authoritative, "we are the authority for the zone");
    assert!(answer.answers.iter().all(|r| r.ttl == 2), "configured TTL");
    server.shutdown().await;
}

#[tokio::test]
async fn answers_rotate_one_place_per_query() {
    let (server, _farm_tx) = start(farm3()).await;
    let mut previous = answer_ips(&ask_udp(server.local_addr(), "farm.test.", RecordType::A).await);
    assert_eq!(previous.len(), 3);
    for _ in 0..4 {
        let next = answer_ips(&ask_udp(server.local_addr(), "farm.test.", RecordType::A).await);
        assert_eq!(next, rotate_left(&previous));
        previous = next;
    }
    // TCP answers come from the same rotation.
    let next = answer_ips(&ask_tcp(server.local_addr(), "farm.test.", RecordType::A).await);
    assert_eq!(next, rotate_left(&previous));

    // Through hickory-resolver: every server comes first in turn.
    let resolver = resolver(server.local_addr(), Transport::Udp);
    let mut firsts = Vec::new();
    for _ in 0..3 {
        firsts.push(resolve_a(&resolver, "farm.test.").await[0]);
    }
    firsts.sort();
    assert_eq!(firsts, vec![ip(1), ip(2), ip(3)]);
    server.shutdown().await;
}

#[tokio::test]
async fn down_and_draining_servers_leave_the_answers_and_come_back() {
    let (server, farm_tx) = start(farm3()).await;
    let resolver = resolver(server.local_addr(), Transport::Udp);
    farm_tx.send_modify(|list| {
        list.servers[1].status = Status::Down;
        list.servers[2].status = Status::Draining;
    });
    eventually(CHANGE_DEADLINE, "only a is answered", || async {
        resolve_a(&resolver, "farm.test.").await == vec![ip(1)]
    })
    .await;
    // Several answers in a row: the rotation never brings them back.
    for _ in 0..3 {
        assert_eq!(resolve_a(&resolver, "farm.test.").await, vec![ip(1)]);
    }

    farm_tx.send_modify(|list| {
        list.servers[1].status = Status::Up;
        list.servers[2].status = Status::Up;
    });
    eventually(CHANGE_DEADLINE, "all three answered again", || async {
        let mut addresses = resolve_a(&resolver, "farm.test.").await;
        addresses.sort();
        addresses == vec![ip(1), ip(2), ip(3)]
    })
    .await;

    // A server that leaves the list altogether is gone too.
    farm_tx.send_modify(|list| {
        list.servers.remove(0);
    });
    eventually(CHANGE_DEADLINE, "a removed", || async {
        let mut addresses = resolve_a(&resolver, "farm.test.").await;
        addresses.sort();
        addresses == vec![ip(2), ip(3)]
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn node_names_answer_their_own_server() {
    let (server, farm_tx) = start(farm3()).await;
    for transport in [Transport::Udp, Transport::Tcp] {
        let resolver = resolver(server.local_addr(), transport);
        assert_eq!(resolve_a(&resolver, "b.farm.test.").await, vec![ip(2)]);
        assert_eq!(resolve_a(&resolver, "C.Farm.Test.").await, vec![ip(3)]);
    }
    // A DOWN node keeps its name but has no address.
    farm_tx.send_modify(|list| list.servers[1].status = Status::Down);
    eventually(CHANGE_DEADLINE, "b has no address", || async {
        let answer = ask_udp(server.local_addr(), "b.farm.test.", RecordType::A).await;
        answer.response_code == ResponseCode::NoError && answer.answers.is_empty()
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn srv_gives_each_up_server_with_port_and_glue() {
    let (server, _farm_tx) = start(farm3()).await;
    let resolver = resolver(server.local_addr(), Transport::Tcp);
    for owner in ["farm.test.", "_streamfarm._tcp.farm.test."] {
        let lookup = resolver
            .lookup(owner, RecordType::SRV)
            .await
            .unwrap_or_else(|e| panic!("SRV {owner}: {e}"));
        let mut targets: Vec<(String, u16, u16)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some((srv.target.to_string(), srv.port, srv.priority)),
                _ => None,
            })
            .collect();
        targets.sort();
        assert_eq!(
            targets,
            vec![
                ("a.farm.test.".to_string(), 7400, 0),
                ("b.farm.test.".to_string(), 7400, 0),
                ("c.farm.test.".to_string(), 7400, 0),
            ],
            "{owner}"
        );
    }
    // The targets' addresses ride along in the additional section.
    let answer = ask_udp(server.local_addr(), "farm.test.", RecordType::SRV).await;
    let mut glue: Vec<(String, IpAddr)> = answer
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.to_string(), IpAddr::V4(a.0))),
            _ => None,
        })
        .collect();
    glue.sort();
    assert_eq!(
        glue,
        vec![
            ("a.farm.test.".to_string(), IpAddr::V4(ip(1))),
            ("b.farm.test.".to_string(), IpAddr::V4(ip(2))),
            ("c.farm.test.".to_string(), IpAddr::V4(ip(3))),
        ]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_names_in_the_zone_are_nxdomain_and_others_refused() {
    let (server, _farm_tx) = start(farm3()).await;
    let addr = server.local_addr();

    let resolver = resolver(addr, Transport::Udp);
    let error = resolver
        .lookup("nobody.farm.test.", RecordType::A)
        .await
        .expect_err("no such name");
    assert!(error.is_nx_domain(), "{error}");

    for transport_answer in [
        ask_udp(addr, "nobody.farm.test.", RecordType::A).await,
        ask_tcp(addr, "nobody.farm.test.", RecordType::A).await,
    ] {
        assert_eq!(transport_answer.response_code, ResponseCode::NXDomain);
        assert!(transport_answer.authoritative);
        assert!(
            transport_answer
                .authorities
                .iter()
                .any(|r| r.record_type() == RecordType::SOA),
            "SOA in authority"
        );
    }

    let refused = ask_udp(addr, "example.com.", RecordType::A).await;
    assert_eq!(refused.response_code, ResponseCode::Refused);
    assert!(refused.answers.is_empty());
    let refused = ask_tcp(addr, "test.", RecordType::A).await;
    assert_eq!(refused.response_code, ResponseCode::Refused);
    assert!(
        resolver
            .lookup("example.com.", RecordType::A)
            .await
            .is_err(),
        "the resolver gets nothing outside the zone"
    );

    // An existing name asked for a type it does not have: NOERROR, empty, SOA for caching.
    let nodata = ask_udp(addr, "farm.test.", RecordType::MX).await;
    assert_eq!(nodata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
    assert!(
        nodata
            .authorities
            .iter()
            .any(|r| r.record_type() == RecordType::SOA)
    );
    let soa = ask_udp(addr, "farm.test.", RecordType::SOA).await;
    assert_eq!(soa.answers.len(), 1);
    server.shutdown().await;
}
