//! What a node serves to browsers, over real sockets: the client script, the dashboard, and the
//! CORS answers of `/farm` and `/publish` as configured (the browser-side behaviour is tested in
//! headless Chromium by `clients/browser/test/browser`).

use std::net::SocketAddr;

use reqwest::header::{
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_REQUEST_METHOD,
    CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH, ORIGIN,
};
use reqwest::{Method, StatusCode};
use streamfarm_node::{NodeConfig, NodeHandle};

async fn node(tweak: impl FnOnce(&mut NodeConfig)) -> NodeHandle {
    let mut config = NodeConfig::new("web");
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.shutdown_drain_ms = 100;
    tweak(&mut config);
    NodeHandle::start(config).await.expect("node starts")
}

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<&str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_script_and_the_dashboard_are_served() {
    let node = node(|_| {}).await;
    let base = format!("http://{}", node.listen_addr());
    let http = reqwest::Client::new();

    let script = http
        .get(format!("{base}/client/streamfarm.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), StatusCode::OK);
    assert_eq!(
        header(&script, CONTENT_TYPE),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(header(&script, CACHE_CONTROL), Some("public, max-age=300"));
    let etag = header(&script, ETAG).expect("an ETag").to_string();
    let body = script.text().await.unwrap();
    assert!(body.contains("var streamfarm="), "not the IIFE bundle");
    // Revalidation with the ETag costs a 304 and no body.
    let again = http
        .get(format!("{base}/client/streamfarm.js"))
        .header(IF_NONE_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert!(again.text().await.unwrap().is_empty());

    let dashboard = http.get(format!("{base}/dashboard")).send().await.unwrap();
    assert_eq!(dashboard.status(), StatusCode::OK);
    assert_eq!(
        header(&dashboard, CONTENT_TYPE),
        Some("text/html; charset=utf-8")
    );
    let html = dashboard.text().await.unwrap();
    assert!(html.contains("<script src=\"/client/streamfarm.js\"></script>"));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_any_origin_reads_the_list_and_none_may_publish() {
    let node = node(|_| {}).await;
    let base = format!("http://{}", node.listen_addr());
    let http = reqwest::Client::new();
    let page = "https://app.example.com";

    let list = http
        .get(format!("{base}/farm"))
        .header(ORIGIN, page)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), StatusCode::OK);
    assert_eq!(header(&list, ACCESS_CONTROL_ALLOW_ORIGIN), Some("*"));

    let preflight = http
        .request(Method::OPTIONS, format!("{base}/publish/prices"))
        .header(ORIGIN, page)
        .header(ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&preflight, ACCESS_CONTROL_ALLOW_ORIGIN), None);
    let published = http
        .post(format!("{base}/publish/prices"))
        .header(ORIGIN, page)
        .body("1.0842")
        .send()
        .await
        .unwrap();
    // The node still publishes (CORS is the browser's to enforce), but gives no browser leave
    // to read the answer.
    assert_eq!(published.status(), StatusCode::OK);
    assert_eq!(header(&published, ACCESS_CONTROL_ALLOW_ORIGIN), None);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_origins_are_allowed_and_others_are_not() {
    let app = "https://app.example.com";
    let node = node(|config| {
        config.cors_farm_origins = vec![app.to_string()];
        config.cors_publish_origins = vec![app.to_string()];
    })
    .await;
    let base = format!("http://{}", node.listen_addr());
    let http = reqwest::Client::new();

    let preflight = http
        .request(Method::OPTIONS, format!("{base}/publish/prices"))
        .header(ORIGIN, app)
        .header(ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(header(&preflight, ACCESS_CONTROL_ALLOW_ORIGIN), Some(app));
    assert!(
        header(&preflight, ACCESS_CONTROL_ALLOW_METHODS).is_some_and(|m| m.contains("POST")),
        "{:?}",
        preflight.headers()
    );
    let published = http
        .post(format!("{base}/publish/prices"))
        .header(ORIGIN, app)
        .body("1.0842")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&published, ACCESS_CONTROL_ALLOW_ORIGIN), Some(app));

    for path in ["/farm", "/publish/prices"] {
        let method = if path == "/farm" {
            Method::GET
        } else {
            Method::POST
        };
        let other = http
            .request(method, format!("{base}{path}"))
            .header(ORIGIN, "https://evil.example.com")
            .send()
            .await
            .unwrap();
        assert_eq!(header(&other, ACCESS_CONTROL_ALLOW_ORIGIN), None, "{path}");
    }
    let list = http
        .get(format!("{base}/farm"))
        .header(ORIGIN, app)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&list, ACCESS_CONTROL_ALLOW_ORIGIN), Some(app));
    node.shutdown().await;
}
