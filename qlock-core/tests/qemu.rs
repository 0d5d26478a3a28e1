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
use qlock_testkit::{FakeQemu, Format, FrontEnd, RawLock};

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
    have("qemu-img") && have("qemu-io") && have("qemu-nbd")
}

/// A QEMU front end opening an image, and the access qlock takes for the same bytes (spec
/// section 5).
struct Newcomer {
    name: &'static str,
    /// Arguments; `{}` is replaced by the image path, `{out}` by a scratch output path.
    args: &'static [&'static str],
    raw: bool,
    access: Access,
}

const RAW_RESIZE: Access =
    Access::new(Perm::CONSISTENT_READ.union(Perm::WRITE).union(Perm::RESIZE), Perm::ALL);
/// `qemu-nbd` read-write on raw: an NBD export never shares resize (`100 101 | 203`).
const NBD_RAW: Access =
    Access::new(Perm::CONSISTENT_READ.union(Perm::WRITE), Perm::ALL.difference(Perm::RESIZE));

const NEWCOMERS: &[Newcomer] = &[
    Newcomer {
        name: "qemu-img info",
        args: &["qemu-img", "info", "-f", "qcow2", "{}"],
        raw: false,
        access: Access::INFO,
    },
    Newcomer {
        name: "qemu-img info -U",
        args: &["qemu-img", "info", "-U", "-f", "qcow2", "{}"],
        raw: false,
        access: Access::NONE,
    },
    Newcomer {
        name: "qemu-io -r",
        args: &["qemu-io", "-r", "-f", "qcow2", "-c", "quit", "{}"],
        raw: false,
        access: Access::READ,
    },
    Newcomer {
        name: "qemu-io -r -U",
        args: &["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "quit", "{}"],
        raw: false,
        access: Access::FORCE_SHARE,
    },
    Newcomer {
        name: "qemu-io",
        args: &["qemu-io", "-f", "qcow2", "-c", "quit", "{}"],
        raw: false,
        access: Access::WRITE,
    },
    Newcomer {
        name: "qemu-img check -r all",
        args: &["qemu-img", "check", "-q", "-r", "all", "-f", "qcow2", "{}"],
        raw: false,
        access: Access::WRITE,
    },
    Newcomer {
        name: "qemu-io -f raw",
        args: &["qemu-io", "-f", "raw", "-c", "quit", "{}"],
        raw: true,
        access: Access::WRITE_SHARED,
    },
    Newcomer {
        name: "qemu-io -r -f raw",
        args: &["qemu-io", "-r", "-f", "raw", "-c", "quit", "{}"],
        raw: true,
        access: Access::FORCE_SHARE,
    },
    Newcomer {
        name: "qemu-img info -f raw",
        args: &["qemu-img", "info", "-f", "raw", "{}"],
        raw: true,
        access: Access::NONE,
    },
    Newcomer {
        name: "qemu-img resize -f raw",
        args: &["qemu-img", "resize", "-q", "-f", "raw", "{}", "1M"],
        raw: true,
        access: RAW_RESIZE,
    },
    Newcomer {
        name: "qemu-img convert -f raw",
        args: &["qemu-img", "convert", "-f", "raw", "-O", "raw", "{}", "{out}"],
        raw: true,
        access: Access::READ,
    },
];

fn newcomer(name: &str) -> &'static Newcomer {
    NEWCOMERS.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no newcomer {name}"))
}

/// What an opener was told: `None` when it got in, else the message from `Failed to` on
/// (with the hint line when there is one).
type Outcome = Option<String>;

fn run_qemu(n: &Newcomer, images: &Images) -> Outcome {
    let path = images.path(n.raw).display().to_string();
    let out_path = images.dir.path().join("out.img").display().to_string();
    let args: Vec<String> =
        n.args.iter().map(|a| a.replace("{out}", &out_path).replace("{}", &path)).collect();
    let out = Command::new(&args[0]).args(&args[1..]).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        return None;
    }
    let at = stderr.find("Failed to").unwrap_or_else(|| panic!("{}: unexpected failure:\n{stderr}", n.name));
    Some(stderr[at..].trim_end().replace(&images.dir.path().display().to_string(), "DIR"))
}

/// qlock's answer to `access` on `path`, with `dir` written `DIR` as [`run_qemu`] does.
fn run_qlock(access: Access, path: &Path, dir: &Path) -> Outcome {
    let opts = LockOptions::default().with_find_holders(false);
    let err = ImageLock::acquire_with(path, access, &opts).err()?;
    Some(err.to_string().replace(&dir.display().to_string(), "DIR"))
}

