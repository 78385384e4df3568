//! Server addresses as written in the farm list, a node's configuration and a client's service
//! address: `scheme://[userinfo@]host[:port][/path][?query][#fragment]`, or `host[:port]` with no
//! scheme. One reading of them, so that the client, the node and the DNS responder agree on which
//! host and port a url names.

use std::fmt;
use std::net::Ipv6Addr;

/// A url (or bare `host[:port]`) cut into its parts; nothing is resolved or checked beyond the
/// syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlParts<'a> {
    /// The scheme, as written (`ws`, `HTTPS`…); `None` for a bare `host[:port]`.
    pub scheme: Option<&'a str>,
    /// What precedes an `@` in the authority, if anything does.
    pub userinfo: Option<&'a str>,
    /// The host: a name, an IPv4 address, or an IPv6 address without its brackets.
    pub host: &'a str,
    /// The port, when written.
    pub port: Option<u16>,
    /// The path (from the first `/`), without query or fragment; empty when none.
    pub path: &'a str,
}

/// Why a url could not be cut into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    /// The port is not a number from 0 to 65535.
    BadPort(String),
    /// An opening `[` without its `]`.
    UnclosedBracket,
    /// Something other than `:port` follows a bracketed host.
    JunkAfterBracket,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::BadPort(port) => write!(f, "port {port:?} is not a number from 0 to 65535"),
            UrlError::UnclosedBracket => write!(f, "an opening [ without its ]"),
            UrlError::JunkAfterBracket => write!(f, "junk after ]"),
        }
    }
}

impl std::error::Error for UrlError {}

/// Cuts `text` into its parts: `ws://[::1]:9000/live?x=1`, `https://farm.example`,
/// `127.0.0.1:7400`, `[::1]:7400`, or a bare IPv6 address (`::1`, no port).
///
/// ```
/// use streamfarm_core::address::split_url;
/// let url = split_url("ws://u@[::1]:9000/live?x=1").unwrap();
/// assert_eq!(
///     (url.scheme, url.userinfo, url.host, url.port, url.path),
///     (Some("ws"), Some("u"), "::1", Some(9000), "/live")
/// );
/// let bare = split_url("farm.example:7400").unwrap();
/// assert_eq!((bare.scheme, bare.host, bare.port, bare.path), (None, "farm.example", Some(7400), ""));
/// ```
pub fn split_url(text: &str) -> Result<UrlParts<'_>, UrlError> {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, text),
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, ""),
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (Some(userinfo), host_port),
        None => (None, authority),
    };
    let (host, port) = split_host_port(host_port)?;
    Ok(UrlParts {
        scheme,
        userinfo,
        host,
        port,
        path,
    })
}

/// The port a scheme implies: 80 for `ws` and `http`, 443 for `wss` and `https` (any case).
pub fn default_port(scheme: &str) -> Option<u16> {
    match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => Some(80),
        "wss" | "https" => Some(443),
        _ => None,
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`, or a bare IPv6 address.
fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), UrlError> {
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| UrlError::BadPort(p.to_string()))
    };
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(UrlError::UnclosedBracket)?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(
                after.strip_prefix(':').ok_or(UrlError::JunkAfterBracket)?,
            )?),
        };
        return Ok((host, port));
    }
    if authority.parse::<Ipv6Addr>().is_ok() {
        return Ok((authority, None));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Ok((host, Some(parse_port(port)?))),
        None => Ok((authority, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(text: &str) -> (Option<&str>, &str, Option<u16>, &str) {
        let p = split_url(text).unwrap();
        (p.scheme, p.host, p.port, p.path)
    }

    #[test]
    fn urls_of_every_shape() {
        assert_eq!(parts("127.0.0.1:7401"), (None, "127.0.0.1", Some(7401), ""));
        assert_eq!(parts("farm.example"), (None, "farm.example", None, ""));
        assert_eq!(
            parts("ws://farm:9/live?x=1"),
            (Some("ws"), "farm", Some(9), "/live")
        );
        assert_eq!(
            parts("HTTP://farm/farm#top"),
            (Some("HTTP"), "farm", None, "/farm")
        );
        assert_eq!(parts("wss://farm?x"), (Some("wss"), "farm", None, ""));
        assert_eq!(parts("[::1]:7400"), (None, "::1", Some(7400), ""));
        assert_eq!(parts("::1"), (None, "::1", None, ""));
        assert_eq!(parts("wss://[::1]"), (Some("wss"), "::1", None, ""));
        let with_user = split_url("ws://u:p@127.0.0.3:1/").unwrap();
        assert_eq!(
            (with_user.userinfo, with_user.host, with_user.port),
            (Some("u:p"), "127.0.0.3", Some(1))
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        assert_eq!(
            split_url("host:http"),
            Err(UrlError::BadPort("http".into()))
        );
        assert_eq!(
            split_url("ws://host:70000/"),
            Err(UrlError::BadPort("70000".into()))
        );
        assert_eq!(split_url("[::1"), Err(UrlError::UnclosedBracket));
        assert_eq!(split_url("[::1]x"), Err(UrlError::JunkAfterBracket));
        assert!(
            UrlError::BadPort("x".into())
                .to_string()
                .contains("0 to 65535")
        );
    }

    #[test]
    fn schemes_imply_their_ports() {
        assert_eq!(default_port("ws"), Some(80));
        assert_eq!(default_port("HTTP"), Some(80));
        assert_eq!(default_port("wss"), Some(443));
        assert_eq!(default_port("https"), Some(443));
        assert_eq!(default_port("gopher"), None);
    }
}
