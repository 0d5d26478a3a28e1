//! qlock-async-std against the sync core, measured in the same run (`cargo bench -p
//! qlock-async-std`; `cargo xtask bench` collects the `ratio` and `goal` lines).
//!
//! 1. acquire + release: async vs (sync + one bare `blocking::unblock`), under async-std and
//!    under smol; goal <= 1.15x, the median over rounds of each round's ratio (the variants of
//!    a round run back to back, so they meet the same machine). Not the ratio of the best
//!    rounds, also printed: a bare hop of an empty closure sometimes returns before the caller
//!    parks, and its best round then drops from 30-60 us to 7 us (seen in about one run in five
//!    on the project's idle VM, mostly in the first round), which says nothing of qlock's hop.
//!    Also against the floor of any offloading design, the sync acquire inside one `unblock`.
//!    Under `cargo xtask bench --loaded` no CPU is idle, so no hop pays for waking one: the bare
//!    hop falls to ~5 us and the ratio then compares qlock's bookkeeping (the queue, the reply
//!    slot, the `fstatfs` that decides inline or pooled calls later: ~1.5 us) with a hop of
//!    nearly nothing; seen 0.30x-1.16x over five loaded runs, 1.17x-1.18x of the sync acquire
//!    inside one `unblock`.
//! 2. an access change and a failing retry on an open guard (local fs): async vs sync; goal
//!    <= 1.5x.
//! 3. release-to-acquire latency for a waiter when a holder process exits (a qlock-testkit fake
//!    holding `write`), p50 and p99, with and without the inotify hint; goals: p50 < 2 ms with
//!    the hint, p99 no worse than the backoff cap.
//! 4. 10,000 concurrent acquire + release on 10,000 images under async-std, against the same
//!    10,000 done one after another by the sync core, best of 3 interleaved rounds: goal
//!    <= 1.5x, with at most 64 pool threads at the peak.
//!
//! `QLOCK_BENCH_VERBOSE=1` also prints every latency sample.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_io::Timer;
use qlock_async::testing::{Rng, sync_sequential};
use qlock_async::{AsyncImageLock, Runtime};
use qlock_async_std::AsyncStd;
use qlock_core::{Access, Backoff, LockOptions};
use qlock_testkit::FakeQemu;

/// Rounds per measurement; the best round counts (the least disturbed by the machine), except
/// for the one-hop ratio (see the crate's bench docs).
const ROUNDS: u32 = 7;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let block_ons: [(&str, BlockOn); 2] =
        [("async-std", |f| async_std::task::block_on(f)), ("smol", |f| smol::block_on(f))];
    for (name, block_on) in block_ons {
        overhead(name, block_on, dir.path());
        guard_ops(name, block_on, dir.path());
    }
    latency(dir.path());
    many(dir.path());
}

/// A boxed measurement future, so both runtimes' `block_on` fit one `fn` type.
type Pin<'a> = std::pin::Pin<Box<dyn Future<Output = ()> + 'a>>;
/// A runtime's `block_on`.
type BlockOn = fn(Pin<'_>);

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, b"").unwrap();
    p
}

/// Mean time per call of `n` calls of `f` (given the call's index).
fn timed(n: u32, mut f: impl FnMut(u32)) -> Duration {
    let t = Instant::now();
    (0..n).for_each(&mut f);
    t.elapsed() / n
}

/// [`timed`] for an async `f`: mean time per call, best of `rounds` rounds of `n`.
async fn per_call_async<F: Future<Output = ()>>(rounds: u32, n: u32, mut f: impl FnMut() -> F) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..n {
            f().await;
        }
        best = best.min(t.elapsed() / n);
    }
    best
}

