//! Raw lock sets, and the plans that move a holder from one lock set to another.
//!
//! A [`RawLock`] is any fcntl lock at all, protocol or not: libvirt's byte 0, the graph-mod
//! bytes of QEMU <= 6.2, a whole-file write lock as other VMMs take. Changes follow QEMU's
//! semantics for every kind of set: take the new locks first, then release what only the old
//! set had, so an observer never sees a state weaker than both.

use std::fmt;

use nix::libc;

use qlock_core::plan::plan;
use qlock_core::{Check, LockKind, LockSet, Perm};

use crate::wire::{Cmd, Op, Request};

/// One byte-range lock as a test wants it held, protocol or not.
///
/// ```
/// use qlock_testkit::{LockKind, RawLock};
///
/// let libvirt = RawLock::byte(0).exclusive().posix(); // virtlockd-style lease on byte 0
/// assert_eq!(libvirt, RawLock { start: 0, len: 1, write: true, kind: LockKind::Posix });
/// assert_eq!(RawLock::WHOLE_FILE.to_string(), "read 0-EOF (OFD)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RawLock {
    /// First byte.
    pub start: u64,
    /// Number of bytes; 0 means "to the end of the file, however large it grows".
    pub len: u64,
    /// A write (exclusive) lock instead of a read (shared) lock. QEMU never takes one: a write
    /// lock on a protocol byte makes a starting QEMU fail with `Failed to lock byte N`.
    pub write: bool,
    /// OFD or POSIX lock commands (both live in the same kernel lock table and conflict with
    /// each other; they differ in who owns a lock: the open file description, or the process).
    pub kind: LockKind,
}

impl RawLock {
    /// A whole-file read lock, as some VMMs and backup tools take.
    pub const WHOLE_FILE: RawLock = RawLock { start: 0, len: 0, write: false, kind: LockKind::Ofd };
    /// The graph-mod bytes 104 and 204 that QEMU 2.10 to 6.2 could hold (spec vector V20).
    pub const LEGACY_GRAPH_MOD: [RawLock; 2] = [RawLock::byte(104), RawLock::byte(204)];

    /// A read lock on one byte, OFD.
    pub const fn byte(byte: u64) -> RawLock {
        RawLock { start: byte, len: 1, write: false, kind: LockKind::Ofd }
    }

    /// A read lock on `start..start + len` (`len` 0: to the end of the file), OFD.
    pub const fn range(start: u64, len: u64) -> RawLock {
        RawLock { start, len, write: false, kind: LockKind::Ofd }
    }

    /// The same range as a write lock. The holder must be [`writable`](crate::HolderBuilder::writable)
    /// (the kernel refuses write locks on a read-only descriptor); spawning with a write lock
    /// in the initial set turns that on by itself.
    pub const fn exclusive(self) -> RawLock {
        RawLock { write: true, ..self }
    }

    /// The same lock with POSIX commands.
    pub const fn posix(self) -> RawLock {
        RawLock { kind: LockKind::Posix, ..self }
    }

    /// The read locks QEMU would hold for `set`, one byte each in QEMU's lock order.
    pub fn from_lock_set(set: LockSet, kind: LockKind) -> Vec<RawLock> {
        set.bytes().map(|b| RawLock { kind, ..RawLock::byte(b) }).collect()
    }

    /// The read locks an [`Access`](qlock_core::Access) holds (QEMU >= 7.0 bytes).
    pub fn from_access(access: qlock_core::Access, kind: LockKind) -> Vec<RawLock> {
        RawLock::from_lock_set(access.lock_set(Perm::ALL), kind)
    }

    /// The exclusive end, `u64::MAX` for "to the end of the file".
    fn end(self) -> u64 {
        if self.len == 0 { u64::MAX } else { self.start.saturating_add(self.len) }
    }

    /// Whether fcntl can express this range (`off_t` is signed 64-bit).
    pub(crate) fn is_valid(self) -> bool {
        let max = i64::MAX as u64;
        self.start <= max && (self.len == 0 || self.len <= max - self.start)
    }

    fn op(self) -> Op {
        let cmd = if self.write { Cmd::Write } else { Cmd::Read };
        Op { cmd, posix: self.kind == LockKind::Posix, start: self.start, len: self.len }
    }
}

