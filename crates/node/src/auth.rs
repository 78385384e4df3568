//! Who may connect, subscribe and publish: connection tokens (JWT) checked locally, topic
//! patterns, and the publishers' and admin's bearer credentials (`docs/AUTH.md`).
//!
//! Every node checks a token by itself, with the keys in its config and no call to a backend, so
//! a failover never waits on an auth service. A token is a JWT signed with one of the configured
//! keys, chosen by the `kid` of its header (several keys at once, so that they rotate: add the new
//! key, issue tokens with it, remove the old one once its tokens have expired):
//!
//! ```text
//! header  {"alg":"ES256","kid":"2026-11"}
//! payload {"sub":"user-42","exp":1795327061,"iat":1795323461,
//!          "subscribe":["prices.*","news.**"],"publish":["chat.room-1"]}
//! ```
//!
//! `exp` is required; `aud` and `iss` are checked when the node is configured with them.
//! `subscribe` and `publish` list topic patterns ([`Pattern`]); a token without them may do
//! neither. (Not `sub`: that is the standard claim for the token's subject.)
//!
//! [`Auth`] is the node's policy: open (no keys: everything allowed, as before tokens existed),
//! or tokens required, with anonymous connections optionally allowed some topics. A
//! [`Grant`] is what one connection may do; the session keeps it and checks every `sub` and
//! `pub` against it, and closes the connection when its token expires without a `refresh`.
//!
//! Built on `jsonwebtoken` 9: the well-kept JWT crate, and its 9.x line computes with `ring`,
//! the crypto provider the rest of the tree (rustls, hickory) already uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use streamfarm_core::protocol::close;

use crate::config::{ConfigError, NodeConfig};

/// Longest token accepted, in bytes: a bound on the work an outsider can ask for.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Most patterns a token may list in each of `subscribe` and `publish`.
pub const MAX_PATTERNS: usize = 256;
/// Shortest bearer credential accepted (publish tokens, the admin token), in characters.
pub const MIN_SECRET_CHARS: usize = 16;
/// Shortest HS256 secret accepted, in bytes (RFC 7518 §3.2: a key at least as long as the hash).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// One key that verifies connection tokens, named by the `kid` tokens carry.
///
/// In TOML (`[[auth_keys]]` tables), or on the command line as `KID:ALG:FILE` (`--auth-key`),
/// where FILE holds the HMAC secret (`HS256`) or the PEM public key (`ES256`, `RS256`):
///
/// ```
/// use streamfarm_node::AuthKey;
/// let key: AuthKey = "2026-11:ES256:/etc/streamfarm/2026-11.pub.pem".parse().unwrap();
/// assert_eq!(key.kid, "2026-11");
/// assert_eq!(key.alg, "ES256");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthKey {
    /// Key id: tokens name their key with the `kid` of their header.
    pub kid: String,
    /// `HS256` (a shared secret), `ES256` (ECDSA P-256) or `RS256` (RSA).
    pub alg: String,
    /// HS256: the secret itself (prefer `secret_file`, which keeps it out of the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// HS256: a file holding the secret (surrounding whitespace is ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// ES256 / RS256: a PEM file holding the public key (`-----BEGIN PUBLIC KEY-----`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
}

impl std::str::FromStr for AuthKey {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.splitn(3, ':');
        let (Some(kid), Some(alg), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "{text:?}: expected KID:ALG:FILE (e.g. k1:HS256:/etc/sf/k1.secret)"
            ));
        };
        let file = Some(PathBuf::from(file));
        let (secret_file, public_key_file) = if alg.eq_ignore_ascii_case("HS256") {
            (file, None)
        } else {
            (None, file)
        };
        Ok(AuthKey {
            kid: kid.to_string(),
            alg: alg.to_ascii_uppercase(),
            secret: None,
            secret_file,
            public_key_file,
        })
    }
}

