//! This test binary run again as a child *role*, for what a forked holder cannot do: run
//! library code (qlock's own guards, `inspect`, an async runtime) in another process.
//!
//! A forked [`FakeQemu`](crate::FakeQemu) may only make raw system calls (see the `fork`
//! module), so a holder of locks is always a `FakeQemu`; a process that must *run qlock* is
//! this binary re-executed as `--exact child_role` with the role in [`ROLE`]. Each test binary
//! that uses roles defines that test:
//!
//! ```no_run
//! use qlock_testkit::reexec;
//!
//! /// Not a test: the body of the child roles. Does nothing in a normal run.
//! #[test]
//! fn child_role() {
//!     // The standard roles (`inspect`), then this binary's own.
//!     reexec::run_roles(|role, _paths| match role {
//!         "hello" => {
//!             reexec::say("hello from the child");
//!             reexec::ready_and_wait(); // READY, then wait until the parent lets go
//!         }
//!         other => panic!("unknown role {other}"),
//!     });
//! }
//!
//! #[test]
//! fn the_child_speaks() {
//!     let child = reexec::Child::start("hello", &[]);
//!     assert_eq!(child.lines(), ["hello from the child"]);
//!     child.finish();
//! }
//! ```
//!
//! Handshakes, no sleeps: [`Child::start`] returns once the child printed `READY`, and a child
//! in [`ready_and_wait`] exits when its stdin closes ([`Child::finish`], or the test process
//! dying).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};

/// The environment variable that tells a re-executed test binary which role to play.
pub const ROLE: &str = "QLOCK_TEST_ROLE";
/// The test every binary using roles defines, that runs them.
pub const CHILD_TEST: &str = "child_role";
/// The environment variable with the paths of the [`standard_role`]s, one a line.
pub const PATHS: &str = "QLOCK_PATHS";

/// The marker of a line a child reports to its parent (libtest may print before it on a line).
const SAY: &str = "QLOCK-SAYS: ";
/// The line a child prints once it is ready.
const READY: &str = "READY";

/// A running child role. Dropping it closes its stdin and reaps it.
#[derive(Debug)]
pub struct Child {
    child: std::process::Child,
    stdin: Option<ChildStdin>,
    /// Kept open (and drained at the end) so that the child's last writes do not hit EPIPE.
    stdout: BufReader<ChildStdout>,
    /// What the child reported with [`say`].
    lines: Vec<String>,
    role: String,
}

impl Child {
    /// Starts `role` with `envs` and returns at once; see [`Child::start`] to wait for it.
    ///
    /// # Panics
    /// When the test binary cannot be run.
    pub fn spawn(role: &str, envs: &[(&str, String)]) -> Child {
        Child::spawn_as(role, envs, None)
    }

    /// As [`Child::spawn`], running as user and group `uid` when given (needs root).
    ///
    /// # Panics
    /// When the test binary cannot be run.
    pub fn spawn_as(role: &str, envs: &[(&str, String)], uid: Option<u32>) -> Child {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn child role {role}: {e}"));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Child { child, stdin, stdout, lines: Vec::new(), role: role.to_string() }
    }

    /// Starts `role` with `envs` and returns once it printed `READY` ([`ready_and_wait`]).
    ///
    /// # Panics
    /// When the child exits before it is ready.
    pub fn start(role: &str, envs: &[(&str, String)]) -> Child {
        Child::start_as(role, envs, None)
    }

    /// As [`Child::start`], running as user and group `uid` when given (needs root).
    ///
    /// # Panics
    /// When the child exits before it is ready.
    pub fn start_as(role: &str, envs: &[(&str, String)], uid: Option<u32>) -> Child {
        let mut child = Child::spawn_as(role, envs, uid);
        if !child.read_lines(true) {
            let status = child.child.wait();
            panic!("child role {role} exited before READY ({status:?}); it said {:?}", child.lines);
        }
        child
    }

    /// Reads the child's stdout, collecting what it [`say`]s, until `READY` (true) or the end.
    fn read_lines(&mut self, until_ready: bool) -> bool {
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line).expect("read the child's stdout") == 0 {
                return false;
            }
            let line = line.trim_end();
            if let Some((_, said)) = line.split_once(SAY) {
                self.lines.push(said.to_string());
            } else if until_ready && line.ends_with(READY) {
                return true;
            }
        }
    }

    /// What the child reported so far with [`say`].
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes its stdin, waits for it to exit and returns everything it reported.
    ///
    /// # Panics
    /// When the child fails.
    pub fn finish(mut self) -> Vec<String> {
        self.stdin.take();
        self.read_lines(false);
        let status = self.child.wait().expect("wait for the child");
        assert!(status.success(), "child role {} failed ({status}); it said {:?}", self.role, self.lines);
        std::mem::take(&mut self.lines)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = std::io::copy(&mut self.stdout, &mut std::io::sink());
            let _ = self.child.wait();
        }
    }
}

/// The body of the `child_role` test: runs `role` when this process was started as a
/// [`Child`] and returns `true`; returns `false` in a normal test run.
pub fn run_role(role: impl FnOnce(&str)) -> bool {
    let Ok(name) = std::env::var(ROLE) else { return false };
    role(&name);
    true
}

/// [`run_role`] for a binary with roles of its own: plays the [`standard_role`]s, and calls
/// `own(role, paths)` for any other, with the [`PATHS`] it was started with.
pub fn run_roles(own: impl FnOnce(&str, &[PathBuf])) -> bool {
    run_role(|role| {
        if !standard_role(role) {
            own(role, &paths());
        }
    })
}

/// The [`PATHS`] this role was started with ([`paths_env`]), none outside a role.
pub fn paths() -> Vec<PathBuf> {
    std::env::var(PATHS).unwrap_or_default().lines().map(PathBuf::from).collect()
}

/// Reports one line to the parent (collected in [`Child::lines`]).
///
/// # Panics
/// When stdout is closed.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{SAY}{line}").expect("print");
    out.flush().expect("flush");
}

/// Prints `READY` on the real stdout (not libtest's capture) and blocks until stdin closes.
///
/// # Panics
/// When stdio is closed.
pub fn ready_and_wait() {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY}").expect("print READY");
    out.flush().expect("flush");
    drop(out);
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink).expect("read stdin");
}

/// `(PATHS, paths one a line)`, the environment of a [`standard_role`].
pub fn paths_env(paths: &[&Path]) -> (&'static str, String) {
    (PATHS, paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n"))
}

/// The roles every binary's `child_role` plays; `false` for one it does not know.
///
/// `inspect`: [`qlock_core::inspect`] of the [`PATHS`] from this other process; says
/// `held: BYTES` for each path, then `holder: PID KIND BYTES` for each of its holders.
///
/// # Panics
/// When inspection fails.
pub fn standard_role(role: &str) -> bool {
    match role {
        "inspect" => {
            for status in qlock_core::inspect(&paths()) {
                let status = status.expect("inspect from the child");
                say(&format!("held: {}", status.others.held));
                for h in status.holders {
                    say(&format!("holder: {} {:?} {}", h.pid, h.kind, h.bytes()));
                }
            }
            ready_and_wait();
        }
        _ => return false,
    }
    true
}

/// What another process sees on `paths` ([`standard_role`] `inspect`): its lines, `held: ...`
/// per path followed by that path's `holder: PID KIND BYTES` lines.
///
/// Inspecting from another process matters for POSIX locks (opening and closing the image
/// here would drop this process's own) and to see this process's locks as others do.
pub fn inspect_elsewhere(paths: &[&Path]) -> Vec<String> {
    Child::start("inspect", &[paths_env(paths)]).finish()
}
