//! Who holds what, and who has the file open, from `/proc`: one walk over every process's
//! fdinfo (a leaf).
//!
//! `F_OFD_GETLK` tells *that* a byte is held but reports pid -1 for OFD locks, and
//! `/proc/locks` does the same (and is no consistent snapshot under churn). The kernel repeats
//! each lock in the `lock:` lines of the holder's `/proc/PID/fdinfo/FD`, and the same file says
//! how the descriptor was opened (`flags:`) and on which inode (`ino:`), so one walk over
//! `/proc` names the holders *and* every opener of any number of images at once. Processes of
//! other users whose fdinfo cannot be read are counted and skipped: their bytes still show in
//! the probes, as held by an unknown holder. This module opens no image and knows no guard: the
//! error and the guard point down to it, and the inspection of images builds on both.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::fs::{self, File, Metadata};
use std::io::Read;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;

use crate::perm::{PROTOCOL_BYTES, Perm};
use crate::protocol::LockSet;
use crate::sys::{FoundLock, LockKind};

/// A range one lock covers, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeldRange {
    /// First byte.
    pub start: u64,
    /// Last byte, or `None` for "to the end of the file" (and beyond).
    pub end: Option<u64>,
    /// A write (exclusive) lock; QEMU never takes one.
    pub write: bool,
}

impl HeldRange {
    /// Whether the range covers `byte`.
    pub fn covers(&self, byte: u64) -> bool {
        byte >= self.start && self.end.is_none_or(|e| byte <= e)
    }

    /// Why this lock does not fit QEMU's protocol, or `None` when it is a protocol read lock.
    pub fn foreign_reason(&self) -> Option<&'static str> {
        // Within the bytes of one side (100-104 or 200-204).
        let side = |b: u64| Perm::from_byte(b).map(|(_, unshare)| unshare);
        let in_protocol = side(self.start).is_some() && self.end.is_some_and(|e| side(e) == side(self.start));
        if self.start == 0 && self.end.is_none() {
            Some("whole-file lock (another VMM or tool)")
        } else if self.write {
            Some("write lock (QEMU never takes one; a starting QEMU fails with \"Failed to lock byte\")")
        } else if self.covers(0) {
            Some("byte 0 (libvirt)")
        } else if in_protocol {
            None
        } else {
            Some("outside QEMU's bytes 100-104 and 200-204")
        }
    }

    pub(crate) fn from_found(l: FoundLock) -> HeldRange {
        let end = (l.len != 0).then(|| l.start + l.len - 1);
        HeldRange { start: l.start, end, write: l.write }
    }
}

impl fmt::Display for HeldRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.write { "write" } else { "read" };
        match self.end {
            Some(e) if e == self.start => write!(f, "{kind} {}", self.start),
            Some(e) => write!(f, "{kind} {}-{e}", self.start),
            None => write!(f, "{kind} {}-EOF", self.start),
        }
    }
}

/// One open file description of one process holding locks on an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The process id.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`), if readable.
    pub command: Option<String>,
    /// The descriptor through which it holds the locks, when found in fdinfo.
    pub fd: Option<u32>,
    /// OFD or POSIX locks.
    pub kind: LockKind,
    /// Every lock it holds on the image.
    pub ranges: Vec<HeldRange>,
}

impl Holder {
    /// The protocol bytes (100-104, 200-204) its locks cover.
    pub fn bytes(&self) -> LockSet {
        let mut set = LockSet::EMPTY;
        for b in PROTOCOL_BYTES {
            if self.covers(b) {
                set.add_byte(b);
            }
        }
        set
    }

    /// Whether one of its locks covers `byte`.
    pub fn covers(&self, byte: u64) -> bool {
        self.ranges.iter().any(|r| r.covers(byte))
    }
}

impl fmt::Display for Holder {
    /// `pid 4242 (qemu-io) fd 5 OFD: 100 101 103 | 201 203`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command.as_deref().unwrap_or("?"))?;
        if let Some(fd) = self.fd {
            write!(f, " fd {fd}")?;
        }
        let kind = match self.kind {
            LockKind::Ofd => "OFD",
            LockKind::Posix => "POSIX",
        };
        write!(f, " {kind}: {}", self.bytes())?;
        let foreign: Vec<String> =
            self.ranges.iter().filter(|r| r.foreign_reason().is_some()).map(ToString::to_string).collect();
        if !foreign.is_empty() {
            write!(f, " (also {})", foreign.join(", "))?;
        }
        Ok(())
    }
}

