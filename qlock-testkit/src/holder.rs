//! [`FakeQemu`]: a live process holding an image's locks, and its [`HolderBuilder`].

use std::ffi::{CStr, CString, OsString};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::resource::{Resource, getrlimit};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use qlock_core::Check;
use qlock_core::graph::{Chain, ChainError, Role};
use qlock_core::{Access, ImageLock, LockKind, LockOptions, LockSet, Locking, Perm};
use qlock_core::{Conflict, ConflictReason};

use crate::error::{Error, Result};
use crate::fork::{ChildSetup, MAX_NODES, fork_holder};
use crate::front_end::{Format, FrontEnd};
use crate::raw::{Held, RawLock, change};
pub use crate::real::NbdServer;
use crate::real::{Real, reap};
use crate::wire::{Cmd, REPLY_SIZE, Reply, Request, Status};

/// How long a holder may take to answer before it is declared hung. Answers take
/// microseconds; this only turns a stopped holder into an error instead of a hung test.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a builder was asked to hold.
#[derive(Debug, Clone)]
enum Want {
    FrontEnd(FrontEnd, Format),
    Access(Access),
    Raw(Vec<RawLock>),
}

/// Configures a holder; made by [`FakeQemu::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until spawn() or spawn_real()"]
pub struct HolderBuilder {
    path: PathBuf,
    want: Want,
    writable: bool,
    kind: LockKind,
    chain: bool,
    /// Further images held the same way, in the same process.
    also: Vec<PathBuf>,
    nbd: NbdServer,
    qemu_bin_dir: Option<PathBuf>,
    qemu_env: Vec<(OsString, OsString)>,
}

impl HolderBuilder {
    /// Hold what `front_end` holds on a `format` image (docs/protocol.md §5), taken like QEMU:
    /// lock, then check for conflicting holders, and fail with QEMU's message.
    pub fn front_end(mut self, front_end: FrontEnd, format: Format) -> Self {
        self.want = Want::FrontEnd(front_end, format);
        self
    }

    /// Hold the bytes of any [`Access`], taken like QEMU (lock, then check).
    pub fn access(mut self, access: Access) -> Self {
        self.want = Want::Access(access);
        self
    }

    /// Hold exactly these locks, in this order, without any protocol check: for foreign
    /// holders (libvirt's byte 0, whole-file locks, write locks, the legacy bytes 104/204).
    pub fn raw(mut self, locks: impl IntoIterator<Item = RawLock>) -> Self {
        self.want = Want::Raw(locks.into_iter().collect());
        self
    }

    /// Open the image read-write, which the kernel requires for write locks. On by itself when
    /// the initial raw set has a write lock; turn it on to add write locks later.
    pub fn writable(mut self, writable: bool) -> Self {
        self.writable = writable;
        self
    }

    /// Hold the image's whole graph, as the front end does: its backing files and data file
    /// too, each with the bytes QEMU takes there ([`FrontEnd::user`] and
    /// `qlock_core::graph::rules`), all in the one holder process, taken in QEMU's order (so a
    /// refusal names the node QEMU names, with its `Could not open backing file: ` prefix).
    /// Needs a [`front_end`](Self::front_end). A real `qemu-io` or daemon
    /// ([`spawn_real`](Self::spawn_real)) holds the graph by itself, whatever this says.
    pub fn chain(mut self, chain: bool) -> Self {
        self.chain = chain;
        self
    }

    /// Hold the same on `path` too, in the same process (repeatable): one holder of several
    /// images, as a VM with several disks. Its locks can then no longer be changed.
    pub fn also(mut self, path: impl AsRef<Path>) -> Self {
        self.also.push(path.as_ref().to_path_buf());
        self
    }

    /// Take a front end's or access's bytes with POSIX locks, as QEMU does without OFD.
    pub fn posix(mut self) -> Self {
        self.kind = LockKind::Posix;
        self
    }

    /// Which program [`spawn_real`](Self::spawn_real) runs for [`FrontEnd::QemuNbdRw`] and
    /// [`FrontEnd::QemuNbdReadOnly`] (default: a `qemu-storage-daemon` export). Both hold the
    /// same bytes behind the same handle; dropping it kills and reaps either.
    pub fn nbd_server(mut self, server: NbdServer) -> Self {
        self.nbd = server;
        self
    }

