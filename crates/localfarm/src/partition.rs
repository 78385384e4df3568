//! A network partition on loopback, made with nftables: one server cut off from the other servers
//! while its clients still reach it.
//!
//! Servers listen on 127.0.0.1–3 and the bench's clients connect from other addresses
//! (127.0.0.20–27, the publisher from 127.0.0.30), so the partition drops what passes between the
//! isolated server's address and the other servers', both ways, TCP and UDP. Addresses alone are
//! not enough: a server *dials* its peers (streamfarm's relay links, nats-server's routes) from
//! the kernel's default source for 127/8, which is 127.0.0.1 for every process. So two more rules
//! cut the isolated server's own dials:
//! - the isolated server runs with its own group id ([`ISOLATED_GID`], set when it is started),
//!   and packets its sockets send to the other servers are dropped (`meta skgid`) — this also
//!   stops the dials it makes during the partition;
//! - packets to and from the local ports of the dials it already holds (read from
//!   `/proc/PID/fd` and `/proc/PID/net/tcp`) are dropped in both directions.
//!
//! Used by `streamfarm bench failover` (its partition case) and the partition test of the
//! `streamfarm` binary.
//!
//! The rules live in a table of their own, `inet streamfarm_bench_<pid>`, in the output hook
//! (every loopback packet passes it). [`Partition`] deletes the table when healed or dropped, and
//! [`Partition::isolate`] first deletes tables left by a bench process that no longer runs (one
//! killed by SIGKILL cannot clean up). It needs root and `nft`; [`Partition::unavailable`] says
//! why not otherwise.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

/// The group id the isolated server runs with, so its own packets can be told apart. Not a group
/// of this system (none needs to exist); the server still runs as root.
pub const ISOLATED_GID: u32 = 64_917;
/// Every table this bench makes starts with this, then the bench's pid.
const TABLE_PREFIX: &str = "streamfarm_bench_";

/// The server to isolate.
#[derive(Debug, Clone, Copy)]
pub struct Isolated {
    /// Its address (clients', peers' and gossip's).
    pub ip: Ipv4Addr,
    /// Its process, started with [`ISOLATED_GID`].
    pub pid: u32,
}

/// A partition in force; healed (its table deleted) by [`Partition::heal`] or on drop.
#[derive(Debug)]
pub struct Partition {
    table: String,
    healed: bool,
}

