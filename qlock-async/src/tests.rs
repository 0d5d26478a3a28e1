//! The guard on two test runtimes: one that runs everything inline and counts its pool hops,
//! and the `blocking` crate's real pool, for the non-local path where lock calls run there.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use qlock_core::SharedCloseWatch;
use qlock_core::{Access, Backoff, Error, LockOptions, LockSet, Perm};

use crate::{AsyncImageLock, Runtime, inspect};

type Core = qlock_core::ImageLock;

static HOPS: AtomicUsize = AtomicUsize::new(0);
static DROPS: AtomicUsize = AtomicUsize::new(0);

/// A runtime without a pool or a reactor: everything inline, and a sleep that only yields
/// once, so a wait stays pending between attempts like a real one. Counts the closures it was
/// given for the pool ([`HOPS`]) and the values to drop there ([`DROPS`]).
enum Inline {}

impl Runtime for Inline {
    type Hint = Option<SharedCloseWatch>;
    async fn asyncify<T, F>(f: F) -> Result<T, Error>
    where
        F: FnOnce() -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        HOPS.fetch_add(1, Ordering::SeqCst);
        f()
    }
    fn drop_in_pool<T: Send + 'static>(value: T) {
        DROPS.fetch_add(1, Ordering::SeqCst);
        drop(value);
    }
    fn register(watch: Option<SharedCloseWatch>) -> Option<SharedCloseWatch> {
        watch
    }
    fn unregister(hint: Option<SharedCloseWatch>) -> Option<SharedCloseWatch> {
        hint
    }
    async fn sleep(_: &Option<SharedCloseWatch>, _: Duration) {
        let mut yielded = false;
        std::future::poll_fn(|_| {
            if std::mem::replace(&mut yielded, true) { Poll::Ready(()) } else { Poll::Pending }
        })
        .await;
    }
}

/// The `blocking` crate's pool, with plain thread sleeps: closures really run elsewhere, so a
/// dropped call can leave one running with the descriptor. A pool call is pending at its first
/// poll even when the pool thread finishes before that poll (a preempted test thread on a busy
/// machine), as it would be on any real pool: the tests that drop a call there rely on it.
enum Pool {}

impl Runtime for Pool {
    type Hint = ();
    async fn asyncify<T, F>(f: F) -> Result<T, Error>
    where
        F: FnOnce() -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        let task = blocking::unblock(f);
        let mut yielded = false;
        std::future::poll_fn(|cx| {
            if std::mem::replace(&mut yielded, true) {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
        task.await
    }
    fn drop_in_pool<T: Send + 'static>(value: T) {
        blocking::unblock(move || drop(value)).detach();
    }
    fn register(_: Option<SharedCloseWatch>) {}
    fn unregister(_: ()) -> Option<SharedCloseWatch> {
        None
    }
    async fn sleep(_: &(), d: Duration) {
        blocking::unblock(move || std::thread::sleep(d)).await;
    }
}

fn send<T: Send>(_: &T) {}

/// Compile-time: every future of the guard is `Send` for any runtime, so executors that
/// move tasks between threads (`tokio::spawn`) accept them.
#[allow(dead_code)]
fn futures_are_send<R: Runtime>(guard: &mut AsyncImageLock<R>, owned: AsyncImageLock<R>) {
    let (opts, backoff) = (LockOptions::default(), Backoff::default());
    send(&AsyncImageLock::<R>::acquire("p", Access::READ));
    send(&AsyncImageLock::<R>::acquire_with("p", Access::READ, &opts));
    send(&AsyncImageLock::<R>::acquire_wait("p", Access::READ, &opts, &backoff));
    send(&inspect::<R, _>(["p"]));
    send(&guard.set_access(Access::READ));
    send(&guard.wait_for(Access::READ, &backoff));
    send(&owned.release());
}

fn poll<F: Future + ?Sized>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    loop {
        if let Poll::Ready(out) = poll(fut.as_mut()) {
            return out;
        }
    }
}

fn image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, b"").unwrap();
    (dir, path)
}

