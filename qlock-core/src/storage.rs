//! What the filesystem under an image can promise about its locks: which filesystem and mount
//! it is, whether OFD locks work there, who sees them ([`LockScope`]), and the hazards that
//! follow for VM images, each with what to do.
//!
//! A lock is only as good as the filesystem keeping it. On ext4 or tmpfs the kernel keeps it and
//! every process on this host sees it, nobody else. On NFS (with lockd or v4), CephFS, GlusterFS,
//! GFS2 or OCFS2 the kernel forwards it to the filesystem's lock manager and every client sees
//! it, with each filesystem's own failure modes (a dead host's locks, leases, reconnects). A
//! `nolock` NFS mount keeps them on this host only, silently; and a FUSE filesystem may forward
//! them, fail them, or leave them to the local kernel. [`Storage::of`] finds out which, from
//! `fstatfs`, the mount's line in `/proc/self/mountinfo`, and an `F_OFD_GETLK` probe on the
//! image itself; `inspect` uses the same rules, without probing, for each image's
//! [`LockScope`].
//!
//! Beside the filesystem, one thing on this host bypasses every lock: a QEMU started with
//! `locking=off` that has the image open. [`Storage::of`] looks for it in `/proc/*/cmdline`
//! (a QEMU naming `locking=off` that has the image open, or names it in the same option).

use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{self, Error, Result, strerror};
use crate::image::{ImageLock, LockOptions, Locking};
use crate::proc::{self, FileKey};
use crate::protocol::ByteRange;
use crate::sys::{self, LockKind};

/// Who sees the locks taken on a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LockScope {
    /// This host's kernel keeps them: every process here sees them, no other host does (ext4,
    /// xfs, btrfs, tmpfs, block devices, NFS mounted `nolock` or `local_lock=all|posix`, FUSE
    /// filesystems that leave locks to the kernel).
    Host,
    /// The filesystem's lock manager keeps them: every client sees them (NFSv4, NFSv3 with
    /// lockd, CephFS, GlusterFS, GFS2, OCFS2).
    Cluster,
    /// The filesystem refuses byte-range locks: nobody can coordinate through them.
    None,
    /// Locks work, but who sees them depends on the filesystem (other FUSE filesystems, and
    /// filesystems qlock does not know).
    Unknown,
}

impl LockScope {
    /// The name used in JSON and tables: `host`, `cluster`, `none`, `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockScope::Host => "host",
            LockScope::Cluster => "cluster",
            LockScope::None => "none",
            LockScope::Unknown => "unknown",
        }
    }

    /// One line for a table: the name and who sees the locks.
    pub fn describe(self) -> &'static str {
        match self {
            LockScope::Host => "host (this host's processes see these locks, other hosts do not)",
            LockScope::Cluster => "cluster (every client of this filesystem sees these locks)",
            LockScope::None => "none (the filesystem refuses byte-range locks)",
            LockScope::Unknown => "unknown (locks work; who else sees them depends on the filesystem)",
        }
    }
}

