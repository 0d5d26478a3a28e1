//! Starting holders with a readiness handshake, and running newcomers to an [`Outcome`].
//!
//! Handshakes, never sleeps. qlock-testkit starts every holder: the qlock and foreign holders
//! (forked processes that answer once they hold their locks) and the real `qemu-io`,
//! `qemu-nbd`, `qemu-storage-daemon` and paused `qemu-system` holders (ready at qemu-io's
//! prompt, when `qemu-nbd --fork` returns, or when QMP answers a command: that happens only in
//! QEMU's main loop, after the drives are set up).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::RwLock;

use qlock_core::{Access, ImageLock, LockOptions, LockSet};
use qlock_testkit::{FakeQemu, HolderBuilder, NbdServer};

use crate::catalogue::{NewcomerCommand, QemuHolder, QemuNewcomer, newcomer};
use crate::compat::Compared;
use crate::qemu::QemuBuild;

/// What a newcomer got in one cell of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
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

impl Compared for Outcome {
    /// Outcomes compare on outcome and message, not on notes.
    fn agrees(&self, other: &Outcome) -> bool {
        match (self, other) {
            (Outcome::Granted { .. }, Outcome::Granted { .. }) => true,
            (a, b) => a == b,
        }
    }

    fn describe(&self) -> String {
        match self {
            Outcome::Granted { note: None } => "granted".into(),
            Outcome::Granted { note: Some(n) } => format!("granted (then: {n})"),
            Outcome::Refused(m) => format!("refused: {}", m.replace('\n', " / ")),
            Outcome::Failed(m) => format!("error: {m}"),
        }
    }
}

impl Outcome {
    /// The same verdict with its message rewritten by `f`.
    pub fn map_message(self, f: impl FnOnce(&str) -> String) -> Outcome {
        match self {
            Outcome::Refused(m) => Outcome::Refused(f(&m)),
            Outcome::Failed(m) => Outcome::Failed(f(&m)),
            g => g,
        }
    }

    /// One character for the matrix.
    pub fn symbol(&self) -> char {
        match self {
            Outcome::Granted { .. } => '.',
            Outcome::Refused(m) if m.starts_with("Failed to lock byte") => 'L',
            Outcome::Refused(m) if m.starts_with("Failed to get shared") => 's',
            Outcome::Refused(_) => 'g',
            Outcome::Failed(_) => 'E',
        }
    }

    /// Reads a QEMU front end's outcome from its exit status and stderr.
    pub fn from_qemu(success: bool, stderr: &str) -> Outcome {
        if let Some(refusal) = newcomer::refusal(stderr) {
            return Outcome::Refused(refusal);
        }
        let first = stderr.lines().find(|l| !l.contains("Could not open option rom")).map(|l| l.to_string());
        match (success, first) {
            (true, note) => Outcome::Granted { note },
            // Errors that can only come after the image was opened and locked.
            (false, Some(l)) if l.contains("does not have a backing file") => {
                Outcome::Granted { note: Some(l) }
            }
            (false, first) => Outcome::Failed(first.unwrap_or_else(|| "failed without a message".into())),
        }
    }
}

/// A running holder (a qlock-testkit process, fake or real); dropping it kills the process and
/// reaps it, releasing its locks.
#[derive(Debug)]
pub struct Running(FakeQemu);

impl Running {
    /// Ends the holder and waits until it is gone (its locks with it).
    pub fn stop(mut self) {
        let _ = self.0.kill();
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
    let builder = build.holder(&s.image).front_end(h.program.front_end(), h.format);
    start_testkit(builder.nbd_server(h.program.nbd_server()), true).map_err(|e| e.to_string())
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
    Ok(Running(holder))
}

/// Runs a QEMU newcomer to its outcome, leaving no process or lock behind.
pub fn run_qemu(build: &QemuBuild, n: &QemuNewcomer, s: &Scratch) -> Outcome {
    let out = s.path(&format!("convert-{}.out", n.format));
    let Some(args) = n.args(&s.image, &out) else {
        // A daemon: granted once it is up, and stopped at once.
        let fe = n.front_end().expect("a daemon newcomer is a front end");
        let server = match n.command {
            NewcomerCommand::Nbd { .. } => NbdServer::QemuNbd,
            _ => NbdServer::StorageDaemon,
        };
        return match start_testkit(build.holder(&s.image).front_end(fe, n.format).nbd_server(server), true) {
            Ok(r) => {
                r.stop();
                Outcome::Granted { note: None }
            }
            Err(qlock_testkit::Error::Qemu { message, .. }) => Outcome::from_qemu(false, &message),
            Err(e) => Outcome::Failed(e.to_string()),
        };
    };
    let mut cmd = build.command(&args[0]);
    cmd.args(&args[1..]).stdin(Stdio::null());
    let outcome = match output(&mut cmd) {
        Ok(o) => Outcome::from_qemu(o.status.success(), &String::from_utf8_lossy(&o.stderr)),
        Err(e) => Outcome::Failed(e.to_string()),
    };
    let _ = fs::remove_file(out);
    outcome
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
pub fn run_qlock(access: Access, s: &Scratch) -> Outcome {
    let _gate = FORK_GATE.write().unwrap_or_else(|e| e.into_inner());
    let opts = LockOptions::default().with_find_holders(false);
    match ImageLock::acquire_with(&s.image, access, &opts) {
        Ok(lock) => {
            drop(lock);
            Outcome::Granted { note: None }
        }
        Err(e) if e.is_conflict() => {
            let text = e.to_string();
            let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("Held by")).collect();
            Outcome::Refused(lines.join("\n"))
        }
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// The bytes `ImageLock` holds for `access` on the (unheld) image, seen from outside with
/// [`qlock_core::inspect`] through `seen_from` (the same image, or the same image as another
/// host sees it). The qlock holder rows are testkit processes holding the bytes of `access`;
/// this ties them to what qlock itself holds.
///
/// # Errors
/// The acquisition's or the inspection's error.
pub fn qlock_holds(access: Access, s: &Scratch, seen_from: &Path) -> Result<LockSet, String> {
    let _gate = FORK_GATE.write().unwrap_or_else(|e| e.into_inner());
    let opts = LockOptions::default().with_find_holders(false);
    let lock = ImageLock::acquire_with(&s.image, access, &opts).map_err(|e| e.to_string())?;
    let seen = qlock_core::inspect(&[seen_from]).remove(0).map_err(|e| e.to_string())?;
    drop(lock);
    Ok(seen.others.held)
}

#[cfg(test)]
mod tests {
    use super::Outcome;
    use crate::compat::Compared;

    #[test]
    fn qemu_messages_lose_their_prefix_and_keep_the_hint() {
        let io = "qemu-io: can't open device /i/d.qcow2: Failed to get \"write\" lock\n\
                  Is another process using the image [/i/d.qcow2]?\n";
        let want = "Failed to get \"write\" lock\nIs another process using the image [/i/d.qcow2]?";
        assert_eq!(Outcome::from_qemu(false, io), Outcome::Refused(want.into()));
        let img = "qemu-img: Could not open '/i/d.qcow2': Failed to lock byte 100\n";
        assert_eq!(Outcome::from_qemu(false, img), Outcome::Refused("Failed to lock byte 100".into()));
        let commit = "qemu-img: Image does not have a backing file\n";
        assert!(matches!(Outcome::from_qemu(false, commit), Outcome::Granted { note: Some(_) }));
        assert_eq!(Outcome::from_qemu(false, ""), Outcome::Failed("failed without a message".into()));
        assert!(Outcome::from_qemu(true, "").agrees(&Outcome::Granted { note: Some("x".into()) }));
    }
}
