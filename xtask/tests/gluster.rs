//! Locks across two hosts on a real GlusterFS volume: qlock-testkit's `GlusterBed` (glusterd
//! and a brick in one network namespace, FUSE clients of the same volume in two more), with real
//! `qemu-io` and the `qlock` binary on both mounts. What these tests pin down is written up in
//! docs/shared-storage.md.
//!
//! Every test builds its own bed (about 3 s) and tears it down on drop. They need root, FUSE,
//! network namespaces and glusterfs-server + glusterfs-client: without them they skip, except
//! under `CI=true`, where they fail (.ci/run installs GlusterFS). No sleep stands in for a
//! handshake: holders are ready when they say so (qemu-io's prompt, a ready line); only effects
//! on the other host (a lock vanishing on the brick) are polled, with deadlines.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;
use qlock_testkit::gluster::{GlusterBed, poll_until};
use qlock_testkit::raw::flock;
use qlock_testkit::{FakeQemu, Format, FrontEnd};

use common::{image, qcow2, qlock, qlock_bin, text};

// ---- probes: raw F_OFD_GETLK / F_OFD_SETLK, as another QEMU would make them ----

/// `F_OFD_GETLK` for a write lock on `byte`: `Some(l_pid)` of a conflicting lock, `None` if free.
fn holder_of(path: &Path, byte: u64) -> Option<i32> {
    let file =
        OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(path).expect("open for probe");
    let mut fl = flock(libc::F_WRLCK, byte, 1);
    fcntl(&file, FcntlArg::F_OFD_GETLK(&mut fl)).expect("F_OFD_GETLK");
    (i32::from(fl.l_type) != libc::F_UNLCK).then_some(fl.l_pid)
}

/// Whether none of `bytes` is held, seen through `path`.
fn all_free(path: &Path, bytes: &[u64]) -> bool {
    bytes.iter().all(|&b| holder_of(path, b).is_none())
}

/// Tries a write lock on `byte` through `path` (then drops it with the descriptor).
fn try_write_lock(path: &Path, byte: u64) -> Result<(), Errno> {
    let file =
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path).expect("open rw");
    fcntl(&file, FcntlArg::F_OFD_SETLK(&flock(libc::F_WRLCK, byte, 1))).map(|_| ())
}

// ---- tools ----

/// A real interactive `qemu-io` holding an image read-write: ready at its first prompt.
struct QemuIo {
    child: Child,
    stdin: ChildStdin,
    out: Receiver<Vec<u8>>,
}

const PROMPT: &str = "qemu-io> ";

impl QemuIo {
    /// Opens `image` (qcow2, read-write); the error is what qemu-io printed when it refused.
    fn open(image: &Path) -> Result<QemuIo, String> {
        let mut child = Command::new("sh")
            .args(["-c", "exec qemu-io -f qcow2 \"$1\" 2>&1", "sh"])
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn qemu-io");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, out) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let mut q = QemuIo { child, stdin, out };
        match q.until_prompt(Duration::from_secs(30)) {
            Ok(_) => Ok(q),
            Err(e) => Err(e),
        }
    }

