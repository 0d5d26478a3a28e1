//! `cargo bench -p qlock-cli`: the `qlock` binary (built with the bench profile, i.e. release)
//! against what users run instead, and fairness under mixed contention.
//!
//! 1. One `qlock check IMAGE --access read` process against one `qemu-img info IMAGE` process
//!    (what Nova, Cinder, packer and lima pay per query today), on the same qcow2 image, in
//!    interleaved runs; the medians are compared. Goal <= 0.25x, for the binary as shipped
//!    (`cargo xtask dist`, static musl: `QLOCK_DIST_BIN` names it, and `cargo xtask bench`
//!    sets it); the dynamically linked cargo build is printed beside it. Start-up is most of a
//!    query: `/bin/true` alone is about 0.2x of `qemu-img info` on the project's VM.
//! 2. Fairness, reported without a goal: 3 processes taking `read` and 3 taking `write`
//!    through `qlock run --wait` in a loop on one image, each holding it for 1 ms per round.
//!    The wait of a round is the time from starting `qlock run` to its command starting (so it
//!    includes qlock's start-up, the same for every process).
//!
//! # Writer starvation
//!
//! Waiters poll (QEMU's protocol has no queue: a newcomer probes, and fails or gets in), so a
//! writer needs a moment with no reader at all, while a reader only needs no writer: with
//! readers overlapping, a writer can wait indefinitely. What could bound it without breaking
//! compatibility with QEMU, whose newcomers never hold bytes while they wait (so nothing qlock
//! does may make a QEMU newcomer fail that would have got in otherwise, beyond what a holder
//! already does):
//!
//! - A writer's intent, visible only to qlock processes: a waiting writer takes a lock on a
//!   byte outside QEMU's ranges (QEMU probes only 100-103 and 200-203), e.g. a read lock on
//!   byte 300; qlock readers probe it before taking `read` and back off while it is held. QEMU
//!   never sees byte 300, so QEMU newcomers behave as before, and qlock readers defer to
//!   waiting writers: bounded starvation among qlock processes, none added for QEMU. Readers
//!   that are QEMU processes still starve qlock writers, as they starve each other today.
//! - Shorter backoff for writers that have waited long (aging): cheap, no protocol change, but
//!   only shifts the odds; it bounds nothing while readers overlap continuously.
//! - A queue file (ticket lock beside the image): fair among qlock processes, but a second
//!   protocol that QEMU ignores and that a crashed qlock must not wedge; intent bytes die with
//!   their descriptor, which is why they are preferred.
//!
//! The holder of a round is this binary re-executed with `QLOCK_BENCH_ROLE=held`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROLE: &str = "QLOCK_BENCH_ROLE";
const QLOCK: &str = env!("CARGO_BIN_EXE_qlock");

