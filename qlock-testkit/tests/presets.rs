//! Every preset and raw lock set holds exactly its bytes, seen from outside the holder through
//! the kernel (`/proc/PID/fdinfo` lock lines and `F_OFD_GETLK` probes, via `qlock_core::inspect`).

use qlock_core::{HeldRange, ImageStatus};
use qlock_core::{LockKind, Perm};
use qlock_testkit::fixtures::TempImage;
use qlock_testkit::{FakeQemu, Format, FrontEnd, RawLock};
use rstest::rstest;

fn status(image: &TempImage) -> ImageStatus {
    qlock_core::inspect(&[image.path()]).remove(0).expect("inspect")
}

#[rstest]
fn each_front_end_holds_exactly_the_spec_bytes(#[values(Format::Qcow2, Format::Raw)] format: Format) {
    let image = TempImage::new(format).unwrap();
    let mut checked = 0;
    for fe in FrontEnd::ALL {
        let Some(access) = fe.access(format) else {
            let err = FakeQemu::builder(&image).front_end(fe, format).spawn().unwrap_err();
            assert!(err.to_string().contains("does not apply"), "{err}");
            continue;
        };
        let want = access.lock_set(Perm::ALL);
        let holder = FakeQemu::builder(&image).front_end(fe, format).spawn().unwrap();
        let s = status(&image);
        assert_eq!(s.others.held, want, "{fe} on {format}: probed bytes");
        if want.is_empty() {
            assert!(s.holders.is_empty(), "{fe} on {format} should hold nothing: {:?}", s.holders);
        } else {
            assert_eq!(s.holders.len(), 1, "{fe} on {format}: {:?}", s.holders);
            let h = &s.holders[0];
            assert_eq!(h.pid, holder.pid());
            assert_eq!(h.command.as_deref(), Some("qemu-fake"));
            assert_eq!((h.kind, h.bytes()), (LockKind::Ofd, want), "{fe} on {format}: fdinfo");
            assert!(h.ranges.iter().all(|r| !r.write && r.foreign_reason().is_none()), "{:?}", h.ranges);
        }
        drop(holder);
        assert!(status(&image).others.held.is_empty(), "{fe} on {format}: locks left after drop");
        checked += 1;
    }
    assert!(checked >= 15);
}

#[test]
fn raw_sets_hold_any_range_kind_and_type() {
    let image = TempImage::new(Format::Raw).unwrap();
    let range = |start, end: Option<u64>, write| HeldRange { start, end, write };
    let cases: Vec<(Vec<RawLock>, LockKind, Vec<HeldRange>)> = vec![
        // libvirt's lease: an exclusive POSIX lock on byte 0.
        (vec![RawLock::byte(0).exclusive().posix()], LockKind::Posix, vec![range(0, Some(0), true)]),
        // QEMU <= 6.2's graph-mod bytes.
        (
            RawLock::LEGACY_GRAPH_MOD.to_vec(),
            LockKind::Ofd,
            vec![range(104, Some(104), false), range(204, Some(204), false)],
        ),
        // A whole-file read lock, and a whole-file write lock as other VMMs take.
        (vec![RawLock::WHOLE_FILE], LockKind::Ofd, vec![range(0, None, false)]),
        (vec![RawLock::WHOLE_FILE.exclusive()], LockKind::Ofd, vec![range(0, None, true)]),
        // A multi-byte write range over protocol bytes.
        (vec![RawLock::range(100, 4).exclusive()], LockKind::Ofd, vec![range(100, Some(103), true)]),
    ];
    for (locks, kind, want) in cases {
        let holder = FakeQemu::builder(&image).raw(locks.clone()).spawn().unwrap();
        let s = status(&image);
        let h =
            s.holders.iter().find(|h| h.pid == holder.pid()).unwrap_or_else(|| panic!("{locks:?}: {s:?}"));
        let mut got = h.ranges.clone();
        got.sort_by_key(|r| r.start);
        assert_eq!((h.kind, got), (kind, want), "{locks:?}");
        assert_eq!(holder.locks(), Some(locks));
    }
}

#[test]
fn posix_front_ends_take_the_same_bytes_with_posix_locks() {
    let image = TempImage::new(Format::Qcow2).unwrap();
    let holder =
        FakeQemu::builder(&image).front_end(FrontEnd::QemuIoRw, Format::Qcow2).posix().spawn().unwrap();
    let s = status(&image);
    assert_eq!(s.others.held.to_string(), "100 101 103 | 201 203");
    assert_eq!((s.holders[0].pid, s.holders[0].kind), (holder.pid(), LockKind::Posix));
    assert_eq!(holder.locks().unwrap()[0].kind, LockKind::Posix);
}
