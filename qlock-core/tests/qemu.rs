//! qlock against the real QEMU tools: the test vectors of the protocol spec (section 9), QEMU as
//! holder with qlock as newcomer, and qlock as holder with QEMU as newcomer.
//!
//! Messages are compared from `Failed to` on: QEMU prefixes them with its front end
//! (`qemu-io: can't open device PATH: `), qlock does not. Tests that need QEMU print `SKIPPED`
//! and return when `qemu-img` / `qemu-io` / `qemu-nbd` are missing (CI installs qemu-utils).
//! Every QEMU holder signals readiness itself: `qemu-io` (run through qlock-testkit's
//! `FakeQemu::real`) prints its prompt once the image is open, `qemu-nbd --fork` returns once
//! the export is up. The "ext" holders of the vectors are qlock-testkit fakes taking raw locks.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{have, parse_bytes, set};
use qlock_core::Others;
use qlock_core::inspect;
use qlock_core::plan::decide;
use qlock_core::{Access, ImageLock, LockOptions, LockSet, Perm, Verdict};
use qlock_testkit::newcomer::{self, Newcomer};
use qlock_testkit::{FakeQemu, Format, FrontEnd, NbdServer, RawLock};

/// A qcow2 and a raw image of 1 MiB in a fresh directory.
struct Images {
    dir: tempfile::TempDir,
    qcow2: PathBuf,
    raw: PathBuf,
}

impl Images {
    fn new() -> Images {
        let dir = tempfile::tempdir().unwrap();
        let qcow2 = dir.path().join("base.qcow2");
        let raw = dir.path().join("raw.img");
        let out =
            Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&qcow2).arg("1M").output();
        assert!(out.as_ref().is_ok_and(|o| o.status.success()), "qemu-img create: {out:?}");
        std::fs::File::create(&raw).unwrap().set_len(1 << 20).unwrap();
        Images { dir, qcow2, raw }
    }

    fn path(&self, raw: bool) -> &Path {
        if raw { &self.raw } else { &self.qcow2 }
    }
}

fn qemu_present() -> bool {
    qlock_testkit::require_all(&["qemu-img", "qemu-io", "qemu-nbd"])
}

/// `qemu-nbd` read-write on raw: an NBD export never shares resize (`100 101 | 203`).
const NBD_RAW: Access =
    Access::new(Perm::CONSISTENT_READ.union(Perm::WRITE), Perm::ALL.difference(Perm::RESIZE));

/// The QEMU newcomers these tests run, from qlock-testkit's catalogue (its access is what qlock
/// takes for the same bytes, docs/protocol.md §5).
const NEWCOMERS: &[&str] = &[
    "img info (qcow2)",
    "img info -U (qcow2)",
    "qemu-io -r (qcow2)",
    "qemu-io -r -U (qcow2)",
    "qemu-io (qcow2)",
    "img check -r all (qcow2)",
    "qemu-io (raw)",
    "qemu-io -r (raw)",
    "img info (raw)",
    "img resize (raw)",
    "img convert (raw)",
];

fn newcomer(label: &str) -> Newcomer {
    newcomer::find(label).unwrap_or_else(|| panic!("no newcomer {label}"))
}

fn newcomers() -> impl Iterator<Item = Newcomer> {
    NEWCOMERS.iter().map(|l| newcomer(l))
}

/// The access a newcomer asks for.
fn access_of(n: &Newcomer) -> Access {
    n.access.expect("these newcomers make one request")
}

fn is_raw(n: &Newcomer) -> bool {
    n.format == Format::Raw
}

/// What an opener was told: `None` when it got in, else the message from `Failed to` on
/// (with the hint line when there is one).
type Outcome = Option<String>;

fn run_qemu(n: &Newcomer, images: &Images) -> Outcome {
    let out_path = images.dir.path().join("out.img");
    let args = n.args(images.path(is_raw(n)), &out_path).expect("a one-shot newcomer");
    let out = Command::new(&args[0]).args(&args[1..]).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        return None;
    }
    let refusal =
        newcomer::refusal(&stderr).unwrap_or_else(|| panic!("{}: unexpected failure:\n{stderr}", n.label()));
    Some(refusal.replace(&images.dir.path().display().to_string(), "DIR"))
}

/// qlock's answer to `access` on `path`, with `dir` written `DIR` as [`run_qemu`] does.
fn run_qlock(access: Access, path: &Path, dir: &Path) -> Outcome {
    let opts = LockOptions::default().with_find_holders(false);
    let err = ImageLock::acquire_with(path, access, &opts).err()?;
    Some(err.to_string().replace(&dir.display().to_string(), "DIR"))
}

