//! Holders in other processes, killed holders, several guards in one process, bad input,
//! inspection through `/proc`, foreign locks, the POSIX fallback and the descriptor's flags.
//!
//! Holder processes are qlock-testkit fakes (forked, answering once their locks are taken);
//! processes that must run qlock itself (inspecting from outside, as another user) are this
//! test binary re-executed as a role (`qlock_testkit::reexec`), which prints `READY` once done
//! and exits when its stdin closes, so no test sleeps to synchronise.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Helper, Raw, held_from_outside, hold, image, paths_env, set};
use qlock_core::ConflictReason;
use qlock_core::inspect;
use qlock_core::plan::decide;
use qlock_core::{Access, Backoff, Error, ImageLock, LockKind, LockOptions, LockSet, Locking, Perm, Verdict};
use qlock_core::{Check, Others};
use qlock_testkit::{FakeQemu, RawLock};

/// Not a test: the body of the helper processes. Does nothing in a normal run.
#[test]
fn child_role() {
    qlock_testkit::reexec::run_roles(|role, paths| {
        match role {
            // Runs as an unprivileged user: reports what it sees, one line each.
            "unprivileged" => {
                let denied = ImageLock::acquire(&paths[0], Access::READ).unwrap_err();
                common::say(&format!("denied: {}", matches!(denied, Error::PermissionDenied { .. })));
                let status = inspect(&paths[1..]).remove(0).unwrap();
                common::say(&format!("held: {}", status.others.held));
                common::say(&format!("holders: {}", status.holders.len()));
                common::say(&format!("unidentified: {}", status.unidentified));
                common::ready_and_wait();
            }
            other => panic!("unknown role {other}"),
        }
    });
}

/// `/proc/PID/comm` of a qlock-testkit fake holder.
fn helper_comm() -> String {
    "qemu-fake".to_string()
}

#[test]
fn a_holder_in_another_process_is_refused_and_named() {
    let _serial = common::serial();
    let (_dir, path) = image();
    let mut helper = hold(&[&path], Access::WRITE);

    let err = ImageLock::acquire(&path, Access::READ).unwrap_err();
    let c = err.conflict().expect("conflict");
    assert_eq!(c.qemu_message(), "Failed to get shared \"write\" lock");
    assert_eq!(c.holders.len(), 1, "{err}");
    assert_eq!(c.holders[0].pid, helper.pid());
    assert_eq!(c.holders[0].command.as_deref(), Some(helper_comm().as_str()));
    assert_eq!(c.holders[0].bytes(), set(Access::WRITE));
    let text = err.to_string();
    assert!(text.contains(&format!("\nHeld by pid {} ({})", helper.pid(), helper_comm())), "{text}");
    // A force-share reader shares everything and asks only for consistent read: it gets in.
    drop(ImageLock::acquire(&path, Access::FORCE_SHARE).expect("force-share"));

    let status = inspect(&[&path]).remove(0).expect("inspect");
    assert_eq!(status.others.held, set(Access::WRITE));
    assert!(status.foreign.is_empty() && !status.unidentified, "{status:?}");
    let [h] = &status.holders[..] else { panic!("one holder expected: {status:?}") };
    assert_eq!((h.pid, h.kind), (helper.pid(), LockKind::Ofd));
    assert!(h.fd.is_some());
    for (name, verdict) in &status.presets {
        let access = Access::preset(name).unwrap();
        let others = Others { held: set(Access::WRITE), write_locked: LockSet::EMPTY };
        assert_eq!(*verdict, decide(others, LockSet::EMPTY, set(access)), "{name}");
    }
    assert!(helper.release().unwrap().success());
    assert!(held_from_outside(&path).is_empty(), "a holder that exits releases everything");
    drop(ImageLock::acquire(&path, Access::WRITE).expect("free again"));
}

