//! The runtime crates' test scenarios and their helpers, shared through this crate's `testing`
//! feature (a dev-dependency of `qlock-tokio` and `qlock-async-std`): real holder processes,
//! probes from another process (qlock-testkit's re-exec roles), a seeded random source, and
//! the scenarios themselves
//! ([`scenarios`], run with [`scenario_tests!`](crate::scenario_tests)). Not for production use.

pub mod scenarios;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use qlock_core::LockSet;
use qlock_testkit::{FakeQemu, Format, FrontEnd, reexec};

/// Serialises the scenario tests of one test binary.
///
/// A child that one test thread is spawning shares every open file description of the process
/// from `fork` until its `exec` (docs/protocol.md §7 pitfall 4): a probe spawned by one scenario
/// would briefly hold another scenario's guard, and that scenario's "held by this process
/// alone" check would see the probe's pid. Real programs have the same window; these tests
/// must not.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A 1 MiB raw image in `dir`.
pub fn image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    path
}

/// A real `qemu-io -f raw` holding `path` read-write (`100 101 | -`), through the testkit: ready
/// once its prompt showed. Keep it on the test's own thread (it dies with its spawning thread).
pub fn qemu_io_rw(path: &Path) -> FakeQemu {
    FakeQemu::real(path, FrontEnd::QemuIoRw, Format::Raw)
        .unwrap_or_else(|e| panic!("real qemu-io on {}: {e}", path.display()))
}

/// The holders another process sees on `path` ([`reexec::inspect_elsewhere`]): each pid
/// with the protocol bytes it holds.
pub fn holders_from_another_process(path: &Path) -> Vec<(u32, LockSet)> {
    let lines = reexec::inspect_elsewhere(&[path]);
    let holders = lines.iter().filter_map(|l| l.strip_prefix("holder: "));
    holders
        .map(|h| {
            let mut words = h.splitn(3, ' ');
            let pid = words.next().and_then(|p| p.parse().ok()).expect("a pid");
            (pid, bytes(words.nth(1).unwrap_or("")))
        })
        .collect()
}

/// What another process sees held on `path`: the held bytes and the pids holding them.
pub fn held_from_another_process(path: &Path) -> (LockSet, Vec<u32>) {
    let lines = reexec::inspect_elsewhere(&[path]);
    let held = lines.iter().find_map(|l| l.strip_prefix("held: ")).expect("a held line");
    let pids = lines.iter().filter_map(|l| l.strip_prefix("holder: ")?.split(' ').next()?.parse().ok());
    (bytes(held), pids.collect())
}

/// The bytes of a [`LockSet`] as displayed (`100 101 | 201`, `- | -`).
fn bytes(text: &str) -> LockSet {
    let mut set = LockSet::EMPTY;
    text.split_whitespace().filter_map(|b| b.parse().ok()).for_each(|b| set.add_byte(b));
    set
}

/// True when a real `qemu-io` can open `path` read-write (it refuses if we hold anything that
/// conflicts with a writer).
pub fn qemu_io_can_write(path: &Path) -> bool {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", "quit"])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// xorshift64, seeded from the clock and printed so a failure can be replayed.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from `QLOCK_SEED`, else from the clock.
    pub fn from_env_or_clock() -> Rng {
        let seed = std::env::var("QLOCK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        eprintln!("QLOCK_SEED={seed}");
        Rng(seed)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The sync core's acquire and release of `write` on each of `images`, one after another: the
/// baseline the runtime crates' benchmarks of many concurrent acquisitions compare with.
pub fn sync_sequential(images: &[PathBuf]) -> std::time::Duration {
    let t = std::time::Instant::now();
    for p in images {
        qlock_core::ImageLock::acquire(p, qlock_core::Access::WRITE).unwrap().release().unwrap();
    }
    t.elapsed()
}

/// The runtime `R` with the inotify hint switched off, and nothing else changed: every call
/// goes to `R`, except that the watch is closed (in the pool) instead of registered. The
/// benchmarks' baseline of the hint's benefit, composed here rather than switched on in the
/// library. A marker type, never a value.
#[derive(Debug)]
pub struct NoHint<R>(std::convert::Infallible, std::marker::PhantomData<R>);

impl<R: crate::Runtime> crate::Runtime for NoHint<R> {
    type Hint = R::Hint;

    fn asyncify<T, F>(f: F) -> impl std::future::Future<Output = Result<T, qlock_core::Error>> + Send
    where
        F: FnOnce() -> Result<T, qlock_core::Error> + Send + 'static,
        T: Send + 'static,
    {
        R::asyncify(f)
    }

    fn drop_in_pool<T: Send + 'static>(value: T) {
        R::drop_in_pool(value);
    }

    fn register(watch: Option<qlock_core::SharedCloseWatch>) -> Self::Hint {
        if let Some(watch) = watch {
            R::drop_in_pool(watch);
        }
        R::register(None)
    }

    fn unregister(hint: Self::Hint) -> Option<qlock_core::SharedCloseWatch> {
        R::unregister(hint)
    }

    fn sleep(hint: &Self::Hint, delay: std::time::Duration) -> impl std::future::Future<Output = ()> + Send {
        R::sleep(hint, delay)
    }
}
