//! Process hygiene: no zombies and no strays, also after a panic, and many holders at once.
//!
//! These tests count this test process's children, which is process-global state, so they
//! run one at a time (`file_serial`, which also holds under nextest) in their own test binary.

use std::collections::HashSet;

use qlock_core::{Access, ImageLock};
use qlock_testkit::fixtures::TempImage;
use qlock_testkit::{FakeQemu, Format, FrontEnd};
use serial_test::file_serial;

/// The pids whose parent is this process, zombies included.
fn children() -> HashSet<u32> {
    let me = std::process::id();
    let mut out = HashSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The fields after the command name, which is in parentheses and may contain spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(me) {
            out.insert(pid);
        }
    }
    out
}

#[test]
#[file_serial(children)]
fn two_hundred_holders_start_and_stop_cleanly() {
    let image = TempImage::new(Format::Raw).unwrap();
    let before = children();
    let holders: Vec<FakeQemu> = (0..200)
        .map(|_| {
            FakeQemu::builder(&image).front_end(FrontEnd::QemuIoForceShare, Format::Raw).spawn().unwrap()
        })
        .collect();
    let pids: HashSet<u32> = holders.iter().map(FakeQemu::pid).collect();
    assert_eq!(pids.len(), 200);
    assert!(children().is_superset(&pids));
    let s = qlock_core::inspect(&[image.path()]).remove(0).unwrap();
    let seen: HashSet<u32> = s.holders.iter().map(|h| h.pid).collect();
    assert_eq!(seen, pids, "every holder holds byte 100, seen in its own fdinfo");
    // A writer that refuses to share consistent read... is refused by all of them.
    assert!(
        ImageLock::acquire(&image, Access::new(qlock_core::Perm::empty(), qlock_core::Perm::empty()))
            .is_err()
    );
    drop(holders);
    assert_eq!(children(), before, "no zombie or stray process left");
    assert_eq!(qlock_core::inspect(&[image.path()]).remove(0).unwrap().others.held.to_string(), "- | -");
}

#[test]
#[file_serial(children)]
fn a_panicking_test_leaves_no_process_and_no_lock() {
    let image = TempImage::new(Format::Qcow2).unwrap();
    let before = children();
    let path = image.path().to_path_buf();
    let pid = std::thread::spawn(move || {
        let vm = FakeQemu::builder(&path).front_end(FrontEnd::VmDisk, Format::Qcow2).spawn().unwrap();
        let pid = vm.pid();
        std::panic::panic_any(pid); // unwinds through the handle
    })
    .join()
    .unwrap_err();
    let pid = *pid.downcast::<u32>().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "holder {pid} still exists");
    assert_eq!(children(), before);
    drop(ImageLock::acquire(&image, Access::WRITE).unwrap());
}

#[test]
#[file_serial(children)]
fn a_refused_holder_is_reaped() {
    let image = TempImage::new(Format::Qcow2).unwrap();
    let _vm = FakeQemu::builder(&image).front_end(FrontEnd::VmDisk, Format::Qcow2).spawn().unwrap();
    let before = children();
    for _ in 0..5 {
        FakeQemu::builder(&image).front_end(FrontEnd::QemuIoRw, Format::Qcow2).spawn().unwrap_err();
    }
    assert_eq!(children(), before);
}
