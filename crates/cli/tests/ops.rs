//! What an operator relies on, against real `streamfarm` processes: a node reachable from other
//! machines refuses to start without a farm secret (or `--insecure`); `/livez` and `/readyz`
//! follow draining and a cut-off; logs written to a file carry no colour codes and
//! `--log-format json` writes JSON lines; the histograms of `/metrics` move under load and
//! migrations (publish-to-delivery on every node, relayed messages included); and the deployment
//! files (Kubernetes, systemd, Grafana, alert rules) name only flags, variables, ports, paths and
//! metrics that the binary has (and the systemd unit passes `systemd-analyze verify` where systemd
//! is installed).
//!
//! Every wait polls a condition with a deadline; every child process is killed when its guard
//! drops, so a failing test leaves nothing running. Files go under Cargo's test temp directory.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use streamfarm_localfarm::free_port;

const ADMIN_TOKEN: &str = "ops-test-admin-token-0123456789";

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_streamfarm")
}

/// The repository's root (deployment files live under `deploy/`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A scratch directory of its own for one test, emptied first.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ops-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process, killed and reaped when dropped.
struct Child(std::process::Child);

impl Child {
    fn spawn(command: &mut Command) -> Child {
        Child(
            command
                .stdin(Stdio::null())
                .spawn()
                .expect("streamfarm starts"),
        )
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` every 20 ms until it holds; fails the test after `within`.
fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.0 request over a plain socket: the status code and body; `None` while the node
/// does not answer (2 s at most).
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some((code, body.to_string()))
}

fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    request(addr, "GET", path, "")
}

/// `GET /readyz`: its code and, when not ready, its reason.
fn readyz(addr: SocketAddr) -> Option<(u16, String)> {
    let (code, body) = get(addr, "/readyz")?;
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    let reason = json["reason"].as_str().unwrap_or("").to_string();
    Some((code, reason))
}

/// A metric's value in `/metrics` (the first series whose name and labels are exactly `series`).
fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (_, text) = get(addr, "/metrics").expect("/metrics answers");
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// `streamfarm serve` with a fast failure detection and an admin token, output discarded.
fn serve(name: &str, listen: SocketAddr, flags: &[&str]) -> Command {
    let mut command = Command::new(exe());
    command
        .args(["serve", "--name", name, "--listen", &listen.to_string()])
        .args([
            "--gossip-interval-ms",
            "100",
            "--failure-timeout-ms",
            "1000",
        ])
        .args(["--admin-token", ADMIN_TOKEN])
        .args(flags)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

fn start(name: &str, listen: SocketAddr, flags: &[&str]) -> Child {
    let node = Child::spawn(&mut serve(name, listen, flags));
    eventually(Duration::from_secs(10), "the node answers /livez", || {
        get(listen, "/livez").is_some_and(|(code, _)| code == 200)
    });
    node
}

#[test]
fn a_node_reachable_from_other_machines_needs_a_farm_secret_or_insecure() {
    let dir = scratch("secure");
    let any = IpAddr::from([0, 0, 0, 0]);
    let listen = free_port(any).unwrap();
    let local = SocketAddr::from(([127, 0, 0, 1], listen.port()));

    // No secret on 0.0.0.0: refused, in one line that says what to do.
    let out = Command::new(exe())
        .args(["serve", "--name", "open", "--listen", &listen.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "it started");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert!(stderr.contains("streamfarm secret new"), "{stderr}");
    assert!(get(local, "/livez").is_none(), "nothing serves");

    // --insecure, or STREAMFARM_INSECURE: it serves.
    for (flags, env) in [(&["--insecure"][..], None), (&[][..], Some("true"))] {
        let listen = free_port(any).unwrap();
        let local = SocketAddr::from(([127, 0, 0, 1], listen.port()));
        let mut insecure = Command::new(exe());
        insecure
            .args(["serve", "--name", "open", "--listen", &listen.to_string()])
            .args(flags)
            .env_remove("STREAMFARM_INSECURE")
            .envs(env.map(|value| ("STREAMFARM_INSECURE", value)))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _node = Child::spawn(&mut insecure);
        eventually(Duration::from_secs(10), "the insecure node serves", || {
            get(local, "/livez").is_some_and(|(code, _)| code == 200)
        });
    }

    // `streamfarm secret new`: a file only its owner reads, never overwritten; with it, it serves.
    let secret = dir.join("farm.secret");
    let path = secret.to_str().unwrap();
    let out = Command::new(exe())
        .args(["secret", "new", path])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
    let again = Command::new(exe())
        .args(["secret", "new", path])
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "an existing secret was overwritten"
    );
    let listen = free_port(any).unwrap();
    let local = SocketAddr::from(([127, 0, 0, 1], listen.port()));
    let mut with_secret = Command::new(exe());
    with_secret
        .args(["serve", "--name", "closed", "--listen", &listen.to_string()])
        .args(["--farm-secret-file", path])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _node = Child::spawn(&mut with_secret);
    eventually(
        Duration::from_secs(10),
        "the node with a secret serves",
        || get(local, "/livez").is_some_and(|(code, _)| code == 200),
    );
}

#[test]
fn readyz_fails_within_a_second_of_draining_or_a_cut_off_and_recovers() {
    let addr = |octet| free_port(IpAddr::from([127, 0, 0, octet])).unwrap();
    let (a, b, c) = (addr(1), addr(2), addr(3));
    let mut node_a = start("a", a, &[]);
    let join = a.to_string();
    let node_b = start("b", b, &["--join", &join]);
    let node_c = start("c", c, &["--join", &join]);
    eventually(Duration::from_secs(10), "a is ready", || {
        readyz(a).is_some_and(|(code, _)| code == 200)
    });
    eventually(Duration::from_secs(10), "a lists three servers UP", || {
        metric(a, "streamfarm_farm_servers{status=\"UP\"}") == 3.0
    });

    // DRAINING through `streamfarm drain` (what a preStop hook runs): not ready at once.
    let out = Command::new(exe())
        .args(["drain", &a.to_string(), "--wait", "5s"])
        .env("STREAMFARM_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let drained = Instant::now();
    let (code, reason) = readyz(a).unwrap();
    assert_eq!(code, 503);
    assert!(reason.contains("DRAINING"), "{reason}");
    assert!(drained.elapsed() < Duration::from_secs(1));
    assert_eq!(get(a, "/livez").unwrap().0, 200, "a draining node is alive");
    assert_eq!(request(a, "POST", "/admin/status", "UP").unwrap().0, 200);
    eventually(Duration::from_secs(1), "ready again once UP", || {
        readyz(a).is_some_and(|(code, _)| code == 200)
    });

    // Every peer silent at once (stopped, sockets open): a is cut off, and not ready. A node
    // knows it only once its peers were silent for the failure timeout (1 s here): not ready
    // within a second after that.
    for node in [&node_b, &node_c] {
        signal(node, "-STOP");
    }
    let cut_off = eventually(Duration::from_secs(5), "a not ready: cut off", || {
        readyz(a).is_some_and(|(code, reason)| code == 503 && reason.contains("cut off"))
    });
    assert!(
        cut_off < Duration::from_secs(2),
        "503 only {cut_off:?} after the cut (failure timeout 1 s)"
    );
    assert_eq!(get(a, "/livez").unwrap().0, 200, "a cut-off node is alive");
    for node in [&node_b, &node_c] {
        signal(node, "-CONT");
    }
    eventually(
        Duration::from_secs(5),
        "a ready again once back in touch",
        || readyz(a).is_some_and(|(code, _)| code == 200),
    );
    assert!(node_a.0.try_wait().unwrap().is_none());
}

/// Sends a signal with kill(1): the tests need no signal crate for two signals.
fn signal(node: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &node.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal}");
}

#[test]
fn a_log_written_to_a_file_has_no_escape_codes_and_json_lines_parse() {
    let dir = scratch("logs");
    for format in ["text", "json"] {
        let listen = free_port(IpAddr::from([127, 0, 0, 1])).unwrap();
        let path = dir.join(format!("node.{format}.log"));
        let file = std::fs::File::create(&path).unwrap();
        let mut command = serve("logs", listen, &["--log-format", format]);
        command.env("RUST_LOG", "info").stderr(file);
        let _node = Child::spawn(&mut command);
        let log = || std::fs::read_to_string(&path).unwrap_or_default();
        eventually(Duration::from_secs(10), "the node logs its start", || {
            log().contains("node started")
        });
        let text = log();
        assert!(
            !text.contains('\x1b'),
            "escape codes in the {format} log:\n{text:?}"
        );
        if format == "json" {
            for line in text.lines() {
                let event: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
                assert!(
                    event["level"].is_string() && event["timestamp"].is_string(),
                    "{line}"
                );
            }
            assert!(
                text.lines()
                    .any(|l| l.contains("\"message\":\"node started\"")),
                "{text}"
            );
        }
    }
}

#[test]
fn histograms_move_under_load_and_migrations() {
    let a = free_port(IpAddr::from([127, 0, 0, 1])).unwrap();
    let b = free_port(IpAddr::from([127, 0, 0, 2])).unwrap();
    let flags = ["--drain-period-ms", "1000", "--rebalance", "false"];
    let _node_a = start("a", a, &flags);
    let join = a.to_string();
    let _node_b = start("b", b, &[&flags[..], &["--join", join.as_str()]].concat());
    eventually(Duration::from_secs(10), "both nodes listed UP", || {
        metric(a, "streamfarm_farm_servers{status=\"UP\"}") == 2.0
    });
    let users = |addr| metric(addr, "streamfarm_connections");
    let count = |addr, name: &str| metric(addr, &format!("streamfarm_{name}_count"));
    const CLIENTS: f64 = 20.0;
    let mut load = Command::new(exe());
    load.args([
        "load",
        &format!("{a},{b}"),
        "--clients",
        "20",
        "--topic",
        "prices",
    ])
    .args(["--duration", "60s"])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _load = Child::spawn(&mut load);
    eventually(Duration::from_secs(20), "20 clients subscribed", || {
        users(a) + users(b) == CLIENTS
            && count(a, "subscribe_seconds") + count(b, "subscribe_seconds") >= CLIENTS
    });
    // Clients pick by load, so both nodes hold some: each delivers every message, one of them
    // as the topic's replica, the other from the relay.
    assert!(
        users(a) > 0.0 && users(b) > 0.0,
        "{} and {}",
        users(a),
        users(b)
    );
    assert!(
        metric(a, "streamfarm_subscribe_seconds_bucket{le=\"+Inf\"}")
            == count(a, "subscribe_seconds")
    );

    for n in 0..5 {
        let (code, _) = request(a, "POST", "/publish/prices", &format!("m{n}")).unwrap();
        assert_eq!(code, 200);
    }
    assert_eq!(count(a, "publish_seconds"), 5.0);
    // Publish to delivery: once per message on each node, the relayed ones included.
    eventually(
        Duration::from_secs(5),
        "every message timed on both nodes",
        || count(a, "delivery_seconds") >= 5.0 && count(b, "delivery_seconds") >= 5.0,
    );
    let relayed = metric(a, "streamfarm_relay_messages_in_total")
        + metric(b, "streamfarm_relay_messages_in_total");
    assert!(relayed >= 5.0, "{relayed} messages relayed");
    for node in [a, b] {
        assert_eq!(count(node, "delivery_seconds"), 5.0, "once per message");
        // Within the buckets: a timestamp read in the wrong unit would land in +Inf.
        assert_eq!(
            metric(node, "streamfarm_delivery_seconds_bucket{le=\"30\"}"),
            5.0
        );
    }

    // Drain the node with more clients: they move, and resume from their positions elsewhere.
    let (from, to) = if users(a) >= users(b) { (a, b) } else { (b, a) };
    let moving = users(from);
    assert!(moving > 0.0);
    assert_eq!(
        request(from, "POST", "/admin/status", "DRAINING")
            .unwrap()
            .0,
        200
    );
    eventually(Duration::from_secs(20), "every client moved", || {
        users(from) == 0.0 && users(to) == CLIENTS
    });
    eventually(
        Duration::from_secs(5),
        "migrations and recoveries recorded",
        || {
            count(from, "migration_seconds") >= 1.0
                && metric(to, "streamfarm_resubscriptions_total") >= moving
                && count(to, "recovery_messages") >= moving
        },
    );
}

#[test]
fn deployment_files_name_only_flags_variables_paths_and_metrics_the_binary_has() {
    let listen = free_port(IpAddr::from([127, 0, 0, 1])).unwrap();
    let _node = start("deploy", listen, &[]);
    let (_, metrics) = get(listen, "/metrics").unwrap();
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split([' ', '{']).next())
        .collect();

    // Every metric a dashboard query or an alert names is in a live node's /metrics.
    let deploy = repo().join("deploy");
    let dashboard = std::fs::read_to_string(deploy.join("grafana/streamfarm.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(queries.len() >= 10, "{} queries", queries.len());
    let alerts = std::fs::read_to_string(deploy.join("prometheus/streamfarm-alerts.yaml")).unwrap();
    queries.extend(
        alerts
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(str::to_string),
    );
    let mut named = 0;
    for query in &queries {
        for name in words(query, "streamfarm_") {
            assert!(
                exported.contains(name.as_str()),
                "{name} (in {query:?}) is not in /metrics"
            );
            named += 1;
        }
    }
    assert!(
        named >= queries.len(),
        "queries without a streamfarm metric"
    );
    for histogram in [
        "publish_seconds",
        "subscribe_seconds",
        "migration_seconds",
        "recovery_messages",
        "delivery_seconds",
    ] {
        let bucket = format!("streamfarm_{histogram}_bucket");
        assert!(exported.contains(bucket.as_str()), "{bucket} not exported");
        assert!(
            queries.iter().any(|q| q.contains(&bucket)),
            "the dashboard does not show {bucket}"
        );
    }

    // Every STREAMFARM_* variable is one the binary reads, and every command line parses.
    let files = [
        "kubernetes/statefulset.yaml",
        "kubernetes/services.yaml",
        "kubernetes/poddisruptionbudget.yaml",
        "systemd/streamfarm.service",
        "systemd/streamfarm.env",
    ];
    let help = |sub: &str| {
        let out = Command::new(exe()).args([sub, "--help"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let known = format!("{}{}", help("serve"), help("drain"));
    let mut commands = 0;
    for file in files {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        for variable in words(&text, "STREAMFARM_") {
            // clap writes `[env: NAME=value]`, or `[env: NAME]` for hidden values.
            assert!(
                known.contains(&format!("env: {variable}="))
                    || known.contains(&format!("env: {variable}]")),
                "{file}: {variable} is not a variable of streamfarm serve or drain"
            );
        }
        for args in command_lines(&text) {
            commands += 1;
            let out = Command::new(exe())
                .args(&args)
                .arg("--help")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{file}: `streamfarm {}` does not parse: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    assert_eq!(
        commands, 4,
        "serve and drain in the StatefulSet and the unit"
    );

    // The probes, the scrape path and the ports of the manifests are the node's.
    let statefulset = std::fs::read_to_string(deploy.join("kubernetes/statefulset.yaml")).unwrap();
    let paths: Vec<String> = values(&statefulset, "path:")
        .into_iter()
        .chain(values(&statefulset, "prometheus.io/path:"))
        .filter(|path| path.starts_with('/'))
        .collect();
    assert!(paths.len() >= 3, "{paths:?}");
    for path in paths {
        let (code, _) = get(listen, &path).unwrap_or_else(|| panic!("{path} does not answer"));
        assert!(code == 200, "{path} answered {code}");
    }
    let port = statefulset
        .split("$(POD_IP):")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("STREAMFARM_LISTEN is $(POD_IP):PORT");
    let services = std::fs::read_to_string(deploy.join("kubernetes/services.yaml")).unwrap();
    for (file, text) in [("statefulset", &statefulset), ("services", &services)] {
        for key in ["containerPort:", "port:", "prometheus.io/port:"] {
            // Named ports (`port: http`) refer to the container port checked here.
            for value in values(text, key)
                .into_iter()
                .filter(|v| v.parse::<u16>().is_ok())
            {
                assert_eq!(value, port, "{file}: {key} {value} is not the listen port");
            }
        }
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    // Where systemd is not installed there is nothing to check the unit with.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: the unit is not verified");
        return;
    }
    let dir = scratch("systemd");
    let deploy = repo().join("deploy/systemd");
    // The unit as installed, with the binary and settings of this checkout in place of
    // /usr/local/bin and /etc (verify checks that ExecStart's program exists).
    let unit = std::fs::read_to_string(deploy.join("streamfarm.service"))
        .unwrap()
        .replace("/usr/local/bin/streamfarm", exe())
        .replace(
            "/etc/streamfarm/streamfarm.env",
            deploy.join("streamfarm.env").to_str().unwrap(),
        );
    let path = dir.join("streamfarm.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    // It warns about unknown keys and bad values without failing: any output is a finding.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// The distinct words of `text` that start with `prefix` and go on (letters, digits, `_`).
fn words(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .filter(|(at, _)| {
            !text[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        // `STREAMFARM_*` in prose names no variable.
        .filter(|word| word.len() > prefix.len())
        .collect()
}

/// The arguments of every `streamfarm` command in a manifest (`command: ["streamfarm", …]`) or a
/// unit (`Exec…=/usr/local/bin/streamfarm …`), without the program.
fn command_lines(text: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(list) = line.strip_prefix("command: [") {
            let args: Vec<String> = list
                .trim_end_matches(']')
                .split(',')
                .map(|a| a.trim().trim_matches('"').to_string())
                .collect();
            if args.first().is_some_and(|p| p == "streamfarm") {
                found.push(args[1..].to_vec());
            }
        } else if line.starts_with("Exec")
            && let Some((_, command)) = line.split_once("/streamfarm ")
        {
            found.push(command.split_whitespace().map(str::to_string).collect());
        }
    }
    found
}

/// The values of `key: value` lines (quotes removed).
fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix(key))
        .map(|v| v.trim().trim_matches('"').to_string())
        .collect()
}