/// The processes (other than descriptor `own_fd` of this process) holding a lock that covers
/// `byte` of the file `key`.
pub(crate) fn holding_byte(key: FileKey, own_fd: RawFd, byte: u64) -> Vec<Holder> {
    let keys = HashMap::from([(key, 0)]);
    let own = (std::process::id(), u32::try_from(own_fd).ok());
    let mut holders = scan_proc(&keys, Some(own), false).files.remove(&0).unwrap_or_default().holders;
    holders.retain(|h| h.covers(byte));
    holders
}

/// Device (major, minor) and inode, as fdinfo `lock:` lines print them.
pub(crate) type FileKey = (u32, u32, u64);

/// The key of a file from the metadata its opener already read.
pub(crate) fn file_key(md: &Metadata) -> FileKey {
    let dev = md.dev();
    (nix::sys::stat::major(dev) as u32, nix::sys::stat::minor(dev) as u32, md.ino())
}

/// What one walk found for one wanted file.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// The descriptors holding byte-range (OFD or POSIX) locks on it.
    pub(crate) holders: Vec<Holder>,
    /// Every descriptor open on it, locked or not (when the walk was asked for openers).
    pub(crate) open: Vec<OpenFd>,
}

/// One descriptor open on a wanted file, as its fdinfo shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenFd {
    pub(crate) pid: u32,
    pub(crate) fd: u32,
    /// The `flags:` line: the open(2) flags (the access mode in the low two bits).
    pub(crate) flags: u32,
    /// A `flock(2)` lock through it: `Some(true)` exclusive, `Some(false)` shared.
    pub(crate) flock: Option<bool>,
}

/// What one walk over `/proc` found, by the caller's index of each wanted file.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    pub(crate) files: HashMap<usize, Found>,
    /// Processes whose descriptors could not be read (other users', without privileges): their
    /// locks still show in the probes, their unlocked descriptors nowhere.
    pub(crate) unreadable: usize,
}

impl Walk {
    fn merge(&mut self, other: Walk) {
        for (idx, found) in other.files {
            let mine = self.files.entry(idx).or_default();
            mine.holders.extend(found.holders);
            mine.open.extend(found.open);
        }
        self.unreadable += other.unreadable;
    }
}

/// One walk over `/proc/*/fdinfo/*`: the holders of each wanted file and, with `openers`,
/// every descriptor open on it, by the caller's index.
///
/// A descriptor is matched by device and inode: from its `lock:` lines when it holds locks,
/// else by its fdinfo `ino:` line first (Linux >= 5.14; one `stat` of `/proc/PID/fd/N` then
/// confirms the device, only for the few whose inode number matches), and by that `stat` alone
/// on older kernels. The thousands of small fdinfo reads dominate (see `cargo bench -p
/// qlock-core -- inspect`), so a large walk is split over two threads.
pub(crate) fn scan_proc(
    keys: &HashMap<FileKey, usize>,
    exclude: Option<(u32, Option<u32>)>,
    openers: bool,
) -> Walk {
    if keys.is_empty() {
        return Walk::default();
    }
    let Ok(procs) = fs::read_dir("/proc") else { return Walk::default() };
    let pids: Vec<u32> =
        procs.flatten().filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok())).collect();
    let want = Want { keys, inodes: keys.keys().map(|k| k.2).collect(), exclude, openers };
    let mut halves = in_halves(&pids, |pids| scan_pids(pids, &want)).into_iter();
    let mut found = halves.next().unwrap_or_default();
    halves.for_each(|other| found.merge(other));
    found
}

/// Runs `f` on `items` in two halves at once, the second on a scoped thread, when there are
/// many (the `/proc` reads of a walk are thousands of small syscalls that two threads share
/// well); else, or when no thread can be started, on all of them here. A panic in the other
/// half is a bug: that half then gives `R::default()` (its processes go unnamed).
pub(crate) fn in_halves<T: Sync, R: Send + Default>(items: &[T], f: impl Fn(&[T]) -> R + Sync) -> Vec<R> {
    if items.len() < 64 {
        return vec![f(items)];
    }
    let (mine, theirs) = items.split_at(items.len() / 2);
    std::thread::scope(|s| {
        let Ok(other) = std::thread::Builder::new().spawn_scoped(s, || f(theirs)) else {
            return vec![f(items)];
        };
        let mine = f(mine);
        vec![mine, other.join().unwrap_or_default()]
    })
}

