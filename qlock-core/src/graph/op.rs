//! `qemu-img` subcommands as lock users: what each one asks of every node of an image graph,
//! and in which steps, so that qlock can say beforehand what `qemu-img OP IMAGE` would be told.
//!
//! Every row was watched with `strace -f -e fcntl` on `qemu-img` 10.0.2 and 7.2 (the two
//! agree), on a qcow2 top over a qcow2 base, over a raw base, and with a raw external data
//! file (`docs/graph.md`, "Operations"):
//!
//! | op | top | below the top | then |
//! |---|---|---|---|
//! | `info` | `- \| 201 203` on qcow2 | nothing: the top alone, not even the data file | |
//! | `check` `compare` `map` `dd` `bench` | as `qemu-io -r` | as `qemu-io -r` | |
//! | `convert` (source) | `100 \| 201 203` | refuses writers on raw leaves too | |
//! | `amend` `rebase` `snapshot` `bench-write` | as `qemu-io` | as `qemu-io` | |
//! | `resize` | as `qemu-io`, plus resize of a raw top | as `qemu-io` | |
//! | `commit` | as `qemu-io` | as `qemu-io` | the backing file raised to `100 101 103 \| 201 203` (qcow2) or `100 101 \| 203` (raw) |
//! | `create` | `101 103 \| 203` on the file | | qcow2: the new image opened as `qemu-io` |
//!
//! With `-U`, the reading ones take `100` on every node (`info -U` nothing at all); `rebase -U`
//! locks as `rebase` (the flag only matters to `-u`, which opens the top alone). `amend`,
//! `commit`, `resize` and `create` have no `-U`; `snapshot -U` (other than `-l`) and
//! `bench -w -U` are refused by `qemu-img` before any lock ("force-share=on can only be used
//! with read-only images").
//!
//! The messages are `qemu-img`'s: a refusal while the graph opens is
//! `Could not open 'IMAGE': ` and the chain's message (`Could not open backing file: ` per
//! level); `commit`'s reopen of the base has no prefix at all; `create`'s steps are
//! `IMAGE: ` and the lock message. Not modelled: the *new* backing file `rebase -b` opens
//! (read-only, as a `qemu-io -r` chain), `compare`'s second image and `convert`'s target (ask
//! about each with its own op: `--op check` for the second image, `--op create` for a target),
//! and the snapshot listing (`snapshot -l` locks as `check`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::access::Access;
use crate::error::Error;
use crate::graph::ChainLock;
use crate::graph::rules::User;
use crate::graph::{Chain, ChainError, Format, Role};
use crate::image::{ImageLock, LockOptions};
use crate::perm::Perm;

/// A `qemu-img` subcommand, by the name `qemu-img` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `qemu-img info IMAGE`.
    Info,
    /// `qemu-img check IMAGE`.
    Check,
    /// `qemu-img compare IMAGE OTHER` (IMAGE's side).
    Compare,
    /// `qemu-img map IMAGE`.
    Map,
    /// `qemu-img amend -o ... IMAGE`.
    Amend,
    /// `qemu-img commit IMAGE` (into its backing file).
    Commit,
    /// `qemu-img resize IMAGE SIZE`.
    Resize,
    /// `qemu-img rebase -b NEW IMAGE` (IMAGE and its current chain).
    Rebase,
    /// `qemu-img snapshot -c|-a|-d NAME IMAGE`.
    Snapshot,
    /// `qemu-img convert IMAGE OUT` (IMAGE as the source).
    Convert,
    /// `qemu-img dd if=IMAGE of=OUT` (IMAGE as the input).
    Dd,
    /// `qemu-img bench IMAGE` (reading).
    Bench,
    /// `qemu-img bench -w IMAGE`.
    BenchWrite,
    /// `qemu-img create IMAGE` (IMAGE as the file created, or overwritten).
    Create,
}

impl Op {
    /// Every op, in the order the README lists them.
    pub const ALL: [Op; 14] = [
        Op::Info,
        Op::Check,
        Op::Compare,
        Op::Map,
        Op::Amend,
        Op::Commit,
        Op::Resize,
        Op::Rebase,
        Op::Snapshot,
        Op::Convert,
        Op::Dd,
        Op::Bench,
        Op::BenchWrite,
        Op::Create,
    ];

