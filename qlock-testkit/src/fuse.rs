//! A real FUSE filesystem whose byte-range locks fail, for testing what users see on storage
//! that cannot lock (feature `fuse`).
//!
//! NFS without lockd and many FUSE filesystems answer every lock call with an error; fault
//! injection can imitate the errno but not the path through the kernel, QEMU, or another
//! process. [`FuseFs`] mounts a flat pass-through filesystem over a temporary directory, served
//! by a thread of the test process (the `fuser` crate, no libfuse), and chooses what its lock
//! handler does:
//!
//! - [`Locks::Fail`]: the filesystem asks the kernel to forward locks to it (the
//!   `FUSE_POSIX_LOCKS` capability; OFD and POSIX locks alike) and fails every `getlk` and
//!   `setlk` with the chosen errno: `ENOLCK`, `ENOSYS`, `EOPNOTSUPP`, `EINVAL`...
//! - [`Locks::Local`]: no lock handler at all, as in libfuse when the `lock` operation is
//!   left out: the kernel then keeps the locks itself, local to this host, as on tmpfs.
//!
//! The mount is undone when the [`FuseFs`] is dropped, also while a test panics; and it is
//! mounted with `auto_unmount`, so that `fusermount3` unmounts it when the test process is
//! killed.
//!
//! ```
//! use qlock_testkit::fuse::{FuseFs, Locks};
//!
//! let Some(fs) = FuseFs::mount_or_skip(Locks::Fail(nix::libc::ENOLCK)) else { return Ok(()) };
//! std::fs::write(fs.path("disk.img"), vec![0; 1 << 20])?;
//! let err = qlock_core::ImageLock::acquire(fs.path("disk.img"), qlock_core::Access::READ).unwrap_err();
//! assert!(matches!(err, qlock_core::Error::Unsupported { .. }));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyWrite, Request, SessionACL,
    TimeOrNow, WriteFlags,
};
use tempfile::TempDir;

use crate::error::{Error, Result};

/// What the filesystem does with byte-range locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locks {
    /// The kernel forwards every lock call (`F_OFD_*` and `F_*LK`) to the filesystem, which
    /// fails it with this errno.
    Fail(i32),
    /// No lock handler: the kernel keeps the locks itself, on this host only.
    Local,
}

/// The errnos a filesystem without lock support answers lock calls with, and their C library
/// text (what QEMU's `Failed to lock byte 100: ...` ends with): the [`Locks::Fail`] cases.
pub const UNSUPPORTED: [(i32, &str); 4] = [
    (nix::libc::ENOLCK, "No locks available"),
    (nix::libc::ENOSYS, "Function not implemented"),
    (nix::libc::EOPNOTSUPP, "Operation not supported"),
    (nix::libc::EINVAL, "Invalid argument"),
];

/// A mounted FUSE filesystem passing files through to a temporary directory; unmounted on drop.
#[derive(Debug)]
pub struct FuseFs {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    lock_calls: Arc<AtomicUsize>,
    // Dropped after the session: the mount point must outlive the mount.
    _mount_dir: TempDir,
    backing: TempDir,
}

impl FuseFs {
    /// Mounts a fresh, empty filesystem whose locks behave as `locks` says.
    ///
    /// # Errors
    /// [`Error::Unavailable`] (a skip, see [`Error::is_skip`]) when this machine has no
    /// `/dev/fuse` or no `fusermount3` (Debian: `apt-get install fuse3`); [`Error::Io`] when
    /// mounting fails otherwise.
    pub fn mount(locks: Locks) -> Result<FuseFs> {
        if !Path::new("/dev/fuse").exists() {
            return Err(Error::Unavailable { program: "/dev/fuse".into(), searched: "/dev".into() });
        }
        if crate::real::find_program("fusermount3", None).is_err() {
            return Err(Error::Unavailable { program: "fusermount3".into(), searched: "PATH".into() });
        }
        let backing =
            tempfile::Builder::new().prefix("qlock-fuse-data-").tempdir().map_err(Error::io("tempdir"))?;
        let mount_dir =
            tempfile::Builder::new().prefix("qlock-fuse-mnt-").tempdir().map_err(Error::io("tempdir"))?;
        let lock_calls = Arc::new(AtomicUsize::new(0));
        let fs = PassThrough {
            root: backing.path().to_path_buf(),
            locks,
            lock_calls: Arc::clone(&lock_calls),
            state: Mutex::new(State::default()),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("qlock-testkit".into()),
            MountOption::Subtype(match locks {
                Locks::Fail(_) => "nolock".into(),
                Locks::Local => "locallock".into(),
            }),
            // fusermount3 unmounts when this process dies, however it dies.
            MountOption::AutoUnmount,
        ];
        // auto_unmount needs allow_other, which only root or `user_allow_other` may set.
        config.acl = SessionACL::All;
        let session =
            fuser::spawn_mount(fs, mount_dir.path(), &config).map_err(Error::io("mounting FUSE"))?;
        let mountpoint = mount_dir.path().to_path_buf();
        Ok(FuseFs { session: Some(session), mountpoint, lock_calls, _mount_dir: mount_dir, backing })
    }

