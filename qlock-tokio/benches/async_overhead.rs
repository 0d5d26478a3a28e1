//! qlock-tokio against the sync core, measured in the same run (`cargo bench -p qlock-tokio`).
//!
//! 1. acquire + release: async vs (sync + one bare `spawn_blocking`), goal <= 1.15x.
//! 2. access change and a failing retry on an open guard (local fs): async vs sync, goal <= 1.5x.
//! 3. release-to-acquire latency when a holder process exits, with and without the inotify hint.
//! 4. 10,000 concurrent acquisitions on 10,000 images: wall time, peak threads, ticker lag.

use std::future::Future;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qlock_async::{AsyncImageLock, Runtime};
use qlock_core::{Access, Backoff, LockOptions};
use qlock_tokio::Tokio;

const HOLDER: &str = "QLOCK_BENCH_HOLD";

fn main() {
    if let Ok(path) = std::env::var(HOLDER) {
        return hold(Path::new(&path));
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if std::env::var("QLOCK_BENCH_ONLY_LATENCY").is_err() {
        overhead(&rt, dir.path());
        guard_ops(&rt, dir.path());
    }

    latency(&rt, dir.path());
    drop(rt);
    many(dir.path());
}

/// Holder role: takes `write`, says so, and exits when stdin closes (or on SIGKILL).
fn hold(path: &Path) {
    let _lock = qlock_core::ImageLock::acquire(path, Access::WRITE).unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().lock().read_line(&mut String::new());
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, b"").unwrap();
    p
}

/// Mean time per call of `f`, best of 5 rounds of `n`.
fn per_call(n: u32, mut f: impl FnMut()) -> Duration {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            (0..n).for_each(|_| f());
            t.elapsed() / n
        })
        .min()
        .unwrap()
}

fn us(d: Duration) -> String {
    format!("{:.2} us", d.as_secs_f64() * 1e6)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn overhead(rt: &tokio::runtime::Runtime, dir: &Path) {
    let path = image(dir, "overhead.img");
    let n = 2000;
    let sync =
        per_call(n, || qlock_core::ImageLock::acquire(&path, Access::WRITE).unwrap().release().unwrap());
    let hop = per_call(n, || rt.block_on(async { tokio::task::spawn_blocking(|| ()).await.unwrap() }));
    let asynk = per_call(n, || {
        rt.block_on(async {
            qlock_tokio::ImageLock::acquire(&path, Access::WRITE).await.unwrap().release().await.unwrap()
        })
    });
    println!("== acquire(write) + release, {n} x best of 5");
    println!("sync core                 {}", us(sync));
    println!("bare spawn_blocking       {}", us(hop));
    println!("qlock-tokio               {}", us(asynk));
    println!("ratio acquire+release async / (sync + 1 hop): {:.3}x (goal <= 1.15)", ratio(asynk, sync + hop));
}

fn guard_ops(rt: &tokio::runtime::Runtime, dir: &Path) {
    let path = image(dir, "guard.img");
    let n = 20_000;
    let mut sync = qlock_core::ImageLock::acquire(&path, Access::FORCE_SHARE).unwrap();
    let mut flip = false;
    let sync_change = per_call(n, || {
        flip = !flip;
        sync.set_access(if flip { Access::WRITE } else { Access::READ }).unwrap();
    });
    drop(sync);
    // Holders are not named: a failing retry below is what each attempt of a wait does.
    let quiet = LockOptions::default().with_find_holders(false);
    let mut guard =
        rt.block_on(qlock_tokio::ImageLock::acquire_with(&path, Access::FORCE_SHARE, &quiet)).unwrap();
    assert!(guard.is_local());
    let async_change = rt.block_on(async {
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for i in 0..n {
                guard.set_access(if i % 2 == 0 { Access::WRITE } else { Access::READ }).await.unwrap();
            }
            best = best.min(t.elapsed() / n);
        }
        best
    });
    rt.block_on(guard.set_access(Access::FORCE_SHARE)).unwrap();
    // A failing retry: someone else writes, we ask for write.
    let _other = qlock_core::ImageLock::acquire(&path, Access::WRITE_SHARED).unwrap();
    let mut sync = qlock_core::ImageLock::acquire_with(&path, Access::FORCE_SHARE, &quiet).unwrap();
    let sync_retry = per_call(n, || assert!(sync.set_access(Access::WRITE).is_err()));
    let async_retry = rt.block_on(async {
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..n {
                assert!(guard.set_access(Access::WRITE).await.is_err());
            }
            best = best.min(t.elapsed() / n);
        }
        best
    });
    println!("== on an open guard, local filesystem, {n} x best of 5");
    println!("access change   sync {}  async {}", us(sync_change), us(async_change));
    println!("failing retry   sync {}  async {}", us(sync_retry), us(async_retry));
    println!("ratio access change async / sync: {:.3}x (goal <= 1.5)", ratio(async_change, sync_change));
    println!("ratio failing retry async / sync: {:.3}x (goal <= 1.5)", ratio(async_retry, sync_retry));
}

