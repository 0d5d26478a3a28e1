//! qlock-tokio against real processes and real files.

mod support;

use std::future::Future;
use std::io::ErrorKind;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use qlock_core::{Access, Backoff, Error, LockOptions};
use qlock_tokio::ImageLock;
use support::{QemuIo, Rng, child_report, held_from_another_process, image, qemu_io_can_write, spawn_child};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn quick() -> Backoff {
    Backoff { initial: Duration::from_micros(200), max: Duration::from_millis(5), ..Backoff::default() }
}

/// Child roles run by re-executing this binary (see `support::spawn_child`).
#[test]
fn child_process() {
    match std::env::var(support::ROLE).as_deref() {
        Ok("probe") => support::probe_role(),
        Ok("contend") => runtime().block_on(contend_role()),
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
        tokio::task::yield_now().await;
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
    runtime().block_on(async {
        let vm = QemuIo::hold(&path, false);
        let err = ImageLock::acquire(&path, Access::READ).await.unwrap_err();
        assert!(err.to_string().starts_with("Failed to get shared \"write\" lock"), "{err}");
        assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
        let err = ImageLock::try_acquire(&path, Access::READ, &LockOptions::default()).await.unwrap_err();
        assert!(err.conflict().unwrap().holders.is_empty());
        // A force-share reader gets in, and cannot upgrade while the VM writes.
        let mut reader = ImageLock::acquire(&path, Access::FORCE_SHARE).await.unwrap();
        assert!(reader.is_local());
        let err = reader.set_access(Access::READ).await.unwrap_err();
        assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
        assert_eq!(reader.access(), Access::FORCE_SHARE);
        vm.quit();
        reader.set_access(Access::READ).await.unwrap();
        assert!(!qemu_io_can_write(&path));
        reader.release().await.unwrap();
        assert!(qemu_io_can_write(&path));
        let status = qlock_tokio::inspect([&path]).await.remove(0).unwrap();
        assert!(status.others.held.is_empty());
    });
}

#[test]
fn a_waiter_gets_in_when_the_holder_quits_or_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "w.img");
    let rt = runtime();
    for kill in [false, true] {
        let vm = QemuIo::hold(&path, false);
        let guard = rt.block_on(async {
            let policy = quick().with_timeout(Duration::from_secs(30));
            let waiter = tokio::spawn({
                let path = path.clone();
                async move {
                    ImageLock::acquire_wait(&path, Access::WRITE, &LockOptions::default(), &policy).await
                }
            });
            // The holder is alive: the waiter must still be waiting.
            let mut waiter = Box::pin(waiter);
            assert!(tokio::time::timeout(Duration::from_millis(100), &mut waiter).await.is_err());
            if kill {
                vm.kill()
            } else {
                vm.quit()
            }
            waiter.await.unwrap().unwrap()
        });
        let (held, pids) = held_from_another_process(&path);
        assert_eq!(held.to_string(), "100 101 103 | 201 203");
        assert_eq!(pids, [std::process::id()]);
        drop(guard);
        assert!(held_from_another_process(&path).0.is_empty());
    }
}

#[test]
fn the_inotify_hint_ends_a_long_backoff_sleep_when_the_holder_exits() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "h.img");
    // Without the hint the waiter would sleep 30-60 s between attempts; the test allows 20 s.
    let slow =
        Backoff { initial: Duration::from_secs(60), max: Duration::from_secs(60), ..Backoff::default() };
    let opts = LockOptions::default();
    runtime().block_on(async {
        let vm = QemuIo::hold(&path, false);
        let mut waiter = Box::pin(ImageLock::acquire_wait(&path, Access::READ, &opts, &slow));
        assert!(tokio::time::timeout(Duration::from_millis(100), &mut waiter).await.is_err());
        vm.kill();
        let guard =
            tokio::time::timeout(Duration::from_secs(20), waiter).await.expect("hint missed").unwrap();
        assert_eq!(guard.access(), Access::READ);
    });
}

