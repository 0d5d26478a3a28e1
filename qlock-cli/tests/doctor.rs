//! `qlock doctor` and the storage fields of `qlock status` (`lock_scope`, `held_elsewhere`) on
//! real filesystems of this machine: ext4 (this worktree's target directory), tmpfs
//! (`/dev/shm`), and FUSE mounts (qlock-testkit's `FuseFs`) whose locks fail or stay in the
//! local kernel; with real `qemu-io` holders, one of them started with `locking=off`.
//! GlusterFS (cluster scope, "held elsewhere") is in `xtask/tests/gluster_doctor.rs`; NFS is
//! covered by the unit tests of the mountinfo rules in qlock-core's `storage` module only.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::libc;
use qlock_testkit::fuse::{FuseFs, Locks};
use qlock_testkit::{FakeQemu, Format, FrontEnd, ReadyChild};
use serde_json::Value;

const QLOCK: &str = env!("CARGO_BIN_EXE_qlock");

/// Serialises this binary's tests: a child one test spawns shares, until it execs, every
/// descriptor of the process, including another test's open file on its FUSE mount.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn qlock(args: &[&str], paths: &[&Path]) -> Output {
    Command::new(QLOCK).args(args).args(paths).output().expect("run qlock")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `qlock doctor --json PATH`: exit 0, one entry, returned.