/// A real QEMU front end holding `path`, through the testkit: ready once it holds the image
/// (`qemu-io`'s prompt, `qemu-nbd --fork` returning); killed and reaped on drop.
fn real(front_end: FrontEnd, format: Format, path: &Path) -> FakeQemu {
    FakeQemu::builder(path)
        .front_end(front_end, format)
        .nbd_server(NbdServer::QemuNbd)
        .spawn_real()
        .unwrap_or_else(|e| panic!("{front_end} on {}: {e}", path.display()))
}

/// QEMU front ends as holders (`qemu-nbd` for the NBD one), the access qlock takes for the same
/// bytes, and the image format.
const HOLDERS: &[(&str, FrontEnd, Access, bool)] = &[
    ("qemu-io (qcow2)", FrontEnd::QemuIoRw, Access::WRITE, false),
    ("qemu-io -r (qcow2)", FrontEnd::QemuIoReadOnly, Access::READ, false),
    ("qemu-io -r -U (qcow2)", FrontEnd::QemuIoForceShare, Access::FORCE_SHARE, false),
    ("qemu-io (raw)", FrontEnd::QemuIoRw, Access::WRITE_SHARED, true),
    ("qemu-io -r (raw)", FrontEnd::QemuIoReadOnly, Access::FORCE_SHARE, true),
    ("qemu-nbd (raw)", FrontEnd::QemuNbdRw, NBD_RAW, true),
];

/// QEMU holds; qlock's answer to each access equals QEMU's own newcomer's answer, word for word.
/// Then qlock holds the same access; every QEMU newcomer gets the answer it got from the real
/// front end. Covers V1-V5 and V7-V9 with real QEMU on both sides.
#[test]
fn qemu_and_qlock_are_interchangeable_as_holders_and_newcomers() {
    let _serial = common::serial();
    if !qemu_present() {
        return;
    }
    for &(holder_name, front, access, raw) in HOLDERS {
        let images = Images::new();
        let format = if raw { Format::Raw } else { Format::Qcow2 };
        let running = real(front, format, images.path(raw));
        let path = images.path(raw);
        // The holder takes the bytes the spec's section 5 says, and inspection names it.
        let status = inspect(&[path]).remove(0).unwrap();
        assert_eq!(status.others.held, set(access), "{holder_name}");
        let [h] = &status.holders[..] else { panic!("{holder_name}: {:?}", status.holders) };
        let command = if front == FrontEnd::QemuNbdRw { "qemu-nbd" } else { "qemu-io" };
        assert_eq!((h.pid, h.command.as_deref()), (running.pid(), Some(command)), "{holder_name}");

        let newcomers: Vec<Newcomer> = newcomers().filter(|n| is_raw(n) == raw).collect();
        let against_qemu: Vec<Outcome> = newcomers.iter().map(|n| run_qemu(n, &images)).collect();
        for (n, qemu) in newcomers.iter().zip(&against_qemu) {
            let qlock = run_qlock(access_of(n), path, images.dir.path());
            assert_eq!(&qlock, qemu, "{holder_name} holds, {} asks", n.label());
            let others = Others { held: set(access), write_locked: LockSet::EMPTY };
            let granted = decide(others, LockSet::EMPTY, set(access_of(n))) == Verdict::Granted;
            assert_eq!(granted, qemu.is_none(), "reference verdict: {holder_name} holds, {} asks", n.label());
        }
        // The holder's conflicts name it as QEMU's pid and command.
        if let Some(n) = newcomers.iter().zip(&against_qemu).find(|(_, o)| o.is_some()).map(|(n, _)| n) {
            let err = ImageLock::acquire(path, access_of(n)).unwrap_err();
            assert_eq!(err.conflict().unwrap().holders[0].pid, running.pid());
            assert!(err.to_string().contains(&format!("Held by pid {} ({command})", running.pid())), "{err}");
        }
        drop(running);

        let images = Images::new();
        let _qlock = ImageLock::acquire(images.path(raw), access).unwrap();
        for (n, qemu) in newcomers.iter().zip(&against_qemu) {
            assert_eq!(
                &run_qemu(n, &images),
                qemu,
                "qlock holds {access} for {holder_name}, {} asks",
                n.label()
            );
        }
    }
}

/// One row of docs/protocol.md §9 with an "ext" holder: raw OFD (or POSIX) locks in a fake holder
/// process; the newcomer as a QEMU front end, and the answer QEMU 10.0.2 gave.
struct Vector {
    id: &'static str,
    read: &'static str,
    write: &'static str,
    posix: bool,
    newcomer: &'static str,
    expect: Option<&'static str>,
}

/// The vectors, from `qemu_vectors.txt` (one a line: `id | read | write | posix | newcomer |
/// expect`, `#` comments).
fn vectors() -> Vec<Vector> {
    let rows = include_str!("qemu_vectors.txt").lines().filter(|l| !l.is_empty() && !l.starts_with('#'));
    rows.map(|row| {
        let fields: Vec<&'static str> = row.split('|').map(str::trim).collect();
        let [id, read, write, posix, newcomer, expect] = fields[..] else { panic!("six fields: {row}") };
        let expect = (expect != "-").then_some(expect);
        Vector { id, read, write, posix: posix == "posix", newcomer, expect }
    })
    .collect()
}