#[test]
fn an_expiring_deadline_names_the_holders_and_leaves_nothing_held() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "d.img");
    let vm = QemuIo::hold(&path, false);
    let rt = runtime();
    let policy = quick().with_timeout(Duration::from_millis(150));
    let err = rt.block_on(ImageLock::acquire_wait(&path, Access::WRITE, &LockOptions::default(), &policy));
    let err = err.unwrap_err();
    assert!(matches!(err, Error::TimedOut { .. }), "{err}");
    assert_eq!(err.conflict().unwrap().holders.iter().map(|h| h.pid).collect::<Vec<_>>(), [vm.pid()]);
    assert!(err.to_string().contains("\"write\" lock"), "{err}");
    // Only the VM holds anything; a guard's wait_for that times out keeps its old access.
    assert_eq!(held_from_another_process(&path).1, [vm.pid()]);
    let mut reader = rt.block_on(ImageLock::acquire(&path, Access::FORCE_SHARE)).unwrap();
    let err = rt.block_on(reader.wait_for(Access::READ, &policy)).unwrap_err();
    assert_eq!(err.conflict().unwrap().holders[0].pid, vm.pid());
    assert_eq!(reader.access(), Access::FORCE_SHARE);
    vm.kill();
    assert_eq!(held_from_another_process(&path), (reader.held(), vec![std::process::id()]));
    rt.block_on(reader.wait_for(Access::READ, &policy)).unwrap();
    assert_eq!(held_from_another_process(&path).0.to_string(), "100 | 201 203");
    drop(reader);
    assert!(held_from_another_process(&path).0.is_empty());
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
    const N: u64 = 3000;
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..4).map(|i| image(dir.path(), &format!("t{i}.img"))).collect();
    let mut rng = Rng::from_env_or_clock();
    let rt = runtime();
    let (mut done, mut cancelled) = (0u32, 0u32);
    rt.block_on(async {
        // A foreign holder on image 0 that comes and goes, so waits end at random moments.
        let mut foreign = Some(qlock_core::ImageLock::acquire(&paths[0], Access::WRITE).unwrap());
        let mut kept: Vec<ImageLock> = Vec::new();
        let (opts, fast) = (LockOptions::default(), quick());
        for _ in 0..N {
            if rng.below(50) == 0 {
                foreign = match foreign {
                    Some(_) => None,
                    None => qlock_core::ImageLock::acquire(&paths[0], Access::WRITE).ok(),
                };
            }
            let path = paths[rng.below(4) as usize].clone();
            let access = Access::PRESETS[rng.below(Access::PRESETS.len() as u64) as usize].access;
            let polls = rng.below(12);
            let op = rng.below(4);
            let outcome: Option<Result<Option<ImageLock>, Error>> = match op {
                0 => CancelAfter { fut: Box::pin(ImageLock::acquire(&path, access)), polls }
                    .await
                    .map(|r| r.map(Some)),
                1 => {
                    let f = ImageLock::acquire_wait(&path, access, &opts, &fast);
                    CancelAfter { fut: Box::pin(f), polls }.await.map(|r| r.map(Some))
                }
                2 => {
                    let f = ImageLock::acquire_wait(&path, access, &opts, &fast);
                    match tokio::time::timeout(Duration::from_millis(rng.below(3)), f).await {
                        Ok(r) => Some(r.map(Some)),
                        Err(_) => None,
                    }
                }
                _ => match kept.pop() {
                    Some(mut g) => {
                        let r = CancelAfter { fut: Box::pin(g.wait_for(access, &fast)), polls }.await;
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
    });
    eprintln!("done {done}, cancelled {cancelled}");
    // Dropping the runtime waits for every closure still running on the blocking pool.
    drop(rt);
    assert!(cancelled > N as u32 / 4 && done > N as u32 / 10, "done {done}, cancelled {cancelled}");
    for path in &paths {
        assert_eq!(
            held_from_another_process(path),
            (qlock_core::LockSet::EMPTY, vec![]),
            "{}",
            path.display()
        );
        assert!(qemu_io_can_write(path));
    }
}

#[test]
fn contending_processes_never_overlap_and_all_finish() {
    const PROCS: usize = 3;
    const ITERS: u32 = 40;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "c.img");
    let oracle = dir.path().join("oracle");
    let env = |p: &Path| {
        vec![
            ("QLOCK_IMAGE", p.display().to_string()),
            ("QLOCK_ORACLE", oracle.display().to_string()),
            ("QLOCK_ITERS", ITERS.to_string()),
        ]
    };
    let children: Vec<_> = (0..PROCS).map(|_| spawn_child("contend", &env(&path))).collect();
    for child in children {
        let report = child_report(child);
        assert_eq!(report, [format!("done {ITERS} overlaps 0")]);
    }
    assert!(held_from_another_process(&path).0.is_empty());
}
