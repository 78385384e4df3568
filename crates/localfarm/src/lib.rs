//! A farm of `streamfarm serve` child processes on this machine.
//!
//! The demo, the benchmarks and the integration tests all run real nodes as child processes on
//! 127.0.0.x addresses (every 127/8 address works on Linux without setup), so that a node can be
//! killed, stopped and continued like a real server. This crate owns that: starting a node with
//! its flags, waiting until it serves, signalling it, and making sure no child outlives its owner
//! ([`ProcessGuard`] kills and reaps on drop, even when a test fails half-way).
//!
//! It also holds the few plain-socket reads these callers share: a free TCP+UDP port
//! ([`free_port`]; a node gossips over UDP on its listen port by default), one HTTP request
//! ([`http`]) and a Prometheus value ([`prometheus_value`]).
//!
//! [`partition`] cuts one node off from the others with nftables on loopback (root only).
//!
//! Children's stderr is discarded unless `STREAMFARM_CHILD_LOGS` is set; its value is then the
//! children's `RUST_LOG` (e.g. `STREAMFARM_CHILD_LOGS=debug cargo test …`).

pub mod partition;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
pub use rustix::process::Signal;
use rustix::process::{Pid, kill_process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The variable that keeps children's stderr, and sets their `RUST_LOG`.
pub const CHILD_LOGS_VAR: &str = "STREAMFARM_CHILD_LOGS";

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ProcessGuard {
    child: Option<Child>,
    /// What it is, for errors ("node a (127.0.0.1:7400)").
    pub what: String,
}

impl ProcessGuard {
    /// Starts `command` with stdin and stdout closed, and stderr discarded unless
    /// [`CHILD_LOGS_VAR`] is set.
    pub fn spawn(mut command: Command, what: impl Into<String>) -> anyhow::Result<ProcessGuard> {
        let what = what.into();
        let stderr = match std::env::var(CHILD_LOGS_VAR) {
            Ok(filter) => {
                command.env("RUST_LOG", filter);
                Stdio::inherit()
            }
            Err(_) => Stdio::null(),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(ProcessGuard {
            child: Some(child),
            what,
        })
    }

    /// The process id (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (e.g. [`Signal::STOP`], [`Signal::CONT`], [`Signal::TERM`]).
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = i32::try_from(self.pid())
            .ok()
            .and_then(Pid::from_raw)
            .with_context(|| format!("{} is not running", self.what))?;
        kill_process(pid, signal).with_context(|| format!("cannot signal {}", self.what))
    }

    /// SIGKILL now (after SIGCONT, so a stopped process dies at once) and reap.
    pub fn kill(&mut self) {
        let _ = self.signal(Signal::CONT);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The exit status if the process has exited (it is then reaped), `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Waits up to `within` for the process to exit by itself (after a SIGTERM, say): its exit
    /// status, or `None` if it still runs (it is then left running).
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if self.child.is_none() || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails when the process has already exited (it crashed, or could not bind).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!("{} exited early: {status}", self.what);
        }
        Ok(())
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How to start one `streamfarm serve`.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// `--name`.
    pub name: String,
    /// `--listen`; the node gossips on the same address over UDP.
    pub listen: SocketAddr,
    /// `--join`, once per address.
    pub join: Vec<SocketAddr>,
    /// Further flags, e.g. `["--priority", "B"]`.
    pub extra: Vec<String>,
    /// Tokio worker threads (`TOKIO_WORKER_THREADS`); `None` keeps tokio's default (one per core).
    pub workers: Option<usize>,
    /// The group id to run the node with (`setgid`, root only), so that firewall rules can tell
    /// its packets apart (`meta skgid`); `None` keeps this process's.
    pub gid: Option<u32>,
}

impl NodeSpec {
    /// A node `name` on `listen`, joining nobody, with default settings.
    pub fn new(name: impl Into<String>, listen: SocketAddr) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            listen,
            join: Vec::new(),
            extra: Vec::new(),
            workers: None,
            gid: None,
        }
    }

    /// Adds `--join addr`.
    pub fn join(mut self, addr: SocketAddr) -> NodeSpec {
        self.join.push(addr);
        self
    }

    /// Adds flags (`["--priority", "B"]`).
    pub fn flags<S: ToString>(mut self, flags: impl IntoIterator<Item = S>) -> NodeSpec {
        self.extra.extend(flags.into_iter().map(|f| f.to_string()));
        self
    }

    fn command(&self, exe: &Path) -> Command {
        let mut command = Command::new(exe);
        command
            .arg("serve")
            .args(["--name", &self.name])
            .args(["--listen", &self.listen.to_string()])
            .args(self.extra.iter())
            .env("RUST_LOG", "error");
        for join in &self.join {
            command.args(["--join", &join.to_string()]);
        }
        if let Some(workers) = self.workers {
            command.env("TOKIO_WORKER_THREADS", workers.to_string());
        }
        if let Some(gid) = self.gid {
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        command
    }
}

/// A running `streamfarm serve` child; killed when dropped.
#[derive(Debug)]
pub struct NodeProcess {
    /// The process.
    pub guard: ProcessGuard,
    /// `--name`.
    pub name: String,
    /// `--listen`: its HTTP/WebSocket address (and UDP gossip address).
    pub listen: SocketAddr,
    /// How it was started (a restart uses it again).
    spec: NodeSpec,
    exe: PathBuf,
}

impl NodeProcess {
    /// Starts the node without waiting for it.
    pub fn spawn(exe: &Path, spec: &NodeSpec) -> anyhow::Result<NodeProcess> {
        let what = format!("node {} ({})", spec.name, spec.listen);
        Ok(NodeProcess {
            guard: ProcessGuard::spawn(spec.command(exe), what)?,
            name: spec.name.clone(),
            listen: spec.listen,
            spec: spec.clone(),
            exe: exe.to_path_buf(),
        })
    }

    /// Starts the node and waits until it serves (`GET /healthz` answers), at most 20 s.
    pub async fn start(exe: &Path, spec: &NodeSpec) -> anyhow::Result<NodeProcess> {
        let mut node = NodeProcess::spawn(exe, spec)?;
        node.wait_ready(Duration::from_secs(20)).await?;
        Ok(node)
    }

    /// Kills the node (SIGKILL) and starts it again with the same settings, plus `--join join`
    /// when given, without waiting for it (see [`NodeProcess::wait_ready`]).
    pub fn restart(&mut self, join: Option<SocketAddr>) -> anyhow::Result<()> {
        self.guard.kill();
        if let Some(join) = join
            && !self.spec.join.contains(&join)
        {
            self.spec.join.push(join);
        }
        self.guard = NodeProcess::spawn(&self.exe, &self.spec)?.guard;
        Ok(())
    }

    /// The process id (0 once killed).
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// SIGKILL now, and reap.
    pub fn kill(&mut self) {
        self.guard.kill();
    }

    /// Sends `signal` (e.g. [`Signal::STOP`]).
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        self.guard.signal(signal)
    }

    /// Waits until `GET /healthz` answers; fails at once if the process has exited.
    pub async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
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

    /// The streaming url.
    pub fn url(&self) -> String {
        format!("ws://{}/stream", self.listen)
    }

    /// A counter or gauge of the node's `/metrics`.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = http(self.listen, "GET", "/metrics", &[], "").await?;
        prometheus_value(&text, name).with_context(|| format!("no metric {name}"))
    }
}

/// The value of an unlabelled metric in Prometheus text.
pub fn prometheus_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// One HTTP/1.1 request (`Connection: close`, 5 s at most) answered `2xx`: returns the body.
/// Plain TCP, no TLS, no chunked decoding (nodes and nats-server send a `Content-Length`).
pub async fn http(
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

/// A port free on `ip` for both TCP and UDP (a node gossips on its listen port number), found by
/// binding port 0. Another process may take it before it is used; a node that cannot bind exits,
/// which [`NodeProcess::wait_ready`] reports.
pub fn free_port(ip: IpAddr) -> anyhow::Result<SocketAddr> {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind((ip, 0))
            .with_context(|| format!("cannot bind {ip} (is it a local address?)"))?;
        let addr = tcp.local_addr()?;
        if std::net::UdpSocket::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no port free for both TCP and UDP on {ip}")
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
    fn free_port_is_bindable_for_tcp_and_udp() {
        let addr = free_port(IpAddr::from([127, 0, 0, 7])).unwrap();
        std::net::TcpListener::bind(addr).unwrap();
        std::net::UdpSocket::bind(addr).unwrap();
    }

    #[tokio::test]
    async fn a_guard_signals_and_kills_its_child_on_drop() {
        let guard = ProcessGuard::spawn(
            {
                let mut c = Command::new("sleep");
                c.arg("60");
                c
            },
            "sleep",
        )
        .unwrap();
        let pid = guard.pid();
        guard.signal(Signal::STOP).unwrap();
        drop(guard);
        // Reaped: no process with that pid is ours any more.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                !stat.contains("(sleep)")
            }
        );
    }

    #[tokio::test]
    async fn wait_exit_sees_a_terminated_child() {
        let mut guard = ProcessGuard::spawn(
            {
                let mut c = Command::new("sleep");
                c.arg("60");
                c
            },
            "sleep",
        )
        .unwrap();
        assert!(guard.wait_exit(Duration::from_millis(50)).await.is_none());
        guard.signal(Signal::TERM).unwrap();
        let status = guard
            .wait_exit(Duration::from_secs(5))
            .await
            .expect("exits");
        assert!(!status.success());
        assert!(
            guard.check_alive().is_ok(),
            "a reaped child is not 'exited early'"
        );
    }
}
