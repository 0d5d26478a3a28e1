//! The image-graph sections of the compat run (the chain matrix and the qemu-iotests 153 port)
//! on a slice, against the QEMU on PATH and the `qlock` binary: they agree with the real
//! thing, and they catch a preset or an operation whose bytes were tampered with.

use qlock_core::Access;
use xtask::compat::{self, Options, Report};
use xtask::qemu::QemuBuild;

fn build() -> QemuBuild {
    QemuBuild::from_path().expect("these tests need qemu-utils on PATH (qemu-io, qemu-img, qemu-nbd, q-s-d)")
}

fn run(only: &[&str], mutate: Vec<(String, Access)>) -> Report {
    let build = build();
    let opts = Options { jobs: 2, only: only.iter().map(|s| s.to_string()).collect(), mutate };
    compat::run(&build, &opts).unwrap()
}

/// The section pairs' details that disagree.
fn failures(report: &Report) -> Vec<String> {
    report.failures().map(|c| c.detail.clone()).collect()
}

/// The mutation is caught at the pair whose detail starts with `pair`: qlock was granted where
/// QEMU was refused with `refusal`. Returns the failing pairs' details, for more checks.
fn assert_caught(report: &Report, pair: &str, refusal: &str) -> Vec<String> {
    let failures = failures(report);
    let caught = failures
        .iter()
        .find(|d| d.starts_with(pair))
        .unwrap_or_else(|| panic!("not caught where expected:\n{}", report.render()));
    assert!(caught.contains("qlock: granted"), "{caught}");
    assert!(caught.contains(&format!("refused: {refusal}")), "{caught}");
    failures
}

#[test]
fn a_chain_slice_and_the_153_rounds_agree_and_count_in_the_summary() {
    let report = run(&["chain qcow2-2", "153 qemu-io -r"], vec![]);
    assert!(failures(&report).is_empty(), "{}", report.render());
    // No matrix rows: every check is a section's. qcow2-2 has 8 holders (10 with VMs) x 8
    // newcomers: 4 qlock columns x every holder, then 3 qlock holders x (1 bytes + 8 columns).
    // The 153 slice is `qemu-io -r` and `-r -U` (39 rounds each).
    assert!(report.pairs.is_empty());
    let holders = if build().system.is_ok() { 10 } else { 8 };
    let chains = 4 * holders + 3 * 9;
    let sections: Vec<usize> = report.sections.iter().map(|s| s.pairs.len()).collect();
    assert_eq!(sections, vec![chains, 78], "{}", report.render());
    let all = chains + 78;
    assert!(report.summary().starts_with(&format!("compat: {all}/{all} agree")), "{}", report.summary());
    let text = report.render();
    assert!(text.contains(&format!("chains: {chains}/{chains} agree")), "{text}");
    assert!(text.contains("qemu-iotests 153: 78/78 agree"), "{text}");
    let row = text.lines().find(|l| l.starts_with("qemu-io -r on top.qcow2")).unwrap_or_default();
    assert!(row.contains('g'), "{text}");
}

#[test]
fn a_chain_preset_with_a_mutated_access_is_caught() {
    // `read` on a chain that forgets to refuse writers on every node.
    let report = run(&["chain qcow2-2"], vec![("chain:read".into(), Access::FORCE_SHARE)]);
    // As a newcomer it gets in where `qemu-io -r` is refused.
    let newcomer = "chain holder qemu-io on top.qcow2, newcomer qlock read top.qcow2 vs qemu-io -r";
    let failures = assert_caught(&report, newcomer, "Failed to get shared \"write\" lock");
    // As a holder it no longer holds what `qemu-io -r` holds on the backing file.
    assert!(
        failures.iter().any(|d| d.starts_with("chain holder qlock run --chain read on top.qcow2 holds what")
            && d.contains("base.qcow2: 100 | 201 203")),
        "{}",
        report.render()
    );
    assert!(report.render().contains("DISAGREE chain holder"));
}

#[test]
fn a_qemu_img_operation_with_mutated_bytes_is_caught_by_the_153_rounds() {
    // `check --op check` answered as a force-share reader: a writer no longer stops it.
    let report = run(&["153 qemu-io"], vec![("op:check".into(), Access::FORCE_SHARE)]);
    let refusal = "Could not open 'TEST_DIR/t.qcow2': Failed to get shared \"write\" lock";
    let failures = assert_caught(&report, "153 holder qemu-io, round img check\n", refusal);
    // `snapshot -l` is answered as `--op check`: caught there too; `-U` rounds are not touched.
    assert!(failures.iter().any(|d| d.starts_with("153 holder qemu-io, round img snapshot -l\n")));
    assert!(!failures.iter().any(|d| d.contains("round img check -U")), "{failures:#?}");
}
