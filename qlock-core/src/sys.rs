//! The only place that calls `fcntl`: one thin wrapper per lock command, the rustix way.
//!
//! Each wrapper's doc opens with its C call and ends with its references; descriptors come in
//! as `impl AsFd`; what a set-lock call does is an enum with no write variant, so the one call
//! qlock must never make cannot be written.
//!
//! OFD locks (`F_OFD_SETLK` / `F_OFD_GETLK`) belong to the open file description, so two
//! descriptors of one process see each other and closing an unrelated descriptor loses nothing.
//! POSIX locks (`F_SETLK` / `F_GETLK`) are the fallback where OFD is missing, as in QEMU.
//! Nothing here ever sets a write lock or waits (`F_*SETLKW`): a write lock is only ever
//! *tested*.
//!
//! # References
//! - [`fcntl(2)`](https://man7.org/linux/man-pages/man2/fcntl.2.html), "Open file description locks"
//! - QEMU `util/osdep.c` (`qemu_probe_lock_ops`): OFD is probed once, on `/dev/null`.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

use crate::protocol::ByteRange;

/// Which family of fcntl lock commands a descriptor uses.
#[doc(alias = "F_OFD_SETLK")]
#[doc(alias = "F_SETLK")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockKind {
    /// Open file description locks (Linux >= 3.15). What QEMU uses when it can.
    Ofd,
    /// Classic process-associated POSIX locks: lost when the process closes *any* descriptor of
    /// the file, and blind to the process's own locks.
    Posix,
}

/// A lock another description holds, as `F_GETLK` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FoundLock {
    /// The reported range; `len == 0` means "to the end of the file".
    pub start: u64,
    /// Length; 0 for "to end of file".
    pub len: u64,
    /// True for a write (exclusive) lock.
    pub write: bool,
    /// The holder's pid for a POSIX lock; `None` for an OFD lock (the kernel reports -1).
    pub pid: Option<u32>,
}

/// `fcntl(fd, F_OFD_GETLK, ...)` on `/dev/null`, once per process: whether this kernel has OFD
/// locks, probed as QEMU probes them.
///
/// # References
/// - QEMU `util/osdep.c` (`qemu_probe_lock_ops`), observed: a kernel without OFD fails the call
///   with `EINVAL`.
pub(crate) fn ofd_supported() -> bool {
    static OFD: OnceLock<bool> = OnceLock::new();
    *OFD.get_or_init(|| {
        let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") else {
            tracing::warn!("Failed to open /dev/null for OFD lock probing; using POSIX locks");
            return false;
        };
        let mut fl = flock(Probe::TYPE, ByteRange { start: 0, len: 0 });
        fcntl(&null, FcntlArg::F_OFD_GETLK(&mut fl)).is_ok()
    })
}

/// `fstatfs(fd)`'s `f_type`: the filesystem's magic number ([`statfs(2)`]), or `None` when the
/// call fails. Widened to `i64` whatever the C library's width for it (glibc's is signed, musl's
/// unsigned; every magic fits in 32 bits).
///
/// [`statfs(2)`]: https://man7.org/linux/man-pages/man2/statfs.2.html
pub(crate) fn fs_magic(fd: impl AsFd) -> Option<i64> {
    #[allow(clippy::unnecessary_cast)] // a no-op on glibc, a widening on musl
    nix::sys::statfs::fstatfs(fd).ok().map(|s| s.filesystem_type().0 as i64)
}

/// What a set-lock command is asked to do. There is no write lock here: qlock never sets one,
/// so a call that would is not representable (write locks are only *tested*, by [`test_write`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetLock {
    /// `F_RDLCK`: a shared read lock, the only lock QEMU's protocol takes.
    Read,
    /// `F_UNLCK`: release.
    Unlock,
}

impl SetLock {
    fn l_type(self) -> libc::c_short {
        (match self {
            SetLock::Read => libc::F_RDLCK,
            SetLock::Unlock => libc::F_UNLCK,
        }) as libc::c_short
    }
}

/// The lock type a probe asks about: a write lock, which any other lock conflicts with.
struct Probe;

impl Probe {
    const TYPE: libc::c_short = libc::F_WRLCK as libc::c_short;
}

/// `fcntl(fd, F_OFD_SETLK, {F_RDLCK, range})` (`F_SETLK` for POSIX locks): read-locks `range`
/// without waiting, `EINTR` retried.
///
/// # References
/// - [`fcntl(2)`](https://man7.org/linux/man-pages/man2/fcntl.2.html), "Open file description locks"
pub(crate) fn read_lock(fd: impl AsFd, kind: LockKind, range: ByteRange) -> io::Result<()> {
    seam::lock_call()?;
    setlk(fd.as_fd(), kind, SetLock::Read, range)
}