fn holder(path: &Path) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(HOLDER, path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

fn latency(rt: &tokio::runtime::Runtime, dir: &Path) {
    let path = image(dir, "latency.img");
    let samples = 40;
    let policy = Backoff::default();
    println!(
        "== release-to-acquire latency when the holder exits, default backoff (2 ms .. {:?}), {samples} samples",
        policy.max
    );
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    for hint in [true, false] {
        let mut lat: Vec<Duration> = (0..samples)
            .map(|_| {
                let mut child = holder(&path);
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Let the waiter's backoff reach a random phase before the holder exits.
                let settle = Duration::from_micros(seed % 300_000);
                rt.block_on(async {
                    let p = path.clone();
                    let policy = policy.clone();
                    let waiter = if hint {
                        tokio::spawn(acquired_at::<Tokio>(p, policy))
                    } else {
                        tokio::spawn(acquired_at::<NoHint>(p, policy))
                    };
                    tokio::time::sleep(settle).await;
                    let t0 = Instant::now();
                    drop(child.stdin.take()); // the holder exits, closing the image
                    let (t1, _g) = waiter.await.unwrap();
                    child.wait().unwrap();
                    t1 - t0
                })
            })
            .collect();
        lat.sort();
        if std::env::var("QLOCK_BENCH_VERBOSE").is_ok() {
            eprintln!("{lat:?}");
        }
        let ms = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
        let on = if hint { "on" } else { "off" };
        println!("inotify hint {on:<5}  p50 {:>9.3} ms  p99 {:>11.3} ms", ms(0.5), ms(0.99));
        if hint {
            println!("goal latency p50, inotify hint on: {:.3} ms (goal < 2)", ms(0.5));
        }
        let cap = policy.max.as_secs_f64() * 1e3;
        println!("goal latency p99, inotify hint {on}: {:.3} ms (goal <= {cap})", ms(0.99));
    }
}

/// Waits for `write` on `path` with `policy`; returns when it got in (and the guard, dropped
/// by the caller after the measurement).
async fn acquired_at<R: Runtime>(path: PathBuf, policy: Backoff) -> (Instant, Box<dyn Send>) {
    let guard = AsyncImageLock::<R>::acquire_wait(&path, Access::WRITE, &LockOptions::default(), &policy)
        .await
        .unwrap();
    (Instant::now(), Box::new(guard))
}

/// The baseline of the hint's benefit: the same runtime without it.
type NoHint = qlock_async::testing::NoHint<Tokio>;

fn threads() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

fn many(dir: &Path) {
    const N: usize = 10_000;
    let images: Vec<PathBuf> = (0..N).map(|i| image(dir, &format!("m{i}.img"))).collect();
    let t = Instant::now();
    let sync: Vec<_> =
        images.iter().map(|p| qlock_core::ImageLock::acquire(p, Access::WRITE).unwrap()).collect();
    let sync_wall = t.elapsed();
    drop(sync);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let before = threads();
    let (worst_idle, _, ()) = rt.block_on(with_ticker(async {}));
    let images = Arc::new(images);
    let (worst, peak, wall) = rt.block_on(with_ticker(async move {
        let t = Instant::now();
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let images = images.clone();
                tokio::spawn(async move {
                    qlock_tokio::ImageLock::acquire(&images[i], Access::WRITE).await.unwrap()
                })
            })
            .collect();
        let mut guards = Vec::with_capacity(N);
        for task in tasks {
            guards.push(task.await.unwrap());
        }
        let wall = t.elapsed();
        drop(guards);
        wall
    }));
    println!("== {N} concurrent acquisitions on {N} images (2 workers)");
    println!("sync core, sequential   {:.1} ms", sync_wall.as_secs_f64() * 1e3);
    println!(
        "qlock-tokio, concurrent {:.1} ms  (ratio {:.2})",
        wall.as_secs_f64() * 1e3,
        ratio(wall, sync_wall)
    );
    println!(
        "peak threads            {} blocking (process threads {} -> {})",
        peak.saturating_sub(before),
        before,
        peak
    );
    println!(
        "1 ms ticker worst lag   {:.2} ms under load, {:.2} ms idle",
        worst.as_secs_f64() * 1e3,
        worst_idle.as_secs_f64() * 1e3
    );
}

/// Runs `work` next to a 1 ms ticker task; returns the ticker's worst lag, peak process threads
/// and `work`'s output.
async fn with_ticker<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
) -> (Duration, u64, T) {
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn({
        let (stop, worst, peak) = (stop.clone(), worst.clone(), peak.clone());
        async move {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) || rounds < 50 {
                let t = Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
                let lag = t.elapsed().saturating_sub(Duration::from_millis(1));
                worst.fetch_max(lag.as_nanos() as u64, Ordering::Relaxed);
                peak.fetch_max(threads(), Ordering::Relaxed);
                rounds += 1;
            }
        }
    });
    let out = tokio::spawn(work).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    ticker.await.unwrap();
    (Duration::from_nanos(worst.load(Ordering::Relaxed)), peak.load(Ordering::Relaxed), out)
}
