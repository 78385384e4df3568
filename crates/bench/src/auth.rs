//! The cost of tokens and TLS (`docs/AUTH.md`): one node, run three ways — `open` (no keys, plain
//! `ws://`), `tokens` (an HS256 key: every connection presents a JWT, checked by the node), and
//! `tokens+tls` (the same over `wss://`, a certificate made here with rcgen) — and in each:
//!
//! - **connect**: C clients open their connection (TCP, TLS, upgrade with the token in the
//!   `Authorization` header, `hello` + `farm`) and subscribe, 32 at a time: connects/s, and the
//!   node's CPU per connect;
//! - **fan-out**: S of them subscribed to one topic, a publisher (a WebSocket with a token that
//!   may publish) sends M messages of 64 B as fast as it can; deliveries/s until every subscriber
//!   has every message, and the node's CPU per delivery.
//!
//! nats-server runs the same three ways with its own means (`--auth` token, `--tls`), when it is
//! installed.
//!
//! The bench process is the clients too (and decrypts their TLS), so it competes with the node
//! for the two cores: read the figures side by side, as ratios, not as the node's ceiling
//! (`fanout` measures that).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use streamfarm_core::time::unix_ms;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::proc::{Guard, NodeProc, NodeSpec, cpu_seconds, free_port, poll};
use crate::report::{RowBuilder, Section};
use crate::wire::{CONNECT_TIMEOUT, payload, tcp};
use crate::{NATS, Options, STREAMFARM, ratio};

const TOPIC: &str = "auth.bench";
const SECRET: &str = "bench-hs256-secret-0123456789-0123456789";
/// Connections opened at once in the connect phase.
const CONCURRENCY: usize = 32;
/// How long the fan-out may take before it counts as failed.
const FANOUT_LIMIT: Duration = Duration::from_secs(120);

/// A byte stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Ws = WebSocketStream<Box<dyn Io>>;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Open,
    Tokens,
    TokensTls,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Open => "open",
            Mode::Tokens => "tokens",
            Mode::TokensTls => "tokens+tls",
        }
    }
}