fn main() {
    if std::env::var_os(ROLE).is_some() {
        // The command of `qlock run`: it holds the image (inherited descriptors) while it runs.
        println!("in");
        std::io::stdout().flush().unwrap();
        std::thread::sleep(Duration::from_millis(1));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let run = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if run("check") {
        check_vs_qemu_img(dir.path());
    }
    if run("fairness") {
        fairness(dir.path());
    }
}

fn qcow2(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64M")
        .status()
        .expect("qemu-img on PATH");
    assert!(ok.success(), "qemu-img create");
    path
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Milliseconds from spawning `cmd` to its exit, checking it exits 0.
fn timed(cmd: &mut Command) -> f64 {
    let t = Instant::now();
    let status = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().expect("spawn");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(status.success(), "{cmd:?}: {status}");
    ms
}

/// The shipped binary (`cargo xtask dist`, which `cargo xtask bench` builds and names here),
/// static: see xtask's `dist` module.
const DIST: &str = "QLOCK_DIST_BIN";

fn check_vs_qemu_img(dir: &Path) {
    let image = qcow2(dir, "check.qcow2");
    let dist = std::env::var_os(DIST).map(PathBuf::from);
    let mut qlocks = vec![("cargo build (dynamic)".to_string(), PathBuf::from(QLOCK))];
    let libc = std::env::var("QLOCK_DIST_LIBC").unwrap_or_else(|_| "static".into());
    qlocks.extend(dist.map(|d| (format!("dist build ({libc})"), d)));
    let runs = 41;
    // Interleaved: every round runs each binary and qemu-img once, in a rotating order.
    let mut times = vec![Vec::new(); qlocks.len() + 1];
    for round in 0..runs {
        for k in 0..times.len() {
            let which = (round + k) % times.len();
            let t = match qlocks.get(which) {
                Some((_, bin)) => {
                    timed(Command::new(bin).arg("check").arg(&image).args(["--access", "read"]))
                }
                None => timed(Command::new("qemu-img").arg("info").arg(&image)),
            };
            times[which].push(t);
        }
    }
    let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    let qemu_img = medians[qlocks.len()];
    println!("== one process per query, median of {runs} interleaved runs");
    for ((label, _), q) in qlocks.iter().zip(&medians) {
        println!("qlock check --access read, {label:21} {q:.2} ms");
    }
    println!("qemu-img info                                      {qemu_img:.2} ms");
    // The goal holds the binary users are given: the dist build when there is one.
    let shipped = qlocks.len() - 1;
    if shipped == 0 {
        println!("(no {DIST}: measuring the cargo build; `cargo xtask bench` measures the dist build)");
    }
    println!("check vs qemu-img info measured on the {}", qlocks[shipped].0);
    println!("ratio check vs qemu-img info: {:.2}x (goal <= 0.25)", medians[shipped] / qemu_img);
}

fn fairness(dir: &Path) {
    let image = qcow2(dir, "fair.qcow2");
    let exe = std::env::current_exe().unwrap();
    let span = Duration::from_secs(3);
    let workers: Vec<_> = ["read", "read", "read", "write", "write", "write"]
        .into_iter()
        .map(|access| {
            let (image, exe) = (image.clone(), exe.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut waits = Vec::new();
                while start.elapsed() < span {
                    let t = Instant::now();
                    let mut child = Command::new(QLOCK)
                        .arg("run")
                        .arg(&image)
                        .args(["--access", access, "--wait", "--"])
                        .arg(&exe)
                        .env(ROLE, "held")
                        .stdout(Stdio::piped())
                        .spawn()
                        .expect("qlock run");
                    let mut line = String::new();
                    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
                    assert_eq!(line.trim(), "in", "qlock run {access} failed");
                    waits.push(t.elapsed());
                    assert!(child.wait().unwrap().success());
                }
                (access, waits)
            })
        })
        .collect();
    let results: Vec<(&str, Vec<Duration>)> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("== fairness: 3 `read` and 3 `write` processes through `qlock run --wait`, {span:?}");
    let totals: Vec<f64> = results.iter().map(|(_, w)| ms(w.iter().sum())).collect();
    for ((access, waits), total) in results.iter().zip(&totals) {
        println!("{access:<5} rounds {:>4}  total wait {total:>8.1} ms", waits.len());
    }
    let mut all: Vec<Duration> = results.iter().flat_map(|(_, w)| w.iter().copied()).collect();
    all.sort();
    let q = |p: f64| ms(all[((all.len() - 1) as f64 * p).round() as usize]);
    let (max, min) = totals.iter().fold((0f64, f64::MAX), |(a, b), &t| (a.max(t), b.min(t)));
    println!("total wait per process: max/min {:.2}x ({max:.1} / {min:.1} ms)", max / min);
    println!("wait per round: p50 {:.2} ms, p99 {:.2} ms, over {} rounds", q(0.5), q(0.99), all.len());
    let class =
        |a: &str| -> f64 { results.iter().zip(&totals).filter(|((x, _), _)| *x == a).map(|(_, t)| t).sum() };
    println!("writers' total wait / readers': {:.2}x", class("write") / class("read"));
    let rounds = |a: &str| -> usize { results.iter().filter(|(x, _)| *x == a).map(|(_, w)| w.len()).sum() };
    let mean = |a: &str| class(a) / rounds(a).max(1) as f64;
    println!(
        "mean wait per round: writers {:.1} ms, readers {:.1} ms ({:.2}x): every process waits \
         nearly all the time, so starvation shows in rounds won, not in total wait",
        mean("write"),
        mean("read"),
        mean("write") / mean("read")
    );
}
