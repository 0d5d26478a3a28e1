//! The `qlock` binary against real QEMU processes on real images.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use common::{QLOCK, held_by_qemu_io, qcow2, qlock, raw, real, stderr};
use qlock_testkit::FrontEnd;

/// QEMU's message after the tool's prefix, e.g. `Failed to get "write" lock` and the hint.
fn qemu_message(o: &Output) -> String {
    let text = stderr(o);
    let first = text.lines().next().unwrap_or_default();
    let msg = first.rsplit_once(": Failed").map(|(_, m)| format!("Failed{m}")).unwrap_or_default();
    let hint = text.lines().nth(1).unwrap_or_default();
    format!("{msg}\n{hint}")
}

#[test]
fn check_agrees_with_qemu_io_against_a_real_qemu_holder() {
    let Some((img, _vm)) = held_by_qemu_io() else { return };
    // (preset, the qemu-io newcomer with the same access)
    for (preset, qemu_args) in [("read", &["-r", "-f", "qcow2"][..]), ("write", &["-f", "qcow2"][..])] {
        let ours = qlock(&["check", "--access", preset], img.path());
        let theirs =
            Command::new("qemu-io").args(qemu_args).args(["-c", "quit"]).arg(img.path()).output().unwrap();
        assert_eq!(ours.status.code(), Some(1), "{}", stderr(&ours));
        assert!(!theirs.status.success());
        assert_eq!(qemu_message(&ours), qemu_message(&theirs), "{preset}");
        assert!(stderr(&ours).contains("(qemu-io)"), "names the holder: {}", stderr(&ours));
    }
    let ours = qlock(&["check", "--access", "force-share"], img.path());
    assert_eq!(ours.status.code(), Some(0), "{}", stderr(&ours));
}

#[test]
fn check_reports_bad_input_with_exit_2() {
    let img = raw();
    let missing = img.path().with_file_name("missing.img");
    let o = qlock(&["check", "--access", "read"], &missing);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("No such file or directory"), "{}", stderr(&o));
    let o = qlock(&["check", "--access", "read"], img.path().parent().unwrap());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("Is a directory"));
    let o = qlock(&["check", "--access", "bogus"], img.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown access preset"));
    let o = qlock(&["check", "--perm", "write", "--share", "consistent-read"], img.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn run_holds_the_locks_for_the_command_only_and_passes_its_status() {
    qlock_testkit::require!("qemu-io", "qemu-img");
    let img = qcow2();
    // Inside CMD, a QEMU writer must be refused, and the holder must be qlock, not CMD.
    let script = r#"qemu-io -f qcow2 -c quit "$1" 2>&1; echo "child=$$"; exit 7"#;
    let o = Command::new(QLOCK)
        .args(["run", "--access", "write"])
        .arg(img.path())
        .args(["--", "sh", "-c", script, "sh"])
        .arg(img.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(7), "{out} {}", stderr(&o));
    assert!(out.contains("Failed to get \"write\" lock"), "{out}");
    // After qlock exits, the image is free again.
    let after = Command::new("qemu-io").args(["-f", "qcow2", "-c", "quit"]).arg(img.path()).output().unwrap();
    assert!(after.status.success(), "{}", stderr(&after));
}

#[test]
fn run_close_does_not_leak_the_locks_into_the_command() {
    let img = raw();
    // CMD asks `qlock status` who holds the image: with --close the holder is its parent, not
    // CMD itself.
    let script = r#"echo "me=$$ parent=$PPID"; "$0" status --json "$1""#;
    let o = Command::new(QLOCK)
        .args(["run", "--close", "--access", "write"])
        .arg(img.path())
        .args(["--", "sh", "-c", script, QLOCK])
        .arg(img.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let (ids, json) = out.split_once('\n').unwrap();
    let parent: u64 = ids.split("parent=").nth(1).unwrap().trim().parse().unwrap();
    let me: u64 = ids.split("me=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let pids: Vec<u64> =
        v["images"][0]["holders"].as_array().unwrap().iter().map(|h| h["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids, vec![parent], "holders {pids:?}, CMD is {me}");
    assert_eq!(v["images"][0]["perm_bytes"], serde_json::json!([100, 101, 103]));
}

#[test]
fn run_is_all_or_nothing_over_several_images() {
    qlock_testkit::require!("qemu-io", "qemu-img");
    let free = qcow2();
    let busy = qcow2();
    let _vm = real(&busy, FrontEnd::QemuIoRw);
    let o = Command::new(QLOCK)
        .args(["run", "--access", "read", "--conflict-exit-code", "75"])
        .args([free.path(), busy.path()])
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(75), "{}", stderr(&o));
    assert!(stderr(&o).contains("Failed to get shared \"write\" lock"));
    let s = qlock(&["status", "--json"], free.path());
    let v: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
    assert_eq!(v["images"][0]["holders"], serde_json::json!([]), "first image left locked");
}

#[test]
fn wait_times_out_naming_the_holder_then_gets_in_when_it_exits() {
    let Some((img, vm)) = held_by_qemu_io() else { return };
    let o = qlock(&["wait", "--access", "read", "--timeout", "0.2"], img.path());
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("Timed out") && err.contains("Failed to get shared \"write\" lock"), "{err}");
    assert!(err.contains("(qemu-io)"), "{err}");

    let mut waiter = Command::new(QLOCK)
        .args(["wait", "--access", "read", "--timeout", "60"])
        .arg(img.path())
        .env("QLOCK_LOG", "debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Handshake: the waiter has met the holder at least once.
    let mut lines = BufReader::new(waiter.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("waiting"), "{first}");
    drop(vm);
    assert_eq!(waiter.wait().unwrap().code(), Some(0));
}

#[test]
fn status_json_describes_holders_and_presets() {
    qlock_testkit::require!("qemu-io", "qemu-img");
    let img = raw();
    let _writer = real(&img, FrontEnd::QemuIoRw); // raw rw: 100 101, shares everything
    let o = qlock(&["status", "--json"], img.path());
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let image = &v["images"][0];
    assert_eq!(image["perm_bytes"], serde_json::json!([100, 101]));
    assert_eq!(image["unshare_bytes"], serde_json::json!([]));
    assert_eq!(image["uses"], serde_json::json!(["consistent-read", "write"]));
    assert_eq!(image["holders"][0]["command"], "qemu-io");
    assert_eq!(image["holders"][0]["perm_bytes"], serde_json::json!([100, 101]));
    for free in ["force-share", "write-shared"] {
        assert_eq!(image["presets"][free]["free"], true, "{free}");
    }
    for busy in ["read", "write", "info"] {
        assert_eq!(image["presets"][busy]["free"], false, "{busy}");
        assert_eq!(image["presets"][busy]["message"], "Failed to get shared \"write\" lock");
        assert_eq!(image["presets"][busy]["byte"], 101);
    }
    let missing = img.path().with_file_name("nope");
    let o = Command::new(QLOCK).args(["status", "--json"]).arg(img.path()).arg(&missing).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["images"][1]["error"].as_str().unwrap().contains("No such file"));
}
