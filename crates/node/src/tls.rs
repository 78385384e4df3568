//! TLS for clients (`wss://`, `https://`): rustls with the ring provider, certificates reloaded
//! from disk without a restart.
//!
//! - [`load`] reads a PEM certificate chain and its private key and checks that they belong
//!   together.
//! - [`Reloading`] is the server's certificate resolver: it hands every new handshake the
//!   certificate of the moment. [`watch`] looks at the two files every `tls_reload_ms` and, when
//!   either changed, loads them again; a pair that does not load (half written, mismatched,
//!   garbage) is logged and the old certificate stays in use until the files change again.
//! - [`split_listener`] feeds `axum::serve`: a task accepts TCP connections and runs each TLS
//!   handshake in a task of its own under a deadline, so a client that stalls in its handshake
//!   holds up neither the accept loop nor other clients.
//!
//! Relay links between nodes stay plain WebSocket on the same port (their protection is the farm
//! secret's business): a connection whose first byte is not a TLS handshake is served the relay
//! endpoint only, and every other path answers that this node speaks TLS.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 1024;
/// Connections through their handshake and not yet taken by the HTTP server.
const READY_QUEUE: usize = 1024;

/// Reads a PEM certificate chain and private key, and checks that the key is the certificate's.
pub(crate) fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|err| format!("cannot read {}: {err}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|err| format!("{}: not a PEM certificate chain: {err}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|err| format!("{}: not a PEM private key: {err}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, private, &provider).map_err(|err| {
        format!(
            "{} and {} do not make a usable pair: {err}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// The certificate every new handshake gets: the last pair that loaded.
#[derive(Debug)]
pub(crate) struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

impl Reloading {
    fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
    }
}

/// The server's TLS settings, serving whatever `resolver` holds. HTTP/1.1 only: WebSocket
/// upgrades are HTTP/1.1's.
pub(crate) fn server_config(resolver: Arc<Reloading>) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// What the files were when last looked at: changes in either are reloaded.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Loads the pair and starts watching it; the returned resolver always holds a usable pair.
pub(crate) fn start_reloading(
    cert: PathBuf,
    key: PathBuf,
    every: Duration,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<Arc<Reloading>, String> {
    let first = load(&cert, &key)?;
    let resolver = Arc::new(Reloading {
        current: RwLock::new(first),
    });
    tracker.spawn(watch(resolver.clone(), cert, key, every, cancel));
    Ok(resolver)
}

/// Reloads the pair whenever either file changes; a pair that does not load leaves the old one.
async fn watch(
    resolver: Arc<Reloading>,
    cert: PathBuf,
    key: PathBuf,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut seen = (stamp(&cert), stamp(&key));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = (stamp(&cert), stamp(&key));
        if now == seen {
            continue;
        }
        seen = now;
        let (cert, key) = (cert.clone(), key.clone());
        let loaded = tokio::task::spawn_blocking(move || load(&cert, &key)).await;
        match loaded {
            Ok(Ok(pair)) => {
                resolver.set(pair);
                info!("TLS certificate reloaded");
            }
            Ok(Err(problem)) => {
                error!(problem = %problem, "new TLS certificate not loaded; still serving the previous one");
            }
            Err(err) => error!(error = %err, "TLS reload task failed"),
        }
    }
}

/// A listener fed by the accept loop of [`split_listener`]: connections come out of it ready.
pub(crate) struct ChannelListener<Io> {
    ready_rx: mpsc::Receiver<(Io, std::net::SocketAddr)>,
    local_addr: std::net::SocketAddr,
}

/// Accepts on `listener` until `cancel` and sorts the connections by their first byte: a TLS
/// handshake (`0x16`) is run under its deadline and comes out of the first listener; anything
/// else (plain HTTP: the relay links of peer nodes, which stay as they are) comes out of the
/// second. A client silent for the handshake deadline is dropped.
pub(crate) fn split_listener(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<(
    ChannelListener<TlsStream<TcpStream>>,
    ChannelListener<TcpStream>,
)> {
    let local_addr = listener.local_addr()?;
    let (tls_tx, tls_rx) = mpsc::channel(READY_QUEUE);
    let (plain_tx, plain_rx) = mpsc::channel(READY_QUEUE);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let tasks = tracker.clone();
    tracker.spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors and the like: wait a little, as axum does.
                        warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if let Err(err) = tcp.set_nodelay(true) {
                warn!(error = %err, "cannot set TCP_NODELAY");
            }
            let acceptor = acceptor.clone();
            let (tls_tx, plain_tx) = (tls_tx.clone(), plain_tx.clone());
            let cancel = cancel.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let sorted = async {
                    let mut first = [0u8; 1];
                    match tcp.peek(&mut first).await {
                        Ok(1) if first[0] == 0x16 => acceptor.accept(tcp).await.map(Ok),
                        Ok(_) => Ok(Err(tcp)),
                        Err(err) => Err(err),
                    }
                };
                let result = tokio::select! {
                    _ = cancel.cancelled() => return,
                    result = tokio::time::timeout(HANDSHAKE_TIMEOUT, sorted) => result,
                };
                match result {
                    Ok(Ok(Ok(tls))) => {
                        let _ = tls_tx.send((tls, peer)).await;
                    }
                    Ok(Ok(Err(plain))) => {
                        let _ = plain_tx.send((plain, peer)).await;
                    }
                    Ok(Err(err)) => debug!(peer = %peer, error = %err, "TLS handshake failed"),
                    Err(_) => debug!(peer = %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    Ok((
        ChannelListener {
            ready_rx: tls_rx,
            local_addr,
        },
        ChannelListener {
            ready_rx: plain_rx,
            local_addr,
        },
    ))
}

impl<Io> axum::serve::Listener for ChannelListener<Io>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Io = Io;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready_rx.recv().await {
            Some(ready) => ready,
            // The accept loop stopped: the node is shutting down, and the server stops asking.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
