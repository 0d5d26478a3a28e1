//! The async crates' test scenarios, written once, generic over a [`Harness`]: the few things a
//! scenario needs from a runtime (run to completion, spawn, time out, the crate's `inspect`).
//!
//! Each async crate's `tests/locks.rs` implements [`Harness`] for its runtime(s) and calls
//! [`scenario_tests!`](crate::scenario_tests), which defines one `#[test]` per scenario running
//! it on every harness named, in order, plus the `child_role` test that the child roles
//! (`inspect`, `contend`) run in. The guard under test is
//! [`AsyncImageLock<H::R>`](crate::AsyncImageLock), which is exactly the crate's `ImageLock`. Holders are real processes (a real `qemu-io`, other test processes), and what is
//! held is checked from yet another process ([`held_from_another_process`]).

use std::future::Future;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use qlock_core::{Access, Backoff, Error, ImageStatus, LockOptions, LockSet, Perm};
use qlock_testkit::{FakeQemu, RawLock};

use qlock_testkit::reexec;

use super::{
    Rng, held_from_another_process, holders_from_another_process, image, qemu_io_can_write, qemu_io_rw,
};
use crate::{AsyncImageLock, Runtime};

/// One async runtime, as the scenarios drive it.
pub trait Harness {
    /// What the crate under test plugs into [`AsyncImageLock`] for this runtime.
    type R: Runtime;
    /// The name the `contend` child role takes in `QLOCK_RT`.
    const NAME: &'static str;

    /// Runs `fut` to completion on the calling thread, and returns once every closure it handed
    /// to the blocking pool has finished too (cancelled acquires included), so that what is
    /// held afterwards is final.
    fn block_on<T>(fut: impl Future<Output = T>) -> T;

    /// Runs `fut` as a task of the runtime (on its worker threads where it has some).
    fn spawn<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> impl Future<Output = T>;

    /// `Some(output)` if `fut` completes within `d` on the runtime's own timer, else drops it.
    fn timeout<T>(d: Duration, fut: impl Future<Output = T>) -> impl Future<Output = Option<T>>;

    /// The crate's own `inspect` of one image.
    fn inspect(path: &Path) -> impl Future<Output = Result<ImageStatus, Error>>;
}

/// Defines the scenarios as `#[test]`s, each running on every harness given, in order, and the
/// `child_role` test the child roles run in. Invoke it once, at the root of a test file.
#[macro_export]
macro_rules! scenario_tests {
    ($($h:ty),+ $(,)?) => {
        /// Not a test: child roles run by re-executing this binary (`qlock_testkit::reexec`).
        #[test]
        fn child_role() {
            $crate::testing::scenarios::child_role(&[$((<$h as $crate::testing::scenarios::Harness>::NAME,
                $crate::testing::scenarios::contend_role::<$h> as fn())),+]);
        }

        $crate::scenario_tests!(@each [$($h),+]
            acquire_conflicts_name_the_holder_and_access_changes_follow_qemu,
            a_waiter_gets_in_when_the_holder_quits_or_is_killed,
            the_inotify_hint_ends_a_long_backoff_sleep_when_the_holder_exits,
            an_expiring_deadline_names_the_holders_and_leaves_nothing_held,
            a_cancelled_access_change_keeps_the_old_locks,
            the_chain_guard_locks_every_node_and_a_cancelled_acquire_leaks_none,
        );

        $crate::scenario_tests!(@shared [$($h),+]
            random_cancellations_keep_the_old_or_the_new_access = STORM,
            cancellation_torture_leaks_no_lock = TORTURE,
        );

        #[test]
        fn contending_processes_never_overlap_and_all_finish() {
            let _serial = $crate::testing::serial();
            $crate::testing::scenarios::contending_processes_never_overlap_and_all_finish(&[
                $(<$h as $crate::testing::scenarios::Harness>::NAME),+
            ]);
        }
    };
    // One test per scenario, running it on each harness in turn.
    (@each $hs:tt $($name:ident),+ $(,)?) => {
        $($crate::scenario_tests!(@one $hs $name);)+
    };
    (@one [$($h:ty),+] $name:ident) => {
        #[test]
        fn $name() {
            let _serial = $crate::testing::serial();
            $($crate::testing::scenarios::$name::<$h>();)+
        }
    };
    // One test per scenario of `n` steps, the constant `$total` shared out among the harnesses.
    (@shared $hs:tt $($name:ident = $total:ident),+ $(,)?) => {
        $($crate::scenario_tests!(@split $hs $name $total);)+
    };
    (@split [$($h:ty),+] $name:ident $total:ident) => {
        #[test]
        fn $name() {
            let _serial = $crate::testing::serial();
            let runs = [$(<$h as $crate::testing::scenarios::Harness>::NAME),+].len() as u64;
            $($crate::testing::scenarios::$name::<$h>($crate::testing::scenarios::$total / runs);)+
        }
    };
}

