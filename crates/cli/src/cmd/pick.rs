//! `streamfarm pick`: what a client would make of a farm list.
//!
//! Reads a list (a file, `-` for stdin, or `http://host:port[/path]`, fetched with a GET; a URL
//! without a path asks for `/farm`), in any of the encodings (detected), and prints every server
//! with its probability under the policy, then the pick:
//!
//! ```text
//! URL                        STATUS  USERS  GROUP  P
//! http://serverA.caplin.com  UP      2963   A      0.501
//! http://serverB.caplin.com  DOWN    0      B      0.000
//! http://serverN.caplin.com  UP      2979   A      0.499
//! pick: http://serverA.caplin.com
//! ```
//!
//! `--explain` adds why: the group kept, each server's verdict and the policy's formula with its
//! numbers. The selection itself is `streamfarm_core::selection`; this file only reads and prints.
//! Exits non-zero, with the reason on stderr, when the list cannot be read or no server is live.

use std::fmt::Write as _;
use std::io::Read as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use streamfarm_core::encoding;
use streamfarm_core::model::group_order;
use streamfarm_core::selection::{self, Context, Policy, Verdict};
use streamfarm_core::time::unix_ms;
use streamfarm_core::{FarmList, SelectionError};

/// Arguments of `streamfarm pick`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The farm list: a file, `-` for stdin, or an `http://` URL (no path: `/farm`). JSON, text,
    /// XML or JavaScript, detected.
    #[arg(long, value_name = "FILE_OR_URL")]
    list: String,
    /// Selection policy: weighted (also called patent), random, least-users, p2c, waterfill.
    #[arg(long, default_value = "weighted")]
    policy: Policy,
    /// Say why: the group chosen, each server's verdict and the policy's formula.
    #[arg(long)]
    explain: bool,
    /// A server url the client has just failed to reach (repeatable).
    #[arg(long, value_name = "URL")]
    exclude: Vec<String>,
    /// Seed for the pick, for a reproducible choice (default: fresh randomness).
    #[arg(long)]
    seed: Option<u64>,
    /// Age of the list in seconds, for `waterfill` (default: from the list's `generated_at_ms`, or
    /// 0 when it has none).
    #[arg(long, value_name = "SECONDS")]
    list_age: Option<f64>,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let text = read_list(&args.list).await?;
    let list = encoding::parse_detected(&text)
        .with_context(|| format!("cannot read the farm list from {}", args.list))?;
    for url in &args.exclude {
        if list.by_url(url).is_none() {
            eprintln!("streamfarm: note: --exclude {url} matches no server of the list");
        }
    }
    let context = Context::with_age(list_age(&args, &list)?);
    let outcome = match args.seed {
        Some(seed) => selection::choose_with(
            args.policy,
            &list,
            &args.exclude,
            &context,
            &mut StdRng::seed_from_u64(seed),
        ),
        None => selection::choose_with(
            args.policy,
            &list,
            &args.exclude,
            &context,
            &mut rand::rng(),
        ),
    };
    match outcome {
        Ok(choice) => {
            print!("{}", table(&list, &choice.probabilities));
            if args.explain {
                print!("{}", explain(args.policy, &list, &choice, &context));
            }
            println!("pick: {}", list.servers[choice.index].url);
            Ok(ExitCode::SUCCESS)
        }
        Err(err @ SelectionError::NoServerAvailable { .. }) => {
            print!("{}", table(&list, &vec![0.0; list.servers.len()]));
            if args.explain {
                for (server, verdict) in list.servers.iter().zip(verdicts_without_candidates(&list))
                {
                    println!("  {}: {verdict}", server.url);
                }
            }
            bail!("{err}")
        }
        Err(err) => bail!("{err}"),
    }
}

/// The list's text, from a file, stdin or an HTTP GET.
async fn read_list(source: &str) -> anyhow::Result<String> {
    if source == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the farm list from stdin")?;
        return Ok(text);
    }
    if source.starts_with("https://") {
        bail!("cannot fetch {source}: this build speaks plain http:// only");
    }
    if let Some(rest) = source.strip_prefix("http://") {
        let url = if rest.contains('/') {
            source.to_string()
        } else {
            format!("{source}/farm")
        };
        return fetch(&url).await;
    }
    std::fs::read_to_string(source).with_context(|| format!("cannot read the farm list {source}"))
}

async fn fetch(url: &str) -> anyhow::Result<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("cannot build an HTTP client")?;
    let response = client
        .get(url)
        .header(
            "accept",
            "application/json, text/plain;q=0.9, application/xml;q=0.8, */*;q=0.5",
        )
        .send()
        .await
        .with_context(|| format!("cannot fetch the farm list from {url}"))?;
    let status = response.status();
    if !status.is_success() {
        bail!("cannot fetch the farm list from {url}: HTTP {status}");
    }
    let body = response
        .bytes()
        .await
        .with_context(|| format!("cannot read the farm list from {url}"))?;
    String::from_utf8(body.to_vec())
        .map_err(|_| anyhow::anyhow!("the farm list from {url} is not UTF-8 text"))
}

/// `--list-age`, else the age the list's own timestamp gives, else 0.
fn list_age(args: &Args, list: &FarmList) -> anyhow::Result<Duration> {
    if let Some(seconds) = args.list_age {
        return Duration::try_from_secs_f64(seconds).map_err(|_| {
            anyhow::anyhow!("--list-age {seconds}: expected a non-negative number of seconds")
        });
    }
    let now_ms = unix_ms(SystemTime::now());
    Ok(list.generated_at_ms.map_or(Duration::ZERO, |at| {
        Duration::from_millis(now_ms.saturating_sub(at))
    }))
}