/// A fake holder process taking the vector's raw read and write locks, OFD or POSIX.
fn ext_holder(path: &Path, vector: &Vector) -> FakeQemu {
    let kind = |l: RawLock| if vector.posix { l.posix() } else { l };
    let read = parse_bytes(vector.read).bytes().map(|b| kind(RawLock::byte(b)));
    let write = parse_bytes(vector.write).bytes().map(|b| kind(RawLock::byte(b).exclusive()));
    FakeQemu::builder(path).raw(read.chain(write)).spawn().unwrap_or_else(|e| panic!("{}: {e}", vector.id))
}

/// The spec's vectors with "ext" holders: qlock's answer is the table's; where QEMU is
/// installed, QEMU's answer (message and hint) is checked against qlock's too.
#[test]
fn spec_vectors_with_external_holders() {
    let _serial = common::serial();
    let qemu = have("qemu-img") && have("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = dir.path().join("base.qcow2");
    let raw = dir.path().join("raw.img");
    std::fs::File::create(&raw).unwrap().set_len(1 << 20).unwrap();
    let images = if qemu {
        Some(Images::new())
    } else {
        // Without QEMU a plain file is enough: qlock never reads the image.
        std::fs::write(&qcow2, b"").unwrap();
        None
    };
    let vectors = vectors();
    assert_eq!(vectors.len(), 30, "rows of qemu_vectors.txt");
    for vector in &vectors {
        let n = newcomer(vector.newcomer);
        let path = match &images {
            Some(i) => i.path(is_raw(&n)).to_path_buf(),
            None if is_raw(&n) => raw.clone(),
            None => qcow2.clone(),
        };
        let mut holder = ext_holder(&path, vector);
        let case = format!("{} ({} | W {}) {}", vector.id, vector.read, vector.write, n.label());
        let qlock = run_qlock(access_of(&n), &path, path.parent().unwrap());
        assert_eq!(qlock.as_deref().and_then(|m| m.lines().next()), vector.expect, "{case}");
        if let Some(images) = &images {
            assert_eq!(run_qemu(&n, images), qlock, "QEMU against {case}");
        }
        assert!(holder.release().unwrap().success(), "{case}: the holder failed");
    }
    if !qemu {
        eprintln!("SKIPPED: the QEMU side of the vectors (qemu-img / qemu-io missing)");
    }
}

/// V25: an opener holding `100 | 201 203` asks for write while another reader holds the same:
/// refused with QEMU's message, and rolled back to exactly its old bytes.
#[test]
fn v25_reopen_for_writing_is_refused_and_rolled_back() {
    let _serial = common::serial();
    let (_dir, path) = common::image();
    let _other = ImageLock::acquire(&path, Access::READ).unwrap();
    let mut me = ImageLock::acquire(&path, Access::READ).unwrap();
    let err = me.set_access(Access::WRITE).unwrap_err();
    let text = err.to_string();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("Failed to get \"write\" lock"));
    assert_eq!(
        lines.next(),
        Some(format!("Is another process using the image [{}]?", path.display()).as_str())
    );
    assert_eq!((me.access(), me.held()), (Access::READ, set(Access::READ)));
    drop(_other);
    assert_eq!(common::held_from_outside(&path), set(Access::READ), "only my old bytes remain");

    if !(have("qemu-io") && have("qemu-img")) {
        return;
    }
    let images = Images::new();
    let _holder = real(FrontEnd::QemuIoReadOnly, Format::Qcow2, &images.qcow2);
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "reopen -w"])
        .arg(&images.qcow2)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut me = ImageLock::acquire(&images.qcow2, Access::READ).unwrap();
    let qlock = me.set_access(Access::WRITE).unwrap_err().to_string();
    let qlock: Vec<&str> = qlock.lines().filter(|l| !l.starts_with("Held by")).collect();
    assert_eq!(stderr.trim_end(), format!("qemu-io: {}", qlock.join("\n")));
}

/// V30: with locking off, nothing is taken or tested, even against a QEMU writer.
#[test]
fn v30_locking_off_ignores_a_qemu_writer() {
    let _serial = common::serial();
    if !qemu_present() {
        return;
    }
    let images = Images::new();
    let _qemu = real(FrontEnd::QemuIoRw, Format::Qcow2, &images.qcow2);
    let off = LockOptions::default().with_locking(qlock_core::Locking::Off);
    let guard = ImageLock::acquire_with(&images.qcow2, Access::WRITE, &off).unwrap();
    assert_eq!(inspect(&[&images.qcow2]).remove(0).unwrap().holders.len(), 1, "only qemu-io holds");
    drop(guard);
}
