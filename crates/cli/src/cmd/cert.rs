//! `streamfarm cert ca DIR` and `streamfarm cert node NAME --host H... DIR`: a private CA, and
//! node certificates signed by it, made with rcgen.
//!
//! A node certificate serves both of a node's TLS roles: clients dialing it (`wss://`,
//! `https://`, trusting the CA with `--ca-file`), and the relay between nodes, where a peer's
//! certificate must chain to `relay_ca_file` and name the peer by a DNS subject alternative name
//! equal to its node name, in both directions with `relay_mtls` (docs/AUTH.md §3). So it holds
//! the node's name as a DNS name beside every `--host`, and may be used for server and client
//! authentication. Keys are ECDSA P-256. Private keys are written 0600, in a directory made
//! 0700, and no existing file is ever overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Arguments of `streamfarm cert`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Make a private CA: DIR/ca.pem, its certificate (clients' --ca-file, nodes'
    /// --relay-ca-file), and DIR/ca.key, its private key (0600; keep it off the nodes).
    Ca(CaArgs),
    /// Make the certificate of node NAME, signed by the CA in DIR: DIR/NAME.pem (--tls-cert) and
    /// DIR/NAME.key (--tls-key, 0600). It names NAME (for the relay between nodes) and every
    /// --host (the addresses and names clients dial).
    Node(NodeArgs),
}

#[derive(Debug, clap::Args)]
struct CaArgs {
    /// Where to write ca.pem and ca.key (made if missing).
    dir: PathBuf,
    /// How long the CA is valid, in days.
    #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// The node's name, as given to `streamfarm serve --name`: a DNS name (letters, digits,
    /// `-`, `.`), which peers check on relay links.
    name: String,
    /// An IP address or DNS name clients dial this node by (repeat, or separate with commas).
    #[arg(long = "host", value_name = "HOST", value_delimiter = ',')]
    hosts: Vec<String>,
    /// The directory of the CA (ca.pem, ca.key), where the node's files are written too.
    dir: PathBuf,
    /// How long the certificate is valid, in days.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.what {
        What::Ca(args) => make_ca(&args)?,
        What::Node(args) => make_node(&args)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn make_ca(args: &CaArgs) -> anyhow::Result<()> {
    let (cert_path, key_path) = (args.dir.join(CA_CERT), args.dir.join(CA_KEY));
    refuse_existing(&[&cert_path, &key_path])?;
    let mut params = CertificateParams::default();
    // A name of its own: a client trusting several CAs finds a certificate's issuer by name.
    params.distinguished_name = name(&format!("streamfarm CA {:08x}", rand::random::<u32>()));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, args.days);
    let key = KeyPair::generate().context("generating the CA key")?;
    let cert = params
        .self_signed(&key)
        .context("signing the CA certificate")?;
    make_dir(&args.dir)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    println!(
        "wrote {}: the CA certificate, for clients (--ca-file) and nodes (--relay-ca-file)",
        cert_path.display()
    );
    println!(
        "wrote {}: the CA's private key (0600), for `streamfarm cert node`; keep it off the nodes",
        key_path.display()
    );
    Ok(())
}

fn make_node(args: &NodeArgs) -> anyhow::Result<()> {
    rustls_pki_types::DnsName::try_from(args.name.as_str()).map_err(|_| {
        anyhow::anyhow!(
            "node name {:?} is not a DNS name (letters, digits, '-' and '.'): peers check it on \
             relay links, so give the node such a name (`streamfarm serve --name`)",
            args.name
        )
    })?;
    let mut names = vec![args.name.clone()];
    for host in &args.hosts {
        let host = host.trim();
        let valid = host.parse::<std::net::IpAddr>().is_ok()
            || rustls_pki_types::DnsName::try_from(host).is_ok();
        if !valid {
            bail!("--host {host:?}: neither an IP address nor a DNS name");
        }
        if !names.iter().any(|n| n.eq_ignore_ascii_case(host)) {
            names.push(host.to_string());
        }
    }
    let (cert_path, key_path) = (
        args.dir.join(format!("{}.pem", args.name)),
        args.dir.join(format!("{}.key", args.name)),
    );
    refuse_existing(&[&cert_path, &key_path])?;
    let ca_cert_path = args.dir.join(CA_CERT);
    let ca_key_path = args.dir.join(CA_KEY);
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read {} (make a CA first: `streamfarm cert ca {}`)",
                path.display(),
                args.dir.display()
            )
        })
    };
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?)
        .with_context(|| format!("{}: not a PEM private key", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert_path)?, ca_key)
        .with_context(|| format!("{}: not a PEM certificate", ca_cert_path.display()))?;

    let mut params = CertificateParams::new(names.clone())
        .with_context(|| format!("subject alternative names {names:?}"))?;
    params.distinguished_name = name(&args.name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, args.days);
    let key = KeyPair::generate().context("generating the node key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the node certificate")?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    println!(
        "wrote {}: the certificate of node {} for {} (--tls-cert)",
        cert_path.display(),
        args.name,
        names.join(", ")
    );
    println!(
        "wrote {}: its private key (0600, --tls-key)",
        key_path.display()
    );
    Ok(())
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// From a few minutes ago (clocks differ a little) to `days` from now.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(days.into());
}

fn refuse_existing(paths: &[&Path]) -> anyhow::Result<()> {
    for path in paths {
        if path.exists() {
            bail!(
                "{} exists: not overwriting it (remove it, or choose another directory)",
                path.display()
            );
        }
    }
    Ok(())
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot make {}", dir.display()))
}

/// Writes a file that must not exist yet, with `mode` from the start (a private key is never
/// readable by others, not even for a moment).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sf-cert-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn private_keys_are_written_0600_and_nothing_is_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = dir("modes");
        make_ca(&CaArgs {
            dir: dir.clone(),
            days: 1,
        })
        .unwrap();
        let node = NodeArgs {
            name: "n1".into(),
            hosts: vec!["127.0.0.1".into(), "push.example.com".into()],
            dir: dir.clone(),
            days: 1,
        };
        make_node(&node).unwrap();
        let mode = |file: &str| {
            std::fs::metadata(dir.join(file))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("n1.key"), 0o600);
        assert_eq!(mode("n1.pem"), 0o644);
        let again = make_node(&node).unwrap_err().to_string();
        assert!(again.contains("n1.pem exists"), "{again}");
        let again = make_ca(&CaArgs {
            dir: dir.clone(),
            days: 1,
        })
        .unwrap_err()
        .to_string();
        assert!(again.contains("ca.pem exists"), "{again}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_names_and_a_missing_ca_are_explained() {
        let dir = dir("bad");
        let node = |name: &str, host: &str| NodeArgs {
            name: name.into(),
            hosts: vec![host.into()],
            dir: dir.clone(),
            days: 1,
        };
        let err = make_node(&node("n 1", "127.0.0.1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a DNS name"), "{err}");
        let err = make_node(&node("n1", "a b")).unwrap_err().to_string();
        assert!(err.contains("--host \"a b\""), "{err}");
        let err = format!("{:#}", make_node(&node("n1", "127.0.0.1")).unwrap_err());
        assert!(err.contains("streamfarm cert ca"), "{err}");
    }
}