    /// As [`FuseFs::mount`], but `None` (after printing why) when FUSE is missing here, so the
    /// test can return. Under `CI=true` a missing FUSE fails the test instead: CI installs it.
    ///
    /// # Panics
    /// When mounting fails for another reason, or FUSE is missing under `CI=true`.
    pub fn mount_or_skip(locks: Locks) -> Option<FuseFs> {
        match FuseFs::mount(locks) {
            Ok(fs) => Some(fs),
            Err(e) if e.is_skip() => {
                crate::skip(format_args!("{e} (install fuse3)"));
                None
            }
            Err(e) => panic!("FUSE filesystem for the test: {e}"),
        }
    }

    /// `name` inside the mount.
    pub fn path(&self, name: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// `name` in the directory behind the mount: the same file, reached without FUSE (and so
    /// with working locks).
    pub fn backing_path(&self, name: impl AsRef<Path>) -> PathBuf {
        self.backing.path().join(name)
    }

    /// How many lock calls (`getlk`, `setlk`) the kernel forwarded to the filesystem so far.
    pub fn lock_calls(&self) -> usize {
        self.lock_calls.load(Ordering::SeqCst)
    }

    /// Whether the mount point is still mounted (read from `/proc/self/mountinfo`).
    pub fn is_mounted(&self) -> bool {
        is_mount_point(&self.mountpoint)
    }

    /// Unmounts now and waits for the serving thread to end.
    ///
    /// # Errors
    /// The error of `fusermount3 -u`, e.g. when a file is still open on the mount (so a test
    /// can assert that nothing was left open); the drop that follows unmounts lazily.
    pub fn unmount(mut self) -> Result<()> {
        let out = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountpoint)
            .output()
            .map_err(Error::io("running fusermount3 -u"))?;
        if !out.status.success() {
            return Err(Error::Io {
                what: "unmounting FUSE",
                source: io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            });
        }
        // The kernel ends the connection: the serving thread sees ENODEV and returns.
        match self.session.take() {
            Some(s) => s.join().map_err(Error::io("the FUSE serving thread")),
            None => Ok(()),
        }
    }
}

impl Drop for FuseFs {
    /// Unmounts lazily (`fusermount3 -u -z`, then `umount -l`), so nothing stays mounted after
    /// a panic; the serving thread is left to end when the last open file is closed.
    ///
    /// fuser's own unmount cannot be relied on here: under `auto_unmount` it only closes its
    /// socket to `fusermount3`, which then unmounts only a filesystem whose server is gone.
    fn drop(&mut self) {
        if is_mount_point(&self.mountpoint) {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.mountpoint).output();
        }
        if is_mount_point(&self.mountpoint) {
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).output();
        }
        drop(self.session.take());
    }
}

/// Whether `dir` is a mount point of this process's mount namespace.
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    // Field 5 is the mount point, with spaces and other odd bytes octal-escaped; temporary
    // directories have none.
    let dir = dir.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&dir))
}

/// Attributes are not cached: files change behind the kernel's back (through the backing
/// directory) and tests must see them at once.
const TTL: Duration = Duration::ZERO;

/// A flat directory of regular files, each passed through to the file of the same name in
/// `root`.
struct PassThrough {
    root: PathBuf,
    locks: Locks,
    lock_calls: Arc<AtomicUsize>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Inode numbers handed out, by name (the root is 1, files from 2 on).
    inodes: HashMap<OsString, u64>,
    names: HashMap<u64, OsString>,
    open: HashMap<u64, File>,
    next_fh: u64,
}

impl State {
    fn inode(&mut self, name: &OsStr) -> u64 {
        if let Some(&ino) = self.inodes.get(name) {
            return ino;
        }
        let ino = self.inodes.len() as u64 + 2;
        self.inodes.insert(name.to_os_string(), ino);
        self.names.insert(ino, name.to_os_string());
        ino
    }

