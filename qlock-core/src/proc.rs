//! Who holds what, from `/proc`: the fdinfo `lock:` lines of every process (a leaf).
//!
//! `F_OFD_GETLK` tells *that* a byte is held but reports pid -1 for OFD locks, and
//! `/proc/locks` does the same (and is no consistent snapshot under churn). The kernel repeats
//! each lock in the `lock:` lines of the holder's `/proc/PID/fdinfo/FD`, so one walk over
//! `/proc` names the holders of any number of images at once. Processes of other users whose
//! fdinfo cannot be read are skipped: their bytes still show in the probes, as held by an
//! unknown holder. This module opens no image and knows no guard: the error and the guard
//! point down to it, and the inspection of images builds on both.

use std::collections::HashMap;
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
    let mut holders = scan_proc(&keys, Some(own)).remove(&0).unwrap_or_default();
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

/// One walk over `/proc/*/fdinfo/*`: the holders of each wanted file, by the caller's index.
///
/// The thousands of small fdinfo reads dominate (see `cargo bench -p qlock-core -- inspect`), so
/// a large walk is split over two threads.
pub(crate) fn scan_proc(
    keys: &HashMap<FileKey, usize>,
    exclude: Option<(u32, Option<u32>)>,
) -> HashMap<usize, Vec<Holder>> {
    if keys.is_empty() {
        return HashMap::new();
    }
    let Ok(procs) = fs::read_dir("/proc") else { return HashMap::new() };
    let pids: Vec<u32> =
        procs.flatten().filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok())).collect();
    if pids.len() < 64 {
        return scan_pids(&pids, keys, exclude);
    }
    let (mine, theirs) = pids.split_at(pids.len() / 2);
    std::thread::scope(|s| {
        let other = std::thread::Builder::new().spawn_scoped(s, || scan_pids(theirs, keys, exclude));
        let Ok(other) = other else { return scan_pids(&pids, keys, exclude) };
        let mut found = scan_pids(mine, keys, exclude);
        // A panic in the other half is a bug; its holders are then just not named.
        for (idx, holders) in other.join().unwrap_or_default() {
            found.entry(idx).or_default().extend(holders);
        }
        found
    })
}

/// The holders among `pids`, by the caller's index of the file they hold.
fn scan_pids(
    pids: &[u32],
    keys: &HashMap<FileKey, usize>,
    exclude: Option<(u32, Option<u32>)>,
) -> HashMap<usize, Vec<Holder>> {
    let mut found: HashMap<usize, Vec<Holder>> = HashMap::new();
    let mut buf = Vec::with_capacity(4096);
    let mut path = String::with_capacity(64);
    for &pid in pids {
        path.clear();
        let _ = write!(path, "/proc/{pid}/fdinfo/");
        let base = path.len();
        let Ok(fds) = fs::read_dir(&path) else { continue };
        let mut command = None;
        for fd_entry in fds.flatten() {
            let fd_name = fd_entry.file_name();
            let Some(fd_str) = fd_name.to_str() else { continue };
            let fd = fd_str.parse::<u32>().ok();
            if exclude == Some((pid, fd)) {
                continue;
            }
            path.truncate(base);
            path.push_str(fd_str);
            if read_small(&path, &mut buf).is_err() {
                continue;
            }
            for line in buf.split(|b| *b == b'\n').filter(|l| l.starts_with(b"lock:")) {
                let Some((key, kind, range)) = std::str::from_utf8(line).ok().and_then(parse_lock_line)
                else {
                    continue;
                };
                let Some(&idx) = keys.get(&key) else { continue };
                let holders = found.entry(idx).or_default();
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
        }
    }
    found
}

/// Parses `lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010650 100 101`. Blocked waiters (`->`),
/// `flock(2)` locks and leases are skipped: they are not byte-range locks QEMU can see.
fn parse_lock_line(line: &str) -> Option<(FileKey, LockKind, HeldRange)> {
    let mut t = line.strip_prefix("lock:")?.split_whitespace();
    t.next()?; // ordinal "1:"
    let kind = match t.next()? {
        "OFDLCK" => LockKind::Ofd,
        "POSIX" => LockKind::Posix,
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
    Some(((major, minor, ino), kind, HeldRange { start, end, write }))
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
        let (key, kind, r) =
            parse_lock_line("lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010650 100 101").unwrap();
        assert_eq!((key, kind), ((0xfe, 0, 10010650), LockKind::Ofd));
        assert_eq!(r, HeldRange { start: 100, end: Some(101), write: false });
        let (_, kind, r) = parse_lock_line("lock:\t2: POSIX  ADVISORY  WRITE 4242 08:01:77 0 EOF").unwrap();
        assert_eq!((kind, r.end, r.write), (LockKind::Posix, None, true));
        assert!(parse_lock_line("lock:\t3: FLOCK  ADVISORY  WRITE 4242 08:01:77 0 EOF").is_none());
        assert!(parse_lock_line("lock:\t1: -> OFDLCK ADVISORY READ -1 08:01:77 0 EOF").is_none());
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