/// The protocol bytes `guard`'s descriptor holds, as seen from a fresh description through
/// `/proc`, so the guard's own bookkeeping is not trusted.
fn held_from_outside<R: Runtime>(guard: &AsyncImageLock<R>) -> LockSet {
    let fd = guard.file().expect("the descriptor is with the guard").as_raw_fd() as u32;
    let status = qlock_core::inspect(&[guard.path()]).remove(0).unwrap();
    let mine = status.holders.iter().filter(|h| h.pid == std::process::id() && h.fd == Some(fd));
    mine.fold(LockSet::EMPTY, |acc, h| acc.union(h.bytes()))
}

#[test]
fn the_generic_guard_keeps_qemu_semantics_and_failed_or_dropped_waits_keep_the_old_access() {
    let (_dir, path) = image();
    let vm = Core::acquire(&path, Access::WRITE).unwrap();
    let err = block_on(AsyncImageLock::<Inline>::acquire(&path, Access::READ)).unwrap_err();
    assert_eq!(err.conflict().unwrap().holders[0].pid, std::process::id());
    let mut guard = block_on(AsyncImageLock::<Inline>::acquire(&path, Access::FORCE_SHARE)).unwrap();
    assert!(guard.is_local());
    let before = guard.held();
    // A wait dropped between attempts, and one that times out, keep what was held before.
    let patient = Backoff::default();
    {
        let mut wait = pin!(guard.wait_for(Access::READ, &patient));
        for _ in 0..3 {
            assert!(poll(wait.as_mut()).is_pending());
        }
    }
    assert_eq!((guard.access(), guard.held(), guard.is_lost()), (Access::FORCE_SHARE, before, false));
    let policy = Backoff::default().with_timeout(Duration::from_millis(20));
    let err = block_on(guard.wait_for(Access::READ, &policy)).unwrap_err();
    assert!(matches!(err, Error::TimedOut { .. }), "{err}");
    assert_eq!((guard.access(), guard.held(), guard.is_lost()), (Access::FORCE_SHARE, before, false));
    drop(vm);
    block_on(guard.wait_for(Access::READ, &policy)).unwrap();
    assert_eq!(guard.access(), Access::READ);
    let status = block_on(inspect::<Inline, _>([&path])).remove(0).unwrap();
    assert_eq!(status.holders[0].pid, std::process::id());
    let core = guard.into_core().unwrap();
    assert_eq!(core.access(), Access::READ);
}

/// Pool closures made by `f`, and values it dropped there.
fn hops<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let (h, d) = (HOPS.load(Ordering::SeqCst), DROPS.load(Ordering::SeqCst));
    let out = f();
    (out, HOPS.load(Ordering::SeqCst) - h, DROPS.load(Ordering::SeqCst) - d)
}

#[test]
fn each_operation_crosses_to_the_pool_once_also_when_it_fails() {
    let (_dir, path) = image();
    let opts = LockOptions::default();
    let _vm = Core::acquire(&path, Access::WRITE).unwrap();
    let mut guard = block_on(AsyncImageLock::<Inline>::acquire(&path, Access::FORCE_SHARE)).unwrap();
    // A conflict on an open guard: only the naming crosses (the lock calls run inline).
    let (r, h, d) = hops(|| block_on(guard.set_access(Access::WRITE)));
    assert_eq!(r.unwrap_err().conflict().unwrap().holders.len(), 1);
    assert_eq!((h, d), (1, 0), "set_access");
    // A wait whose deadline has passed at the first attempt: one round trip, naming included.
    let now = Backoff::default().with_timeout(Duration::ZERO);
    let (r, h, d) =
        hops(|| block_on(AsyncImageLock::<Inline>::acquire_wait(&path, Access::READ, &opts, &now)));
    assert_eq!(r.unwrap_err().conflict().unwrap().holders.len(), 1);
    assert_eq!((h, d), (1, 0), "acquire_wait, timeout 0");
    // A wait that times out later: the open, then one closure that names the holders and
    // closes the inotify watch (not a naming hop and a separate drop of the watch).
    let soon = Backoff::default().with_timeout(Duration::from_millis(10));
    let (r, h, d) =
        hops(|| block_on(AsyncImageLock::<Inline>::acquire_wait(&path, Access::READ, &opts, &soon)));
    assert_eq!(r.unwrap_err().conflict().unwrap().holders.len(), 1);
    assert_eq!((h, d), (2, 0), "acquire_wait, timed out");
    let (r, h, d) = hops(|| block_on(guard.wait_for(Access::READ, &soon)));
    assert_eq!(r.unwrap_err().conflict().unwrap().holders.len(), 1);
    assert_eq!((h, d), (1, 0), "wait_for, timed out");
    assert_eq!(guard.access(), Access::FORCE_SHARE);
}