impl fmt::Display for LockScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The mount an image lives on, from its line in `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Mount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// What is mounted (`/dev/vda`, `server:/export`, `198.18.0.1:vol`).
    pub source: String,
    /// The filesystem type as the kernel names it (`ext4`, `nfs4`, `fuse.glusterfs`).
    pub fstype: String,
    /// The mount's options, then the filesystem's own (`rw,relatime,vers=3,nolock,...`), each once.
    pub options: String,
}

/// Something about an image's storage that can defeat its locks, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Hazard {
    /// A stable name for scripts (`nfs4-lease`, `gluster-reconnect`, `qemu-locking-off`...).
    pub id: &'static str,
    /// What can go wrong.
    pub text: String,
    /// What to do.
    pub advice: String,
}

/// What the storage under one image can promise about its locks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Storage {
    /// The image as given.
    pub path: PathBuf,
    /// The filesystem type: the mount's (`ext4`, `fuse.glusterfs`), else a name for the
    /// `statfs` magic number, else `unknown`.
    pub filesystem: String,
    /// The `statfs` magic number (`f_type`), when `fstatfs` answered.
    pub magic: Option<i64>,
    /// The mount, when its line in `/proc/self/mountinfo` was found.
    pub mount: Option<Mount>,
    /// Whether an `F_OFD_GETLK` probe on the image itself worked.
    pub ofd: bool,
    /// Why the probe failed, when it did.
    pub ofd_error: Option<String>,
    /// Who sees the locks.
    pub lock_scope: LockScope,
    /// What can defeat the locks here, each with what to do.
    pub hazards: Vec<Hazard>,
}

impl Storage {
    /// Opens `path` read-only (nothing is locked) and reports on its storage, as [`Storage::of`].
    /// A directory is accepted too: where an image would go.
    ///
    /// # Errors
    /// The open errors of [`ImageLock::open`] (a directory is not one).
    pub fn probe(path: impl AsRef<Path>) -> Result<Storage> {
        let path = path.as_ref();
        if fs::metadata(path).is_ok_and(|md| md.is_dir()) {
            let dir = fs::File::open(path).map_err(|e| Error::open(path, e))?;
            let md = dir.metadata().map_err(|e| Error::open(path, e))?;
            return Ok(report(path, &dir, proc::file_key(&md)));
        }
        let image = ImageLock::open(path, &LockOptions::default().with_locking(Locking::Off))?;
        Ok(Storage::of(&image))
    }

    /// Reports on the storage of an open image, probing through its descriptor.
    ///
    /// The probe is one `F_OFD_GETLK` (it takes nothing). On a FUSE filesystem qlock does not
    /// know, one more step tells a filesystem that leaves locks to this host's kernel from one
    /// that forwards them: a read lock on one byte far beyond QEMU's (2^62), taken and released
    /// at once, shows in this process's fdinfo only when the kernel keeps it.
    ///
    /// ```
    /// use qlock_core::{LockScope, Storage};
    /// let file = tempfile::NamedTempFile::new_in("/dev/shm")?;
    /// let storage = Storage::probe(file.path())?;
    /// assert_eq!((storage.filesystem.as_str(), storage.lock_scope, storage.ofd), ("tmpfs", LockScope::Host, true));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn of(image: &ImageLock) -> Storage {
        report(image.path(), image.file(), image.file_key())
    }
}

/// The report on `file` (`path` as given, `key` its device and inode).
fn report(path: &Path, file: &fs::File, key: FileKey) -> Storage {
    let magic = sys::fs_magic(file);
    let mount = Mounts::read().and_then(|m| m.find(own_mnt_id(file.as_raw_fd()), key));
    let filesystem = filesystem_name(mount.as_ref(), magic);
    let probe = sys::test_write(file, LockKind::Ofd, ByteRange { start: 0, len: 0 });
    let ofd_error = probe.as_ref().err().map(strerror);
    let mut lock_scope = match &probe {
        Err(e) if error::is_unsupported(e) => LockScope::None,
        _ => scope_of(&filesystem, mount.as_ref().map_or("", |m| m.options.as_str()), magic),
    };
    if lock_scope == LockScope::Unknown
        && probe.is_ok()
        && is_fuse(&filesystem, magic)
        && kernel_keeps_locks(file)
    {
        lock_scope = LockScope::Host;
    }
    let mut storage = Storage {
        path: path.to_path_buf(),
        filesystem,
        magic,
        mount,
        ofd: probe.is_ok(),
        ofd_error,
        lock_scope,
        hazards: Vec::new(),
    };
    storage.hazards = hazards(&storage);
    storage.hazards.extend(qemu_locking_off(path, key));
    storage
}

// ---- the scope rules (pure) ----

/// Filesystems whose locks this host's kernel keeps.
const HOST_LOCAL: [&str; 15] = [
    "ext2",
    "ext3",
    "ext4",
    "xfs",
    "btrfs",
    "tmpfs",
    "ramfs",
    "devtmpfs",
    "f2fs",
    "zfs",
    "bcachefs",
    "jfs",
    "vfat",
    "exfat",
    "hugetlbfs",
];

/// Filesystems that forward locks to a lock manager every client shares.
const CLUSTER: [&str; 7] = ["nfs", "nfs4", "ceph", "fuse.ceph-fuse", "fuse.glusterfs", "gfs2", "ocfs2"];

