//! [`ImageLock`]: an open image with QEMU-compatible locks, released on drop.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::libc;

use crate::access::Access;
use crate::error::{Conflict, ConflictReason, Error, Result};
use crate::perm::Perm;
use crate::posix::PosixClaim;
use crate::proc::{self, FileKey};
use crate::protocol::{ByteRange, Check, LockSet, Plan, plan};
use crate::sys::{self, LockKind};
use crate::wait::{self, Backoff};
use crate::wake::{self, CloseWatch};

/// QEMU's `locking=` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Lock with OFD locks where the kernel has them; otherwise lock nothing, silently
    /// (QEMU's default).
    #[default]
    Auto,
    /// Always lock: OFD where available, else POSIX locks with a warning.
    On,
    /// Never lock or test.
    Off,
}

impl fmt::Display for Locking {
    /// QEMU's spelling: `auto`, `on`, `off`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Locking::Auto => "auto",
            Locking::On => "on",
            Locking::Off => "off",
        })
    }
}

impl FromStr for Locking {
    type Err = String;

    /// Parses QEMU's `locking=` values.
    ///
    /// ```
    /// use qlock_core::Locking;
    ///
    /// assert_eq!("on".parse::<Locking>(), Ok(Locking::On));
    /// assert_eq!(Locking::Off.to_string().parse::<Locking>(), Ok(Locking::Off));
    /// assert!("yes".parse::<Locking>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Locking, String> {
        match s {
            "auto" => Ok(Locking::Auto),
            "on" => Ok(Locking::On),
            "off" => Ok(Locking::Off),
            _ => Err(format!("unknown locking mode {s:?}: expected auto, on or off")),
        }
    }
}

/// How an image is opened and locked.
///
/// Built like tokio's `OpenOptions`, so that options can be added without breaking callers:
/// start from [`LockOptions::default`] and change what differs with the `with_*` methods. The
/// fields can be read (and, on a value you own, assigned); the struct is `#[non_exhaustive]`,
/// so it cannot be written as a literal outside this crate.
///
/// ```
/// use qlock_core::{Locking, LockOptions};
///
/// let opts = LockOptions::default().with_locking(Locking::On);
/// assert_eq!(opts.locking, Locking::On);
/// assert!(!opts.write); // read-only descriptors unless asked
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockOptions {
    /// QEMU's `locking=auto|on|off`.
    pub locking: Locking,
    /// Honour graph-mod (bytes 104/204) as QEMU <= 6.2 did. Off by default, as in QEMU >= 7.0.
    pub legacy_graph_mod: bool,
    /// Open the image read-write instead of read-only (locks work on either).
    pub write: bool,
    /// Behave as if the kernel had no OFD locks (a test hook: see
    /// `LockOptions::with_force_posix`, behind the `test-hooks` feature).
    pub(crate) force_posix: bool,
    /// On a conflict, scan `/proc` to name the holders in the error (costs a few ms).
    pub find_holders: bool,
}

impl Default for LockOptions {
    fn default() -> LockOptions {
        LockOptions {
            locking: Locking::Auto,
            legacy_graph_mod: false,
            write: false,
            force_posix: false,
            find_holders: true,
        }
    }
}

impl LockOptions {
    /// QEMU's `locking=auto|on|off` ([`Locking::Auto`] by default).
    pub fn with_locking(mut self, locking: Locking) -> LockOptions {
        self.locking = locking;
        self
    }

    /// Honour graph-mod (bytes 104/204) as QEMU <= 6.2 did (off by default, as QEMU >= 7.0).
    pub fn with_legacy_graph_mod(mut self, legacy: bool) -> LockOptions {
        self.legacy_graph_mod = legacy;
        self
    }

    /// Open read-write instead of read-only (off by default; locks work on either).
    pub fn with_write(mut self, write: bool) -> LockOptions {
        self.write = write;
        self
    }

    /// On a conflict, name the holders in the error from a walk over `/proc` (on by default;
    /// a few ms). Polling loops turn it off and name them once, at the end, with
    /// [`ImageLock::with_holders`].
    pub fn with_find_holders(mut self, find: bool) -> LockOptions {
        self.find_holders = find;
        self
    }

