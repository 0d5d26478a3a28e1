//! The command line, declared with clap's derive API.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use qlock_core::{Access, Backoff, LockOptions, Locking, Perm};

/// Take, respect and inspect QEMU's disk-image locks.
#[derive(Debug, Parser)]
#[command(name = "qlock", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show which bytes others hold on each image, who holds them, and which accesses are free.
    Status(StatusArgs),
    /// Exit 0 if ACCESS could be acquired now, 1 on a conflict, 2 on any other error.
    /// Leaves nothing locked.
    Check(HoldArgs),
    /// Wait until ACCESS could be taken on every image, then exit 0 (1 on timeout).
    Wait(HoldArgs),
    /// Take ACCESS on every image (all or nothing), run CMD, release when it exits, and exit
    /// with its status. The locks are not inherited by CMD.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Image files or block devices.
    #[arg(required = true)]
    pub(crate) images: Vec<PathBuf>,
    /// Print JSON (schema in the README) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct HoldArgs {
    /// Image files or block devices.
    #[arg(required = true)]
    pub(crate) images: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) access: AccessArgs,
    #[command(flatten)]
    pub(crate) lock: LockArgs,
    /// Give up after this many seconds (wait, run --wait).
    #[arg(long, value_name = "SECS")]
    pub(crate) timeout: Option<f64>,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) hold: HoldArgs,
    /// Wait for the locks instead of failing at once.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Exit status when the locks cannot be taken (like flock -E).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub(crate) conflict_exit_code: u8,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct AccessArgs {
    /// A preset: force-share, read, write, write-shared, info.
    #[arg(long, short, value_name = "PRESET", conflicts_with_all = ["perm", "share"])]
    pub(crate) access: Option<String>,
    /// Permissions to use, e.g. consistent-read,write (instead of a preset).
    #[arg(long, value_name = "LIST")]
    pub(crate) perm: Option<String>,
    /// Permissions others may still use (default: all).
    #[arg(long, value_name = "LIST")]
    pub(crate) share: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct LockArgs {
    /// QEMU's locking= option: auto (OFD or nothing), on (OFD, else POSIX), off.
    #[arg(long, value_enum, default_value_t = LockingArg::Auto)]
    pub(crate) locking: LockingArg,
    /// Honour graph-mod (bytes 104/204) as QEMU <= 6.2 did.
    #[arg(long)]
    pub(crate) legacy_graph_mod: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LockingArg {
    Auto,
    On,
    Off,
}

impl AccessArgs {
    /// The access asked for: a preset, or `--perm` / `--share` lists.
    pub(crate) fn access(&self) -> Result<Access, String> {
        if let Some(name) = &self.access {
            return name.parse();
        }
        if self.perm.is_none() && self.share.is_none() {
            return Err("say what to lock: --access PRESET, or --perm LIST [--share LIST]".into());
        }
        let perm = Perm::parse_list(self.perm.as_deref().unwrap_or("none"))?;
        let shared = Perm::parse_list(self.share.as_deref().unwrap_or("all"))?;
        Ok(Access::new(perm, shared | Perm::GRAPH_MOD))
    }
}

impl LockArgs {
    pub(crate) fn options(&self) -> LockOptions {
        let locking = match self.locking {
            LockingArg::Auto => Locking::Auto,
            LockingArg::On => Locking::On,
            LockingArg::Off => Locking::Off,
        };
        // Read-only descriptors: read locks and probes need nothing more.
        LockOptions { locking, legacy_graph_mod: self.legacy_graph_mod, ..LockOptions::default() }
    }
}

impl HoldArgs {
    /// The waiting policy, with the `--timeout` deadline.
    pub(crate) fn backoff(&self) -> Result<Backoff, String> {
        let mut b = Backoff::default();
        if let Some(secs) = self.timeout {
            let d = Duration::try_from_secs_f64(secs).map_err(|_| format!("bad --timeout {secs}"))?;
            b = b.with_timeout(d);
        }
        Ok(b)
    }
}
