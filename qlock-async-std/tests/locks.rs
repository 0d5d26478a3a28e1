//! qlock-async-std against real processes and real files, under async-std and under smol.

#[path = "../../qlock-tokio/tests/support/mod.rs"]
mod support;

use std::future::Future;
use std::io::ErrorKind;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_io::Timer;
use futures_lite::future;
use qlock_async_std::ImageLock;
use qlock_core::{Access, Backoff, Error, LockOptions, LockSet};
use support::{QemuIo, Rng, child_report, held_from_another_process, image, qemu_io_can_write, spawn_child};

/// Runs `test` to completion under async-std, then under smol.
fn on_both_runtimes<F: Future<Output = ()>>(test: impl Fn(&'static str) -> F) {
    async_std::task::block_on(test("async-std"));
    smol::block_on(test("smol"));
}

fn block_on<T>(runtime: &str, f: impl Future<Output = T>) -> T {
    match runtime {
        "smol" => smol::block_on(f),
        _ => async_std::task::block_on(f),
    }
}

fn quick() -> Backoff {
    Backoff { initial: Duration::from_micros(200), max: Duration::from_millis(5), ..Backoff::default() }
}

/// `Some(output)` if `fut` completes within `d`.
async fn within<T>(d: Duration, fut: impl Future<Output = T>) -> Option<T> {
    future::or(async { Some(fut.await) }, async {
        Timer::after(d).await;
        None
    })
    .await
}

/// Waits until every closure handed to the pool has finished (cancelled acquires included).
async fn pool_settled() {
    let deadline = Instant::now() + Duration::from_secs(30);
    while qlock_async_std::in_flight() > 0 {
        assert!(Instant::now() < deadline, "pool closures never finished");
        Timer::after(Duration::from_millis(1)).await;
    }
}

/// Child roles run by re-executing this binary (see `support::spawn_child`).
#[test]
fn child_process() {
    match std::env::var(support::ROLE).as_deref() {
        Ok("probe") => support::probe_role(),
        Ok("contend") => block_on(&std::env::var("QLOCK_RT").unwrap(), contend_role()),
        _ => {}
    }
}

/// Loops on `write` for one image, checking through the oracle file that it is alone.
async fn contend_role() {
    let path = std::env::var("QLOCK_IMAGE").unwrap();
    let oracle = std::env::var("QLOCK_ORACLE").unwrap();
    let iters: u32 = std::env::var("QLOCK_ITERS").unwrap().parse().unwrap();
    let backoff = Backoff { initial: Duration::from_micros(500), max: Duration::from_millis(20), ..quick() }
        .with_timeout(Duration::from_secs(60));
    let me = std::process::id().to_string();
    let (mut done, mut overlaps) = (0, 0);
    for _ in 0..iters {
        let guard =
            ImageLock::acquire_wait(&path, Access::WRITE, &LockOptions::default(), &backoff).await.unwrap();
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&oracle) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => overlaps += 1,
            Err(e) => panic!("{e}"),
        }
        std::fs::write(&oracle, &me).unwrap();
        future::yield_now().await;
        if std::fs::read_to_string(&oracle).unwrap() != me {
            overlaps += 1;
        }
        std::fs::remove_file(&oracle).unwrap();
        guard.release().await.unwrap();
        done += 1;
    }
    println!("QLOCK:done {done} overlaps {overlaps}");
}

#[test]
fn acquire_conflicts_name_the_holder_and_access_changes_follow_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "a.img");
    on_both_runtimes(|_| async {
        let vm = QemuIo::hold(&path, false);
        let err = ImageLock::acquire(&path, Access::READ).await.unwrap_err();
        assert!(err.to_string().starts_with("Failed to get shared \"write\" lock"), "{err}");
        assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
        let err = ImageLock::try_acquire(&path, Access::READ, &LockOptions::default()).await.unwrap_err();
        assert!(err.conflict().unwrap().holders.is_empty());
        let mut reader = ImageLock::acquire(&path, Access::FORCE_SHARE).await.unwrap();
        let err = reader.set_access(Access::READ).await.unwrap_err();
        assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
        assert_eq!(reader.access(), Access::FORCE_SHARE);
        vm.quit();
        reader.set_access(Access::READ).await.unwrap();
        assert!(!qemu_io_can_write(&path));
        reader.release().await.unwrap();
        assert!(qemu_io_can_write(&path));
        assert!(qlock_async_std::inspect([&path]).await.remove(0).unwrap().others.held.is_empty());
    });
}

#[test]
fn a_waiter_gets_in_when_the_holder_quits_or_is_killed_and_the_hint_cuts_the_sleep() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "w.img");
    // Without the inotify hint this waiter would sleep 30-60 s between attempts.
    let slow =
        Backoff { initial: Duration::from_secs(60), max: Duration::from_secs(60), ..Backoff::default() };
    let opts = LockOptions::default();
    on_both_runtimes(|_| async {
        for kill in [false, true] {
            let vm = QemuIo::hold(&path, false);
            let mut waiter = Box::pin(ImageLock::acquire_wait(&path, Access::WRITE, &opts, &slow));
            // The holder is alive: the waiter must still be waiting.
            assert!(within(Duration::from_millis(100), &mut waiter).await.is_none());
            if kill {
                vm.kill()
            } else {
                vm.quit()
            }
            let guard = within(Duration::from_secs(20), waiter).await.expect("hint missed").unwrap();
            let (held, pids) = held_from_another_process(&path);
            assert_eq!(held.to_string(), "100 101 103 | 201 203");
            assert_eq!(pids, [std::process::id()]);
            drop(guard);
            assert!(held_from_another_process(&path).0.is_empty());
        }
    });
}

