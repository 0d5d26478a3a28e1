//! Starting holders with a readiness handshake, and running newcomers to a [`Verdict`].
//!
//! Handshakes, never sleeps. qlock-testkit starts the qlock and foreign holders (forked
//! processes that answer once they hold their locks) and the real `qemu-io`,
//! `qemu-storage-daemon` and paused `qemu-system` holders (ready at qemu-io's prompt, or when
//! QMP answers a command: that happens only in QEMU's main loop, after the drives are set up).
//! What the testkit does not run is started here: `qemu-nbd --fork` exits its parent once
//! serving.
//! Daemonised `qemu-nbd` children are reaped because the compat run makes itself a child
//! subreaper ([`become_subreaper`]).

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::RwLock;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use qlock_core::{Access, ImageLock, LockOptions, LockSet};
use qlock_testkit::{FakeQemu, FrontEnd, HolderBuilder};

use crate::catalogue::{Format, HolderKind, NewcomerKind, QemuHolder, QemuNewcomer};
use crate::qemu::QemuBuild;

/// What a newcomer got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It opened the image (a later, unrelated failure is in `note`).
    Granted {
        /// First error line after a successful open (`Image does not have a backing file`).
        note: Option<String>,
    },
    /// A lock error: QEMU's message from `Failed to` on, plus the hint line if printed.
    Refused(String),
    /// Anything else: the run itself went wrong.
    Failed(String),
}

impl Verdict {
    /// Verdicts compare on outcome and message, not on notes.
    pub fn agrees(&self, other: &Verdict) -> bool {
        match (self, other) {
            (Verdict::Granted { .. }, Verdict::Granted { .. }) => true,
            (a, b) => a == b,
        }
    }

    /// The same verdict with its message rewritten by `f`.
    pub fn map_message(self, f: impl FnOnce(&str) -> String) -> Verdict {
        match self {
            Verdict::Refused(m) => Verdict::Refused(f(&m)),
            Verdict::Failed(m) => Verdict::Failed(f(&m)),
            g => g,
        }
    }

    /// One character for the matrix.
    pub fn symbol(&self) -> char {
        match self {
            Verdict::Granted { .. } => '.',
            Verdict::Refused(m) if m.starts_with("Failed to lock byte") => 'L',
            Verdict::Refused(m) if m.starts_with("Failed to get shared") => 's',
            Verdict::Refused(_) => 'g',
            Verdict::Failed(_) => 'E',
        }
    }

    /// The message on one line, for reports.
    pub fn describe(&self) -> String {
        match self {
            Verdict::Granted { note: None } => "granted".into(),
            Verdict::Granted { note: Some(n) } => format!("granted (then: {n})"),
            Verdict::Refused(m) => format!("refused: {}", m.replace('\n', " / ")),
            Verdict::Failed(m) => format!("error: {m}"),
        }
    }

    /// Reads a QEMU front end's outcome from its exit status and stderr.
    pub fn from_qemu(success: bool, stderr: &str) -> Verdict {
        let lines: Vec<&str> = stderr.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(at) = line.find("Failed to get ").or_else(|| line.find("Failed to lock byte")) else {
                continue;
            };
            let mut msg = line[at..].trim_end().to_string();
            if let Some(hint) = lines.get(i + 1).filter(|l| l.starts_with("Is another process using")) {
                msg.push('\n');
                msg.push_str(hint.trim_end());
            }
            return Verdict::Refused(msg);
        }
        let first = lines.iter().find(|l| !l.contains("Could not open option rom")).map(|l| l.to_string());
        match (success, first) {
            (true, note) => Verdict::Granted { note },
            // Errors that can only come after the image was opened and locked.
            (false, Some(l)) if l.contains("does not have a backing file") => {
                Verdict::Granted { note: Some(l) }
            }
            (false, first) => Verdict::Failed(first.unwrap_or_else(|| "failed without a message".into())),
        }
    }
}

/// Makes this process adopt orphaned descendants (`qemu-nbd --fork` daemons), so they can be
/// killed and reaped deterministically.
pub fn become_subreaper() {
    let _ = nix::sys::prctl::set_child_subreaper(true);
}

/// A running holder; dropping it kills the process and reaps it, releasing its locks.
#[derive(Debug)]
pub struct Running(Option<Live>);

#[derive(Debug)]
enum Live {
    /// A `qemu-nbd --fork` daemon, adopted by this subreaper.
    Daemon(Pid),
    /// A qlock-testkit holder, fake or real; its drop kills and reaps it.
    Testkit(FakeQemu),
}

impl Running {
    /// Ends the holder and waits until it is gone (its locks with it).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        match self.0.take() {
            Some(Live::Daemon(pid)) => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
            }
            Some(Live::Testkit(mut h)) => {
                let _ = h.kill();
            }
            None => {}
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Scratch paths of one image's run.
#[derive(Debug, Clone)]
pub struct Scratch {
    /// The image (a 1 MiB qcow2 file).
    pub image: PathBuf,
    /// A directory for sockets, pid files and outputs.
    pub dir: PathBuf,
}