#[test]
fn a_sigkilled_holder_leaves_nothing_and_a_waiter_gets_in() {
    let _serial = common::serial();
    let (_dir, path) = image();
    let mut helper = hold(&[&path], Access::WRITE);
    let pid = helper.pid();

    // While it lives, a bounded wait times out naming it.
    let short =
        Backoff::default().with_initial(Duration::from_millis(1)).with_timeout(Duration::from_millis(30));
    let err = ImageLock::acquire_wait(&path, Access::READ, &LockOptions::default(), &short).unwrap_err();
    assert!(matches!(err, Error::TimedOut { .. }), "{err:?}");
    assert_eq!(err.conflict().unwrap().holders.iter().map(|h| h.pid).collect::<Vec<_>>(), vec![pid]);

    let (tx, rx) = std::sync::mpsc::channel();
    let waiter_path = path.clone();
    let waiter = std::thread::spawn(move || {
        let refused = ImageLock::acquire(&waiter_path, Access::READ).is_err();
        tx.send(refused).unwrap();
        let backoff = Backoff::default().with_timeout(Duration::from_secs(30));
        ImageLock::acquire_wait(&waiter_path, Access::READ, &LockOptions::default(), &backoff)
    });
    assert!(rx.recv().unwrap(), "the waiter was refused while the holder lived");
    let status = helper.kill().expect("SIGKILL and reap");
    assert!(!status.success());
    let guard = waiter.join().unwrap().expect("the waiter gets in once the holder is gone");

    assert_eq!(held_from_outside(&path), set(Access::READ), "only the waiter's bytes remain");
    let st = inspect(&[&path]).remove(0).unwrap();
    assert!(st.holders.iter().all(|h| h.pid == std::process::id()), "{:?}", st.holders);
    assert!(!st.holders.iter().any(|h| h.pid == pid));
    drop(guard);
    assert!(held_from_outside(&path).is_empty());
}

#[test]
fn two_guards_in_one_process_see_each_other() {
    let _serial = common::serial();
    let (_dir, path) = image();
    let first = ImageLock::acquire(&path, Access::WRITE).unwrap();
    let err = ImageLock::acquire(&path, Access::WRITE).unwrap_err();
    let c = err.conflict().unwrap();
    // QEMU's first check for WRITE is byte 200 (free: WRITE shares consistent read), the next
    // one 201, which the first guard holds.
    assert_eq!(c.reason, ConflictReason::Check(Check { perm: Perm::WRITE, shared: false }));
    assert_eq!(c.qemu_message(), "Failed to get \"write\" lock");
    let me = &c.holders[0];
    assert_eq!((me.pid, me.fd), (std::process::id(), Some(first.file().as_raw_fd() as u32)));
    drop(first);
    let a = ImageLock::acquire(&path, Access::READ).unwrap();
    let b = ImageLock::acquire(&path, Access::READ).expect("two readers share");
    assert_eq!(held_from_outside(&path), set(Access::READ));
    drop((a, b));
}

#[test]
fn bad_input_gives_typed_errors_not_panics() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("missing.img");
    assert!(matches!(ImageLock::acquire(&missing, Access::READ), Err(Error::NotFound { .. })));
    assert!(matches!(ImageLock::acquire(d, Access::READ), Err(Error::IsADirectory { .. })));

    // A path through a regular file: ENOTDIR, reported with the C library's text.
    let file = d.join("file");
    fs::write(&file, b"").unwrap();
    let err = ImageLock::acquire(file.join("x"), Access::READ).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("Could not open '{}': Not a directory", file.join("x").display()));

    // Mode 000: refused to an ordinary user (see the unprivileged test), but root bypasses file
    // modes, so as root the acquire succeeds; both are correct.
    let locked = d.join("mode000.img");
    fs::write(&locked, b"").unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let r = ImageLock::acquire(&locked, Access::READ);
    if common::is_root() {
        assert!(r.is_ok(), "{r:?}");
    } else {
        assert!(matches!(r, Err(Error::PermissionDenied { .. })), "{r:?}");
    }

    // A FIFO must neither hang the open nor be locked.
    let fifo = d.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = ImageLock::acquire(&fifo, Access::READ).unwrap_err();
    assert!(matches!(err, Error::NotAnImage { kind: "fifo", .. }), "{err:?}");
    let err = ImageLock::acquire("/dev/null", Access::READ).unwrap_err();
    assert!(matches!(err, Error::NotAnImage { kind: "character device", .. }), "{err:?}");

    // Inspection fails per path, not for the whole batch.
    let good = d.join("good.img");
    fs::write(&good, b"").unwrap();
    let out = inspect(&[missing.as_path(), good.as_path(), fifo.as_path()]);
    assert!(matches!(out[0], Err(Error::NotFound { .. })));
    assert!(out[1].as_ref().is_ok_and(|s| s.others.held.is_empty()));
    assert!(matches!(out[2], Err(Error::NotAnImage { .. })));
}