#[test]
fn an_expiring_deadline_names_the_holders_and_leaves_nothing_held() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "d.img");
    let policy = quick().with_timeout(Duration::from_millis(150));
    let opts = LockOptions::default();
    on_both_runtimes(|_| async {
        let vm = QemuIo::hold(&path, false);
        let err = ImageLock::acquire_wait(&path, Access::WRITE, &opts, &policy).await.unwrap_err();
        assert!(matches!(err, Error::TimedOut { .. }), "{err}");
        assert_eq!(err.conflict().unwrap().holders.iter().map(|h| h.pid).collect::<Vec<_>>(), [vm.pid()]);
        assert_eq!(held_from_another_process(&path).1, [vm.pid()]);
        let mut reader = ImageLock::acquire(&path, Access::FORCE_SHARE).await.unwrap();
        let err = reader.wait_for(Access::READ, &policy).await.unwrap_err();
        assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
        assert_eq!(reader.access(), Access::FORCE_SHARE);
        vm.kill();
        assert_eq!(held_from_another_process(&path), (reader.held(), vec![std::process::id()]));
        reader.wait_for(Access::READ, &policy).await.unwrap();
        assert_eq!(held_from_another_process(&path).0.to_string(), "100 | 201 203");
        drop(reader);
        assert!(held_from_another_process(&path).0.is_empty());
    });
}

/// Polls `fut` at most `polls` times, yielding in between, then drops it.
struct CancelAfter<F> {
    fut: Pin<Box<F>>,
    polls: u64,
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

#[test]
fn cancellation_torture_leaks_no_lock() {
    const N: u64 = 1500; // per runtime
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..4).map(|i| image(dir.path(), &format!("t{i}.img"))).collect();
    let (opts, fast) = (LockOptions::default(), quick());
    on_both_runtimes(|runtime| {
        let (paths, opts, fast) = (&paths, &opts, &fast);
        async move {
            let mut rng = Rng::from_env_or_clock();
            let (mut done, mut cancelled) = (0u64, 0u64);
            let mut foreign = Some(qlock_core::ImageLock::acquire(&paths[0], Access::WRITE).unwrap());
            let mut kept: Vec<ImageLock> = Vec::new();
            for _ in 0..N {
                if rng.below(50) == 0 {
                    foreign = match foreign {
                        Some(_) => None,
                        None => qlock_core::ImageLock::acquire(&paths[0], Access::WRITE).ok(),
                    };
                }
                let path = &paths[rng.below(4) as usize];
                let access = Access::PRESETS[rng.below(Access::PRESETS.len() as u64) as usize].access;
                let polls = rng.below(12);
                let outcome: Option<Result<Option<ImageLock>, Error>> = match rng.below(4) {
                    0 => CancelAfter { fut: Box::pin(ImageLock::acquire(path, access)), polls }
                        .await
                        .map(|r| r.map(Some)),
                    1 => {
                        let f = ImageLock::acquire_wait(path, access, opts, fast);
                        CancelAfter { fut: Box::pin(f), polls }.await.map(|r| r.map(Some))
                    }
                    2 => {
                        let f = ImageLock::acquire_wait(path, access, opts, fast);
                        within(Duration::from_micros(rng.below(3000)), f).await.map(|r| r.map(Some))
                    }
                    _ => match kept.pop() {
                        Some(mut g) => {
                            let r = CancelAfter { fut: Box::pin(g.wait_for(access, fast)), polls }.await;
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
            eprintln!("{runtime}: done {done}, cancelled {cancelled}");
            assert!(cancelled > N / 4 && done > N / 10, "done {done}, cancelled {cancelled}");
            pool_settled().await;
            for path in paths {
                assert_eq!(held_from_another_process(path), (LockSet::EMPTY, vec![]), "{}", path.display());
                assert!(qemu_io_can_write(path));
            }
        }
    });
}

#[test]
fn contending_processes_never_overlap_and_all_finish() {
    const ITERS: u32 = 40;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "c.img");
    let oracle = dir.path().join("oracle");
    let children: Vec<_> = ["async-std", "smol", "async-std", "smol"]
        .iter()
        .map(|rt| {
            spawn_child(
                "contend",
                &[
                    ("QLOCK_RT", rt.to_string()),
                    ("QLOCK_IMAGE", path.display().to_string()),
                    ("QLOCK_ORACLE", oracle.display().to_string()),
                    ("QLOCK_ITERS", ITERS.to_string()),
                ],
            )
        })
        .collect();
    for child in children {
        assert_eq!(child_report(child), [format!("done {ITERS} overlaps 0")]);
    }
    assert!(held_from_another_process(&path).0.is_empty());
}
