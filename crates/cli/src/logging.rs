//! Where and how the binary logs: to standard error, filtered by `RUST_LOG` (default `warn`), as
//! text for people or JSON lines for log pipelines.
//!
//! Text carries terminal colour codes only when standard error (where the log goes) is a
//! terminal and `NO_COLOR` is unset: a log redirected to a file, a pipe, journald or a container
//! runtime holds plain text. JSON is one object per line with the event's fields at the top
//! level (`timestamp`, `level`, `target`, `message`, and the structured fields such as `server`).

use std::io::IsTerminal;

/// The log's format (`--log-format`, `STREAMFARM_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines; coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber; call once, before anything logs.
pub(crate) fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(colours_wanted()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_ansi(false)
            .init(),
    }
}

/// Colour codes only for a person at a terminal (https://no-color.org).
fn colours_wanted() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