    /// The name on qlock's command line (`qemu-img`'s, and `bench-write` for `bench -w`).
    pub fn name(self) -> &'static str {
        match self {
            Op::Info => "info",
            Op::Check => "check",
            Op::Compare => "compare",
            Op::Map => "map",
            Op::Amend => "amend",
            Op::Commit => "commit",
            Op::Resize => "resize",
            Op::Rebase => "rebase",
            Op::Snapshot => "snapshot",
            Op::Convert => "convert",
            Op::Dd => "dd",
            Op::Bench => "bench",
            Op::BenchWrite => "bench-write",
            Op::Create => "create",
        }
    }

    /// The user `qemu-img` opens IMAGE (and its graph) for, with or without `-U`; `None` for
    /// `create`, which does not open IMAGE as an image first.
    ///
    /// # Errors
    /// [`OpError::NoForceShare`] or [`OpError::ForceShareWritable`] when `qemu-img` refuses
    /// `-U` for this op before it locks anything.
    pub fn user(self, force_share: bool) -> Result<Option<User>, OpError> {
        let user = match self {
            Op::Info if force_share => User::QEMU_IMG_INFO_FORCE_SHARE,
            Op::Info => User::QEMU_IMG_INFO,
            Op::Check | Op::Compare | Op::Map | Op::Dd | Op::Bench | Op::Convert if force_share => {
                User::QEMU_IO_FORCE_SHARE
            }
            Op::Check | Op::Compare | Op::Map | Op::Dd | Op::Bench => User::QEMU_IO_READ_ONLY,
            Op::Convert => User::CONVERT_SOURCE,
            Op::Amend | Op::Commit | Op::Resize | Op::Create if force_share => {
                return Err(OpError::NoForceShare(self));
            }
            Op::Snapshot | Op::BenchWrite if force_share => return Err(OpError::ForceShareWritable(self)),
            Op::Amend | Op::Commit | Op::Rebase | Op::Snapshot | Op::BenchWrite => User::QEMU_IO_RW,
            Op::Resize => User::RESIZE,
            Op::Create => return Ok(None),
        };
        Ok(Some(user))
    }

    /// What `commit` asks of the backing file when it reopens it for writing, by its format.
    pub fn commit_backing(format: Format) -> Access {
        match format {
            Format::Qcow2 => Access::WRITE,
            Format::Raw => Access::new(Perm::CONSISTENT_READ | Perm::WRITE, Perm::LEGACY_ALL - Perm::RESIZE),
        }
    }

    /// `create`'s first step on the file, whatever the format: write and resize, refusing
    /// resize (`101 103 | 203`).
    pub const CREATE_FILE: Access = Access::new(
        Perm::WRITE.union(Perm::RESIZE),
        Perm::CONSISTENT_READ.union(Perm::WRITE).union(Perm::WRITE_UNCHANGED).union(Perm::GRAPH_MOD),
    );
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Op {
    type Err = String;

    fn from_str(s: &str) -> Result<Op, String> {
        Op::ALL.into_iter().find(|op| op.name() == s.trim()).ok_or_else(|| {
            let names: Vec<_> = Op::ALL.iter().map(|op| op.name()).collect();
            format!("unknown qemu-img operation {s:?}: expected one of {}", names.join(", "))
        })
    }
}

/// Why `qemu-img OP IMAGE` would not get past locking, in `qemu-img`'s words (what it prints
/// after `qemu-img: `), or why the question has no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpError {
    /// `qemu-img OP` has no `-U` option.
    #[error("qemu-img {0} has no -U option")]
    NoForceShare(Op),
    /// `qemu-img` refuses `-U` with a writable open before any lock.
    #[error(
        "qemu-img {0} -U is refused before any lock: force-share=on can only be used with read-only images"
    )]
    ForceShareWritable(Op),
    /// The graph could not be opened as `qemu-img` would (a refusal on a node, with QEMU's
    /// prefix), or discovery failed.
    #[error("Could not open '{}': {source}", .path.display())]
    Open {
        /// IMAGE, as given.
        path: PathBuf,
        /// The chain's error.
        source: ChainError,
    },
    /// `commit`'s reopen of the backing file for writing was refused (no prefix).
    #[error("{source}")]
    Reopen {
        /// The refusal on the backing file.
        source: ChainError,
    },
    /// A step of `create` on the file was refused.
    #[error("{}: {source}", .path.display())]
    Create {
        /// IMAGE, as given.
        path: PathBuf,
        /// The lock error.
        source: Box<Error>,
    },
}

impl OpError {
    /// The conflict behind the refusal (another holder in the way), if it is one: `qemu-img`
    /// would be refused on locks. Anything else is not a lock answer.
    pub fn conflict(&self) -> Option<&crate::Conflict> {
        match self {
            OpError::Open { source, .. } | OpError::Reopen { source } => source.conflict(),
            OpError::Create { source, .. } => source.conflict(),
            _ => None,
        }
    }