fn us(d: Duration) -> String {
    format!("{:.2} us", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn median_of(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn overhead(rt: &str, block_on: BlockOn, dir: &Path) {
    let path = image(dir, &format!("overhead-{rt}.img"));
    let n = 2000;
    // Rounds interleave the four variants, so load from elsewhere on the machine hits them alike.
    let mut best = [Duration::MAX; 4];
    let mut paired = Vec::new();
    block_on(Box::pin(async {
        for _ in 0..ROUNDS {
            let round = [
                per_call_async(1, n, || async {
                    qlock_core::ImageLock::acquire(&path, Access::WRITE).unwrap().release().unwrap()
                })
                .await,
                per_call_async(1, n, || blocking::unblock(|| ())).await,
                // The floor of any design that offloads the open: the sync acquire in one unblock.
                per_call_async(1, n, || {
                    let p = path.clone();
                    async {
                        let lock =
                            blocking::unblock(move || qlock_core::ImageLock::acquire(p, Access::WRITE));
                        lock.await.unwrap().release().unwrap()
                    }
                })
                .await,
                per_call_async(1, n, || async {
                    let lock = qlock_async_std::ImageLock::acquire(&path, Access::WRITE).await;
                    lock.unwrap().release().await.unwrap()
                })
                .await,
            ];
            best = std::array::from_fn(|i| best[i].min(round[i]));
            paired.push(ratio(round[3], round[0] + round[1]));
        }
    }));
    let [sync, hop, carried, asynk] = best;
    println!("== {rt}: acquire(write) + release, {n} x best of {ROUNDS}");
    println!("sync core                 {}", us(sync));
    println!("bare blocking::unblock    {}", us(hop));
    println!("sync acquire in unblock   {}", us(carried));
    println!("qlock-async-std           {}", us(asynk));
    println!("ratio of the best rounds: {:.2}x", ratio(asynk, sync + hop));
    println!(
        "ratio {rt} async acquire+release vs sync + 1 hop: {:.2}x (goal <= 1.15)",
        median_of(&mut paired)
    );
    // Informational: the floor of any design that offloads the open. Hops of a few
    // microseconds make it swing between runs (1.02x to 1.36x seen), so it carries no target.
    println!("{rt} acquire+release vs sync acquire inside 1 unblock: {:.2}x", ratio(asynk, carried));
}

fn guard_ops(rt: &str, block_on: BlockOn, dir: &Path) {
    // One image for the sync guard, one for the async guard, so their rounds can interleave.
    let (sync_path, async_path) =
        (image(dir, &format!("sync-{rt}.img")), image(dir, &format!("async-{rt}.img")));
    let n = 20_000;
    let flip = |i: u32| if i % 2 == 0 { Access::WRITE } else { Access::READ };
    // [sync change, async change, sync retry, async retry], best of ROUNDS interleaved rounds.
    let mut best = [Duration::MAX; 4];
    block_on(Box::pin(async {
        // Holders are not named: the failing retries below are what each attempt of a wait does.
        let quiet = LockOptions::default().with_find_holders(false);
        let mut sync = qlock_core::ImageLock::acquire_with(&sync_path, Access::FORCE_SHARE, &quiet).unwrap();
        let mut guard =
            qlock_async_std::ImageLock::acquire_with(&async_path, Access::FORCE_SHARE, &quiet).await.unwrap();
        assert!(guard.is_local(), "the bench needs a local filesystem for its temp dir");
        for _ in 0..ROUNDS {
            best[0] = best[0].min(timed(n, |i| sync.set_access(flip(i)).unwrap()));
            let t = Instant::now();
            for i in 0..n {
                guard.set_access(flip(i)).await.unwrap();
            }
            best[1] = best[1].min(t.elapsed() / n);
        }
        sync.set_access(Access::FORCE_SHARE).unwrap();
        guard.set_access(Access::FORCE_SHARE).await.unwrap();
        // A failing retry: someone else writes, we ask for write without naming holders (what
        // each attempt of a wait does).
        let _others = [&sync_path, &async_path]
            .map(|p| qlock_core::ImageLock::acquire(p, Access::WRITE_SHARED).unwrap());
        for _ in 0..ROUNDS {
            best[2] = best[2].min(timed(n, |_| assert!(sync.set_access(Access::WRITE).is_err())));
            let t = Instant::now();
            for _ in 0..n {
                assert!(guard.set_access(Access::WRITE).await.is_err());
            }
            best[3] = best[3].min(t.elapsed() / n);
        }
    }));
    let [sync_change, async_change, sync_retry, async_retry] = best;
    println!("== {rt}: on an open guard, local filesystem, {n} x best of {ROUNDS}");
    println!("access change   sync {}  async {}", us(sync_change), us(async_change));
    println!("failing retry   sync {}  async {}", us(sync_retry), us(async_retry));
    println!("ratio {rt} access change vs sync: {:.2}x (goal <= 1.5)", ratio(async_change, sync_change));
    println!("ratio {rt} failing retry vs sync: {:.2}x (goal <= 1.5)", ratio(async_retry, sync_retry));
}

/// The baseline of the hint's benefit: the same runtime without it.
type NoHint = qlock_async::testing::NoHint<AsyncStd>;

/// Waits for `write` on `path` with `policy`; returns when it got in.
async fn acquired_at<R: Runtime>(path: PathBuf, policy: Backoff) -> (Instant, AsyncImageLock<R>) {
    let guard = AsyncImageLock::<R>::acquire_wait(&path, Access::WRITE, &LockOptions::default(), &policy)
        .await
        .unwrap();
    (Instant::now(), guard)
}

/// One sample: a fake holder takes `write`, a waiter task starts waiting, its backoff reaches
/// the phase `settle`, then the holder exits; the time from its exit to the waiter getting in.
fn sample<R: Runtime>(path: &Path, policy: &Backoff, settle: Duration) -> Duration {
    let mut holder = FakeQemu::builder(path).access(Access::WRITE).spawn().unwrap();
    async_std::task::block_on(async {
        let waiter = async_std::task::spawn(acquired_at::<R>(path.to_path_buf(), policy.clone()));
        Timer::after(settle).await;
        let t0 = Instant::now();
        // The holder exits (closing the image) and is reaped; the waiter runs on async-std's
        // executor threads meanwhile.
        assert!(holder.release().unwrap().success());
        let (t1, _guard) = waiter.await;
        t1.saturating_duration_since(t0)
    })
}

fn latency(dir: &Path) {
    let path = image(dir, "latency.img");
    let samples = 40;
    let policy = Backoff::default();
    let cap = policy.max;
    println!(
        "== async-std: release-to-acquire latency when the holder exits, default backoff ({:?} .. {cap:?}), {samples} samples",
        policy.initial
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id()));
    for hint in [true, false] {
        let mut lat: Vec<Duration> = (0..samples)
            .map(|_| {
                // Let the waiter's backoff reach a random phase before the holder exits.
                let settle = Duration::from_micros(rng.below(300_000));
                if hint {
                    sample::<AsyncStd>(&path, &policy, settle)
                } else {
                    sample::<NoHint>(&path, &policy, settle)
                }
            })
            .collect();
        lat.sort();
        if std::env::var_os("QLOCK_BENCH_VERBOSE").is_some() {
            eprintln!("hint {hint}: {lat:?}");
        }
        let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
        let (with, p50, p99) = (if hint { "with" } else { "without" }, ms(p(0.5)), ms(p(0.99)));
        if hint {
            println!("goal async-std release-to-acquire p50 {with} hint: {p50:.3} ms (goal <= 2)");
        } else {
            println!("async-std release-to-acquire p50 {with} hint: {p50:.3} ms");
        }
        println!("goal async-std release-to-acquire p99 {with} hint: {p99:.3} ms (goal <= {})", ms(cap));
    }
}

/// The `blocking` pool's threads now (it names them `blocking-N`), idle ones included.
fn pool_threads() -> u64 {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap().flatten();
    let names = tasks.filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok());
    names.filter(|n| n.starts_with("blocking")).count() as u64
}

fn many(dir: &Path) {
    const N: usize = 10_000;
    let images: Vec<PathBuf> = (0..N).map(|i| image(dir, &format!("m{i}.img"))).collect();
    let before = pool_threads();
    // A sampler thread: the peak of the pool's threads while the acquisitions run. Threads
    // left idle by the parts before are counted too: the peak is an upper bound.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(pool_threads());
                std::thread::sleep(Duration::from_millis(1));
            }
            peak
        }
    });
    let images = std::sync::Arc::new(images);
    // Best of ROUNDS interleaved rounds, as for the other ratios: the first round also pays
    // for growing the heap to 10,000 tasks, once per process.
    let (mut sync_wall, mut wall) = (Duration::MAX, Duration::MAX);
    for _ in 0..ROUNDS.min(3) {
        sync_wall = sync_wall.min(sync_sequential(&images));
        let images = images.clone();
        wall = wall.min(async_std::task::block_on(async move {
            let t = Instant::now();
            let tasks: Vec<_> = (0..N)
                .map(|i| {
                    let images = images.clone();
                    async_std::task::spawn(async move {
                        let guard =
                            qlock_async_std::ImageLock::acquire(&images[i], Access::WRITE).await.unwrap();
                        guard.release().await.unwrap();
                    })
                })
                .collect();
            for task in tasks {
                task.await;
            }
            t.elapsed()
        }));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    println!("== async-std: {N} concurrent acquire+release on {N} images, best of {}", ROUNDS.min(3));
    println!("sync core, sequential       {:.1} ms", ms(sync_wall));
    println!("qlock-async-std, concurrent {:.1} ms", ms(wall));
    println!(
        "ratio async-std 10k concurrent vs sync sequential: {:.2}x (goal <= 1.5)",
        ratio(wall, sync_wall)
    );
    println!("goal async-std 10k peak pool threads: {peak} threads (goal <= 64)");
    println!("  ({before} pool threads before, idle ones from the parts before included)");
}
