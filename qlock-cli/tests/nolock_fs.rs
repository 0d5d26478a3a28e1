//! The `qlock` binary on a real filesystem without lock support: a FUSE mount (qlock-testkit's
//! `FuseFs`) whose lock operation fails with ENOLCK, ENOSYS, EOPNOTSUPP or EINVAL.
//!
//! What QEMU 10.0.2 does there (observed with qemu-io on the same mount): fails at once with
//! `Failed to lock byte 100: <strerror>`, whatever the errno. `check`, `run` and `wait` must say
//! the same first line, exit 2 (an error, not a conflict: waiting cannot help) without waiting,
//! then a `hint:` saying what to do. `status` cannot see any lock there: it exits 2 with
//! `Failed to probe byte-range locks: <strerror>` and the same hint.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::libc;
use qlock_testkit::fuse::{FuseFs, Locks, UNSUPPORTED, is_mount_point};

const QLOCK: &str = env!("CARGO_BIN_EXE_qlock");

/// Waiting cannot help: every command must give up well before its `--timeout`.
const AT_ONCE: Duration = Duration::from_secs(5);

/// Mounts a filesystem failing locks with `errno`, with a raw image `disk.img` in it: the mount
/// and the image's path through it.
fn mount(errno: i32) -> Option<(FuseFs, PathBuf)> {
    let fs = FuseFs::mount_or_skip(Locks::Fail(errno))?;
    std::fs::write(fs.backing_path("disk.img"), vec![0u8; 1 << 20]).expect("create image");
    let img = fs.path("disk.img");
    Some((fs, img))
}

/// Runs qlock with `args` and then `image`, timing it.
fn qlock(args: &[&str], image: &Path) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(QLOCK).args(args).arg(image).output().expect("run qlock");
    (out, started.elapsed())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// qemu-io's first error line opening `img` read-write, from `Failed` on; `None` without
/// qemu-io outside CI.
fn qemu_io_line(img: &Path) -> Option<String> {
    let out = match Command::new("qemu-io").args(["-f", "raw", "-c", "quit"]).arg(img).output() {
        Ok(out) => out,
        Err(e) => {
            qlock_testkit::skip(format_args!("the comparison with qemu-io: {e}"));
            return None;
        }
    };
    assert!(!out.status.success(), "qemu-io opened {}", img.display());
    let err = stderr(&out);
    let line = err.lines().find(|l| l.contains("Failed"))?;
    Some(line[line.find("Failed")?..].to_string())
}

/// Asserts qlock's error output: `qlock: PATH: <QEMU's line>` then the advice.
fn assert_error(o: &Output, img: &Path, first: &str) {
    let err = stderr(o);
    let mut lines = err.lines();
    assert_eq!(lines.next(), Some(format!("qlock: {}: {first}", img.display()).as_str()), "{err}");
    let hint: Vec<&str> = lines.collect();
    assert!(hint.iter().all(|l| l.starts_with("hint: ")), "{err}");
    let hint = hint.join("\n");
    assert!(hint.contains("cannot lock") && hint.contains("--locking off"), "{err}");
    assert!(!err.contains("18446744073709551615"), "{err}");
}

#[test]
fn check_run_and_wait_fail_at_once_with_qemus_line_and_advice() {
    let _serial = qlock_testkit::serial();
    for (errno, text) in UNSUPPORTED {
        let Some((fs, img)) = mount(errno) else { return };
        let line = format!("Failed to lock byte 100: {text}");
        if let Some(qemu) = qemu_io_line(&img) {
            assert_eq!(qemu, line, "qemu-io on the same mount");
        }
        let marker = fs.backing_path("ran");
        let (image, marker_arg) = (img.to_str().unwrap(), marker.to_str().unwrap());
        for args in [
            &["check", image, "--access", "write"][..],
            &["check", image, "--access", "force-share"][..],
            &["wait", image, "--access", "read", "--timeout", "60"][..],
            &["run", image, "--access", "write", "--wait", "--timeout", "60", "--", "touch", marker_arg][..],
        ] {
            let started = Instant::now();
            let o = Command::new(QLOCK).args(args).output().expect("run qlock");
            assert!(started.elapsed() < AT_ONCE, "{text} {args:?} waited {:?}", started.elapsed());
            assert_eq!(o.status.code(), Some(2), "{text} {args:?}: {}", stderr(&o));
            assert_error(&o, &img, &line);
        }
        assert!(!marker.exists(), "{text}: the command ran without its locks");
        // The advice works: with locking off the command runs (and nothing is locked).
        let o = Command::new(QLOCK)
            .args(["run", image, "--access", "write", "--locking", "off", "--", "touch", marker_arg])
            .output()
            .expect("run qlock");
        assert_eq!(o.status.code(), Some(0), "{text}: {}", stderr(&o));
        assert!(marker.exists());
        assert!(fs.lock_calls() > 0, "the kernel forwarded the lock calls");
        // No qlock process left a file open on the mount (or unmounting would fail), and
        // nothing is left mounted.
        let mountpoint = fs.mountpoint().to_path_buf();
        fs.unmount().expect("unmount: nothing open on the mount");
        assert!(!is_mount_point(&mountpoint));
    }
}

