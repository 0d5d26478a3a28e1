//! Real QEMU processes as holders: `qemu-io`, `qemu-storage-daemon`, `qemu-system-x86_64`,
//! `qemu-nbd`.
//!
//! Readiness is QEMU's own output, never a sleep: `qemu-io` prints its `qemu-io> ` prompt once
//! the image is open (also when stdin is a pipe), and the daemons print their QMP greeting once
//! every option before the monitor has been processed, so the monitor is always the last
//! option. `qemu-nbd --fork` exits its first process once the export is up; the daemon it
//! leaves is adopted by this process, a child subreaper, so that it can be killed and reaped
//! like any child. When QEMU fails instead, it exits and its stderr becomes the error.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::error::{Error, Result};
use crate::fork::die_with_parent;
use crate::front_end::{Format, FrontEnd};

/// A running QEMU process that holds an image's locks.
#[derive(Debug)]
pub(crate) struct Real {
    proc: Proc,
    /// Sockets and overlays live here until the process is gone.
    _dir: TempDir,
}

/// The process behind a [`Real`].
#[derive(Debug)]
enum Proc {
    /// Our child, spoken to on stdin.
    Child {
        child: Child,
        stdin: Option<ChildStdin>,
        /// Kept open so QEMU never writes into a closed pipe.
        _stdout: ChildStdout,
        qmp: bool,
    },
    /// A daemon (`qemu-nbd --fork`) adopted by this process as a subreaper.
    Adopted(Pid),
}

/// How long a real QEMU may take to get ready (a TCG VM on a loaded machine takes seconds).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The empty firmware image a paused VM maps, in the holder's temporary directory.
const EMPTY_BIOS: &str = "empty-bios.bin";

/// How to run a front end for real.
struct Plan {
    program: &'static str,
    args: Vec<String>,
    qmp: bool,
    overlay_of: Option<Format>,
}

fn qemu_path(p: &Path) -> String {
    // QEMU's option parser takes ",," for a literal comma.
    p.display().to_string().replace(',', ",,")
}

fn plan(fe: FrontEnd, format: Format, image: &Path, dir: &Path) -> Result<Plan> {
    use FrontEnd::*;
    let img = qemu_path(image);
    let fmt = format.as_str().to_string();
    let io = |extra: &[&str]| {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(["-f".into(), fmt.clone(), image.display().to_string()]);
        Plan { program: "qemu-io", args, qmp: false, overlay_of: None }
    };
    let daemon = |export: Option<bool>, driver: &str, file: &str| {
        // A node with no user opens read-write unless told otherwise, whatever the export says.
        let ro = if export == Some(false) { ",read-only=on" } else { "" };
        let mut args = vec![
            "--blockdev".to_string(),
            format!("driver=file,filename={file},node-name=file0{ro}"),
            "--blockdev".into(),
            format!("driver={driver},file=file0,node-name=fmt0{ro}"),
        ];
        if let Some(writable) = export {
            let sock = qemu_path(&dir.join("nbd.sock"));
            args.extend([
                "--nbd-server".into(),
                format!("addr.type=unix,addr.path={sock}"),
                "--export".into(),
                format!("type=nbd,id=exp0,node-name=fmt0,writable={}", if writable { "on" } else { "off" }),
            ]);
        }
        Plan { program: "qemu-storage-daemon", args, qmp: true, overlay_of: None }
    };
    let vm = |readonly: bool, share_rw: bool| {
        let ro = if readonly { ",readonly=on" } else { "" };
        let share = if share_rw { ",share-rw=on" } else { "" };
        // The CPU never runs (-S), but the pc machine wants a firmware image to map: an empty
        // one (written by `spawn`) spares a dependency on the distribution's SeaBIOS files.
        let args = vec![
            "-machine".into(),
            "pc".into(),
            "-accel".into(),
            "tcg".into(),
            "-bios".into(),
            qemu_path(&dir.join(EMPTY_BIOS)),
            "-S".into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-drive".into(),
            format!("file={img},format={fmt},if=none,id=drive0{ro}"),
            "-device".into(),
            format!("virtio-blk-pci,drive=drive0{share}"),
        ];
        Plan { program: "qemu-system-x86_64", args, qmp: true, overlay_of: None }
    };
    Ok(match fe {
        QemuIoRw => io(&[]),
        QemuIoReadOnly => io(&["-r"]),
        QemuIoForceShare => io(&["-r", "-U"]),
        QemuNbdRw => daemon(Some(true), &fmt, &img),
        QemuNbdReadOnly => daemon(Some(false), &fmt, &img),
        StorageDaemonBlockdev => daemon(None, &fmt, &img),
        // A qcow2 overlay blockdev with no user: its backing file gets `100 | 201 203` [emp].
        // On raw that holds nothing, unlike a VM's backing file, so there is no stand-in.
        BackingFile if format == Format::Qcow2 => {
            Plan { overlay_of: Some(format), ..daemon(None, "qcow2", &qemu_path(&dir.join("overlay.qcow2"))) }
        }
        BackingFile => {
            return Err(Error::NoRealEquivalent {
                front_end: fe,
                format,
                why: "a qemu-storage-daemon overlay leaves a raw backing file unlocked",
            });
        }
        VmDisk => vm(false, false),
        VmDiskShareRw => vm(false, true),
        VmDiskReadonly => vm(true, false),
        QemuImgInfo
        | QemuImgInfoForceShare
        | QemuImgCheck
        | QemuImgCheckRepair
        | QemuImgConvertSource
        | QemuImgConvertSourceForceShare
        | QemuImgResize => return Err(Error::NotAHolder(fe)),
    })
}

