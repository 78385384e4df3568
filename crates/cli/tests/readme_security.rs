//! The README's "Tokens, publish credentials and TLS" lines, run as written: the shell block
//! between `<!-- security-example:begin -->` and `<!-- security-example:end -->`, in an empty
//! directory, with this build's `streamfarm` first on the `PATH`. It makes a CA and two node
//! certificates (`streamfarm cert`), tokens (`streamfarm token`), starts two TLS nodes whose relay
//! links are mutual TLS, and shows a message delivered over `wss://` with a token, then three
//! refusals that stop `streamfarm sub`. The nodes listen on 127.0.0.1:7443 and 127.0.0.2:7443,
//! ports no other test uses.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BEGIN: &str = "<!-- security-example:begin -->";
const END: &str = "<!-- security-example:end -->";

/// The shell lines of the README's marked block, without their fence.
fn readme_block() -> String {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md");
    let start = text
        .find(BEGIN)
        .expect("the README marks its security example")
        + BEGIN.len();
    let end = start + text[start..].find(END).expect("the example's end marker");
    let block = text[start..end].trim();
    let body = block
        .strip_prefix("```sh")
        .and_then(|b| b.strip_suffix("```"))
        .expect("one ```sh block between the markers");
    body.to_string()
}

/// Kills the script's process group (the nodes it started included) when dropped.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .status();
    }
}

#[test]
fn the_readme_security_lines_run_as_written() {
    let script = readme_block();
    let dir = std::env::temp_dir().join(format!("sf-readme-security-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_streamfarm"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (out, err) = (dir.join("script.stdout"), dir.join("script.stderr"));
    let mut child = Command::new("bash")
        .args(["-eu", "-o", "pipefail", "-c", &script])
        .current_dir(&dir)
        .env("PATH", path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .process_group(0)
        .spawn()
        .expect("bash runs");
    let group = Group(child.id());
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(group);
    let _ = child.wait();
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let report = format!(
        "status {status:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- n1.log\n{}\n--- n2.log\n{}",
        log("n1.log"),
        log("n2.log")
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the README's lines failed or ran past 120 s:\n{report}"
    );

    // Delivered over wss:// with a token: both messages, in order, each with its offset.
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("# connected wss://127.0.0.")),
        "{report}"
    );
    let first = lines
        .iter()
        .position(|l| l.starts_with("prices.eur ") && l.ends_with(" 1.0842"));
    let second = lines
        .iter()
        .position(|l| l.starts_with("prices.eur ") && l.ends_with(" 1.0843"));
    assert!(
        matches!((first, second), (Some(a), Some(b)) if a < b),
        "both messages, in order:\n{report}"
    );

    // Three refusals, each named, each stopping `sub` with status 1.
    assert_eq!(
        stdout.matches("exit 1").count(),
        3,
        "three refused subs:\n{report}"
    );
    assert!(
        stdout.contains("refused the subscription: forbidden"),
        "{report}"
    );
    assert!(stdout.contains("closed (4011) invalid token"), "{report}");
    assert!(
        stdout.contains("was refused: it names n1, 127.0.0.1 but not localhost"),
        "{report}"
    );
    assert!(stderr.contains("sub stops:"), "{report}");

    // The keys are private to their owner.
    use std::os::unix::fs::PermissionsExt;
    for key in ["certs/ca.key", "certs/n1.key", "certs/n2.key"] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
