//! One-shot requests to the service: the farm list and publishing.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use streamfarm_core::FarmList;

use crate::address::ServiceAddress;
use crate::client::discover;
use crate::connection;
use crate::error::Error;
use crate::options::ClientOptions;

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
        options.source_address,
        options.connect_timeout,
        &mut rng,
        |_| {},
    )
    .await?;
    let result = (conn.list, conn.hello.url);
    connection::close(conn.ws).await;
    Ok(result)
}

/// Publishes `payload` on `topic` farm-wide with `POST /publish/{topic}` on the first server of
/// `address` that accepts it; returns that server's HTTP base url.
pub async fn publish(
    address: &ServiceAddress,
    options: &ClientOptions,
    topic: &str,
    payload: Vec<u8>,
) -> Result<String, Error> {
    let mut rng = rng(options);
    let endpoints = options.resolver.resolve(address, &mut rng).await?;
    let http = reqwest::Client::builder()
        .timeout(options.connect_timeout.max(Duration::from_secs(5)))
        .build()
        .map_err(|e| Error::Http {
            method: "POST",
            url: String::new(),
            detail: e.to_string(),
        })?;
    let tried = endpoints.len();
    let mut last = None;
    for endpoint in endpoints {
        let base = format!("http://{}", endpoint.addr);
        let url = format!("{base}/publish/{}", encode_path_segment(topic));
        let error = |detail: String| Error::Http {
            method: "POST",
            url: url.clone(),
            detail,
        };
        match http.post(&url).body(payload.clone()).send().await {
            Ok(response) if response.status().is_success() => return Ok(base),
            Ok(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                let err = error(format!("{status}: {}", body.trim()));
                // The node understood and refused: another node will refuse the same way.
                if status.is_client_error() {
                    return Err(err);
                }
                last = Some(err);
            }
            Err(err) => last = Some(error(err.to_string())),
        }
    }
    Err(Error::Unreachable {
        address: address.to_string(),
        tried,
        last: Box::new(last.unwrap_or(Error::Closed)),
    })
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
