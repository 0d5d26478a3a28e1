//! Shared helpers of the integration tests: an in-process raw lock holder that plays "another
//! program" (including the foreign write locks qlock itself never takes) fast enough for the
//! exhaustive tests, and byte probes from outside. Holder processes are qlock-testkit's.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;
use qlock_core::{Access, ConflictReason, Error, LockSet, Perm, Verdict};
use qlock_testkit::FakeQemu;
use qlock_testkit::raw::flock;

/// The eight protocol bytes QEMU >= 7.0 uses, in lock order.
pub(crate) const BYTES: [u64; 8] = [100, 101, 102, 103, 200, 201, 202, 203];

/// The bytes `access` locks, as a [`LockSet`] (graph-mod left out, as QEMU >= 7.0 does).
pub(crate) fn set(access: Access) -> LockSet {
    access.lock_set(Perm::ALL)
}

/// The access that locks exactly `s`.
pub(crate) fn access_of(s: LockSet) -> Access {
    Access::new(s.perm, Perm::ALL - s.unshared)
}

/// All 256 accesses over the four bits (16 perm sets x 16 shared sets).
pub(crate) fn all_accesses() -> impl Iterator<Item = Access> {
    (0u8..16).flat_map(|p| {
        (0u8..16).map(move |s| Access::new(Perm::from_bits_retain(p), Perm::from_bits_retain(s)))
    })
}

/// The 256 subsets of the eight protocol bytes, indexed by an 8-bit mask (bit k = `BYTES[k]`).
pub(crate) fn lockset_of_mask(mask: u8) -> LockSet {
    LockSet::new(Perm::from_bits_retain(mask & 0x0f), Perm::from_bits_retain(mask >> 4))
}

/// A temporary directory with an empty image file in it.
pub(crate) fn image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, b"").expect("create image");
    (dir, path)
}

/// An open file description taking raw OFD (or POSIX) locks: "some other program". It may take
/// write locks, which qlock never does, to play a foreign holder.
pub(crate) struct Raw {
    pub(crate) file: File,
    posix: bool,
}

impl Raw {
    /// Opens `path` read-write (write locks need a writable descriptor), with O_CLOEXEC.
    pub(crate) fn open(path: &Path) -> Raw {
        Raw::open_kind(path, false)
    }

    /// As [`Raw::open`], taking POSIX locks (process-owned) instead of OFD locks.
    pub(crate) fn open_kind(path: &Path, posix: bool) -> Raw {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .expect("open image for raw locks");
        Raw { file, posix }
    }

    fn setlk(&self, ty: libc::c_int, start: u64, len: u64) -> nix::Result<()> {
        let fl = flock(ty, start, len);
        let arg = if self.posix { FcntlArg::F_SETLK(&fl) } else { FcntlArg::F_OFD_SETLK(&fl) };
        fcntl(self.file.as_fd(), arg).map(drop)
    }

    /// Read-locks `len` bytes from `start` (`len` 0: to the end of the file).
    pub(crate) fn read_lock(&self, start: u64, len: u64) {
        self.setlk(libc::F_RDLCK, start, len).unwrap_or_else(|e| panic!("read lock {start}+{len}: {e}"));
    }

    /// Write-locks `len` bytes from `start`: a foreign holder, never QEMU.
    pub(crate) fn write_lock(&self, start: u64, len: u64) {
        self.setlk(libc::F_WRLCK, start, len).unwrap_or_else(|e| panic!("write lock {start}+{len}: {e}"));
    }

    /// Releases everything this description holds.
    pub(crate) fn unlock_all(&self) {
        self.setlk(libc::F_UNLCK, 0, 0).expect("unlock all");
    }

    /// Holds exactly `read` as read locks and `write` as write locks (disjoint sets).
    pub(crate) fn hold(&self, read: LockSet, write: LockSet) {
        self.unlock_all();
        for b in read.bytes() {
            self.read_lock(b, 1);
        }
        for b in write.bytes() {
            self.write_lock(b, 1);
        }
    }

    /// What descriptions other than this one hold on the protocol bytes: (any lock, write lock).
    /// From the holder's own description this is exactly what a newcomer left behind.
    pub(crate) fn others(&self) -> (LockSet, LockSet) {
        probe_bytes(&self.file, self.posix)
    }
}

/// Per-byte `F_OFD_GETLK` write probes (or `F_GETLK` for a POSIX prober) of the eight bytes.
pub(crate) fn probe_bytes(file: &File, posix: bool) -> (LockSet, LockSet) {
    let (mut held, mut write) = (LockSet::EMPTY, LockSet::EMPTY);
    for b in BYTES {
        let mut fl = flock(libc::F_WRLCK, b, 1);
        let arg = if posix { FcntlArg::F_GETLK(&mut fl) } else { FcntlArg::F_OFD_GETLK(&mut fl) };
        fcntl(file.as_fd(), arg).expect("probe");
        match i32::from(fl.l_type) {
            libc::F_UNLCK => {}
            libc::F_WRLCK => {
                held.add_byte(b);
                write.add_byte(b);
            }
            _ => held.add_byte(b),
        }
    }
    (held, write)
}

/// What everyone holds on `path`, probed from a fresh (third) description.
pub(crate) fn held_from_outside(path: &Path) -> LockSet {
    let file = File::open(path).expect("open for probing");
    probe_bytes(&file, false).0
}

/// The verdict an acquire's result stands for.
pub(crate) fn verdict_of(result: &Result<(), Error>) -> Verdict {
    match result {
        Ok(()) => Verdict::Granted,
        Err(Error::Conflict(c)) => match c.reason {
            ConflictReason::Check(check) => Verdict::Conflict(check),
            ConflictReason::WriteLocked(b) => Verdict::LockByte(b),
        },
        Err(e) => panic!("unexpected error: {e:?}"),
    }
}

/// Whether this process runs as root (the owner of `/proc/self` is the effective uid).
pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// [`is_root`], saying that the test skips when not: it needs root `to` do something. Not a
/// missing tool: CI may run unprivileged, so such a test skips there too.
pub(crate) fn root_or_skip(to: &str) -> bool {
    let root = is_root();
    if !root {
        eprintln!("SKIPPED: needs root to {to}");
    }
    root
}

/// Processes of this test binary playing a role (see each test file's `child_role` test).
#[allow(unused_imports)]
pub(crate) use qlock_testkit::reexec::{Child as Helper, paths_env, ready_and_wait, run_role, say};
/// Whether a tool is installed; a test skips without it, and fails under `CI=true`.
#[allow(unused_imports)]
pub(crate) use qlock_testkit::require as have;

/// Parses a list of bytes like `101,201` (empty: none) into a [`LockSet`].
pub(crate) fn parse_bytes(list: &str) -> LockSet {
    let mut s = LockSet::EMPTY;
    for b in list.split(',').filter(|b| !b.is_empty()) {
        s.add_byte(b.parse().expect("byte"));
    }
    s
}

/// A fake holder process holding `access` on every path (one process, one descriptor each),
/// taken the QEMU way.
pub(crate) fn hold(paths: &[&Path], access: Access) -> FakeQemu {
    let builder = paths[1..].iter().fold(FakeQemu::builder(paths[0]).access(access), |b, p| b.also(p));
    builder.spawn().unwrap_or_else(|e| panic!("holder of {access}: {e}"))
}

/// Serialises the tests of one binary that spawn processes and drop guards (see
/// [`qlock_testkit::serial`]).
#[allow(unused_imports)]
pub(crate) use qlock_testkit::serial;