impl Partition {
    /// Why no partition can be made here (not root, no `nft`), or `None`.
    pub fn unavailable() -> Option<String> {
        if !is_root() {
            return Some("not root (nftables rules need it)".to_string());
        }
        match Command::new("nft")
            .args(["list", "tables"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
        {
            Err(err) => Some(format!(
                "nft not found ({err}); scripts/test.sh installs nftables"
            )),
            Ok(out) if !out.status.success() => Some(format!(
                "nft cannot list tables: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Ok(_) => None,
        }
    }

    /// Cuts `isolated` off from the servers at `others` (both ways, TCP and UDP).
    pub fn isolate(isolated: Isolated, others: &[Ipv4Addr]) -> anyhow::Result<Partition> {
        sweep_stale_tables();
        let ports = dial_ports(isolated.pid, others)?;
        let table = format!("{TABLE_PREFIX}{}", std::process::id());
        let ruleset = ruleset(&table, isolated.ip, others, &ports);
        nft_stdin(&ruleset).with_context(|| format!("cannot add the partition:\n{ruleset}"))?;
        Ok(Partition {
            table,
            healed: false,
        })
    }

    /// Cuts the addresses `from` off from `to` (both ways, TCP and UDP): for clients that can
    /// reach some servers and not others. A table of its own, beside any partition.
    pub fn block(from: &[Ipv4Addr], to: &[Ipv4Addr]) -> anyhow::Result<Partition> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        sweep_stale_tables();
        let table = format!(
            "{TABLE_PREFIX}{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let set = |ips: &[Ipv4Addr]| {
            let items: Vec<String> = ips.iter().map(ToString::to_string).collect();
            format!("{{ {} }}", items.join(", "))
        };
        let (from, to) = (set(from), set(to));
        let ruleset = format!(
            "table inet {table} {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    ip saddr {from} ip daddr {to} drop\n    ip saddr {to} ip daddr {from} drop\n  }}\n}}\n"
        );
        nft_stdin(&ruleset).with_context(|| format!("cannot add the block:\n{ruleset}"))?;
        Ok(Partition {
            table,
            healed: false,
        })
    }

    /// Deletes the rules.
    pub fn heal(mut self) -> anyhow::Result<()> {
        self.healed = true;
        delete_table(&self.table)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if !self.healed {
            let _ = delete_table(&self.table);
        }
    }
}

/// Set once Ctrl-C interrupted a failure window (see [`interruptible`]).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Failure windows now open.
static IN_WINDOW: AtomicUsize = AtomicUsize::new(0);

/// Waits `span`, the length of a failure that must be undone (a partition healed, a stopped
/// server continued) however the bench ends. Ctrl-C during it returns an error at once, so the
/// caller undoes the failure and its drop guards stop the servers; [`was_interrupted`] then
/// tells the run to stop. Listening for Ctrl-C replaces its default action for the rest of the
/// process, so outside the windows a listener ends the process on Ctrl-C (the child servers get
/// the terminal's SIGINT themselves).
pub async fn interruptible(span: Duration) -> anyhow::Result<()> {
    static AFTERWARDS: std::sync::Once = std::sync::Once::new();
    AFTERWARDS.call_once(|| {
        tokio::spawn(async {
            while tokio::signal::ctrl_c().await.is_ok() {
                // During a window the window's own listener undoes the failure first.
                if IN_WINDOW.load(Ordering::SeqCst) == 0 {
                    eprintln!("interrupted");
                    std::process::exit(130);
                }
            }
        });
    });
    IN_WINDOW.fetch_add(1, Ordering::SeqCst);
    let result = tokio::select! {
        _ = tokio::time::sleep(span) => Ok(()),
        _ = tokio::signal::ctrl_c() => {
            INTERRUPTED.store(true, Ordering::Relaxed);
            Err(anyhow::anyhow!("interrupted (Ctrl-C)"))
        }
    };
    IN_WINDOW.fetch_sub(1, Ordering::SeqCst);
    result
}

/// Whether Ctrl-C interrupted a failure window: the run should stop.
pub fn was_interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// The nft script of a partition of `ip` from `others`; `dial_ports` are the local ports (on
/// 127.0.0.1) of the isolated server's dials to them.
fn ruleset(table: &str, ip: Ipv4Addr, others: &[Ipv4Addr], dial_ports: &[u16]) -> String {
    let set = |items: Vec<String>| format!("{{ {} }}", items.join(", "));
    let default_source = Ipv4Addr::LOCALHOST;
    let peers = set(others.iter().map(ToString::to_string).collect());
    // Where the other servers' packets come from: their own addresses (gossip, answers) and the
    // default source of their dials.
    let mut from: Vec<String> = others.iter().map(ToString::to_string).collect();
    if !others.contains(&default_source) {
        from.push(default_source.to_string());
    }
    let from = set(from);
    let mut out = String::new();
    let _ = writeln!(out, "table inet {table} {{");
    let _ = writeln!(out, "  chain output {{");
    let _ = writeln!(
        out,
        "    type filter hook output priority 0; policy accept;"
    );
    let _ = writeln!(out, "    ip saddr {ip} ip daddr {from} drop");
    let _ = writeln!(out, "    ip saddr {from} ip daddr {ip} drop");
    let _ = writeln!(out, "    meta skgid {ISOLATED_GID} ip daddr {peers} drop");
    if !dial_ports.is_empty() {
        let ports = set(dial_ports.iter().map(ToString::to_string).collect());
        let _ = writeln!(
            out,
            "    ip saddr {default_source} ip daddr {peers} tcp sport {ports} drop"
        );
        let _ = writeln!(
            out,
            "    ip saddr {peers} ip daddr {default_source} tcp dport {ports} drop"
        );
    }
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "}}");
    out
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn nft_stdin(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn delete_table(table: &str) -> anyhow::Result<()> {
    let out = Command::new("nft")
        .args(["delete", "table", "inet", table])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run nft")?;
    if !out.status.success() {
        bail!(
            "nft delete table inet {table}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes the tables of bench processes that no longer run.
fn sweep_stale_tables() {
    let Ok(out) = Command::new("nft").args(["list", "tables"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "table inet streamfarm_bench_1234"
        let Some(name) = line.split_whitespace().nth(2) else {
            continue;
        };
        // "…_1234", or "…_1234_2" for a block.
        let Some(pid) = name
            .strip_prefix(TABLE_PREFIX)
            .map(|rest| rest.split('_').next().unwrap_or(rest))
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = delete_table(name);
        }
    }
}

/// The local ports, on 127.0.0.1, of process `pid`'s TCP connections to any of `peers`: the dials
/// it holds to them.
fn dial_ports(pid: u32, peers: &[Ipv4Addr]) -> anyhow::Result<Vec<u16>> {
    let mut inodes = HashSet::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("cannot list /proc/{pid}/fd"))?;
    for fd in fds.flatten() {
        if let Ok(link) = std::fs::read_link(fd.path())
            && let Some(inode) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))
        .with_context(|| format!("cannot read /proc/{pid}/net/tcp"))?;
    Ok(parse_dial_ports(&table, &inodes, peers))
}

/// [`dial_ports`] on the text of `/proc/net/tcp`.
fn parse_dial_ports(table: &str, inodes: &HashSet<String>, peers: &[Ipv4Addr]) -> Vec<u16> {
    // "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
    let endpoint = |field: &str| -> Option<(Ipv4Addr, u16)> {
        let (ip, port) = field.split_once(':')?;
        // The kernel prints the address as a native-endian u32.
        let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
        Some((ip, u16::from_str_radix(port, 16).ok()?))
    };
    let mut ports: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote) = (endpoint(fields.get(1)?)?, endpoint(fields.get(2)?)?);
            let inode = fields.get(9)?;
            (inodes.contains(*inode) && local.0 == Ipv4Addr::LOCALHOST && peers.contains(&remote.0))
                .then_some(local.1)
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// An address as the IPv4 address it must be for a partition.
pub fn v4(ip: IpAddr) -> anyhow::Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(_) => bail!("a partition needs IPv4 addresses, not {ip}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_cuts_addresses_the_group_and_the_dials() {
        let others = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)];
        let text = ruleset("t", Ipv4Addr::new(127, 0, 0, 3), &others, &[40000, 40001]);
        assert!(text.contains("ip saddr 127.0.0.3 ip daddr { 127.0.0.1, 127.0.0.2 } drop"));
        assert!(text.contains("ip saddr { 127.0.0.1, 127.0.0.2 } ip daddr 127.0.0.3 drop"));
        assert!(text.contains(&format!(
            "meta skgid {ISOLATED_GID} ip daddr {{ 127.0.0.1, 127.0.0.2 }} drop"
        )));
        assert!(text.contains("tcp sport { 40000, 40001 } drop"));
        assert!(text.contains("tcp dport { 40000, 40001 } drop"));
        let none = ruleset("t", Ipv4Addr::new(127, 0, 0, 3), &others, &[]);
        assert!(!none.contains("sport"), "no empty set: {none}");
    }

    #[test]
    fn dial_ports_are_the_local_ports_of_the_process_sockets_to_peers() {
        // 127.0.0.1:40000 → 127.0.0.2:7400 (ours, inode 11), 127.0.0.1:40001 → 127.0.0.9:80
        // (ours, not a peer), 127.0.0.1:40002 → 127.0.0.2:7400 (not ours).
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:9C40 0200007F:1CE8 01 00000000:00000000 00:00000000 00000000 0 0 11 1\n\
            1: 0100007F:9C41 0900007F:0050 01 00000000:00000000 00:00000000 00000000 0 0 12 1\n\
            2: 0100007F:9C42 0200007F:1CE8 01 00000000:00000000 00:00000000 00000000 0 0 13 1\n";
        let ours: HashSet<String> = ["11", "12"].iter().map(ToString::to_string).collect();
        let peers = [Ipv4Addr::new(127, 0, 0, 2)];
        if cfg!(target_endian = "little") {
            assert_eq!(parse_dial_ports(table, &ours, &peers), vec![40000]);
        }
    }
}