/// What the clients need to reach the node in one mode.
#[derive(Clone)]
struct Reach {
    addr: SocketAddr,
    token: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Section> {
    let dir = std::env::temp_dir().join(format!("streamfarm-bench-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let files = Files::make(&dir)?;
    let clients = if options.quick { 40 } else { 2000 };
    let subscribers = options.subscribers.min(clients);
    let messages = if options.quick { 50 } else { 1000 };
    let mut section = Section::default();
    let mut rows = Vec::new();
    for mode in [Mode::Open, Mode::Tokens, Mode::TokensTls] {
        let mut row = RowBuilder::default();
        for _ in 0..options.repeats {
            let result = one_run(options, &files, mode, clients, subscribers, messages).await;
            let (connects_per_s, cpu_per_connect, deliveries_per_s, cpu_per_delivery) =
                result.with_context(|| format!("mode {}", mode.name()))?;
            row.add("connects_per_s", connects_per_s);
            row.add("deliveries_per_s", deliveries_per_s);
            // CPU time is counted in ticks of 10 ms: a phase shorter than one reads 0, which
            // says nothing.
            if cpu_per_connect > 0.0 {
                row.add("server_cpu_us_per_connect", cpu_per_connect * 1e6);
            }
            if cpu_per_delivery > 0.0 {
                row.add("server_cpu_ns_per_delivery", cpu_per_delivery * 1e9);
            }
        }
        let row = row.build(
            STREAMFARM,
            format!(
                "{} C={clients} S={subscribers} M={messages} 64 B",
                mode.name()
            ),
        );
        rows.push(row);
    }
    if let Some(nats) = &options.nats {
        for mode in [Mode::Open, Mode::Tokens, Mode::TokensTls] {
            let mut row = RowBuilder::default();
            for _ in 0..options.repeats {
                let result =
                    nats_run(&nats.path, &files, mode, clients, subscribers, messages).await;
                let (connects_per_s, cpu_per_connect, deliveries_per_s, cpu_per_delivery) =
                    result.with_context(|| format!("nats-server, mode {}", mode.name()))?;
                row.add("connects_per_s", connects_per_s);
                row.add("deliveries_per_s", deliveries_per_s);
                if cpu_per_connect > 0.0 {
                    row.add("server_cpu_us_per_connect", cpu_per_connect * 1e6);
                }
                if cpu_per_delivery > 0.0 {
                    row.add("server_cpu_ns_per_delivery", cpu_per_delivery * 1e9);
                }
            }
            rows.push(row.build(
                NATS,
                format!(
                    "{} C={clients} S={subscribers} M={messages} 64 B",
                    mode.name()
                ),
            ));
        }
        section.notes.push(
            "nats-server: `tokens` is its --auth token (a shared secret in CONNECT, no JWT), \
             `tokens+tls` the same with --tls (TLS after INFO, as nats-server 2.9 does)"
                .to_string(),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let median = |i: usize, figure: &str| rows[i].figures.get(figure).map(|f| f.median);
    section.notes.push(format!(
        "connects/s tokens+tls / open: {}; tokens / open: {}; deliveries/s tokens+tls / open: {}",
        ratio(median(2, "connects_per_s"), median(0, "connects_per_s")),
        ratio(median(1, "connects_per_s"), median(0, "connects_per_s")),
        ratio(median(2, "deliveries_per_s"), median(0, "deliveries_per_s")),
    ));
    if rows.len() == 6 {
        section.notes.push(format!(
            "streamfarm / nats-server: connects/s open {}, tokens+tls {}; deliveries/s open {}, \
             tokens+tls {}",
            ratio(median(0, "connects_per_s"), median(3, "connects_per_s")),
            ratio(median(2, "connects_per_s"), median(5, "connects_per_s")),
            ratio(median(0, "deliveries_per_s"), median(3, "deliveries_per_s")),
            ratio(median(2, "deliveries_per_s"), median(5, "deliveries_per_s")),
        ));
    }
    section.notes.push(
        "the bench process is also every client (and decrypts their TLS) on the same cores: \
         compare the rows, not with the fanout section"
            .to_string(),
    );
    section.rows = rows;
    Ok(section)
}

/// The key and certificate files of the node, made once.
struct Files {
    secret: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    tls: Arc<rustls::ClientConfig>,
}

impl Files {
    fn make(dir: &std::path::Path) -> anyhow::Result<Files> {
        let secret = dir.join("k1.secret");
        std::fs::write(&secret, SECRET)?;
        let pair = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])?;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, pair.cert.pem())?;
        std::fs::write(&key, pair.signing_key.serialize_pem())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pair.cert.der().clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Files {
            secret,
            cert,
            key,
            tls: Arc::new(tls),
        })
    }
}

fn token(publish: bool) -> String {
    let now = unix_ms(SystemTime::now()) / 1000;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    let mut claims = serde_json::json!({"sub": "bench", "iat": now, "exp": now + 3600,
                                        "subscribe": ["auth.*"]});
    if publish {
        claims["publish"] = serde_json::json!(["auth.*"]);
    }
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&header, &claims, &key).expect("HS256 signs")
}

