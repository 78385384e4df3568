//! `streamfarm`: one binary for every role of the farm.
//!
//! Each subcommand lives in its own module under [`cmd`], with its clap `Args` and an async `run`.
//! The work itself is done by the library crates; this crate parses, prints and exits.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod logging;

/// A farm of real-time push servers whose clients choose their own server.
#[derive(Debug, Parser)]
#[command(name = "streamfarm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on standard error: text (coloured only on a terminal) or json (one object a
    /// line). RUST_LOG filters it (default warn).
    #[arg(
        long,
        global = true,
        env = "STREAMFARM_LOG_FORMAT",
        value_enum,
        default_value_t = logging::LogFormat::Text
    )]
    log_format: logging::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a farm node: streaming server, list server and farm member.
    Serve(cmd::serve::Args),
    /// Show each server of a farm list with its probability under a policy, and pick one.
    Pick(cmd::pick::Args),
    /// Simulate selection policies against farm scenarios.
    Sim(cmd::sim::Args),
    /// Show the farm list of a service.
    List(cmd::list::Args),
    /// Subscribe to topics and print what arrives.
    Sub(cmd::sub::Args),
    /// Publish one message to a topic.
    Pub(cmd::publish::Args),
    /// Hold many client connections and show how they spread.
    Load(cmd::load::Args),
    /// Run a three-node farm with clients, kill a node, show the failover.
    Demo(cmd::demo::Args),
    /// Benchmarks beside nats-server: idle, fanout, cross-node, failover, convergence, connect-cost.
    Bench(cmd::bench::Args),
    /// Farm secrets: `secret new PATH` writes a fresh one, readable only by its owner.
    Secret(cmd::secret::Args),
    /// Set a node DRAINING through its admin API and wait until its clients have moved.
    Drain(cmd::drain::Args),
    /// Make a private CA, and node certificates signed by it (TLS for clients and relay links).
    Cert(cmd::cert::Args),
    /// Print a connection token (JWT) that nodes with the key accept.
    Token(cmd::token::Args),
    /// Run the farm's deterministic simulation, seed after seed, checking its guarantees.
    Chaos(cmd::chaos::Args),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => cmd::serve::run(args).await,
        Command::Pick(args) => cmd::pick::run(args).await,
        Command::Sim(args) => cmd::sim::run(args).await,
        Command::List(args) => cmd::list::run(args).await,
        Command::Sub(args) => cmd::sub::run(args).await,
        Command::Pub(args) => cmd::publish::run(args).await,
        Command::Load(args) => cmd::load::run(args).await,
        Command::Demo(args) => cmd::demo::run(args).await,
        Command::Bench(args) => cmd::bench::run(args).await,
        Command::Secret(args) => cmd::secret::run(args).await,
        Command::Drain(args) => cmd::drain::run(args).await,
        Command::Cert(args) => cmd::cert::run(args).await,
        Command::Token(args) => cmd::token::run(args).await,
        Command::Chaos(args) => cmd::chaos::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("streamfarm: {err:#}");
            ExitCode::FAILURE
        }
    }
}
