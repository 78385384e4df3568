//! `streamfarm secret new PATH`: a fresh farm secret in a file only its owner can read.
//!
//! The secret is 32 bytes from the operating system's random source, written as one line of
//! base64 (the node reads the file's text, trailing newline ignored, as the secret). The file is
//! created with mode 0600 in the same call that creates it, so there is no moment at which
//! others could read it, and an existing file is never overwritten: replacing a farm's secret is
//! a rollout (OPERATIONS.md), not a side effect of a typo.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine;
use rand::TryRngCore;

/// Random bytes in a new secret: twice the node's minimum of 16.
const SECRET_BYTES: usize = 32;

/// Arguments of `streamfarm secret`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Write a fresh farm secret (32 random bytes, base64) to PATH with mode 0600; PATH must not
    /// exist yet.
    New {
        /// Where to write it; give every node the same file with --farm-secret-file.
        path: PathBuf,
    },
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.action {
        Action::New { path } => {
            write_new(&path)?;
            println!(
                "wrote a new farm secret to {} (mode 0600): give every node --farm-secret-file {}",
                path.display(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Creates `path` (which must not exist) holding a fresh secret, readable only by its owner.
fn write_new(path: &Path) -> anyhow::Result<()> {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .context("the operating system's random source failed")?;
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| {
        format!(
            "cannot create {} (an existing secret is never overwritten)",
            path.display()
        )
    })?;
    writeln!(file, "{text}")
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_secret_is_random_private_and_never_overwritten() {
        let dir =
            std::env::temp_dir().join(format!("streamfarm-secret-new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.secret"), dir.join("b.secret"));
        write_new(&a).unwrap();
        write_new(&b).unwrap();
        let text = std::fs::read_to_string(&a).unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(text.trim_end())
            .unwrap();
        assert_eq!(decoded.len(), SECRET_BYTES);
        assert_ne!(text, std::fs::read_to_string(&b).unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&a).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        }
        let err = write_new(&a).unwrap_err();
        assert!(format!("{err:#}").contains("never overwritten"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&a).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
