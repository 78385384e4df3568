//! Event streams (`GET /sse`) against a node in this process, on real sockets: a client that
//! stops reading is closed as a slow consumer and dropped within the heartbeat timeout, like a
//! WebSocket, rather than holding its user, its queue and its descriptor. (The protocol, its
//! positions and failover are tested against node processes in `crates/cli/tests/sse.rs`.)

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use streamfarm_node::{NodeConfig, NodeHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::time::{Instant, timeout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_that_stops_reading_is_closed_and_dropped() {
    let mut config = NodeConfig::new("slow");
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.shutdown_drain_ms = 100;
    // More than the kernel buffers of a connection on loopback: the queue fills only once the
    // socket is full, and the client has truly stopped reading.
    config.send_queue_bytes = 8 << 20;
    config.heartbeat_interval_ms = 200;
    config.heartbeat_timeout_ms = 600;
    let node = NodeHandle::start(config).await.expect("node starts");

    // A client with a small receive buffer, that reads up to `subscribed` and then nothing.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(node.listen_addr()).await.unwrap();
    let request = format!(
        "GET /sse?topics=t HTTP/1.1\r\nHost: {}\r\n\r\n",
        node.listen_addr()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&head).contains("event: subscribed") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the stream ended: {}",
                String::from_utf8_lossy(&head)
            );
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("subscribed within 5 s");
    assert_eq!(node.users(), 1);

    // Messages of 32 KiB until the node gives up on it: its queue holds 8 MiB at most.
    let message = "x".repeat(32 * 1024);
    let started = Instant::now();
    while node.metrics().slow_consumers.load(Ordering::Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not closed as a slow consumer"
        );
        node.publish("t", &message).await.expect("published");
    }
    // Closed, and gone within the heartbeat timeout, though its client still holds the socket.
    let closed = Instant::now();
    while node.users() > 0 {
        assert!(
            closed.elapsed() < Duration::from_secs(5),
            "the stream still counts as a user {:?} after its close",
            closed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stream);
    node.shutdown().await;
}