/// A real `qemu-io` (`front_end`) holding `path`, through the testkit: ready once its prompt
/// showed; killed and reaped on drop.
fn qemu_io(front_end: FrontEnd, format: Format, path: &Path) -> FakeQemu {
    FakeQemu::real(path, front_end, format)
        .unwrap_or_else(|e| panic!("{front_end} on {}: {e}", path.display()))
}

/// A `qemu-nbd --fork` daemon exporting an image; killed and reaped on drop, so its locks are
/// gone when the drop returns.
struct QemuNbd {
    pid: i32,
}

impl QemuNbd {
    fn start(path: &Path, dir: &Path) -> QemuNbd {
        // The daemon's parent exits at once; as a subreaper this process adopts it and can reap
        // it, instead of leaving it to PID 1.
        nix::sys::prctl::set_child_subreaper(true).expect("become a child subreaper");
        let pid_file = dir.join("nbd.pid");
        let status = Command::new("qemu-nbd")
            .arg("--fork")
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("-k")
            .arg(dir.join("nbd.sock"))
            .args(["-f", "raw"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "qemu-nbd: {status}");
        let pid = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        QemuNbd { pid }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

/// A holder of one of the real QEMU front ends: a `qemu-io` mode, or `qemu-nbd` (which the
/// testkit does not run: it stands in with `qemu-storage-daemon`).
#[derive(Clone, Copy)]
enum Front {
    Io(FrontEnd),
    Nbd,
}

/// QEMU front ends as holders, the access qlock takes for the same bytes, and the image format.
const HOLDERS: &[(&str, Front, Access, bool)] = &[
    ("qemu-io (qcow2)", Front::Io(FrontEnd::QemuIoRw), Access::WRITE, false),
    ("qemu-io -r (qcow2)", Front::Io(FrontEnd::QemuIoReadOnly), Access::READ, false),
    ("qemu-io -r -U (qcow2)", Front::Io(FrontEnd::QemuIoForceShare), Access::FORCE_SHARE, false),
    ("qemu-io (raw)", Front::Io(FrontEnd::QemuIoRw), Access::WRITE_SHARED, true),
    ("qemu-io -r (raw)", Front::Io(FrontEnd::QemuIoReadOnly), Access::FORCE_SHARE, true),
    ("qemu-nbd (raw)", Front::Nbd, NBD_RAW, true),
];

enum Running {
    Io(FakeQemu),
    Nbd(QemuNbd),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Io(q) => q.pid(),
            Running::Nbd(n) => n.pid as u32,
        }
    }
}

fn start(front: Front, images: &Images, raw: bool) -> Running {
    match front {
        Front::Io(fe) => {
            let format = if raw { Format::Raw } else { Format::Qcow2 };
            Running::Io(qemu_io(fe, format, images.path(raw)))
        }
        Front::Nbd => Running::Nbd(QemuNbd::start(images.path(raw), images.dir.path())),
    }
}

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
        let running = start(front, &images, raw);
        let path = images.path(raw);
        // The holder takes the bytes the spec's section 5 says, and inspection names it.
        let status = inspect(&[path]).remove(0).unwrap();
        assert_eq!(status.others.held, set(access), "{holder_name}");
        let [h] = &status.holders[..] else { panic!("{holder_name}: {:?}", status.holders) };
        let command = if matches!(front, Front::Nbd) { "qemu-nbd" } else { "qemu-io" };
        assert_eq!((h.pid, h.command.as_deref()), (running.pid(), Some(command)), "{holder_name}");

