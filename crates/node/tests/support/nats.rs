//! A real `nats-server` for the tests of the NATS relay: found on `PATH` (or in `/usr/sbin`), started on 127.0.0.x
//! with a port of its own, ready when it accepts connections (10 s at most), killed on drop — and,
//! should the test process end first (the binary's shared server is never dropped), by a
//! watchdog shell that then removes its files too.
//!
//! `STREAMFARM_TEST_RELAY=nats` makes [`use_test_relay`] put the nodes of a test on NATS: one
//! server for the test binary, and a subject prefix per test, so tests running side by side do
//! not hear each other.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use streamfarm_node::NodeConfig;

/// Most bytes in one NATS message: a topic's whole history must fit (`docs/NATS.md`).
const MAX_PAYLOAD: usize = 8 << 20;

/// A running `nats-server`.
pub struct NatsServer {
    addr: SocketAddr,
    /// The watchdog shell, whose child is the server.
    watchdog: Child,
    pid: u32,
    dir: std::path::PathBuf,
}

impl NatsServer {
    /// Starts a server on `ip` and a free port.
    pub fn start(ip: [u8; 4]) -> NatsServer {
        let port = TcpListener::bind(SocketAddr::from((ip, 0)))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        NatsServer::start_on(SocketAddr::from((ip, port)))
    }

    /// Starts a server on `addr` (a server killed before may still hold it for a moment: tried
    /// again for up to 10 s).
    pub fn start_on(addr: SocketAddr) -> NatsServer {
        static SERVERS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "streamfarm-nats-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!("listen: \"{addr}\"\nmax_payload: {MAX_PAYLOAD}\n",),
        )
        .expect("config written");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut server = NatsServer::spawn(addr, &conf, &dir);
            match server.wait_ready(deadline) {
                Ok(()) => return server,
                Err(why) if Instant::now() < deadline => {
                    eprintln!("nats-server on {addr} not ready ({why}): again");
                    server.kill();
                }
                Err(why) => panic!(
                    "nats-server on {addr}: {why}; its log: {}",
                    std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
                ),
            }
        }
    }

    fn spawn(addr: SocketAddr, conf: &std::path::Path, dir: &std::path::Path) -> NatsServer {
        let script = format!(
            "'{binary}' -c '{conf}' >>'{log}' 2>&1 & child=$!; echo $child; \
             while kill -0 {parent} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.2; done; \
             kill -9 $child 2>/dev/null; kill -0 {parent} 2>/dev/null || rm -rf '{dir}'",
            binary = binary().display(),
            dir = dir.display(),
            conf = conf.display(),
            log = dir.join("nats.log").display(),
            parent = std::process::id(),
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("sh runs");
        let mut line = String::new();
        BufReader::new(watchdog.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the watchdog names the server's pid");
        let pid = line.trim().parse().expect("a pid");
        NatsServer {
            addr,
            watchdog,
            pid,
            dir: dir.to_path_buf(),
        }
    }

    fn wait_ready(&mut self, deadline: Instant) -> Result<(), String> {
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Ok(Some(_)) = self.watchdog.try_wait() {
                return Err("it exited (is nats-server on PATH? is the port taken?)".into());
            }
            if Instant::now() >= deadline {
                return Err("not accepting connections after 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://ip:port`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the server at once (SIGKILL: no goodbye to its clients) and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.pid.to_string()])
            .status();
        // The watchdog ends once its child is gone.
        let _ = self.watchdog.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `nats-server` binary: on `PATH`, or where Debian's package puts it (`/usr/sbin`, not on
/// every user's `PATH`).
fn binary() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .expect("nats-server on PATH or in /usr/sbin (scripts/test.sh installs it)")
}

/// Whether this run's farm tests relay through NATS (`STREAMFARM_TEST_RELAY=nats`).
pub fn nats_wanted() -> bool {
    match std::env::var("STREAMFARM_TEST_RELAY").as_deref() {
        Ok("nats") => true,
        Ok("embedded") | Ok("") | Err(_) => false,
        Ok(other) => panic!("STREAMFARM_TEST_RELAY={other:?}: embedded or nats"),
    }
}

/// With `STREAMFARM_TEST_RELAY=nats`: relays `config`'s node through this test binary's
/// `nats-server` (started on first use, on 127.0.0.9), under a subject prefix of this test's own.
pub fn use_test_relay(config: &mut NodeConfig) {
    if !nats_wanted() {
        return;
    }
    static SERVER: OnceLock<NatsServer> = OnceLock::new();
    let server = SERVER.get_or_init(|| NatsServer::start([127, 0, 0, 9]));
    use_nats(config, &server.url());
}

/// Relays `config`'s node through NATS at `url`, under this test's subject prefix.
pub fn use_nats(config: &mut NodeConfig, url: &str) {
    // Each test runs on a thread of its own: its nodes share the thread's prefix.
    thread_local! {
        static PREFIX: String = {
            static TESTS: AtomicU64 = AtomicU64::new(0);
            format!("test{}.t{}", std::process::id(), TESTS.fetch_add(1, Ordering::Relaxed))
        };
    }
    config.relay = url.to_string();
    config.relay_subject_prefix = Some(PREFIX.with(Clone::clone));
}