/// Cancelled-or-not acquisitions in the torture, shared out among a crate's runtimes.
pub const TORTURE: u64 = 3000;

type Lock<H> = AsyncImageLock<<H as Harness>::R>;

/// A backoff for tests: 200 us first, at most 5 ms between attempts.
pub fn quick() -> Backoff {
    Backoff::default().with_initial(Duration::from_micros(200)).with_max(Duration::from_millis(5))
}

/// The body of `child_role`: runs the role this process was started for, if any: the
/// testkit's standard ones (`inspect`), and `contend` on the runtime named by `QLOCK_RT` among
/// `runtimes`.
pub fn child_role(runtimes: &[(&str, fn())]) {
    reexec::run_roles(|role, _| {
        assert_eq!(role, "contend", "unknown role");
        let rt = std::env::var("QLOCK_RT").unwrap();
        let (_, contend) = runtimes.iter().find(|(name, _)| *name == rt).expect("unknown QLOCK_RT");
        contend()
    });
}

/// The `contend` role: loops on `write` for one image, checking through the oracle file that it
/// is alone while it holds.
pub fn contend_role<H: Harness>() {
    let path = std::env::var("QLOCK_IMAGE").unwrap();
    let oracle = std::env::var("QLOCK_ORACLE").unwrap();
    let iters: u32 = std::env::var("QLOCK_ITERS").unwrap().parse().unwrap();
    let backoff = quick()
        .with_initial(Duration::from_micros(500))
        .with_max(Duration::from_millis(20))
        .with_timeout(Duration::from_secs(60));
    let me = std::process::id().to_string();
    let (done, overlaps) = H::block_on(async {
        let (mut done, mut overlaps) = (0, 0);
        for _ in 0..iters {
            let guard = Lock::<H>::acquire_wait(&path, Access::WRITE, &LockOptions::default(), &backoff)
                .await
                .unwrap();
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&oracle) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => overlaps += 1,
                Err(e) => panic!("{e}"),
            }
            std::fs::write(&oracle, &me).unwrap();
            futures_lite::future::yield_now().await;
            if std::fs::read_to_string(&oracle).unwrap() != me {
                overlaps += 1;
            }
            std::fs::remove_file(&oracle).unwrap();
            guard.release().await.unwrap();
            done += 1;
        }
        (done, overlaps)
    });
    reexec::say(&format!("done {done} overlaps {overlaps}"));
}

/// Conflicts name a real `qemu-io`; a force-share reader cannot upgrade while it writes, and
/// can once it quits.
pub fn acquire_conflicts_name_the_holder_and_access_changes_follow_qemu<H: Harness>() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "a.img");
    H::block_on(async {
        let mut vm = qemu_io_rw(&path);
        let err = Lock::<H>::acquire(&path, Access::READ).await.unwrap_err();
        assert!(err.to_string().starts_with("Failed to get shared \"write\" lock"), "{err}");
        assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
        let quiet = LockOptions::default().with_find_holders(false);
        let err = Lock::<H>::acquire_with(&path, Access::READ, &quiet).await.unwrap_err();
        assert!(err.conflict().unwrap().holders.is_empty());
        // A force-share reader gets in, and cannot upgrade while the VM writes.
        let mut reader = Lock::<H>::acquire(&path, Access::FORCE_SHARE).await.unwrap();
        assert!(reader.is_local());
        let err = reader.set_access(Access::READ).await.unwrap_err();
        assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
        assert_eq!(reader.access(), Access::FORCE_SHARE);
        assert!(vm.release().unwrap().success(), "qemu-io quit");
        reader.set_access(Access::READ).await.unwrap();
        assert!(!qemu_io_can_write(&path));
        reader.release().await.unwrap();
        assert!(qemu_io_can_write(&path));
        assert!(H::inspect(&path).await.unwrap().others.held.is_empty());
    });
}