/// One node in `mode`: connect `clients`, fan `messages` out to `subscribers`. Returns
/// (connects/s, node CPU s per connect, deliveries/s, node CPU s per delivery).
async fn one_run(
    options: &Options,
    files: &Files,
    mode: Mode,
    clients: usize,
    subscribers: usize,
    messages: usize,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let listen = free_port(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)))?;
    let mut spec = NodeSpec::new("auth", listen);
    spec.extra
        .extend(["--max-connections".into(), (clients + 16).to_string()]);
    if mode != Mode::Open {
        spec.extra.extend([
            "--auth-key".to_string(),
            format!("k1:HS256:{}", files.secret.display()),
        ]);
    }
    if mode == Mode::TokensTls {
        spec.extra.extend([
            "--tls-cert".to_string(),
            files.cert.display().to_string(),
            "--tls-key".to_string(),
            files.key.display().to_string(),
        ]);
    }
    let node = NodeProc::start(&options.exe, &spec).await?;
    let reach = Reach {
        addr: listen,
        token: (mode != Mode::Open).then(|| token(false)),
        tls: (mode == Mode::TokensTls).then(|| files.tls.clone()),
    };

    // Connect phase.
    let cpu_before = cpu_seconds(node.pid())?;
    let started = Instant::now();
    let mut conns = Vec::with_capacity(clients);
    let mut pending = futures_util::stream::iter((0..clients).map(|_| {
        let reach = reach.clone();
        async move {
            let mut ws = connect(&reach).await?;
            subscribe(&mut ws).await?;
            anyhow::Ok(ws)
        }
    }))
    .buffer_unordered(CONCURRENCY);
    while let Some(conn) = pending.next().await {
        conns.push(conn?);
    }
    drop(pending);
    let connect_secs = started.elapsed().as_secs_f64();
    let connect_cpu = cpu_seconds(node.pid())? - cpu_before;

    // Fan-out phase: the first `subscribers` connections count their messages; the rest idle.
    let mut publisher = connect(&Reach {
        token: (mode != Mode::Open).then(|| token(true)),
        ..reach.clone()
    })
    .await?;
    let mut counters = Vec::new();
    for mut ws in conns.drain(..subscribers) {
        counters.push(tokio::spawn(async move {
            let mut got = 0;
            while got < messages {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) if text.contains("\"msg\"") => got += 1,
                    Some(Ok(Message::Text(text))) if text.contains("\"ping\"") => {
                        let pong = text.replace("\"ping\"", "\"pong\"");
                        ws.send(Message::text(pong)).await?;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(anyhow::Error::from(err)),
                    None => bail!("connection ended after {got} messages"),
                }
            }
            anyhow::Ok(ws)
        }));
    }
    let cpu_before = cpu_seconds(node.pid())?;
    let started = Instant::now();
    for seq in 0..messages {
        let frame =
            serde_json::json!({"type": "pub", "topic": TOPIC, "data": payload(seq as u64, 64)});
        publisher.feed(Message::text(frame.to_string())).await?;
        if seq % 64 == 63 {
            publisher.flush().await?;
        }
    }
    publisher.flush().await?;
    let all = futures_util::future::join_all(counters);
    let results = tokio::time::timeout(FANOUT_LIMIT, all)
        .await
        .context("fan-out did not finish in time")?;
    let fanout_secs = started.elapsed().as_secs_f64();
    let fanout_cpu = cpu_seconds(node.pid())? - cpu_before;
    for result in results {
        result??;
    }
    drop(conns);
    drop(node);
    let deliveries = (subscribers * messages) as f64;
    Ok((
        clients as f64 / connect_secs,
        connect_cpu / clients as f64,
        deliveries / fanout_secs,
        fanout_cpu / deliveries,
    ))
}

/// Opens the node's stream the way `reach` says, and reads `hello` and `farm`.
async fn connect(reach: &Reach) -> anyhow::Result<Ws> {
    let attempt = async {
        let tcp = tcp(reach.addr, None).await?;
        let (stream, scheme): (Box<dyn Io>, &str) = match &reach.tls {
            Some(config) => {
                let name = rustls_pki_types::ServerName::IpAddress(reach.addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await?;
                (Box::new(tls), "wss")
            }
            None => (Box::new(tcp), "ws"),
        };
        let mut request = format!("{scheme}://{}/stream", reach.addr).into_client_request()?;
        if let Some(token) = &reach.token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
        for expected in ["\"hello\"", "\"farm\""] {
            match ws.next().await {
                Some(Ok(Message::Text(text))) if text.contains(expected) => {}
                other => bail!("expected {expected}, got {other:?}"),
            }
        }
        anyhow::Ok(ws)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .context("connect timed out")?
}

async fn subscribe(ws: &mut Ws) -> anyhow::Result<()> {
    let frame = serde_json::json!({"type": "sub", "topics": [TOPIC]}).to_string();
    ws.send(Message::text(frame)).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.contains("\"subscribed\"") => return Ok(()),
            Some(Ok(Message::Text(text))) if text.contains("\"error\"") => bail!("{text}"),
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(err.into()),
            None => bail!("connection ended while subscribing"),
        }
    }
}

/// The token nats-server is given with `--auth` in the token modes.
const NATS_TOKEN: &str = "bench-nats-token-0123456789";

