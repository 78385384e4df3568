//! TLS for clients (`wss://`, `https://`) and for the relay links between nodes: rustls with the
//! ring provider, certificates reloaded from disk without a restart.
//!
//! - [`load`] reads a PEM certificate chain and its private key and checks that they belong
//!   together.
//! - [`Reloading`] is the node's certificate: it hands every new handshake the certificate of the
//!   moment, as a server and, with mutual TLS, as a relay dialer. [`watch`] looks at the two
//!   files every `tls_reload_ms` and, when either changed, loads them again; a pair that does not
//!   load (half written, mismatched, garbage) is logged and the old certificate stays in use
//!   until the files change again.
//! - Relay links of a TLS node are TLS too (`wss://`). How a dialer trusts the peer it reaches
//!   ([`relay_dialer`]): with `relay_ca_file`, the peer's certificate must chain to it and name
//!   the peer; without, any certificate is taken and the farm secret's handshake authenticates
//!   the link, bound to the TLS session by [`binding`] (keying material exported from it), so a
//!   man in the middle, holding two TLS sessions, cannot pass the handshake through.
//! - [`TlsInfo`] is what a request knows of its connection: the binding and, with mutual TLS,
//!   the client certificate that the handshake verified ([`TlsInfo::names`]).
//!
//! The listener that runs the handshakes, under the request-head deadline, is `listener`'s.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, ConnectionCommon, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

/// The label of the keying material that binds a relay handshake to its TLS session (RFC 5705).
const BINDING_LABEL: &[u8] = b"EXPORTER-streamfarm-relay-link";

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

impl ResolvesClientCert for Reloading {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the CA certificates of a PEM file.
pub(crate) fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|err| format!("{}: not PEM certificates: {err}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|err| format!("{}: not a usable CA certificate: {err}", path.display()))?;
    }
    Ok(roots)
}

/// The server's TLS settings, serving whatever `resolver` holds. With `client_roots` (mutual TLS
/// on relay links) a client may present a certificate, which must then chain to them; clients
/// without one (browsers, applications) are served as before, and the relay endpoint is what
/// refuses a peer without one. HTTP/1.1 only: WebSocket upgrades are HTTP/1.1's.
pub(crate) fn server_config(
    resolver: Arc<Reloading>,
    client_roots: Option<RootCertStore>,
) -> Result<Arc<ServerConfig>, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|err| format!("relay_ca_file: {err}"))?,
        ),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How a node dials the `wss://` relay endpoints of its peers.
#[derive(Clone)]
pub(crate) struct RelayDialer {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for RelayDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayDialer")
    }
}

/// The TLS settings of relay dials: peers' certificates checked against `roots` (by the peer's
/// node name), or taken as they are when there are none (see the module docs); this node's own
/// certificate presented when `own` is given (mutual TLS).
pub(crate) fn relay_dialer(
    roots: Option<RootCertStore>,
    own: Option<Arc<Reloading>>,
) -> Result<RelayDialer, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?;
    let builder = match roots {
        Some(roots) => builder.with_root_certificates(roots),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(
                provider().signature_verification_algorithms,
            ))),
    };
    let mut config = match own {
        Some(own) => builder.with_client_cert_resolver(own),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(RelayDialer {
        config: Arc::new(config),
    })
}

impl RelayDialer {
    /// Opens TLS to peer `name` over `tcp`, and the session's binding.
    pub(crate) async fn connect(
        &self,
        name: &str,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<(
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        Vec<u8>,
    )> {
        let invalid = |err: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, err);
        let server = ServerName::try_from(name.to_string())
            .map_err(|err| invalid(format!("node name {name:?} as a TLS name: {err}")))?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let stream = connector.connect(server, tcp).await?;
        let bound = binding(stream.get_ref().1).map_err(invalid)?;
        Ok((stream, bound))
    }
}

/// Keying material exported from a TLS session: both ends of one session compute the same, two
/// sessions (a man in the middle) differ.
pub(crate) fn binding<Data>(connection: &ConnectionCommon<Data>) -> Result<Vec<u8>, String> {
    connection
        .export_keying_material(vec![0u8; 32], BINDING_LABEL, None)
        .map_err(|err| format!("no keying material from the TLS session: {err}"))
}

/// What a request knows of its TLS connection.
#[derive(Debug, Clone)]
pub(crate) struct TlsInfo {
    /// See [`binding`].
    pub(crate) binding: Vec<u8>,
    /// The client's certificate, verified by the handshake (mutual TLS only).
    pub(crate) client_certificate: Option<CertificateDer<'static>>,
}

impl TlsInfo {
    pub(crate) fn of(connection: &rustls::ServerConnection) -> Result<Self, String> {
        Ok(TlsInfo {
            binding: binding(connection)?,
            client_certificate: connection
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| cert.clone().into_owned()),
        })
    }

    /// Whether the client's verified certificate names node `name`.
    pub(crate) fn names(&self, name: &str) -> bool {
        let (Some(cert), Ok(name)) = (&self.client_certificate, ServerName::try_from(name)) else {
            return false;
        };
        webpki::EndEntityCert::try_from(cert)
            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
    }
}

/// A server certificate verifier that takes any certificate, still checking that the server
/// holds its key (the handshake signature). Used only where something else authenticates the
/// peer: the farm secret's handshake, bound to the session (see the module docs).
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
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
