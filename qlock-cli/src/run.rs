//! `qlock run`: hold the locks while a command runs, like `flock(1)` for QEMU images.
//!
//! **Who holds the locks.** The command must never run unprotected, not even when `qlock` is
//! killed with SIGKILL. qlock follows flock(1): the command inherits the image descriptors,
//! and since OFD locks belong to the open file description, the locks last while either
//! process (or anything the command passes them on to) keeps it open. When the command exits,
//! qlock only closes its descriptors: an explicit unlock would take the locks from a
//! background process the command left behind, which flock's model promises to protect.
//!
//! Where the command cannot inherit the locks it gets `PR_SET_PDEATHSIG(SIGKILL)` instead,
//! so it dies with qlock: with `--close` (flock's `-o`: for commands whose children must not
//! hold the lock), and under POSIX locks (`--locking on` without OFD), which belong to a
//! process and are never inherited. SIGKILL, because a command that may catch the signal could
//! go on unprotected; refusing `run` under POSIX locks instead would leave such hosts with no
//! `run` at all. What the death signal cannot cover, and the docs say so: processes the command
//! itself started keep running.
//!
//! **Signals.** The command starts with the signal mask and ignored signals qlock was started
//! with (see [`crate::sys`]). While it runs, qlock blocks SIGTERM, SIGHUP, SIGINT and SIGQUIT
//! (those it was not started ignoring) and reads them from a signalfd: one sent *to qlock*
//! (by `kill`, a supervisor) is passed on to the command at once. One the kernel sent to the
//! whole foreground process group (a terminal's Ctrl-C, Ctrl-\, a hangup) has reached the
//! command already and is not sent twice: a second Ctrl-C means "force quit" to many programs.
//! qlock exits as the command did: its code, or 128+N when signal N ended it.

use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Child, Command, ExitStatus};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;
use qlock_core::{ImageLock, LockKind};

use crate::cli::RunArgs;
use crate::hold::take_for;
use crate::release_all_quietly;
use crate::{Failure, Outcome, sys};

/// Signals passed on to the command.
const FORWARDED: [Signal; 4] = [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGINT, Signal::SIGQUIT];

/// Takes the locks, runs the command, releases when it exits and passes its status through.
pub(crate) fn main(args: &RunArgs) -> Result<Outcome, Failure> {
    let locks = take_for(&args.hold, args.hold.waiting(args.wait), args.conflict_exit_code)?;
    let plan = Plan::new(&locks, args.close);
    let inherit: Vec<BorrowedFd<'_>> =
        if plan.inherit { locks.iter().map(AsFd::as_fd).collect() } else { Vec::new() };

    // Blocked before the command exists, so that none of its signals or its exit is missed.
    let mut forwarded = SigSet::empty();
    for sig in FORWARDED.into_iter().filter(|&s| !sys::started_ignoring(s)) {
        forwarded.add(sig);
    }
    let mut watched = forwarded;
    watched.add(Signal::SIGCHLD);
    let setup = |e: Errno| Failure::Other(format!("cannot watch signals: {}", e.desc()));
    sys::wait_for_children().map_err(setup)?;
    watched.thread_block().map_err(setup)?;
    let signals = SignalFd::with_flags(&watched, SfdFlags::SFD_CLOEXEC).map_err(setup)?;

    let Some((program, rest)) = args.command.split_first() else {
        return Err(Failure::Other("say what to run after --".into()));
    };
    let mut command = Command::new(program);
    command.args(rest);
    sys::start_as_qlock_was(
        &mut command,
        &sys::Child { inherit: &inherit, die_with_qlock: plan.die_with_qlock },
    );
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            release_all_quietly(locks);
            return Err(Failure::Spawn { program: program.clone(), error });
        }
    };
    drop(inherit);
    let status = supervise(&mut child, &signals, &forwarded);
    if plan.inherit {
        // Close only: the locks go with the last process holding the description.
        drop(locks);
    } else {
        release_all_quietly(locks);
    }
    status.map(Outcome::Command).map_err(|e| Failure::Other(format!("waiting for the command: {}", e.desc())))
}

/// How the command is tied to the locks.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// The command inherits the lock descriptors.
    inherit: bool,
    /// The command dies (SIGKILL) with qlock.
    die_with_qlock: bool,
}

impl Plan {
    fn new(locks: &[ImageLock], close: bool) -> Plan {
        Plan::for_kind(locks.first().and_then(ImageLock::lock_kind), close)
    }

    /// OFD locks are inherited unless `--close`; POSIX locks never are; with no locks at all
    /// (`--locking off`, or `auto` without OFD) there is nothing to protect.
    fn for_kind(kind: Option<LockKind>, close: bool) -> Plan {
        let inherit = kind == Some(LockKind::Ofd) && !close;
        Plan { inherit, die_with_qlock: kind.is_some() && !inherit }
    }
}

/// Waits for the command, passing on the signals sent to qlock.
fn supervise(child: &mut Child, signals: &SignalFd, forwarded: &SigSet) -> Result<ExitStatus, Errno> {
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(|_| Errno::ESRCH)?);
    loop {
        let info = match signals.read_signal() {
            Ok(Some(info)) => info,
            Ok(None) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else { continue };
        if sig == Signal::SIGCHLD {
            // Also sent when the command stops; only an exit ends the wait.
            if let Some(status) =
                child.try_wait().map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?
            {
                return Ok(status);
            }
        } else if forwarded.contains(sig) && info.ssi_code != libc::SI_KERNEL {
            // Not yet reaped, so the pid is still the command's: at worst a zombie gets it.
            let _ = kill(pid, sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_holds_the_locks_or_dies_with_qlock() {
        let plan = |inherit, die_with_qlock| Plan { inherit, die_with_qlock };
        assert_eq!(Plan::for_kind(Some(LockKind::Ofd), false), plan(true, false));
        assert_eq!(Plan::for_kind(Some(LockKind::Ofd), true), plan(false, true));
        assert_eq!(Plan::for_kind(Some(LockKind::Posix), false), plan(false, true));
        assert_eq!(Plan::for_kind(Some(LockKind::Posix), true), plan(false, true));
        assert_eq!(Plan::for_kind(None, false), plan(false, false));
    }
}
