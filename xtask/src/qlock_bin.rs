//! The `qlock` binary as the compat sections run it: `qlock check --op`, `qlock check --chain`
//! as newcomers, `qlock run --chain -- CMD` as a holder, and the real QEMU holders of a chain
//! beside it, behind one handle.
//!
//! The sections compare the command line users run, not the library: the binary is built
//! once per run (`cargo build -p qlock-cli`, a no-op when it is fresh) unless `QLOCK_BIN`
//! names one.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use qlock_testkit::{Format, FrontEnd};

use crate::answer::Answer;
use crate::qemu::QemuBuild;
use crate::run::{self, Running};

/// The `qlock` binary: `QLOCK_BIN`, else the workspace's debug build, built now if needed.
///
/// # Errors
/// Cargo's failure, once per process (the answer is cached).
pub fn path() -> Result<PathBuf, String> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("QLOCK_BIN") {
            return Ok(PathBuf::from(p));
        }
        crate::cargo_build(&["build", "--quiet", "-p", "qlock-cli", "--bin", "qlock"])?;
        Ok(crate::target_dir().join("debug/qlock"))
    })
    .clone()
}

/// Runs `qlock ARGS` in `cwd` to its [`Answer`].
pub fn answer(cwd: &Path, args: &[String]) -> Answer {
    let bin = match path() {
        Ok(b) => b,
        Err(e) => return Answer::Broken(e),
    };
    let mut cmd = Command::new(bin);
    cmd.args(args).current_dir(cwd).stdin(Stdio::null()).env("LC_ALL", "C");
    match run::output(&mut cmd) {
        Ok(o) => Answer::from_qlock(o.status.code(), &String::from_utf8_lossy(&o.stderr)),
        Err(e) => Answer::Broken(format!("qlock: {e}")),
    }
}

/// Runs one of `build`'s tools in `cwd` to its [`Answer`]; `after_locks` as in
/// [`Answer::from_output`].
pub fn qemu_answer(
    build: &QemuBuild,
    tool: &str,
    cwd: &Path,
    args: &[String],
    after_locks: &[&str],
) -> Answer {
    let mut cmd = build.command(tool);
    cmd.args(args).current_dir(cwd).stdin(Stdio::null());
    match run::output(&mut cmd) {
        Ok(o) => Answer::from_output(o.status.success(), &String::from_utf8_lossy(&o.stderr), after_locks),
        Err(e) => Answer::Broken(format!("{tool}: {e}")),
    }
}

/// A holder of a whole image graph: a real QEMU front end, or `qlock run --chain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainHolder {
    /// A real QEMU process opening the top (its graph comes with it), through qlock-testkit.
    Qemu(FrontEnd),
    /// `qlock run --chain --access PRESET TOP -- CMD`.
    Qlock(&'static str),
}

impl ChainHolder {
    /// `qemu-io -r`, `q-s-d export rw`, `qlock run --chain read`.
    pub fn label(self) -> String {
        match self {
            ChainHolder::Qemu(fe) => match fe {
                FrontEnd::QemuIoRw => "qemu-io".into(),
                FrontEnd::QemuIoReadOnly => "qemu-io -r".into(),
                FrontEnd::QemuIoForceShare => "qemu-io -r -U".into(),
                FrontEnd::QemuNbdRw => "q-s-d export rw".into(),
                FrontEnd::QemuNbdReadOnly => "q-s-d export ro".into(),
                FrontEnd::StorageDaemonBlockdev => "q-s-d blockdev".into(),
                FrontEnd::VmDisk => "VM rw".into(),
                FrontEnd::VmDiskReadonly => "VM readonly=on".into(),
                FrontEnd::VmDiskShareRw => "VM share-rw=on".into(),
                other => other.command().into(),
            },
            ChainHolder::Qlock(preset) => format!("qlock run --chain {preset}"),
        }
    }

    /// Whether it needs `qemu-system-x86_64`.
    pub fn needs_system(self) -> bool {
        matches!(
            self,
            ChainHolder::Qemu(FrontEnd::VmDisk | FrontEnd::VmDiskReadonly | FrontEnd::VmDiskShareRw)
        )
    }

    /// The `qemu-io` front end a qlock preset stands for on a top of `format` (`docs/graph.md`):
    /// on qcow2 `write`, `read`, `force-share` are `qemu-io`, `-r`, `-r -U`; on a raw file
    /// `qemu-io` takes `write-shared` and `-r` takes `force-share`.
    pub fn twin(self, format: Format) -> Option<FrontEnd> {
        let ChainHolder::Qlock(preset) = self else { return None };
        match (format, preset) {
            (Format::Qcow2, "write") | (Format::Raw, "write-shared") => Some(FrontEnd::QemuIoRw),
            (Format::Qcow2, "read") => Some(FrontEnd::QemuIoReadOnly),
            (Format::Qcow2 | Format::Raw, "force-share") => Some(FrontEnd::QemuIoForceShare),
            _ => None,
        }
    }

    /// Starts it on `top` (opened as `format`, in `cwd` for qlock) and returns once it holds
    /// every node: QEMU's own readiness through the testkit, or the command of `qlock run`
    /// saying `ready` (qlock starts it only once every lock is taken). `access` overrides the
    /// preset's access (a mutation).
    ///
    /// # Errors
    /// The holder's own message when it did not get ready.
    pub fn start(
        self,
        build: &QemuBuild,
        cwd: &Path,
        top: &str,
        format: Format,
        access: Option<String>,
    ) -> Result<Held, String> {
        match self {
            ChainHolder::Qemu(fe) => {
                run::start_testkit(build.holder(&cwd.join(top)).front_end(fe, format), true)
                    .map(Held::Qemu)
                    .map_err(|e| e.to_string())
            }
            ChainHolder::Qlock(preset) => {
                let access = access.unwrap_or_else(|| preset.to_string());
                let mut cmd = Command::new(path()?);
                cmd.args(["run", "--chain", "--access", &access, top, "--", "sh", "-c"])
                    .arg("echo ready; exec cat >/dev/null")
                    .current_dir(cwd)
                    .env("LC_ALL", "C")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let mut child = run::spawn(&mut cmd).map_err(|e| format!("qlock run: {e}"))?;
                let mut line = String::new();
                let stdout = child.stdout.take().ok_or("qlock run: no stdout")?;
                let _ = BufReader::new(stdout).read_line(&mut line);
                if line.trim() == "ready" {
                    return Ok(Held::Qlock(child));
                }
                drop(child.stdin.take());
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                Err(format!("qlock run did not start: {}", String::from_utf8_lossy(&out.stderr).trim()))
            }
        }
    }
}

/// A started [`ChainHolder`]; [`Held::stop`] (or drop) ends it and its locks.
#[derive(Debug)]
pub enum Held {
    /// A real QEMU.
    Qemu(Running),
    /// `qlock run`, whose command waits for its stdin to close.
    Qlock(Child),
}

impl Held {
    /// Ends the holder and waits until it is gone.
    pub fn stop(self) {
        match self {
            Held::Qemu(r) => r.stop(),
            Held::Qlock(mut child) => {
                drop(child.stdin.take());
                let _ = child.wait();
            }
        }
    }
}