    /// Behave as if the kernel had no OFD locks: POSIX locks with [`Locking::On`], no locks with
    /// [`Locking::Auto`], as in QEMU. Only for testing the fallback (POSIX locks are lost when
    /// the process closes *any* descriptor of the file, and do not see the process's own
    /// locks), so only with the `test-hooks` feature, which test suites enable.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn with_force_posix(mut self, force: bool) -> LockOptions {
        self.force_posix = force;
        self
    }

    /// The lock commands these options select, or `None` when nothing is to be locked.
    pub fn lock_kind(&self) -> Option<LockKind> {
        let ofd = !self.force_posix && sys::ofd_supported();
        match self.locking {
            Locking::Off => None,
            Locking::Auto if ofd => Some(LockKind::Ofd),
            Locking::Auto => None,
            Locking::On if ofd => Some(LockKind::Ofd),
            Locking::On => {
                if !self.force_posix {
                    tracing::warn!(
                        "File lock requested but OFD locking syscall is unavailable, falling \
                         back to POSIX file locks. Due to the implementation, locks can be lost \
                         unexpectedly."
                    );
                }
                Some(LockKind::Posix)
            }
        }
    }

    fn all(&self) -> Perm {
        if self.legacy_graph_mod { Perm::LEGACY_ALL } else { Perm::ALL }
    }
}

/// An open image holding QEMU-compatible read locks for an [`Access`].
///
/// Dropping it closes the descriptor, which releases every lock at once (the fast path: no
/// unlock calls). [`ImageLock::release`] unlocks explicitly, then closes, and reports errors.
/// The descriptor is `O_RDONLY | O_CLOEXEC | O_NONBLOCK` (`O_RDWR` with [`LockOptions::write`]),
/// so the locks never leak into child processes.
///
/// One window remains, as in QEMU: while another thread of the process is between `fork` and
/// `exec` (spawning a command), the child shares every open file description, so a lock whose
/// guard is *dropped* in that moment lives on for those microseconds. [`ImageLock::release`]
/// unlocks the shared description itself and has no such window: use it when something must
/// see the image free as soon as the call returns.
///
/// ```
/// use qlock_core::{Access, ImageLock};
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("disk.qcow2");
/// # std::fs::write(&path, b"").unwrap();
///
/// let lock = ImageLock::acquire(&path, Access::WRITE)?;      // like a VM on a qcow2 disk
/// let err = ImageLock::acquire(&path, Access::READ).unwrap_err();
/// assert!(err.to_string().starts_with("Failed to get shared \"write\" lock"));
/// drop(lock);
/// ImageLock::acquire(&path, Access::READ)?;                 // free again
/// # Ok::<(), qlock_core::Error>(())
/// ```
#[must_use = "the locks are released when the ImageLock is dropped"]
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    /// Held for its `Drop` only; declared after `file`, so the descriptor is closed before the
    /// claim is given up.
    _posix_claim: Option<PosixClaim>,
    /// Device and inode, read once at open: inspection and holder lookup match on them.
    key: FileKey,
    path: PathBuf,
    kind: Option<LockKind>,
    all: Perm,
    access: Access,
    held: LockSet,
    find_holders: bool,
}

impl ImageLock {
    /// Opens `path` and takes `access` with default options, failing at once on a conflict.
    ///
    /// # Errors
    /// [`Error::Conflict`] when another holder is in the way (with QEMU's message), and the
    /// open and filesystem errors of [`ImageLock::open`] and [`ImageLock::set_access`].
    pub fn acquire(path: impl AsRef<Path>, access: Access) -> Result<ImageLock> {
        ImageLock::acquire_with(path, access, &LockOptions::default())
    }

    /// Opens `path` and takes `access` with `options`, failing at once on a conflict.
    ///
    /// # Errors
    /// As [`ImageLock::acquire`].
    pub fn acquire_with(path: impl AsRef<Path>, access: Access, options: &LockOptions) -> Result<ImageLock> {
        let mut lock = ImageLock::open(path, options)?;
        lock.set_access(access)?;
        Ok(lock)
    }

