//! The only `unsafe` code of the crate: `fork` without `exec`, and what the child runs.
//!
//! # Why fork without exec
//! A downstream test binary has libtest's `main`, not ours, so re-executing `/proc/self/exe`
//! would run the test suite again instead of a holder, unless every downstream crate added a
//! hook or a helper binary. Forking needs neither: the child is a copy of the test process
//! that runs only the function below and never returns to Rust's runtime.
//!
//! # What the child may do
//! The parent may have many threads, and after `fork` only the calling one exists in the child:
//! a lock held by another thread (the allocator's, stdio's) stays locked forever. So the child
//! does only async-signal-safe system calls on data prepared before the fork: no allocation,
//! no `std::io`, no panics, no destructors (it leaves with `_exit`). Everything it needs (the
//! image path as a C string, the first request already encoded, its socket) is borrowed from
//! the parent's stack, which the child has its own copy of.
//!
//! # Why no `PR_SET_PDEATHSIG` for forked holders
//! The death signal fires when the *thread* that forked exits, not the process, so a holder
//! spawned in one test thread and handed to another would die early. The child instead closes
//! every inherited descriptor but its socket and exits on end-of-file there: the socket's other
//! end closes when the handle is dropped or when the test process dies in any way, `SIGKILL`
//! included. Real QEMU processes (`exec`ed, they cannot watch our socket) do get the death
//! signal; their handles are meant to stay on the thread that made them.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::errno::Errno;
use nix::libc;
use nix::unistd::{ForkResult, Pid};

use crate::raw::flock;
use crate::wire::{self, Cmd, Decoded, Op, REQUEST_SIZE, Reply, Status};

/// What the child needs, all prepared before the fork.
pub(crate) struct ChildSetup<'a> {
    /// The child's end of the command socket.
    pub(crate) sock: RawFd,
    /// The image paths: one image, or every node of a chain (top first), at most
    /// [`MAX_NODES`].
    pub(crate) paths: &'a [&'a CStr],
    /// Open the image `O_RDWR` (needed for write locks) instead of `O_RDONLY`.
    pub(crate) writable: bool,
    /// The first request, run before the readiness reply.
    pub(crate) first: &'a [u8; REQUEST_SIZE],
    /// Where to stop closing descriptors if `close_range(2)` is missing (the `RLIMIT_NOFILE`).
    pub(crate) fd_limit: i32,
}

/// The most images one holder keeps open (a chain's nodes).
pub(crate) const MAX_NODES: usize = 64;

/// Forks a holder; in the parent returns the child's pid. The child never returns.
pub(crate) fn fork_holder(setup: &ChildSetup<'_>) -> nix::Result<Pid> {
    // SAFETY: after fork the child runs only `child_main`, which makes async-signal-safe
    // system calls on memory that was initialised before the fork, and leaves with `_exit`
    // without unwinding or running destructors. This is what POSIX allows after fork in a
    // multi-threaded process.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => child_main(setup),
    }
}

/// Makes an `exec`ed QEMU die with SIGKILL when the thread that spawned it exits, so a test
/// process killed mid-test leaves no QEMU behind.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and calls only prctl(2), which is
    // async-signal-safe; it touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            Ok(())
        });
    }
}

fn child_main(s: &ChildSetup<'_>) -> ! {
    let code = child_run(s);
    // SAFETY: _exit(2) ends the process without running atexit handlers or Rust destructors.
    unsafe { libc::_exit(code) }
}

