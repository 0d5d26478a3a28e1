//! qlock-tokio on a non-local filesystem: a real GlusterFS volume mounted by two FUSE clients
//! ("host A" and "host B", qlock-testkit's `GlusterBed`). `is_local_fs` is false on FUSE, so
//! every lock call of the guard goes through tokio's blocking pool, and a cancelled call
//! lends the descriptor to a pool closure (the crate docs of `qlock-async`, "Cancellation").
//! What is held is checked from host B, through the other client and the brick, with
//! `qlock_core::inspect` (FUSE-forwarded locks are not in `/proc`, so holders have no pid).
//!
//! Without root, FUSE, network namespaces or GlusterFS these tests skip, except under
//! `CI=true`, where they fail.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::Tokio;
use qlock_async::testing::Rng;
use qlock_async::testing::scenarios::{CancelAfter, Harness, cancellation_storm, quick};

use qlock_core::{Access, Backoff, LockOptions, LockSet, Perm};
use qlock_testkit::gluster::{GlusterBed, poll_until};
use qlock_testkit::{FakeQemu, Format, FrontEnd, RawLock};
use qlock_tokio::ImageLock;

/// The tests of this binary one at a time: the descriptor counts must see no other test's.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// This process's open descriptors, less the one process-wide inotify instance that waits
/// share (made on first use and kept: not a leak).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).map_or(true, |l| l.to_string_lossy() != "anon_inode:inotify")
        })
        .count()
}

/// A 1 MiB raw image made through host A: its path on host A and on host B.
fn image(bed: &GlusterBed, name: &str) -> (PathBuf, PathBuf) {
    std::fs::write(bed.host_a().path(name), vec![0u8; 1 << 20]).unwrap();
    (bed.host_a().path(name), bed.host_b().path(name))
}

/// The protocol bytes held on `path`, as host B sees them.
fn held_seen_from(path: &Path) -> LockSet {
    qlock_core::inspect(&[path]).remove(0).expect("inspect").others.held
}

/// Whether `path` is seen free within 5 s: a close's release travels through FUSE
/// asynchronously (observed: under 2 ms), so "nothing held after the drop" must be polled.
fn freed(path: &Path) -> bool {
    poll_until(Duration::from_secs(5), Duration::from_millis(1), || {
        held_seen_from(path).is_empty().then_some(())
    })
    .is_some()
}

fn set(access: Access) -> LockSet {
    access.lock_set(Perm::ALL)
}

fn qemu_io_can_write(path: &Path) -> bool {
    let out = std::process::Command::new("qemu-io").args(["-f", "raw", "-c", "quit"]).arg(path).output();
    out.expect("qemu-io on PATH (qemu-utils)").status.success()
}

#[test]
fn guards_on_the_mount_go_through_the_pool_and_conflicts_cross_hosts() {
    let _serial = serial();
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let (on_a, on_b) = image(&bed, "conflict.img");
    let mut vm = FakeQemu::real(&on_b, FrontEnd::QemuIoRw, Format::Raw).expect("real qemu-io on host B");
    Tokio::block_on(async {
        // A real qemu-io writer on host B refuses a reader on host A, with QEMU's message; the
        // holder is on another client, so it has no pid to name.
        let err = ImageLock::acquire(&on_a, Access::READ).await.unwrap_err();
        assert!(err.to_string().starts_with("Failed to get shared \"write\" lock"), "{err}");
        assert!(err.conflict().unwrap().holders.is_empty(), "{err}");
        let mut reader = ImageLock::acquire(&on_a, Access::FORCE_SHARE).await.unwrap();
        assert!(!reader.is_local(), "a FUSE mount must not count as local");
        let err = reader.set_access(Access::READ).await.unwrap_err();
        assert!(err.is_conflict(), "{err}");
        assert_eq!(reader.access(), Access::FORCE_SHARE);
        assert_eq!(held_seen_from(&on_b), set(Access::FORCE_SHARE).union(set(Access::WRITE_SHARED)));

        // The async waiter on host A gets in once host B's qemu-io quits (polling only).
        let policy = quick().with_timeout(Duration::from_secs(30));
        let p = on_a.clone();
        let waiter = tokio::spawn(async move {
            let guard = ImageLock::acquire_wait(&p, Access::WRITE, &LockOptions::default(), &policy).await;
            (guard, Instant::now())
        });
        drop(reader);
        let quit = Instant::now();
        assert!(vm.release().unwrap().success(), "qemu-io quit");
        let (guard, at) = waiter.await.unwrap();
        let guard = guard.expect("async acquire_wait");
        eprintln!("qemu-io quit on B -> async acquire_wait on A returned after {:?}", at - quit);
        assert_eq!(held_seen_from(&on_b), set(Access::WRITE));
        assert!(!qemu_io_can_write(&on_b));
        guard.release().await.unwrap();
    });
    assert!(freed(&on_b), "{}", held_seen_from(&on_b));
}

