//! `streamfarm drain [NODE]`: set a node `DRAINING` through its admin API and wait until its
//! clients have moved to other servers.
//!
//! Made for a Kubernetes `preStop` hook (and any other stop script): it reads the node's address
//! and admin token from the same `STREAMFARM_LISTEN` and `STREAMFARM_ADMIN_TOKEN` variables the
//! node itself reads, so the hook needs no shell, no `curl` and no copy of the token. The node
//! moves its clients make-before-break over its drain period (`--drain-period-ms`); this command
//! returns once `/healthz` reports no users, or at `--wait`, whichever comes first, so that the
//! SIGTERM which follows finds an empty node. Plain HTTP only: the admin API of a TLS node is
//! reached over `https://`, for which `curl --cacert` does the same.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::sub::parse_duration;

/// How often the node's users are polled while it drains.
const POLL: Duration = Duration::from_millis(250);
/// Deadline of each request to the node.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of `streamfarm drain`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The node's listen address (`host:port`), as given to `serve --listen`.
    #[arg(env = "STREAMFARM_LISTEN", value_name = "NODE")]
    node: SocketAddr,
    /// The node's admin token (`serve --admin-token`).
    #[arg(long, env = "STREAMFARM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Longest wait for the node's users to leave, e.g. `30s` (the status stays DRAINING after).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    wait: Duration,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("HTTP client")?;
    let base = format!("http://{}", args.node);
    let response = client
        .post(format!("{base}/admin/status"))
        .bearer_auth(&args.admin_token)
        .body("DRAINING")
        .send()
        .await
        .with_context(|| format!("POST {base}/admin/status"))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        anyhow::bail!("{base}/admin/status answered {status}: {}", body.trim());
    }
    let deadline = Instant::now() + args.wait;
    loop {
        let users = users(&client, &base).await;
        match users {
            Some(0) => {
                println!("{} is DRAINING with no users left", args.node);
                return Ok(ExitCode::SUCCESS);
            }
            _ if Instant::now() >= deadline => {
                let left = users.map_or("an unknown number of".to_string(), |n| n.to_string());
                println!(
                    "{} is DRAINING; {left} users still there after {:?}",
                    args.node, args.wait
                );
                return Ok(ExitCode::SUCCESS);
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// The node's users from `/healthz`; `None` when it does not answer.
async fn users(client: &reqwest::Client, base: &str) -> Option<u64> {
    let text = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()?
        .get("users")?
        .as_u64()
}