/// Finds `program` in `dir`, or on `PATH` when no directory is given.
pub(crate) fn find_program(program: &str, dir: Option<&Path>) -> Result<PathBuf> {
    let found = match dir {
        Some(d) => Some(d.join(program)).filter(|p| p.is_file()),
        None => std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| p.is_file())),
    };
    found.ok_or_else(|| Error::Unavailable {
        program: program.to_string(),
        searched: dir.map_or("PATH".to_string(), |d| d.display().to_string()),
    })
}

impl Real {
    /// Starts `fe` on `image` and returns once QEMU holds its locks.
    pub(crate) fn spawn(
        fe: FrontEnd,
        format: Format,
        image: &Path,
        nbd: NbdServer,
        bin_dir: Option<&Path>,
        env: &[(OsString, OsString)],
    ) -> Result<Real> {
        let dir =
            tempfile::Builder::new().prefix("qlock-testkit-").tempdir().map_err(Error::io("temp dir"))?;
        if nbd == NbdServer::QemuNbd && matches!(fe, FrontEnd::QemuNbdRw | FrontEnd::QemuNbdReadOnly) {
            let read_only = fe == FrontEnd::QemuNbdReadOnly;
            let pid = spawn_qemu_nbd(format, read_only, image, dir.path(), bin_dir, env)?;
            return Ok(Real { proc: Proc::Adopted(pid), _dir: dir });
        }
        let plan = plan(fe, format, image, dir.path())?;
        let program = find_program(plan.program, bin_dir)?;
        if plan.program == "qemu-system-x86_64" {
            std::fs::write(dir.path().join(EMPTY_BIOS), vec![0u8; 64 * 1024])
                .map_err(Error::io("write firmware"))?;
        }
        if let Some(backing_format) = plan.overlay_of {
            let qemu_img = find_program("qemu-img", bin_dir)?;
            let overlay = dir.path().join("overlay.qcow2");
            let out = Command::new(qemu_img)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .args(["create", "-q", "-f", "qcow2", "-F", backing_format.as_str(), "-b"])
                .arg(image.canonicalize().map_err(Error::io("canonicalize image path"))?)
                .arg(&overlay)
                .output()
                .map_err(Error::io("run qemu-img create"))?;
            if !out.status.success() {
                return Err(qemu_failed("qemu-img create", Some(out.status), &out.stderr));
            }
        }
        let mut cmd = Command::new(&program);
        cmd.envs(env.iter().map(|(k, v)| (k, v))).args(&plan.args);
        if plan.qmp {
            // Last, so that the greeting comes after every block device is open.
            match plan.program {
                "qemu-system-x86_64" => cmd.args(["-qmp", "stdio"]),
                _ => cmd.args(["--chardev", "stdio,id=qmp0", "--monitor", "chardev=qmp0,mode=control"]),
            };
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(Error::io("spawn QEMU"))?;
        let (Some(stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Unsupported("running QEMU without pipes"));
        };
        let mut stdin = stdin;
        let mut seen = Vec::new();
        if plan.qmp {
            // qemu-system greets before it creates its drives, but answers commands only from its
            // main loop, after every drive is open and locked: a round trip is the handshake.
            read_until(&mut child, &mut stdout, &mut seen, b"{\"QMP\"", plan.program)?;
            stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").map_err(Error::io("write QMP"))?;
            read_until(&mut child, &mut stdout, &mut seen, b"\"return\"", plan.program)?;
        } else {
            read_until(&mut child, &mut stdout, &mut seen, b"qemu-io> ", plan.program)?;
        }
        let proc = Proc::Child { child, stdin: Some(stdin), _stdout: stdout, qmp: plan.qmp };
        Ok(Real { proc, _dir: dir })
    }

    pub(crate) fn pid(&self) -> u32 {
        match &self.proc {
            Proc::Child { child, .. } => child.id(),
            Proc::Adopted(pid) => pid.as_raw() as u32,
        }
    }

    /// Asks QEMU to quit (`quit` for qemu-io, QMP `quit` for the daemons, `SIGTERM` for
    /// qemu-nbd); [`wait`](Self::wait) reaps it.
    pub(crate) fn quit(&mut self) {
        match &mut self.proc {
            Proc::Child { stdin, qmp, .. } => {
                if let Some(mut stdin) = stdin.take() {
                    let msg: &[u8] = if *qmp {
                        b"{\"execute\":\"quit\"}\n" // capabilities were negotiated at spawn
                    } else {
                        b"quit\n"
                    };
                    // A QEMU that already died closed its end: waiting below reports how it ended.
                    let _ = stdin.write_all(msg);
                }
            }
            // ESRCH cannot happen before the reap in wait(); anything else shows there.
            Proc::Adopted(pid) => drop(kill(*pid, Signal::SIGTERM)),
        }
    }

    /// Sends `SIGKILL`; [`wait`](Self::wait) reaps it.
    pub(crate) fn kill(&mut self) {
        // Fails only when the process was already reaped, which wait() then reports.
        match &mut self.proc {
            Proc::Child { child, .. } => drop(child.kill()),
            Proc::Adopted(pid) => drop(kill(*pid, Signal::SIGKILL)),
        }
    }

    pub(crate) fn wait(&mut self) -> Result<ExitStatus> {
        match &mut self.proc {
            Proc::Child { child, .. } => child.wait().map_err(Error::io("wait for QEMU")),
            Proc::Adopted(pid) => reap(*pid),
        }
    }
}

/// Waits for `pid` (our child, or a daemon we adopted) to exit and reaps it.
pub(crate) fn reap(pid: Pid) -> Result<ExitStatus> {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(ExitStatus::from_raw(code << 8)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(ExitStatus::from_raw(sig as i32)),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::Io { what: "waitpid", source: e.into() }),
        }
    }
}

