//! Project automation for qlock, run as `cargo xtask TASK` (an alias in `.cargo/config.toml`).
//!
//! - `cargo xtask compat`: the differential check against real QEMU ([`compat`]), on the QEMU
//!   on `PATH`, Debian bookworm's 7.2 ([`fetch`]) and any `--qemu DIR`, and a slice of it
//!   across two hosts of a GlusterFS volume ([`across`]);
//! - `cargo xtask bench`: the workspace benchmarks, with one table of their goals ([`mod@bench`]);
//! - `cargo xtask dist`: the `qlock` binary as shipped, statically linked ([`dist`]);
//! - `cargo xtask ci`: everything CI runs ([`ci`]). If it passes locally, CI is green;
//! - `cargo xtask gluster up | down | status`: the two-host GlusterFS bed ([`gluster`]).
//!
//! Modules: [`catalogue`] (QEMU front ends and their accesses), [`qemu`] (builds),
//! [`fetch`] (bookworm download), [`run`] (holders, newcomers and verdicts), [`compat`]
//! (matrix and checks), [`chains`] (the chain matrix) and [`iotest153`] (qemu-iotests 153) as
//! [`section`]s of the compat run, comparing [`answer`]s of the `qlock` binary
//! ([`qlock_bin`]) with real QEMU's, [`across`] (the slice across hosts), [`mod@bench`], [`ci`],
//! [`gluster`]. The qlock and foreign holders, and the real `qemu-io` and storage-daemon holders,
//! are qlock-testkit's.

pub mod across;
pub mod answer;
pub mod bench;
pub mod catalogue;
pub mod chains;
pub mod ci;
pub mod compat;
pub mod dist;
pub mod fetch;
pub mod gluster;
pub mod iotest153;
pub mod qemu;
pub mod qlock_bin;
pub mod run;
pub mod section;

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), |p| p.to_path_buf())
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else `target/` in the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// `cargo` as this xtask was run with (`CARGO`, else `PATH`'s), in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cargo ARGS` with its output captured, for builds the caller then uses.
///
/// # Errors
/// Cargo's stderr when it fails, or why it could not be run.
pub fn cargo_build(args: &[&str]) -> Result<(), String> {
    let out = cargo()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("cargo {} failed:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}
