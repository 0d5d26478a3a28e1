//! Real QEMU reacts to each fake exactly as to the front end it names.
//!
//! Newcomers are the real `qemu-img info` and `qemu-io` (rw, `-r`, `-r -U`). Against a fake
//! whose front end also runs for real here (qemu-io, qemu-storage-daemon), the newcomer's
//! outcome must equal its outcome against the real holder; for the others it must equal spec
//! section 9's decision procedure (`qlock_core::plan::decide`). Skipped when QEMU is absent.

use std::path::Path;

use qlock_core::plan::decide;
use qlock_core::{LockSet, Perm};
use qlock_core::{Others, Verdict};
use qlock_testkit::newcomer::{self, Command, Newcomer};
use qlock_testkit::{Access, Error, FakeQemu, Format, FrontEnd, TempImage};
use rstest::rstest;

fn have_qemu() -> bool {
    qlock_testkit::require_all(&["qemu-img", "qemu-io", "qemu-storage-daemon"])
}

/// The newcomers on `format`, from the catalogue: `qemu-img info` and `qemu-io` (rw, `-r`,
/// `-r -U`).
fn newcomers(format: Format) -> Vec<Newcomer> {
    let picked =
        |n: &Newcomer| matches!(n.command, Command::Io { .. } | Command::Info { force_share: false });
    newcomer::all().into_iter().filter(|n| n.format == format && picked(n)).collect()
}

/// Runs a newcomer: `None` when it got in, else QEMU's `Failed to ...` text.
fn run(n: &Newcomer, image: &Path) -> Option<String> {
    let cmd = n.args(image, &image.with_extension("out")).unwrap();
    let out = std::process::Command::new(&cmd[0]).args(&cmd[1..]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() && !stderr.contains("Failed to") {
        return None;
    }
    let line =
        stderr.lines().find(|l| l.contains("Failed to")).unwrap_or_else(|| panic!("{cmd:?}: {stderr}"));
    Some(line[line.find("Failed to").unwrap()..].to_string())
}

fn expected(holder: Access, newcomer: Access) -> Option<String> {
    let others = Others { held: holder.lock_set(Perm::ALL), ..Others::default() };
    match decide(others, LockSet::EMPTY, newcomer.lock_set(Perm::ALL)) {
        Verdict::Granted => None,
        Verdict::LockByte(b) => Some(format!("Failed to lock byte {b}")),
        Verdict::Conflict(c) => Some(c.message()),
    }
}

#[rstest]
fn real_qemu_reacts_to_fakes_as_to_the_real_front_end(#[values(Format::Qcow2, Format::Raw)] format: Format) {
    if !have_qemu() {
        return;
    }
    let image = TempImage::new(format).unwrap();
    let (mut against_real, mut refusals) = (0, 0);
    for fe in FrontEnd::ALL {
        let Some(access) = fe.access(format) else { continue };
        let outcomes = |holder: &FakeQemu| -> Vec<Option<String>> {
            let o = newcomers(format).iter().map(|n| run(n, image.path())).collect();
            assert!(holder.pid() > 0);
            o
        };
        let fake = FakeQemu::builder(&image).front_end(fe, format).spawn().unwrap();
        let with_fake = outcomes(&fake);
        drop(fake);
        match FakeQemu::real(&image, fe, format) {
            Ok(real) => {
                assert_eq!(outcomes(&real), with_fake, "{fe} on {format}: fake vs real holder");
                against_real += 1;
            }
            Err(e) if e.is_skip() => {}
            Err(e) => panic!("{fe} on {format}: real holder failed: {e}"),
        }
        for (newcomer, got) in newcomers(format).iter().zip(&with_fake) {
            let want = expected(access, newcomer.access.unwrap());
            assert_eq!(got, &want, "{} against a fake {fe} on {format}", newcomer.label());
            refusals += usize::from(got.is_some());
        }
    }
    assert!(against_real >= 5, "only {against_real} front ends compared with a real holder");
    assert!(refusals >= 4, "the cases should include refusals, got {refusals}");
}

#[rstest]
fn real_holders_hold_the_table_bytes_behind_the_same_handle(
    #[values(Format::Qcow2, Format::Raw)] format: Format,
) {
    if !have_qemu() {
        return;
    }
    let image = TempImage::new(format).unwrap();
    let mut compared = 0;
    for fe in FrontEnd::ALL.into_iter().filter(|fe| fe.access(format).is_some()) {
        let mut real = match FakeQemu::real(&image, fe, format) {
            Ok(real) => real,
            Err(e) if e.is_skip() => continue,
            Err(e) => panic!("real {fe} on {format}: {e}"),
        };
        compared += 1;
        assert!(real.is_real());
        let s = qlock_core::inspect(&[image.path()]).remove(0).unwrap();
        assert_eq!(s.others.held, fe.access(format).unwrap().lock_set(Perm::ALL), "real {fe} on {format}");
        assert!(s.holders.iter().all(|h| h.pid == real.pid()), "{:?}", s.holders);
        assert!(matches!(real.set_access(Access::READ), Err(Error::Unsupported(_))));
        assert!(real.release().unwrap().success(), "{fe} quits cleanly");
        assert_eq!(qlock_core::inspect(&[image.path()]).remove(0).unwrap().others.held.to_string(), "- | -");
    }
    // qemu-io rw, -r, -r -U, qemu-nbd rw and -r, a q-s-d blockdev, and on qcow2 a backing file.
    assert!(compared >= 6, "only {compared} real front ends ran");
}

#[test]
fn fake_and_real_refusals_read_the_same() {
    if !have_qemu() {
        return;
    }
    let image = TempImage::new(Format::Qcow2).unwrap();
    let vm = FakeQemu::builder(&image).front_end(FrontEnd::VmDisk, Format::Qcow2).spawn().unwrap();
    let real = FakeQemu::real(&image, FrontEnd::QemuIoRw, Format::Qcow2).unwrap_err();
    let fake = FakeQemu::builder(&image).front_end(FrontEnd::QemuIoRw, Format::Qcow2).spawn().unwrap_err();
    assert!(matches!(real, Error::Qemu { .. }), "{real}");
    assert_eq!(real.qemu_message(), fake.qemu_message());
    assert_eq!(real.qemu_message().as_deref(), Some("Failed to get \"write\" lock"));
    drop(vm);
    // SIGKILL of a real holder frees the image too.
    let mut q = FakeQemu::real(&image, FrontEnd::QemuIoRw, Format::Qcow2).unwrap();
    q.kill().unwrap();
    FakeQemu::real(&image, FrontEnd::QemuIoRw, Format::Qcow2).unwrap();
}

#[test]
fn missing_qemu_is_a_clear_skip() {
    let image = TempImage::new(Format::Raw).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let err = FakeQemu::builder(&image)
        .front_end(FrontEnd::QemuIoRw, Format::Raw)
        .qemu_bin_dir(empty.path())
        .spawn_real()
        .unwrap_err();
    assert!(err.is_skip(), "{err}");
    assert!(err.to_string().contains("qemu-io not found in"), "{err}");
    let err = FakeQemu::real(&image, FrontEnd::QemuImgInfo, Format::Raw).unwrap_err();
    assert!(err.is_skip() && err.to_string().contains("exits as soon as it is done"), "{err}");
}
