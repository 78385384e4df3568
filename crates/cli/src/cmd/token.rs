//! `streamfarm token --key FILE --kid KID --sub USER [--subscribe PATTERN...] [--publish
//! PATTERN...] [--ttl 1h]`: prints a connection token (a JWT) that nodes with the key accept, in
//! every algorithm they verify: HS256 with the secret file of their `--auth-key KID:HS256:FILE`,
//! ES256 or RS256 with the private key whose public key they hold (docs/AUTH.md §1).
//!
//! The key file is read as the node reads it (`streamfarm_node::auth::read_hs256_secret`), and
//! the patterns are checked as the node checks them, so a token this prints is one the node
//! takes, up to its `aud`, `iss` and clock.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use streamfarm_node::Pattern;
use streamfarm_node::auth::{MAX_PATTERNS, MAX_TOKEN_BYTES, read_hs256_secret};

use super::sub::parse_duration;

/// Arguments of `streamfarm token`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The signing key: the secret file the nodes' `--auth-key KID:HS256:FILE` names, or the
    /// PEM private key (PKCS#8 EC P-256, or RSA) whose public key they hold.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The key's id, as in the nodes' `--auth-key KID:ALG:FILE`.
    #[arg(long)]
    kid: String,
    /// HS256, ES256 or RS256; by default HS256 for a secret, ES256 or RS256 for a PEM private
    /// key of that kind.
    #[arg(long, value_parser = parse_alg)]
    alg: Option<Algorithm>,
    /// The user (the `sub` claim).
    #[arg(long)]
    sub: String,
    /// A topic pattern the connection may subscribe to (repeat): `prices.*`, `news.**`, `**`.
    #[arg(long = "subscribe", value_name = "PATTERN")]
    subscribe: Vec<String>,
    /// A topic pattern the connection may publish on (repeat); also good for `streamfarm pub`.
    #[arg(long = "publish", value_name = "PATTERN")]
    publish: Vec<String>,
    /// How long the token is valid (e.g. `90s`, `15m`, `1h`).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: Duration,
    /// The audience (`aud`), for nodes with `--auth-audience`.
    #[arg(long)]
    aud: Option<String>,
    /// The issuer (`iss`), for nodes with `--auth-issuer`.
    #[arg(long)]
    iss: Option<String>,
}