#[test]
fn an_async_waiter_on_host_b_gets_in_when_host_a_crashes() {
    let _serial = serial();
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let (on_a, on_b) = image(&bed, "crash.img");
    let _vm = FakeQemu::builder(&on_a).front_end(FrontEnd::VmDisk, Format::Raw).spawn().unwrap();
    Tokio::block_on(async {
        let (policy, opts) =
            (Backoff::default().with_timeout(Duration::from_secs(30)), LockOptions::default());
        let mut waiter = Box::pin(ImageLock::acquire_wait(&on_b, Access::WRITE, &opts, &policy));
        assert!(tokio::time::timeout(Duration::from_millis(300), &mut waiter).await.is_err(), "got in early");
        let crashed = Instant::now();
        bed.host_a().kill_client().expect("SIGKILL host A's glusterfs");
        let guard = waiter.await.expect("async acquire_wait on host B");
        eprintln!("host A crashed -> async acquire_wait on B returned after {:?}", crashed.elapsed());
        assert!(!guard.is_local());
        guard.release().await.unwrap();
    });
}

/// Acquisitions, waits and access changes on the mount cancelled at random points (after a few
/// polls, by a timeout) while a holder on host B comes and goes; then: host B sees nothing
/// held, a real qemu-io on host B can open every image for writing, and this process has the
/// descriptors it had before.
#[test]
fn a_cancellation_storm_on_the_mount_leaks_no_lock_and_no_descriptor() {
    let _serial = serial();
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let images: Vec<(PathBuf, PathBuf)> = (0..4).map(|i| image(&bed, &format!("t{i}.img"))).collect();
    let fds_before = open_fds();
    const N: u64 = 400;
    let (done, cancelled) = cancellation_storm::<Tokio>(&images, N, &mut Rng::from_env_or_clock());
    eprintln!("storm on the gluster mount: done {done}, cancelled {cancelled}");
    // Through the pool most calls are cut before they finish; some must finish.
    assert!(cancelled > N / 4 && done >= 5, "done {done}, cancelled {cancelled}");
    for (_, on_b) in &images {
        assert!(freed(on_b), "{}: {}", on_b.display(), held_seen_from(on_b));
        assert!(qemu_io_can_write(on_b), "{}", on_b.display());
    }
    assert_eq!(open_fds(), fds_before, "descriptors leaked");
}

