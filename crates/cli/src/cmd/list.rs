//! `streamfarm list` (not built yet: see the open issues).

use std::process::ExitCode;

/// Arguments of `streamfarm list`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) async fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`streamfarm list` is not built yet")
}
