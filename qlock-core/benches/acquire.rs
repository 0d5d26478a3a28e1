//! `cargo bench -p qlock-core`: the cost of one acquire+release of `write`, and of inspecting
//! 1,000 held images, each against a baseline measured in the same run.
//!
//! * acquire: qlock against (a) the bare minimal fcntl sequence done by hand (open, four
//!   read-lock runs, one probe, close) and (b) QEMU's per-byte sequence (open, 5 locks,
//!   5 probes, 5 unlocks, close). Batches of the three are interleaved and the medians
//!   compared, so machine noise hits all three alike.
//! * inspect (what `qlock status` does): 1,000 images held by 500 processes, each with 20 open
//!   descriptors (10,000 on the machine besides everyone else's), one call, against the floor
//!   of any one-walk design: reading every `/proc/*/fdinfo/*` once and nothing else. Rounds of
//!   the two are interleaved and the medians compared.
//!
//! The holder processes are this binary re-executed with `QLOCK_BENCH_ROLE=holder`.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::libc;
use qlock_core::fcntl_calls;
use qlock_core::inspect;
use qlock_core::{Access, ImageLock, LockOptions};
use qlock_testkit::raw::flock;

const ROLE: &str = "QLOCK_BENCH_ROLE";
const BATCH: u32 = 2_000;
const ROUNDS: usize = 41;
const HOLDERS: usize = 500;
/// Descriptors each holder keeps open: its two images, stdio, and the rest on `/dev/null`.
const FDS_PER_HOLDER: usize = 20;

fn setlk(f: &File, ty: libc::c_int, start: u64, len: u64) {
    fcntl(f.as_fd(), FcntlArg::F_OFD_SETLK(&flock(ty, start, len))).expect("setlk");
}

fn free(f: &File, start: u64, len: u64) -> bool {
    let mut fl = flock(libc::F_WRLCK, start, len);
    fcntl(f.as_fd(), FcntlArg::F_OFD_GETLK(&mut fl)).expect("getlk");
    i32::from(fl.l_type) == libc::F_UNLCK
}

/// The least an implementation could do: 4 lock runs, one covering probe, close.
fn bare(path: &Path) {
    let f = File::open(path).expect("open"); // std opens with O_CLOEXEC
    for (start, len) in [(100, 2), (103, 1), (201, 1), (203, 1)] {
        setlk(&f, libc::F_RDLCK, start, len);
    }
    assert!(free(&f, 101, 103));
}

/// QEMU's sequence: every byte locked, probed and unlocked on its own.
fn qemu(path: &Path) {
    let f = File::open(path).expect("open");
    let bytes = [100, 101, 103, 201, 203];
    for b in bytes {
        setlk(&f, libc::F_RDLCK, b, 1);
    }
    for b in [200, 201, 203, 101, 103] {
        assert!(free(&f, b, 1));
    }
    for b in bytes {
        setlk(&f, libc::F_UNLCK, b, 1);
    }
}

