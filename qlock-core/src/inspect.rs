//! The status of many images from outside: byte probes for the state, one `/proc` walk for
//! the holders and every opener.
//!
//! Each image is opened through [`ImageLock`] (so it is classified and opened exactly as a
//! guard would) but nothing is locked; [`crate::proc`] then names the holders and openers of
//! all of them at once, in one walk, and [`crate::opener`] says what each opener is.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::access::Access;
use crate::error::{self, Error, Result};
use crate::image::{ImageLock, LockOptions, Locking};
use crate::opener::{self, Facts, Opener};
use crate::perm::{PERM_BASE, PROTOCOL_BYTES, Perm, UNSHARE_BASE};
use crate::proc::{self, HeldRange, Holder};
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

/// Everything known about the locks on one image, and who has it open, from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Every descriptor of every process open on the image, locked or not, by pid and fd;
    /// this process's own descriptors too (not the ones inspection itself opened).
    pub openers: Vec<Opener>,
    /// Processes whose descriptors could not be read (other users', without privileges): any
    /// of them may have the image open, unseen.
    pub unreadable_processes: usize,
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
/// Each image is opened read-only and probed; nothing is locked. Then one walk over every
/// process's fdinfo names the holders and openers of all the images together. One result per
/// path, in order: a missing or unreadable image fails alone.
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
            // Every image, locked or not: an unlocked opener is what the walk is also for.
            keys.insert(image.file_key(), i);
            Ok((status, posix_pids))
        })
        .collect();
    // Every probe descriptor is closed by now, so none of them shows as an opener.
    let mut walk = proc::scan_proc(&keys, None, true);
    let facts = Facts::read(walk.files.values());
    for (i, entry) in out.iter_mut().enumerate() {
        if let Ok((status, posix_pids)) = entry {
            let found = walk.files.remove(&i).unwrap_or_default();
            status.openers = opener::openers(&found, &facts);
            status.unreadable_processes = walk.unreadable;
            status.holders = found.holders;
            finish(status, posix_pids);
            // On a cluster filesystem, bytes the probes see that no process here holds, on an
            // image no process here has open (as far as the same walk sees), are another
            // client's.
            status.held_elsewhere =
                status.lock_scope == LockScope::Cluster && status.unidentified && status.openers.is_empty();
        }
    }
    out.into_iter().map(|r| r.map(|(s, _)| s)).collect()
}

/// An image after its probes: its status so far, and the pids POSIX probes reported.
type Probed = (ImageStatus, Vec<Option<u32>>);

/// Probes the protocol bytes and the ranges around them from a fresh description.
fn probe(image: &ImageLock) -> Result<(ImageStatus, Vec<Option<u32>>)> {
    let mut status = ImageStatus {
        path: image.path().to_path_buf(),
        others: Others::default(),
        holders: Vec::new(),
        unidentified: false,
        openers: Vec::new(),
        unreadable_processes: 0,
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