/// The `struct flock` of one fcntl lock call: `l_type` (`F_RDLCK`, `F_WRLCK`, `F_UNLCK`) on
/// `len` bytes from `start` (0: to the end of the file), with the `l_pid` of 0 that OFD
/// commands require. For tests and benchmarks that make the calls by hand.
pub fn flock(l_type: libc::c_int, start: u64, len: u64) -> libc::flock {
    libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start as libc::off_t,
        l_len: len as libc::off_t,
        l_pid: 0,
    }
}

impl fmt::Display for RawLock {
    /// `read 100`, `write 0-EOF (POSIX)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.write { "write " } else { "read " })?;
        match self.len {
            0 => write!(f, "{}-EOF", self.start)?,
            1 => write!(f, "{}", self.start)?,
            n => write!(f, "{}-{}", self.start, self.start.saturating_add(n - 1))?,
        }
        f.write_str(match self.kind {
            LockKind::Ofd => " (OFD)",
            LockKind::Posix => " (POSIX)",
        })
    }
}

/// What a holder holds now, so that a change can be planned against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Held {
    /// QEMU-like: the protocol bytes of an access, taken with lock then check.
    Access(LockSet, LockKind),
    /// Exactly these locks, no checks.
    Raw(Vec<RawLock>),
}

impl Held {
    pub(crate) const NOTHING: Held = Held::Raw(Vec::new());

    fn locks(&self) -> Vec<RawLock> {
        match self {
            Held::Access(set, kind) => RawLock::from_lock_set(*set, *kind),
            Held::Raw(locks) => locks.clone(),
        }
    }
}

/// Plans moving from `old` to `new`. For an access target, the second value lists the checks
/// in the order of the request's check section, to name a conflict.
pub(crate) fn change(old: &Held, new: &Held) -> (Request, Vec<Check>) {
    if let (Held::Access(held, old_kind), Held::Access(wanted, kind)) = (old, new) {
        if old_kind == kind {
            return access_change(*held, *wanted, *kind);
        }
    }
    let checks: Vec<Check> = match new {
        Held::Access(wanted, _) => plan(LockSet::EMPTY, *wanted).checks().collect(),
        Held::Raw(_) => Vec::new(),
    };
    let posix = matches!(new, Held::Access(_, LockKind::Posix));
    let test = |c: &Check| Op { cmd: Cmd::Test, posix, start: c.byte(), len: 1 };
    let mut req = raw_change(&old.locks(), &new.locks());
    req.check = checks.iter().map(test).collect();
    (req, checks)
}

/// QEMU's own PREPARE / COMMIT / ABORT between two protocol lock sets.
fn access_change(held: LockSet, wanted: LockSet, kind: LockKind) -> (Request, Vec<Check>) {
    let p = plan(held, wanted);
    let posix = kind == LockKind::Posix;
    let ops =
        |set: LockSet, cmd| -> Vec<Op> { set.bytes().map(|b| Op { cmd, posix, start: b, len: 1 }).collect() };
    let checks: Vec<Check> = p.checks().collect();
    let req = Request {
        exit: false,
        node: 0,
        prepare: ops(p.add, Cmd::Read),
        check: checks.iter().map(|c| Op { cmd: Cmd::Test, posix, start: c.byte(), len: 1 }).collect(),
        commit: ops(p.release, Cmd::Unlock),
        abort: ops(p.add, Cmd::Unlock),
    };
    (req, checks)
}

/// Takes every lock of `new`, then releases what only `old` covered; on failure re-takes `old`
/// and releases what only `new` covered. Each kind is its own owner, so differences are taken
/// per kind.
fn raw_change(old: &[RawLock], new: &[RawLock]) -> Request {
    Request {
        exit: false,
        node: 0,
        prepare: new.iter().map(|l| l.op()).collect(),
        check: Vec::new(),
        commit: uncovered(old, new),
        abort: old.iter().map(|l| l.op()).chain(uncovered(new, old)).collect(),
    }
}

