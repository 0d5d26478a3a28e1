//! Who holds what on an image: byte probes for the state, `/proc/PID/fdinfo` for the holders.
//!
//! `F_OFD_GETLK` tells *that* a byte is held but reports pid -1 for OFD locks, and
//! `/proc/locks` does the same (and is no consistent snapshot under churn). The kernel repeats
//! each lock in the `lock:` lines of the holder's `/proc/PID/fdinfo/FD`, so one walk over
//! `/proc` names the holders of any number of images at once. Processes of other users whose
//! fdinfo cannot be read are skipped: their bytes still show in the probes, as held by an
//! unknown holder.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::fs::{self, File, Metadata};
use std::io::Read;
use std::os::fd::{AsFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::access::Access;
use crate::error::{self, Error, Result};
use crate::image::{ImageLock, LockOptions, Locking};
use crate::perm::Perm;
use crate::plan::{ByteRange, LockSet, Others, Verdict, decide};
use crate::sys::{self, FoundLock, LockKind};

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
        let in_protocol = |lo: u64, hi: u64| self.start >= lo && self.end.is_some_and(|e| e <= hi);
        if self.start == 0 && self.end.is_none() {
            Some("whole-file lock (another VMM or tool)")
        } else if self.write {
            Some("write lock (QEMU never takes one; a starting QEMU fails with \"Failed to lock byte\")")
        } else if self.covers(0) {
            Some("byte 0 (libvirt)")
        } else if in_protocol(100, 104) || in_protocol(200, 204) {
            None
        } else {
            Some("outside QEMU's bytes 100-104 and 200-204")
        }
    }

    fn from_found(l: FoundLock) -> HeldRange {
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
        for b in (100..=104).chain(200..=204) {
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

/// A lock that does not fit QEMU's protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignLock {
    /// What it covers.
    pub range: HeldRange,
    /// Its holder's pid, when known.
    pub pid: Option<u32>,
    /// Why it is foreign.
    pub reason: &'static str,
}

/// Everything known about the locks on one image, from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStatus {
    /// The image as given.
    pub path: PathBuf,
    /// Protocol bytes held by others (read or write), including the legacy 104/204, from
    /// `F_GETLK` probes: authoritative, whoever holds them.
    pub others: Others,
    /// The holders found in `/proc`.
    pub holders: Vec<Holder>,
    /// True when some held byte has no visible holder (another user's process, another host).
    pub unidentified: bool,
    /// Locks that do not fit the protocol.
    pub foreign: Vec<ForeignLock>,
    /// For each preset, what QEMU would answer it now.
    pub presets: Vec<(&'static str, Verdict)>,
    /// The lock commands probed with; `None` when this host has no usable byte-range locks.
    pub lock_kind: Option<LockKind>,
}

impl ImageStatus {
    /// Whether `access` could be acquired now, by QEMU's rules (legacy bytes ignored).
    pub fn verdict(&self, access: Access) -> Verdict {
        let (perm, unshared) = access.within(Perm::ALL);
        let mask = |s: LockSet| s.intersect(LockSet::new(Perm::ALL, Perm::ALL));
        let others = Others { held: mask(self.others.held), write_locked: mask(self.others.write_locked) };
        decide(others, LockSet::EMPTY, LockSet::new(perm, unshared))
    }
}

/// Inspects many images with one walk over `/proc`.
///
/// Each image is opened read-only and probed; nothing is locked. One result per path, in order:
/// a missing or unreadable image fails alone.
///
/// ```
/// use qlock_core::{Access, ImageLock, holders::inspect};
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("disk.img");
/// # std::fs::write(&path, b"").unwrap();
///
/// let _vm = ImageLock::acquire(&path, Access::WRITE)?;
/// let status = inspect(&[&path]).remove(0)?;
/// assert_eq!(status.others.held.to_string(), "100 101 103 | 201 203");
/// assert_eq!(status.holders[0].pid, std::process::id());
/// # Ok::<(), qlock_core::Error>(())
/// ```
pub fn inspect<P: AsRef<Path>>(paths: &[P]) -> Vec<Result<ImageStatus>> {
    let probe_opts = LockOptions { locking: Locking::On, ..LockOptions::default() };
    let mut keys = HashMap::new();
    let mut out: Vec<Result<(ImageStatus, Vec<Option<u32>>)>> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let image = ImageLock::open(p.as_ref(), &probe_opts)?;
            let (status, posix_pids) = probe(&image)?;
            if !status.others.held.is_empty() || !status.foreign.is_empty() {
                keys.insert(image.file_key(), i);
            }
            Ok((status, posix_pids))
        })
        .collect();
    let mut found = scan_proc(&keys, None);
    for (i, entry) in out.iter_mut().enumerate() {
        if let Ok((status, posix_pids)) = entry {
            status.holders = found.remove(&i).unwrap_or_default();
            finish(status, posix_pids);
        }
    }
    out.into_iter().map(|r| r.map(|(s, _)| s)).collect()
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

