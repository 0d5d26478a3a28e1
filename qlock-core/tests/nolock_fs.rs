//! The library on a real filesystem without lock support: a FUSE mount (qlock-testkit's
//! `FuseFs`) whose lock operation fails with ENOLCK, ENOSYS, EOPNOTSUPP or EINVAL, compared
//! with real `qemu-io` on the same mount; and a FUSE mount with no lock operation, where the
//! kernel keeps the locks.
//!
//! Observed with QEMU 10.0.2 on such a mount: every opener that locks fails at once with
//! `Failed to lock byte 100: <strerror>` (`qemu-img create` with byte 101), whatever the
//! errno; `qemu-img info` succeeds, since it locks no byte.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::libc;
use qlock_core::inspect;
use qlock_core::{Access, Backoff, Error, ImageLock, LockOptions, Verdict};
use qlock_testkit::fuse::{FuseFs, Locks, UNSUPPORTED};
use qlock_testkit::{FakeQemu, Format, FrontEnd};

/// Mounts `locks` with a 1 MiB qcow2 image `disk.qcow2` in it, created behind the mount (where
/// qemu-img can lock). `None` when FUSE or qemu-img is missing outside CI.
fn mount_with_image(locks: Locks) -> Option<FuseFs> {
    let fs = FuseFs::mount_or_skip(locks)?;
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(fs.backing_path("disk.qcow2"))
        .arg("1M")
        .status();
    match created {
        Ok(s) => assert!(s.success(), "qemu-img create: {s}"),
        Err(e) => {
            qlock_testkit::skip(format_args!("qemu-img: {e}"));
            return None;
        }
    }
    Some(fs)
}

/// The first line qemu-io prints opening `img` with `args`, from `Failed` on.
fn qemu_io_error(args: &[&str], img: &Path) -> String {
    let out = Command::new("qemu-io").args(args).args(["-c", "quit"]).arg(img).output().expect("run qemu-io");
    assert!(!out.status.success(), "qemu-io {args:?} opened {}", img.display());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("Failed")).unwrap_or_default();
    line[line.find("Failed").unwrap_or(0)..].to_string()
}

#[test]
fn acquire_fails_at_once_like_qemu_with_a_matchable_error_and_advice() {
    let _serial = qlock_testkit::serial();
    for (errno, text) in UNSUPPORTED {
        let Some(fs) = mount_with_image(Locks::Fail(errno)) else { return };
        let img = fs.path("disk.qcow2");
        // (qlock access, the qemu-io newcomer asking for the same bytes)
        for (access, qemu_args) in [
            (Access::READ, &["-r", "-f", "qcow2"][..]),
            (Access::WRITE, &["-f", "qcow2"][..]),
            (Access::FORCE_SHARE, &["-U", "-r", "-f", "qcow2"][..]),
        ] {
            let err = ImageLock::acquire(&img, access).unwrap_err();
            assert!(
                matches!(&err, Error::Unsupported { byte: 100, probe: false, source, .. }
                    if source.raw_os_error() == Some(errno)),
                "{text}: {err:?}"
            );
            // Display is QEMU's line, exactly; the advice is in hint().
            assert_eq!(err.to_string(), format!("Failed to lock byte 100: {text}"));
            assert_eq!(err.to_string(), qemu_io_error(qemu_args, &img), "{text} {access:?}");
            let hint = err.hint().expect("advice for an unsupported filesystem");
            assert!(hint.contains("cannot lock") && hint.contains("--locking off"), "{hint}");
        }
        // Waiting cannot help, so a wait fails as fast, with the same error.
        let backoff = Backoff::default().with_timeout(Duration::from_secs(30));
        let started = Instant::now();
        let err =
            ImageLock::acquire_wait(&img, Access::WRITE, &LockOptions::default(), &backoff).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "waited {:?}", started.elapsed());
        assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
        assert!(fs.lock_calls() > 0, "the kernel forwarded the lock calls to the filesystem");
        // Nothing stayed open on the mount (unmount would fail with EBUSY) or mounted.
        let mountpoint = fs.mountpoint().to_path_buf();
        fs.unmount().expect("unmount");
        assert!(!qlock_testkit::fuse::is_mount_point(&mountpoint));
    }
}

#[test]
fn inspect_reports_an_unsupported_filesystem_without_a_bogus_range() {
    let _serial = qlock_testkit::serial();
    for (errno, text) in UNSUPPORTED {
        let Some(fs) = mount_with_image(Locks::Fail(errno)) else { return };
        let err = inspect(&[fs.path("disk.qcow2")]).remove(0).unwrap_err();
        assert!(matches!(err, Error::Unsupported { probe: true, .. }), "{err:?}");
        assert_eq!(err.to_string(), format!("Failed to probe byte-range locks: {text}"));
        assert!(err.hint().is_some_and(|h| h.contains("cannot lock")), "{:?}", err.hint());
    }
}

#[test]
fn other_lock_errors_keep_qemus_line_and_get_no_advice() {
    let _serial = qlock_testkit::serial();
    let Some(fs) = mount_with_image(Locks::Fail(libc::EIO)) else { return };
    let img = fs.path("disk.qcow2");
    let err = ImageLock::acquire(&img, Access::READ).unwrap_err();
    assert!(matches!(err, Error::Lock { .. }), "{err:?}");
    assert_eq!(err.to_string(), qemu_io_error(&["-r", "-f", "qcow2"], &img));
    assert_eq!(err.hint(), None);
    // A probe error that is not "unsupported" names its range, to the end of the file.
    let err = inspect(&[&img]).remove(0).unwrap_err();
    assert_eq!(err.to_string(), "Failed to probe bytes 0-EOF: Input/output error");
}

/// With no lock operation the kernel keeps the locks itself: they work between processes of
/// this host, on the mount's inode only (the file behind the mount sees none of them), and the
/// filesystem never hears of them.
#[test]
fn without_a_lock_operation_the_kernel_keeps_locks_on_this_host() {
    let _serial = qlock_testkit::serial();
    let Some(fs) = mount_with_image(Locks::Local) else { return };
    let img = fs.path("disk.qcow2");
    let vm = match FakeQemu::real(&img, FrontEnd::QemuIoRw, Format::Qcow2) {
        Ok(vm) => vm,
        Err(e) if e.is_skip() => return qlock_testkit::skip(e),
        Err(e) => panic!("qemu-io on the mount: {e}"),
    };
    let err = ImageLock::acquire(&img, Access::WRITE).unwrap_err();
    let conflict = err.conflict().expect("a conflict with qemu-io");
    assert_eq!(conflict.qemu_message(), "Failed to get \"write\" lock");
    assert!(conflict.holders.iter().any(|h| h.pid == vm.pid()), "{err}");
    let status = inspect(&[&img]).remove(0).unwrap();
    assert_ne!(status.verdict(Access::WRITE), Verdict::Granted);
    // The same file reached without FUSE: another inode, no lock.
    let behind = inspect(&[fs.backing_path("disk.qcow2")]).remove(0).unwrap();
    assert!(behind.others.held.is_empty(), "{:?}", behind.others);
    assert_eq!(fs.lock_calls(), 0);
    drop(vm);
    let _free = ImageLock::acquire(&img, Access::WRITE).expect("free once qemu-io is gone");
}