    /// Where [`spawn_real`](Self::spawn_real) finds the QEMU binaries (default: `PATH`), for
    /// a QEMU unpacked somewhere else.
    pub fn qemu_bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.qemu_bin_dir = Some(dir.into());
        self
    }

    /// Sets an environment variable for the real QEMU processes only (repeatable): an unpacked
    /// QEMU may need `LD_LIBRARY_PATH` for its libraries, and messages compare best under
    /// `LC_ALL=C`. The test process's own environment is left alone.
    pub fn qemu_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.qemu_env.push((key.into(), value.into()));
        self
    }

    fn target(&self) -> Result<Held> {
        let access = |a: Access| Held::Access(a.lock_set(Perm::ALL), self.kind);
        match &self.want {
            Want::FrontEnd(fe, format) => {
                fe.access(*format).map(access).ok_or(Error::NotApplicable { front_end: *fe, format: *format })
            }
            Want::Access(a) => Ok(access(*a)),
            Want::Raw(locks) => {
                if let Some(bad) = locks.iter().find(|l| !l.is_valid()) {
                    return Err(Error::Invalid(format!("{bad} is beyond the largest file offset")));
                }
                Ok(Held::Raw(locks.clone()))
            }
        }
    }

    /// Forks a fake holder and returns once it holds its locks.
    ///
    /// # Errors
    /// [`Error::Refused`] with QEMU's message when other holders are in the way of a front end
    /// or access; [`Error::RawLock`] when a raw lock conflicts; [`Error::Open`] when the image
    /// cannot be opened. The child has exited and been reaped by then.
    pub fn spawn(self) -> Result<FakeQemu> {
        if self.chain {
            let Want::FrontEnd(fe, format) = self.want else {
                return Err(Error::Invalid("chain(true) needs a front end".into()));
            };
            return self.spawn_chain(fe, format);
        }
        let target = self.target()?;
        let writable = self.writable || matches!(&target, Held::Raw(l) if l.iter().any(|l| l.write));
        let (request, checks) = change(&Held::NOTHING, &target);
        let paths: Vec<PathBuf> = std::iter::once(&self.path).chain(&self.also).cloned().collect();
        let mut holder = self.fork(&paths, writable, &request)?;
        holder.also = paths[1..].to_vec();
        // On failure the handle is dropped here, which kills and reaps the child.
        holder.finish(0, &request, &checks, target.clone())?;
        for node in 1..paths.len() {
            holder.step(node, &Held::NOTHING, &target)?;
        }
        Ok(holder)
    }

    /// Forks a child holding `paths` open, running `first` before its first answer.
    fn fork(self, paths: &[PathBuf], writable: bool, first: &Request) -> Result<FakeQemu> {
        let first = first.encode().ok_or_else(too_many)?;
        if paths.len() > MAX_NODES {
            return Err(Error::Invalid(format!("a holder keeps at most {MAX_NODES} images open")));
        }
        let c_paths = paths
            .iter()
            .map(|p| CString::new(p.as_os_str().as_bytes()))
            .collect::<std::result::Result<Vec<CString>, _>>()
            .map_err(|_| Error::Invalid("the image path contains a NUL byte".into()))?;
        let c_refs: Vec<&CStr> = c_paths.iter().map(CString::as_c_str).collect();
        let (sock, child_sock) = UnixStream::pair().map_err(Error::io("socketpair"))?;
        sock.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(Error::io("socket timeout"))?;
        let fd_limit = getrlimit(Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| i32::try_from(soft).unwrap_or(i32::MAX))
            .unwrap_or(1 << 20);
        let setup =
            ChildSetup { sock: child_sock.as_raw_fd(), paths: &c_refs, writable, first: &first, fd_limit };
        let pid = fork_holder(&setup).map_err(|e| Error::io("fork")(e.into()))?;
        drop(child_sock);
        Ok(FakeQemu {
            path: self.path,
            pid,
            status: None,
            front_end: match self.want {
                Want::FrontEnd(fe, format) => Some((fe, format)),
                _ => None,
            },
            nodes: Vec::new(),
            also: Vec::new(),
            imp: Imp::Fake { sock, held: Held::NOTHING, writable },
        })
    }

    /// A fake holder of the image's whole graph (see [`HolderBuilder::chain`]).
    fn spawn_chain(self, fe: FrontEnd, format: Format) -> Result<FakeQemu> {
        fe.access(format).ok_or(Error::NotApplicable { front_end: fe, format })?;
        let opts = LockOptions::default().with_locking(Locking::Off);
        let top = ImageLock::open(&self.path, &opts)?;
        let chain = Chain::discover(top, Some(format), |p| ImageLock::open(p, &opts))?;
        let mut nodes: Vec<ChainNode> = chain
            .nodes()
            .iter()
            .map(|n| ChainNode {
                path: n.path().to_path_buf(),
                role: n.role,
                format: n.format,
                held: LockSet::EMPTY,
            })
            .collect();
        drop(chain);
        if !fe.opens_chain() {
            nodes.truncate(1);
        }
        let (user, kind) = (fe.user(), self.kind);
        let held = |a: Access| Held::Access(a.lock_set(Perm::ALL), kind);
        let passes: Vec<(Held, Held)> = nodes
            .iter()
            .map(|n| (held(user.detached().node(n.role, n.format)), held(user.node(n.role, n.format))))
            .collect();
        let paths: Vec<PathBuf> = nodes.iter().map(|n| n.path.clone()).collect();
        let (request, checks) = change(&Held::NOTHING, &passes[0].0);
        let mut holder = self.fork(&paths, false, &request)?;
        holder.nodes = nodes;
        // QEMU's first pass (the graph opened with nobody attached), then the user attaches.
        holder.finish(0, &request, &checks, passes[0].0.clone()).map_err(|e| holder.on_node(0, true, e))?;
        for (i, (first, _)) in passes.iter().enumerate().skip(1) {
            holder.step(i, &Held::NOTHING, first).map_err(|e| holder.on_node(i, true, e))?;
        }
        for (i, (first, last)) in passes.iter().enumerate() {
            if first != last {
                holder.step(i, first, last).map_err(|e| holder.on_node(i, false, e))?;
            }
        }
        Ok(holder)
    }

    /// Starts the real QEMU front end instead of a fake, behind the same handle.
    ///
    /// On an image with a backing file or a data file, the real QEMU holds the whole graph
    /// (every node with its bytes, `docs/graph.md`), as a fake does with
    /// [`chain(true)`](Self::chain).
    ///
    /// # Errors
    /// An error whose [`Error::is_skip`] is true when the binary is missing (looked up in
    /// [`qemu_bin_dir`](Self::qemu_bin_dir) or on `PATH`) or when the front end cannot be a
    /// long-lived holder (`qemu-img` subcommands); [`Error::Qemu`] with QEMU's stderr when it
    /// refuses to open the image.
    pub fn spawn_real(self) -> Result<FakeQemu> {
        let Want::FrontEnd(fe, format) = self.want else {
            return Err(Error::Unsupported("a raw lock set or bare access"));
        };
        fe.access(format).ok_or(Error::NotApplicable { front_end: fe, format })?;
        let real =
            Real::spawn(fe, format, &self.path, self.nbd, self.qemu_bin_dir.as_deref(), &self.qemu_env)?;
        let pid = Pid::from_raw(real.pid() as i32);
        Ok(FakeQemu {
            path: self.path,
            pid,
            status: None,
            front_end: Some((fe, format)),
            nodes: Vec::new(),
            also: Vec::new(),
            imp: Imp::Real(real),
        })
    }
}