fn parse_alg(text: &str) -> Result<Algorithm, String> {
    match text.to_ascii_uppercase().as_str() {
        "HS256" => Ok(Algorithm::HS256),
        "ES256" => Ok(Algorithm::ES256),
        "RS256" => Ok(Algorithm::RS256),
        _ => Err(format!(
            "algorithm {text:?} not supported by nodes: HS256, ES256 or RS256"
        )),
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    println!("{}", make(&args, SystemTime::now())?);
    Ok(ExitCode::SUCCESS)
}

/// The token `args` ask for, issued at `now`.
fn make(args: &Args, now: SystemTime) -> anyhow::Result<String> {
    for (claim, patterns) in [("subscribe", &args.subscribe), ("publish", &args.publish)] {
        if patterns.len() > MAX_PATTERNS {
            bail!("--{claim}: more than {MAX_PATTERNS} patterns, which nodes refuse");
        }
        for pattern in patterns {
            Pattern::parse(pattern)
                .map_err(|err| anyhow::anyhow!("--{claim} {pattern:?}: {err}"))?;
        }
    }
    if args.ttl < Duration::from_secs(1) {
        bail!("--ttl {:?}: a token must live at least a second", args.ttl);
    }
    let (alg, key) = signing_key(args)?;
    let iat = now
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?;
    let mut claims = serde_json::json!({
        "sub": args.sub,
        "iat": iat.as_secs(),
        "exp": (iat + args.ttl).as_secs(),
    });
    for (claim, patterns) in [("subscribe", &args.subscribe), ("publish", &args.publish)] {
        if !patterns.is_empty() {
            claims[claim] = serde_json::json!(patterns);
        }
    }
    for (claim, value) in [("aud", &args.aud), ("iss", &args.iss)] {
        if let Some(value) = value {
            claims[claim] = serde_json::json!(value);
        }
    }
    let mut header = Header::new(alg);
    header.kid = Some(args.kid.clone());
    let token = jsonwebtoken::encode(&header, &claims, &key)
        .with_context(|| format!("signing with {} as {alg:?}", args.key.display()))?;
    if token.len() > MAX_TOKEN_BYTES {
        bail!(
            "the token is {} bytes, more than the {MAX_TOKEN_BYTES} nodes accept: fewer patterns",
            token.len()
        );
    }
    Ok(token)
}

/// The algorithm and key of `--key` (and `--alg`).
fn signing_key(args: &Args) -> anyhow::Result<(Algorithm, EncodingKey)> {
    let path = &args.key;
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let pem = String::from_utf8_lossy(&text).contains("-----BEGIN");
    if String::from_utf8_lossy(&text).contains("PUBLIC KEY-----") {
        bail!(
            "{} holds a public key: tokens are signed with the private key, and nodes hold the \
             public one",
            path.display()
        );
    }
    let hs256 = || -> anyhow::Result<(Algorithm, EncodingKey)> {
        let secret = read_hs256_secret(path).map_err(anyhow::Error::msg)?;
        Ok((Algorithm::HS256, EncodingKey::from_secret(&secret)))
    };
    let es256 = || EncodingKey::from_ec_pem(&text).map(|key| (Algorithm::ES256, key));
    let rs256 = || EncodingKey::from_rsa_pem(&text).map(|key| (Algorithm::RS256, key));
    let not_a = |what: &str| {
        format!(
            "{} is not a PEM {what} private key (an EC key must be PKCS#8: \
             `openssl pkcs8 -topk8 -nocrypt -in KEY`)",
            path.display()
        )
    };
    match args.alg {
        Some(Algorithm::HS256) => hs256(),
        Some(Algorithm::ES256) => es256().with_context(|| not_a("EC P-256")),
        Some(Algorithm::RS256) => rs256().with_context(|| not_a("RSA")),
        Some(other) => bail!("algorithm {other:?} not supported by nodes"),
        None if pem => es256()
            .or_else(|_| rs256())
            .with_context(|| not_a("EC P-256 or RSA")),
        None => hs256(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use streamfarm_node::auth::Auth;
    use streamfarm_node::{AuthKey, NodeConfig};

    use super::*;

    fn args(key: &Path, alg: Option<Algorithm>) -> Args {
        Args {
            key: key.to_path_buf(),
            kid: "k1".into(),
            alg,
            sub: "alice".into(),
            subscribe: vec!["prices.*".into()],
            publish: vec!["chat.**".into()],
            ttl: Duration::from_secs(600),
            aud: None,
            iss: None,
        }
    }

    /// The node's own check of tokens, with one key.
    fn node_auth(kid: &str, alg: &str, file: &Path) -> Auth {
        let key: AuthKey = format!("{kid}:{alg}:{}", file.display()).parse().unwrap();
        let mut config = NodeConfig::new("t");
        config.auth_keys = vec![key];
        Auth::from_config(&config).unwrap()
    }

    #[test]
    fn tokens_of_every_algorithm_verify_against_the_node() {
        let dir = std::env::temp_dir().join(format!("sf-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("k1.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef0123\n").unwrap();
        let ec = rcgen::KeyPair::generate().unwrap();
        let (ec_key, ec_pub) = (dir.join("ec.key"), dir.join("ec.pub"));
        std::fs::write(&ec_key, ec.serialize_pem()).unwrap();
        std::fs::write(&ec_pub, ec.public_key_pem()).unwrap();
        // ring cannot generate RSA keys: a test key pair made once with `openssl genpkey`.
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let (rsa_key, rsa_pub) = (data.join("rs256-test.key"), data.join("rs256-test.pub"));
        let cases = [
            (None, "HS256", secret.clone(), secret.clone()),
            (None, "ES256", ec_key, ec_pub),
            (None, "RS256", rsa_key.clone(), rsa_pub),
            (
                Some(Algorithm::RS256),
                "RS256",
                rsa_key,
                data.join("rs256-test.pub"),
            ),
        ];
        for (alg, name, private, public) in cases {
            let token = make(&args(&private, alg), SystemTime::now()).unwrap();
            let grant = node_auth("k1", name, &public)
                .verify(&token)
                .unwrap_or_else(|err| panic!("{name}: {err:?}"));
            assert_eq!(grant.subject.as_deref(), Some("alice"), "{name}");
            assert!(grant.may_subscribe("prices.eur"), "{name}");
            assert!(!grant.may_subscribe("news.uk"), "{name}");
            assert!(grant.may_publish("chat.room.7"), "{name}");
            // Another key id is another key.
            assert!(
                node_auth("k2", name, &public).verify(&token).is_err(),
                "{name}"
            );
        }
        // An expired token is refused as expired.
        let old = SystemTime::now() - Duration::from_secs(3600);
        let token = make(&args(&secret, None), old).unwrap();
        let err = node_auth("k1", "HS256", &secret)
            .verify(&token)
            .unwrap_err();
        assert_eq!(err.close_code(), 4012, "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_keys_and_patterns_are_explained() {
        let dir = std::env::temp_dir().join(format!("sf-token-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short.secret");
        std::fs::write(&short, "too short").unwrap();
        let err = format!(
            "{:#}",
            make(&args(&short, None), SystemTime::now()).unwrap_err()
        );
        assert!(err.contains("use at least 32"), "{err}");
        let public = dir.join("ec.pub");
        std::fs::write(
            &public,
            rcgen::KeyPair::generate().unwrap().public_key_pem(),
        )
        .unwrap();
        let err = format!(
            "{:#}",
            make(&args(&public, None), SystemTime::now()).unwrap_err()
        );
        assert!(err.contains("holds a public key"), "{err}");
        let secret = dir.join("k1.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
        let mut bad = args(&secret, None);
        bad.subscribe = vec!["news.**.uk".into()];
        let err = format!("{:#}", make(&bad, SystemTime::now()).unwrap_err());
        assert!(err.contains("--subscribe \"news.**.uk\""), "{err}");
        let err = format!(
            "{:#}",
            make(&args(&missing(&dir), None), SystemTime::now()).unwrap_err()
        );
        assert!(err.contains("cannot read"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn missing(dir: &Path) -> PathBuf {
        dir.join("missing.secret")
    }
}