    /// Output up to the next prompt; `Err(output)` when qemu-io exits first or hangs.
    fn until_prompt(&mut self, deadline: Duration) -> Result<String, String> {
        let start = Instant::now();
        let mut acc = Vec::new();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            match self.out.recv_timeout(left) {
                Ok(chunk) => acc.extend(chunk),
                Err(_) => return Err(text(&acc)),
            }
            if text(&acc).ends_with(PROMPT) {
                return Ok(text(&acc).trim_end_matches(PROMPT).to_string());
            }
        }
    }

    /// Runs one qemu-io command and returns its output.
    fn command(&mut self, cmd: &str, deadline: Duration) -> Result<String, String> {
        writeln!(self.stdin, "{cmd}").map_err(|e| e.to_string())?;
        self.until_prompt(deadline)
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A qcow2 image made through host A and held read-write there by a real qemu-io: the holder,
/// and the image's path on host A and on host B.
fn held_on_host_a(bed: &GlusterBed, name: &str) -> (QemuIo, PathBuf, PathBuf) {
    let (on_a, on_b) = qcow2(bed, name);
    let qemu_a = QemuIo::open(&on_a).expect("qemu-io on host A");
    (qemu_a, on_a, on_b)
}

/// qemu-io's one-line refusal opening `image` read-write, from `Failed` on.
fn qemu_io_refusal(image: &Path) -> Option<String> {
    let out =
        Command::new("qemu-io").args(["-f", "qcow2", "-c", "quit"]).arg(image).output().expect("qemu-io");
    let err = text(&out.stderr);
    let line = err.lines().find(|l| l.contains("Failed"))?;
    Some(line[line.find("Failed")?..].to_string())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The bytes a `qemu-io -f qcow2` writer holds (observed with `qlock status` on a local disk):
/// perm 100 101 103, unshared 201 203.
const WRITER_BYTES: [u64; 5] = [100, 101, 103, 201, 203];

// ---- the bed itself ----

#[test]
fn the_bed_builds_two_hosts_and_leaves_nothing_behind() {
    let started = Instant::now();
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    eprintln!("bed {} up in {:?}", bed.id(), started.elapsed());
    let id = bed.id().to_string();

    // Two FUSE clients of the same volume: a file written through A is read through B.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for host in [bed.host_a(), bed.host_b()] {
        let line =
            info.lines().find(|l| l.split(' ').nth(4) == Some(&host.mount().to_string_lossy())).unwrap();
        assert!(line.contains(" - fuse.glusterfs "), "{line}");
    }
    std::fs::write(bed.host_a().path("hello"), b"from A").unwrap();
    assert_eq!(std::fs::read(bed.host_b().path("hello")).unwrap(), b"from A");

    // Each client daemon runs in its own host's network namespace.
    for host in [bed.host_a(), bed.host_b()] {
        let pid = host.client_pid().expect("client running");
        let ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
        let want = std::fs::metadata(format!("/run/netns/{}", host.netns())).unwrap().ino();
        assert_eq!(ns, want, "host {}'s client is not in its namespace", host.name());
    }
    // glusterd, the brick and two clients, all naming the bed's directory.
    let pids = bed.processes();
    assert_eq!(pids.len(), 4, "{pids:?}");
    let brick_socket = std::fs::read_to_string(bed.dir().join("run/brick-socket")).unwrap();
    assert!(Path::new(&brick_socket).exists(), "{brick_socket}");

    let started = Instant::now();
    drop(bed);
    eprintln!("bed {id} torn down in {:?}", started.elapsed());
    assert_eq!(GlusterBed::leftovers(&id), Vec::<String>::new());
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(state.is_empty() || state.contains(") Z "), "pid {pid} still running: {state}");
    }
    assert!(!Path::new(&brick_socket).exists(), "{brick_socket} left behind");
}

// ---- what host B sees of host A's locks ----