/// What a walk looks for.
struct Want<'a> {
    keys: &'a HashMap<FileKey, usize>,
    /// The wanted inode numbers, to pick the descriptors worth a `stat` by their `ino:` line.
    inodes: HashSet<u64>,
    exclude: Option<(u32, Option<u32>)>,
    openers: bool,
}

/// The holders and openers among `pids`.
fn scan_pids(pids: &[u32], want: &Want<'_>) -> Walk {
    let mut walk = Walk::default();
    let mut buf = Vec::with_capacity(4096);
    let mut path = String::with_capacity(64);
    let mut link = String::with_capacity(64);
    for &pid in pids {
        path.clear();
        let _ = write!(path, "/proc/{pid}/fdinfo/");
        let base = path.len();
        let fds = match fs::read_dir(&path) {
            Ok(fds) => fds,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    walk.unreadable += 1;
                }
                continue;
            }
        };
        let mut command = None;
        for fd_entry in fds.flatten() {
            let fd_name = fd_entry.file_name();
            let Some(fd_str) = fd_name.to_str() else { continue };
            let fd = fd_str.parse::<u32>().ok();
            if want.exclude == Some((pid, fd)) {
                continue;
            }
            path.truncate(base);
            path.push_str(fd_str);
            if read_small(&path, &mut buf).is_err() {
                continue;
            }
            let info = FdInfo::parse(&buf);
            let mut file = None;
            for (key, lock) in info.locks {
                let Some(&idx) = want.keys.get(&key) else { continue };
                file = Some(idx);
                let Lock::Range(kind, range) = lock else { continue };
                let holders = &mut walk.files.entry(idx).or_default().holders;
                let holder = match holders.iter().position(|h| h.pid == pid && h.fd == fd) {
                    Some(i) => &mut holders[i],
                    None => {
                        let command = command.get_or_insert_with(|| comm(pid)).clone();
                        holders.push(Holder { pid, command, fd, kind, ranges: Vec::new() });
                        holders.last_mut().expect("just pushed")
                    }
                };
                holder.ranges.push(range);
            }
            if !want.openers {
                continue;
            }
            let (Some(fd), Some(flags)) = (fd, info.flags) else { continue };
            // An O_PATH descriptor names the file but cannot read or write it.
            if flags & nix::libc::O_PATH as u32 != 0 {
                continue;
            }
            if file.is_none() && info.ino.is_none_or(|ino| want.inodes.contains(&ino)) {
                // Its own buffer: `path` keeps the process's fdinfo prefix for the next fd.
                link.clear();
                let _ = write!(link, "/proc/{pid}/fd/{fd}");
                file = fs::metadata(&link).ok().and_then(|md| want.keys.get(&file_key(&md)).copied());
            }
            if let Some(idx) = file {
                walk.files.entry(idx).or_default().open.push(OpenFd { pid, fd, flags, flock: info.flock });
            }
        }
    }
    walk
}

/// A lock line of fdinfo: a byte-range lock, or a `flock(2)` lock (exclusive or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lock {
    Range(LockKind, HeldRange),
    Flock(bool),
}

/// What one fdinfo file says about its descriptor.
#[derive(Debug, Default)]
struct FdInfo {
    /// `flags:`, octal.
    flags: Option<u32>,
    /// `ino:` (Linux >= 5.14).
    ino: Option<u64>,
    locks: Vec<(FileKey, Lock)>,
    /// The last `flock(2)` lock's mode.
    flock: Option<bool>,
}

impl FdInfo {
    fn parse(buf: &[u8]) -> FdInfo {
        let mut info = FdInfo::default();
        for line in buf.split(|b| *b == b'\n') {
            let Ok(line) = std::str::from_utf8(line) else { continue };
            if let Some(v) = line.strip_prefix("flags:") {
                info.flags = u32::from_str_radix(v.trim(), 8).ok();
            } else if let Some(v) = line.strip_prefix("ino:") {
                info.ino = v.trim().parse().ok();
            } else if line.starts_with("lock:") {
                if let Some((key, lock)) = parse_lock_line(line) {
                    if let Lock::Flock(write) = lock {
                        info.flock = Some(write);
                    }
                    info.locks.push((key, lock));
                }
            }
        }
        info
    }
}

