//! `ChainLock` against real QEMU on a graph `top.qcow2` (external data file `data.raw`) →
//! `mid.qcow2` → `base.raw`, written by the real `qemu-img`:
//!
//! - as a newcomer: for holders on single nodes (real `qemu-io`, and fakes taking chosen
//!   bytes), `ChainLock::lock_as` with a front end's user gets the verdict and the message
//!   (`Could not open backing file: ` prefixes and the node named included) that the real
//!   `qemu-io` gets opening the top;
//! - as a holder in another process: real `qemu-io` newcomers on every node get what they
//!   get from a real `qemu-io` holding the top.
//!
//! Skips without QEMU (fails under `CI=true`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::Helper;
use qlock_core::graph::ChainLock;
use qlock_core::graph::{Chain, Format};
use qlock_core::{Access, ImageLock, LockOptions, Perm};
use qlock_testkit::{FakeQemu, FrontEnd};

fn qemu() -> bool {
    if common::have("qemu-img") && common::have("qemu-io") {
        return true;
    }
    assert!(std::env::var_os("CI").is_none_or(|v| v != "true"), "QEMU is required under CI=true");
    false
}

struct Graph {
    _dir: tempfile::TempDir,
    top: PathBuf,
    data: PathBuf,
    mid: PathBuf,
    base: PathBuf,
}

fn img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img").current_dir(dir).env("LC_ALL", "C").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn graph() -> Graph {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::File::create(p("base.raw")).unwrap().set_len(1 << 20).unwrap();
    img(dir.path(), &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", "mid.qcow2"]);
    let data = format!("data_file={}", p("data.raw").display());
    img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "-o", &data, "-F", "qcow2", "-b", "mid.qcow2", "top.qcow2", "1M"],
    );
    Graph { top: p("top.qcow2"), data: p("data.raw"), mid: p("mid.qcow2"), base: p("base.raw"), _dir: dir }
}

/// `qemu-io ARGS PATH` that opens and quits at once: `None` when it got in, else its message
/// without the `qemu-io: can't open device PATH: ` lead.
fn qemu_io(args: &[&str], path: &Path) -> Option<String> {
    let out = Command::new("qemu-io")
        .env("LC_ALL", "C")
        .args(args)
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if out.status.success() {
        return None;
    }
    let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    let lead = format!("can't open device {}: ", path.display());
    Some(err.split_once(&lead).map_or(err.clone(), |(_, m)| m.to_string()))
}

/// A qlock error's text without the `Held by` lines QEMU does not print.
fn qemu_like(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().filter(|l| !l.starts_with("Held by")).collect::<Vec<_>>().join("\n")
}

const NEWCOMERS: [(FrontEnd, &[&str]); 3] = [
    (FrontEnd::QemuIoRw, &["-f", "qcow2"]),
    (FrontEnd::QemuIoReadOnly, &["-r", "-f", "qcow2"]),
    (FrontEnd::QemuIoForceShare, &["-r", "-U", "-f", "qcow2"]),
];

fn lock_as(top: &Path, fe: FrontEnd) -> Result<ChainLock, qlock_core::graph::ChainError> {
    let opts = LockOptions::default();
    let chain = Chain::discover(ImageLock::open(top, &opts).unwrap(), Some(Format::Qcow2), |p| {
        ImageLock::open(p, &opts)
    })?;
    ChainLock::lock_as(chain, fe.user())
}

#[test]
fn child_role() {
    common::run_role(|role| {
        assert_eq!(role, "chain");
        let top = PathBuf::from(std::env::var("QLOCK_TOP").unwrap());
        let fe: usize = std::env::var("QLOCK_FRONT_END").unwrap().parse().unwrap();
        let _guard = lock_as(&top, FrontEnd::ALL[fe]).unwrap();
        common::ready_and_wait();
    });
}