impl std::fmt::Display for AuthKey {
    /// The key without its secret: `KID:ALG:FILE` or `KID:HS256:(inline secret)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = self
            .secret_file
            .as_ref()
            .or(self.public_key_file.as_ref())
            .map_or("(inline secret)".to_string(), |p| p.display().to_string());
        write!(f, "{}:{}:{source}", self.kid, self.alg)
    }
}

/// A topic pattern of a token's `subscribe` or `publish` claim (and of `anonymous_topics`).
///
/// Topics are split into segments at `.`. In a pattern, a `*` matches any run of characters
/// within one segment (`prices.*` matches `prices.eur` but not `prices.eur.spot`;
/// `user-*.inbox` matches `user-42.inbox`), and a last segment `**` matches one or more whole
/// segments (`news.**` matches `news.uk` and `news.uk.sport`, not `news`). `**` alone matches
/// every topic. Anything else matches itself.
///
/// ```
/// use streamfarm_node::Pattern;
/// let p = Pattern::parse("prices.*").unwrap();
/// assert!(p.matches("prices.eur"));
/// assert!(!p.matches("prices.eur.spot"));
/// assert!(Pattern::parse("news.**").unwrap().matches("news.uk.sport"));
/// assert!(Pattern::parse("a.**.b").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Checks a pattern: non-empty, at most 256 bytes, no whitespace or control characters,
    /// `**` only as the whole last segment.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        crate::session::check_topic(text).map_err(|problem| format!("pattern: {problem}"))?;
        let segments: Vec<&str> = text.split('.').collect();
        for (i, segment) in segments.iter().enumerate() {
            if segment.contains("**") && (*segment != "**" || i + 1 != segments.len()) {
                return Err(format!(
                    "pattern {text:?}: ** must be the whole last segment"
                ));
            }
        }
        Ok(Pattern(text.to_string()))
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut pattern = self.0.split('.');
        let mut topic = topic.split('.');
        loop {
            match (pattern.next(), topic.next()) {
                (Some("**"), Some(_)) => return true,
                (Some(p), Some(t)) if glob(p, t) => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

/// `*` matches any run of characters; everything else matches itself. Linear backtracking on the
/// last `*` only, so the cost is at most the product of the two lengths (both ≤ 256 bytes).
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// What one connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's `sub` (its user), when it has one.
    pub subject: Option<String>,
    /// Patterns of the topics it may subscribe to.
    pub subscribe: Vec<Pattern>,
    /// Patterns of the topics it may publish on.
    pub publish: Vec<Pattern>,
    /// When the token expires, seconds since the Unix epoch; none: never (open node, anonymous).
    pub exp: Option<u64>,
}

impl Grant {
    /// Everything, for ever: a node that checks no tokens.
    pub fn everything() -> Grant {
        let all = vec![Pattern("**".to_string())];
        Grant {
            subject: None,
            subscribe: all.clone(),
            publish: all,
            exp: None,
        }
    }

    /// Whether it may subscribe to `topic`.
    pub fn may_subscribe(&self, topic: &str) -> bool {
        self.subscribe.iter().any(|p| p.matches(topic))
    }

    /// Whether it may publish on `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|p| p.matches(topic))
    }
}

/// Why a token was not accepted; each has its close code (`docs/PROTOCOL.md`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token where one is required.
    #[error("token required")]
    Missing,
    /// The token is not valid here (the reason says why, without echoing the token).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
    /// A valid token that does not allow what was asked.
    #[error("forbidden: {0}")]
    Forbidden(String),
}

impl AuthError {
    /// The WebSocket close code for this refusal.
    pub fn close_code(&self) -> u16 {
        match self {
            AuthError::Missing => close::AUTH_MISSING,
            AuthError::Invalid(_) => close::AUTH_INVALID,
            AuthError::Expired => close::AUTH_EXPIRED,
            AuthError::Forbidden(_) => close::AUTH_FORBIDDEN,
        }
    }

