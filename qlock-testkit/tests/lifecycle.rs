//! Changing, releasing, crashing and refusing holders, checked from outside.

use std::os::unix::process::ExitStatusExt;

use qlock_core::{Access, ImageLock};
use qlock_testkit::fixtures::{HeldImage, TempImage, qcow2_image, raw_image, vm_on_qcow2};
use qlock_testkit::{Error, FakeQemu, Format, FrontEnd, RawLock};
use rstest::rstest;

fn held(path: &std::path::Path) -> String {
    qlock_core::inspect(&[path]).remove(0).unwrap().others.held.to_string()
}

#[rstest]
fn kill_crashes_the_holder_and_its_locks_go(vm_on_qcow2: HeldImage) {
    let HeldImage { mut holder, image } = vm_on_qcow2;
    assert!(ImageLock::acquire(&image, Access::READ).is_err());
    let status = holder.kill().unwrap();
    assert_eq!(status.signal(), Some(9));
    assert_eq!(held(image.path()), "- | -");
    drop(ImageLock::acquire(&image, Access::WRITE).unwrap());
    assert_eq!(holder.wait().unwrap().signal(), Some(9), "wait after kill reports the same end");
}

#[rstest]
fn release_exits_cleanly(vm_on_qcow2: HeldImage) {
    let HeldImage { mut holder, image } = vm_on_qcow2;
    assert_eq!(holder.release().unwrap().code(), Some(0));
    assert_eq!(held(image.path()), "- | -");
}

#[rstest]
fn wait_reports_a_holder_killed_by_someone_else(qcow2_image: TempImage) {
    let mut h = FakeQemu::builder(&qcow2_image).access(Access::READ).spawn().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(h.pid() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert_eq!(h.wait().unwrap().signal(), Some(15));
    let err = h.set_access(Access::WRITE).unwrap_err();
    assert!(matches!(err, Error::Gone { .. }), "{err}");
}

#[rstest]
fn a_second_vm_is_refused_like_qemu_and_names_the_first(vm_on_qcow2: HeldImage) {
    let err =
        FakeQemu::builder(&vm_on_qcow2.image).front_end(FrontEnd::VmDisk, Format::Qcow2).spawn().unwrap_err();
    assert_eq!(err.qemu_message().as_deref(), Some("Failed to get \"write\" lock"));
    let text = err.to_string();
    assert!(text.contains("Is another process using the image"), "{text}");
    assert!(text.contains(&format!("pid {} (qemu-fake)", vm_on_qcow2.holder.pid())), "{text}");
    // The refused holder took nothing with it: the first still holds exactly its bytes.
    assert_eq!(held(vm_on_qcow2.image.path()), "100 101 103 | 201 203");
}

#[rstest]
fn set_access_uses_qemu_change_semantics(qcow2_image: TempImage) {
    // Spec V25: a `qemu-io -r` opener reopened read-write while someone holds 201.
    let mut reader =
        FakeQemu::builder(&qcow2_image).front_end(FrontEnd::QemuIoReadOnly, Format::Qcow2).spawn().unwrap();
    let other = FakeQemu::builder(&qcow2_image).access(Access::READ).spawn().unwrap();
    let err = reader.set_access(Access::WRITE).unwrap_err();
    assert_eq!(err.qemu_message().as_deref(), Some("Failed to get \"write\" lock"));
    assert_eq!(held(qcow2_image.path()), "100 | 201 203", "the failed change rolled back to the old set");
    drop(other);
    reader.set_access(Access::WRITE).unwrap();
    assert_eq!(held(qcow2_image.path()), "100 101 103 | 201 203");
    reader.set_access(Access::FORCE_SHARE).unwrap(); // fast path: only releases
    assert_eq!(held(qcow2_image.path()), "100 | -");
}

#[rstest]
fn a_write_lock_blocks_the_lock_phase(raw_image: TempImage) {
    // Spec V21 / V22 with a raw foreign holder.
    let _w = FakeQemu::builder(&raw_image).raw([RawLock::byte(100).exclusive()]).spawn().unwrap();
    let err = FakeQemu::builder(&raw_image).access(Access::READ).spawn().unwrap_err();
    assert_eq!(err.qemu_message().as_deref(), Some("Failed to lock byte 100"));
    FakeQemu::builder(&raw_image).access(Access::INFO).spawn().unwrap();
    // A raw set is not checked, but a conflicting raw lock still fails with the errno.
    let err = FakeQemu::builder(&raw_image).raw([RawLock::WHOLE_FILE]).spawn().unwrap_err();
    assert!(matches!(err, Error::RawLock { .. }), "{err}");
    assert!(
        err.to_string().starts_with("Failed to lock read 0-EOF (OFD): Resource temporarily unavailable"),
        "{err}"
    );
}

#[rstest]
fn set_raw_changes_locks_and_needs_writable_for_write_locks(raw_image: TempImage) {
    let mut h = FakeQemu::builder(&raw_image).raw([RawLock::WHOLE_FILE]).spawn().unwrap();
    h.set_raw(&RawLock::LEGACY_GRAPH_MOD).unwrap();
    let s = qlock_core::inspect(&[raw_image.path()]).remove(0).unwrap();
    assert_eq!(s.holders[0].ranges.len(), 2, "{:?}", s.holders[0].ranges);
    let err = h.set_raw(&[RawLock::byte(0).exclusive()]).unwrap_err();
    assert!(err.to_string().contains("Bad file descriptor"), "{err}");
    let mut w = FakeQemu::builder(&raw_image).writable(true).spawn().unwrap();
    w.set_raw(&[RawLock::byte(0).exclusive()]).unwrap();
    h.set_raw(&[]).unwrap();
    assert_eq!(qlock_core::inspect(&[raw_image.path()]).remove(0).unwrap().holders.len(), 1);
}

#[test]
fn bad_requests_fail_with_typed_errors() {
    let err = FakeQemu::builder("/nonexistent/disk.img").access(Access::READ).spawn().unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err}");
    assert!(err.to_string().contains("No such file or directory"), "{err}");
    let image = TempImage::new(Format::Raw).unwrap();
    let err = FakeQemu::builder(&image).raw([RawLock::range(u64::MAX - 1, 1)]).spawn().unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let err = FakeQemu::builder(&image).raw(vec![RawLock::byte(1); 200]).spawn().unwrap_err();
    assert!(err.to_string().contains("too large"), "{err}");
    let err = FakeQemu::builder(&image).front_end(FrontEnd::QemuImgCheck, Format::Raw).spawn().unwrap_err();
    assert!(matches!(err, Error::NotApplicable { .. }), "{err}");
}