fn too_many() -> Error {
    Error::Invalid(format!("lock set too large: at most {} fcntl steps per change", crate::wire::MAX_OPS))
}

#[derive(Debug)]
enum Imp {
    Fake { sock: UnixStream, held: Held, writable: bool },
    Real(Real),
}

/// A process holding locks on an image: a forked fake, or a real QEMU.
///
/// Dropping it kills and reaps the process, so a failing or panicking test leaves neither a
/// zombie nor a lock behind.
///
/// ```
/// use qlock_core::{Access, ImageLock};
/// use qlock_testkit::{FakeQemu, Format, FrontEnd};
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("disk.qcow2");
/// # std::fs::write(&path, b"").unwrap();
///
/// let mut vm = FakeQemu::builder(&path).front_end(FrontEnd::VmDisk, Format::Qcow2).spawn()?;
/// let err = ImageLock::acquire(&path, Access::READ).unwrap_err();
/// assert!(err.to_string().starts_with("Failed to get shared \"write\" lock"));
///
/// vm.set_access(Access::READ)?;             // the VM now only reads
/// ImageLock::acquire(&path, Access::READ)?; // so a reader gets in
/// vm.kill()?;                               // crash it: the kernel drops its locks
/// ImageLock::acquire(&path, Access::WRITE)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct FakeQemu {
    path: PathBuf,
    pid: Pid,
    status: Option<ExitStatus>,
    front_end: Option<(FrontEnd, Format)>,
    /// Every node of a chain holder, top first; empty for a holder of one image.
    nodes: Vec<ChainNode>,
    /// The further images a fake holds (see [`HolderBuilder::also`]).
    also: Vec<PathBuf>,
    imp: Imp,
}

