//! `streamfarm list SERVICE`: the farm list of a service, as a table or in one of the list
//! encodings. Also home of [`ClientArgs`], the flags every client subcommand shares.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use streamfarm_client::{ClientOptions, Policy, RetryMode, ServiceAddress};
use streamfarm_core::FarmList;
use streamfarm_core::balance::{self, Tolerance};
use streamfarm_core::encoding::{self, Format};

/// Flags shared by `list`, `sub`, `pub` and `load`: how the client reaches and chooses.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ClientArgs {
    /// Selection policy: weighted (also called patent), random, least-users, p2c, waterfill.
    #[arg(long, default_value = "weighted")]
    pub(crate) policy: Policy,
    /// Resolve the service name through this DNS server instead of the system resolver.
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) dns_server: Option<SocketAddr>,
    /// On failure retry the same server once before re-requesting the list (the seeds' main
    /// embodiment); the default re-requests at once.
    #[arg(long)]
    pub(crate) retry_once: bool,
    /// On failure re-request the list at once (the default; kept for scripts that name it).
    #[arg(long, hide = true, conflicts_with = "retry_once")]
    pub(crate) immediate: bool,
    /// Limit for opening one connection (TCP, WebSocket handshake, greeting), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub(crate) connect_timeout_ms: u64,
    /// Connection token (JWT) for a farm that checks tokens; for `pub`, a publish token works
    /// too (docs/AUTH.md).
    #[arg(
        long,
        env = "STREAMFARM_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub(crate) token: Option<String>,
    /// A file holding the token, read again before every connection and refresh (so a process
    /// that renews the file keeps long subscriptions alive).
    #[arg(long, value_name = "PATH")]
    pub(crate) token_file: Option<PathBuf>,
    /// PEM file of the CA certificates to trust for wss:// and https:// farms (a private CA),
    /// instead of the usual public roots.
    #[arg(long, value_name = "PATH")]
    pub(crate) ca_file: Option<PathBuf>,
}

impl ClientArgs {
    /// The client options these flags ask for.
    pub(crate) fn options(&self) -> anyhow::Result<ClientOptions> {
        let mut options = ClientOptions::new()
            .policy(self.policy)
            .retry(if self.retry_once && !self.immediate {
                RetryMode::RetryOnce
            } else {
                RetryMode::Immediate
            })
            .connect_timeout(Duration::from_millis(self.connect_timeout_ms.max(1)));
        if let Some(server) = self.dns_server {
            options = options.dns_server(server);
        }
        if let Some(token) = &self.token {
            options = options.token(token.trim());
        }
        if let Some(path) = &self.token_file {
            let path = path.clone();
            options = options.token_provider(move || {
                let path = path.clone();
                async move {
                    tokio::fs::read_to_string(&path)
                        .await
                        .map(|text| text.trim().to_string())
                        .map_err(|err| format!("cannot read {}: {err}", path.display()))
                }
            });
        }
        if let Some(path) = &self.ca_file {
            options = options.ca_file(path)?;
        }
        Ok(options)
    }
}

/// Arguments of `streamfarm list`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The service: a URL, `host:port` (all its addresses), or a comma-separated seed list.
    service: ServiceAddress,
    /// `table` (the default), or a list encoding: json, text, xml, js.
    #[arg(long, default_value = "table", value_parser = parse_format)]
    format: ListFormat,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Clone, Copy)]
enum ListFormat {
    Table,
    Encoded(Format),
}

fn parse_format(text: &str) -> Result<ListFormat, String> {
    if text.eq_ignore_ascii_case("table") {
        return Ok(ListFormat::Table);
    }
    Format::from_name(text)
        .map(ListFormat::Encoded)
        .ok_or_else(|| format!("unknown format {text:?}: expected table, json, text, xml or js"))
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let options = args.client.options()?;
    let (list, _from) = streamfarm_client::fetch_list(&args.service, &options).await?;
    match args.format {
        ListFormat::Table => print!("{}", table(&list)),
        ListFormat::Encoded(format) => {
            let text = encoding::render(&list, format);
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The list as an aligned table, one server per row, with a total line. `TARGET` and `SURPLUS`
/// are each server's fair share and what it holds beyond it, as the nodes' rebalancing computes
/// them at default settings (`streamfarm_core::balance`); `>` marks a server that is moving
/// clients away.
pub(crate) fn table(list: &FarmList) -> String {
    let plan = balance::plan(list, Tolerance::default());
    let mut rows = vec![[
        "NAME".to_string(),
        "URL".to_string(),
        "STATUS".to_string(),
        "USERS".to_string(),
        "PRIORITY".to_string(),
        "CAPACITY".to_string(),
        "TARGET".to_string(),
        "SURPLUS".to_string(),
    ]];
    for (s, share) in list.servers.iter().zip(&plan.shares) {
        let surplus = match share.surplus() {
            0 => "0".to_string(),
            n if share.sends => format!("{n:+} >"),
            n => format!("{n:+}"),
        };
        rows.push([
            s.name.clone(),
            s.url.clone(),
            s.status.to_string(),
            s.users.to_string(),
            s.priority.clone(),
            s.capacity
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            share.target.to_string(),
            surplus,
        ]);
    }
    let total: u64 = list.servers.iter().map(|s| s.users).sum();
    let moving = match plan.moves() {
        0 => String::new(),
        n => format!(", {n} to move to even it out"),
    };
    render_rows(&rows) + &format!("{} servers, {total} users{moving}\n", list.servers.len())
}

/// Left-aligned columns separated by two spaces; numbers are just text here.
pub(crate) fn render_rows<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamfarm_core::{ServerEntry, Status};

    #[test]
    fn table_aligns_columns_and_totals_users() {
        let list = FarmList::new(vec![
            ServerEntry::new("a", "ws://127.0.0.1:7400/stream", Status::Up, 12, "A"),
            ServerEntry::new("bb", "ws://127.0.0.2:7400/stream", Status::Down, 0, "B"),
        ]);
        let text = table(&list);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NAME  URL                         STATUS  USERS  PRIORITY  CAPACITY  TARGET  SURPLUS"
        );
        assert_eq!(
            lines[1],
            "a     ws://127.0.0.1:7400/stream  UP      12     A         -         12      0"
        );
        assert_eq!(lines[3], "2 servers, 12 users");
    }

    #[test]
    fn formats_parse_by_name() {
        assert!(matches!(parse_format("TABLE"), Ok(ListFormat::Table)));
        assert!(matches!(
            parse_format("xml"),
            Ok(ListFormat::Encoded(Format::Xml))
        ));
        assert!(parse_format("yaml").unwrap_err().contains("expected table"));
    }
}