/// The lost-guard semantics of the crate docs on a filesystem where they apply: access changes
/// on one guard, each cancelled after a random number of polls or by a timeout, while a holder
/// on host B refuses random bytes. After each, once the pool has settled: the guard is not
/// lost, holds its old access or its new one (never less), and host B sees exactly those bytes
/// and the holder's. While a cancelled call's closure still runs, `access()` is the old one.
#[test]
fn cancelled_access_changes_on_the_mount_keep_the_old_or_the_new_access() {
    let _serial = serial();
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let (on_a, on_b) = image(&bed, "s.img");
    let mut rng = Rng::from_env_or_clock();
    let refusals = [
        vec![RawLock::byte(201)],
        vec![RawLock::byte(201), RawLock::byte(203)],
        vec![RawLock::byte(200)],
        vec![RawLock::byte(203)],
    ];
    let refused = |locks: &[RawLock]| {
        let mut s = LockSet::EMPTY;
        locks.iter().for_each(|l| s.add_byte(l.start));
        s
    };
    let mut which = 1;
    let mut foreign = FakeQemu::builder(&on_b).raw(refusals[which].clone()).spawn().unwrap();
    let fds_before = open_fds();
    let mut guard = Tokio::block_on(ImageLock::acquire(&on_a, Access::FORCE_SHARE)).unwrap();
    let (mut kept, mut changed, mut cancelled, mut away, mut parked) = (0, 0, 0, 0, 0);
    const N: u64 = 60;
    for i in 0..N {
        if rng.below(3) == 0 {
            which = rng.below(refusals.len() as u64) as usize;
            foreign.set_raw(&refusals[which]).unwrap();
        }
        // A descriptor parked by the last cancelled call comes back with the state its closure
        // reached, which `access()` does not know until then: take it back first, so `old` is
        // the state this call starts from.
        if guard.file().is_none() {
            let same = guard.access();
            let _ = Tokio::block_on(guard.set_access(same));
        }
        let old = guard.access();
        let new = Access::PRESETS[rng.below(Access::PRESETS.len() as u64) as usize].access;
        let (op, polls) = (rng.below(3), [1, 1, 2, 3, 5][rng.below(5) as usize]);
        let wait = quick().with_timeout(Duration::from_micros(rng.below(3000)));
        let timeout = Duration::from_micros(rng.below(2000));
        let rt = runtime();
        let done = rt.block_on(async {
            match op {
                0 => CancelAfter { fut: Box::pin(guard.set_access(new)), polls }.await.is_some(),
                2 => CancelAfter { fut: Box::pin(guard.wait_for(new, &wait)), polls }.await.is_some(),
                _ => tokio::time::timeout(timeout, guard.set_access(new)).await.is_ok(),
            }
        });
        let was_away = !done && guard.file().is_none();
        if !done {
            cancelled += 1;
        }
        // The descriptor may still be with the closure: the old access is reported then, and
        // the closure's outcome once it has parked the descriptor (which may be by now).
        if was_away {
            away += 1;
            let seen = guard.access();
            assert!(
                seen == old || seen == new,
                "#{i}: {seen:?} while the descriptor is away, from {old:?} to {new:?}"
            );
        }
        drop(rt); // waits for the pool: the closure has parked the descriptor by now
        // Parked, not lost: `file()` stays `None` until the guard's next call takes it back.
        assert_eq!(guard.file().is_none(), was_away, "#{i}");
        if guard.file().is_none() {
            parked += 1;
        }
        let now = guard.access();
        let case = format!("#{i}: {old:?} -> {new:?}, op {op}, polls {polls}");
        assert!(!guard.is_lost(), "{case}: lost");
        assert!(now == old || now == new, "{case}: holds {now:?}");
        assert_eq!(guard.held(), set(now), "{case}");
        assert_eq!(held_seen_from(&on_b), set(now).union(refused(&refusals[which])), "{case}");
        if now == old { kept += 1 } else { changed += 1 }
    }
    eprintln!(
        "access changes on the mount: kept {kept}, changed {changed}, cancelled {cancelled} (descriptor away at the cancel: {away}, parked after the pool settled: {parked})"
    );
    assert!(cancelled > N / 10 && kept > 0 && changed > 0, "too few of some outcome");
    // The guard's next call takes a parked descriptor back.
    let same = guard.access();
    Tokio::block_on(async { guard.set_access(same).await.unwrap() });
    assert!(guard.file().is_some());
    drop(guard);
    assert_eq!(open_fds(), fds_before, "descriptors leaked");
    drop(foreign);
    assert!(freed(&on_b), "{}", held_seen_from(&on_b));
}
