//! Bad packets and floods: the responder answers what it can, drops the rest, and keeps serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::{DNSClass, Name, RecordType};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

use crate::support::*;

/// How long to wait for an answer that may rightly never come.
const SHORT_WAIT: Duration = Duration::from_millis(300);

/// Bytes that are not DNS, from a fixed-seed linear congruential generator.
fn garbage(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect()
}

fn message(id: u16, op_code: OpCode, queries: &[(&str, RecordType, DNSClass)]) -> Message {
    let mut message = Message::new(id, MessageType::Query, op_code);
    for (name, record_type, class) in queries {
        let mut query = Query::query(Name::from_ascii(name).unwrap(), *record_type);
        query.set_query_class(*class);
        message.add_query(query);
    }
    message
}

async fn assert_still_answers(server: std::net::SocketAddr) {
    let udp = ask_udp(server, "farm.test.", RecordType::A).await;
    assert_eq!(answer_ips(&udp).len(), 3, "UDP still answered");
    let tcp = ask_tcp(server, "farm.test.", RecordType::A).await;
    assert_eq!(answer_ips(&tcp).len(), 3, "TCP still answered");
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_nothing_and_service_goes_on() {
    let (server, _farm_tx) = start(farm3()).await;
    let addr = server.local_addr();

    // Pure noise, of several sizes, including an empty datagram and one byte.
    for (i, len) in [0usize, 1, 11, 12, 13, 64, 512, 1500, 4096]
        .into_iter()
        .enumerate()
    {
        let _ = udp_exchange(addr, &garbage(len, i as u32), SHORT_WAIT).await;
    }

    // A good header whose question is cut in the middle of the name: FORMERR.
    let whole = query_bytes(0x1234, "farm.test.", RecordType::A);
    for cut in [12, 14, whole.len() - 3] {
        let answer = udp_exchange(addr, &whole[..cut], EXCHANGE_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no answer to a query cut at {cut}"));
        assert_eq!(answer.response_code, ResponseCode::FormErr, "cut at {cut}");
        assert_eq!(answer.id, 0x1234);
    }

    // Two questions in one query: FORMERR. No question at all: FORMERR.
    let two = message(
        7,
        OpCode::Query,
        &[
            ("farm.test.", RecordType::A, DNSClass::IN),
            ("a.farm.test.", RecordType::A, DNSClass::IN),
        ],
    );
    let answer = udp_exchange(addr, &two.to_vec().unwrap(), EXCHANGE_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(answer.response_code, ResponseCode::FormErr);
    let none = message(8, OpCode::Query, &[]);
    let answer = udp_exchange(addr, &none.to_vec().unwrap(), EXCHANGE_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(answer.response_code, ResponseCode::FormErr);

    // Other opcodes (dynamic update, notify): not implemented.
    let update = message(
        9,
        OpCode::Update,
        &[("farm.test.", RecordType::SOA, DNSClass::IN)],
    );
    let answer = udp_exchange(addr, &update.to_vec().unwrap(), EXCHANGE_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(answer.response_code, ResponseCode::NotImp);

    // Another class (CHAOS, as `version.bind` probes use): refused.
    let chaos = message(
        10,
        OpCode::Query,
        &[("farm.test.", RecordType::TXT, DNSClass::CH)],
    );
    let answer = udp_exchange(addr, &chaos.to_vec().unwrap(), EXCHANGE_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(answer.response_code, ResponseCode::Refused);

    // EDNS version 1: BADVERS (an extended code, carried in the answer's OPT record).
    let mut future = message(
        11,
        OpCode::Query,
        &[("farm.test.", RecordType::A, DNSClass::IN)],
    );
    let mut edns = Edns::new();
    edns.set_version(1);
    future.set_edns(edns);
    let answer = udp_exchange(addr, &future.to_vec().unwrap(), EXCHANGE_TIMEOUT)
        .await
        .unwrap();
    // Code 16 is both BADVERS and BADSIG; decoders name it BADSIG.
    assert_eq!(
        u16::from(answer.response_code),
        u16::from(ResponseCode::BADVERS)
    );

    // A response sent to us is never answered (no reflection loops between servers).
    let mut response = message(
        12,
        OpCode::Query,
        &[("farm.test.", RecordType::A, DNSClass::IN)],
    );
    response.metadata.message_type = MessageType::Response;
    assert!(
        udp_exchange(addr, &response.to_vec().unwrap(), SHORT_WAIT)
            .await
            .is_none()
    );

    // TCP: a length prefix promising more than is sent, then close; noise with a prefix.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&[0x01, 0xf4, 0xde, 0xad]).await.unwrap();
    drop(stream);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let noise = garbage(200, 99);
    stream.write_all(&[0x00, 200]).await.unwrap();
    stream.write_all(&noise).await.unwrap();
    stream.write_all(&whole[..14]).await.unwrap();
    drop(stream);

    assert_still_answers(addr).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_queries_leaves_the_runtime_and_the_service_working() {
    let (server, _farm_tx) = start(farm3()).await;
    let addr = server.local_addr();

    // Another task on the same runtime, standing in for the node's streams: it must keep
    // ticking while the flood is answered.
    let ticks = Arc::new(AtomicUsize::new(0));
    let ticker = tokio::spawn({
        let ticks = Arc::clone(&ticks);
        async move {
            let mut interval = tokio::time::interval(Duration::from_millis(5));
            loop {
                interval.tick().await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    // 1. Fire and forget: 20,000 queries and noise from 4 sockets, as fast as they go.
    let blasters: Vec<_> = (0..4u16)
        .map(|b| {
            tokio::spawn(async move {
                let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let query = query_bytes(b, "farm.test.", RecordType::A);
                let noise = garbage(48, u32::from(b));
                for i in 0..5_000u32 {
                    let packet = if i % 10 == 0 { &noise } else { &query };
                    // A full socket buffer is the flood doing its job; keep going.
                    let _ = socket.send_to(packet, addr).await;
                }
            })
        })
        .collect();
    let before = ticks.load(Ordering::Relaxed);
    for blaster in blasters {
        blaster.await.unwrap();
    }

    // 2. Bounded concurrency that waits for answers: 64 clients × 20 queries.
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..64u16)
        .map(|c| {
            let answered = Arc::clone(&answered);
            tokio::spawn(async move {
                let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let mut buffer = vec![0u8; 4096];
                for q in 0..20u16 {
                    let query = query_bytes(
                        c.wrapping_mul(100).wrapping_add(q),
                        "farm.test.",
                        RecordType::A,
                    );
                    socket.send_to(&query, addr).await.unwrap();
                    if let Ok(Ok(_)) =
                        tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buffer))
                            .await
                    {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    assert!(
        answered.load(Ordering::Relaxed) > 0,
        "the flood was answered at all"
    );

    // 3. Idle TCP connections pile up; they must not block new clients.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }

    assert!(
        ticks.load(Ordering::Relaxed) > before,
        "the other task kept running during the flood"
    );
    assert_still_answers(addr).await;
    drop(idle);
    ticker.abort();
    server.shutdown().await;
}
