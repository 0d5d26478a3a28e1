//! The differential check itself, on a small slice of the matrix against the QEMU on PATH:
//! it agrees with the real presets, and catches a preset whose access was tampered with.

use qlock_core::Access;
use xtask::compat::{self, Options};
use xtask::qemu::QemuBuild;
use xtask::run::Outcome;

fn options(mutate: Vec<(String, Access)>) -> Options {
    Options {
        jobs: 2,
        only: ["qemu-io (qcow2)", "qemu-io -r (qcow2)", "qlock read", "qlock write"]
            .map(String::from)
            .to_vec(),
        mutate,
    }
}

fn build() -> QemuBuild {
    QemuBuild::from_path().expect("these tests need qemu-utils on PATH (qemu-io, qemu-img, qemu-nbd, q-s-d)")
}

#[test]
fn the_real_presets_agree_with_qemu() {
    let report = compat::run(&build(), &options(vec![])).unwrap();
    assert_eq!(report.failures().count(), 0, "{}", report.render());
    // The slice holds real conflicts, not only grants: qemu-io -r meets a qemu-io writer.
    let refused =
        report.cells.iter().flatten().flatten().filter(|v| matches!(v, Outcome::Refused(_))).count();
    assert!(refused >= 6, "{}", report.render());
    // Filters match substrings, so `qlock write` brings `qlock write-shared` (whose twins are
    // raw front ends, left out): 5 holders x 5 newcomers. Checks: qlock read and write
    // newcomers x 1 twin x 5 holders, the same two as holders x 1 twin x 5 newcomers, and the
    // bytes of 5 holders.
    assert_eq!(report.pairs.len(), 10 + 10 + 5, "{}", report.render());
    assert!(report.summary().starts_with("compat: 25/25 agree"), "{}", report.summary());
}

#[test]
fn a_preset_with_a_mutated_access_is_caught() {
    // `read` that forgets to unshare write: a qemu-io writer no longer stops it.
    let report = compat::run(&build(), &options(vec![("read".into(), Access::FORCE_SHARE)])).unwrap();
    let failures: Vec<String> = report.failures().map(|c| c.detail.clone()).collect();
    assert!(!failures.is_empty(), "{}", report.render());
    let caught = failures
        .iter()
        .find(|d| d.starts_with("holder qemu-io (qcow2), newcomer qlock read vs qemu-io -r (qcow2)"));
    let detail = caught.unwrap_or_else(|| panic!("not caught where expected:\n{}", report.render()));
    assert!(detail.contains("qlock: granted"), "{detail}");
    assert!(detail.contains("refused: Failed to get shared \"write\" lock"), "{detail}");
    assert!(report.render().contains("DISAGREE holder qemu-io (qcow2), newcomer qlock read"));
}