/// The scope a filesystem's type and options promise (before any probe): NFS mounted `nolock`
/// or `local_lock=all|posix` keeps its locks on this host.
pub(crate) fn scope_of(fstype: &str, options: &str, magic: Option<i64>) -> LockScope {
    let fstype = if fstype == "unknown" { magic.and_then(magic_name).unwrap_or("unknown") } else { fstype };
    if is_nfs(fstype) && nfs_locks_are_local(options) {
        LockScope::Host
    } else if CLUSTER.contains(&fstype) {
        LockScope::Cluster
    } else if HOST_LOCAL.contains(&fstype) {
        LockScope::Host
    } else {
        LockScope::Unknown
    }
}

fn is_nfs(fstype: &str) -> bool {
    matches!(fstype, "nfs" | "nfs4")
}

fn option<'a>(options: &'a str, key: &str) -> Option<&'a str> {
    options.split(',').find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
}

fn has_flag(options: &str, flag: &str) -> bool {
    options.split(',').any(|o| o == flag)
}

/// `nolock`, or `local_lock=all` / `local_lock=posix` (fcntl locks, OFD included, stay local).
fn nfs_locks_are_local(options: &str) -> bool {
    has_flag(options, "nolock") || matches!(option(options, "local_lock"), Some("all" | "posix"))
}

/// NFS version 4 (`nfs4`, or `vers=4.x` / `nfsvers=4.x`)?
fn nfs_v4(fstype: &str, options: &str) -> bool {
    let vers = option(options, "vers").or_else(|| option(options, "nfsvers"));
    fstype == "nfs4" || vers.is_some_and(|v| v.starts_with('4'))
}

fn is_fuse(filesystem: &str, magic: Option<i64>) -> bool {
    filesystem == "fuse"
        || filesystem.starts_with("fuse.")
        || filesystem.starts_with("fuseblk")
        || magic == Some(FUSE_MAGIC)
}

/// `fstatfs(fd)`: whether `fd` lives on a local filesystem (ext2/3/4, xfs, btrfs, tmpfs), where
/// lock calls are non-blocking syscalls of well under a microsecond.
///
/// Async callers may run such calls inline on their executor. Anything else (NFS, CIFS, FUSE,
/// overlay over an unknown lower layer, or a failing `fstatfs`) may block for a network round
/// trip, so it answers false and the calls belong on a blocking pool.
///
/// ```
/// let tmp = std::fs::File::open(std::env::temp_dir())?;
/// let _local: bool = qlock_core::is_local_fs(&tmp);
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # References
/// - [`statfs(2)`](https://man7.org/linux/man-pages/man2/statfs.2.html)
#[doc(alias = "fstatfs")]
pub fn is_local_fs(fd: impl AsFd) -> bool {
    // EXT4_MAGIC is also ext2's and ext3's.
    sys::fs_magic(fd).is_some_and(|m| [EXT4_MAGIC, XFS_MAGIC, BTRFS_MAGIC, TMPFS_MAGIC].contains(&m))
}

// ---- statfs magic numbers (statfs(2)) ----

const EXT4_MAGIC: i64 = 0xef53;
const XFS_MAGIC: i64 = 0x5846_5342;
const BTRFS_MAGIC: i64 = 0x9123_683e;
const TMPFS_MAGIC: i64 = 0x0102_1994;
const NFS_MAGIC: i64 = 0x6969;
const FUSE_MAGIC: i64 = 0x6573_5546;
const CEPH_MAGIC: i64 = 0x00c3_6400;
const GFS2_MAGIC: i64 = 0x0116_1970;
const OCFS2_MAGIC: i64 = 0x7461_636f;

fn magic_name(magic: i64) -> Option<&'static str> {
    Some(match magic {
        EXT4_MAGIC => "ext4",
        XFS_MAGIC => "xfs",
        BTRFS_MAGIC => "btrfs",
        TMPFS_MAGIC => "tmpfs",
        NFS_MAGIC => "nfs",
        FUSE_MAGIC => "fuse",
        CEPH_MAGIC => "ceph",
        GFS2_MAGIC => "gfs2",
        OCFS2_MAGIC => "ocfs2",
        _ => return None,
    })
}

