//! One-shot requests to the service: the farm list and publishing.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use streamfarm_core::FarmList;

use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::address::{Endpoint, ServiceAddress};
use crate::client::discover;
use crate::connection::{self, Dialer};
use crate::error::Error;
use crate::options::ClientOptions;
use crate::tls::ClientStream;

/// The farm list, as the first server of `address` that answers sends it on connecting (the
/// same first contact a [`Client`](crate::Client) makes). Returns the list and the url of the
/// server that sent it.
pub async fn fetch_list(
    address: &ServiceAddress,
    options: &ClientOptions,
) -> Result<(FarmList, String), Error> {
    let mut rng = rng(options);
    let conn = discover(
        address,
        &options.resolver,
        &[],
        &options.dialer(),
        options.connect_timeout,
        &mut rng,
        |_| {},
    )
    .await?;
    let result = (conn.list, conn.hello.url);
    connection::close(conn.channel).await;
    Ok(result)
}

/// Publishes `payload` on `topic` farm-wide with `POST /publish/{topic}` on the first server of
/// `address` that accepts it (over HTTPS for a `wss://` or `https://` address, with the options'
/// token as its bearer credential); returns that server's HTTP base url.
pub async fn publish(
    address: &ServiceAddress,
    options: &ClientOptions,
    topic: &str,
    payload: Vec<u8>,
) -> Result<String, Error> {
    let mut rng = rng(options);
    let endpoints = options.resolver.resolve(address, &mut rng).await?;
    let dialer = options.dialer();
    let timeout = options.connect_timeout.max(Duration::from_secs(5));
    let path = format!("/publish/{}", encode_path_segment(topic));
    let tried = endpoints.len();
    let mut last = None;
    for endpoint in endpoints {
        let base = endpoint.target.http_base(endpoint.addr);
        let url = format!("{base}{path}");
        let error = |detail: String| Error::Http {
            method: "POST",
            url: url.clone(),
            detail,
        };
        let token = dialer.token(&url).await?;
        let sent = tokio::time::timeout(
            timeout,
            post(&endpoint, &dialer, &path, token.as_deref(), payload.clone()),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        match sent {
            Ok((status, _)) if status.is_success() => return Ok(base),
            Ok((status, body)) => {
                let err = error(format!("{status}: {}", body.trim()));
                // The node understood and refused: another node will refuse the same way.
                if status.is_client_error() {
                    return Err(err);
                }
                last = Some(err);
            }
            Err(detail) => last = Some(error(detail)),
        }
    }
    Err(Error::Unreachable {
        address: address.to_string(),
        tried,
        last: Box::new(last.unwrap_or(Error::Closed)),
    })
}

/// One HTTP/1.1 `POST` on a connection of its own (TLS for a TLS target); the status and body.
async fn post(
    endpoint: &Endpoint,
    dialer: &Dialer,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<(StatusCode, String), String> {
    let tcp = connection::tcp_connect(endpoint.addr, dialer.source)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let stream = if endpoint.target.tls {
        crate::tls::connect(&dialer.tls, &endpoint.target.host, tcp)
            .await
            .map_err(
                |e| match crate::tls::certificate_problem(&e, &endpoint.target.host) {
                    Some(problem) => format!("the certificate was refused: {problem}"),
                    None => format!("TLS: {e}"),
                },
            )?
    } else {
        ClientStream::Plain(tcp)
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let host = match endpoint.target.host.contains(':') {
        true => format!("[{}]:{}", endpoint.target.host, endpoint.target.port),
        false => format!("{}:{}", endpoint.target.host, endpoint.target.port),
    };
    let mut request = hyper::Request::post(path).header(hyper::header::HOST, host);
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
    .await;
    driver.abort();
    result
}

fn rng(options: &ClientOptions) -> StdRng {
    match options.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so any topic is one segment.
fn encode_path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_become_one_path_segment() {
        assert_eq!(encode_path_segment("prices.eu-1"), "prices.eu-1");
        assert_eq!(encode_path_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(encode_path_segment("é"), "%C3%A9");
    }
}