#[test]
fn a_chain_lock_is_refused_where_and_as_qemu_io_is() {
    if !qemu() {
        return;
    }
    let g = graph();
    let unshare_read = Access::new(Perm::empty(), Perm::LEGACY_ALL - Perm::CONSISTENT_READ);
    // Holders on single nodes: real qemu-io, or a fake taking an access's bytes.
    type Setup<'a> = (&'a str, Vec<(&'a Path, Result<FrontEnd, Access>, qlock_testkit::Format)>);
    use qlock_testkit::Format::{Qcow2, Raw};
    let cases: Vec<Setup<'_>> = vec![
        ("qemu-io on mid", vec![(&g.mid, Ok(FrontEnd::QemuIoRw), Qcow2)]),
        ("qemu-io -r on mid", vec![(&g.mid, Ok(FrontEnd::QemuIoReadOnly), Qcow2)]),
        ("qemu-io on base", vec![(&g.base, Ok(FrontEnd::QemuIoRw), Raw)]),
        ("qemu-io on data", vec![(&g.data, Ok(FrontEnd::QemuIoRw), Raw)]),
        ("qemu-io -r on top", vec![(&g.top, Ok(FrontEnd::QemuIoReadOnly), Qcow2)]),
        ("write on data", vec![(&g.data, Err(Access::WRITE), Raw)]),
        ("read on data", vec![(&g.data, Err(Access::READ), Raw)]),
        ("read on base", vec![(&g.base, Err(Access::READ), Raw)]),
        ("unshare read on base", vec![(&g.base, Err(unshare_read), Raw)]),
        (
            "write on data and mid",
            vec![(&g.data, Err(Access::WRITE), Raw), (&g.mid, Err(Access::WRITE), Raw)],
        ),
        (
            "read on data, write on mid",
            vec![(&g.data, Err(Access::READ), Raw), (&g.mid, Err(Access::WRITE), Raw)],
        ),
        (
            "unshare read on base, write on mid",
            vec![(&g.base, Err(unshare_read), Raw), (&g.mid, Err(Access::WRITE), Raw)],
        ),
    ];
    let mut refusals = 0;
    for (name, holders) in &cases {
        let _held: Vec<FakeQemu> = holders
            .iter()
            .map(|(path, what, format)| match what {
                Ok(fe) => FakeQemu::real(path, *fe, *format).unwrap(),
                Err(access) => FakeQemu::builder(path).access(*access).spawn().unwrap(),
            })
            .collect();
        for (fe, args) in NEWCOMERS {
            let qemu = qemu_io(args, &g.top);
            let ours = lock_as(&g.top, fe).err().map(|e| qemu_like(&e));
            assert_eq!(ours, qemu, "{name}: newcomer {fe}");
            refusals += usize::from(qemu.is_some());
        }
    }
    assert!(refusals >= 10, "only {refusals} refusals: the cases do not test much");
}

#[test]
fn qemu_io_meets_a_chain_lock_holder_as_it_meets_qemu_io() {
    if !qemu() {
        return;
    }
    let g = graph();
    let newcomers: Vec<(&Path, &[&str])> = vec![
        (&g.top, &["-f", "qcow2"]),
        (&g.top, &["-r", "-f", "qcow2"]),
        (&g.top, &["-r", "-U", "-f", "qcow2"]),
        (&g.mid, &["-f", "qcow2"]),
        (&g.mid, &["-r", "-f", "qcow2"]),
        (&g.base, &["-f", "raw"]),
        (&g.base, &["-r", "-f", "raw"]),
        (&g.data, &["-f", "raw"]),
        (&g.data, &["-r", "-f", "raw"]),
    ];
    let run_all = || -> Vec<Option<String>> { newcomers.iter().map(|(p, a)| qemu_io(a, p)).collect() };
    for fe in [FrontEnd::QemuIoRw, FrontEnd::QemuIoReadOnly, FrontEnd::QemuIoForceShare] {
        let real = FakeQemu::real(&g.top, fe, qlock_testkit::Format::Qcow2).unwrap();
        let against_qemu = run_all();
        drop(real);
        let index = FrontEnd::ALL.iter().position(|f| *f == fe).unwrap();
        let env = [("QLOCK_TOP", g.top.display().to_string()), ("QLOCK_FRONT_END", index.to_string())];
        let holder = Helper::start("chain", &env);
        let against_qlock = run_all();
        holder.finish();
        assert_eq!(against_qlock, against_qemu, "holder {fe}");
        if fe == FrontEnd::QemuIoRw {
            assert!(against_qemu.iter().filter(|v| v.is_some()).count() >= 3, "{against_qemu:?}");
        }
    }
}