/// How a holder goes away.
#[derive(Clone, Copy, Debug)]
enum End {
    /// `quit` at its prompt: it closes the image itself.
    Quit,
    /// SIGKILL: the kernel closes the image for it.
    Kill,
}

fn end(mut vm: qlock_testkit::FakeQemu, how: End) {
    match how {
        End::Quit => assert!(vm.release().unwrap().success(), "qemu-io quit"),
        End::Kill => {
            vm.kill().unwrap();
        }
    }
}

/// A waiter spawned as a task with a quick backoff waits while the holder lives, and gets in
/// (holding exactly its bytes, alone) once the holder quits or is killed.
pub fn a_waiter_gets_in_when_the_holder_quits_or_is_killed<H: Harness>() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "w.img");
    for how in [End::Quit, End::Kill] {
        let guard = H::block_on(async {
            let vm = qemu_io_rw(&path);
            let policy = quick().with_timeout(Duration::from_secs(30));
            let p = path.clone();
            let mut waiter = Box::pin(H::spawn(async move {
                Lock::<H>::acquire_wait(&p, Access::WRITE, &LockOptions::default(), &policy).await
            }));
            // The holder is alive: the waiter must still be waiting.
            assert!(H::timeout(Duration::from_millis(100), &mut waiter).await.is_none(), "{how:?}");
            end(vm, how);
            waiter.await.unwrap()
        });
        held_alone_then_nothing(&path, guard, "100 101 103 | 201 203", how);
    }
}

/// From another process: `guard` holds exactly `bytes` on `path`, with this process the only
/// holder; once it is dropped, nothing is held.
fn held_alone_then_nothing<T>(path: &Path, guard: T, bytes: &str, case: End) {
    let (held, pids) = held_from_another_process(path);
    assert_eq!(held.to_string(), bytes, "{case:?}");
    // Another holder here is most often a child some other test forked (it shares every
    // description until it execs): name it.
    let who: Vec<String> =
        pids.iter().map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default()).collect();
    assert_eq!(pids, [std::process::id()], "{case:?}: {who:?}");
    drop(guard);
    assert!(held_from_another_process(path).0.is_empty(), "{case:?}");
}

/// Without the inotify hint these waiters would sleep 30-60 s between attempts; the scenario
/// allows 20 s after the holder quits (then: is killed).
pub fn the_inotify_hint_ends_a_long_backoff_sleep_when_the_holder_exits<H: Harness>() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "h.img");
    let slow = Backoff::default().with_initial(Duration::from_secs(60)).with_max(Duration::from_secs(60));
    let opts = LockOptions::default();
    for (how, access, bytes) in
        [(End::Quit, Access::WRITE, "100 101 103 | 201 203"), (End::Kill, Access::READ, "100 | 201 203")]
    {
        H::block_on(async {
            let vm = qemu_io_rw(&path);
            let mut waiter = Box::pin(Lock::<H>::acquire_wait(&path, access, &opts, &slow));
            assert!(H::timeout(Duration::from_millis(100), &mut waiter).await.is_none(), "{how:?}");
            end(vm, how);
            let guard = H::timeout(Duration::from_secs(20), waiter).await.expect("hint missed").unwrap();
            assert_eq!(guard.access(), access);
            held_alone_then_nothing(&path, guard, bytes, how);
        });
    }
}

