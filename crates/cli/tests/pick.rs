//! `streamfarm pick`, run as the built binary on real files, stdin and a real HTTP socket.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use streamfarm_core::encoding::{self, Format};

/// The description's worked example, in its own text format.
/// The description's example list, as shipped for the README's `pick` command.
const EXAMPLE: &str = include_str!("../../../examples/farm.txt");

/// A scratch file that removes itself.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("streamfarm-pick-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pick(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_streamfarm"))
        .arg("pick")
        .args(args)
        .output()
        .expect("the streamfarm binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// The probability column of the line for `url`.
fn probability(out: &str, url: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.split_whitespace().any(|f| f == url))
        .unwrap_or_else(|| panic!("no line for {url} in:\n{out}"));
    line.split_whitespace().last().unwrap().to_string()
}

fn picked(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("pick: "))
        .unwrap_or_else(|| panic!("no pick line in:\n{out}"))
        .to_string()
}

#[test]
fn description_example_gives_0_501_and_0_499() {
    let list = TempFile::new("example.txt", EXAMPLE);
    let output = pick(&["--list", list.path(), "--explain"]);
    let out = stdout(&output);
    assert!(output.status.success(), "{out}{}", stderr(&output));
    assert_eq!(
        probability(&out, "http://serverA.caplin.com"),
        "0.501",
        "{out}"
    );
    assert_eq!(
        probability(&out, "http://serverN.caplin.com"),
        "0.499",
        "{out}"
    );
    assert_eq!(
        probability(&out, "http://serverB.caplin.com"),
        "0.000",
        "{out}"
    );
    assert!(
        ["http://serverA.caplin.com", "http://serverN.caplin.com"].contains(&picked(&out).as_str())
    );
    // The explanation: the group, each verdict, the formula with its numbers.
    assert!(out.contains("group: A"), "{out}");
    assert!(
        out.contains("http://serverB.caplin.com: not UP (DOWN)"),
        "{out}"
    );
    assert!(out.contains("(1 - 2963/5942) / (2 - 1) = 0.501"), "{out}");
    assert!(out.contains("<- pick"), "{out}");
}

#[test]
fn json_list_is_detected_and_names_are_shown() {
    let json = r#"{"servers":[
        {"name":"a","url":"ws://a:1/s","status":"UP","users":100,"priority":"A"},
        {"name":"b","url":"ws://b:1/s","status":"UP","users":200,"priority":"A"},
        {"name":"c","url":"ws://c:1/s","status":"UP","users":700,"priority":"A"},
        {"name":"d","url":"ws://d:1/s","status":"UP","users":0,"priority":"B"}]}"#;
    let list = TempFile::new("list.json", json);
    let output = pick(&["--list", list.path(), "--explain", "--seed", "7"]);
    let out = stdout(&output);
    assert!(output.status.success(), "{out}{}", stderr(&output));
    assert!(out.lines().next().unwrap().starts_with("NAME"), "{out}");
    assert_eq!(probability(&out, "ws://a:1/s"), "0.450");
    assert_eq!(probability(&out, "ws://b:1/s"), "0.400");
    assert_eq!(probability(&out, "ws://c:1/s"), "0.150");
    assert_eq!(probability(&out, "ws://d:1/s"), "0.000");
    assert!(out.contains("ws://d:1/s: less-preferred group"), "{out}");
}

#[test]
fn same_seed_same_pick() {
    let list = TempFile::new("seed.txt", EXAMPLE);
    let picks: Vec<String> = (0..2)
        .map(|_| picked(&stdout(&pick(&["--list", list.path(), "--seed", "42"]))))
        .collect();
    assert_eq!(picks[0], picks[1]);
}

#[test]
fn excluded_server_gets_nothing() {
    let list = TempFile::new("exclude.txt", EXAMPLE);
    let output = pick(&[
        "--list",
        list.path(),
        "--exclude",
        "http://serverA.caplin.com",
        "--explain",
    ]);
    let out = stdout(&output);
    assert!(output.status.success(), "{out}{}", stderr(&output));
    assert_eq!(probability(&out, "http://serverA.caplin.com"), "0.000");
    assert_eq!(probability(&out, "http://serverN.caplin.com"), "1.000");
    assert_eq!(picked(&out), "http://serverN.caplin.com");
    assert!(
        out.contains("http://serverA.caplin.com: excluded by the client"),
        "{out}"
    );
}

