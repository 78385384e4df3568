//! `streamfarm sub` (not built yet: see the open issues).

use std::process::ExitCode;

/// Arguments of `streamfarm sub`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) async fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`streamfarm sub` is not built yet")
}