    /// Opens `path` and waits for `access`, retrying with `backoff` until its timeout.
    ///
    /// Waiting is polling: qlock never sleeps inside the kernel on a lock (`F_OFD_SETLKW`),
    /// because a blocked read lock would wait only for write locks, never for QEMU. A close of
    /// the image (inotify) ends a sleep early, since it often means a holder went away.
    ///
    /// # Errors
    /// [`Error::TimedOut`] naming the last conflict and its holders; any error other than a
    /// conflict ends the wait at once.
    pub fn acquire_wait(
        path: impl AsRef<Path>,
        access: Access,
        options: &LockOptions,
        backoff: &Backoff,
    ) -> Result<ImageLock> {
        let mut lock = ImageLock::open(path, options)?;
        lock.wait_for(access, backoff)?;
        Ok(lock)
    }

    /// Opens `path` without locking anything yet (QEMU's state before the first parent
    /// attaches: no permission, everything shared).
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::IsADirectory`], [`Error::NotAnImage`],
    /// [`Error::PermissionDenied`] or [`Error::Open`]; under POSIX locks,
    /// [`Error::PosixSameProcess`] when this process already has the image open through qlock.
    pub fn open(path: impl AsRef<Path>, options: &LockOptions) -> Result<ImageLock> {
        let path = path.as_ref();
        let kind = options.lock_kind();
        // Under POSIX locks even a refused second descriptor would unlock the first when closed:
        // check before opening.
        let posix_claim = match kind {
            Some(LockKind::Posix) => Some(PosixClaim::claim(path)?),
            _ => None,
        };
        // O_NONBLOCK keeps a FIFO from hanging the open; it changes nothing for files and
        // block devices. std adds O_CLOEXEC.
        let file = OpenOptions::new()
            .read(true)
            .write(options.write)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::open(path, e))?;
        let md = file.metadata().map_err(|e| Error::open(path, e))?;
        let ft = md.file_type();
        let not = |kind| Err(Error::NotAnImage { path: path.to_path_buf(), kind });
        if ft.is_dir() {
            return Err(Error::IsADirectory { path: path.to_path_buf() });
        } else if ft.is_fifo() {
            return not("fifo");
        } else if ft.is_socket() {
            return not("socket");
        } else if ft.is_char_device() {
            return not("character device");
        }
        Ok(ImageLock {
            file,
            _posix_claim: posix_claim,
            key: proc::file_key(&md),
            path: path.to_path_buf(),
            kind,
            all: options.all(),
            access: Access::NONE,
            held: LockSet::EMPTY,
            find_holders: options.find_holders,
        })
    }

    /// Changes the access of this open image with QEMU's semantics (docs/protocol.md §3).
    ///
    /// The union of the old and new bytes is locked first and only the new request is checked;
    /// on success the old-only bytes are released, on failure exactly the bytes this call added
    /// are, so there is never a moment weaker than either state. A request that adds nothing
    /// takes QEMU's fast path: it only releases.
    ///
    /// # Errors
    /// [`Error::Conflict`], [`Error::Unsupported`] or [`Error::Lock`]; the previous access is
    /// still held, unchanged.
    pub fn set_access(&mut self, access: Access) -> Result<()> {
        self.update(access, self.find_holders)
    }

    /// Waits until `access` can be had on this open image, then takes it.
    ///
    /// # Errors
    /// As [`ImageLock::acquire_wait`]; the previous access is still held on error.
    pub fn wait_for(&mut self, access: Access, backoff: &Backoff) -> Result<()> {
        let find = self.find_holders;
        // A close of the image often means a holder went away: retry then, not at the next tick.
        // The watch is made at the first sleep: closing one costs ~10 ms of kernel time, which an
        // uncontended wait should not pay.
        let path = self.path.clone();
        let mut watch: Option<Vec<CloseWatch>> = None;
        let result = wait::retry_blocking(
            backoff,
            || self.update(access, false),
            |d| {
                wake::sleep_or_close(
                    watch.get_or_insert_with(|| CloseWatch::new(&path).into_iter().collect()),
                    d,
                )
            },
        );
        result.map_err(|e| if find { self.with_holders(e) } else { e })
    }

    /// The access held now.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The protocol bytes this descriptor holds.
    pub fn held(&self) -> LockSet {
        self.held
    }

    /// The lock commands in use, or `None` when locking is off (or `auto` without OFD).
    pub fn lock_kind(&self) -> Option<LockKind> {
        self.kind
    }

    /// Device and inode of the open image.
    pub(crate) fn file_key(&self) -> FileKey {
        self.key
    }

    /// The path as given when opening.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open image, for I/O. Do not close duplicates of it under POSIX locking: closing any
    /// descriptor of the file drops the process's POSIX locks.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Releases every lock and closes the image, reporting an unlock failure that dropping would
    /// only log.
    ///
    /// # Errors
    /// [`Error::Unlock`] when the filesystem refused to unlock (seen on NFS); the descriptor is
    /// closed regardless, which releases the locks as far as the kernel is concerned.
    pub fn release(self) -> Result<()> {
        let Some(kind) = self.kind.filter(|_| !self.held.is_empty()) else { return Ok(()) };
        let all = ByteRange::PROTOCOL;
        sys::unlock(self.file.as_fd(), kind, all).map_err(|source| Error::Unlock {
            path: self.path.clone(),
            byte: all.start,
            source,
        })
    }

    /// The first half of an access change spread over several images (a chain guard): locks
    /// the bytes of `union` (the old access and `new` together) and checks only `new`, as
    /// [`ImageLock::set_access`] does before it commits. The image then holds `union`; a
    /// [`set_access`](ImageLock::set_access) to `new` (commit) or back to the old access
    /// (abort) afterwards only releases, so it cannot fail on a conflict.
    pub(crate) fn prepare(&mut self, union: Access, new: Access) -> Result<()> {
        let mut p = plan(self.held, union.lock_set(self.all));
        if !p.check.is_empty() {
            p.check = new.lock_set(self.all);
        }
        self.run(p, union, self.find_holders)
    }

    /// The one PREPARE / CHECK / COMMIT-or-ABORT path behind every access change.
    pub(crate) fn update(&mut self, access: Access, find_holders: bool) -> Result<()> {
        let p = plan(self.held, access.lock_set(self.all));
        self.run(p, access, find_holders)
    }

    /// Runs a plan: lock `plan.add`, check `plan.check`, then commit to `access` or abort.
    fn run(&mut self, plan: Plan, access: Access, find_holders: bool) -> Result<()> {
        let Some(kind) = self.kind else {
            self.access = access;
            return Ok(());
        };
        let fd = self.file.as_fd();
        let mut taken = LockSet::EMPTY;
        let outcome = lock_runs(fd, kind, plan.add, &mut taken).and_then(|()| {
            match plan.probe_cover().map(|cover| sys::test_write(fd, kind, cover)) {
                None | Some(Ok(None)) => Ok(None),
                Some(Ok(Some(_))) => first_conflict(fd, kind, plan.checks()),
                Some(Err(e)) => Err(Failure::Probe(plan.checks().next(), e)),
            }
        });
        match outcome {
            Ok(None) => {
                unlock_runs(fd, kind, plan.release, &self.path);
                self.held = plan.target;
                self.access = access;
                Ok(())
            }
            Ok(Some(reason)) => {
                unlock_runs(fd, kind, taken, &self.path);
                let conflict = Conflict { path: self.path.clone(), reason, holders: Vec::new() };
                let err = Error::Conflict(Box::new(conflict));
                Err(if find_holders { self.with_holders(err) } else { err })
            }
            Err(failure) => {
                unlock_runs(fd, kind, taken, &self.path);
                // A write lock met in the lock phase is a conflict too: name its holder.
                let err = failure.into_error(&self.path);
                Err(if find_holders { self.with_holders(err) } else { err })
            }
        }
    }

    /// Fills in who holds the contested byte of a conflict (also inside a timeout), from one
    /// walk over `/proc`. Other errors are returned unchanged.
    pub fn with_holders(&self, err: Error) -> Error {
        self.holder_lookup().with_holders(err)
    }

    /// What naming the holders needs, detached from the descriptor: callers that walk `/proc`
    /// on another thread (the async guards, on their blocking pool) send this there and keep
    /// the descriptor, so nothing they hold is at risk while the walk runs.
    pub fn holder_lookup(&self) -> HolderLookup {
        HolderLookup { key: self.key, own_fd: self.file.as_raw_fd() }
    }
}

/// The device and inode of an open image and the descriptor number to leave out (its own
/// locks are no conflict): all [`ImageLock::with_holders`] needs, as a `Copy` value that can
/// cross threads while the guard stays where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HolderLookup {
    key: FileKey,
    own_fd: RawFd,
}

impl HolderLookup {
    /// As [`ImageLock::with_holders`]. Run it while the guard is open: the descriptor number
    /// it leaves out could otherwise name another open of the same file in this process.
    pub fn with_holders(&self, mut err: Error) -> Error {
        let conflict = match &mut err {
            Error::Conflict(c) => c,
            Error::TimedOut { last, .. } => match last.as_mut() {
                Error::Conflict(c) => c,
                _ => return err,
            },
            _ => return err,
        };
        conflict.holders = proc::holding_byte(self.key, self.own_fd, conflict.byte());
        err
    }
}

impl AsFd for ImageLock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Why a lock or check call failed, before it becomes an [`Error`].
enum Failure {
    Lock(u64, io::Error),
    Probe(Option<Check>, io::Error),
}

impl Failure {
    fn into_error(self, path: &Path) -> Error {
        let path = path.to_path_buf();
        match self {
            Failure::Lock(byte, source) => match source.raw_os_error() {
                Some(libc::EAGAIN | libc::EACCES) => Error::Conflict(Box::new(Conflict {
                    path,
                    reason: ConflictReason::WriteLocked(byte),
                    holders: Vec::new(),
                })),
                _ if crate::error::is_unsupported(&source) => {
                    Error::Unsupported { path, byte, probe: false, source }
                }
                _ => Error::Lock { path, message: format!("Failed to lock byte {byte}"), source },
            },
            Failure::Probe(check, source) => {
                let message = check.map_or_else(|| "Failed to get lock".into(), Check::message);
                Error::Lock { path, message, source }
            }
        }
    }
}

/// Lock phase: read-locks each run of `add`, recording what was taken in `taken`. A run that
/// meets a write lock is retried byte by byte, so the error names the byte QEMU would name.
fn lock_runs(fd: BorrowedFd<'_>, kind: LockKind, add: LockSet, taken: &mut LockSet) -> Result<(), Failure> {
    for run in add.runs().iter() {
        match sys::read_lock(fd, kind, run) {
            Ok(()) => {
                run.bytes().for_each(|b| taken.add_byte(b));
                continue;
            }
            // A write lock somewhere in the run: narrow it down to the byte QEMU would name.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {}
            // Anything else is the filesystem's answer to the first byte QEMU would try.
            Err(e) => return Err(Failure::Lock(run.start, e)),
        }
        for b in run.bytes() {
            sys::read_lock(fd, kind, ByteRange::byte(b)).map_err(|e| Failure::Lock(b, e))?;
            taken.add_byte(b);
        }
    }
    Ok(())
}

/// Check phase, exact: the first check in QEMU's order whose byte someone else holds.
fn first_conflict(
    fd: BorrowedFd<'_>,
    kind: LockKind,
    checks: impl Iterator<Item = Check>,
) -> Result<Option<ConflictReason>, Failure> {
    for check in checks {
        match sys::test_write(fd, kind, ByteRange::byte(check.byte())) {
            Ok(None) => {}
            Ok(Some(_)) => return Ok(Some(ConflictReason::Check(check))),
            Err(e) => return Err(Failure::Probe(Some(check), e)),
        }
    }
    Ok(None)
}

/// Releases `set`; failures only warn, as in QEMU (unlocks can fail on NFS).
fn unlock_runs(fd: BorrowedFd<'_>, kind: LockKind, set: LockSet, path: &Path) {
    for run in set.runs().iter() {
        if let Err(e) = sys::unlock(fd, kind, run) {
            tracing::warn!(path = %path.display(), "Failed to unlock byte {}: {e}", run.start);
        }
    }
}

/// An empty image file in a fresh temporary directory, for the unit tests of every module.
#[cfg(test)]
pub(crate) fn temp_image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, b"").expect("create image");
    (dir, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::inspect;
    use crate::sys::seam;

    /// The protocol bytes held by anyone other than a fresh description of `path`.
    fn held_from_outside(path: &Path) -> LockSet {
        inspect(&[path]).remove(0).expect("inspect").others.held
    }

    #[test]
    fn a_failure_on_the_kth_lock_call_leaves_exactly_the_old_state() {
        let olds = [None, Some(Access::READ), Some(Access::FORCE_SHARE), Some(Access::INFO)];
        let errnos = [libc::ENOLCK, libc::EIO, libc::EAGAIN, libc::EINVAL];
        for old in olds {
            for preset in Access::PRESETS {
                for k in 0..12 {
                    for errno in errnos {
                        let (_dir, path) = temp_image();
                        let mut lock = ImageLock::open(&path, &LockOptions::default()).unwrap();
                        if let Some(old) = old {
                            lock.set_access(old).unwrap();
                        }
                        let before = lock.held();
                        seam::fail_lock_call(k, errno);
                        let result = lock.set_access(preset.access);
                        seam::disarm();
                        let outside = held_from_outside(&path);
                        match result {
                            Err(e) => {
                                assert_eq!(lock.held(), before, "{e}");
                                assert_eq!(outside, before, "k={k} errno={errno} {}: {e}", preset.name);
                            }
                            Ok(()) => assert_eq!(
                                outside,
                                preset.access.lock_set(Perm::ALL),
                                "k={k} {}",
                                preset.name
                            ),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn lock_phase_errors_name_the_byte_like_qemu() {
        let (_dir, path) = temp_image();
        let mut lock = ImageLock::open(&path, &LockOptions::default()).unwrap();
        seam::fail_lock_call(0, libc::ENOLCK);
        let err = lock.set_access(Access::WRITE).unwrap_err();
        seam::disarm();
        assert!(matches!(err, Error::Unsupported { byte: 100, .. }), "{err:?}");
        // Display is QEMU's line alone; the advice is in hint().
        assert_eq!(err.to_string(), "Failed to lock byte 100: No locks available");
        assert!(err.hint().is_some_and(|h| h.contains("--locking off")), "{:?}", err.hint());
        seam::fail_lock_call(0, libc::EOPNOTSUPP);
        let err = lock.set_access(Access::INFO).unwrap_err();
        seam::disarm();
        assert!(err.to_string().starts_with("Failed to lock byte 201: Operation not supported"), "{err}");
        // The probe call failing: QEMU appends strerror to the first check's message.
        // WRITE locks four runs, then probes: the 5th lock-or-probe call is the probe.
        seam::fail_lock_call(4, libc::EIO);
        let err = lock.set_access(Access::WRITE).unwrap_err();
        seam::disarm();
        assert_eq!(err.to_string(), "Failed to get \"consistent read\" lock: Input/output error");
        assert!(held_from_outside(&path).is_empty());
    }

    #[test]
    fn an_acquire_of_write_makes_six_fcntl_calls_at_most() {
        let (_dir, path) = temp_image();
        let before = seam::calls();
        let lock = ImageLock::acquire(&path, Access::WRITE).unwrap();
        drop(lock);
        // 4 lock runs (100-101, 103, 201, 203) and 1 probe covering 101..=203; close releases.
        assert_eq!(seam::calls() - before, 5);
    }
}