/// `fcntl(fd, F_OFD_SETLK, {F_UNLCK, range})` (`F_SETLK` for POSIX locks): releases `range`.
///
/// # References
/// - [`fcntl(2)`](https://man7.org/linux/man-pages/man2/fcntl.2.html), "Open file description locks"
pub(crate) fn unlock(fd: impl AsFd, kind: LockKind, range: ByteRange) -> io::Result<()> {
    setlk(fd.as_fd(), kind, SetLock::Unlock, range)
}

/// `fcntl(fd, F_OFD_GETLK, {F_WRLCK, range})` (`F_GETLK` for POSIX locks): whether a write lock
/// on `range` would conflict with anyone else's lock, and the first such lock. Locks of this
/// same description (OFD) or process (POSIX) are not reported.
///
/// # References
/// - [`fcntl(2)`](https://man7.org/linux/man-pages/man2/fcntl.2.html), "Open file description locks"
pub(crate) fn test_write(fd: impl AsFd, kind: LockKind, range: ByteRange) -> io::Result<Option<FoundLock>> {
    seam::lock_call()?;
    let fd = fd.as_fd();
    let mut fl = flock(Probe::TYPE, range);
    retry_eintr(|| {
        seam::count();
        match kind {
            LockKind::Ofd => fcntl(fd, FcntlArg::F_OFD_GETLK(&mut fl)),
            LockKind::Posix => fcntl(fd, FcntlArg::F_GETLK(&mut fl)),
        }
    })?;
    if i32::from(fl.l_type) == libc::F_UNLCK {
        return Ok(None);
    }
    Ok(Some(FoundLock {
        start: u64::try_from(fl.l_start).unwrap_or(0),
        len: u64::try_from(fl.l_len).unwrap_or(0),
        write: i32::from(fl.l_type) == libc::F_WRLCK,
        pid: u32::try_from(fl.l_pid).ok().filter(|p| *p > 0),
    }))
}

fn setlk(fd: BorrowedFd<'_>, kind: LockKind, op: SetLock, range: ByteRange) -> io::Result<()> {
    let fl = flock(op.l_type(), range);
    retry_eintr(|| {
        seam::count();
        match kind {
            LockKind::Ofd => fcntl(fd, FcntlArg::F_OFD_SETLK(&fl)),
            LockKind::Posix => fcntl(fd, FcntlArg::F_SETLK(&fl)),
        }
    })
    .map(drop)
}

fn flock(l_type: libc::c_short, range: ByteRange) -> libc::flock {
    libc::flock {
        l_type,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: range.start as libc::off_t,
        l_len: range.len as libc::off_t,
        // OFD commands fail with EINVAL unless l_pid is 0.
        l_pid: 0,
    }
}

fn retry_eintr<T>(mut f: impl FnMut() -> nix::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Per-thread counters and fault injection around the fcntl calls: test hooks, compiled only
/// for this crate's unit tests and with the `test-hooks` feature (which the test suites
/// enable); a release build has neither counter nor seam.
#[cfg(any(test, feature = "test-hooks"))]
pub(crate) mod seam {
    use std::cell::Cell;
    use std::io;

    thread_local! {
        static CALLS: Cell<u64> = const { Cell::new(0) };
        static FAULT: Cell<Option<(u32, i32)>> = const { Cell::new(None) };
    }

    pub(super) fn count() {
        CALLS.with(|c| c.set(c.get() + 1));
    }

    /// Called before every lock or probe call (not unlocks): fails it when a fault is armed.
    pub(super) fn lock_call() -> io::Result<()> {
        FAULT.with(|f| match f.get() {
            Some((0, errno)) => {
                f.set(None);
                Err(io::Error::from_raw_os_error(errno))
            }
            Some((k, errno)) => {
                f.set(Some((k - 1, errno)));
                Ok(())
            }
            None => Ok(()),
        })
    }

    /// fcntl calls made by this thread so far.
    pub(crate) fn calls() -> u64 {
        CALLS.with(Cell::get)
    }

    /// Makes this thread's `k`-th next lock or probe call (0-based) fail with `errno`.
    #[cfg(test)]
    pub(crate) fn fail_lock_call(k: u32, errno: i32) {
        FAULT.with(|f| f.set(Some((k, errno))));
    }

    /// Disarms a fault that did not fire.
    #[cfg(test)]
    pub(crate) fn disarm() {
        FAULT.with(|f| f.set(None));
    }
}

/// The release build's seam: nothing to count, nothing to fail.
#[cfg(not(any(test, feature = "test-hooks")))]
mod seam {
    pub(super) fn count() {}

    pub(super) fn lock_call() -> std::io::Result<()> {
        Ok(())
    }
}

/// The number of fcntl calls this thread has made through qlock, for benchmarks and tests of
/// the call count (with the `test-hooks` feature only).
#[cfg(any(test, feature = "test-hooks"))]
pub fn fcntl_calls() -> u64 {
    seam::calls()
}
