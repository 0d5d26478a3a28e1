//! Any program as a process that has an image open, ready once it says so.
//!
//! A [`FakeQemu`](crate::FakeQemu) holds locks; the processes that matter as much to an
//! operator hold none, or hold locks QEMU never sees: QEMU with `locking=off`, a `-U` reader,
//! `flock(1)`, a script with the file open. [`ReadyChild`] runs any such command and returns
//! once its output shows a marker (QEMU's `qemu-io> ` prompt, a script's `ready` line), never
//! after a sleep; dropping it closes its stdin, kills and reaps it.
//!
//! ```no_run
//! use std::process::Command;
//! use qlock_testkit::ReadyChild;
//!
//! let mut cmd = Command::new("flock");
//! cmd.args(["disk.img", "-c", "echo ready; exec cat"]);
//! let holder = ReadyChild::spawn(cmd, "ready")?; // flock(2) held from here on
//! println!("pid {}", holder.pid());
//! # Ok::<(), qlock_testkit::Error>(())
//! ```

use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::error::{Error, Result};
use crate::fork::die_with_parent;
use crate::real::read_until;

/// A running command that printed its ready marker. Dropping it closes its stdin, then kills
/// and reaps it.
#[derive(Debug)]
pub struct ReadyChild {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Kept open so that a late write of the child never meets a closed pipe.
    _stdout: ChildStdout,
    /// What it printed up to and including the marker.
    output: Vec<u8>,
}

impl ReadyChild {
    /// Runs `cmd` with piped stdin and stdout (stderr inherited), and returns once its stdout
    /// shows `marker` (anywhere, so a prompt without a newline counts). It dies with this
    /// process.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be started or prints no marker within a minute, and
    /// [`Error::Qemu`] (with its stderr) when it exits first.
    pub fn spawn(mut cmd: Command, marker: &str) -> Result<ReadyChild> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(Error::io("spawn a ready child"))?;
        let (Some(stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Unsupported("running a child without pipes"));
        };
        let mut output = Vec::new();
        read_until(&mut child, &mut stdout, &mut output, marker.as_bytes(), &program)?;
        Ok(ReadyChild { child, stdin: Some(stdin), _stdout: stdout, output })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it printed up to its marker.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

impl Drop for ReadyChild {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
