//! The runtime crates' test scenarios and their helpers, shared through this crate's `testing`
//! feature (a dev-dependency of `qlock-tokio` and `qlock-async-std`): real holder processes,
//! probes from another process, a seeded random source, and the scenarios themselves
//! ([`scenarios`], run with [`scenario_tests!`](crate::scenario_tests)). Not for production use.

pub mod scenarios;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use qlock_core::LockSet;
use qlock_testkit::{FakeQemu, Format, FrontEnd};

/// The test every test binary defines to run child roles: `child_process`.
pub const CHILD_TEST: &str = "child_process";
/// Selects a child role.
pub const ROLE: &str = "QLOCK_TEST_ROLE";

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

/// Runs this test binary again as `role`, with `env`, and returns its stdout lines that start
/// with `QLOCK:` (libtest's own chatter is skipped).
pub fn spawn_child(role: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"]).env(ROLE, role);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap()
}

/// The `QLOCK:` lines of a finished child; asserts it succeeded.
pub fn child_report(child: Child) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "child failed: {text}");
    text.lines().filter_map(|l| l.find("QLOCK:").map(|i| l[i + 6..].to_owned())).collect()
}

/// What another process sees held on `path`, holder by holder: each pid with the protocol
/// bytes it holds.
pub fn holders_from_another_process(path: &Path) -> Vec<(u32, LockSet)> {
    let lines = child_report(spawn_child("probe", &[("QLOCK_IMAGE", path.display().to_string())]));
    let parse = |bytes: &str| {
        let mut set = LockSet::EMPTY;
        bytes.split_whitespace().filter_map(|b| b.parse().ok()).for_each(|b| set.add_byte(b));
        set
    };
    let holders = lines.iter().filter_map(|l| l.strip_prefix("holder "));
    holders
        .map(|h| h.split_once(' ').unwrap_or((h, "")))
        .map(|(pid, bytes)| (pid.parse().unwrap(), parse(bytes)))
        .collect()
}

/// What another process sees held on `path`: the held bytes and the pids holding them.
pub fn held_from_another_process(path: &Path) -> (LockSet, Vec<u32>) {
    let lines = child_report(spawn_child("probe", &[("QLOCK_IMAGE", path.display().to_string())]));
    let held = lines.iter().find_map(|l| l.strip_prefix("held ")).unwrap();
    let pids = lines.iter().find_map(|l| l.strip_prefix("pids ")).unwrap();
    let mut set = LockSet::EMPTY;
    held.split_whitespace().filter_map(|b| b.parse().ok()).for_each(|b| set.add_byte(b));
    (set, pids.split_whitespace().map(|p| p.parse().unwrap()).collect())
}

/// The probe role: prints what [`qlock_core::inspect`] sees on `QLOCK_IMAGE`.
pub fn probe_role() {
    let path = std::env::var("QLOCK_IMAGE").unwrap();
    let status = qlock_core::inspect(&[&path]).remove(0).unwrap();
    let bytes: Vec<String> = (100..=104)
        .chain(200..=204)
        .filter(|b| status.others.held.has_byte(*b))
        .map(|b: u64| b.to_string())
        .collect();
    let pids: Vec<String> = status.holders.iter().map(|h| h.pid.to_string()).collect();
    println!("QLOCK:held {}", bytes.join(" "));
    println!("QLOCK:pids {}", pids.join(" "));
    for h in &status.holders {
        let bytes: Vec<String> = h.bytes().bytes().map(|b| b.to_string()).collect();
        println!("QLOCK:holder {} {}", h.pid, bytes.join(" "));
    }
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