/// Which program a real NBD front end ([`FrontEnd::QemuNbdRw`], [`FrontEnd::QemuNbdReadOnly`])
/// runs: both take the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NbdServer {
    /// A `qemu-storage-daemon` with an NBD export, spoken to over QMP.
    #[default]
    StorageDaemon,
    /// `qemu-nbd --fork`. Its daemon is not our child: spawning makes this process a child
    /// subreaper (`PR_SET_CHILD_SUBREAPER`) so that it adopts the daemon and can reap it.
    QemuNbd,
}

/// Runs `qemu-nbd --fork` on `image` and returns the daemon's pid once it serves (its first
/// process exits then: that is the handshake).
fn spawn_qemu_nbd(
    format: Format,
    read_only: bool,
    image: &Path,
    dir: &Path,
    bin_dir: Option<&Path>,
    env: &[(OsString, OsString)],
) -> Result<Pid> {
    let program = find_program("qemu-nbd", bin_dir)?;
    // The daemon's parent exits at once; as a subreaper this process adopts it instead of PID 1.
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| Error::io("become a child subreaper")(e.into()))?;
    let (pid_file, err_file) = (dir.join("nbd.pid"), dir.join("nbd.err"));
    // A file, not a pipe: the daemon keeps the descriptor, and a pipe would never see its end.
    let err = std::fs::File::create(&err_file).map_err(Error::io("create qemu-nbd's stderr file"))?;
    let mut cmd = Command::new(program);
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .args(["-f", format.as_str(), "--fork", "--pid-file"])
        .arg(&pid_file)
        .arg("-k")
        .arg(dir.join("nbd.sock"));
    if read_only {
        cmd.arg("-r");
    }
    cmd.arg(image).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
    let status = cmd.status().map_err(Error::io("run qemu-nbd"))?;
    if !status.success() {
        let stderr = std::fs::read(&err_file).unwrap_or_default();
        return Err(qemu_failed("qemu-nbd", Some(status), &stderr));
    }
    let pid = std::fs::read_to_string(&pid_file).map_err(Error::io("read qemu-nbd's pid file"))?;
    let pid = pid.trim().parse().map_err(|_| Error::Invalid(format!("qemu-nbd's pid file says {pid:?}")))?;
    Ok(Pid::from_raw(pid))
}

