//! `qlock` as a careful Unix tool: one image under many names, output that cannot be written,
//! arguments it must refuse, and a waiting line that fits the terminal.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::{QLOCK, held_by_qemu_io, qlock, raw, stderr};

fn qlock_many(args: &[&str], images: &[PathBuf]) -> std::process::Output {
    Command::new(QLOCK).args(args).args(images).output().expect("run qlock")
}

/// The names one image goes by: itself twice, `dir/./name`, a symlink, a hard link.
fn spellings(img: &Path) -> Vec<(&'static str, Vec<PathBuf>)> {
    let dir = img.parent().unwrap();
    let name = img.file_name().unwrap();
    let link = dir.join("link.img");
    let hard = dir.join("hard.img");
    if !link.exists() {
        std::os::unix::fs::symlink(img, &link).unwrap();
        std::fs::hard_link(img, &hard).unwrap();
    }
    vec![
        ("twice", vec![img.to_path_buf(), img.to_path_buf()]),
        ("dot", vec![img.to_path_buf(), dir.join(".").join(name)]),
        ("symlink", vec![img.to_path_buf(), link]),
        ("hard link", vec![hard, img.to_path_buf()]),
    ]
}

#[test]
fn an_image_named_twice_is_taken_once() {
    let img = raw();
    for (how, names) in spellings(img.path()) {
        let o = qlock_many(&["check", "--access", "write"], &names);
        assert_eq!(o.status.code(), Some(0), "check, {how}: {}", stderr(&o));
        // --timeout bounds what would otherwise wait forever on itself.
        let o = qlock_many(&["wait", "--access", "write", "--timeout", "5"], &names);
        assert_eq!(o.status.code(), Some(0), "wait, {how}: {}", stderr(&o));
        let o = Command::new(QLOCK)
            .args(["run", "--access", "write", "--wait", "--timeout", "5"])
            .args(&names)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "run, {how}: {}", stderr(&o));
    }
    // A relative spelling against an absolute one.
    let o = Command::new(QLOCK)
        .args(["check", "--access", "write"])
        .arg(img.path())
        .arg(Path::new(".").join(img.path().file_name().unwrap()))
        .current_dir(img.path().parent().unwrap())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "check, ./name: {}", stderr(&o));
}

#[test]
fn status_names_the_holder_under_every_name() {
    let Some((img, _vm)) = held_by_qemu_io() else { return };
    for (how, names) in spellings(img.path()) {
        let o = qlock_many(&["status", "--json"], &names);
        assert_eq!(o.status.code(), Some(0), "{how}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for (i, name) in names.iter().enumerate() {
            let image = &v["images"][i];
            assert_eq!(image["path"], name.display().to_string(), "{how}");
            assert_eq!(image["holders"][0]["command"], "qemu-io", "{how}, name {i}: {image}");
        }
    }
}

#[test]
fn output_that_cannot_be_written_is_an_error_not_a_panic() {
    let img = raw();
    let full = || File::options().write(true).open("/dev/full").expect("/dev/full");
    for args in [&["check", "--access", "write"][..], &["status", "--json"], &["status"]] {
        let o = Command::new(QLOCK).args(args).arg(img.path()).stdout(full()).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.contains("No space left on device"), "{args:?}: {err}");
    }
}

/// `qlock status` on 2,000 images into a reader that takes one byte and goes away.
fn status_into_a_closed_pipe(sigpipe: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> = (0..2000).map(|i| dir.path().join(format!("{i}.img"))).collect();
    for p in &images {
        File::create(p).unwrap();
    }
    let mut child = Command::new("sh")
        .args(["-c", &format!("trap '{sigpipe}' PIPE; exec \"$@\""), "sh", QLOCK, "status"])
        .args(&images)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut byte = [0u8];
    out.read_exact(&mut byte).unwrap();
    drop(out); // like `| head -c1`
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_pipe_ends_quietly_as_for_other_unix_tools() {
    // SIGPIPE at its default, as shells start commands: qlock dies of it, silently, like cat.
    let o = status_into_a_closed_pipe("-");
    assert_eq!(o.status.signal(), Some(nix::libc::SIGPIPE), "{:?}: {}", o.status, stderr(&o));
    assert_eq!(stderr(&o), "");
    // Started with SIGPIPE ignored, a write error: one line and exit 2, like coreutils.
    let o = status_into_a_closed_pipe("");
    assert_eq!(o.status.code(), Some(2), "{:?}", o.status);
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("Broken pipe"), "{}", stderr(&o));
}