/// Waits that time out name the holders, hold nothing (acquire) or keep the old access
/// (`wait_for`).
pub fn an_expiring_deadline_names_the_holders_and_leaves_nothing_held<H: Harness>() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "d.img");
    let policy = quick().with_timeout(Duration::from_millis(150));
    let opts = LockOptions::default();
    H::block_on(async {
        let mut vm = qemu_io_rw(&path);
        let err = Lock::<H>::acquire_wait(&path, Access::WRITE, &opts, &policy).await.unwrap_err();
        assert!(matches!(err, Error::TimedOut { .. }), "{err}");
        assert_eq!(err.conflict().unwrap().holders.iter().map(|h| h.pid).collect::<Vec<_>>(), [vm.pid()]);
        assert!(err.to_string().contains("\"write\" lock"), "{err}");
        // Only the VM holds anything; a guard's wait_for that times out keeps its old access.
        assert_eq!(held_from_another_process(&path).1, [vm.pid()]);
        let mut reader = Lock::<H>::acquire(&path, Access::FORCE_SHARE).await.unwrap();
        let err = reader.wait_for(Access::READ, &policy).await.unwrap_err();
        assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
        assert_eq!(reader.access(), Access::FORCE_SHARE);
        vm.kill().unwrap();
        assert_eq!(held_from_another_process(&path), (reader.held(), vec![std::process::id()]));
        reader.wait_for(Access::READ, &policy).await.unwrap();
        assert_eq!(held_from_another_process(&path).0.to_string(), "100 | 201 203");
        drop(reader);
        assert!(held_from_another_process(&path).0.is_empty());
    });
}

/// Polls `fut` at most `polls` times, yielding in between, then drops it: `None` if it was
/// dropped unfinished.
pub struct CancelAfter<F> {
    /// The future under test.
    pub fut: Pin<Box<F>>,
    /// Polls left before it is dropped.
    pub polls: u64,
}

impl<F: Future> Future for CancelAfter<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.polls == 0 {
            return Poll::Ready(None);
        }
        self.polls -= 1;
        match self.fut.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

/// `n` acquisitions, waits and access changes cancelled at random points (after a few polls,
/// by a timeout), while a foreign holder comes and goes; then, from another process: nothing
/// held, and a real `qemu-io` can open every image for writing.
pub fn cancellation_torture_leaks_no_lock<H: Harness>(n: u64) {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..4).map(|i| image(dir.path(), &format!("t{i}.img"))).collect();
    let images: Vec<_> = paths.iter().map(|p| (p.clone(), p.clone())).collect();
    let (done, cancelled) = cancellation_storm::<H>(&images, n, &mut Rng::from_env_or_clock());
    // block_on has waited for every closure still running on the pool.
    eprintln!("{}: done {done}, cancelled {cancelled}", H::NAME);
    assert!(cancelled > n / 4 && done > n / 10, "{}: done {done}, cancelled {cancelled}", H::NAME);
    for path in &paths {
        assert_eq!(held_from_another_process(path), (LockSet::EMPTY, vec![]), "{}", path.display());
        assert!(qemu_io_can_write(path));
    }
}

/// The storm of [`cancellation_torture_leaks_no_lock`], on `images` given as (the path the
/// guards open, the path the foreign holder opens): the same file, or the same file seen
/// through another client of a shared filesystem. `n` acquisitions, waits and access changes,
/// each cancelled after a random number of polls, by a random timeout, or not at all, while a
/// foreign holder of the first image comes and goes; a guard kept for an access change is
/// never lost. Returns once the pool has settled, with how many calls were done and how many
/// cancelled.
pub fn cancellation_storm<H: Harness>(images: &[(PathBuf, PathBuf)], n: u64, rng: &mut Rng) -> (u64, u64) {
    let (opts, fast) = (LockOptions::default(), quick());
    H::block_on(async {
        let (mut done, mut cancelled) = (0u64, 0u64);
        // A foreign holder on image 0 that comes and goes, so waits end at random moments.
        let mut foreign = Some(qlock_core::ImageLock::acquire(&images[0].1, Access::WRITE).unwrap());
        let mut kept: Vec<Lock<H>> = Vec::new();
        for _ in 0..n {
            if rng.below(50) == 0 {
                foreign = match foreign {
                    Some(_) => None,
                    None => qlock_core::ImageLock::acquire(&images[0].1, Access::WRITE).ok(),
                };
            }
            let path = &images[rng.below(images.len() as u64) as usize].0;
            let access = Access::PRESETS[rng.below(Access::PRESETS.len() as u64) as usize].access;
            let polls = rng.below(12);
            let outcome: Option<Result<Option<Lock<H>>, Error>> = match rng.below(4) {
                0 => CancelAfter { fut: Box::pin(Lock::<H>::acquire(path, access)), polls }
                    .await
                    .map(|r| r.map(Some)),
                1 => {
                    let f = Lock::<H>::acquire_wait(path, access, &opts, &fast);
                    CancelAfter { fut: Box::pin(f), polls }.await.map(|r| r.map(Some))
                }
                2 => {
                    let f = Lock::<H>::acquire_wait(path, access, &opts, &fast);
                    H::timeout(Duration::from_micros(rng.below(3000)), f).await.map(|r| r.map(Some))
                }
                _ => match kept.pop() {
                    Some(mut g) => {
                        let r = CancelAfter { fut: Box::pin(g.wait_for(access, &fast)), polls }.await;
                        assert!(!g.is_lost());
                        if rng.below(2) == 0 {
                            kept.push(g);
                        }
                        r.map(|r| r.map(|()| None))
                    }
                    None => None,
                },
            };
            match outcome {
                None => cancelled += 1,
                Some(Ok(Some(g))) if kept.len() < 3 && rng.below(3) == 0 => {
                    done += 1;
                    kept.push(g);
                }
                Some(_) => done += 1,
            }
            if rng.below(4) == 0 {
                kept.clear();
            }
        }
        drop(kept);
        drop(foreign);
        (done, cancelled)
    })
}

