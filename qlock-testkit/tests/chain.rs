//! Chain holders: a fake holder built with `.chain(true)` holds, on every node of an image
//! graph, the bytes the real QEMU front end holds there (read from outside with
//! `qlock_core::inspect`, keeping each holder's own pid), and is refused where and as the real
//! `qemu-io` is. The graph is `top.qcow2` (external data file `data.raw`) → `mid.qcow2` →
//! `base.raw`, written by the real `qemu-img`. Skips without QEMU; fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;

use qlock_core::LockSet;
use qlock_core::inspect;
use qlock_testkit::{Access, Error, FakeQemu, Format, FrontEnd};
use tempfile::TempDir;

fn img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img").current_dir(dir).args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// top.qcow2 (data file) → mid.qcow2 → base.raw in a fresh directory; returns it and the nodes
/// in discovery order, or `None` without QEMU (the test skips, or fails under `CI=true`).
fn graph() -> Option<(TempDir, Vec<PathBuf>)> {
    qlock_testkit::require!("qemu-img", "qemu-io", "qemu-storage-daemon");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = |n: &str| dir.join(n);
    std::fs::File::create(p("base.raw")).unwrap().set_len(1 << 20).unwrap();
    img(dir, &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", "mid.qcow2"]);
    let data = format!("data_file={}", p("data.raw").display());
    img(
        dir,
        &["create", "-q", "-f", "qcow2", "-o", &data, "-F", "qcow2", "-b", "mid.qcow2", "top.qcow2", "1M"],
    );
    let nodes = vec![p("top.qcow2"), p("data.raw"), p("mid.qcow2"), p("base.raw")];
    Some((tmp, nodes))
}

/// The bytes `pid` holds on each node.
fn held_by(pid: u32, nodes: &[PathBuf]) -> Vec<String> {
    inspect(nodes)
        .into_iter()
        .map(|s| {
            let s = s.unwrap();
            let mut set = LockSet::EMPTY;
            for h in s.holders.iter().filter(|h| h.pid == pid) {
                set = set.union(h.bytes());
            }
            set.to_string()
        })
        .collect()
}

#[test]
fn a_fake_chain_holder_holds_what_the_real_front_end_holds_on_every_node() {
    let Some((_dir, nodes)) = graph() else { return };
    let fronts = [
        FrontEnd::QemuIoRw,
        FrontEnd::QemuIoReadOnly,
        FrontEnd::QemuIoForceShare,
        FrontEnd::QemuNbdRw,
        FrontEnd::QemuNbdReadOnly,
        FrontEnd::StorageDaemonBlockdev,
        // Not BackingFile: its real stand-in is an overlay nobody attaches to, which leaves
        // the raw leaves below unlocked, where a VM's overlay locks them.
    ];
    for fe in fronts {
        let real = FakeQemu::real(&nodes[0], fe, Format::Qcow2).unwrap();
        let want = held_by(real.pid(), &nodes);
        drop(real);
        let fake = FakeQemu::builder(&nodes[0]).front_end(fe, Format::Qcow2).chain(true).spawn().unwrap();
        let got = held_by(fake.pid(), &nodes);
        assert_eq!(got, want, "{fe}");
        let own: Vec<String> = fake.chain_nodes().iter().map(|n| n.held.to_string()).collect();
        assert_eq!(own, want, "{fe}: what the handle says it holds");
        assert_eq!(fake.chain_nodes().iter().map(|n| n.path.clone()).collect::<Vec<_>>(), nodes);
    }
}

#[test]
fn a_fake_chain_newcomer_is_refused_as_qemu_io_is() {
    let Some((_dir, nodes)) = graph() else { return };
    let (data, mid) = (&nodes[1], &nodes[2]);
    let blockers: [(&str, Vec<(&PathBuf, Access)>); 4] = [
        ("write on mid", vec![(mid, Access::WRITE)]),
        ("write on data", vec![(data, Access::WRITE)]),
        ("read on data", vec![(data, Access::READ)]),
        ("read on data, write on mid", vec![(data, Access::READ), (mid, Access::WRITE)]),
    ];
    let newcomers: [(FrontEnd, &[&str]); 2] =
        [(FrontEnd::QemuIoRw, &["-f", "qcow2"]), (FrontEnd::QemuIoReadOnly, &["-r", "-f", "qcow2"])];
    let mut refused = 0;
    for (name, blocking) in &blockers {
        let _b: Vec<FakeQemu> =
            blocking.iter().map(|(p, a)| FakeQemu::builder(p).access(*a).spawn().unwrap()).collect();
        for (fe, args) in newcomers {
            let out = Command::new("qemu-io").env("LC_ALL", "C").args(args).arg(&nodes[0]).output().unwrap();
            let qemu = (!out.status.success()).then(|| {
                let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
                let lead = format!("can't open device {}: ", nodes[0].display());
                err.split_once(&lead).map(|(_, m)| m.to_string()).unwrap_or(err)
            });
            let fake = FakeQemu::builder(&nodes[0]).front_end(fe, Format::Qcow2).chain(true).spawn();
            let ours = fake.err().map(|e| {
                assert!(matches!(e, Error::Chain(_)), "{e:?}");
                e.to_string().lines().filter(|l| !l.starts_with("Held by")).collect::<Vec<_>>().join("\n")
            });
            assert_eq!(ours, qemu, "{name}: {fe}");
            refused += usize::from(qemu.is_some());
        }
    }
    assert!(refused >= 5, "{refused}");
}