    /// The close reason: at most 123 bytes, as a WebSocket close frame allows.
    pub fn close_reason(&self) -> String {
        let mut text = self.to_string();
        if text.len() > 123 {
            let mut end = 120;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push_str("...");
        }
        text
    }
}

/// The claims the node reads; `aud`, `iss` and `nbf` are checked by `jsonwebtoken` itself.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// One usable key.
struct Key {
    alg: Algorithm,
    key: DecodingKey,
}

/// The node's policy for clients, built once at start from its config.
pub struct Auth {
    /// Verifying keys by `kid`; empty: the node checks no tokens.
    keys: HashMap<String, Key>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: u64,
    /// What a connection without a token may do, when anonymous access is allowed.
    anonymous: Option<Grant>,
    /// Bearer credentials of `POST /publish` (any topic).
    publish_tokens: Vec<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("Auth")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("anonymous", &self.anonymous.is_some())
            .field("publish_tokens", &self.publish_tokens.len())
            .finish()
    }
}

/// What `POST /publish` was shown, checked by [`Auth::check_publisher`].
#[derive(Debug, PartialEq, Eq)]
pub enum PublisherCheck {
    /// Publishing is open, or the credential allows this topic.
    Allowed,
    /// No credential, or one that is neither a publish token nor a valid connection token.
    Unauthorized(String),
    /// A valid connection token that does not allow this topic.
    Forbidden(String),
}