fn filesystem_name(mount: Option<&Mount>, magic: Option<i64>) -> String {
    match (mount, magic.and_then(magic_name)) {
        (Some(m), _) => m.fstype.clone(),
        (None, Some(name)) => name.to_string(),
        (None, None) => "unknown".to_string(),
    }
}

// ---- /proc/self/mountinfo ----

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountLine {
    id: u32,
    dev: (u32, u32),
    mount: Mount,
}

/// Parses `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
/// (proc(5)): id, parent, major:minor, root, mount point, options, optional fields up to `-`,
/// type, source, the filesystem's options. Spaces and the like in paths are octal escapes.
pub(crate) fn parse_mountinfo_line(line: &str) -> Option<MountLine> {
    let (head, tail) = line.split_once(" - ")?;
    let mut h = head.split(' ');
    let id = h.next()?.parse().ok()?;
    h.next()?; // parent
    let (major, minor) = h.next()?.split_once(':')?;
    let dev = (major.parse().ok()?, minor.parse().ok()?);
    h.next()?; // root within the filesystem
    let mount_point = PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(h.next()?)));
    let mount_options = h.next()?;
    let mut t = tail.split(' ');
    let fstype = t.next()?.to_string();
    let source = String::from_utf8_lossy(&unescape(t.next()?)).into_owned();
    let super_options = t.next().unwrap_or("");
    let mut options: Vec<&str> = Vec::new();
    for o in mount_options.split(',').chain(super_options.split(',')) {
        if !o.is_empty() && !options.contains(&o) {
            options.push(o);
        }
    }
    Some(MountLine { id, dev, mount: Mount { mount_point, source, fstype, options: options.join(",") } })
}

/// `\040` and the other octal escapes of mountinfo, undone.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// This process's mount table, read once per report.
#[derive(Debug, Default)]
pub(crate) struct Mounts(Vec<MountLine>);

impl Mounts {
    pub(crate) fn read() -> Option<Mounts> {
        let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
        Some(Mounts(text.lines().filter_map(parse_mountinfo_line).collect()))
    }

    /// The mount with id `mnt_id` (exact), else the last mounted with the file's device (bind
    /// mounts of one filesystem share its type and options; btrfs subvolumes report devices of
    /// their own and are found by `statfs` magic instead).
    pub(crate) fn find(&self, mnt_id: Option<u32>, key: FileKey) -> Option<Mount> {
        let by_id = mnt_id.and_then(|id| self.0.iter().find(|l| l.id == id));
        by_id.or_else(|| self.0.iter().rev().find(|l| l.dev == (key.0, key.1))).map(|l| l.mount.clone())
    }
}

/// The mount id of this process's descriptor `fd` (fdinfo's `mnt_id:`).
fn own_mnt_id(fd: RawFd) -> Option<u32> {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines().find_map(|l| l.strip_prefix("mnt_id:")?.trim().parse().ok())
}

/// The scope of an open image without probing (for `inspect`): `mounts` is read once
/// for all images.
pub(crate) fn scope_of_open(file: &fs::File, key: FileKey, mounts: Option<&Mounts>) -> LockScope {
    let magic = sys::fs_magic(file);
    let mount = mounts.and_then(|m| m.find(None, key));
    let filesystem = filesystem_name(mount.as_ref(), magic);
    scope_of(&filesystem, mount.as_ref().map_or("", |m| m.options.as_str()), magic)
}

// ---- probes ----

/// A byte far beyond QEMU's (and any image's end), for the kernel-keeps-locks trial.
const TRIAL_BYTE: u64 = 1 << 62;