/// One image a chain holder holds ([`HolderBuilder::chain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainNode {
    /// Its path, as discovery opened it.
    pub path: PathBuf,
    /// What it is to the top.
    pub role: Role,
    /// How QEMU reads it.
    pub format: qlock_core::graph::Format,
    /// The protocol bytes the holder holds on it.
    pub held: LockSet,
}

impl FakeQemu {
    /// Starts configuring a holder of `path`. With nothing more it holds no lock at all.
    pub fn builder(path: impl AsRef<Path>) -> HolderBuilder {
        HolderBuilder {
            path: path.as_ref().to_path_buf(),
            want: Want::Raw(Vec::new()),
            writable: false,
            kind: LockKind::Ofd,
            chain: false,
            also: Vec::new(),
            nbd: NbdServer::StorageDaemon,
            qemu_bin_dir: None,
            qemu_env: Vec::new(),
        }
    }

    /// Starts the real QEMU `front_end` on `path` (from `PATH`); see
    /// [`HolderBuilder::spawn_real`] and [`Error::is_skip`].
    pub fn real(path: impl AsRef<Path>, front_end: FrontEnd, format: Format) -> Result<FakeQemu> {
        FakeQemu::builder(path).front_end(front_end, format).spawn_real()
    }

    /// The holder's process id, as other tools (and qlock's conflict messages) show it.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// The image held.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for a real QEMU process, false for a fake.
    pub fn is_real(&self) -> bool {
        matches!(self.imp, Imp::Real(_))
    }

    /// The front end and format this holder was built from, if any.
    pub fn front_end(&self) -> Option<(FrontEnd, Format)> {
        self.front_end
    }

    /// The nodes of a fake chain holder, top first, with the bytes held on each; empty for a
    /// holder of one image and for a real QEMU (which holds its graph too: read it with
    /// `qlock_core::inspect` and [`pid`](Self::pid)).
    pub fn chain_nodes(&self) -> &[ChainNode] {
        &self.nodes
    }

    /// The locks a fake holds now, as it took them; `None` for a real QEMU.
    pub fn locks(&self) -> Option<Vec<RawLock>> {
        match &self.imp {
            Imp::Fake { held: Held::Access(set, kind), .. } => Some(RawLock::from_lock_set(*set, *kind)),
            Imp::Fake { held: Held::Raw(locks), .. } => Some(locks.clone()),
            Imp::Real(_) => None,
        }
    }

    /// Changes to the bytes of `access` with QEMU's semantics (docs/protocol.md §3): lock the union,
    /// check only the new request, then release old-only bytes; on a conflict keep the old set.
    ///
    /// # Errors
    /// [`Error::Refused`] with QEMU's message on a conflict; [`Error::Unsupported`] on a real
    /// QEMU; [`Error::Gone`] when the holder died.
    pub fn set_access(&mut self, access: Access) -> Result<()> {
        if !self.nodes.is_empty() || !self.also.is_empty() {
            return Err(Error::Unsupported("set_access on a holder of several images"));
        }
        let kind = match &self.imp {
            Imp::Fake { held: Held::Access(_, kind), .. } => *kind,
            Imp::Fake { .. } => LockKind::Ofd,
            Imp::Real(_) => return Err(Error::Unsupported("set_access")),
        };
        self.change_to(Held::Access(access.lock_set(Perm::ALL), kind))
    }