impl Scratch {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn image_str(&self) -> String {
        self.image.display().to_string()
    }
}

/// Creates the 1 MiB qcow2 image of `scratch` with `build`'s `qemu-img`.
///
/// # Errors
/// `qemu-img create`'s message.
pub fn create_image(build: &QemuBuild, scratch: &Scratch) -> Result<(), String> {
    let mut cmd = build.command("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]).arg(&scratch.image).arg("1M").stdin(Stdio::null());
    let out = output(&mut cmd).map_err(|e| e.to_string())?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_string()) }
}

/// Starts a QEMU holder and waits until it holds the image.
///
/// # Errors
/// The front end's own message when it did not get ready.
pub fn start_qemu(build: &QemuBuild, h: &QemuHolder, s: &Scratch) -> Result<Running, String> {
    match h.kind {
        HolderKind::Io { .. } | HolderKind::Qsd { .. } | HolderKind::Vm { .. } => {
            start_testkit(build.holder(&s.image).front_end(h.kind.front_end(), h.format), true)
                .map_err(|e| e.to_string())
        }
        HolderKind::Nbd { read_only } => nbd(build, h.format, read_only, s, "holder"),
    }
}

/// Starts a qlock-testkit holder: `real` runs the QEMU front end the builder names, otherwise
/// a forked fake holds the builder's access or raw locks. Returns once it holds them.
///
/// # Errors
/// The testkit's error; for a real QEMU that refused, [`qlock_testkit::Error::Qemu`] with
/// QEMU's stderr.
pub fn start_testkit(b: HolderBuilder, real: bool) -> Result<Running, qlock_testkit::Error> {
    // A fake is forked without exec and shares our descriptors until it closes them, before
    // it answers: spawn() has returned by then.
    let _gate = FORK_GATE.read().unwrap_or_else(|e| e.into_inner());
    let holder = if real { b.spawn_real() } else { b.spawn() }?;
    Ok(Running(Some(Live::Testkit(holder))))
}

/// Runs a QEMU newcomer to its verdict, leaving no process or lock behind.
pub fn run_qemu(build: &QemuBuild, n: &QemuNewcomer, s: &Scratch) -> Verdict {
    let f = n.format.as_str();
    let simple = |args: Vec<String>| -> Verdict {
        let mut cmd = build.command(if args[0] == "io" { "qemu-io" } else { "qemu-img" });
        cmd.args(&args[1..]);
        cmd.stdin(Stdio::null());
        match output(&mut cmd) {
            Ok(o) => Verdict::from_qemu(o.status.success(), &String::from_utf8_lossy(&o.stderr)),
            Err(e) => Verdict::Failed(e.to_string()),
        }
    };
    let i = s.image_str();
    let a = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match n.kind {
        NewcomerKind::Io { read_only, force_share } => {
            let mut v = a(&["io", "-f", f]);
            if read_only {
                v.push("-r".into());
            }
            if force_share {
                v.push("-U".into());
            }
            v.extend(a(&["-c", "quit", &i]));
            simple(v)
        }
        NewcomerKind::Info => simple(a(&["img", "info", "-f", f, &i])),
        NewcomerKind::Check => simple(a(&["img", "check", "-q", "-f", f, &i])),
        NewcomerKind::Convert => {
            let out = s.path(&format!("convert-{f}.out"));
            let v = simple(a(&["img", "convert", "-f", f, "-O", "raw", &i, &out.display().to_string()]));
            let _ = fs::remove_file(out);
            v
        }
        NewcomerKind::Resize => simple(a(&["img", "resize", "-q", "-f", f, &i, "2M"])),
        NewcomerKind::Commit => simple(a(&["img", "commit", "-q", "-f", f, &i])),
        NewcomerKind::Create => simple(a(&["img", "create", "-q", "-f", f, &i, "1M"])),
        NewcomerKind::Nbd { read_only } => match nbd(build, n.format, read_only, s, "newcomer") {
            Ok(r) => {
                r.stop();
                Verdict::Granted { note: None }
            }
            Err(e) => Verdict::from_qemu(false, &e),
        },
        NewcomerKind::Qsd { writable } => {
            let fe = if writable { FrontEnd::QemuNbdRw } else { FrontEnd::QemuNbdReadOnly };
            match start_testkit(build.holder(&s.image).front_end(fe, n.format), true) {
                Ok(r) => {
                    r.stop();
                    Verdict::Granted { note: None }
                }
                Err(qlock_testkit::Error::Qemu { message, .. }) => Verdict::from_qemu(false, &message),
                Err(e) => Verdict::Failed(e.to_string()),
            }
        }
    }
}