/// Whether a read lock on [`TRIAL_BYTE`] shows in this process's fdinfo: the kernel keeps the
/// filesystem's locks itself (a forwarded lock, as GlusterFS's, never shows there).
fn kernel_keeps_locks(file: &fs::File) -> bool {
    let range = ByteRange::byte(TRIAL_BYTE);
    if sys::read_lock(file, LockKind::Ofd, range).is_err() {
        return false;
    }
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).unwrap_or_default();
    let shown = info.lines().any(|l| {
        l.starts_with("lock:") && l.split_whitespace().rev().nth(1) == Some(TRIAL_BYTE.to_string().as_str())
    });
    if let Err(e) = sys::unlock(file, LockKind::Ofd, range) {
        tracing::warn!("could not release the trial lock on byte {TRIAL_BYTE}: {e}");
    }
    shown
}

// ---- hazards ----

fn hazard(id: &'static str, text: impl Into<String>, advice: impl Into<String>) -> Hazard {
    Hazard { id, text: text.into(), advice: advice.into() }
}

/// The hazards of the filesystem (not of the processes using it).
fn hazards(s: &Storage) -> Vec<Hazard> {
    let options = s.mount.as_ref().map_or("", |m| m.options.as_str());
    let mut out = Vec::new();
    if let (false, Some(e)) = (s.ofd, &s.ofd_error) {
        if s.lock_scope == LockScope::None {
            out.push(hazard(
                "no-locks",
                format!("The filesystem refuses byte-range locks ({e}): QEMU cannot lock the image (it fails with \"Failed to lock byte 100\") and nothing can see who uses it."),
                "Move the image to a filesystem with locks, or mount with lock support (NFS: run rpc.statd, do not mount with nolock; FUSE: a filesystem whose lock operation works, or that leaves locks to the kernel). Only if nothing else opens the image, use locking=off.",
            ));
        } else {
            out.push(hazard(
                "lock-probe-failed",
                format!("An F_OFD_GETLK probe on the image failed ({e}): locks may not work here right now."),
                "Check the mount (a dead network client answers ENOTCONN or EIO) and try again.",
            ));
        }
    }
    if is_nfs(&s.filesystem) {
        if nfs_locks_are_local(options) {
            out.push(hazard(
                "nfs-local-locks",
                "Mounted with nolock or local_lock=all|posix: locks stay on this host. A QEMU on another host using the same export does not see them and is not stopped.",
                "Remount without nolock and with local_lock=none (NFSv3: rpc.statd and lockd running on client and server), or make sure only this host ever opens the image.",
            ));
        } else if nfs_v4(&s.filesystem, options) {
            out.push(hazard(
                "nfs4-lease",
                "NFSv4 locks are leases: a client that crashes keeps its locks until its lease ends (90 s by default on Linux servers, /proc/fs/nfsd/nfsv4leasetime), so a VM restarted on another host is refused until then.",
                "On HA restart, wait longer than the lease (qlock wait --timeout, qlock run --wait --timeout) instead of breaking the lock; fence the failed host first.",
            ));
        } else {
            out.push(hazard(
                "nfs3-dead-host",
                "NFSv3 locks (lockd) of a host that dies stay on the server until that host comes back and its statd tells the server it rebooted (sm-notify): a VM cannot be restarted elsewhere while they last.",
                "Fence the dead host, then have the server drop its locks: boot it again (sm-notify runs at boot), or on the server clear them (Linux knfsd: echo the dead client's address to /proc/fs/nfsd/unlock_ip, or restart nfs-server). Never clear them while the host may still run the VM.",
            ));
        }
    }
    if s.filesystem == "fuse.glusterfs" {
        out.extend(gluster_hazards(s));
    }
    match s.lock_scope {
        LockScope::Unknown if s.ofd => out.push(hazard(
            "unknown-scope",
            format!("Locks work on this {} filesystem, but qlock cannot tell whether other hosts see them.", s.filesystem),
            "Check the filesystem's documentation for byte-range (fcntl/OFD) locks across clients before sharing the image between hosts.",
        )),
        LockScope::Host if is_fuse(&s.filesystem, s.magic) => out.push(hazard(
            "fuse-local-locks",
            "This FUSE filesystem leaves locks to this host's kernel: if other hosts reach the same files through it (a network FUSE filesystem), they do not see them.",
            "Use the image from this host only, or move it to storage whose locks other hosts see.",
        )),
        _ => {}
    }
    out
}