#[test]
fn a_call_dropped_while_it_names_the_holders_keeps_the_old_access() {
    let (_dir, path) = image();
    let _vm = Core::acquire(&path, Access::WRITE).unwrap();
    let mut guard = block_on(AsyncImageLock::<Pool>::acquire(&path, Access::FORCE_SHARE)).unwrap();
    let now = Backoff::default().with_timeout(Duration::ZERO);
    for call in 0..2 {
        {
            let mut fut: Pin<Box<dyn Future<Output = Result<(), Error>>>> = match call {
                0 => Box::pin(guard.set_access(Access::WRITE)),
                _ => Box::pin(guard.wait_for(Access::WRITE, &now)),
            };
            // The first poll fails the lock calls inline and hands the naming to the pool.
            assert!(poll(fut.as_mut()).is_pending(), "call {call}");
        }
        assert!(!guard.is_lost(), "call {call}");
        assert!(guard.file().is_some(), "call {call}");
        assert_eq!(guard.access(), Access::FORCE_SHARE);
        assert_eq!(held_from_outside(&guard), Access::FORCE_SHARE.lock_set(Perm::ALL), "call {call}");
    }
}

#[test]
fn on_the_pool_path_a_dropped_call_leaves_the_old_or_the_new_access_never_less() {
    let (_dir, path) = image();
    let presets: Vec<Access> = Access::PRESETS.iter().map(|p| p.access).collect();
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ u64::from(std::process::id());
    let mut below = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut guard = block_on(AsyncImageLock::<Pool>::acquire(&path, Access::FORCE_SHARE)).unwrap();
    guard.force_pool();
    let mut foreign: Option<Core> = None;
    let quick =
        Backoff::default().with_initial(Duration::from_micros(100)).with_timeout(Duration::from_millis(2));
    let (mut kept, mut changed) = (0, 0);
    // At least 300 rounds, and more until each outcome was seen 30 times: on a loaded machine
    // most closures are still queued when their call is dropped, so changes come rarer.
    for i in 0..3000 {
        if i >= 300 && kept > 30 && changed > 30 {
            break;
        }
        if below(4) == 0 {
            foreign = match foreign {
                Some(_) => None,
                None => Core::acquire(&path, presets[below(5) as usize]).ok(),
            };
        }
        let old = guard.access();
        let new = presets[below(5) as usize];
        let polls = below(4);
        {
            let mut fut: Pin<Box<dyn Future<Output = Result<(), Error>> + '_>> = match below(3) {
                0 | 1 => Box::pin(guard.set_access(new)),
                _ => Box::pin(guard.wait_for(new, &quick)),
            };
            for _ in 0..polls {
                if poll(fut.as_mut()).is_ready() {
                    break;
                }
                std::thread::yield_now();
            }
        }
        // While a closure still has the descriptor, the guard reports the old access.
        let seen = guard.access();
        assert!(seen == old || seen == new, "{i}: {seen:?}");
        block_on(guard.settle());
        assert!(!guard.is_lost(), "{i}");
        let now = guard.access();
        assert!(now == old || now == new, "{i}: {now:?} is neither {old:?} nor {new:?}");
        if now == old {
            kept += 1
        } else {
            changed += 1
        }
        assert_eq!(
            (held_from_outside(&guard), guard.held()),
            (now.lock_set(Perm::ALL), now.lock_set(Perm::ALL)),
            "{i}: {old:?} -> {new:?}"
        );
    }
    assert!(kept > 30 && changed > 30, "kept {kept}, changed {changed}");
}
