//! The command line, declared with clap's derive API. Every value is parsed here, once, into
//! qlock's own types: the subcommands never see a string they must still check.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use qlock_core::graph::Format;
use qlock_core::graph::op::Op;
use qlock_core::{Access, Backoff, LockOptions, Locking, Perm};

/// Take, respect and inspect QEMU's disk-image locks.
#[derive(Debug, Parser)]
#[command(name = "qlock", version, about, long_about = None, after_help = OUTPUT)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How output errors end qlock, as for other Unix tools.
const OUTPUT: &str = "Exit status: 0 done, 1 conflict (or timed out), 2 any other error; `run` exits \
as its command. A write error on stdout (a full disk) exits 2 with one line; a reader that goes \
away (`| head`) ends qlock quietly, as SIGPIPE ends cat (if qlock was started with SIGPIPE \
ignored, it is a write error).";

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show which bytes others hold on each image, who holds them, and which accesses are free.
    Status(StatusArgs),
    /// Exit 0 if ACCESS could be acquired now, 1 on a conflict, 2 on any other error.
    /// Leaves nothing locked. With --timeout, wait up to that long for it to become free.
    /// With --op NAME, answer what `qemu-img NAME IMAGE` would be told about locks on IMAGE's
    /// whole graph: 0 when it would get past locking, 1 with qemu-img's message.
    Check(CheckArgs),
    /// Wait until ACCESS could be taken on every image, then exit 0 (1 on timeout).
    Wait(HoldArgs),
    /// Take ACCESS on every image (all or nothing), run CMD, and exit with its status.
    ///
    /// CMD inherits the lock descriptors, as with flock(1): the locks last while qlock or CMD
    /// (or anything CMD passed them on to) lives, so a killed qlock never leaves CMD
    /// unprotected. With --close, only qlock holds them and CMD is killed (SIGKILL) if qlock
    /// dies (processes CMD started are not); the same holds under POSIX locks (`--locking on`
    /// without OFD), which no child can inherit. CMD starts with the signal mask and ignored signals qlock started with;
    /// SIGTERM, SIGHUP, SIGINT and SIGQUIT sent to qlock are passed on to CMD (a terminal's
    /// Ctrl-C reaches CMD directly). qlock exits with CMD's status, 128+N if a signal N
    /// ended it, 126/127 if it could not be run.
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// Show what the storage under each image can promise about locks: filesystem and mount,
    /// whether OFD locks work there (probed on the image, read-only), who sees them (lock
    /// scope: host, cluster, none, unknown), and the hazards for VM images with what to do.
    /// Exit 0 when every path could be inspected, 2 otherwise.
    Doctor(DoctorArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Image files or block devices.
    #[arg(required = true)]
    pub(crate) paths: Vec<PathBuf>,
    /// Print JSON (schema in the README) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Image files or block devices.
    #[arg(required = true)]
    pub(crate) images: Vec<PathBuf>,
    /// Print JSON (schema in the README) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Show every node of each image's graph (backing files, data files) with its role, its
    /// bytes and holders, and what each node is to each holder.
    #[arg(long)]
    pub(crate) chain: bool,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    pub(crate) hold: HoldArgs,
    /// A qemu-img subcommand: info, check, compare, map, amend, commit, resize, rebase,
    /// snapshot, convert, dd, bench, bench-write, create (IMAGE is the image it opens: the
    /// source of convert and dd, the file create makes). Implies the whole graph.
    #[arg(long, value_name = "NAME", value_parser = op, group = "what",
          conflicts_with_all = ["access", "perm", "share", "timeout", "chain", "no_chain", "strict"])]
    pub(crate) op: Option<Op>,
    /// With --op: qemu-img's -U (force share).
    #[arg(short = 'U', long = "force-share", requires = "op")]
    pub(crate) force_share: bool,
    /// With --op create: the format created (qemu-img's -f; default raw, as qemu-img's).
    #[arg(short = 'f', long, value_name = "FMT", value_parser = format, requires = "op")]
    pub(crate) format: Option<Format>,
}

#[derive(Debug, Args)]
pub(crate) struct HoldArgs {
    /// Image files or block devices (an image named twice, by any path, counts once).
    #[arg(required = true)]
    pub(crate) images: Vec<PathBuf>,
    #[command(flatten)]
    pub(crate) access: AccessArgs,
    #[command(flatten)]
    pub(crate) lock: LockArgs,
    /// Wait up to SECS for the access (implies waiting, like flock -w).
    #[arg(long, value_name = "SECS", value_parser = timeout, allow_negative_numbers = true)]
    pub(crate) timeout: Option<Duration>,
    /// Lock each image's whole graph (backing files, external data file) as the qemu-io
    /// front end the preset is named after locks it (see the README).
    #[arg(long, overrides_with = "no_chain")]
    pub(crate) chain: bool,
    /// Lock the named files alone (the default).
    #[arg(long, overrides_with = "chain")]
    pub(crate) no_chain: bool,
    /// Also count a process with an image open read-write and no lock (QEMU with
    /// locking=off, a tool that ignores locks, an inactive migration target) as a conflict;
    /// when waiting, wait for it to close the image.
    #[arg(long)]
    pub(crate) strict: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) hold: HoldArgs,
    /// Wait for the locks instead of failing at once (implied by --timeout).
    #[arg(long)]
    pub(crate) wait: bool,
    /// Do not pass the lock descriptors to CMD (like flock -o); CMD is killed if qlock dies.
    #[arg(long)]
    pub(crate) close: bool,
    /// Exit status when the locks cannot be taken (like flock -E).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub(crate) conflict_exit_code: u8,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<OsString>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").args(["access", "perm", "share"]).required(true).multiple(true)))]
