//! The downstream crate's own tests: only `qlock-testkit`'s public API, only a dev-dependency.

use qlock_downstream_example::{BackupError, backup};
use qlock_testkit::fixtures::{HeldImage, TempImage, qcow2_image, raw_image, vm_on_qcow2};
use qlock_testkit::{Access, FakeQemu, Format, FrontEnd, RawLock};
use rstest::rstest;

#[rstest]
fn backup_is_refused_while_a_vm_writes_and_works_once_it_crashes(vm_on_qcow2: HeldImage) {
    let HeldImage { mut holder, image } = vm_on_qcow2;
    let dest = image.path().with_extension("bak");
    match backup(image.path(), &dest) {
        Err(BackupError::Busy(e)) => {
            assert!(e.to_string().starts_with("Failed to get shared \"write\" lock"), "{e}");
            assert!(e.to_string().contains(&format!("pid {}", holder.pid())), "names the VM: {e}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    holder.kill().unwrap();
    assert_eq!(backup(image.path(), &dest).unwrap(), std::fs::metadata(image.path()).unwrap().len());
}

#[rstest]
#[case::readonly_vm(FrontEnd::VmDiskReadonly, true)]
#[case::force_share_reader(FrontEnd::QemuIoForceShare, true)]
#[case::nbd_export(FrontEnd::QemuNbdRw, false)]
#[case::share_rw_vm(FrontEnd::VmDiskShareRw, false)]
fn backup_of_a_raw_disk_follows_qemu(raw_image: TempImage, #[case] fe: FrontEnd, #[case] allowed: bool) {
    let _holder = FakeQemu::builder(&raw_image).front_end(fe, Format::Raw).spawn().unwrap();
    let result = backup(raw_image.path(), &raw_image.path().with_extension("bak"));
    assert_eq!(result.is_ok(), allowed, "{fe}: {result:?}");
}

#[rstest]
fn a_vm_that_drops_to_read_only_lets_the_backup_in(qcow2_image: TempImage) {
    let mut vm = FakeQemu::builder(&qcow2_image).front_end(FrontEnd::VmDisk, Format::Qcow2).spawn().unwrap();
    assert!(backup(qcow2_image.path(), &qcow2_image.path().with_extension("bak")).is_err());
    vm.set_access(Access::READ).unwrap();
    backup(qcow2_image.path(), &qcow2_image.path().with_extension("bak")).unwrap();
}

#[rstest]
fn foreign_locks_outside_qemus_bytes_do_not_matter(raw_image: TempImage) {
    // libvirt's lease on byte 0 and QEMU <= 6.2's graph-mod bytes are not QEMU >= 7 permissions.
    let mut locks = vec![RawLock::byte(0).exclusive().posix()];
    locks.extend(RawLock::LEGACY_GRAPH_MOD);
    let _foreign = FakeQemu::builder(&raw_image).raw(locks).spawn().unwrap();
    backup(raw_image.path(), &raw_image.path().with_extension("bak")).unwrap();
}

/// The same scenario against a fake and, where installed, the real `qemu-io`.
#[rstest]
fn the_same_scenario_runs_against_real_qemu(qcow2_image: TempImage, #[values(false, true)] real: bool) {
    let holder = if real {
        match FakeQemu::real(&qcow2_image, FrontEnd::QemuIoRw, Format::Qcow2) {
            Err(e) if e.is_skip() => return eprintln!("skipping: {e}"),
            h => h.unwrap(),
        }
    } else {
        FakeQemu::builder(&qcow2_image).front_end(FrontEnd::QemuIoRw, Format::Qcow2).spawn().unwrap()
    };
    assert_eq!(holder.is_real(), real);
    let err = backup(qcow2_image.path(), &qcow2_image.path().with_extension("bak")).unwrap_err();
    assert!(err.to_string().contains("Failed to get shared \"write\" lock"), "{err}");
    drop(holder);
    backup(qcow2_image.path(), &qcow2_image.path().with_extension("bak")).unwrap();
}
