//! `streamfarm pub` (not built yet: see the open issues).

use std::process::ExitCode;

/// Arguments of `streamfarm pub`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) async fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`streamfarm pub` is not built yet")
}
