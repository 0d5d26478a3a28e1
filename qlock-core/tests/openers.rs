//! Every opener of an image, from the same `/proc` walk as the holders, with real processes:
//! an unlocked writer and reader, QEMU with `locking=off`, a `-U` reader, `flock(1)`, a byte-0
//! POSIX lease and whole-file locks, a holder in a libvirt-style cgroup scope, a QEMU named with
//! `-name guest=`, and processes of another user (both ways round).
//!
//! Every process says when it is ready (QEMU's prompt, a script's `ready` line, a fake's
//! answer); none is waited for with a sleep.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Helper, paths_env};
use qlock_core::{Access, ImageLock, ImageStatus, Label, LockKind, OpenMode, Opener, Perm, inspect};
use qlock_testkit::{FakeQemu, RawLock, ReadyChild, require};

/// Not a test: the body of the helper processes. Does nothing in a normal run.
#[test]
fn child_role() {
    qlock_testkit::reexec::run_roles(|role, paths| {
        match role {
            // Runs as an unprivileged user: what it sees of root's opener, one line each.
            "unprivileged" => {
                match inspect(paths).remove(0) {
                    Ok(status) => {
                        common::say(&format!("openers: {}", status.openers.len()));
                        common::say(&format!("unreadable: {}", status.unreadable_processes > 0));
                    }
                    Err(e) => common::say(&format!("error: {e}")),
                }
                common::ready_and_wait();
            }
            other => panic!("unknown role {other}"),
        }
    });
}

fn status(path: &Path) -> ImageStatus {
    inspect(&[path]).remove(0).expect("inspect")
}

/// The openers of `path` belonging to `pid`.
fn of(status: &ImageStatus, pid: u32) -> Vec<&Opener> {
    status.openers.iter().filter(|o| o.pid == pid).collect()
}

/// The one opener of `path` belonging to `pid`.
fn one(status: &ImageStatus, pid: u32) -> Opener {
    match &of(status, pid)[..] {
        [o] => (*o).clone(),
        other => panic!("one opener of pid {pid} expected, got {other:?} in {:?}", status.openers),
    }
}

