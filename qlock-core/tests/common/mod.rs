//! Shared helpers of the integration tests: a raw lock holder that plays "another program"
//! (including the foreign write locks qlock itself never takes), byte probes from outside, and
//! holder processes started by re-executing the test binary.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;
use qlock_core::inspect;
use qlock_core::{Access, ConflictReason, Error, ImageLock, LockOptions, LockSet, Locking, Perm, Verdict};

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

fn flock(ty: libc::c_int, start: u64, len: u64) -> libc::flock {
    libc::flock {
        l_type: ty as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start as libc::off_t,
        l_len: len as libc::off_t,
        l_pid: 0,
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

/// Whether a QEMU binary is on PATH; prints why a test is skipped otherwise.
pub(crate) fn have(binary: &str) -> bool {
    let found =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(binary).is_file()));
    if !found {
        eprintln!("SKIPPED: {binary} is not installed (apt-get install qemu-utils)");
    }
    found
}

/// The name of the env var that tells a re-executed test binary which role to play.
pub(crate) const ROLE: &str = "QLOCK_TEST_ROLE";

/// A process of this test binary playing a role (see each test file's `child_role` test): it
/// prints `READY` once its locks are taken and exits when its stdin closes.
pub(crate) struct Helper {
    pub(crate) child: Child,
    stdin: Option<ChildStdin>,
    /// Kept open (and drained at the end) so that the child's last writes do not hit EPIPE.
    stdout: BufReader<std::process::ChildStdout>,
    /// What the child reported with [`say`] before `READY`.
    pub(crate) lines: Vec<String>,
}

impl Helper {
    /// Starts `current_exe --exact child_role` with `role` and `envs`, and waits for `READY`.
    pub(crate) fn start(role: &str, envs: &[(&str, String)]) -> Helper {
        Helper::start_as(role, envs, None)
    }

    /// As [`Helper::start`], running as user and group `uid` when given (needs root).
    pub(crate) fn start_as(role: &str, envs: &[(&str, String)], uid: Option<u32>) -> Helper {
        let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
        cmd.args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn().expect("spawn helper");
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if out.read_line(&mut line).expect("read helper stdout") == 0 {
                drop(stdin);
                let mut err = String::new();
                child.stderr.take().expect("stderr").read_to_string(&mut err).ok();
                panic!("helper {role} exited before READY; stdout {lines:?}; stderr:\n{err}");
            }
            // libtest prints `test child_role ... ` before the test's own output on one line.
            if line.trim_end().ends_with("READY") {
                break;
            }
            if let Some((_, said)) = line.trim_end().split_once(SAY) {
                lines.push(said.to_string());
            }
        }
        Helper { child, stdin, stdout: out, lines }
    }

    /// The helper's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes its stdin and waits for it to exit normally.
    pub(crate) fn finish(mut self) {
        self.stdin.take();
        std::io::copy(&mut self.stdout, &mut std::io::sink()).expect("drain helper stdout");
        let status = self.child.wait().expect("wait helper");
        assert!(status.success(), "helper failed: {status}");
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = std::io::copy(&mut self.stdout, &mut std::io::sink());
            let _ = self.child.wait();
        }
    }
}

/// The body of a `child_role` test: runs `role` when this process was started by
/// [`Helper::start`] and returns `true`; returns `false` in a normal test run.
pub(crate) fn run_role(role: impl FnOnce(&str)) -> bool {
    let Ok(name) = std::env::var(ROLE) else { return false };
    role(&name);
    true
}

/// The marker of a line a helper reports to its parent.
const SAY: &str = "QLOCK-SAYS: ";

/// Reports one line to the parent (collected in [`Helper::lines`]).
pub(crate) fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{SAY}{line}").expect("print");
    out.flush().expect("flush");
}

/// Prints `READY` on the real stdout (not libtest's capture) and blocks until stdin closes.
pub(crate) fn ready_and_wait() {
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").expect("print READY");
    out.flush().expect("flush");
    drop(out);
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink).expect("read stdin");
}

/// Parses a list of bytes like `101,201` (empty: none) into a [`LockSet`].
pub(crate) fn parse_bytes(list: &str) -> LockSet {
    let mut s = LockSet::EMPTY;
    for b in list.split(',').filter(|b| !b.is_empty()) {
        s.add_byte(b.parse().expect("byte"));
    }
    s
}

/// `QLOCK_PATHS` for a helper: one path a line.
pub(crate) fn paths_env(paths: &[&Path]) -> (&'static str, String) {
    ("QLOCK_PATHS", paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n"))
}

/// A helper process holding `access` on every path with [`ImageLock`].
pub(crate) fn hold(paths: &[&Path], access: Access) -> Helper {
    Helper::start("hold", &[paths_env(paths), ("QLOCK_ACCESS", access.to_string())])
}

/// The roles every test binary's `child_role` plays; `false` for a role it does not know.
pub(crate) fn standard_role(role: &str, paths: &[PathBuf]) -> bool {
    let posix = std::env::var_os("QLOCK_POSIX").is_some();
    match role {
        // Holds QLOCK_ACCESS on every path with ImageLock (OFD, or POSIX with QLOCK_POSIX).
        "hold" => {
            let access: Access = std::env::var("QLOCK_ACCESS").unwrap().parse().unwrap();
            let opts = LockOptions::default().with_force_posix(posix).with_locking(Locking::On);
            let _guards: Vec<ImageLock> =
                paths.iter().map(|p| ImageLock::acquire_with(p, access, &opts).unwrap()).collect();
            ready_and_wait();
        }
        // Inspects from outside the parent process and reports what it saw.
        "inspect" => {
            for status in inspect(paths) {
                let status = status.unwrap();
                say(&format!("held: {}", status.others.held));
                for h in status.holders {
                    say(&format!("holder: {} {:?} {}", h.pid, h.kind, h.bytes()));
                }
            }
            ready_and_wait();
        }
        _ => return false,
    }
    true
}

/// Serialises the tests of one binary that spawn processes and drop guards.
///
/// A child that one test thread is spawning shares *every* open file description of the process
/// from `fork` until its `exec` (docs/protocol.md §7 pitfall 4), so a guard another test thread drops in that
/// window keeps its OFD locks a few microseconds longer, and that test's next step (a fresh
/// acquire, a probe) sees them. Real programs have the same window; these tests must not.
pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
