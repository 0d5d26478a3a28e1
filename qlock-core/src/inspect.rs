//! The status of many images from outside: byte probes for the state, one `/proc` walk for
//! the holders.
//!
//! Each image is opened through [`ImageLock`] (so it is classified and opened exactly as a
//! guard would) but nothing is locked; [`crate::proc`] then names the holders of all of them
//! at once.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::access::Access;
use crate::error::{self, Error, Result};
use crate::image::{ImageLock, LockOptions, Locking};
use crate::perm::{PERM_BASE, PROTOCOL_BYTES, Perm, UNSHARE_BASE};
use crate::proc::{self, FileKey, HeldRange, Holder};
use crate::protocol::{ByteRange, LockSet, Others, Verdict, decide};
use crate::storage::{self, LockScope, Mounts};
use crate::sys::{self, FoundLock, LockKind};

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
    /// Who sees locks on the image's filesystem (by its type and mount options; see
    /// [`crate::Storage`] for the probed answer).
    pub lock_scope: LockScope,
    /// True when the filesystem's locks are cluster-wide and some held byte is explained by
    /// no process on this host (none holds it, none has the image open): another client of
    /// the filesystem holds it.
    pub held_elsewhere: bool,
}

impl ImageStatus {
    /// Whether `access` could be acquired now, by QEMU's rules (legacy bytes ignored).
    pub fn verdict(&self, access: Access) -> Verdict {
        let mask = |s: LockSet| s.intersect(LockSet::new(Perm::ALL, Perm::ALL));
        let others = Others { held: mask(self.others.held), write_locked: mask(self.others.write_locked) };
        decide(others, LockSet::EMPTY, access.lock_set(Perm::ALL))
    }
}

/// Inspects many images with one walk over `/proc`.
///
/// Each image is opened read-only and probed; nothing is locked. One result per path, in order:
/// a missing or unreadable image fails alone.
///
/// ```
/// use qlock_core::{Access, ImageLock, inspect};
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
    let probe_opts = LockOptions::default().with_locking(Locking::On);
    let mut keys = HashMap::new();
    let mut mounts: Option<Option<Mounts>> = None;
    let mut out: Vec<Result<Probed>> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let image = ImageLock::open(p.as_ref(), &probe_opts)?;
            let (mut status, posix_pids) = probe(&image)?;
            let mounts = mounts.get_or_insert_with(Mounts::read).as_ref();
            status.lock_scope = storage::scope_of_open(image.file(), image.file_key(), mounts);
            if !status.others.held.is_empty() || !status.foreign.is_empty() {
                keys.insert(image.file_key(), i);
            }
            Ok((status, posix_pids, image.file_key()))
        })
        .collect();
    let mut found = proc::scan_proc(&keys, None);
    for (i, entry) in out.iter_mut().enumerate() {
        if let Ok((status, posix_pids, key)) = entry {
            status.holders = found.remove(&i).unwrap_or_default();
            finish(status, posix_pids);
            // Rare (a cluster filesystem with bytes nobody visible holds): worth a second look.
            status.held_elsewhere = status.lock_scope == LockScope::Cluster
                && status.unidentified
                && !storage::opened_here(*key, None);
        }
    }
    out.into_iter().map(|r| r.map(|(s, _, _)| s)).collect()
}

/// An image after its probes: its status so far, the pids POSIX probes reported, its file.
type Probed = (ImageStatus, Vec<Option<u32>>, FileKey);

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
        lock_scope: LockScope::Unknown,
        held_elsewhere: false,
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
    for b in PROTOCOL_BYTES {
        if let Some(l) = test(ByteRange::byte(b))? {
            status.others.held.add_byte(b);
            if l.write {
                status.others.write_locked.add_byte(b);
            }
            note_foreign(&mut status.foreign, l);
            pids.push(l.pid);
        }
    }
    // Around the protocol bytes: below them (libvirt's byte 0), between the two sides, above.
    let (last_perm, last) = (PROTOCOL_BYTES[4], PROTOCOL_BYTES[9]);
    for range in [
        ByteRange::from_to(0, PERM_BASE - 1),
        ByteRange::from_to(last_perm + 1, UNSHARE_BASE - 1),
        ByteRange { start: last + 1, len: 0 },
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
            let command = proc::comm(*pid);
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