/// The child's life: returns its exit status.
fn child_run(s: &ChildSetup<'_>) -> i32 {
    let sock = isolate(s.sock, s.fd_limit);
    if sock < 0 {
        return 3;
    }
    // SAFETY: the name is a NUL-terminated static; PR_SET_NAME copies at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"qemu-fake".as_ptr() as libc::c_ulong, 0, 0, 0) };
    let flags = if s.writable { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_CLOEXEC | libc::O_NOCTTY;
    let mut imgs: [RawFd; MAX_NODES] = [-1; MAX_NODES];
    let count = s.paths.len().min(MAX_NODES);
    for (i, path) in s.paths.iter().take(count).enumerate() {
        // SAFETY: `path` is a valid NUL-terminated string owned by the parent's (copied) memory.
        let fd = unsafe { libc::open(path.as_ptr(), flags) };
        if fd < 0 {
            reply(
                sock,
                &Reply { index: i as u32, errno: Errno::last_raw(), ..Reply::status(Status::OpenFailed) },
            );
            return 1;
        }
        imgs[i] = fd;
    }
    let imgs = &imgs[..count];
    let first = match wire::decode(s.first) {
        Some(d) => apply(imgs, &d),
        None => Reply::status(Status::BadRequest),
    };
    if !reply(sock, &first) || first.status != Status::Done {
        return 1;
    }
    let mut buf = [0u8; REQUEST_SIZE];
    loop {
        if !read_full(sock, &mut buf) {
            return 0; // the handle is gone, or the test process died
        }
        let r = match wire::decode(&buf) {
            Some(d) if d.exit => return 0,
            Some(d) => apply(imgs, &d),
            None => Reply::status(Status::BadRequest),
        };
        if !reply(sock, &r) {
            return 0;
        }
    }
}

/// Keeps only `sock` (moved to 3 or above) and stdio pointed at /dev/null; returns the socket.
///
/// Inherited descriptors would keep other holders' sockets open (so they would never see
/// end-of-file) and keep the test harness's output pipes open.
fn isolate(sock: RawFd, fd_limit: i32) -> RawFd {
    let mut sock = sock;
    if sock < 3 {
        // SAFETY: fcntl on a descriptor number; no memory is involved.
        sock = unsafe { libc::fcntl(sock, libc::F_DUPFD, 3) };
        if sock < 0 {
            return -1;
        }
    }
    close_between(3, sock - 1, fd_limit);
    close_between(sock + 1, i32::MAX, fd_limit);
    // SAFETY: plain system calls on descriptor numbers and a static C string.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
    sock
}

fn close_between(first: i32, last: i32, fd_limit: i32) {
    if first > last {
        return;
    }
    // SAFETY: close_range(2) takes two descriptor numbers and flags; no memory is involved.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, last as libc::c_uint, 0) };
    if r == 0 {
        return;
    }
    // Kernels before 5.9: close one by one up to the descriptor limit.
    for fd in first..=last.min(fd_limit) {
        // SAFETY: closing a descriptor number; EBADF for unused ones is harmless.
        unsafe { libc::close(fd) };
    }
}

/// Runs one request on its image: prepare, check, then commit or abort.
fn apply(imgs: &[RawFd], d: &Decoded) -> Reply {
    let Some(&img) = imgs.get(d.node as usize) else { return Reply::status(Status::BadRequest) };
    for (i, op) in d.section(0).iter().enumerate() {
        if let Err(errno) = set_lock(img, op) {
            run_quietly(img, d.section(3));
            return Reply { index: i as u32, errno, ..Reply::status(Status::LockFailed) };
        }
    }
    for (i, op) in d.section(1).iter().enumerate() {
        match test_lock(img, op) {
            Ok(None) => {}
            Ok(Some(found)) => {
                run_quietly(img, d.section(3));
                return Reply { index: i as u32, found, ..Reply::status(Status::Conflict) };
            }
            Err(errno) => {
                run_quietly(img, d.section(3));
                return Reply { index: i as u32, errno, ..Reply::status(Status::CheckFailed) };
            }
        }
    }
    // Like QEMU's COMMIT: a failed unlock is only worth a warning, and there is no one to warn.
    run_quietly(img, d.section(2));
    Reply::status(Status::Done)
}

fn run_quietly(img: RawFd, ops: &[Op]) {
    for op in ops {
        let _ = set_lock(img, op);
    }
}

/// Sets or releases one lock, never waiting in the kernel.
fn set_lock(img: RawFd, op: &Op) -> Result<(), i32> {
    let ty = match op.cmd {
        Cmd::Read => libc::F_RDLCK,
        Cmd::Write => libc::F_WRLCK,
        Cmd::Unlock => libc::F_UNLCK,
        Cmd::Test => return Ok(()),
    };
    let cmd = if op.posix { libc::F_SETLK } else { libc::F_OFD_SETLK };
    let fl = flock(ty, op.start, op.len);
    loop {
        // SAFETY: `fl` is a valid, initialised flock on our stack for the duration of the call.
        if unsafe { libc::fcntl(img, cmd, &fl) } == 0 {
            return Ok(());
        }
        match Errno::last_raw() {
            libc::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// Probes with a write lock; returns the first conflicting lock as `(start, len, write, pid)`.
fn test_lock(img: RawFd, op: &Op) -> Result<Option<(u64, u64, bool, i32)>, i32> {
    let cmd = if op.posix { libc::F_GETLK } else { libc::F_OFD_GETLK };
    let mut fl = flock(libc::F_WRLCK, op.start, op.len);
    loop {
        // SAFETY: `fl` is a valid flock on our stack that the kernel fills in.
        if unsafe { libc::fcntl(img, cmd, &mut fl) } == 0 {
            break;
        }
        match Errno::last_raw() {
            libc::EINTR => continue,
            e => return Err(e),
        }
    }
    if i32::from(fl.l_type) == libc::F_UNLCK {
        return Ok(None);
    }
    Ok(Some((fl.l_start as u64, fl.l_len as u64, i32::from(fl.l_type) == libc::F_WRLCK, fl.l_pid)))
}

/// Sends a reply; false when the parent is gone.
fn reply(sock: RawFd, r: &Reply) -> bool {
    let buf = r.encode();
    whole(buf.len(), |done| {
        let rest = &buf[done..];
        // SAFETY: `rest` is a live slice of our stack buffer; MSG_NOSIGNAL avoids SIGPIPE.
        unsafe { libc::send(sock, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) }
    })
}

/// Reads exactly one request; false on end-of-file or error.
fn read_full(sock: RawFd, buf: &mut [u8; REQUEST_SIZE]) -> bool {
    let len = buf.len();
    whole(len, |done| {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a live, writable slice of our stack buffer.
        unsafe { libc::read(sock, rest.as_mut_ptr().cast(), rest.len()) }
    })
}

/// Repeats `step(bytes done so far)`, a `send` or `read` returning its count, until `len`
/// bytes are through; false on end-of-file or error. `EINTR` retries.
fn whole(len: usize, mut step: impl FnMut(usize) -> isize) -> bool {
    let mut done = 0;
    while done < len {
        let n = step(done);
        if n < 0 && Errno::last_raw() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}