/// GlusterFS: locks vanish during a partition, and are not taken back after a reconnect unless
/// the volume has strict locks (docs/shared-storage.md).
fn gluster_hazards(s: &Storage) -> Vec<Hazard> {
    let volume = s.mount.as_ref().map_or("VOLUME", |m| {
        let v = m.source.rsplit_once(':').map_or(m.source.as_str(), |(_, v)| v);
        v.trim_start_matches('/')
    });
    let strict = s
        .mount
        .as_ref()
        .map_or(StrictLocks::Unknown("no mount line".into()), |m| strict_locks(&m.mount_point));
    let fenced = match &strict {
        StrictLocks::On(from) => format!(
            " strict-locks is on here ({from}): after the heal the old client's writes fail (EBADFD)."
        ),
        _ => String::new(),
    };
    let mut out = vec![hazard(
        "gluster-partition",
        format!(
            "When this client is cut off from the bricks, the bricks drop its locks after the ping/TCP timeout (observed ~42 s with GlusterFS 10.3 defaults) while its QEMU keeps running: another host can then open the image read-write.{fenced}"
        ),
        "Do not restart a VM elsewhere on lock evidence alone: fence the host first. client.strict-locks makes the old client's writes fail after the network heals, but does not keep the other host out during the partition.",
    )];
    let set = format!("gluster volume set {volume} client.strict-locks on");
    match strict {
        StrictLocks::On(_) => {}
        StrictLocks::Off(from) => out.push(hazard(
            "gluster-reconnect",
            format!("This client does not take its locks back after a reconnect (strict-locks off, from {from}): after a partition heals, its QEMU keeps writing through its reopened descriptor while another host may hold the image: two writers, no lock."),
            format!("Run `{set}` (with it, descriptors that held locks are not reopened after a reconnect: the old QEMU's writes fail with EBADFD instead of corrupting the image), then check that the client's log shows `option strict-locks on`."),
        )),
        StrictLocks::Unknown(why) => out.push(hazard(
            "gluster-reconnect",
            format!("GlusterFS clients do not take their locks back after a reconnect unless the volume has strict locks, and this client's setting could not be read ({why}): after a partition heals, its QEMU may keep writing while another host holds the image."),
            format!("Check on a server with `gluster volume get {volume} client.strict-locks`, or in the client's log (/var/log/glusterfs/<mount point with - for />.log: `option strict-locks` in its last \"Final graph\"); if off, run `{set}`."),
        )),
    }
    out
}

/// A GlusterFS client's `strict-locks`, and where it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StrictLocks {
    On(String),
    Off(String),
    Unknown(String),
}

/// Reads the strict-locks setting of the client serving `mount_point`: from its command line
/// (`--xlator-option *.strict-locks=on`), else from the last "Final graph" (the client volfile)
/// its log printed.
fn strict_locks(mount_point: &Path) -> StrictLocks {
    let Some((pid, args)) = processes().find(|(_, args)| {
        args.first().is_some_and(|a| basename(a).starts_with(b"glusterfs"))
            && args.iter().any(|a| a.as_slice() == mount_point.as_os_str().as_bytes())
    }) else {
        return StrictLocks::Unknown("no glusterfs client process for this mount is visible".into());
    };
    let text = |a: &Vec<u8>| String::from_utf8_lossy(a).into_owned();
    for a in args.iter().map(text) {
        if let Some((_, v)) = a.split_once("strict-locks=") {
            return if matches!(v, "on" | "yes" | "true" | "enable") {
                StrictLocks::On(format!("pid {pid}'s command line"))
            } else {
                StrictLocks::Off(format!("pid {pid}'s command line"))
            };
        }
    }
    let log = args
        .iter()
        .map(text)
        .enumerate()
        .find_map(|(i, a)| match a.as_str() {
            "-l" | "--log-file" => args.get(i + 1).map(text),
            _ => a.strip_prefix("--log-file=").map(str::to_string),
        })
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let name = mount_point.to_string_lossy().trim_start_matches('/').replace('/', "-");
            PathBuf::from(format!("/var/log/glusterfs/{name}.log"))
        });
    let file = match fs::File::open(&log) {
        Ok(f) => f,
        Err(e) => {
            return StrictLocks::Unknown(format!(
                "cannot read the client log {}: {}",
                log.display(),
                strerror(&e)
            ));
        }
    };
    // The client prints its whole graph at every (re)configuration: the last value counts.
    let last = BufReader::new(file).split(b'\n').map_while(io::Result::ok).fold(None, |last, line| {
        let line = String::from_utf8_lossy(&line);
        match line.split_once("option strict-locks ") {
            Some((_, v)) => Some(v.trim() == "on"),
            None => last,
        }
    });
    let from = format!("the client log {}", log.display());
    match last {
        Some(true) => StrictLocks::On(from),
        Some(false) => StrictLocks::Off(from),
        None => StrictLocks::Unknown(format!("{from} shows no strict-locks option")),
    }
}