/// An ordinary user gets `PermissionDenied` on an unreadable image, and sees a root holder's
/// bytes without being able to name it (its fdinfo is unreadable): "holder unknown", no error.
#[test]
fn an_unprivileged_user_gets_permission_denied_and_unknown_holders() {
    let _serial = common::serial();
    if !common::root_or_skip("start a helper as user nobody") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let denied = dir.path().join("denied.img");
    fs::write(&denied, b"").unwrap();
    fs::set_permissions(&denied, fs::Permissions::from_mode(0o600)).unwrap();
    let held = dir.path().join("held.img");
    fs::write(&held, b"").unwrap();
    fs::set_permissions(&held, fs::Permissions::from_mode(0o644)).unwrap();
    let _root_holder = ImageLock::acquire(&held, Access::WRITE).unwrap();

    let helper = Helper::start_as("unprivileged", &[paths_env(&[&denied, &held])], Some(65534));
    assert_eq!(
        helper.lines(),
        vec!["denied: true", "held: 100 101 103 | 201 203", "holders: 0", "unidentified: true"]
    );
    helper.finish();
}

#[test]
fn inspect_names_the_holders_of_many_images_in_one_call() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let p: Vec<PathBuf> = (0..4).map(|i| dir.path().join(format!("{i}.img"))).collect();
    p.iter().for_each(|p| fs::write(p, b"").unwrap());
    let mut a = hold(&[&p[0], &p[1]], Access::WRITE);
    let mut b = hold(&[&p[1], &p[2]], Access::FORCE_SHARE);
    let out: Vec<_> = inspect(&p).into_iter().map(Result::unwrap).collect();
    let pids = |i: usize| {
        let mut v: Vec<u32> = out[i].holders.iter().map(|h| h.pid).collect();
        v.sort_unstable();
        v
    };
    let mut both = vec![a.pid(), b.pid()];
    both.sort_unstable();
    assert_eq!(pids(0), vec![a.pid()]);
    assert_eq!(pids(1), both);
    assert_eq!(pids(2), vec![b.pid()]);
    assert_eq!(pids(3), Vec::<u32>::new());
    assert_eq!(out[1].others.held, set(Access::WRITE).union(set(Access::FORCE_SHARE)));
    assert_eq!(out[2].others.held, set(Access::FORCE_SHARE));
    assert_eq!(out[2].verdict(Access::WRITE), Verdict::Granted);
    let exclusive = Access::new(Perm::empty(), Perm::empty());
    assert_eq!(
        out[2].verdict(exclusive),
        Verdict::Conflict(Check { perm: Perm::CONSISTENT_READ, shared: true })
    );
    assert!(a.release().unwrap().success());
    assert!(b.release().unwrap().success());
}

