//! The only place that calls `fcntl`: one thin wrapper per lock command.
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
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

use crate::protocol::ByteRange;

/// Which family of fcntl lock commands a descriptor uses.
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

/// Whether this kernel supports OFD locks, probed once per process on `/dev/null` like QEMU.
pub(crate) fn ofd_supported() -> bool {
    static OFD: OnceLock<bool> = OnceLock::new();
    *OFD.get_or_init(|| {
        let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") else {
            tracing::warn!("Failed to open /dev/null for OFD lock probing; using POSIX locks");
            return false;
        };
        let mut fl = flock(libc::F_WRLCK, ByteRange { start: 0, len: 0 });
        fcntl(&null, FcntlArg::F_OFD_GETLK(&mut fl)).is_ok()
    })
}

/// Whether `fd` lives on a local filesystem (ext2/3/4, xfs, btrfs, tmpfs), where lock calls
/// are non-blocking syscalls of well under a microsecond.
///
/// Async callers may run such calls inline on their executor. Anything else (NFS, CIFS, FUSE,
/// overlay over an unknown lower layer, or a failing `fstatfs`) may block for a network round
/// trip, so it answers false and the calls belong on a blocking pool.
///
/// ```
/// let tmp = std::fs::File::open(std::env::temp_dir())?;
/// let _local: bool = qlock_core::is_local_fs(std::os::fd::AsFd::as_fd(&tmp));
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # References
/// - [`statfs(2)`](https://man7.org/linux/man-pages/man2/statfs.2.html)
pub fn is_local_fs(fd: BorrowedFd<'_>) -> bool {
    use nix::sys::statfs::{BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC, fstatfs};
    // EXT4_SUPER_MAGIC is also ext2's and ext3's.
    fstatfs(fd).is_ok_and(|s| {
        [EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, BTRFS_SUPER_MAGIC, TMPFS_MAGIC].contains(&s.filesystem_type())
    })
}

/// Read-locks `range` (non-blocking, `EINTR` retried).
#[doc(alias = "F_OFD_SETLK")]
pub(crate) fn read_lock(fd: BorrowedFd<'_>, kind: LockKind, range: ByteRange) -> io::Result<()> {
    seam::lock_call()?;
    setlk(fd, kind, libc::F_RDLCK, range)
}

/// Releases `range` (`F_UNLCK`).
pub(crate) fn unlock(fd: BorrowedFd<'_>, kind: LockKind, range: ByteRange) -> io::Result<()> {
    setlk(fd, kind, libc::F_UNLCK, range)
}

/// Asks whether a write lock on `range` would conflict with anyone else's lock, and returns the
/// first such lock. Locks of this same description (OFD) or process (POSIX) are not reported.
#[doc(alias = "F_OFD_GETLK")]
pub(crate) fn test_write(
    fd: BorrowedFd<'_>,
    kind: LockKind,
    range: ByteRange,
) -> io::Result<Option<FoundLock>> {
    seam::lock_call()?;
    let mut fl = flock(libc::F_WRLCK, range);
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

fn setlk(fd: BorrowedFd<'_>, kind: LockKind, ty: libc::c_int, range: ByteRange) -> io::Result<()> {
    debug_assert!(ty != libc::F_WRLCK, "qlock never sets a write lock");
    let fl = flock(ty, range);
    retry_eintr(|| {
        seam::count();
        match kind {
            LockKind::Ofd => fcntl(fd, FcntlArg::F_OFD_SETLK(&fl)),
            LockKind::Posix => fcntl(fd, FcntlArg::F_SETLK(&fl)),
        }
    })
    .map(drop)
}

fn flock(ty: libc::c_int, range: ByteRange) -> libc::flock {
    libc::flock {
        l_type: ty as libc::c_short,
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

#[cfg(test)]
mod local_fs_tests {
    use std::os::fd::AsFd;

    #[test]
    fn tmpfs_is_local_and_procfs_is_not() {
        let shm = std::fs::File::open("/dev/shm").unwrap();
        assert!(super::is_local_fs(shm.as_fd()));
        let proc = std::fs::File::open("/proc/self/status").unwrap();
        assert!(!super::is_local_fs(proc.as_fd()));
    }
}