/// QEMUs on this host that have the image open, or name it in an option, with `locking=off`.
fn qemu_locking_off(path: &Path, key: FileKey) -> Vec<Hazard> {
    let mut names: Vec<Vec<u8>> = vec![path.as_os_str().as_bytes().to_vec()];
    if let Ok(c) = fs::canonicalize(path) {
        names.push(c.as_os_str().as_bytes().to_vec());
    }
    let me = std::process::id();
    let mut out = Vec::new();
    for (pid, args) in processes().filter(|(pid, _)| *pid != me) {
        let is_qemu = args.first().is_some_and(|a| contains(basename(a), b"qemu"));
        let off = |a: &Vec<u8>| contains(a, b"locking=off");
        if !is_qemu || !args.iter().any(off) {
            continue;
        }
        let names_it = args.iter().any(|a| off(a) && names.iter().any(|n| contains(a, n)));
        let has_open = has_open(pid, key);
        if !names_it && !has_open {
            continue;
        }
        let command = proc::comm(pid).unwrap_or_else(|| "?".into());
        let how = if has_open { "has the image open" } else { "names the image" };
        out.push(hazard(
            "qemu-locking-off",
            format!("pid {pid} ({command}) {how} with locking=off on its command line: it takes no lock, so nothing (QEMU, qlock) sees it and nothing stops it."),
            "Stop it before another QEMU or tool writes the image, or restart it without locking=off (Proxmox: its storage's locking option; libvirt/Xen backends: the disk's locking setting).",
        ));
    }
    out
}

/// Whether process `pid` has the file `key` open (false when its descriptors cannot be read).
fn has_open(pid: u32, key: FileKey) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| fs::metadata(fd.path()).is_ok_and(|md| proc::file_key(&md) == key))
}

/// Every process whose command line can be read, with its arguments.
fn processes() -> impl Iterator<Item = (u32, Vec<Vec<u8>>)> {
    let procs = fs::read_dir("/proc").into_iter().flatten().flatten();
    procs.filter_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<Vec<u8>> =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(<[u8]>::to_vec).collect();
        Some((pid, args))
    })
}