    /// What to do about it, beyond `qemu-img`'s message ([`Error::hint`]); `None` when there
    /// is nothing more to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            OpError::Open { source, .. } | OpError::Reopen { source } => source.hint(),
            OpError::Create { source, .. } => source.hint(),
            _ => None,
        }
    }
}

/// Would `qemu-img op IMAGE` (with `-U` when `force_share`) get past locking now? Takes, on
/// read-only descriptors, the bytes `qemu-img` would take, in its order, and releases them
/// all before it returns. `format` is the format `create` makes (`-f`, raw by default as
/// `qemu-img`'s); the other ops probe IMAGE's format as `qemu-img` does without `-f`.
///
/// # Errors
/// [`OpError`], in `qemu-img`'s words; [`OpError::conflict`] tells a lock refusal from a
/// question with no answer (a graph qlock does not follow, `-U` where `qemu-img` takes none).
pub fn check(
    path: impl AsRef<Path>,
    op: Op,
    force_share: bool,
    format: Format,
    options: &LockOptions,
) -> Result<(), OpError> {
    let path = path.as_ref();
    let open_err = |source| OpError::Open { path: path.to_path_buf(), source };
    let Some(user) = op.user(force_share)? else {
        return create(path, format, options);
    };
    let chain = if user.opens_chain() { Chain::open(path, options) } else { Chain::open_top(path, options) }
        .map_err(open_err)?;
    let mut then = Vec::new();
    if op == Op::Commit
        && let Some((i, node)) =
            chain.nodes().iter().enumerate().find(|(_, n)| n.role == Role::Backing { depth: 1 })
    {
        then.push((i, Op::commit_backing(node.format)));
    }
    match ChainLock::lock_steps(chain, user, &then) {
        Ok(lock) => lock.release().map_err(|e| open_err(ChainError::Open(Box::new(e)))),
        Err((None, source)) => Err(open_err(source)),
        Err((Some(_), source)) => Err(OpError::Reopen { source }),
    }
}

/// `create`: the file step, then (qcow2) the new image opened read-write. A missing file
/// has nothing to be refused on.
fn create(path: &Path, format: Format, options: &LockOptions) -> Result<(), OpError> {
    let err = |e: Error| OpError::Create { path: path.to_path_buf(), source: Box::new(e) };
    let opts = options.clone().with_write(false);
    let mut file = match ImageLock::open(path, &opts) {
        Ok(file) => file,
        Err(Error::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    file.set_access(Op::CREATE_FILE).map_err(err)?;
    if format == Format::Qcow2 {
        file.set_access(User::QEMU_IO_RW.node(Role::Top, Format::Qcow2)).map_err(err)?;
    }
    file.release().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_list_the_ops() {
        for op in Op::ALL {
            assert_eq!(op.name().parse::<Op>(), Ok(op));
        }
        let e = "frobnicate".parse::<Op>().unwrap_err();
        assert!(e.contains("bench-write") && e.contains("info"), "{e}");
    }

    #[test]
    fn force_share_is_refused_where_qemu_img_refuses_it() {
        for op in [Op::Amend, Op::Commit, Op::Resize, Op::Create] {
            assert!(matches!(op.user(true), Err(OpError::NoForceShare(_))), "{op}");
        }
        for op in [Op::Snapshot, Op::BenchWrite] {
            assert!(matches!(op.user(true), Err(OpError::ForceShareWritable(_))), "{op}");
        }
        assert_eq!(Op::Rebase.user(true).unwrap(), Some(User::QEMU_IO_RW));
        assert_eq!(Op::Check.user(true).unwrap(), Some(User::QEMU_IO_FORCE_SHARE));
    }

    #[test]
    fn the_step_bytes_are_the_observed_ones() {
        let show = |a: Access| a.lock_set(Perm::ALL).to_string();
        assert_eq!(show(Op::CREATE_FILE), "101 103 | 203");
        assert_eq!(show(Op::commit_backing(Format::Qcow2)), "100 101 103 | 201 203");
        assert_eq!(show(Op::commit_backing(Format::Raw)), "100 101 | 203");
        let top = |op: Op| show(op.user(false).unwrap().unwrap().node(Role::Top, Format::Raw));
        assert_eq!(top(Op::Resize), "100 101 103 | -");
        assert_eq!(top(Op::BenchWrite), "100 101 | -");
        assert_eq!(top(Op::Convert), "100 | 201 203");
        assert_eq!(top(Op::Info), "- | -");
    }
}