#[test]
fn status_says_locking_cannot_work_there_without_a_bogus_range() {
    let _serial = qlock_testkit::serial();
    for (errno, text) in UNSUPPORTED {
        let Some((_fs, img)) = mount(errno) else { return };
        let (o, took) = qlock(&["status"], &img);
        assert!(took < AT_ONCE, "{text}: status took {took:?}");
        assert_eq!(o.status.code(), Some(2), "{text}: {}", stderr(&o));
        assert_error(&o, &img, &format!("Failed to probe byte-range locks: {text}"));
        assert!(o.stdout.is_empty(), "{}", String::from_utf8_lossy(&o.stdout));

        let (o, _) = qlock(&["status", "--json"], &img);
        assert_eq!(o.status.code(), Some(2), "{text}: {}", stderr(&o));
        let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
        let entry = &json["images"][0];
        assert_eq!(entry["error"], format!("Failed to probe byte-range locks: {text}"));
        assert!(entry["hint"].as_str().is_some_and(|h| h.contains("--locking off")), "{entry}");
    }
}

/// Other images in the same `status` call are still reported: the unsupported one fails alone.
#[test]
fn status_reports_the_other_images_beside_an_unsupported_one() {
    let _serial = qlock_testkit::serial();
    let Some((fs, img)) = mount(libc::ENOLCK) else { return };
    let local = fs.backing_path("disk.img");
    let o = Command::new(QLOCK).arg("status").arg(&local).arg(&img).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&local.display().to_string()) && out.contains("write         free"), "{out}");
    assert!(stderr(&o).contains("Failed to probe byte-range locks: No locks available"), "{}", stderr(&o));
}

/// The fixture leaves nothing mounted when a test panics while using it.
#[test]
fn a_panicking_test_leaves_nothing_mounted() {
    let _serial = qlock_testkit::serial();
    let Some(probe) = FuseFs::mount_or_skip(Locks::Fail(libc::ENOLCK)) else { return };
    drop(probe);
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::panic::catch_unwind(move || {
        let fs = FuseFs::mount(Locks::Fail(libc::ENOLCK)).expect("mount");
        let _open = std::fs::File::create(fs.path("busy.img")).expect("a file kept open");
        tx.send(fs.mountpoint().to_path_buf()).unwrap();
        panic!("test failure while the mount is busy");
    });
    assert!(panicked.is_err());
    let mountpoint = rx.recv().unwrap();
    assert!(!is_mount_point(&mountpoint), "{} still mounted", mountpoint.display());
}

/// A killed test process leaves nothing mounted either: `fusermount3` (auto_unmount) unmounts
/// once the server's end of /dev/fuse is closed by the kernel.
#[test]
fn a_killed_test_process_leaves_nothing_mounted() {
    let _serial = qlock_testkit::serial();
    let Some(probe) = FuseFs::mount_or_skip(Locks::Fail(libc::ENOLCK)) else { return };
    drop(probe);
    // This test binary again, running only `mount_then_block` below (which prints its line
    // after libtest's `test mount_then_block ... `).
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "mount_then_block", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child test");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mountpoint = lines
        .find_map(|l| l.ok()?.split_once("MOUNTED ").map(|(_, p)| std::path::PathBuf::from(p)))
        .expect("the child mounted");
    assert!(is_mount_point(&mountpoint));
    child.kill().unwrap();
    child.wait().unwrap();
    // fusermount3 gives no signal when done: watch the mount table, for at most 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mount_point(&mountpoint) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_mount_point(&mountpoint), "{} still mounted after SIGKILL", mountpoint.display());
}

const CHILD_ENV: &str = "QLOCK_TEST_FUSE_CHILD";

/// The child of `a_killed_test_process_leaves_nothing_mounted`; does nothing on its own.
#[test]
fn mount_then_block() {
    let _serial = qlock_testkit::serial();
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let fs = FuseFs::mount(Locks::Fail(libc::ENOLCK)).expect("mount");
    // Straight to fd 1: libtest may capture `println!` even under --nocapture.
    let mut out = std::io::stdout();
    std::io::Write::write_all(&mut out, format!("MOUNTED {}\n", fs.mountpoint().display()).as_bytes())
        .unwrap();
    std::io::Write::flush(&mut out).unwrap();
    // Until killed: stdin stays open and empty.
    let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
}
