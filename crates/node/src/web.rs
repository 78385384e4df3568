//! What a node serves to browsers: the browser client, the live dashboard, and CORS for the two
//! HTTP endpoints a page on another origin calls.
//!
//! | route | what |
//! |---|---|
//! | `GET /client/streamfarm.js` | the browser client (`clients/browser`), one minified script: `<script src>` defines the global `streamfarm` |
//! | `GET /dashboard` | the live farm dashboard: plain HTML that loads the client above |
//!
//! Both are compiled into the binary (`include_str!` of the committed bundle and page), so a node
//! built with only the Rust toolchain serves them; `clients/browser`'s tests fail when the
//! committed bundle is older than its sources.
//!
//! **Caching.** The script's path is stable (pages embed it), so it is served with a short
//! `max-age` and an `ETag` (a hash of the bundle): a page reload after a node upgrade gets the new
//! client within five minutes, and revalidation costs a `304` and no body.
//!
//! **CORS.** A page served from one origin reaches the farm through a seed list of nodes, each
//! another origin: it reads `GET /farm` with `fetch`, which the browser allows only when the node
//! says so. `/farm` is public and read-only, so its default is any origin (`*`);
//! `POST /publish/{topic}` changes state, so no origin may call it from a browser unless
//! configured (`cors_publish_origins`). The WebSocket needs no CORS (browsers do not apply it to
//! WebSockets). `tower-http`'s [`CorsLayer`] does the protocol — preflight answers, `Vary`,
//! exact-origin matching against a list — so none of it is written here; it is already in the
//! dependency tree (through `reqwest`), and as a layer it wraps the two routes without touching
//! their handlers.

use std::sync::OnceLock;

use axum::Router;
use axum::http::header::{self, HeaderValue};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::NodeConfig;

/// Where the browser client is served; pages embed this path.
pub(crate) const CLIENT_PATH: &str = "/client/streamfarm.js";
/// Where the dashboard is served.
pub(crate) const DASHBOARD_PATH: &str = "/dashboard";

/// The browser client, built by `clients/browser` (`npm run build`) and committed.
const CLIENT_JS: &str = include_str!("../../../clients/browser/dist/streamfarm.min.js");
/// The dashboard page; it loads [`CLIENT_PATH`] from the node that serves it.
const DASHBOARD_HTML: &str = include_str!("../../../clients/browser/dashboard/dashboard.html");

/// How long a browser may use its copy of the client without asking again.
const CLIENT_CACHE: &str = "public, max-age=300";

/// The routes of this module; they need no node state.
pub(crate) fn router() -> Router {
    Router::new()
        .route(CLIENT_PATH, get(client_js))
        .route(DASHBOARD_PATH, get(dashboard))
}

/// `GET /farm` with CORS for the origins of `cors_farm_origins` (default `*`).
pub(crate) fn farm_cors<S>(route: MethodRouter<S>, config: &NodeConfig) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    route.layer(cors(&config.cors_farm_origins).allow_methods([Method::GET]))
}

/// `POST /publish/{topic}` with CORS for the origins of `cors_publish_origins` (default none).
/// The body is the message, sent as any content type, so `Content-Type` is an allowed header;
/// `Authorization` carries the page's token where publishing needs one (`docs/AUTH.md`).
pub(crate) fn publish_cors<S>(route: MethodRouter<S>, config: &NodeConfig) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    route.layer(
        cors(&config.cors_publish_origins)
            .allow_methods([Method::POST])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
    )
}

/// `POST /sse/{stream}` (a client frame, JSON) with CORS for the origins that may open the
/// event stream (`cors_farm_origins`): the stream's key, not the origin, is what admits a frame.
pub(crate) fn stream_post_cors<S>(route: MethodRouter<S>, config: &NodeConfig) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    route.layer(
        cors(&config.cors_farm_origins)
            .allow_methods([Method::POST])
            .allow_headers([header::CONTENT_TYPE]),
    )
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // `validate` has checked every origin is a valid header value; one that is not is
        // dropped rather than taking the node down.
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    CorsLayer::new().allow_origin(allow)
}

/// Whether `origin` may stand in an origin list: `*`, or `scheme://host[:port]` without a path.
pub(crate) fn is_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', ' '])
        && HeaderValue::from_str(origin).is_ok()
}

async fn client_js(headers: HeaderMap) -> Response {
    let etag = client_etag();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag));
    let cache = [(header::CACHE_CONTROL, CLIENT_CACHE), (header::ETAG, etag)];
    if fresh {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        cache,
        CLIENT_JS,
    )
        .into_response()
}

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD_HTML,
    )
        .into_response()
}

/// A strong ETag of the bundle: FNV-1a (64 bits) of its bytes, computed once.
fn client_etag() -> &'static str {
    static ETAG: OnceLock<String> = OnceLock::new();
    ETAG.get_or_init(|| {
        let hash = CLIENT_JS.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        format!("\"{hash:016x}\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_star_or_scheme_host_port() {
        for good in ["*", "https://app.example.com", "http://127.0.0.1:8080"] {
            assert!(is_origin(good), "{good}");
        }
        for bad in [
            "",
            "app.example.com",
            "https://",
            "https://app.example.com/",
            "https://a.example.com/path",
            "https://a b",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }

    #[test]
    fn the_etag_is_quoted_and_stable() {
        let etag = client_etag();
        assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() == 18);
        assert_eq!(etag, client_etag());
    }

    #[test]
    fn the_embedded_client_defines_the_global_and_the_dashboard_loads_it() {
        assert!(CLIENT_JS.contains("streamfarm"));
        assert!(DASHBOARD_HTML.contains(CLIENT_PATH));
    }
}