        let newcomers: Vec<&Newcomer> = NEWCOMERS.iter().filter(|n| n.raw == raw).collect();
        let against_qemu: Vec<Outcome> = newcomers.iter().map(|n| run_qemu(n, &images)).collect();
        for (n, qemu) in newcomers.iter().zip(&against_qemu) {
            let qlock = run_qlock(n.access, path, images.dir.path());
            assert_eq!(&qlock, qemu, "{holder_name} holds, {} asks", n.name);
            let others = Others { held: set(access), write_locked: LockSet::EMPTY };
            let granted = decide(others, LockSet::EMPTY, set(n.access)) == Verdict::Granted;
            assert_eq!(granted, qemu.is_none(), "reference verdict: {holder_name} holds, {} asks", n.name);
        }
        // The holder's conflicts name it as QEMU's pid and command.
        if let Some(n) = newcomers.iter().zip(&against_qemu).find(|(_, o)| o.is_some()).map(|(n, _)| n) {
            let err = ImageLock::acquire(path, n.access).unwrap_err();
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
                n.name
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

const fn v(
    id: &'static str,
    read: &'static str,
    newcomer: &'static str,
    expect: Option<&'static str>,
) -> Vector {
    Vector { id, read, write: "", posix: false, newcomer, expect }
}

const SHARED_WRITE: Option<&str> = Some("Failed to get shared \"write\" lock");
const WRITE: Option<&str> = Some("Failed to get \"write\" lock");

const VECTORS: &[Vector] = &[
    // V1-V5: a qemu-io rw qcow2 holder's bytes.
    v("V1", "100,101,103,201,203", "qemu-img info", SHARED_WRITE),
    v("V2", "100,101,103,201,203", "qemu-img info -U", None),
    v("V3", "100,101,103,201,203", "qemu-io -r", SHARED_WRITE),
    v("V4", "100,101,103,201,203", "qemu-io", WRITE),
    v("V5", "100,101,103,201,203", "qemu-img check -r all", WRITE),
    // V7-V9: a qemu-nbd rw raw holder's bytes.
    v("V7", "100,101,203", "qemu-io -f raw", None),
    v("V8", "100,101,203", "qemu-img resize -f raw", Some("Failed to get \"resize\" lock")),
    v("V9", "100,101,203", "qemu-img convert -f raw", SHARED_WRITE),
    // V10-V12: a VM-like raw writer.
    v("V10", "100,101,201", "qemu-io -r -f raw", None),
    v("V10", "100,101,201", "qemu-img info -f raw", None),
    v("V11", "100,101,201", "qemu-io -f raw", WRITE),
    v("V11", "100,101,201", "qemu-img resize -f raw", WRITE),
    v("V12", "100,101,201", "qemu-img convert -f raw", SHARED_WRITE),
    // V13-V14: the same with share-rw.
    v("V13", "100,101", "qemu-io -f raw", None),
    v("V13", "100,101", "qemu-img resize -f raw", None),
    v("V14", "100,101", "qemu-img convert -f raw", SHARED_WRITE),
    // V15-V16: someone unsharing consistent read stops even a force-share reader.
    v("V15", "200", "qemu-io -r", Some("Failed to get \"consistent read\" lock")),
    v("V15", "200", "qemu-io -r -U", Some("Failed to get \"consistent read\" lock")),
    v("V16", "200", "qemu-img info", None),
    // V17-V18: an exclusive reader.
    v("V17", "100,201,202,203", "qemu-io -r", None),
    v("V18", "100,201,202,203", "qemu-io", WRITE),
    // V19: QEMU does not treat 102 as write. V20: 104/204 are ignored.
    v("V19", "102", "qemu-io -r", None),
    v("V20", "104,204", "qemu-io", None),
    // V21-V23: foreign write locks stop the lock phase, without hint or errno.
    Vector { write: "100", ..v("V21", "", "qemu-io -r", Some("Failed to lock byte 100")) },
    Vector { write: "100", ..v("V22", "", "qemu-img info", None) },
    Vector { write: "201", ..v("V23", "", "qemu-io -r", Some("Failed to lock byte 201")) },
    Vector { write: "201", ..v("V23", "", "qemu-io -r -f raw", None) },
    // V24: POSIX and OFD locks interoperate.
    Vector { posix: true, ..v("V24", "101,201", "qemu-img info", SHARED_WRITE) },
    Vector { posix: true, ..v("V24", "101,201", "qemu-io -r", SHARED_WRITE) },
    // V29: a qemu-img info in progress.
    v("V29", "201,203", "qemu-io", WRITE),
];

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
    for vector in VECTORS {
        let n = newcomer(vector.newcomer);
        let path = match &images {
            Some(i) => i.path(n.raw).to_path_buf(),
            None if n.raw => raw.clone(),
            None => qcow2.clone(),
        };
        let mut holder = ext_holder(&path, vector);
        let case = format!("{} ({} | W {}) {}", vector.id, vector.read, vector.write, n.name);
        let qlock = run_qlock(n.access, &path, path.parent().unwrap());
        assert_eq!(qlock.as_deref().and_then(|m| m.lines().next()), vector.expect, "{case}");
        if let Some(images) = &images {
            assert_eq!(run_qemu(n, images), qlock, "QEMU against {case}");
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
    let _holder = qemu_io(FrontEnd::QemuIoReadOnly, Format::Qcow2, &images.qcow2);
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
    let _qemu = qemu_io(FrontEnd::QemuIoRw, Format::Qcow2, &images.qcow2);
    let off = LockOptions::default().with_locking(qlock_core::Locking::Off);
    let guard = ImageLock::acquire_with(&images.qcow2, Access::WRITE, &off).unwrap();
    assert_eq!(inspect(&[&images.qcow2]).remove(0).unwrap().holders.len(), 1, "only qemu-io holds");
    drop(guard);
}