impl Auth {
    /// Loads the keys of `config` (reading their files) and checks them.
    pub fn from_config(config: &NodeConfig) -> Result<Auth, ConfigError> {
        let invalid = |problem: String| ConfigError::Invalid {
            field: "auth_keys",
            problem,
        };
        let mut keys = HashMap::new();
        for spec in &config.auth_keys {
            if spec.kid.is_empty() {
                return Err(invalid("a key has an empty kid".into()));
            }
            let key = load_key(spec).map_err(|problem| invalid(format!("{spec}: {problem}")))?;
            if keys.insert(spec.kid.clone(), key).is_some() {
                return Err(invalid(format!("kid {:?} is configured twice", spec.kid)));
            }
        }
        let anonymous = if config.allow_anonymous {
            let topics = config
                .anonymous_topics
                .iter()
                .map(|t| Pattern::parse(t))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|problem| ConfigError::Invalid {
                    field: "anonymous_topics",
                    problem,
                })?;
            Some(Grant {
                subject: None,
                subscribe: topics,
                publish: Vec::new(),
                exp: None,
            })
        } else {
            None
        };
        Ok(Auth {
            keys,
            audience: config.auth_audience.clone(),
            issuer: config.auth_issuer.clone(),
            leeway: config.auth_leeway_s,
            anonymous,
            publish_tokens: config.publish_tokens.clone(),
        })
    }

    /// Whether connection tokens are checked (some key is configured).
    pub fn checks_tokens(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The allowed clock skew, in seconds.
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.leeway)
    }

    /// What a new connection may do, given the token it presented in its url or header (or
    /// none): `Ok(None)` means it must present one in an `auth` first frame.
    pub fn admit(&self, token: Option<&str>) -> Result<Option<Grant>, AuthError> {
        if !self.checks_tokens() {
            return Ok(Some(Grant::everything()));
        }
        match token {
            Some(token) => self.verify(token).map(Some),
            None => Ok(self.anonymous.clone()),
        }
    }

    /// Checks a token and returns what it allows.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        if !self.checks_tokens() {
            return Ok(Grant::everything());
        }
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid(format!(
                "longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|err| AuthError::Invalid(format!("malformed header ({err})")))?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .get(kid)
                .ok_or_else(|| AuthError::Invalid("unknown key id (kid)".into()))?,
            // Without a kid, only when there is no choice to make.
            None if self.keys.len() == 1 => self.keys.values().next().expect("one key"),
            None => {
                return Err(AuthError::Invalid(
                    "no key id (kid) in the header, and several keys are configured".into(),
                ));
            }
        };
        if header.alg != key.alg {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not the key's",
                header.alg
            )));
        }
        let mut validation = Validation::new(key.alg);
        validation.leeway = self.leeway;
        validation.set_required_spec_claims(&["exp"]);
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        validation.validate_nbf = true;
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(
                |err| match err.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                    ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience (aud)".into()),
                    ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer (iss)".into()),
                    ErrorKind::ImmatureSignature => {
                        AuthError::Invalid("not valid yet (nbf)".into())
                    }
                    ErrorKind::MissingRequiredClaim(claim) => {
                        AuthError::Invalid(format!("claim {claim} missing"))
                    }
                    _ => AuthError::Invalid(err.to_string()),
                },
            )?;
        let claims = data.claims;
        let now = now_s();
        if claims.iat.is_some_and(|iat| iat > now + self.leeway) {
            return Err(AuthError::Invalid("issued in the future (iat)".into()));
        }
        let patterns = |name: &str, list: &[String]| -> Result<Vec<Pattern>, AuthError> {
            if list.len() > MAX_PATTERNS {
                return Err(AuthError::Invalid(format!(
                    "{name}: more than {MAX_PATTERNS} patterns"
                )));
            }
            list.iter()
                .map(|p| Pattern::parse(p).map_err(|e| AuthError::Invalid(format!("{name}: {e}"))))
                .collect()
        };
        Ok(Grant {
            subject: claims.sub,
            subscribe: patterns("subscribe", &claims.subscribe)?,
            publish: patterns("publish", &claims.publish)?,
            exp: Some(claims.exp),
        })
    }

    /// Whether `POST /publish/{topic}` may go ahead with this `Authorization` header value.
    ///
    /// Open when neither publish tokens nor token keys are configured. Otherwise the bearer
    /// credential must be one of the publish tokens (any topic), or a connection token whose
    /// `publish` claim allows `topic`.
    pub fn check_publisher(&self, authorization: Option<&str>, topic: &str) -> PublisherCheck {
        if self.publish_tokens.is_empty() && !self.checks_tokens() {
            return PublisherCheck::Allowed;
        }
        let Some(presented) = authorization.and_then(bearer) else {
            return PublisherCheck::Unauthorized(
                "publishing needs Authorization: Bearer <publish token or connection token>".into(),
            );
        };
        if self
            .publish_tokens
            .iter()
            .any(|token| constant_time_eq(token.as_bytes(), presented.as_bytes()))
        {
            return PublisherCheck::Allowed;
        }
        if !self.checks_tokens() {
            return PublisherCheck::Unauthorized("not a publish token".into());
        }
        match self.verify(presented) {
            Ok(grant) if grant.may_publish(topic) => PublisherCheck::Allowed,
            Ok(_) => PublisherCheck::Forbidden(format!("the token may not publish on {topic:?}")),
            Err(err) => PublisherCheck::Unauthorized(err.to_string()),
        }
    }
}

/// The credential of an `Authorization: Bearer …` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses an empty or short bearer credential (`field` names the setting).
pub(crate) fn check_secret(field: &'static str, value: &str) -> Result<(), ConfigError> {
    let chars = value.chars().count();
    if chars < MIN_SECRET_CHARS {
        return Err(ConfigError::Invalid {
            field,
            problem: format!(
                "too short ({chars} characters): use at least {MIN_SECRET_CHARS} random characters"
            ),
        });
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::Invalid {
            field,
            problem: "must not contain whitespace or control characters".into(),
        });
    }
    Ok(())
}