/// One line per server: url, status, users, group, probability (and the name when any has one).
fn table(list: &FarmList, probabilities: &[f64]) -> String {
    let named = list.servers.iter().any(|s| !s.name.is_empty());
    let mut rows: Vec<Vec<String>> = vec![
        [
            (named).then_some("NAME"),
            Some("URL"),
            Some("STATUS"),
            Some("USERS"),
            Some("GROUP"),
            Some("P"),
        ]
        .into_iter()
        .flatten()
        .map(str::to_string)
        .collect(),
    ];
    for (server, p) in list.servers.iter().zip(probabilities) {
        let mut row = Vec::new();
        if named {
            row.push(server.name.clone());
        }
        row.extend([
            server.url.clone(),
            server.status.to_string(),
            server.users.to_string(),
            server.priority.clone(),
            format!("{p:.3}"),
        ]);
        rows.push(row);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == columns {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// How a verdict reads in `--explain`.
struct VerdictText<'a>(&'a Verdict);

impl std::fmt::Display for VerdictText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Verdict::Candidate => f.write_str("candidate"),
            Verdict::NotUp(status) => write!(f, "not UP ({status}): takes no new clients"),
            Verdict::Excluded => f.write_str("excluded by the client (--exclude)"),
            Verdict::LessPreferredGroup => f.write_str("less-preferred group"),
        }
    }
}

/// Verdicts when no server is live: each is either not UP or excluded.
fn verdicts_without_candidates(list: &FarmList) -> Vec<String> {
    list.servers
        .iter()
        .map(|s| {
            let verdict = if s.status.is_live() {
                Verdict::Excluded
            } else {
                Verdict::NotUp(s.status)
            };
            VerdictText(&verdict).to_string()
        })
        .collect()
}

/// The `--explain` section: policy, group, and one verdict line per server with its numbers.
fn explain(
    policy: Policy,
    list: &FarmList,
    choice: &selection::Choice,
    context: &Context,
) -> String {
    let explanation = &choice.explanation;
    let candidates: Vec<usize> = explanation
        .verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| **v == Verdict::Candidate)
        .map(|(i, _)| i)
        .collect();
    let users: Vec<u64> = candidates.iter().map(|&i| list.servers[i].users).collect();
    let n = candidates.len();
    let total: u64 = users.iter().sum();
    let fewest = users.iter().copied().min().unwrap_or(0);
    let groups = group_order(list.servers.iter().map(|s| s.priority.as_str()));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy: {policy}: {}",
        formula(policy, n, total, context)
    );
    let _ = writeln!(
        out,
        "group: {} (the most preferred group with a live server; preference: {})",
        explanation.group,
        groups.join(" < ")
    );
    for (i, (server, verdict)) in list.servers.iter().zip(&explanation.verdicts).enumerate() {
        let p = choice.probabilities[i];
        let detail = match verdict {
            Verdict::Candidate => {
                let why = match policy {
                    Policy::Weighted if n == 1 => "the only live server".to_string(),
                    Policy::Weighted if total == 0 => format!("nobody connected anywhere: 1/{n}"),
                    Policy::Weighted => {
                        format!("(1 - {}/{total}) / ({n} - 1)", server.users)
                    }
                    Policy::Random => format!("1/{n}"),
                    Policy::LeastUsers if server.users == fewest => {
                        let ties = users.iter().filter(|&&u| u == fewest).count();
                        format!("has the fewest users ({fewest}), shared by {ties}")
                    }
                    Policy::LeastUsers => format!("more users than the fewest ({fewest})"),
                    Policy::P2c if n == 1 => "the only live server".to_string(),
                    Policy::P2c => {
                        // p = wins / pairs (core's p2c): show the wins that make it.
                        let pairs = n * (n - 1) / 2;
                        // Wins come in halves (a tie is a coin toss): round off float noise.
                        let wins = (p * pairs as f64 * 2.0).round() / 2.0;
                        format!("wins {wins} of {pairs} pairs")
                    }
                    _ => "its share of the fill".to_string(),
                };
                format!("candidate: {why} = {p:.3}")
            }
            other => VerdictText(other).to_string(),
        };
        let marker = if i == choice.index { "  <- pick" } else { "" };
        let _ = writeln!(out, "  {}: {detail}{marker}", server.url);
    }
    out
}

/// The policy's rule, with the numbers of this list.
fn formula(policy: Policy, n: usize, total: u64, context: &Context) -> String {
    match policy {
        Policy::Weighted => format!(
            "p_i = (1 - users_i / total) / (live - 1), total = {total} users on live = {n} servers \
             (1 for a lone live server; uniform when total is 0)"
        ),
        Policy::Random => format!("uniform over the {n} live servers"),
        Policy::LeastUsers => "uniform over the live servers with the fewest users".to_string(),
        Policy::P2c => format!(
            "two distinct live servers at random, fewer users wins, ties split: p_i = wins_i / pairs, \
             pairs = {}",
            n * n.saturating_sub(1) / 2
        ),
        Policy::Waterfill => format!(
            "fill the emptiest servers towards the level the arrivals on a list {:.3} s old reach \
             (rate from the list's join_rate{}); p_i proportional to the deficit below that level",
            context.list_age.as_secs_f64(),
            context
                .arrival_rate
                .map_or(String::new(), |r| format!(", or {r}/s given"))
        ),
        other => format!("{other}"),
    }
}