fn qemu_failed(program: &str, status: Option<ExitStatus>, stderr: &[u8]) -> Error {
    Error::Qemu {
        program: program.to_string(),
        status,
        message: String::from_utf8_lossy(stderr).trim().to_string(),
    }
}

/// Reads QEMU's stdout into `seen` until `marker` appears after what `seen` already held; a
/// QEMU that exits first is an error carrying its stderr.
pub(crate) fn read_until(
    child: &mut Child,
    stdout: &mut ChildStdout,
    seen: &mut Vec<u8>,
    marker: &[u8],
    program: &str,
) -> Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let deadline = Instant::now() + READY_TIMEOUT;
    let from = seen.len();
    let mut chunk = [0u8; 512];
    while !seen[from..].windows(marker.len()).any(|w| w == marker) {
        // A QEMU that hangs without a word must not hang the test suite.
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = PollTimeout::try_from(left.as_millis()).unwrap_or(PollTimeout::MAX);
        let ready = poll(&mut [PollFd::new(stdout.as_fd(), PollFlags::POLLIN)], ms)
            .map_err(|e| Error::io("wait for QEMU's output")(e.into()))?;
        if ready == 0 {
            let _ = child.kill();
            let _ = child.wait();
            let why = format!(
                "{program} printed no {:?} within {READY_TIMEOUT:?}",
                String::from_utf8_lossy(marker)
            );
            return Err(Error::io("wait for QEMU to be ready")(io::Error::new(io::ErrorKind::TimedOut, why)));
        }
        let n = stdout.read(&mut chunk).map_err(Error::io("read QEMU's output"))?;
        if n == 0 {
            let status = child.wait().ok();
            let mut err = Vec::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_end(&mut err);
            }
            return Err(qemu_failed(program, status, &err));
        }
        seen.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}