#[test]
fn host_b_sees_and_respects_host_a_qemu() {
    qlock_testkit::require!("qemu-io");
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let (mut qemu_a, on_a, on_b) = held_on_host_a(&bed, "vm.qcow2");

    // F_OFD_GETLK on host B reports host A's read locks, with no pid (l_pid = -1).
    for byte in WRITER_BYTES {
        assert_eq!(holder_of(&on_b, byte), Some(-1), "byte {byte} through host B");
    }
    assert_eq!(holder_of(&on_b, 102), None);
    // A write lock on a byte host A read-locked fails on host B.
    assert_eq!(try_write_lock(&on_b, 100), Err(Errno::EAGAIN));
    // Real QEMU on host B is refused.
    let refusal = qemu_io_refusal(&on_b).expect("qemu-io on host B was not refused");
    assert_eq!(refusal, "Failed to get \"write\" lock");

    // qlock on host B: the same verdict and message as QEMU's.
    let out = qlock(&["check", "--access", "write"], &on_b);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let first = format!("qlock: {}: {refusal}", on_b.display());
    assert_eq!(text(&out.stderr).lines().next(), Some(first.as_str()), "{}", text(&out.stderr));
    // qlock status on host B shows the bytes; the holder is on another host, so no pid.
    let out = qlock(&["status"], &on_b);
    let status = text(&out.stdout);
    assert!(
        status.lines().any(|l| l.starts_with("held") && l.ends_with("100 101 103 | 201 203")),
        "{status}"
    );
    let holder = status.lines().find(|l| l.starts_with("holder")).unwrap_or_default();
    assert!(!holder.contains("pid"), "{status}");
    eprintln!("qlock status on host B names: {holder}");

    // Host A's QEMU quits: its locks go with it (the release is asynchronous through FUSE).
    drop(qemu_a.command("quit", Duration::from_secs(10)));
    let (_, freed) = poll_until(Duration::from_secs(10), Duration::from_millis(1), || {
        all_free(&on_b, &WRITER_BYTES).then_some(())
    })
    .expect("host A's locks still seen on host B after qemu-io quit");
    eprintln!("qemu-io quit on A: free on B after {freed:?}");

    // The other way round: qlock holds on host B, a QEMU newcomer on host A is refused.
    let mut run = Command::new(qlock_bin())
        .args(["run", "--access", "write"])
        .arg(&on_b)
        .args(["--", "sh", "-c", "echo ready; read line || true"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    run.stdout.as_mut().unwrap().read_exact(&mut ready).expect("qlock run ready line");
    assert_eq!(&ready, b"ready\n");
    assert_eq!(qemu_io_refusal(&on_a).as_deref(), Some("Failed to get \"write\" lock"));
    assert!(QemuIo::open(&on_a).is_err());
    drop(run.stdin.take());
    assert!(run.wait().unwrap().success());
}

#[test]
fn a_killed_holder_on_host_a_is_gone_for_host_b_within_milliseconds() {
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let (on_a, on_b) = image(&bed, "vm.img");
    let mut times = Vec::new();
    for _ in 0..20 {
        let mut vm =
            FakeQemu::builder(&on_a).front_end(FrontEnd::VmDisk, Format::Raw).spawn().expect("holder on A");
        assert_eq!(holder_of(&on_b, 201), Some(-1));
        let killed = Instant::now();
        vm.kill().expect("SIGKILL the holder");
        let (_, _) = poll_until(Duration::from_secs(10), Duration::from_micros(200), || {
            all_free(&on_b, &[100, 101, 201]).then_some(())
        })
        .expect("a SIGKILLed holder's locks still seen on host B after 10 s");
        times.push(killed.elapsed());
    }
    times.sort();
    eprintln!(
        "SIGKILL on A -> free on B: p50 {:?}, p99 {:?} (n = {})",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.len()
    );
    assert!(percentile(&times, 0.99) < Duration::from_secs(2), "{times:?}");
}

#[test]
fn a_crashed_host_a_client_releases_its_locks_at_once() {
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let (on_a, on_b) = image(&bed, "vm.img");
    let vm = FakeQemu::builder(&on_a).front_end(FrontEnd::VmDisk, Format::Raw).spawn().expect("holder on A");
    assert_eq!(holder_of(&on_b, 201), Some(-1));
    let crashed = Instant::now();
    bed.host_a().kill_client().expect("SIGKILL host A's glusterfs");
    let (_, freed) = poll_until(Duration::from_secs(30), Duration::from_millis(1), || {
        all_free(&on_b, &[100, 101, 201]).then_some(())
    })
    .expect("host A's locks still seen on host B 30 s after its client died");
    eprintln!("host A's client SIGKILLed: free on B after {:?}", crashed.elapsed());
    assert!(freed < Duration::from_secs(5), "{freed:?}");
    // The holder itself still runs on host A, its mount dead under it.
    assert!(Path::new(&format!("/proc/{}", vm.pid())).exists());
    let err = File::open(&on_a).expect_err("host A's mount after its client died");
    eprintln!("host A's mount after the crash: {err}");
}

// ---- the dangerous case: a partition ----

/// Host A's QEMU holds the image; host A is cut off; the brick drops its locks while that QEMU
/// runs; the network heals. Returns how long host B waited to see the image free, and what
/// host A's QEMU got when it wrote through its old descriptor after the heal.
fn partition_and_heal(bed: &GlusterBed, free_within: Duration) -> (Duration, String) {
    let (mut qemu_a, _, on_b) = held_on_host_a(bed, "vm.qcow2");
    assert!(
        qemu_a.command("write -P 0x11 0 4k", Duration::from_secs(10)).unwrap().contains("wrote 4096/4096")
    );
    assert_eq!(holder_of(&on_b, 201), Some(-1));

    bed.host_a().partition().unwrap();
    let cut = Instant::now();
    // Host B keeps probing: the locks vanish on the brick once it gives up on host A.
    let (_, freed) =
        poll_until(free_within, Duration::from_millis(100), || all_free(&on_b, &WRITER_BYTES).then_some(()))
            .unwrap_or_else(|| {
                panic!("host A's locks still held on the brick {free_within:?} after the partition")
            });
    eprintln!("partition: host A's locks gone on host B after {freed:?}");
    assert!(qemu_a.is_running(), "host A's QEMU must still run");
    // Host B's QEMU can now open the image read-write while host A's still has it open.
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xbb 64k 4k"])
        .arg(&on_b)
        .output()
        .unwrap();
    assert!(out.status.success(), "host B's qemu-io during the partition: {}", text(&out.stderr));
    std::fs::write(bed.host_b().path("written-during-partition"), b"B").unwrap();

    bed.host_a().heal().unwrap();
    let healed = Instant::now();
    // Host A's client is back once it can look up a file created while it was away.
    let (_, back) = poll_until(Duration::from_secs(60), Duration::from_millis(100), || {
        std::fs::read(bed.host_a().path("written-during-partition")).ok()
    })
    .expect("host A's client did not reconnect within 60 s of the heal");
    eprintln!("heal: host A's mount answers after {back:?} (partition lasted {:?})", healed - cut);
    let written =
        qemu_a.command("write -P 0xaa 128k 4k", Duration::from_secs(30)).expect("qemu-io on host A answers");
    // Whatever host A's QEMU got, its locks are not back: host B sees the image free.
    assert!(all_free(&on_b, &WRITER_BYTES), "host A's locks came back after the heal");
    let out = qlock(&["check", "--access", "write"], &on_b);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    (freed, written)
}

#[test]
fn a_partition_drops_host_a_locks_and_the_heal_does_not_take_them_back() {
    qlock_testkit::require!("qemu-io");
    // GlusterFS 10.3 defaults: the brick gives up on a silent client after ~42 s
    // (server.tcp-user-timeout 42; keepalive 20 + 9 x 2 s).
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let (freed, written) = partition_and_heal(&bed, Duration::from_secs(120));
    assert!(freed > Duration::from_secs(20), "{freed:?}: sooner than the keepalive allows");
    // client.strict-locks is off: host A's client reopened the descriptor without its locks,
    // and host A's QEMU writes on, unprotected, next to host B's.
    assert!(written.contains("wrote 4096/4096"), "{written}");
    let fuse_vol = std::fs::read_dir(bed.dir().join("wd/vols").join(bed.volume()))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .find(|v| v.contains("type protocol/client"))
        .unwrap();
    assert!(fuse_vol.contains("option strict-locks off"), "{fuse_vol}");
}

#[test]
fn strict_locks_fence_host_a_writes_after_the_heal_but_do_not_keep_host_b_out() {
    qlock_testkit::require!("qemu-io");
    // Short timeouts so that the brick gives up within seconds; client.strict-locks on.
    let options = [
        ("client.strict-locks", "on"),
        ("server.keepalive-time", "2"),
        ("server.keepalive-interval", "1"),
        ("server.keepalive-count", "2"),
        ("server.tcp-user-timeout", "3"),
        ("network.ping-timeout", "3"),
    ];
    let Some(bed) = GlusterBed::start_or_skip_with(&options) else { return };
    let (freed, written) = partition_and_heal(&bed, Duration::from_secs(30));
    assert!(freed < Duration::from_secs(15), "{freed:?}");
    // The descriptor that held locks is not reopened: host A's QEMU gets EBADFD.
    assert!(written.contains("write failed: File descriptor in bad state"), "{written}");
}

// ---- the compat slice across hosts ----

#[test]
fn the_compat_slice_across_hosts_agrees_and_catches_a_mutated_preset() {
    use qlock_core::Access;
    use xtask::compat::{self, MatrixNewcomer};
    qlock_testkit::require!("qemu-io");
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let build = xtask::qemu::QemuBuild::from_path().expect("qemu-utils on PATH");
    let sides = xtask::across::sides(&build, &bed).unwrap();
    let keep = |label: String, names: &[&str]| names.contains(&label.as_str());
    let holders: Vec<_> = xtask::across::holders()
        .into_iter()
        .filter(|h| keep(h.label(), &["qemu-io (qcow2)", "qemu-nbd -r (raw)", "qlock read"]))
        .collect();
    let newcomers = |run_read_as: Access| -> Vec<MatrixNewcomer> {
        let names = ["qlock read", "qemu-io (qcow2)", "qemu-io -r (qcow2)", "img info (qcow2)"];
        let kept = xtask::across::newcomers().into_iter().filter(|n| keep(n.label(), &names));
        kept.map(|n| match n {
            MatrixNewcomer::Qlock { name: "read", claimed, .. } => {
                MatrixNewcomer::Qlock { name: "read", claimed, run: run_read_as }
            }
            n => n,
        })
        .collect()
    };
    let report = compat::run_matrix(&sides, holders.clone(), newcomers(Access::READ), 1).unwrap();
    assert_eq!(report.failures().count(), 0, "{}", report.render());
    // Real refusals across hosts, with QEMU's messages, not only grants.
    let refused = report.cells.iter().flatten().flatten().filter(|c| c.symbol() != '.').count();
    assert!(refused >= 5, "{}", report.render());
    assert!(report.summary().starts_with("compat (gluster, across hosts): "), "{}", report.summary());
    // The newcomers' QEMU ran inside host B's namespace, through the wrappers.
    assert!(sides.newcomer.build.origin.ends_with("host B"), "{}", sides.newcomer.build.origin);

    // `read` that forgets to unshare write: a qemu-io writer on host A no longer stops it.
    let mutated = compat::run_matrix(&sides, holders, newcomers(Access::FORCE_SHARE), 1).unwrap();
    let failures: Vec<String> = mutated.failures().map(|c| c.detail.clone()).collect();
    let caught = failures
        .iter()
        .find(|d| d.starts_with("holder qemu-io (qcow2), newcomer qlock read vs qemu-io -r (qcow2)"))
        .unwrap_or_else(|| panic!("not caught across hosts:\n{}", mutated.render()));
    assert!(caught.contains("qlock: granted"), "{caught}");
    assert!(caught.contains("refused: Failed to get shared \"write\" lock"), "{caught}");
}

// ---- waiting across hosts: polling only (no inotify event crosses hosts) ----

/// `qlock run --wait` on `image`, printing `got it` once it holds; its stdout lines arrive on
/// the receiver.
fn qlock_run_wait(image: &Path) -> (Child, Receiver<String>) {
    let mut child = Command::new(qlock_bin())
        .args(["run", "--wait", "--timeout", "60", "--access", "write"])
        .arg(image)
        .args(["--", "echo", "got it"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qlock run --wait");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// `ImageLock::acquire_wait` for `write` on `image` in a thread; the result arrives on the
/// receiver with the instant it came.
fn acquire_wait_in_thread(image: &Path) -> Receiver<(Result<qlock_core::ImageLock, String>, Instant)> {
    let (tx, rx) = channel();
    let image = image.to_path_buf();
    std::thread::spawn(move || {
        let backoff = qlock_core::Backoff::default().with_timeout(Duration::from_secs(60));
        let opts = qlock_core::LockOptions::default();
        let r = qlock_core::ImageLock::acquire_wait(&image, qlock_core::Access::WRITE, &opts, &backoff);
        let _ = tx.send((r.map_err(|e| e.to_string()), Instant::now()));
    });
    rx
}

/// A waiter that has not got in within 300 ms while the holder lives: still waiting (a
/// bounded observation, not a handshake: a wrong grant would show here or in the checks after).
const STILL_WAITING: Duration = Duration::from_millis(300);

#[test]
fn waiters_on_host_b_get_in_when_the_holder_on_host_a_exits() {
    qlock_testkit::require!("qemu-io");
    let Some(bed) = GlusterBed::start_or_skip() else { return };

    // `qlock run --wait` on host B behind a real qemu-io on host A, which quits.
    let (mut qemu_a, _, on_b) = held_on_host_a(&bed, "run-wait.qcow2");
    let (run, lines) = qlock_run_wait(&on_b);
    assert!(lines.recv_timeout(STILL_WAITING).is_err(), "qlock run got in while host A's qemu-io held");
    let quit = Instant::now();
    drop(qemu_a.command("quit", Duration::from_secs(10)));
    assert_eq!(lines.recv_timeout(Duration::from_secs(30)).as_deref(), Ok("got it"));
    eprintln!("qemu-io quit on A -> qlock run --wait on B ran its command after {:?}", quit.elapsed());
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The library's acquire_wait on host B behind a holder process on host A, which exits.
    let (on_a, on_b) = image(&bed, "lib-wait.img");
    let mut holder = FakeQemu::builder(&on_a).front_end(FrontEnd::VmDisk, Format::Raw).spawn().unwrap();
    let waiter = acquire_wait_in_thread(&on_b);
    assert!(waiter.recv_timeout(STILL_WAITING).is_err(), "acquire_wait got in while host A held");
    let released = Instant::now();
    assert!(holder.release().unwrap().success());
    let (guard, at) = waiter.recv_timeout(Duration::from_secs(30)).expect("acquire_wait still waiting");
    let guard = guard.expect("acquire_wait on host B");
    eprintln!("holder exit on A -> acquire_wait on B returned after {:?}", at - released);
    // Host B's guard now keeps host A's QEMU out.
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "quit"]).arg(&on_a).output().unwrap();
    assert!(text(&out.stderr).contains("Failed to get \"write\" lock"), "{}", text(&out.stderr));
    drop(guard);
}

#[test]
fn waiters_on_host_b_get_in_when_host_a_crashes() {
    let Some(bed) = GlusterBed::start_or_skip() else { return };
    let (run_a, run_b) = image(&bed, "crash-run.img");
    let (lib_a, lib_b) = image(&bed, "crash-lib.img");
    let holders: Vec<FakeQemu> = [&run_a, &lib_a]
        .map(|p| FakeQemu::builder(p).front_end(FrontEnd::VmDisk, Format::Raw).spawn().unwrap())
        .into();
    let (mut run, lines) = qlock_run_wait(&run_b);
    let waiter = acquire_wait_in_thread(&lib_b);
    assert!(lines.recv_timeout(STILL_WAITING).is_err(), "qlock run got in while host A held");
    assert!(waiter.try_recv().is_err(), "acquire_wait got in while host A held");

    let crashed = Instant::now();
    bed.host_a().kill_client().expect("SIGKILL host A's glusterfs");
    assert_eq!(lines.recv_timeout(Duration::from_secs(30)).as_deref(), Ok("got it"));
    eprintln!("host A crashed -> qlock run --wait on B ran its command after {:?}", crashed.elapsed());
    let (guard, at) = waiter.recv_timeout(Duration::from_secs(30)).expect("acquire_wait still waiting");
    let guard = guard.expect("acquire_wait on host B");
    eprintln!("host A crashed -> acquire_wait on B returned after {:?}", at - crashed);
    assert!(run.wait().unwrap().success());
    // Host A's holders still run, their mount dead under them.
    for h in &holders {
        assert!(Path::new(&format!("/proc/{}", h.pid())).exists());
    }
    drop(guard);
}