/// [`one_run`] against nats-server, with its own means: `--auth` token, `--tls`.
async fn nats_run(
    bin: &std::path::Path,
    files: &Files,
    mode: Mode,
    clients: usize,
    subscribers: usize,
    messages: usize,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    let addr = free_port(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)))?;
    let mut command = std::process::Command::new(bin);
    command
        .args(["-a", &addr.ip().to_string()])
        .args(["-p", &addr.port().to_string()]);
    if mode != Mode::Open {
        command.args(["--auth", NATS_TOKEN]);
    }
    if mode == Mode::TokensTls {
        command
            .arg("--tls")
            .args(["--tlscert", &files.cert.display().to_string()])
            .args(["--tlskey", &files.key.display().to_string()]);
    }
    let mut guard = Guard::spawn(command, format!("nats-server ({addr}, {})", mode.name()))?;
    let reach = Reach {
        addr,
        token: (mode != Mode::Open).then(|| NATS_TOKEN.to_string()),
        tls: (mode == Mode::TokensTls).then(|| files.tls.clone()),
    };
    guard.check_alive()?;
    let probe = reach.clone();
    poll(
        "nats-server greets",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let probe = probe.clone();
            async move { nats_connect(&probe).await.ok().map(|_| ()) }
        },
    )
    .await?;
    let pid = guard.pid();

    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let mut conns = Vec::with_capacity(clients);
    let mut pending = futures_util::stream::iter((0..clients).map(|_| {
        let reach = reach.clone();
        async move {
            let mut conn = nats_connect(&reach).await?;
            conn.write_all(format!("SUB {TOPIC} 1\r\nPING\r\n").as_bytes())
                .await?;
            conn.flush().await?;
            nats_pong(&mut conn).await?;
            anyhow::Ok(conn)
        }
    }))
    .buffer_unordered(CONCURRENCY);
    while let Some(conn) = pending.next().await {
        conns.push(conn?);
    }
    drop(pending);
    let connect_secs = started.elapsed().as_secs_f64();
    let connect_cpu = cpu_seconds(pid)? - cpu_before;

    let mut publisher = nats_connect(&reach).await?;
    let mut counters = Vec::new();
    for mut conn in conns.drain(..subscribers) {
        counters.push(tokio::spawn(async move {
            let mut got = 0;
            let mut line = String::new();
            while got < messages {
                line.clear();
                if conn.read_line(&mut line).await? == 0 {
                    bail!("connection ended after {got} messages");
                }
                if line.starts_with("MSG ") {
                    line.clear();
                    conn.read_line(&mut line).await?;
                    got += 1;
                } else if line.starts_with("PING") {
                    conn.write_all(b"PONG\r\n").await?;
                    conn.flush().await?;
                }
            }
            anyhow::Ok(conn)
        }));
    }
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    for seq in 0..messages {
        let data = payload(seq as u64, 64);
        publisher
            .write_all(format!("PUB {TOPIC} {}\r\n{data}\r\n", data.len()).as_bytes())
            .await?;
        if seq % 64 == 63 {
            publisher.flush().await?;
        }
    }
    publisher.flush().await?;
    let all = futures_util::future::join_all(counters);
    let results = tokio::time::timeout(FANOUT_LIMIT, all)
        .await
        .context("fan-out did not finish in time")?;
    let fanout_secs = started.elapsed().as_secs_f64();
    let fanout_cpu = cpu_seconds(pid)? - cpu_before;
    for result in results {
        result??;
    }
    drop(conns);
    drop(guard);
    let deliveries = (subscribers * messages) as f64;
    Ok((
        clients as f64 / connect_secs,
        connect_cpu / clients as f64,
        deliveries / fanout_secs,
        fanout_cpu / deliveries,
    ))
}

type NatsConn = BufReader<Box<dyn Io>>;

/// A NATS connection past `CONNECT` (and `PONG`): `INFO` in the clear, then TLS when `reach` has
/// it (nats-server 2.9 upgrades after `INFO`), then `CONNECT` with the token.
async fn nats_connect(reach: &Reach) -> anyhow::Result<NatsConn> {
    let attempt = async {
        let mut tcp = BufReader::new(tcp(reach.addr, None).await?);
        let mut info = String::new();
        tcp.read_line(&mut info).await?;
        if !info.starts_with("INFO ") {
            bail!("expected INFO, got {info:.80}");
        }
        if !tcp.buffer().is_empty() {
            bail!("nats-server said more than INFO before CONNECT");
        }
        let tcp = tcp.into_inner();
        let stream: Box<dyn Io> = match &reach.tls {
            Some(config) => {
                let name = rustls_pki_types::ServerName::IpAddress(reach.addr.ip().into());
                Box::new(
                    tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await?,
                )
            }
            None => Box::new(tcp),
        };
        let mut conn = BufReader::new(stream);
        let mut connect = serde_json::json!({"verbose": false, "pedantic": false,
                                             "tls_required": reach.tls.is_some()});
        if let Some(token) = &reach.token {
            connect["auth_token"] = serde_json::json!(token);
        }
        conn.write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
            .await?;
        conn.flush().await?;
        nats_pong(&mut conn).await?;
        anyhow::Ok(conn)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .context("connect timed out")?
}

/// Reads until `PONG`; an `-ERR` fails.
async fn nats_pong(conn: &mut NatsConn) -> anyhow::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            bail!("connection ended before PONG");
        }
        if line.starts_with("PONG") {
            return Ok(());
        }
        if line.starts_with("-ERR") {
            bail!("nats-server: {}", line.trim());
        }
    }
}