fn qlock(path: &Path, opts: &LockOptions) {
    let guard = ImageLock::acquire_with(path, Access::WRITE, opts).expect("acquire");
    drop(guard);
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds per call of `f`, over one batch.
fn batch(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..BATCH {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(BATCH)
}

/// `fs` describes the filesystem, `tag` names it in the goal lines.
fn bench_acquire(dir: &Path, fs: &str, tag: &str) {
    let path = dir.join("disk.qcow2");
    std::fs::write(&path, b"").expect("image");
    let opts = LockOptions::default();
    let before = fcntl_calls();
    qlock(&path, &opts);
    let calls = fcntl_calls() - before;

    let (mut q, mut b, mut e) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Rotate the order so that no variant always runs first (cache, frequency effects).
        for k in 0..3 {
            match (round + k) % 3 {
                0 => q.push(batch(|| qlock(&path, &opts))),
                1 => b.push(batch(|| bare(&path))),
                _ => e.push(batch(|| qemu(&path))),
            }
        }
    }
    let (q, b, e) = (median(&mut q), median(&mut b), median(&mut e));
    println!(
        "acquire+release of write on {fs}: qlock {q:.0} ns, bare {b:.0} ns, qemu sequence {e:.0} ns; \
         fcntl calls: qlock {calls}, qemu 15"
    );
    // Goal lines: see `cargo xtask bench` (xtask/src/bench.rs).
    println!("ratio acquire/bare ({tag}): {:.2}x (goal <= 1.25)", q / b);
    println!("ratio acquire/qemu ({tag}): {:.2}x (goal <= 0.65)", q / e);
    println!("goal fcntl calls per acquire+release ({tag}): {calls} calls (goal <= 8)");
}

/// 500 processes holding two images each; returns them with the image paths.
fn start_holders(dir: &Path) -> (Vec<Child>, File, Vec<PathBuf>) {
    let paths: Vec<PathBuf> = (0..HOLDERS * 2).map(|i| dir.join(format!("{i}.qcow2"))).collect();
    for p in &paths {
        File::create(p).expect("image");
    }
    // One pipe is every holder's stdin: closing its write end releases them all at once.
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
    let exe = std::env::current_exe().expect("current exe");
    let children: Vec<Child> = paths
        .chunks(2)
        .map(|pair| {
            Command::new(&exe)
                .env(ROLE, "holder")
                .env("QLOCK_PATHS", format!("{}\n{}", pair[0].display(), pair[1].display()))
                .stdin(Stdio::from(read.try_clone().expect("dup")))
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn holder")
        })
        .collect();
    let mut children = children;
    for c in &mut children {
        let mut line = String::new();
        BufReader::new(c.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "READY", "holder failed to start");
    }
    (children, File::from(write), paths)
}

/// The floor of a one-walk inspection: every `/proc/*/fdinfo/*` read once, nothing parsed.
/// Returns the bytes read, so the work cannot be optimised away.
fn read_all_fdinfo() -> usize {
    let mut total = 0;
    let mut buf = Vec::with_capacity(4096);
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    for p in procs.flatten() {
        if !p.file_name().as_encoded_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else { continue };
        for fd in fds.flatten() {
            buf.clear();
            if let Ok(mut f) = File::open(fd.path()) {
                total += f.read_to_end(&mut buf).unwrap_or(0);
            }
        }
    }
    total
}

fn bench_inspect(dir: &Path) {
    let spawn = Instant::now();
    let (mut children, release, paths) = start_holders(dir);
    let spawned = spawn.elapsed();

    let fdinfos: usize = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|p| std::fs::read_dir(p.path().join("fdinfo")).ok())
        .map(Iterator::count)
        .sum();
    let (mut times, mut floor) = (Vec::new(), Vec::new());
    for round in 0..9 {
        let check = |out: Vec<Result<qlock_core::ImageStatus, qlock_core::Error>>| {
            for (i, status) in out.iter().enumerate() {
                let status = status.as_ref().expect("inspect");
                let [h] = &status.holders[..] else { panic!("{}: {:?}", paths[i].display(), status.holders) };
                assert_eq!(h.pid, children[i / 2].id(), "holder of image {i}");
            }
        };
        // Alternate which goes first, so neither always meets a colder cache.
        for k in 0..2 {
            let start = Instant::now();
            if (round + k) % 2 == 0 {
                check(inspect(&paths));
                times.push(start.elapsed().as_secs_f64() * 1e3);
            } else {
                assert!(read_all_fdinfo() > 0);
                floor.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let (all, floor) = (median(&mut times), median(&mut floor));
    let n = paths.len();
    println!(
        "inspect {n} images / {HOLDERS} holders ({fdinfos} descriptors on the machine): {all:.1} ms; \
         reading every /proc/*/fdinfo/* once: {floor:.1} ms"
    );
    println!("ratio inspect vs /proc floor: {:.2}x (goal <= 1.3)", all / floor);
    println!("  ({HOLDERS} holder processes started in {:.2} s)", spawned.as_secs_f64());
    drop(release);
    for c in &mut children {
        c.wait().expect("holder exit");
    }
}

fn holder() {
    let paths = std::env::var("QLOCK_PATHS").expect("QLOCK_PATHS");
    let _guards: Vec<ImageLock> =
        paths.lines().map(|p| ImageLock::acquire(p, Access::WRITE).expect("hold")).collect();
    let _padding: Vec<File> =
        (5..FDS_PER_HOLDER).map(|_| File::open("/dev/null").expect("/dev/null")).collect();
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").and_then(|()| out.flush()).expect("ready");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn main() {
    if std::env::var_os(ROLE).is_some() {
        holder();
        return;
    }
    // `cargo bench -- inspect` or `-- acquire` runs one part.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let run = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let total = Instant::now();
    if run("acquire") {
        if Path::new("/dev/shm").is_dir() {
            let shm = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
            bench_acquire(shm.path(), "tmpfs", "tmpfs");
        }
        let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp dir");
        bench_acquire(disk.path(), "target dir's filesystem (ext4 here)", "target dir");
    }
    if run("inspect") {
        let dir = tempfile::tempdir().expect("tmp dir");
        bench_inspect(dir.path());
    }
    println!("bench time: {:.1} s", total.elapsed().as_secs_f64());
}