/// The Python interpreter itself (not a shim script), to run under another name.
fn python() -> PathBuf {
    let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().unwrap();
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A Python process with `path` open in `mode` (`rb`, `r+b`) and no lock, ready once it says
/// so; `extra` are more arguments for its command line.
fn python_opener(program: &Path, path: &Path, mode: &str, extra: &[&str]) -> ReadyChild {
    let mut cmd = Command::new(program);
    cmd.args([
        "-c",
        "import sys; f = open(sys.argv[1], sys.argv[2]); print('ready', flush=True); sys.stdin.read()",
    ])
    .arg(path)
    .arg(mode)
    .args(extra);
    ReadyChild::spawn(cmd, "ready").expect("python opener")
}

#[test]
fn an_unlocked_writer_and_reader_are_named_with_mode_age_and_label() {
    let _serial = common::serial();
    let (_dir, path) = common::image();
    // Forked fakes holding no lock, one on a read-write descriptor.
    let writer = FakeQemu::builder(&path).raw([]).writable(true).spawn().unwrap();
    let reader = FakeQemu::builder(&path).raw([]).spawn().unwrap();
    let st = status(&path);
    assert!(st.others.held.is_empty() && st.holders.is_empty() && !st.unidentified, "{st:?}");
    let w = one(&st, writer.pid());
    assert_eq!((w.mode, w.label, w.locks()), (OpenMode::ReadWrite, Label::UnlockedWriter, false));
    assert!(w.is_unlocked_writer());
    assert!(w.age.is_some_and(|a| a.as_secs() < 600), "{w:?}");
    assert_eq!(w.command.as_deref(), Some("qemu-fake"));
    assert!(w.to_string().contains("open for writing with no lock: QEMU with locking=off"), "{w}");
    let r = one(&st, reader.pid());
    assert_eq!((r.mode, r.label, r.is_unlocked_writer()), (OpenMode::ReadOnly, Label::UnlockedReader, false));
    // Inspection's own descriptors are closed before the walk.
    assert!(of(&st, std::process::id()).is_empty(), "{:?}", st.openers);
    drop((writer, reader));
    assert!(status(&path).openers.is_empty());
}

#[test]
fn many_processes_on_two_images_are_each_described_on_both() {
    let _serial = common::serial();
    let (_dir, a) = common::image();
    let b = a.with_extension("second");
    fs::write(&b, b"").unwrap();
    // 70 processes (enough for the facts to be read on two threads), each with image a as its
    // stdin and image b as its stdout: the descriptors exist once spawn returns. The walk once
    // lost every descriptor of a process after the first it had to `stat` (b here).
    let children = Killed(
        (0..70)
            .map(|_| {
                Command::new("sleep")
                    .arg("600")
                    .stdin(fs::File::open(&a).unwrap())
                    .stdout(fs::OpenOptions::new().write(true).open(&b).unwrap())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    let both = inspect(&[&a, &b]);
    let uid = fs::metadata("/proc/self").unwrap().uid();
    for (status, mode) in both.iter().zip([OpenMode::ReadOnly, OpenMode::WriteOnly]) {
        let status = status.as_ref().expect("inspect");
        for child in &children.0 {
            let o = one(status, child.id());
            assert_eq!(
                (o.fd, o.mode, o.command.as_deref(), o.uid),
                (u32::from(mode != OpenMode::ReadOnly), mode, Some("sleep"), Some(uid)),
                "{o:?}"
            );
            assert!(o.age.is_some_and(|a| a.as_secs() < 600), "{o:?}");
        }
        // A write-only descriptor is a writer too, and its line says no more than it knows.
        let line = one(status, children.0[0].id()).to_string();
        let said = if mode == OpenMode::WriteOnly { "wo" } else { "ro" };
        assert!(line.contains(&format!("fd {} {said},", u32::from(mode != OpenMode::ReadOnly))), "{line}");
        assert!(!line.contains("read-write"), "{line}");
    }
}

/// Children killed and reaped when dropped, also when an assertion fails.
struct Killed(Vec<std::process::Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn qemu_with_locking_off_is_an_unlocked_writer() {
    require!("qemu-io", "qemu-img");
    let _serial = common::serial();
    let img = qlock_testkit::TempImage::new(qlock_testkit::Format::Qcow2).unwrap();
    let opts =
        format!("driver=qcow2,file.driver=file,file.filename={},file.locking=off", img.path().display());
    let mut cmd = Command::new("qemu-io");
    cmd.args(["--image-opts", &opts]);
    let qemu = ReadyChild::spawn(cmd, "qemu-io> ").expect("qemu-io with locking=off");
    let st = status(img.path());
    assert!(st.others.held.is_empty(), "locking=off leaves no byte: {st:?}");
    let o = one(&st, qemu.pid());
    assert_eq!((o.mode, o.label, o.locks()), (OpenMode::ReadWrite, Label::UnlockedWriter, false));
    assert_eq!(o.command.as_deref(), Some("qemu-io"));
    // The locks alone say the image is free; only the opener tells otherwise.
    drop(ImageLock::acquire(img.path(), Access::WRITE).expect("free by the locks"));
}

#[test]
fn a_force_share_reader_holds_byte_100_alone() {
    require!("qemu-io", "qemu-img");
    let _serial = common::serial();
    let img = qlock_testkit::TempImage::new(qlock_testkit::Format::Qcow2).unwrap();
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-r", "-U", "-f", "qcow2"]).arg(img.path());
    let qemu = ReadyChild::spawn(cmd, "qemu-io> ").expect("qemu-io -r -U");
    let o = one(&status(img.path()), qemu.pid());
    assert_eq!((o.mode, o.label, o.lock_kind), (OpenMode::ReadOnly, Label::ForceShare, Some(LockKind::Ofd)));
    // And a QEMU writer beside it: a protocol holder, decoded.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]).arg(img.path());
    let writer = ReadyChild::spawn(cmd, "qemu-io> ").expect("qemu-io");
    let o = one(&status(img.path()), writer.pid());
    let rw = Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE;
    assert_eq!(
        (o.mode, o.label),
        (OpenMode::ReadWrite, Label::Qemu { uses: rw, refuses: Perm::WRITE | Perm::RESIZE })
    );
    assert_eq!(
        o.label.to_string(),
        "QEMU-protocol holder: uses consistent-read,write,resize; refuses write,resize"
    );
}

#[test]
fn a_flock_holder_is_seen_though_qemu_never_sees_it() {
    require!("flock");
    let _serial = common::serial();
    let (_dir, path) = common::image();
    for (args, exclusive) in [(&["-x"][..], true), (&["-s"][..], false)] {
        let mut cmd = Command::new("flock");
        cmd.args(args).arg(&path).args(["-c", "echo ready; exec cat"]);
        let holder = ReadyChild::spawn(cmd, "ready").expect("flock");
        let st = status(&path);
        assert!(st.others.held.is_empty() && st.foreign.is_empty(), "QEMU's probes see nothing: {st:?}");
        let o = one(&st, holder.pid());
        assert_eq!(
            (o.label, o.flock, o.locks()),
            (Label::Flock { exclusive }, Some(exclusive), true),
            "{o:?}"
        );
        assert!(o.label.to_string().contains("QEMU never sees it"));
        // flock(1) passes its descriptor on to the command: the same lock, another opener.
        assert!(st.openers.iter().any(|c| c.pid != holder.pid() && c.label == o.label), "{:?}", st.openers);
        drop(ImageLock::acquire(&path, Access::WRITE).expect("a QEMU would get in"));
    }
}

#[test]
fn leases_and_whole_file_locks_are_labelled() {
    let _serial = common::serial();
    let (_dir, path) = common::image();
    let lease = FakeQemu::builder(&path).raw([RawLock::byte(0).exclusive().posix()]).spawn().unwrap();
    let o = one(&status(&path), lease.pid());
    assert_eq!(
        (o.label, o.lock_kind, o.mode),
        (Label::Lease { write: true }, Some(LockKind::Posix), OpenMode::ReadWrite)
    );
    assert!(o.label.to_string().contains("libvirt"));
    drop(lease);
    let whole = FakeQemu::builder(&path).raw([RawLock::WHOLE_FILE]).spawn().unwrap();
    let o = one(&status(&path), whole.pid());
    assert_eq!(o.label, Label::WholeFile { write: false, kind: LockKind::Ofd });
    drop(whole);
    let vm = FakeQemu::builder(&path).access(Access::WRITE).spawn().unwrap();
    let o = one(&status(&path), vm.pid());
    assert!(matches!(o.label, Label::Qemu { .. }) && o.locks(), "{o:?}");
}

/// A cgroup made for one test and removed after it, with the processes moved in put back.
struct Cgroup {
    dir: PathBuf,
    parent_procs: PathBuf,
}

impl Cgroup {
    /// A child of this process's cgroup named `name`, on the unified hierarchy, else on
    /// systemd's v1 one; `None` (with the reason) where none can be made.
    fn new(name: &str) -> Result<Cgroup, String> {
        let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let mounts = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let mount_of = |fstype: &str, opt: Option<&str>| {
            mounts.lines().find_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                let mut post = post.split_whitespace();
                let ok =
                    post.next()? == fstype && opt.is_none_or(|o| post.nth(1).is_some_and(|s| s.contains(o)));
                ok.then(|| pre.split_whitespace().nth(4).map(PathBuf::from)).flatten()
            })
        };
        let v2 = own.lines().find_map(|l| l.strip_prefix("0::")).zip(mount_of("cgroup2", None));
        let v1 = own
            .lines()
            .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p))
            .zip(mount_of("cgroup", Some("name=systemd")));
        let mut why = String::from("no cgroup hierarchy mounted");
        for (path, mount) in v2.into_iter().chain(v1) {
            let parent = mount.join(path.trim_start_matches('/'));
            let dir = parent.join(name);
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(Cgroup { dir, parent_procs: parent.join("cgroup.procs") }),
                Err(e) => why = format!("cannot create {}: {e}", dir.display()),
            }
        }
        Err(why)
    }

    fn enter(&self, pid: u32) {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("move into the cgroup");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = fs::write(&self.parent_procs, pid);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_holder_in_a_libvirt_scope_shows_its_unit_and_vm_name() {
    let _serial = common::serial();
    let (_dir, path) = common::image();
    let scope = format!("machine-qemu\\x2d{}\\x2dqlock\\x2dvm.scope", std::process::id());
    let cgroup = match Cgroup::new(&scope) {
        Ok(c) => c,
        Err(why) => return qlock_testkit::skip(format_args!("a cgroup of our own: {why}")),
    };
    let holder = FakeQemu::builder(&path).raw([]).writable(true).spawn().unwrap();
    cgroup.enter(holder.pid());
    let o = one(&status(&path), holder.pid());
    assert_eq!(o.unit.as_deref(), Some(scope.as_str()), "{o:?}");
    assert!(o.cgroup.as_deref().is_some_and(|c| c.ends_with(&scope)), "{o:?}");
    assert_eq!((o.machine.as_deref(), o.vm()), (Some("qlock-vm"), Some("qlock-vm")));
    assert!(o.to_string().contains(", vm qlock-vm, unit machine-qemu"), "{o}");
    drop(holder);
    drop(cgroup);
}

#[test]
fn a_qemu_named_with_name_guest_shows_the_vm_name() {
    require!("python3");
    let _serial = common::serial();
    let (dir, path) = common::image();
    // A stand-in QEMU: the interpreter run under QEMU's name (the kernel names the process after
    // the file executed), with QEMU's -name option on its command line.
    let qemu = dir.path().join("qemu-system-x86_64");
    std::os::unix::fs::symlink(python(), &qemu).unwrap();
    let vm = python_opener(&qemu, &path, "r+b", &["-name", "guest=vm1,debug-threads=on"]);
    let o = one(&status(&path), vm.pid());
    assert_eq!(o.command.as_deref(), Some("qemu-system-x86"), "the kernel cuts names at 15 bytes");
    assert_eq!((o.qemu_name.as_deref(), o.vm(), o.label), (Some("vm1"), Some("vm1"), Label::UnlockedWriter));
    // The same option on a program that is no QEMU means nothing.
    let other = python_opener(&python(), &path, "rb", &["-name", "guest=vm2"]);
    let o = one(&status(&path), other.pid());
    assert_eq!((o.qemu_name, o.mode), (None, OpenMode::ReadOnly));
}

#[test]
fn another_users_openers_are_unknown_not_an_error_and_root_sees_them() {
    let _serial = common::serial();
    if !common::root_or_skip("start processes as user nobody") {
        return;
    }
    require!("setpriv");
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("shared.img");
    fs::write(&path, b"").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();

    // Root's unlocked writer, seen by nobody: not listed, counted as unreadable, no error.
    let root_writer = FakeQemu::builder(&path).raw([]).writable(true).spawn().unwrap();
    let helper = Helper::start_as("unprivileged", &[paths_env(&[&path])], Some(65534));
    assert_eq!(helper.lines(), vec!["openers: 0", "unreadable: true"]);
    helper.finish();
    drop(root_writer);

    // nobody's writer (flock(1) run by setpriv), seen by root: named, with its user.
    require!("flock");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "flock", "-n"])
        .arg(&path)
        .args(["-c", "echo ready; exec cat"]);
    let theirs = ReadyChild::spawn(cmd, "ready").expect("flock as nobody");
    let o = one(&status(&path), theirs.pid());
    assert_eq!((o.uid, o.label), (Some(65534), Label::Flock { exclusive: true }));
}