/// Access changes in the storm of [`random_cancellations_keep_the_old_or_the_new_access`],
/// shared out among a crate's runtimes; each is checked from another process.
pub const STORM: u64 = 120;

/// The guard's own bytes as another process sees them.
fn ours_from_outside(path: &Path) -> LockSet {
    let me = std::process::id();
    let holders = holders_from_another_process(path);
    holders.iter().filter(|(pid, _)| *pid == me).fold(LockSet::EMPTY, |acc, (_, b)| acc.union(*b))
}

/// Issue 8.5: another process holds bytes 201 and 203; a force-share guard's upgrade to
/// `write` (and a `wait_for` whose deadline has passed) fails its lock calls and goes on to
/// name the holders, and is dropped right there, after one poll. The guard must keep its
/// descriptor and byte 100, as another process sees once the pool has settled.
pub fn a_cancelled_access_change_keeps_the_old_locks<H: Harness>() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "x.img");
    let holder = FakeQemu::builder(&path).raw([RawLock::byte(201), RawLock::byte(203)]).spawn().unwrap();
    let now = Backoff::default().with_timeout(Duration::ZERO);
    for call in ["set_access", "wait_for"] {
        // The call is cancelled while its pool hop (the walk over /proc that names the holders)
        // is in flight. The walk takes far longer than a poll, but a preempted test thread can
        // let it finish before the first poll returns: that attempt tests nothing, so try again.
        let guard = (0..20)
            .find_map(|_| {
                H::block_on(async {
                    let mut guard = Lock::<H>::acquire(&path, Access::FORCE_SHARE).await.unwrap();
                    let first = match call {
                        "set_access" => {
                            futures_lite::future::poll_once(guard.set_access(Access::WRITE)).await
                        }
                        _ => futures_lite::future::poll_once(guard.wait_for(Access::WRITE, &now)).await,
                    };
                    first.is_none().then_some(guard)
                })
            })
            .unwrap_or_else(|| panic!("{}: {call} finished at its first poll 20 times in 20", H::NAME));
        assert!(!guard.is_lost(), "{}: {call}", H::NAME);
        assert_eq!(guard.access(), Access::FORCE_SHARE, "{}: {call}", H::NAME);
        let mut theirs = LockSet::EMPTY;
        theirs.add_byte(201);
        theirs.add_byte(203);
        let mut expected = vec![(holder.pid(), theirs), (std::process::id(), guard.held())];
        expected.sort_by_key(|(pid, _)| *pid);
        let mut seen = holders_from_another_process(&path);
        seen.sort_by_key(|(pid, _)| *pid);
        assert_eq!(seen, expected, "{}: {call}", H::NAME);
        assert_eq!(guard.held().to_string(), "100 | -", "{}: {call}", H::NAME);
        drop(guard);
        assert_eq!(ours_from_outside(&path), LockSet::EMPTY, "{}: {call}", H::NAME);
    }
}