#[test]
fn foreign_locks_are_reported_as_such() {
    let _serial = common::serial();
    let (_dir, path) = image();
    let raw = Raw::open(&path);
    // A write lock on a protocol byte: the lock phase fails on it, as QEMU's does (V21).
    raw.write_lock(101, 1);
    let st = inspect(&[&path]).remove(0).unwrap();
    assert_eq!(st.others.write_locked, LockSet::new(Perm::WRITE, Perm::empty()));
    assert!(
        st.foreign.iter().any(|f| f.range.write && f.range.start == 101 && f.pid == Some(std::process::id()))
    );
    assert_eq!(st.verdict(Access::WRITE), Verdict::LockByte(101));
    let err = ImageLock::acquire(&path, Access::WRITE).unwrap_err();
    assert_eq!(err.to_string().lines().next(), Some("Failed to lock byte 101"));
    assert_eq!(err.to_string().lines().nth(1).map(|l| l.starts_with("Held by")), Some(true), "{err}");

    // libvirt's byte 0: foreign, but in nobody's way.
    raw.unlock_all();
    raw.read_lock(0, 1);
    let st = inspect(&[&path]).remove(0).unwrap();
    assert!(st.others.held.is_empty());
    assert_eq!(st.foreign.len(), 1, "{:?}", st.foreign);
    assert!(st.foreign[0].reason.contains("libvirt"));
    assert!(st.presets.iter().all(|(_, v)| *v == Verdict::Granted));

    // A whole-file read lock (another VMM): covers every protocol byte.
    raw.unlock_all();
    raw.read_lock(0, 0);
    let st = inspect(&[&path]).remove(0).unwrap();
    assert_eq!(st.others.held, LockSet::new(Perm::LEGACY_ALL, Perm::LEGACY_ALL));
    assert!(st.foreign.iter().any(|f| f.reason.contains("whole-file")), "{:?}", st.foreign);
    drop(raw);

    // POSIX read locks on 101 and 201 in another process (V24): seen, and named by pid.
    let mut helper = FakeQemu::builder(&path)
        .raw([RawLock::byte(101).posix(), RawLock::byte(201).posix()])
        .spawn()
        .unwrap();
    let st = inspect(&[&path]).remove(0).unwrap();
    assert_eq!(st.others.held, LockSet::new(Perm::WRITE, Perm::WRITE));
    let [h] = &st.holders[..] else { panic!("{:?}", st.holders) };
    assert_eq!((h.pid, h.kind), (helper.pid(), LockKind::Posix));
    let err = ImageLock::acquire(&path, Access::INFO).unwrap_err();
    assert_eq!(err.conflict().unwrap().qemu_message(), "Failed to get shared \"write\" lock");
    assert_eq!(err.conflict().unwrap().holders[0].pid, helper.pid());
    assert!(helper.release().unwrap().success());
}

#[test]
fn the_posix_fallback_interoperates_with_an_ofd_holder_in_another_process() {
    let _serial = common::serial();
    let (_dir, path) = image();
    let posix = LockOptions::default().with_force_posix(true).with_locking(Locking::On);
    let mut helper = hold(&[&path], Access::WRITE);
    let err = ImageLock::acquire_with(&path, Access::READ, &posix).unwrap_err();
    assert_eq!(err.conflict().unwrap().qemu_message(), "Failed to get shared \"write\" lock");
    assert_eq!(err.conflict().unwrap().holders[0].pid, helper.pid());
    let guard = ImageLock::acquire_with(&path, Access::FORCE_SHARE, &posix).expect("force-share");
    assert_eq!(guard.lock_kind(), Some(LockKind::Posix));
    // Inspect from another process: opening and closing the image here would drop our POSIX
    // locks (the fallback's known flaw, docs/protocol.md §7 pitfall 1).
    let seen = Helper::start("inspect", &[paths_env(&[&path])]);
    let me = std::process::id();
    assert!(
        seen.lines().contains(&format!("holder: {me} Posix {}", set(Access::FORCE_SHARE))),
        "{:?}",
        seen.lines()
    );
    seen.finish();
    assert!(helper.release().unwrap().success());

    // And the other way round: our POSIX locks are seen by OFD probes in another process.
    drop(guard);
    let _posix_writer = ImageLock::acquire_with(&path, Access::WRITE, &posix).unwrap();
    let seen = Helper::start("inspect", &[paths_env(&[&path])]);
    assert_eq!(
        seen.lines(),
        vec![format!("held: {}", set(Access::WRITE)), format!("holder: {me} Posix {}", set(Access::WRITE))]
    );
    seen.finish();
}

#[test]
fn locking_off_takes_and_tests_nothing() {
    let _serial = common::serial();
    let (_dir, path) = image();
    let holder = Raw::open(&path);
    holder.hold(set(Access::WRITE), LockSet::EMPTY);
    let off = LockOptions::default().with_locking(Locking::Off);
    let guard = ImageLock::acquire_with(&path, Access::WRITE, &off).expect("V30: off ignores holders");
    assert_eq!(guard.lock_kind(), None);
    assert_eq!(guard.access(), Access::WRITE);
    assert!(holder.others().0.is_empty(), "nothing locked");
    guard.release().unwrap();
}