pub(crate) struct AccessArgs {
    /// A preset: force-share, read, write, write-shared, info.
    #[arg(long, short, value_name = "PRESET", value_parser = preset, conflicts_with_all = ["perm", "share"])]
    pub(crate) access: Option<Access>,
    /// Permissions to use, e.g. consistent-read,write, or none (instead of a preset).
    #[arg(long, value_name = "LIST", value_parser = perm_list)]
    pub(crate) perm: Option<Perm>,
    /// Permissions others may still use, or all, or none (default: all).
    #[arg(long, value_name = "LIST", value_parser = perm_list)]
    pub(crate) share: Option<Perm>,
}

#[derive(Debug, Args)]
pub(crate) struct LockArgs {
    /// QEMU's locking= option: auto (OFD or nothing), on (OFD, else POSIX), off.
    #[arg(long, value_name = "MODE", default_value_t = Locking::Auto, value_parser = locking)]
    pub(crate) locking: Locking,
    /// Honour graph-mod (bytes 104/204) as QEMU <= 6.2 did.
    #[arg(long)]
    pub(crate) legacy_graph_mod: bool,
}

impl AccessArgs {
    /// The access asked for: a preset, or `--perm` / `--share` lists (clap makes sure one of
    /// them is given).
    pub(crate) fn access(&self) -> Access {
        self.access.unwrap_or_else(|| {
            Access::new(self.perm.unwrap_or(Perm::empty()), self.share.unwrap_or(Perm::ALL) | Perm::GRAPH_MOD)
        })
    }
}

impl LockArgs {
    pub(crate) fn options(&self) -> LockOptions {
        // Read-only descriptors: read locks and probes need nothing more.
        LockOptions::default().with_locking(self.locking).with_legacy_graph_mod(self.legacy_graph_mod)
    }
}

impl HoldArgs {
    /// The waiting policy when waiting was asked for (`wait`, `--wait`) or implied by
    /// `--timeout`; `None` for one attempt.
    pub(crate) fn waiting(&self, asked: bool) -> Option<Backoff> {
        match self.timeout {
            Some(limit) => Some(Backoff::default().with_timeout(limit)),
            None if asked => Some(Backoff::default()),
            None => None,
        }
    }
}

fn preset(s: &str) -> Result<Access, String> {
    Access::preset(s.trim()).ok_or_else(|| {
        let names: Vec<_> = Access::PRESETS.iter().map(|p| p.name).collect();
        format!("unknown access preset {s:?}: expected one of {}", names.join(", "))
    })
}

/// A comma-separated permission list; an empty one is a mistake (say `none`), not "nothing".
fn perm_list(s: &str) -> Result<Perm, String> {
    if s.split(',').all(|item| item.trim().is_empty()) {
        return Err("empty list: name permissions (consistent-read, write, ...), all, or none".into());
    }
    Perm::parse_list(s)
}

fn op(s: &str) -> Result<Op, String> {
    s.parse()
}

fn format(s: &str) -> Result<Format, String> {
    match s.trim() {
        "qcow2" => Ok(Format::Qcow2),
        "raw" => Ok(Format::Raw),
        other => Err(format!("unknown format {other:?}: qlock follows qcow2 and raw")),
    }
}

fn locking(s: &str) -> Result<Locking, String> {
    s.parse()
}

/// Seconds, as a finite, non-negative number that fits a `Duration`.
fn timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| "not a number of seconds".to_string())?;
    if secs.is_nan() {
        Err("not a number of seconds".into())
    } else if secs < 0.0 {
        Err("must not be negative".into())
    } else if secs.is_infinite() {
        Err("must be finite: to wait forever, leave out --timeout".into())
    } else {
        Duration::try_from_secs_f64(secs)
            .map_err(|_| "too large: to wait forever, leave out --timeout".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_say_why_they_are_refused() {
        assert_eq!(timeout("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(timeout("0"), Ok(Duration::ZERO));
        assert!(timeout("-1").unwrap_err().contains("negative"));
        assert!(timeout("nan").unwrap_err().contains("not a number"));
        assert!(timeout("inf").unwrap_err().contains("leave out --timeout"));
        assert!(timeout("1e300").unwrap_err().contains("too large"));
    }

    #[test]
    fn an_empty_permission_list_is_refused_but_none_is_not() {
        assert!(perm_list("").is_err());
        assert!(perm_list(" , ").is_err());
        assert_eq!(perm_list("none"), Ok(Perm::empty()));
        assert_eq!(perm_list("write,"), Ok(Perm::WRITE));
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