#[test]
fn nothing_live_exits_non_zero_and_says_why() {
    let list = TempFile::new("dead.txt", "ws://a/s DOWN 0 A\nws://b/s DRAINING 3 A\n");
    let output = pick(&["--list", list.path()]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("no server available: 2 listed, 2 not UP"),
        "{err}"
    );
    assert!(!stdout(&output).contains("pick:"));

    let list = TempFile::new("excluded.txt", "ws://a/s UP 0 A\n");
    let output = pick(&["--list", list.path(), "--exclude", "ws://a/s"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("1 excluded"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn malformed_list_names_the_line_and_field() {
    let list = TempFile::new("bad.txt", "# farm\nws://a/s UP 1 A\nws://b/s UP lots A\n");
    let output = pick(&["--list", list.path()]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains(
            "text list, line 3, field USERS: expected a non-negative integer, found \"lots\""
        ),
        "{err}"
    );

    let list = TempFile::new(
        "bad.json",
        "{\"servers\":[\n{\"url\":\"u\",\"status\":\"UP\",\"users\":-1,\"priority\":\"A\"}]}",
    );
    let output = pick(&["--list", list.path()]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("json list, line 2"),
        "{}",
        stderr(&output)
    );

    let output = pick(&["--list", "/nonexistent/streamfarm/list"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("/nonexistent/streamfarm/list"));
}

#[test]
fn every_encoding_and_stdin_are_read() {
    let list = encoding::parse(EXAMPLE, Format::Text).unwrap();
    for format in Format::ALL {
        let mut child = Command::new(env!("CARGO_BIN_EXE_streamfarm"))
            .args(["pick", "--list", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(encoding::render(&list, format).as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let out = stdout(&output);
        assert!(output.status.success(), "{format}: {}", stderr(&output));
        assert_eq!(
            probability(&out, "http://serverA.caplin.com"),
            "0.501",
            "{format}"
        );
    }
}

#[test]
fn unknown_policy_is_refused_and_every_known_one_runs() {
    let list = TempFile::new("policies.txt", EXAMPLE);
    let output = pick(&["--list", list.path(), "--policy", "fastest"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("unknown policy"));
    for policy in streamfarm_core::Policy::ALL {
        let output = pick(&[
            "--list",
            list.path(),
            "--policy",
            policy.name(),
            "--explain",
        ]);
        assert!(output.status.success(), "{policy}: {}", stderr(&output));
        assert!(stdout(&output).contains(&format!("policy: {policy}")));
    }
}

/// Serves one HTTP request on a fresh 127.0.0.1 port with `response`; the thread gives back the
/// request line, or `None` if no request came within 10 s (so a broken binary fails the test
/// instead of hanging it).
fn serve_once(response: String) -> (String, std::thread::JoinHandle<Option<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return None,
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                _ => return None,
            }
        }
        stream.write_all(response.as_bytes()).unwrap();
        Some(
            String::from_utf8_lossy(&request)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        )
    });
    (address, server)
}

#[test]
fn url_without_path_fetches_farm_over_http() {
    let body = encoding::render(
        &encoding::parse(EXAMPLE, Format::Text).unwrap(),
        Format::Json,
    );
    let (address, server) = serve_once(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ));
    let output = pick(&["--list", &format!("http://{address}")]);
    assert_eq!(
        server.join().unwrap().as_deref(),
        Some("GET /farm HTTP/1.1")
    );
    let out = stdout(&output);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(probability(&out, "http://serverN.caplin.com"), "0.499");
}

#[test]
fn http_error_status_is_reported() {
    let (address, server) = serve_once(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            .to_string(),
    );
    let output = pick(&["--list", &format!("http://{address}/farm")]);
    assert_eq!(
        server.join().unwrap().as_deref(),
        Some("GET /farm HTTP/1.1")
    );
    assert!(!output.status.success());
    assert!(stderr(&output).contains("HTTP 503"), "{}", stderr(&output));
}