    fn add_open(&mut self, file: File) -> u64 {
        self.next_fh += 1;
        self.open.insert(self.next_fh, file);
        self.next_fh
    }
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(nix::libc::EIO))
}

fn attr(ino: u64, meta: &fs::Metadata) -> FileAttr {
    let time = |secs: i64, nsecs: i64| {
        let secs = u64::try_from(secs).unwrap_or(0);
        UNIX_EPOCH + Duration::new(secs, u32::try_from(nsecs).unwrap_or(0))
    };
    FileAttr {
        ino: INodeNo(ino),
        size: meta.size(),
        blocks: meta.blocks(),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: SystemTime::UNIX_EPOCH,
        kind: if meta.is_dir() { FileType::Directory } else { FileType::RegularFile },
        perm: (meta.mode() & 0o7777) as u16,
        nlink: if meta.is_dir() { 2 } else { 1 },
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl PassThrough {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The backing path of `ino`, or `None` for an unknown inode.
    fn backing(&self, ino: INodeNo) -> Option<PathBuf> {
        if ino == INodeNo::ROOT {
            return Some(self.root.clone());
        }
        self.state().names.get(&ino.0).map(|n| self.root.join(n))
    }

    fn reply_attr(&self, ino: INodeNo, reply: ReplyAttr) {
        match self.backing(ino).map(fs::metadata) {
            Some(Ok(meta)) => reply.attr(&TTL, &attr(ino.0, &meta)),
            Some(Err(e)) => reply.error(errno(&e)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn lock_call(&self) -> Errno {
        self.lock_calls.fetch_add(1, Ordering::SeqCst);
        match self.locks {
            Locks::Fail(e) => Errno::from_i32(e),
            // Not reached: without FUSE_POSIX_LOCKS the kernel never forwards locks.
            Locks::Local => Errno::ENOSYS,
        }
    }
}

impl fuser::Filesystem for PassThrough {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Locks::Fail(_) = self.locks {
            config
                .add_capabilities(InitFlags::FUSE_POSIX_LOCKS)
                .map_err(|_| io::Error::other("this kernel cannot forward POSIX locks to FUSE"))?;
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        match fs::metadata(self.root.join(name)) {
            Ok(meta) if meta.is_file() => {
                let ino = self.state().inode(name);
                reply.entry(&TTL, &attr(ino, &meta), Generation(0));
            }
            Ok(_) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.reply_attr(ino, reply);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let (Some(size), Some(path)) = (size, self.backing(ino)) {
            let resized = OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(size));
            if let Err(e) = resized {
                return reply.error(errno(&e));
            }
        }
        self.reply_attr(ino, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(path) = self.backing(ino) else { return reply.error(Errno::ENOENT) };
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        let read = !matches!(flags.acc_mode(), OpenAccMode::O_WRONLY);
        match OpenOptions::new().read(read).write(write).custom_flags(nix::libc::O_CLOEXEC).open(path) {
            Ok(file) => reply.opened(FileHandle(self.state().add_open(file)), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let path = self.root.join(name);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(mode & !umask & 0o7777)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&path)
            .and_then(|f| Ok((f.metadata()?, f)));
        match opened {
            Ok((meta, file)) => {
                let mut state = self.state();
                let ino = state.inode(name);
                let fh = state.add_open(file);
                reply.created(&TTL, &attr(ino, &meta), Generation(0), FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let state = self.state();
        let Some(file) = state.open.get(&fh.0) else { return reply.error(Errno::EBADF) };
        let mut buf = vec![0; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..done]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let state = self.state();
        let Some(file) = state.open.get(&fh.0) else { return reply.error(Errno::EBADF) };
        match file.write_all_at(data, offset) {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.state().open.get(&fh.0).map(File::sync_all) {
            Some(Err(e)) => reply.error(errno(&e)),
            _ => reply.ok(),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().open.remove(&fh.0);
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut names: Vec<OsString> = match fs::read_dir(&self.root) {
            Ok(dir) => dir.filter_map(|e| e.ok()).map(|e| e.file_name()).collect(),
            Err(e) => return reply.error(errno(&e)),
        };
        names.sort();
        let mut state = self.state();
        let mut entries = vec![
            (INodeNo::ROOT, FileType::Directory, OsString::from(".")),
            (INodeNo::ROOT, FileType::Directory, OsString::from("..")),
        ];
        entries.extend(names.into_iter().map(|n| (INodeNo(state.inode(&n)), FileType::RegularFile, n)));
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        reply.error(self.lock_call());
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        reply.error(self.lock_call());
    }
}