/// A storm of access changes (`set_access`, `wait_for`) on one guard,
/// each cancelled after a random number of polls or by a random timeout, while a foreign
/// holder process changes its access now and then. After each, once the pool has settled,
/// the guard holds its old or its new access, never less, and another process sees exactly
/// those bytes held by this process.
pub fn random_cancellations_keep_the_old_or_the_new_access<H: Harness>(n: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "s.img");
    let mut rng = Rng::from_env_or_clock();
    let presets: Vec<Access> = Access::PRESETS.iter().map(|p| p.access).collect();
    let pick = |rng: &mut Rng| presets[rng.below(presets.len() as u64) as usize];
    // A foreign holder refusing to share bytes of ours at random: raw read locks on 200-203 in
    // some combination, which its handle sets whatever the guard holds.
    let refusals = [
        vec![RawLock::byte(201)],
        vec![RawLock::byte(201), RawLock::byte(203)],
        vec![RawLock::byte(200)],
        vec![RawLock::byte(203)],
    ];
    let mut foreign = FakeQemu::builder(&path).raw(refusals[1].clone()).spawn().unwrap();
    let mut guard = H::block_on(Lock::<H>::acquire(&path, Access::FORCE_SHARE)).unwrap();
    let (mut kept, mut changed, mut cancelled) = (0, 0, 0);
    for i in 0..n {
        if rng.below(3) == 0 {
            foreign.set_raw(&refusals[rng.below(refusals.len() as u64) as usize]).unwrap();
        }
        let old = guard.access();
        let new = pick(&mut rng);
        // Mostly one poll, the repro of issue 8.5: a conflict is then cancelled while it names.
        let (op, polls) = (rng.below(4), [1, 1, 1, 2, 3, 5][rng.below(6) as usize]);
        let wait = quick().with_timeout(Duration::from_micros(rng.below(3000)));
        let timeout = Duration::from_micros(rng.below(2000));
        let done = H::block_on(async {
            match op {
                0 | 1 => CancelAfter { fut: Box::pin(guard.set_access(new)), polls }.await,
                2 => CancelAfter { fut: Box::pin(guard.wait_for(new, &wait)), polls }.await,
                _ => H::timeout(timeout, guard.set_access(new)).await,
            }
            .is_some()
        });
        // Each call was polled at least once: a cancellation here is one that had started.
        if !done {
            cancelled += 1;
        }
        let now = guard.access();
        let case = format!("{} #{i}: {old:?} -> {new:?}, op {op}, polls {polls}", H::NAME);
        assert!(!guard.is_lost(), "{case}: lost");
        assert!(now == old || now == new, "{case}: holds {now:?}");
        assert_eq!(
            (guard.held(), ours_from_outside(&path)),
            (now.lock_set(Perm::ALL), now.lock_set(Perm::ALL)),
            "{case}"
        );
        if now == old { kept += 1 } else { changed += 1 }
    }
    eprintln!("{}: kept {kept}, changed {changed}, cancelled {cancelled}", H::NAME);
    assert!(cancelled > n / 10 && kept > n / 10 && changed > n / 10, "{}: too few of some outcome", H::NAME);
    drop(guard);
    assert_eq!(ours_from_outside(&path), LockSet::EMPTY);
}

/// Two processes per runtime in `runtimes` loop on `write` for one image (see
/// [`contend_role`]): none ever sees another inside, all finish, nothing is left held.
pub fn contending_processes_never_overlap_and_all_finish(runtimes: &[&str]) {
    const ITERS: u32 = 40;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "c.img");
    let oracle = dir.path().join("oracle");
    // At least three processes, alternating runtimes.
    let procs = (runtimes.len() * 2).max(3);
    let children: Vec<_> = (0..procs)
        .map(|i| {
            let env = [
                ("QLOCK_RT", runtimes[i % runtimes.len()].to_string()),
                ("QLOCK_IMAGE", path.display().to_string()),
                ("QLOCK_ORACLE", oracle.display().to_string()),
                ("QLOCK_ITERS", ITERS.to_string()),
            ];
            reexec::Child::spawn("contend", &env)
        })
        .collect();
    for child in children {
        assert_eq!(child.finish(), [format!("done {ITERS} overlaps 0")]);
    }
    assert!(held_from_another_process(&path).0.is_empty());
}

