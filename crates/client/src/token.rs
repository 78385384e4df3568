//! Connection tokens on the client side: where they come from ([`TokenSource`]) and when to
//! replace them (from the token's own `exp`).
//!
//! The client sends its token in the `Authorization: Bearer` header of every WebSocket upgrade
//! (never in the url, where proxies log it) and, while connected, a `refresh` frame with a fresh
//! one from its source before the current one expires: at 30 s before `exp`, or half-way
//! through a token that lives less than a minute (`docs/AUTH.md`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use streamfarm_core::time::unix_ms;

/// What a token provider returns: the token, or why there is none (for the logs).
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Where the client gets its connection token: the same one always, or a provider asked
/// before every connection and every refresh.
#[derive(Clone)]
pub struct TokenSource(Arc<dyn Fn() -> TokenFuture + Send + Sync>);

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.write_str("TokenSource")
    }
}

impl TokenSource {
    /// Always this token.
    pub fn fixed(token: impl Into<String>) -> Self {
        let token: Arc<str> = token.into().into();
        TokenSource(Arc::new(move || {
            let token = token.to_string();
            Box::pin(async move { Ok(token) })
        }))
    }

    /// Asks `provider` for a token each time one is needed.
    pub fn provider<F, Fut>(provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        TokenSource(Arc::new(move || Box::pin(provider())))
    }

    /// A token, now.
    pub fn fetch(&self) -> TokenFuture {
        (self.0)()
    }
}

/// The `exp` claim of a JWT, read without checking the signature (the node checks it; the client
/// only needs to know when to refresh). `None` when it is not a JWT with a numeric `exp`.
pub fn expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_f64().map(|exp| exp.max(0.0) as u64)
}

const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;

/// How long from now the client should send a fresh token for one that expires at `exp`: 30 s
/// before, or half-way for a token that has less than a minute left (zero once it is due).
pub fn refresh_in(exp: u64) -> Duration {
    let now = unix_ms(SystemTime::now());
    // At most a year away: an `exp` far in the future must not overflow the clock.
    let left = exp.saturating_mul(1000).saturating_sub(now).min(YEAR_MS);
    let early = left.saturating_sub(30_000).max(left / 2);
    Duration::from_millis(early)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            engine.encode(r#"{"alg":"HS256"}"#),
            engine.encode(payload)
        )
    }

    #[test]
    fn expiry_is_read_from_the_payload() {
        assert_eq!(
            expiry(&jwt(r#"{"exp":1795327061,"sub":"u"}"#)),
            Some(1795327061)
        );
        assert_eq!(expiry(&jwt(r#"{"sub":"u"}"#)), None);
        assert_eq!(expiry("not a jwt"), None);
    }

    #[test]
    fn refresh_comes_30_s_early_or_half_way() {
        let now = unix_ms(SystemTime::now()) / 1000;
        let long = refresh_in(now + 3600);
        assert!(long > Duration::from_secs(3500) && long <= Duration::from_secs(3570));
        let short = refresh_in(now + 10);
        assert!(short <= Duration::from_secs(5) && short >= Duration::from_secs(4));
        assert_eq!(refresh_in(now - 5), Duration::ZERO);
        assert!(refresh_in(u64::MAX) <= Duration::from_millis(YEAR_MS));
    }

    #[tokio::test]
    async fn fixed_and_provided_tokens() {
        assert_eq!(TokenSource::fixed("t").fetch().await.unwrap(), "t");
        let source = TokenSource::provider(|| async { Err("no token service".to_string()) });
        assert!(source.fetch().await.is_err());
        assert_eq!(format!("{source:?}"), "TokenSource");
    }
}