#[test]
fn timeout_implies_waiting_in_check_and_run() {
    let Some((img, vm)) = held_by_qemu_io() else { return };
    let o = qlock(&["check", "--access", "read", "--timeout", "0.2"], img.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Timed out after"), "check waited: {}", stderr(&o));
    let o = Command::new(QLOCK)
        .args(["run", "--access", "read", "--timeout", "0.2"])
        .arg(img.path())
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Timed out after"), "run waited: {}", stderr(&o));
    // And gets in once the holder goes (handshake: the waiter met the holder once).
    let mut check = Command::new(QLOCK)
        .args(["check", "--access", "read", "--timeout", "60"])
        .arg(img.path())
        .env("QLOCK_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(check.stderr.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut err, &mut first).unwrap();
    assert!(first.contains("waiting"), "{first}");
    drop(vm);
    assert_eq!(check.wait().unwrap().code(), Some(0));
}

#[test]
fn bad_arguments_say_why_in_one_short_line() {
    let img = raw();
    for (value, why) in [
        ("-1", "negative"),
        ("nan", "not a number"),
        ("inf", "leave out --timeout"),
        ("1e300", "too large"),
        ("soon", "not a number"),
    ] {
        let o = Command::new(QLOCK)
            .args(["wait", "--access", "read", "--timeout", value])
            .arg(img.path())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{value}");
        let err = stderr(&o);
        assert!(err.contains(why), "--timeout {value}: {err}");
        assert!(!err.contains("-- -1"), "no hint to pass it as an argument: {err}");
    }
    for list in ["", " ", ","] {
        for flag in ["--perm", "--share"] {
            let o = Command::new(QLOCK).args(["check", flag, list]).arg(img.path()).output().unwrap();
            assert_eq!(o.status.code(), Some(2), "{flag} {list:?}: {}", stderr(&o));
            assert!(stderr(&o).contains("empty"), "{flag} {list:?}: {}", stderr(&o));
        }
    }
    let o = Command::new(QLOCK)
        .args(["check", "--access", "read", "--locking", "yes"])
        .arg(img.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("auto, on or off"), "{}", stderr(&o));
}

#[test]
fn errors_name_the_path_once_in_every_subcommand() {
    let img = raw();
    let missing = img.path().with_file_name("missing.img");
    let name = missing.display().to_string();
    for args in [&["status"][..], &["check", "--access", "read"], &["wait", "--access", "read"]] {
        let o = qlock(args, &missing);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert_eq!(stderr(&o).matches(&name).count(), 1, "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn the_waiting_line_fits_the_terminal() {
    let Some((img, vm)) = held_by_qemu_io() else { return };
    let size = nix::pty::Winsize { ws_row: 24, ws_col: 60, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
    let mut waiter = Command::new(QLOCK)
        .args(["wait", "--access", "read", "--timeout", "60"])
        .arg(img.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::from(pty.slave))
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let mut master = File::from(pty.master);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // EIO once every slave descriptor is closed.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("waiting") {
        seen.extend(rx.recv_timeout(std::time::Duration::from_secs(60)).expect("a waiting line"));
    }
    drop(vm);
    assert_eq!(waiter.wait().unwrap().code(), Some(0));
    seen.extend(rx.iter().flatten());
    let text = String::from_utf8_lossy(&seen).replace("\x1b[K", "");
    for line in text.split(['\r', '\n']) {
        assert!(
            line.chars().count() < 60,
            "{} columns on a 60-column terminal: {line:?}",
            line.chars().count()
        );
    }
    assert!(text.contains("waiting"), "{text:?}");
}