/// Between `fork` and `exec` a child shares every descriptor of this process, CLOEXEC or not,
/// and with them their OFD locks (docs/protocol.md §7 pitfall 4). A qlock newcomer's locks must be
/// gone when the next newcomer runs, so no child is spawned while one is held: spawns share
/// this gate, in-process locking takes it exclusively.
static FORK_GATE: RwLock<()> = RwLock::new(());

/// `cmd.spawn()`, never while an in-process qlock newcomer holds locks. `spawn` returns after
/// the child's `exec`, when it no longer shares our descriptors.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let _gate = FORK_GATE.read().unwrap_or_else(|e| e.into_inner());
    cmd.spawn()
}

/// `cmd.output()` through [`spawn`].
pub fn output(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    spawn(cmd)?.wait_with_output()
}

/// A qlock newcomer, in this process: OFD locks belong to the open file description, so the
/// holder being another process is all that matters.
pub fn run_qlock(access: Access, s: &Scratch) -> Verdict {
    let _gate = FORK_GATE.write().unwrap_or_else(|e| e.into_inner());
    let opts = LockOptions { find_holders: false, ..LockOptions::default() };
    match ImageLock::acquire_with(&s.image, access, &opts) {
        Ok(lock) => {
            drop(lock);
            Verdict::Granted { note: None }
        }
        Err(e) if e.is_conflict() => {
            let text = e.to_string();
            let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("Held by")).collect();
            Verdict::Refused(lines.join("\n"))
        }
        Err(e) => Verdict::Failed(e.to_string()),
    }
}

/// The bytes `ImageLock` holds for `access` on the (unheld) image, seen from outside with
/// [`qlock_core::inspect`]. The qlock holder rows are testkit processes holding the bytes of
/// `access`; this ties them to what qlock itself holds.
///
/// # Errors
/// The acquisition's or the inspection's error.
pub fn qlock_holds(access: Access, s: &Scratch) -> Result<LockSet, String> {
    let _gate = FORK_GATE.write().unwrap_or_else(|e| e.into_inner());
    let opts = LockOptions { find_holders: false, ..LockOptions::default() };
    let lock = ImageLock::acquire_with(&s.image, access, &opts).map_err(|e| e.to_string())?;
    let seen = qlock_core::inspect(&[&s.image]).remove(0).map_err(|e| e.to_string())?;
    drop(lock);
    Ok(seen.others.held)
}

fn nbd(
    build: &QemuBuild,
    format: Format,
    read_only: bool,
    s: &Scratch,
    role: &str,
) -> Result<Running, String> {
    let pid_file = s.path(&format!("nbd-{role}.pid"));
    let err_file = s.path(&format!("nbd-{role}.err"));
    let _ = fs::remove_file(&pid_file);
    let err = fs::File::create(&err_file).map_err(|e| e.to_string())?;
    let mut cmd = build.command("qemu-nbd");
    cmd.args(["-f", format.as_str(), "--fork", "--pid-file"]).arg(&pid_file).arg("-k");
    cmd.arg(s.path(&format!("nbd-{role}.sock")));
    if read_only {
        cmd.arg("-r");
    }
    cmd.arg(&s.image).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
    // With --fork the parent exits once the server is set up: that is the handshake.
    let status = spawn(&mut cmd).and_then(|mut c| c.wait()).map_err(|e| e.to_string())?;
    let stderr = fs::read_to_string(&err_file).unwrap_or_default();
    if !status.success() {
        return Err(stderr);
    }
    let pid: i32 = fs::read_to_string(&pid_file)
        .map_err(|e| format!("qemu-nbd pid file: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("qemu-nbd pid file: {e}"))?;
    Ok(Running(Some(Live::Daemon(Pid::from_raw(pid)))))
}

#[cfg(test)]
mod tests {
    use super::Verdict;

    #[test]
    fn qemu_messages_lose_their_prefix_and_keep_the_hint() {
        let io = "qemu-io: can't open device /i/d.qcow2: Failed to get \"write\" lock\n\
                  Is another process using the image [/i/d.qcow2]?\n";
        let want = "Failed to get \"write\" lock\nIs another process using the image [/i/d.qcow2]?";
        assert_eq!(Verdict::from_qemu(false, io), Verdict::Refused(want.into()));
        let img = "qemu-img: Could not open '/i/d.qcow2': Failed to lock byte 100\n";
        assert_eq!(Verdict::from_qemu(false, img), Verdict::Refused("Failed to lock byte 100".into()));
        let commit = "qemu-img: Image does not have a backing file\n";
        assert!(matches!(Verdict::from_qemu(false, commit), Verdict::Granted { note: Some(_) }));
        assert_eq!(Verdict::from_qemu(false, ""), Verdict::Failed("failed without a message".into()));
        assert!(Verdict::from_qemu(true, "").agrees(&Verdict::Granted { note: Some("x".into()) }));
    }
}