/// Probes the protocol bytes and the ranges around them from a fresh description.
fn probe(image: &ImageLock) -> Result<(ImageStatus, Vec<Option<u32>>)> {
    let mut status = ImageStatus {
        path: image.path().to_path_buf(),
        others: Others::default(),
        holders: Vec::new(),
        unidentified: false,
        foreign: Vec::new(),
        presets: Vec::new(),
        lock_kind: image.lock_kind(),
    };
    let Some(kind) = image.lock_kind() else { return Ok((status, Vec::new())) };
    let fd = image.file().as_fd();
    let path = image.path();
    let test = |range: ByteRange| {
        sys::test_write(fd, kind, range).map_err(|source| {
            let path = path.to_path_buf();
            if error::is_unsupported(&source) {
                return Error::Unsupported { path, byte: range.start, probe: true, source };
            }
            let end = if range.len == 0 { "EOF".to_string() } else { range.last().to_string() };
            Error::Lock { path, message: format!("Failed to probe bytes {}-{end}", range.start), source }
        })
    };
    let mut pids = Vec::new();
    // Most images are free: one probe over the whole file settles it.
    if test(ByteRange { start: 0, len: 0 })?.is_none() {
        return Ok((status, pids));
    }
    for b in (100..=104).chain(200..=204) {
        if let Some(l) = test(ByteRange::byte(b))? {
            status.others.held.add_byte(b);
            if l.write {
                status.others.write_locked.add_byte(b);
            }
            note_foreign(&mut status.foreign, l);
            pids.push(l.pid);
        }
    }
    for range in [
        ByteRange { start: 0, len: 100 },
        ByteRange { start: 105, len: 95 },
        ByteRange { start: 205, len: 0 },
    ] {
        if let Some(l) = test(range)? {
            note_foreign(&mut status.foreign, l);
            pids.push(l.pid);
        }
    }
    Ok((status, pids))
}

fn note_foreign(foreign: &mut Vec<ForeignLock>, l: FoundLock) {
    let range = HeldRange::from_found(l);
    if let Some(reason) = range.foreign_reason() {
        if !foreign.iter().any(|f| f.range == range && f.pid == l.pid) {
            foreign.push(ForeignLock { range, pid: l.pid, reason });
        }
    }
}

/// Joins the probes with the holders found in `/proc`.
fn finish(status: &mut ImageStatus, posix_pids: &[Option<u32>]) {
    for pid in posix_pids.iter().flatten() {
        if !status.holders.iter().any(|h| h.pid == *pid) {
            let command = comm(*pid);
            status.holders.push(Holder {
                pid: *pid,
                command,
                fd: None,
                kind: LockKind::Posix,
                ranges: Vec::new(),
            });
        }
    }
    let mut foreign = std::mem::take(&mut status.foreign);
    for h in &status.holders {
        for r in &h.ranges {
            if let Some(reason) = r.foreign_reason() {
                foreign.retain(|f| f.range != *r || f.pid.is_some_and(|p| p != h.pid));
                foreign.push(ForeignLock { range: *r, pid: Some(h.pid), reason });
            }
        }
    }
    status.foreign = foreign;
    let seen = status.holders.iter().fold(LockSet::EMPTY, |acc, h| acc.union(h.bytes()));
    status.unidentified = !seen.contains(status.others.held)
        || status
            .foreign
            .iter()
            .any(|f| f.pid.is_none() && !status.holders.iter().any(|h| h.ranges.contains(&f.range)));
    status.presets = Access::PRESETS.iter().map(|p| (p.name, status.verdict(p.access))).collect();
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
fn scan_proc(
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

fn comm(pid: u32) -> Option<String> {
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
