//! Child processes (nodes, nats-servers) that are always killed, and the small HTTP and /proc
//! reads the benchmarks need to watch them.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A child process killed (SIGKILL) and reaped when dropped, so no benchmark leaves one behind,
/// even when it fails half-way.
#[derive(Debug)]
pub(crate) struct Guard {
    child: Option<Child>,
    /// What it is, for errors.
    pub(crate) what: String,
}

impl Guard {
    /// Starts `command` with its output discarded (stderr kept when `STREAMFARM_BENCH_LOG` is set).
    pub(crate) fn spawn(mut command: Command, what: impl Into<String>) -> anyhow::Result<Guard> {
        let what = what.into();
        let stderr = if std::env::var_os("STREAMFARM_BENCH_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Guard {
            child: Some(child),
            what,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL now and reap.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Fails when the process has already exited (it crashed or could not bind).
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!("{} exited early: {status}", self.what);
        }
        Ok(())
    }

    /// Resident set size, bytes (VmRSS of /proc/PID/status).
    pub(crate) fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// CPU time (user + system) a process has used so far, seconds, from /proc/PID/stat (clock ticks
/// of 1/100 s, Linux's `USER_HZ` on every common architecture).
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3; utime is 14.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// VmRSS of a process, bytes.
pub(crate) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

/// Settings of one `streamfarm serve` child.
#[derive(Debug, Clone)]
pub(crate) struct NodeSpec {
    pub(crate) name: String,
    pub(crate) listen: SocketAddr,
    pub(crate) join: Vec<SocketAddr>,
    /// Extra flags, e.g. `--heartbeat-interval-ms 30000`.
    pub(crate) extra: Vec<String>,
    /// Tokio worker threads (`TOKIO_WORKER_THREADS`); `None` keeps tokio's default (one per core).
    pub(crate) workers: Option<usize>,
}

impl NodeSpec {
    pub(crate) fn new(name: impl Into<String>, listen: SocketAddr) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            listen,
            join: Vec::new(),
            extra: Vec::new(),
            workers: None,
        }
    }
}

/// A running `streamfarm serve` child.
#[derive(Debug)]
pub(crate) struct NodeProc {
    pub(crate) guard: Guard,
    pub(crate) name: String,
    pub(crate) listen: SocketAddr,
}

impl NodeProc {
    /// The streaming url.
    pub(crate) fn url(&self) -> String {
        format!("ws://{}/stream", self.listen)
    }

    /// Starts the node (its gossip on the listen address, over UDP) without waiting for it.
    pub(crate) fn spawn(exe: &Path, spec: &NodeSpec) -> anyhow::Result<NodeProc> {
        let mut command = Command::new(exe);
        command
            .arg("serve")
            .arg("--name")
            .arg(&spec.name)
            .arg("--listen")
            .arg(spec.listen.to_string())
            .args(spec.extra.iter())
            .env("RUST_LOG", "error");
        for join in &spec.join {
            command.arg("--join").arg(join.to_string());
        }
        if let Some(workers) = spec.workers {
            command.env("TOKIO_WORKER_THREADS", workers.to_string());
        }
        let guard = Guard::spawn(command, format!("node {} ({})", spec.name, spec.listen))?;
        Ok(NodeProc {
            guard,
            name: spec.name.clone(),
            listen: spec.listen,
        })
    }

    /// Starts the node and waits until `GET /healthz` answers.
    pub(crate) async fn start(exe: &Path, spec: &NodeSpec) -> anyhow::Result<NodeProc> {
        let mut node = NodeProc::spawn(exe, spec)?;
        node.wait_ready(Duration::from_secs(20)).await?;
        Ok(node)
    }

    /// Waits until `GET /healthz` answers.
    pub(crate) async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.guard.check_alive()?;
            if http(self.listen, "GET", "/healthz", &[], "").await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} not ready after {within:?}", self.guard.what);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A counter or gauge of the node's `/metrics`.
    pub(crate) async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = http(self.listen, "GET", "/metrics", &[], "").await?;
        prometheus_value(&text, name).with_context(|| format!("no metric {name}"))
    }
}

/// The value of an unlabelled metric in Prometheus text.
pub(crate) fn prometheus_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// One HTTP/1.1 request (`Connection: close`) answered `2xx`: returns the body. Plain TCP, no
/// TLS, no chunked decoding (the nodes and nats-server send a `Content-Length`).
pub(crate) async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("{method} http://{addr}{path}: timed out"))??;
    let status_ok = response
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.starts_with('2'));
    if !status_ok {
        bail!(
            "{method} http://{addr}{path}: {}",
            response.lines().next().unwrap_or("")
        );
    }
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string()))
}

/// A port free on `ip` for both TCP and UDP (gossip shares the listen port number), found by
/// binding port 0. Another process may take it before we use it; the callers tolerate a failed
/// start by reporting it.
pub(crate) fn free_port(ip: IpAddr) -> anyhow::Result<SocketAddr> {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind((ip, 0))?;
        let addr = tcp.local_addr()?;
        if std::net::UdpSocket::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no port free for both TCP and UDP on {ip}")
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (children inherit it) and returns the limit now
/// in force.
pub(crate) fn raise_nofile() -> u64 {
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    let _ = rlimit::Resource::NOFILE.set(hard, hard);
    rlimit::Resource::NOFILE
        .get()
        .map_or(1024, |(soft, _)| soft)
}

/// Polls `check` every `every` until it returns `Some`, or fails after `within`.
pub(crate) async fn poll<T, F, Fut>(
    what: &str,
    within: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_value_finds_unlabelled_metric() {
        let text = "# HELP a x\n# TYPE a counter\na_total 12\na 3\nb{x=\"1\"} 4\n";
        assert_eq!(prometheus_value(text, "a_total"), Some(12.0));
        assert_eq!(prometheus_value(text, "a"), Some(3.0));
        assert_eq!(prometheus_value(text, "b"), None);
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let spin = (0..2_000_000u64).fold(0u64, |a, b| a.wrapping_add(b * b));
        assert!(spin > 0);
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}