fn load_key(spec: &AuthKey) -> Result<Key, String> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
    };
    match spec.alg.as_str() {
        "HS256" => {
            let secret = match (&spec.secret, &spec.secret_file) {
                (Some(secret), None) => hs256_secret(secret.as_bytes())?,
                (None, Some(path)) => read_hs256_secret(path)?,
                _ => return Err("HS256 needs exactly one of secret and secret_file".into()),
            };
            Ok(Key {
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(&secret),
            })
        }
        "ES256" | "RS256" => {
            let (Some(path), None, None) = (&spec.public_key_file, &spec.secret, &spec.secret_file)
            else {
                return Err(format!("{} needs public_key_file (only)", spec.alg));
            };
            let pem = read(path)?;
            let (alg, key) = if spec.alg == "ES256" {
                (Algorithm::ES256, DecodingKey::from_ec_pem(&pem))
            } else {
                (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem))
            };
            let key = key.map_err(|err| {
                format!(
                    "{} is not a PEM {} public key: {err}",
                    path.display(),
                    spec.alg
                )
            })?;
            Ok(Key { alg, key })
        }
        other => Err(format!(
            "algorithm {other:?} not supported: HS256, ES256 or RS256"
        )),
    }
}

/// The HS256 secret of a key file: its text without surrounding whitespace (a file written by
/// `openssl rand -hex 32 > FILE` ends with a newline), at least [`MIN_HS256_SECRET_BYTES`] long.
/// Nodes verifying tokens and `streamfarm token` signing them read a key file alike.
pub fn read_hs256_secret(path: &Path) -> Result<Vec<u8>, String> {
    let bytes =
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    hs256_secret(String::from_utf8_lossy(&bytes).trim().as_bytes())
        .map_err(|err| format!("{}: {err}", path.display()))
}

fn hs256_secret(secret: &[u8]) -> Result<Vec<u8>, String> {
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(format!(
            "HS256 secret of {} bytes: use at least {MIN_HS256_SECRET_BYTES}",
            secret.len()
        ));
    }
    Ok(secret.to_vec())
}

/// Seconds since the Unix epoch.
pub(crate) fn now_s() -> u64 {
    crate::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_by_segment() {
        let p = |t: &str| Pattern::parse(t).unwrap();
        assert!(p("prices.*").matches("prices.eur"));
        assert!(!p("prices.*").matches("prices"));
        assert!(!p("prices.*").matches("prices.eur.spot"));
        assert!(!p("prices.*").matches("pricesXeur"));
        assert!(p("prices.**").matches("prices.eur.spot"));
        assert!(!p("prices.**").matches("prices"));
        assert!(p("**").matches("anything.at.all"));
        assert!(p("user-*.inbox").matches("user-42.inbox"));
        assert!(!p("user-*.inbox").matches("admin.inbox"));
        assert!(p("a").matches("a"));
        assert!(!p("a").matches("a.b"));
        assert!(p("*x*y").matches("axbxy"));
        assert!(!p("*x*y").matches("axbx"));
        assert!(Pattern::parse("a.**.b").is_err());
        assert!(Pattern::parse("a**").is_err());
        assert!(Pattern::parse("").is_err());
        assert!(Pattern::parse("a b").is_err());
    }

    #[test]
    fn bearer_values_are_read_case_insensitively() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }

    #[test]
    fn short_secrets_are_refused_with_the_setting_named() {
        let err = check_secret("publish_tokens", "short").unwrap_err();
        assert!(err.to_string().contains("publish_tokens"), "{err}");
        assert!(check_secret("admin_token", "").is_err());
        check_secret("admin_token", "0123456789abcdef").unwrap();
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        let err = AuthError::Invalid("x".repeat(500));
        assert!(err.close_reason().len() <= 123);
        assert_eq!(err.close_code(), close::AUTH_INVALID);
    }

    #[test]
    fn key_specs_parse_from_the_command_line() {
        let key: AuthKey = "k1:hs256:/tmp/secret".parse().unwrap();
        assert_eq!(key.alg, "HS256");
        assert_eq!(key.secret_file, Some(PathBuf::from("/tmp/secret")));
        assert!("k1:HS256".parse::<AuthKey>().is_err());
        let key: AuthKey = "k2:RS256:/tmp/k.pem".parse().unwrap();
        assert_eq!(key.public_key_file, Some(PathBuf::from("/tmp/k.pem")));
    }
}