#[test]
fn legacy_graph_mod_honours_bytes_104_and_204() {
    let _serial = common::serial();
    let (_dir, path) = image();
    let legacy = LockOptions::default().with_legacy_graph_mod(true);
    let holder = Raw::open(&path);
    holder.read_lock(104, 1);
    // V20: modern QEMU ignores 104/204.
    drop(ImageLock::acquire(&path, Access::WRITE).expect("ignored by default"));
    // Presets share graph-mod, as QEMU's front ends did: legacy mode lets them in as well.
    drop(ImageLock::acquire_with(&path, Access::WRITE, &legacy).expect("presets share graph-mod"));
    // QEMU <= 6.2 semantics: an access that does not share graph-mod meets its user.
    let no_gm = Access::new(Access::WRITE.perm, Access::WRITE.shared - Perm::GRAPH_MOD);
    drop(ImageLock::acquire(&path, no_gm).expect("ignored by default"));
    let err = ImageLock::acquire_with(&path, no_gm, &legacy).unwrap_err();
    assert_eq!(err.conflict().unwrap().qemu_message(), "Failed to get shared \"change children\" lock");

    holder.unlock_all();
    holder.read_lock(204, 1);
    let gm = Access::new(Perm::CONSISTENT_READ | Perm::GRAPH_MOD, Perm::LEGACY_ALL);
    drop(ImageLock::acquire(&path, gm).expect("graph-mod is not even locked by default"));
    let err = ImageLock::acquire_with(&path, gm, &legacy).unwrap_err();
    assert_eq!(err.conflict().unwrap().qemu_message(), "Failed to get \"change children\" lock");
    holder.unlock_all();

    // A legacy access that does not share graph-mod takes 204; presets never do.
    let guard = ImageLock::acquire_with(&path, no_gm, &legacy).unwrap();
    let held = inspect(&[&path]).remove(0).unwrap().others.held;
    assert_eq!(held, LockSet::new(set(Access::WRITE).perm, set(Access::WRITE).unshared | Perm::GRAPH_MOD));
    drop(guard);
    let _guard = ImageLock::acquire_with(&path, Access::WRITE, &legacy).unwrap();
    assert_eq!(inspect(&[&path]).remove(0).unwrap().others.held, set(Access::WRITE));
}

/// The `flags:` field of `/proc/self/fdinfo/FD`, in octal as the kernel prints it.
fn fd_flags(fd: i32) -> u32 {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let line = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
    u32::from_str_radix(line.trim(), 8).unwrap()
}

#[test]
fn the_descriptor_is_read_only_and_close_on_exec() {
    let _serial = common::serial();
    let (_dir, path) = image();
    let guard = ImageLock::acquire(&path, Access::WRITE).unwrap();
    let flags = fd_flags(guard.file().as_raw_fd());
    assert_eq!(flags & 0o3, 0, "O_RDONLY: {flags:o}");
    assert_ne!(flags & 0o2000000, 0, "O_CLOEXEC: {flags:o}");
    drop(guard);
    let rw = LockOptions::default().with_write(true);
    let guard = ImageLock::acquire_with(&path, Access::WRITE, &rw).unwrap();
    let flags = fd_flags(guard.file().as_raw_fd());
    assert_eq!(flags & 0o3, 0o2, "O_RDWR only when asked: {flags:o}");
    assert_ne!(flags & 0o2000000, 0, "O_CLOEXEC: {flags:o}");
}

#[test]
fn a_child_spawned_while_a_guard_is_held_does_not_inherit_the_locks() {
    let _serial = common::serial();
    let (_dir, path) = image();
    let guard = ImageLock::acquire(&path, Access::WRITE).unwrap();
    // `cat` blocks on its stdin until we close it; spawn returns after its exec.
    let mut child = Command::new("cat").stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let st = inspect(&[&path]).remove(0).unwrap();
    assert!(st.holders.iter().all(|h| h.pid != child.id()), "{:?}", st.holders);
    let image = fs::canonicalize(&path).unwrap();
    let leaked = fs::read_dir(format!("/proc/{}/fd", child.id()))
        .unwrap()
        .flatten()
        .any(|e| fs::read_link(e.path()).is_ok_and(|t| t == image));
    assert!(!leaked, "the child has no descriptor of the image");
    drop(guard);
    assert!(held_from_outside(&path).is_empty(), "released although the child still runs");
    drop(child.stdin.take());
    child.wait().unwrap();
}
