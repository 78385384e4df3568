//! Descriptor exhaustion, on a real `streamfarm serve` whose descriptor limit is lowered with
//! `prlimit` (skipped where `prlimit` is missing): a flood of WebSocket clients and of silent TCP
//! connections leaves `/healthz` answering, because the node caps streams below its descriptor
//! limit and keeps a pool of slots for plain HTTP in which the oldest connection gives way.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use streamfarm_localfarm::{ProcessGuard, free_port};

/// The descriptor limit the node runs under: room for 300 - 128 (kept) - 64 (HTTP) = 108 streams.
const NOFILE: u32 = 300;

fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Opens a WebSocket by hand; returns the socket once the node answered the upgrade.
fn websocket(addr: SocketAddr) -> Option<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET /stream HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    head.starts_with(b"HTTP/1.1 101").then_some(stream)
}

#[test]
fn a_flood_of_connections_leaves_healthz_answering() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("prlimit not found: skipped");
        return;
    }
    let listen = free_port(IpAddr::from([127, 0, 0, 1])).unwrap();
    let mut command = Command::new("prlimit");
    command.arg(format!("--nofile={NOFILE}:{NOFILE}")).args([
        env!("CARGO_BIN_EXE_streamfarm"),
        "serve",
        "--name",
        "fds",
        "--listen",
        &listen.to_string(),
        // Clients here send nothing: keep them, so the flood lasts.
        "--heartbeat-interval-ms",
        "20000",
        "--heartbeat-timeout-ms",
        "60000",
    ]);
    let mut node = ProcessGuard::spawn(command, "node fds").unwrap();
    let start = Instant::now();
    while get(listen, "/healthz").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // More WebSockets than the node has descriptors, and silent connections besides.
    let mut streams = Vec::new();
    for _ in 0..NOFILE + 50 {
        if let Some(ws) = websocket(listen) {
            streams.push(ws);
        }
    }
    let mut silent = Vec::new();
    for _ in 0..NOFILE {
        if let Ok(tcp) = TcpStream::connect_timeout(&listen, Duration::from_millis(500)) {
            silent.push(tcp);
        }
    }
    let asked = Instant::now();
    let health = get(listen, "/healthz");
    let took = asked.elapsed();
    let metrics = get(listen, "/metrics").unwrap_or_default();
    node.kill();
    let health = health.expect("/healthz answers during the flood");
    assert!(health.starts_with("HTTP/1.0 200"), "{health}");
    let connections: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("streamfarm_connections "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the connections gauge");
    println!(
        "{} upgrades answered, {} silent connections; node held {connections} streams under nofile {NOFILE}; /healthz in {took:?}",
        streams.len(),
        silent.len()
    );
    assert!(
        connections <= u64::from(NOFILE - 128 - 64),
        "{connections} streams held"
    );
    assert!(connections > 50, "streams were served: {connections}");
}