/// Parses `lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010650 100 101` and `flock(2)`'s
/// `lock:\t1: FLOCK  ADVISORY  WRITE 4242 fe:00:10010650 0 EOF`. Blocked waiters (`->`) and
/// leases are skipped.
fn parse_lock_line(line: &str) -> Option<(FileKey, Lock)> {
    let mut t = line.strip_prefix("lock:")?.split_whitespace();
    t.next()?; // ordinal "1:"
    let kind = match t.next()? {
        "OFDLCK" => Some(LockKind::Ofd),
        "POSIX" => Some(LockKind::Posix),
        "FLOCK" => None,
        _ => return None,
    };
    t.next()?; // ADVISORY / MANDATORY
    let write = match t.next()? {
        "READ" => false,
        "WRITE" => true,
        _ => return None,
    };
    t.next()?; // pid as /proc/locks shows it (-1 for OFD)
    let mut dev = t.next()?.split(':');
    let major = u32::from_str_radix(dev.next()?, 16).ok()?;
    let minor = u32::from_str_radix(dev.next()?, 16).ok()?;
    let ino = dev.next()?.parse().ok()?;
    let start = t.next()?.parse().ok()?;
    let end = match t.next()? {
        "EOF" => None,
        e => Some(e.parse().ok()?),
    };
    let lock = match kind {
        Some(kind) => Lock::Range(kind, HeldRange { start, end, write }),
        None => Lock::Flock(write),
    };
    Some(((major, minor, ino), lock))
}

fn read_small(path: &str, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    let mut f = File::open(path)?;
    let mut chunk = [0u8; 4096];
    loop {
        match f.read(&mut chunk)? {
            0 => return Ok(()),
            // procfs produces an fdinfo file in one go: a short read is the end, which saves
            // the second read(2) per descriptor.
            n if n < chunk.len() => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(());
            }
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

pub(crate) fn comm(pid: u32) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo_lock_lines() {
        let (key, lock) =
            parse_lock_line("lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010650 100 101").unwrap();
        let range = HeldRange { start: 100, end: Some(101), write: false };
        assert_eq!((key, lock), ((0xfe, 0, 10010650), Lock::Range(LockKind::Ofd, range)));
        let (_, lock) = parse_lock_line("lock:\t2: POSIX  ADVISORY  WRITE 4242 08:01:77 0 EOF").unwrap();
        let range = HeldRange { start: 0, end: None, write: true };
        assert_eq!(lock, Lock::Range(LockKind::Posix, range));
        let (key, lock) = parse_lock_line("lock:\t3: FLOCK  ADVISORY  WRITE 4242 08:01:77 0 EOF").unwrap();
        assert_eq!((key, lock), ((8, 1, 77), Lock::Flock(true)));
        assert!(parse_lock_line("lock:\t1: -> OFDLCK ADVISORY READ -1 08:01:77 0 EOF").is_none());
        assert!(parse_lock_line("lock:\t1: LEASE  ACTIVE    READ 4242 08:01:77 0 EOF").is_none());
    }

    #[test]
    fn parses_fdinfo_files() {
        let text = b"pos:\t0\nflags:\t0100002\nmnt_id:\t24\nino:\t77\n\
                     lock:\t1: FLOCK  ADVISORY  READ 4242 08:01:77 0 EOF\n";
        let info = FdInfo::parse(text);
        assert_eq!((info.flags, info.ino, info.flock), (Some(0o100002), Some(77), Some(false)));
        assert_eq!(info.locks.len(), 1);
        let old_kernel = FdInfo::parse(b"pos:\t0\nflags:\t02100000\nmnt_id:\t24\n");
        assert_eq!((old_kernel.flags, old_kernel.ino), (Some(0o2100000), None));
    }

    #[test]
    fn classifies_foreign_locks() {
        let r = |start, end, write| HeldRange { start, end, write };
        assert_eq!(r(100, Some(101), false).foreign_reason(), None);
        assert_eq!(r(204, Some(204), false).foreign_reason(), None);
        assert!(r(0, None, false).foreign_reason().unwrap().contains("whole-file"));
        assert!(r(0, Some(0), false).foreign_reason().unwrap().contains("libvirt"));
        assert!(r(101, Some(101), true).foreign_reason().unwrap().contains("write lock"));
        assert!(r(100, Some(200), false).foreign_reason().unwrap().contains("outside"));
    }
}
