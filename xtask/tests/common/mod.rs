//! What the GlusterFS test binaries (`gluster`, `gluster_doctor`) share: the `qlock` binary
//! as the compat sections build it, and images made through host A's mount.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qlock_testkit::gluster::GlusterBed;

/// This worktree's `qlock` binary ([`xtask::qlock_bin::path`]: built once per test run, a no-op
/// when it is fresh).
pub(crate) fn qlock_bin() -> PathBuf {
    xtask::qlock_bin::path().expect("build the qlock binary")
}

/// `qlock ARGS IMAGE`, run to its end.
pub(crate) fn qlock(args: &[&str], image: &Path) -> Output {
    Command::new(qlock_bin()).args(args).arg(image).output().expect("run qlock")
}

/// Bytes a process printed, as text.
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A raw image of 1 MiB, created through host A's mount: its path on host A and on host B.
pub(crate) fn image(bed: &GlusterBed, name: &str) -> (PathBuf, PathBuf) {
    std::fs::write(bed.host_a().path(name), vec![0u8; 1 << 20]).expect("create image on host A");
    (bed.host_a().path(name), bed.host_b().path(name))
}

/// A qcow2 image of 16 MiB, created by qemu-img through host A's mount: its path on A and B.
pub(crate) fn qcow2(bed: &GlusterBed, name: &str) -> (PathBuf, PathBuf) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(bed.host_a().path(name))
        .arg("16M")
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{}", text(&out.stderr));
    (bed.host_a().path(name), bed.host_b().path(name))
}
