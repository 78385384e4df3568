//! TLS for `wss://` and `https://` farms: rustls (ring provider), the server's certificate
//! checked against the Mozilla roots (`webpki-roots`) or, with [`ClientOptions::ca_file`], only
//! against the given CA certificates (a private CA).
//!
//! [`ClientOptions::ca_file`]: crate::ClientOptions::ca_file

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::error::Error;

/// The TLS settings of a client: which roots it trusts.
#[derive(Clone)]
pub struct TlsSettings(Arc<ClientConfig>);

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSettings")
    }
}

impl Default for TlsSettings {
    /// The Mozilla root certificates.
    fn default() -> Self {
        static DEFAULT: OnceLock<Arc<ClientConfig>> = OnceLock::new();
        TlsSettings(
            DEFAULT
                .get_or_init(|| {
                    let roots = RootCertStore {
                        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                    };
                    config(roots)
                })
                .clone(),
        )
    }
}

impl TlsSettings {
    /// Trusts only the CA certificates of a PEM file.
    pub fn from_ca_file(path: &Path) -> Result<Self, Error> {
        let invalid = |detail: String| Error::Tls {
            detail: format!("{}: {detail}", path.display()),
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|err| invalid(err.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|err| invalid(format!("not PEM certificates: {err}")))?;
        if certs.is_empty() {
            return Err(invalid("no certificate in it".into()));
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|err| invalid(format!("not a usable CA certificate: {err}")))?;
        }
        Ok(TlsSettings(config(roots)))
    }

    pub(crate) fn config(&self) -> Arc<ClientConfig> {
        self.0.clone()
    }
}

fn config(roots: RootCertStore) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A connection to a node: plain TCP, or TLS over TCP.
#[derive(Debug)]
pub(crate) enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens TLS over `tcp` to `host`, checking its certificate.
pub(crate) async fn connect(
    settings: &TlsSettings,
    host: &str,
    tcp: TcpStream,
) -> std::io::Result<ClientStream> {
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
    let connector = tokio_rustls::TlsConnector::from(settings.config());
    let stream = connector.connect(name, tcp).await?;
    Ok(ClientStream::Tls(Box::new(stream)))
}

/// What was wrong with a server's certificate, as the client's errors name it: the likely cause
/// and what fixes it (`Display`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertificateProblem {
    /// The server presented a CA certificate as its own: typically a self-signed certificate
    /// (`openssl req -x509` marks it as a CA), which is refused even when `--ca-file` names it.
    SelfSigned,
    /// The certificate is not signed by a CA this client trusts: a private CA not given with
    /// `--ca-file` ([`TlsSettings::from_ca_file`]), another farm's CA (also when it bears the
    /// name of a trusted one: webpki's `BadSignature`), or a self-signed certificate.
    UnknownIssuer,
    /// The certificate does not name the host the client dialed.
    WrongName {
        /// The host dialed.
        host: String,
        /// The names the certificate holds (when known).
        names: Vec<String>,
    },
    /// The certificate has expired.
    Expired,
    /// The certificate is not valid yet (or this machine's clock is behind).
    NotValidYet,
    /// Something else the verifier refused; its words.
    Other(String),
}

impl std::fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertificateProblem::SelfSigned => f.write_str(
                "it is a CA certificate used as the server's own, as a self-signed certificate is \
                 (CaUsedAsEndEntity): give the node a certificate signed by a CA \
                 (`streamfarm cert ca` and `streamfarm cert node`) and the client that CA's \
                 certificate (--ca-file)",
            ),
            CertificateProblem::UnknownIssuer => f.write_str(
                "it is not signed by a CA this client trusts (UnknownIssuer, or BadSignature for \
                 a CA of the same name): a private CA not given, another farm's CA, or a \
                 self-signed certificate; give the client the CA certificate that signed it \
                 (--ca-file)",
            ),
            CertificateProblem::WrongName { host, names } if names.is_empty() => write!(
                f,
                "it does not name {host} (NotValidForName): make one that does \
                 (`streamfarm cert node NAME --host {host}`) or dial a name it holds"
            ),
            CertificateProblem::WrongName { host, names } => write!(
                f,
                "it names {} but not {host} (NotValidForName): make one that does \
                 (`streamfarm cert node NAME --host {host}`) or dial a name it holds",
                names.join(", ")
            ),
            CertificateProblem::Expired => {
                f.write_str("it has expired (Expired): the node needs a new certificate")
            }
            CertificateProblem::NotValidYet => f.write_str(
                "it is not valid yet (NotValidYet): check this machine's clock and the \
                 certificate's start date",
            ),
            CertificateProblem::Other(detail) => write!(f, "{detail}"),
        }
    }
}

/// The certificate problem behind a failed TLS handshake to `host`, if that is why it failed.
pub(crate) fn certificate_problem(
    error: &std::io::Error,
    host: &str,
) -> Option<CertificateProblem> {
    use rustls::CertificateError as Cert;
    let rustls::Error::InvalidCertificate(cert) =
        error.get_ref()?.downcast_ref::<rustls::Error>()?
    else {
        return None;
    };
    Some(match cert {
        // A trusted CA of the issuer's name whose key did not sign it: another CA, same name.
        Cert::UnknownIssuer | Cert::BadSignature => CertificateProblem::UnknownIssuer,
        Cert::NotValidForName => CertificateProblem::WrongName {
            host: host.to_string(),
            names: Vec::new(),
        },
        Cert::NotValidForNameContext { presented, .. } => CertificateProblem::WrongName {
            host: host.to_string(),
            names: presented.iter().map(|name| plain_name(name)).collect(),
        },
        Cert::Expired | Cert::ExpiredContext { .. } => CertificateProblem::Expired,
        Cert::NotValidYet | Cert::NotValidYetContext { .. } => CertificateProblem::NotValidYet,
        Cert::Other(other)
            if matches!(
                other.0.downcast_ref::<webpki::Error>(),
                Some(webpki::Error::CaUsedAsEndEntity)
            ) =>
        {
            CertificateProblem::SelfSigned
        }
        other => CertificateProblem::Other(other.to_string()),
    })
}

/// A name as webpki presents it (`DnsName("n1")`, `IpAddress(127.0.0.1)`), as people write it.
fn plain_name(presented: &str) -> String {
    presented
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .map(|inner| inner.trim_matches('"'))
        .unwrap_or(presented)
        .to_string()
}
