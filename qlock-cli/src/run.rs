//! `qlock run`: hold the locks while a command runs, like `flock(1)` for QEMU images.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;

use crate::cli::RunArgs;
use crate::hold::{Failure, release_all_quietly, take, usage};
use crate::report;

/// Takes the locks, runs the command, releases when it exits and passes its status through.
///
/// The image descriptors are `O_CLOEXEC`, so the command does not inherit the locks: they last
/// exactly as long as `qlock` waits for it. `qlock` therefore must outlive the command: while it
/// runs, SIGTERM and SIGHUP are forwarded to it, and SIGINT / SIGQUIT (which a terminal sends to
/// the whole foreground group, command included) are left to the command.
pub(crate) fn main(args: &RunArgs) -> ExitCode {
    let locks = match take(&args.hold, args.wait) {
        Ok(locks) => locks,
        Err(Failure::Usage(msg)) => return usage(&msg),
        Err(Failure::Lock(e)) => {
            let code = report(&e);
            return if e.conflict().is_some() { ExitCode::from(args.conflict_exit_code) } else { code };
        }
    };
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGINT, Signal::SIGQUIT] {
        signals.add(s);
    }
    // Blocked here, received by the forwarding thread below; std resets the mask in the child.
    if let Err(e) = signals.thread_block() {
        eprintln!("qlock: cannot block signals: {e}");
    }
    let (program, rest) = args.command.split_first().expect("clap requires CMD");
    let mut child = match Command::new(program).args(rest).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("qlock: cannot run '{program}': {e}");
            release_all_quietly(locks);
            return ExitCode::from(if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 });
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    std::thread::spawn(move || {
        while let Ok(sig) = signals.wait() {
            if matches!(sig, Signal::SIGTERM | Signal::SIGHUP) {
                let _ = kill(pid, sig);
            }
        }
    });
    let status = child.wait();
    release_all_quietly(locks);
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            (None, Some(sig)) => ExitCode::from(128u8.saturating_add(sig as u8)),
            _ => ExitCode::from(1),
        },
        Err(e) => {
            eprintln!("qlock: waiting for '{program}': {e}");
            ExitCode::from(1)
        }
    }
}
