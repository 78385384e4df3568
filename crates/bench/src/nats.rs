//! nats-server, the peer: finding (or installing) it and running it as a child, alone or as a
//! cluster of routed servers whose clients learn each other's urls (`connect_urls` in `INFO`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::proc::{Guard, free_port, poll};
use crate::wire::Nats;

/// A nats-server binary and the version it reports.
#[derive(Debug, Clone)]
pub struct NatsServer {
    /// The binary.
    pub path: PathBuf,
    /// What `nats-server --version` printed, e.g. `nats-server: v2.9.10`.
    pub version: String,
}

/// Looks for `nats-server` on `PATH` (and in /usr/sbin, /usr/bin); when absent and `install` is
/// set, runs `apt-get update` and `apt-get install -y nats-server` (Debian's package) and looks
/// again. `None` when there is none: the benchmarks then run the streamfarm side alone.
pub fn find_nats(install: bool) -> Option<NatsServer> {
    if let Some(found) = locate() {
        return Some(found);
    }
    if install {
        eprintln!("nats-server not found: trying apt-get install nats-server");
        let quiet = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if quiet(&["update", "-qq"]) && quiet(&["install", "-y", "-qq", "nats-server"]) {
            return locate();
        }
    }
    None
}

fn locate() -> Option<NatsServer> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path_var).chain([
        "/usr/sbin".into(),
        "/usr/bin".into(),
        "/usr/local/bin".into(),
    ]);
    for dir in dirs {
        let candidate = dir.join("nats-server");
        if !candidate.is_file() {
            continue;
        }
        if let Ok(out) = Command::new(&candidate).arg("--version").output()
            && out.status.success()
        {
            return Some(NatsServer {
                version: String::from_utf8_lossy(&out.stdout).trim().to_string(),
                path: candidate,
            });
        }
    }
    None
}

/// A running nats-server child.
#[derive(Debug)]
pub(crate) struct NatsProc {
    pub(crate) guard: Guard,
    /// Client address.
    pub(crate) addr: SocketAddr,
    /// Monitoring (HTTP) address: `/varz`.
    pub(crate) monitor: SocketAddr,
}

impl NatsProc {
    /// Starts one standalone server on `ip` and waits until it greets a client.
    pub(crate) async fn start(bin: &Path, ip: IpAddr) -> anyhow::Result<NatsProc> {
        let mut cluster = NatsProc::cluster(bin, &[ip]).await?;
        Ok(cluster.remove(0))
    }

    /// Starts one server per ip, routed to each other (a full mesh of routes), and waits until
    /// every server greets a client and knows all the others' client urls. Tries three times:
    /// a port found free may be taken by another process before the server binds it.
    pub(crate) async fn cluster(bin: &Path, ips: &[IpAddr]) -> anyhow::Result<Vec<NatsProc>> {
        NatsProc::cluster_with_gid(bin, ips, None).await
    }

    /// [`NatsProc::cluster`], with the first server run with group id `first_gid` when given
    /// (`setgid`, root only), so that firewall rules can tell its packets apart.
    pub(crate) async fn cluster_with_gid(
        bin: &Path,
        ips: &[IpAddr],
        first_gid: Option<u32>,
    ) -> anyhow::Result<Vec<NatsProc>> {
        let mut last = None;
        for _ in 0..3 {
            match NatsProc::cluster_once(bin, ips, first_gid).await {
                Ok(servers) => return Ok(servers),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nats-server did not start")))
    }

    async fn cluster_once(
        bin: &Path,
        ips: &[IpAddr],
        first_gid: Option<u32>,
    ) -> anyhow::Result<Vec<NatsProc>> {
        let mut plan = Vec::new();
        for ip in ips {
            plan.push((free_port(*ip)?, free_port(*ip)?, free_port(*ip)?));
        }
        let routes: Vec<String> = plan
            .iter()
            .map(|(_, route, _)| format!("nats://{route}"))
            .collect();
        let mut servers = Vec::new();
        for (i, (client, route, monitor)) in plan.iter().enumerate() {
            let mut command = Command::new(bin);
            command
                .args(["-a", &client.ip().to_string()])
                .args(["-p", &client.port().to_string()])
                .args(["-m", &monitor.port().to_string()])
                .args(["-n", &format!("n{i}")]);
            if ips.len() > 1 {
                command
                    .args(["--cluster_name", "bench"])
                    .args(["--cluster", &format!("nats://{route}")])
                    .args(["--routes", &routes.join(",")]);
            }
            if let (0, Some(gid)) = (i, first_gid) {
                std::os::unix::process::CommandExt::gid(&mut command, gid);
            }
            let guard = Guard::spawn(command, format!("nats-server n{i} ({client})"))?;
            servers.push(NatsProc {
                guard,
                addr: *client,
                // nats-server binds monitoring on the client host (-a).
                monitor: *monitor,
            });
        }
        for server in &mut servers {
            let addr = server.addr;
            let want = ips.len().saturating_sub(1);
            server.guard.check_alive()?;
            poll(
                "nats-server cluster formed",
                Duration::from_secs(20),
                Duration::from_millis(50),
                || async move {
                    let nats = Nats::connect(addr, None).await.ok()?;
                    // Own url may or may not be listed; the others must be.
                    (nats.connect_urls.len() >= want).then_some(())
                },
            )
            .await
            .with_context(|| format!("nats-server at {addr}"))?;
        }
        Ok(servers)
    }
}