    /// Changes to exactly `locks`: takes them all first, then releases what only the old set
    /// covered; on failure restores the old set.
    ///
    /// # Errors
    /// [`Error::RawLock`] when a lock cannot be taken (a write lock needs
    /// [`HolderBuilder::writable`]); [`Error::Unsupported`] on a real QEMU.
    pub fn set_raw(&mut self, locks: &[RawLock]) -> Result<()> {
        if !self.nodes.is_empty() || !self.also.is_empty() {
            return Err(Error::Unsupported("set_raw on a holder of several images"));
        }
        if let Some(bad) = locks.iter().find(|l| !l.is_valid()) {
            return Err(Error::Invalid(format!("{bad} is beyond the largest file offset")));
        }
        let first_write = locks.iter().find(|l| l.write);
        match (&self.imp, first_write) {
            (Imp::Real(_), _) => Err(Error::Unsupported("set_raw")),
            (Imp::Fake { writable: false, .. }, Some(lock)) => {
                // The kernel would say EBADF; say it before sending anything.
                Err(Error::RawLock { lock: *lock, source: io::Error::from_raw_os_error(Errno::EBADF as i32) })
            }
            (Imp::Fake { .. }, _) => self.change_to(Held::Raw(locks.to_vec())),
        }
    }

    fn change_to(&mut self, target: Held) -> Result<()> {
        let Imp::Fake { sock, held, .. } = &mut self.imp else {
            return Err(Error::Unsupported("changing locks"));
        };
        let (request, checks) = change(held, &target);
        let bytes = request.encode().ok_or_else(too_many)?;
        if sock.write_all(&bytes).is_err() {
            return Err(self.gone());
        }
        self.finish(0, &request, &checks, target)
    }

    /// Moves node `node` of a chain holder from `from` to `to`.
    fn step(&mut self, node: usize, from: &Held, to: &Held) -> Result<()> {
        let Imp::Fake { sock, .. } = &mut self.imp else {
            return Err(Error::Unsupported("changing locks"));
        };
        let (mut request, checks) = change(from, to);
        request.node = u32::try_from(node).map_err(|_| too_many())?;
        let bytes = request.encode().ok_or_else(too_many)?;
        if sock.write_all(&bytes).is_err() {
            return Err(self.gone());
        }
        self.finish(node, &request, &checks, to.clone())
    }

    /// A refusal on node `node` of a chain, as QEMU words it: the node's path, and in the
    /// first pass `Could not open backing file: ` once per level of backing file above it.
    fn on_node(&self, node: usize, opening: bool, err: Error) -> Error {
        let Some(n) = self.nodes.get(node) else { return err };
        let source = match err {
            Error::Refused(source) | Error::Lock(source) => source,
            other => return other,
        };
        let levels = match n.role {
            Role::Top => 0,
            Role::Backing { depth } | Role::DataFile { depth, .. } => depth,
        };
        Error::Chain(ChainError::Node {
            path: n.path.clone(),
            role: n.role,
            prefix: if opening { levels } else { 0 },
            source: Box::new(source),
        })
    }

    /// The path of node `node` (the image itself for a holder of one image).
    fn node_path(&self, node: usize) -> PathBuf {
        match (self.nodes.get(node), node.checked_sub(1).and_then(|i| self.also.get(i))) {
            (Some(n), _) => n.path.clone(),
            (None, Some(p)) => p.clone(),
            (None, None) => self.path.clone(),
        }
    }