fn doctor_json(path: &Path) -> Value {
    let out = qlock(&["doctor", "--json"], &[path]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("doctor --json prints JSON");
    assert_eq!(v["schema"], 1, "{v}");
    let paths = v["paths"].as_array().expect("paths");
    assert_eq!(paths.len(), 1, "{v}");
    assert_eq!(paths[0]["path"], path.display().to_string());
    paths[0].clone()
}

/// `qlock status --json PATH`: exit 0, the image's entry.
fn status_json(path: &Path) -> Value {
    let out = qlock(&["status", "--json"], &[path]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    v["images"][0].clone()
}

fn hazard_ids(entry: &Value) -> Vec<String> {
    entry["hazards"]
        .as_array()
        .expect("hazards")
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect()
}

/// `findmnt`'s view of the filesystem holding `path`: type, mount point, source.
fn findmnt(path: &Path) -> Option<(String, String, String)> {
    if !qlock_testkit::require("findmnt") {
        return None;
    }
    let out = Command::new("findmnt")
        .args(["-n", "-r", "-o", "FSTYPE,TARGET,SOURCE", "--target"])
        .arg(path)
        .output()
        .expect("findmnt");
    let line = text(&out.stdout);
    let mut f = line.split_whitespace().map(str::to_string);
    Some((f.next()?, f.next()?, f.next()?))
}

/// A raw image of 1 MiB in a fresh directory under `base`.
fn raw_image_in(base: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("qlock-doctor-").tempdir_in(base).expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("create image");
    (dir, img)
}

/// What every healthy local filesystem must show: doctor agrees with findmnt, host scope, OFD
/// works, nothing to warn about; status says host and never "held elsewhere", even with a real
/// QEMU holding the image.
fn local_filesystem(base: &Path, want_fs: &str) {
    qlock_testkit::require!("qemu-io");
    let (_dir, img) = raw_image_in(base);
    let Some((fstype, target, source)) = findmnt(&img) else { return };
    assert_eq!(fstype, want_fs, "{} is not on {want_fs} on this machine", base.display());

    let d = doctor_json(&img);
    assert_eq!(d["filesystem"], fstype, "{d}");
    assert_eq!(d["mount_point"], target, "{d}");
    assert_eq!(d["mount_source"], source, "{d}");
    assert!(d["mount_options"].as_str().unwrap().split(',').any(|o| o == "rw"), "{d}");
    assert_eq!((d["lock_scope"].as_str(), d["ofd"].as_bool()), (Some("host"), Some(true)), "{d}");
    assert!(hazard_ids(&d).is_empty(), "{d}");

    let table = qlock(&["doctor"], &[&img]);
    assert_eq!(table.status.code(), Some(0));
    let t = text(&table.stdout);
    assert!(t.lines().any(|l| l == format!("filesystem    {fstype}")), "{t}");
    assert!(t.lines().any(|l| l == "OFD locks     yes"), "{t}");
    assert!(t.lines().any(|l| l.starts_with("lock scope    host (")), "{t}");
    assert!(t.lines().any(|l| l == "hazards       none known"), "{t}");

    let _qemu = qemu_io(&img, false);
    let s = status_json(&img);
    assert_eq!(s["perm_bytes"], serde_json::json!([100, 101]), "{s}");
    assert_eq!((s["lock_scope"].as_str(), s["held_elsewhere"].as_bool()), (Some("host"), Some(false)), "{s}");
    let t = text(&qlock(&["status"], &[&img]).stdout);
    assert!(t.lines().any(|l| l.starts_with("lock scope    host (")), "{t}");
    assert!(!t.contains("held elsewhere"), "{t}");
}

#[test]
fn ext4_is_host_scope_with_working_ofd_locks() {
    let _serial = serial();
    // This worktree's target directory: on the machine's disk (ext4 here), never a tmpfs.
    local_filesystem(Path::new(env!("CARGO_TARGET_TMPDIR")), "ext4");
}

#[test]
fn tmpfs_is_host_scope_with_working_ofd_locks() {
    let _serial = serial();
    local_filesystem(Path::new("/dev/shm"), "tmpfs");
}

#[test]
fn a_fuse_filesystem_whose_locks_fail_has_no_lock_scope() {
    let _serial = serial();
    for errno in [libc::ENOLCK, libc::EOPNOTSUPP] {
        let Some(fs) = FuseFs::mount_or_skip(Locks::Fail(errno)) else { return };
        std::fs::write(fs.backing_path("disk.img"), vec![0u8; 1 << 20]).unwrap();
        let img = fs.path("disk.img");
        let d = doctor_json(&img);
        // The fixture's subtype is "nolock", its fsname "qlock-testkit".
        assert_eq!(d["filesystem"], "fuse.nolock", "{d}");
        assert_eq!(d["mount_source"], "qlock-testkit", "{d}");
        assert_eq!(d["mount_point"], fs.mountpoint().display().to_string(), "{d}");
        assert_eq!((d["lock_scope"].as_str(), d["ofd"].as_bool()), (Some("none"), Some(false)), "{d}");
        assert_eq!(hazard_ids(&d), ["no-locks"], "{d}");
        assert!(fs.lock_calls() > 0, "the probe reached the filesystem");
        let t = text(&qlock(&["doctor"], &[&img]).stdout);
        assert!(t.lines().any(|l| l.starts_with("OFD locks     no (")), "{t}");
        assert!(t.lines().any(|l| l.starts_with("lock scope    none (")), "{t}");
        assert!(t.contains("what to do"), "{t}");
        // status cannot probe there at all (unchanged): exit 2 with the probe's error.
        assert_eq!(qlock(&["status", "--json"], &[&img]).status.code(), Some(2));
    }
}

/// A FUSE filesystem without a lock handler leaves locks to this host's kernel. doctor finds
/// out (a read lock on byte 2^62 shows in its fdinfo) and says `host`, with the hazard that
/// other hosts reaching the files would not see them; status, which never takes a lock, says
/// `unknown` for a FUSE filesystem it does not know, and names the holders (their locks are in
/// fdinfo), never "held elsewhere".
#[test]
fn a_fuse_filesystem_with_kernel_local_locks_is_host_scope_for_doctor() {
    let _serial = serial();
    let Some(fs) = FuseFs::mount_or_skip(Locks::Local) else { return };
    std::fs::write(fs.backing_path("disk.img"), vec![0u8; 1 << 20]).unwrap();
    let img = fs.path("disk.img");
    let d = doctor_json(&img);
    assert_eq!(d["filesystem"], "fuse.locallock", "{d}");
    assert_eq!((d["lock_scope"].as_str(), d["ofd"].as_bool()), (Some("host"), Some(true)), "{d}");
    assert_eq!(hazard_ids(&d), ["fuse-local-locks"], "{d}");
    assert_eq!(fs.lock_calls(), 0, "no lock call reaches a filesystem without a lock handler");

    let holder = FakeQemu::builder(&img).front_end(FrontEnd::VmDisk, Format::Raw).spawn().expect("holder");
    let s = status_json(&img);
    assert_eq!(
        (s["lock_scope"].as_str(), s["held_elsewhere"].as_bool()),
        (Some("unknown"), Some(false)),
        "{s}"
    );
    assert_eq!(s["holders"][0]["pid"], holder.pid(), "{s}");
    drop(holder);
}

/// A real QEMU with `locking=off` holding the image takes no lock: doctor names it. One with
/// locking on, and the same QEMU seen from another image, are not named.
#[test]
fn doctor_names_a_qemu_that_has_the_image_open_with_locking_off() {
    let _serial = serial();
    qlock_testkit::require!("qemu-io");
    let (_dir, img) = raw_image_in(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let (_other_dir, other) = raw_image_in(Path::new(env!("CARGO_TARGET_TMPDIR")));

    let unlocked = qemu_io(&img, true);
    assert_eq!(status_json(&img)["perm_bytes"], serde_json::json!([]), "locking=off takes no byte");
    let d = doctor_json(&img);
    assert_eq!(hazard_ids(&d), ["qemu-locking-off"], "{d}");
    let h = &d["hazards"][0];
    let named = format!("pid {} (qemu-io) has the image open with locking=off", unlocked.pid());
    assert!(h["text"].as_str().unwrap().starts_with(&named), "{h}");
    assert!(!h["advice"].as_str().unwrap().is_empty());
    assert!(hazard_ids(&doctor_json(&other)).is_empty(), "another image is not affected");
    drop(unlocked);
    assert!(hazard_ids(&doctor_json(&img)).is_empty(), "gone with the QEMU");

    let _locked = qemu_io(&img, false);
    assert!(hazard_ids(&doctor_json(&img)).is_empty(), "a locking QEMU is no hazard");
}

/// Every path is reported; one that cannot be inspected makes the exit status 2. A directory
/// (where images would go) is a path like any other.
#[test]
fn doctor_reports_every_path_and_exits_2_when_one_fails() {
    let _serial = serial();
    let (dir, img) = raw_image_in(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let missing = dir.path().join("missing.img");
    let out = qlock(&["doctor", "--json"], &[&img, &missing, dir.path()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let paths = v["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 3, "{v}");
    assert_eq!(paths[0]["lock_scope"], "host");
    assert!(paths[1]["error"].as_str().unwrap().contains("No such file or directory"), "{v}");
    assert_eq!(
        (paths[2]["lock_scope"].as_str(), paths[2]["ofd"].as_bool()),
        (Some("host"), Some(true)),
        "{v}"
    );

    let out = qlock(&["doctor"], &[&img, &missing]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stdout).contains("lock scope    host"), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("missing.img"), "{}", text(&out.stderr));
}

/// A real interactive `qemu-io` holding a raw image read-write, ready at its first prompt.
/// `locking_off`: opened as Proxmox and LXD do, with `file.locking=off`.
fn qemu_io(image: &Path, locking_off: bool) -> ReadyChild {
    let mut cmd = Command::new("qemu-io");
    if locking_off {
        let opts = format!("driver=raw,file.driver=file,file.filename={},file.locking=off", image.display());
        cmd.arg("--image-opts").arg(opts);
    } else {
        cmd.args(["-f", "raw"]).arg(image);
    }
    ReadyChild::spawn(cmd, "qemu-io> ").unwrap_or_else(|e| panic!("qemu-io on {}: {e}", image.display()))
}