/// `top.qcow2` over `base.qcow2`, made by the real `qemu-img`.
fn chain(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img").current_dir(dir).args(args).output().unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    run(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    (dir.join("top.qcow2"), dir.join("base.qcow2"))
}

type Chain<H> = crate::AsyncChainLock<<H as Harness>::R>;

/// The async chain guard: a real `qemu-io` writing the base refuses a reader of the overlay
/// with QEMU's message and prefix, naming it; a timed-out wait names it too; once it quits,
/// the waiter holds `qemu-io -r`'s bytes on both nodes; and acquires and waits cancelled after
/// any number of polls leave nothing held on any node, as another process sees.
pub fn the_chain_guard_locks_every_node_and_a_cancelled_acquire_leaks_none<H: Harness>() {
    let dir = tempfile::tempdir().unwrap();
    let (top, base) = chain(dir.path());
    let opts = LockOptions::default();
    let mut vm =
        qlock_testkit::FakeQemu::real(&base, qlock_testkit::FrontEnd::QemuIoRw, qlock_testkit::Format::Qcow2)
            .unwrap_or_else(|e| panic!("real qemu-io: {e}"));
    H::block_on(async {
        let err = Chain::<H>::acquire(&top, Access::READ, &opts).await.unwrap_err();
        assert!(
            err.to_string().starts_with("Could not open backing file: Failed to get shared \"write\" lock"),
            "{err}"
        );
        assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
        let short = quick().with_timeout(Duration::from_millis(30));
        let err = Chain::<H>::acquire_wait(&top, Access::READ, &opts, &short).await.unwrap_err();
        assert!(matches!(err, qlock_core::graph::ChainError::TimedOut { .. }), "{err}");
        assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
    });
    for p in [&top, &base] {
        let (_, pids) = held_from_another_process(p);
        assert!(!pids.contains(&std::process::id()), "{}: the refused chain left a lock", p.display());
    }
    assert!(vm.release().unwrap().success(), "qemu-io quit");
    let (mut done, mut cancelled) = (0, 0);
    H::block_on(async {
        let guard = Chain::<H>::acquire_wait(&top, Access::READ, &opts, &quick()).await.unwrap();
        let held: Vec<String> = guard.held().iter().map(ToString::to_string).collect();
        assert_eq!(held, ["100 | 201 203", "100 | 201 203"]);
        guard.release().await.unwrap();
        for polls in 0..40 {
            let access = Access::PRESETS[polls as usize % Access::PRESETS.len()].access;
            let fast = quick();
            let r = match polls % 4 {
                0 => {
                    CancelAfter { fut: Box::pin(Chain::<H>::acquire(&top, access, &opts)), polls: polls / 4 }
                        .await
                }
                1 => {
                    let f = Chain::<H>::acquire_wait(&top, access, &opts, &fast);
                    CancelAfter { fut: Box::pin(f), polls: polls / 4 }.await
                }
                // Cut by the runtime's timer somewhere inside the pool hop.
                2 => {
                    H::timeout(Duration::from_micros(polls * 50), Chain::<H>::acquire(&top, access, &opts))
                        .await
                }
                _ => Some(Chain::<H>::acquire_wait(&top, access, &opts, &fast).await),
            };
            match r {
                None => cancelled += 1,
                Some(r) => {
                    // A cancelled acquire's pool closure may still hold its locks for a moment
                    // (this process's other description): a non-waiting acquire meets it.
                    if let Err(e) = r {
                        let me = std::process::id();
                        assert!(e.conflict().is_some_and(|c| c.holders.iter().all(|h| h.pid == me)), "{e}");
                    }
                    done += 1;
                }
            }
        }
    });
    // block_on has waited for every closure still running on the pool.
    assert!(cancelled > 0 && done > 0, "done {done}, cancelled {cancelled}");
    for p in [&top, &base] {
        assert_eq!(held_from_another_process(p), (LockSet::EMPTY, vec![]), "{}", p.display());
    }
}