/// Unlock operations for the parts of `from` that no lock of the same kind in `keep` covers.
fn uncovered(from: &[RawLock], keep: &[RawLock]) -> Vec<Op> {
    let mut out = Vec::new();
    for l in from {
        let mut cuts: Vec<(u64, u64)> =
            keep.iter().filter(|k| k.kind == l.kind).map(|k| (k.start, k.end())).collect();
        cuts.sort_unstable();
        let end = l.end();
        let mut cur = l.start;
        let mut emit = |s: u64, e: u64| {
            let len = if e == u64::MAX { 0 } else { e - s };
            out.push(Op { cmd: Cmd::Unlock, posix: l.kind == LockKind::Posix, start: s, len });
        };
        for (cs, ce) in cuts {
            if ce <= cur || cs >= end {
                continue;
            }
            if cs > cur {
                emit(cur, cs);
            }
            cur = cur.max(ce);
            if cur >= end {
                break;
            }
        }
        if cur < end {
            emit(cur, end);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlock_core::Access;

    fn spans(ops: &[Op]) -> Vec<(Cmd, u64, u64)> {
        ops.iter().map(|o| (o.cmd, o.start, o.len)).collect()
    }

    #[test]
    fn access_changes_follow_qemu() {
        // qemu-io -r reopened read-write (spec V25): lock 101 103, check the whole new request,
        // release nothing; abort releases only what was added.
        let (req, checks) = change(
            &Held::Access(Access::READ.lock_set(Perm::ALL), LockKind::Ofd),
            &Held::Access(Access::WRITE.lock_set(Perm::ALL), LockKind::Ofd),
        );
        assert_eq!(spans(&req.prepare), vec![(Cmd::Read, 101, 1), (Cmd::Read, 103, 1)]);
        assert_eq!(req.check.iter().map(|o| o.start).collect::<Vec<_>>(), vec![200, 201, 203, 101, 103]);
        assert_eq!(checks.len(), 5);
        assert!(req.commit.is_empty());
        assert_eq!(spans(&req.abort), vec![(Cmd::Unlock, 101, 1), (Cmd::Unlock, 103, 1)]);
        // Fast path: going down checks nothing and releases at commit.
        let (req, _) = change(
            &Held::Access(Access::WRITE.lock_set(Perm::ALL), LockKind::Ofd),
            &Held::Access(Access::READ.lock_set(Perm::ALL), LockKind::Ofd),
        );
        assert!(req.prepare.is_empty() && req.check.is_empty());
        assert_eq!(spans(&req.commit), vec![(Cmd::Unlock, 101, 1), (Cmd::Unlock, 103, 1)]);
    }

    #[test]
    fn raw_changes_take_new_first_and_release_only_old_only_parts() {
        let old = Held::Raw(vec![RawLock::WHOLE_FILE, RawLock::byte(5).posix()]);
        let new = Held::Raw(vec![RawLock::range(100, 4).exclusive()]);
        let (req, checks) = change(&old, &new);
        assert!(checks.is_empty() && req.check.is_empty());
        assert_eq!(spans(&req.prepare), vec![(Cmd::Write, 100, 4)]);
        // The whole-file lock loses everything but 100-103; the POSIX byte goes entirely.
        assert_eq!(
            spans(&req.commit),
            vec![(Cmd::Unlock, 0, 100), (Cmd::Unlock, 104, 0), (Cmd::Unlock, 5, 1)]
        );
        // Abort re-takes the old set (turning 100-103 back to read) and drops nothing else.
        assert_eq!(spans(&req.abort), vec![(Cmd::Read, 0, 0), (Cmd::Read, 5, 1)]);
    }

    #[test]
    fn switching_to_an_access_checks_the_whole_request() {
        let (req, checks) = change(
            &Held::Raw(vec![RawLock::byte(0)]),
            &Held::Access(Access::READ.lock_set(Perm::ALL), LockKind::Ofd),
        );
        assert_eq!(spans(&req.prepare), vec![(Cmd::Read, 100, 1), (Cmd::Read, 201, 1), (Cmd::Read, 203, 1)]);
        assert_eq!(checks.iter().map(|c| c.byte()).collect::<Vec<_>>(), vec![200, 101, 103]);
        assert_eq!(spans(&req.commit), vec![(Cmd::Unlock, 0, 1)]);
    }

    #[test]
    fn ranges_beyond_off_t_are_invalid() {
        assert!(RawLock::range(i64::MAX as u64, 0).is_valid());
        assert!(!RawLock::range(i64::MAX as u64, 2).is_valid());
        assert!(!RawLock::byte(u64::MAX).is_valid());
        assert_eq!(RawLock::range(100, 2).exclusive().posix().to_string(), "write 100-101 (POSIX)");
    }
}