fn basename(a: &[u8]) -> &[u8] {
    a.rsplit(|b| *b == b'/').next().unwrap_or(a)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tmpfs_is_local_and_procfs_is_not() {
        let shm = std::fs::File::open("/dev/shm").unwrap();
        assert!(super::is_local_fs(&shm));
        let proc = std::fs::File::open("/proc/self/status").unwrap();
        assert!(!super::is_local_fs(&proc));
    }

    use super::*;

    fn line(fstype: &str, source: &str, options: &str) -> MountLine {
        parse_mountinfo_line(&format!(
            "98 30 0:53 / /mnt/vm\\040images rw,relatime shared:44 - {fstype} {source} {options}"
        ))
        .expect("a valid line")
    }

    fn scope(l: &MountLine) -> LockScope {
        scope_of(&l.mount.fstype, &l.mount.options, None)
    }

    #[test]
    fn parses_mountinfo_lines_with_escapes_and_optional_fields() {
        let l = parse_mountinfo_line(
            "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue",
        )
        .unwrap();
        assert_eq!((l.id, l.dev), (36, (98, 0)));
        assert_eq!(l.mount.mount_point, Path::new("/mnt/a b"));
        assert_eq!((l.mount.fstype.as_str(), l.mount.source.as_str()), ("ext3", "/dev/root"));
        assert_eq!(l.mount.options, "rw,noatime,errors=continue");
        assert!(parse_mountinfo_line("garbage").is_none());
        assert!(parse_mountinfo_line("1 2 x:y / / rw - ext4 /dev/x rw").is_none());
    }

    #[test]
    fn nfs_scope_follows_the_lock_options() {
        let v3_nolock = line(
            "nfs",
            "srv:/export",
            "rw,vers=3,rsize=1048576,nolock,proto=tcp,local_lock=all,addr=10.0.0.1",
        );
        assert_eq!(scope(&v3_nolock), LockScope::Host);
        let v3_local = line("nfs", "srv:/export", "rw,vers=3,proto=tcp,local_lock=all,addr=10.0.0.1");
        assert_eq!(scope(&v3_local), LockScope::Host);
        let v3_posix = line("nfs", "srv:/export", "rw,vers=3,local_lock=posix");
        assert_eq!(scope(&v3_posix), LockScope::Host);
        let v3_lockd = line("nfs", "srv:/export", "rw,vers=3,proto=tcp,local_lock=none,addr=10.0.0.1");
        assert_eq!(scope(&v3_lockd), LockScope::Cluster);
        // local_lock=flock keeps flock(2) local only: fcntl locks still reach the server.
        let v3_flock = line("nfs", "srv:/export", "rw,vers=3,local_lock=flock");
        assert_eq!(scope(&v3_flock), LockScope::Cluster);
        let v42 = line("nfs4", "srv:/export", "rw,vers=4.2,rsize=1048576,local_lock=none,addr=10.0.0.1");
        assert_eq!(scope(&v42), LockScope::Cluster);
        assert!(nfs_v4(&v42.mount.fstype, &v42.mount.options));
        assert!(!nfs_v4(&v3_lockd.mount.fstype, &v3_lockd.mount.options));
        assert!(nfs_v4("nfs", "rw,nfsvers=4.1"));
    }

    #[test]
    fn nfs_hazards_say_which_failure_mode() {
        let ids = |l: &MountLine| {
            let s = Storage {
                path: "/mnt/vm/disk.img".into(),
                filesystem: l.mount.fstype.clone(),
                magic: Some(NFS_MAGIC),
                mount: Some(l.mount.clone()),
                ofd: true,
                ofd_error: None,
                lock_scope: scope(l),
                hazards: Vec::new(),
            };
            hazards(&s).iter().map(|h| h.id).collect::<Vec<_>>()
        };
        assert_eq!(ids(&line("nfs", "s:/e", "rw,vers=3,nolock,local_lock=all")), ["nfs-local-locks"]);
        assert_eq!(ids(&line("nfs", "s:/e", "rw,vers=3,local_lock=none")), ["nfs3-dead-host"]);
        assert_eq!(ids(&line("nfs4", "s:/e", "rw,vers=4.2,local_lock=none")), ["nfs4-lease"]);
    }

    #[test]
    fn scope_of_known_filesystems() {
        for fs in ["ext4", "xfs", "btrfs", "tmpfs", "devtmpfs"] {
            assert_eq!(scope_of(fs, "rw", None), LockScope::Host, "{fs}");
        }
        for fs in ["ceph", "fuse.ceph-fuse", "fuse.glusterfs", "gfs2", "ocfs2", "nfs4"] {
            assert_eq!(scope_of(fs, "rw", None), LockScope::Cluster, "{fs}");
        }
        assert_eq!(scope_of("fuse.sshfs", "rw", None), LockScope::Unknown);
        assert_eq!(scope_of("unknown", "", Some(EXT4_MAGIC)), LockScope::Host);
        assert_eq!(scope_of("unknown", "", Some(GFS2_MAGIC)), LockScope::Cluster);
        assert_eq!(scope_of("unknown", "", Some(0x1234)), LockScope::Unknown);
    }

    #[test]
    fn unescape_leaves_lone_backslashes() {
        assert_eq!(unescape("a\\040b\\134c\\x"), b"a b\\c\\x");
    }
}
