//! The only `unsafe` code of the binary: the signal state qlock was started with, what a
//! command starts with, dying of SIGPIPE, and the terminal's width.
//!
//! Why it cannot be safe:
//! - Rust's runtime sets SIGPIPE to "ignore" before `main`, so the disposition qlock was
//!   started with can only be read earlier: by a constructor in `.init_array`, which the C
//!   runtime calls before `main` (the way std itself captures `argv` on glibc).
//! - A command must start with that state, not with qlock's (std passes the signal mask on and
//!   resets SIGPIPE to the default), so the forked child restores it before `exec`, in a
//!   `pre_exec` hook: only async-signal-safe calls there (no allocation, no locks).
//! - Reading a disposition, and `TIOCGWINSZ`, have no safe wrapper in nix.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::libc;
use nix::sys::signal::{SigSet, Signal};

/// Signals 1..=64, as bits `1 << (n - 1)`.
const SIGNALS: std::ops::RangeInclusive<libc::c_int> = 1..=64;

static RECORDED: AtomicBool = AtomicBool::new(false);
/// The signal mask qlock was started with.
static START_MASK: AtomicU64 = AtomicU64::new(0);
/// The signals qlock was started ignoring.
static START_IGNORED: AtomicU64 = AtomicU64::new(0);

#[used]
#[unsafe(link_section = ".init_array")]
static RECORD_AT_START: extern "C" fn() = record_start;

/// Records the signal mask and ignored signals, before Rust's runtime changes SIGPIPE.
extern "C" fn record_start() {
    let mut ignored = 0u64;
    let mut mask = 0u64;
    // SAFETY: with a null new action, sigaction only writes the current one into `old`, and
    // pthread_sigmask with a null new set only writes the current mask; both are plain C
    // structs for which all-zero bytes are valid.
    unsafe {
        let mut blocked: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut blocked);
        for sig in SIGNALS {
            let mut old: libc::sigaction = std::mem::zeroed();
            // glibc refuses its own signals 32 and 33: they are left as they are.
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN {
                ignored |= bit(sig);
            }
            if libc::sigismember(&blocked, sig) == 1 {
                mask |= bit(sig);
            }
        }
    }
    START_IGNORED.store(ignored, Ordering::Relaxed);
    START_MASK.store(mask, Ordering::Relaxed);
    RECORDED.store(true, Ordering::Release);
}

fn bit(sig: libc::c_int) -> u64 {
    1 << (sig - 1)
}

/// Whether qlock was started with `sig` ignored. Without the record (a platform whose C
/// runtime does not run `.init_array`), Rust's runtime is the only one known to have
/// changed anything: SIGPIPE is then taken to have been at its default.
pub(crate) fn started_ignoring(sig: Signal) -> bool {
    RECORDED.load(Ordering::Acquire) && START_IGNORED.load(Ordering::Relaxed) & bit(sig as libc::c_int) != 0
}

/// What a command gets besides its signal state.
pub(crate) struct Child<'a> {
    /// Descriptors to pass on (cleared of close-on-exec in the child only).
    pub(crate) inherit: &'a [BorrowedFd<'a>],
    /// Kill the command (SIGKILL) when qlock dies: it must not outlive the locks.
    pub(crate) die_with_qlock: bool,
}

/// Makes `cmd` start with the signal mask and ignored signals qlock was started with (every
/// other signal at its default), with `child.inherit` open, and tied to qlock's life if asked.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, so the caller must
/// spawn from the thread that outlives the command (qlock's main thread, which waits for it).
pub(crate) fn start_as_qlock_was(cmd: &mut Command, child: &Child<'_>) {
    let fds: Vec<RawFd> = child.inherit.iter().map(AsRawFd::as_raw_fd).collect();
    let die_with_qlock = child.die_with_qlock;
    let qlock = nix::unistd::getpid().as_raw();
    let recorded = RECORDED.load(Ordering::Acquire);
    let ignored = START_IGNORED.load(Ordering::Relaxed);
    let mask = START_MASK.load(Ordering::Relaxed);
    let hook = move || -> io::Result<()> {
        // SAFETY: runs in the forked child before exec; every call below is async-signal-safe
        // (POSIX's list, prctl and fcntl by Linux), nothing allocates, and the structs are
        // plain C data for which all-zero bytes are valid.
        unsafe {
            if recorded {
                for sig in SIGNALS.filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP) {
                    let mut act: libc::sigaction = std::mem::zeroed();
                    act.sa_sigaction = if ignored & bit(sig) != 0 { libc::SIG_IGN } else { libc::SIG_DFL };
                    // Fails only for glibc's internal 32 and 33: left as they are.
                    libc::sigaction(sig, &act, std::ptr::null_mut());
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for sig in SIGNALS.filter(|&s| mask & bit(s) != 0) {
                    libc::sigaddset(&mut set, sig);
                }
                if libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if die_with_qlock {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // qlock may have died before the prctl: then nobody would send the signal.
                if libc::getppid() != qlock {
                    libc::raise(libc::SIGKILL);
                }
            }
        }
        Ok(())
    };
    // SAFETY: the hook is async-signal-safe, see above.
    unsafe { cmd.pre_exec(hook) };
}

/// Sets SIGCHLD to its default in qlock, so that it can wait for its command even when it was
/// started with SIGCHLD ignored (which makes the kernel reap children unasked). The command
/// gets the ignored disposition back from [`start_as_qlock_was`].
pub(crate) fn wait_for_children() -> nix::Result<()> {
    // SAFETY: SIG_DFL installs no handler, so no code of ours runs in signal context.
    unsafe { nix::sys::signal::signal(Signal::SIGCHLD, nix::sys::signal::SigHandler::SigDfl) }.map(drop)
}

/// Ends qlock the way a write to a closed pipe ends tools that leave SIGPIPE at its default.
pub(crate) fn die_of_sigpipe() -> ! {
    // SAFETY: SIG_DFL installs no handler.
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) };
    let mut pipe = SigSet::empty();
    pipe.add(Signal::SIGPIPE);
    let _ = pipe.thread_unblock();
    let _ = nix::sys::signal::raise(Signal::SIGPIPE);
    // Only reached if the signal could not end the process.
    std::process::exit(128 + libc::SIGPIPE)
}

/// The width of the terminal on `fd`, if it is one that knows its size.
pub(crate) fn columns(fd: BorrowedFd<'_>) -> Option<usize> {
    // SAFETY: TIOCGWINSZ writes one `winsize` (plain C data) through the pointer.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (r == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}