    /// Reads the answer to `request` and records `target` as held on success.
    fn finish(&mut self, node: usize, request: &Request, checks: &[Check], target: Held) -> Result<()> {
        let read = {
            let Imp::Fake { sock, .. } = &mut self.imp else {
                return Err(Error::Unsupported("changing locks"));
            };
            let mut buf = [0u8; REPLY_SIZE];
            sock.read_exact(&mut buf).map(|()| Reply::decode(&buf))
        };
        let reply = match read {
            Ok(reply) => reply,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(self.gone()),
            Err(e) => return Err(Error::Io { what: "holder did not answer", source: e }),
        };
        let Some(reply) = reply else { return Err(Error::Invalid("unreadable answer from holder".into())) };
        let access_kind = matches!(target, Held::Access(..));
        let errno = || io::Error::from_raw_os_error(reply.errno);
        let index = reply.index as usize;
        match reply.status {
            Status::Done => {
                if let (Some(n), Held::Access(set, _)) = (self.nodes.get_mut(node), &target) {
                    n.held = *set;
                }
                if let Imp::Fake { held, .. } = &mut self.imp {
                    if node == 0 {
                        *held = target;
                    }
                }
                Ok(())
            }
            Status::OpenFailed => Err(Error::Open { path: self.node_path(index), source: errno() }),
            Status::BadRequest => Err(Error::Invalid("the holder could not decode a request".into())),
            Status::LockFailed => {
                let op = request.prepare.get(index).copied().ok_or_else(|| self.gone())?;
                let busy = matches!(Errno::from_raw(reply.errno), Errno::EAGAIN | Errno::EACCES);
                if access_kind && busy {
                    Err(self.refused(node, ConflictReason::WriteLocked(op.start), op.start))
                } else if access_kind {
                    Err(qlock_core::Error::Lock {
                        path: self.node_path(node),
                        message: format!("Failed to lock byte {}", op.start),
                        source: errno(),
                    }
                    .into())
                } else {
                    let kind = if op.posix { LockKind::Posix } else { LockKind::Ofd };
                    let lock = RawLock { start: op.start, len: op.len, write: op.cmd == Cmd::Write, kind };
                    Err(Error::RawLock { lock, source: errno() })
                }
            }
            Status::Conflict | Status::CheckFailed => {
                let check = checks.get(index).copied().ok_or_else(|| self.gone())?;
                if reply.status == Status::Conflict {
                    Err(self.refused(node, ConflictReason::Check(check), check.byte()))
                } else {
                    Err(qlock_core::Error::Lock {
                        path: self.node_path(node),
                        message: check.message(),
                        source: errno(),
                    }
                    .into())
                }
            }
        }
    }

    /// QEMU's refusal on node `node`, naming the other processes that hold `byte`.
    fn refused(&self, node: usize, reason: ConflictReason, byte: u64) -> Error {
        let path = self.node_path(node);
        let holders = qlock_core::inspect(&[&path])
            .pop()
            .and_then(|r| r.ok())
            .map(|s| s.holders.into_iter().filter(|h| h.pid != self.pid() && h.covers(byte)).collect())
            .unwrap_or_default();
        let conflict = Conflict { path, reason, holders };
        qlock_core::Error::Conflict(Box::new(conflict)).into()
    }

    /// The holder stopped answering: reap it and say how it ended.
    fn gone(&mut self) -> Error {
        let status = self.wait().ok();
        Error::Gone { pid: self.pid(), status }
    }

    /// Ends the holder gracefully (a fake exits, a real QEMU is told to `quit`) and reaps it;
    /// its locks are gone when this returns.
    ///
    /// # Errors
    /// [`Error::Io`] when the process cannot be reaped.
    pub fn release(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        match &mut self.imp {
            Imp::Fake { sock, .. } => {
                let exit = Request::exit().encode().ok_or_else(too_many)?;
                // A holder that already died closed its end; wait() reports how it ended.
                let _ = sock.write_all(&exit);
            }
            Imp::Real(real) => real.quit(),
        }
        self.wait()
    }

    /// Crashes the holder with `SIGKILL`, as a VM killed by the OOM killer, and reaps it; its
    /// locks are gone when this returns.
    ///
    /// # Errors
    /// [`Error::Io`] when the process cannot be reaped.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        match &mut self.imp {
            // ESRCH cannot happen before the reap in wait(); anything else shows there.
            Imp::Fake { .. } => drop(kill(self.pid, Signal::SIGKILL)),
            Imp::Real(real) => real.kill(),
        }
        self.wait()
    }

    /// Waits until the holder exits (after a [`release`](Self::release), or when something
    /// else killed it) and reaps it. Returns at once if it was already reaped.
    ///
    /// # Errors
    /// [`Error::Io`] when `waitpid` fails.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = match &mut self.imp {
            Imp::Real(real) => real.wait()?,
            Imp::Fake { .. } => reap(self.pid)?,
        };
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; kill() only fails if reaping fails.
        let _ = self.kill();
    }
}
