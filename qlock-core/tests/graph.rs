//! Graph discovery against images written by the real `qemu-img` (v2 and v3 headers, backing
//! chains, raw bases, external data files, other formats), hand-corrupted copies of them, and a
//! property test that the header parser never panics.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use qlock_core::graph::qcow2::{Header, HeaderError, probe};
use qlock_core::graph::{Chain, ChainError, Format, Role};
use qlock_core::{Access, ImageLock, LockOptions};

/// A fresh directory for `qemu-img` to write images in; `None` without qemu-img (the test
/// skips, or fails under `CI=true`).
fn scratch() -> Option<tempfile::TempDir> {
    qlock_testkit::require!("qemu-img");
    Some(tempfile::tempdir().unwrap())
}

fn img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img").current_dir(dir).env("LC_ALL", "C").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn raw(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(1 << 20).unwrap();
}

fn chain(path: &Path) -> Result<Chain, ChainError> {
    Chain::open(path, &LockOptions::default())
}

/// `(file name, role, format)` of each node.
fn shape(c: &Chain) -> Vec<(String, Role, Format)> {
    c.nodes()
        .iter()
        .map(|n| (n.path().file_name().unwrap().to_string_lossy().into_owned(), n.role, n.format))
        .collect()
}

fn node(name: &str, role: Role, format: Format) -> (String, Role, Format) {
    (name.to_string(), role, format)
}

const TOP: Role = Role::Top;
const B1: Role = Role::Backing { depth: 1 };
const B2: Role = Role::Backing { depth: 2 };

#[test]
fn v2_and_v3_chains_written_by_qemu_img() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    img(d, &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "base.qcow2", "1M"]);
    img(
        d,
        &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"],
    );
    img(d, &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]);
    let before = std::fs::read(d.join("top.qcow2")).unwrap();
    let c = chain(&d.join("top.qcow2")).unwrap();
    use Format::Qcow2;
    assert_eq!(
        shape(&c),
        [node("top.qcow2", TOP, Qcow2), node("mid.qcow2", B1, Qcow2), node("base.qcow2", B2, Qcow2)]
    );
    let versions: Vec<u32> = c.nodes().iter().map(|n| n.header.as_ref().unwrap().version).collect();
    assert_eq!(versions, [3, 2, 2]);
    assert_eq!(c.nodes()[0].header.as_ref().unwrap().backing_format.as_deref(), Some("qcow2"));
    // The relative name is resolved against the overlay's directory, not ours.
    assert_eq!(c.nodes()[1].path(), d.join("mid.qcow2"));
    drop(c);
    assert_eq!(std::fs::read(d.join("top.qcow2")).unwrap(), before, "discovery never writes");
}

#[test]
fn raw_bases_data_files_and_probing() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    raw(&d.join("base.raw"));
    img(d, &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2"]);
    use Format::{Qcow2, Raw};
    assert_eq!(
        shape(&chain(&d.join("top.qcow2")).unwrap()),
        [node("top.qcow2", TOP, Qcow2), node("base.raw", B1, Raw)]
    );

    let data = d.join("data.raw");
    raw(&data);
    // QEMU refuses data_file_raw=on with a backing file: on is tried alone, off over a base.
    let o = format!("data_file={},data_file_raw=on", data.display());
    img(d, &["create", "-q", "-f", "qcow2", "-o", &o, "dtop.qcow2", "1M"]);
    let data_role = Role::DataFile { depth: 0, raw: true };
    assert_eq!(
        shape(&chain(&d.join("dtop.qcow2")).unwrap()),
        [node("dtop.qcow2", TOP, Qcow2), node("data.raw", data_role, Raw)]
    );
    let o = format!("data_file={},data_file_raw=off", data.display());
    img(d, &["create", "-q", "-f", "qcow2", "-o", &o, "-b", "base.raw", "-F", "raw", "dbtop.qcow2"]);
    let data_role = Role::DataFile { depth: 0, raw: false };
    assert_eq!(
        shape(&chain(&d.join("dbtop.qcow2")).unwrap()),
        [node("dbtop.qcow2", TOP, Qcow2), node("data.raw", data_role, Raw), node("base.raw", B1, Raw)]
    );

    // A top given by its raw contents is a leaf; a top with qcow2 magic is probed as qcow2.
    assert_eq!(shape(&chain(&d.join("base.raw")).unwrap()), [node("base.raw", TOP, Raw)]);
    let top = ImageLock::open(d.join("top.qcow2"), &LockOptions::default()).unwrap();
    let c = Chain::discover(top, Some(Raw), |p| ImageLock::open(p, &LockOptions::default())).unwrap();
    assert_eq!(shape(&c), [node("top.qcow2", TOP, Raw)]);
}

/// Replaces the backing-format extension by an end marker: QEMU then probes the backing file.
fn drop_backing_format(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let at = usize::try_from(u32::from_be_bytes(b[100..104].try_into().unwrap())).unwrap();
    assert_eq!(&b[at..at + 4], &0xe279_2acau32.to_be_bytes());
    b[at..at + 4].copy_from_slice(&[0; 4]);
    std::fs::write(path, b).unwrap();
}

#[test]
fn without_a_recorded_format_the_backing_file_is_probed() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    raw(&d.join("base.raw"));
    img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    img(d, &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "r.qcow2"]);
    img(d, &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "q.qcow2"]);
    drop_backing_format(&d.join("r.qcow2"));
    drop_backing_format(&d.join("q.qcow2"));
    let c = chain(&d.join("r.qcow2")).unwrap();
    assert_eq!(c.nodes()[0].header.as_ref().unwrap().backing_format, None);
    assert_eq!(c.nodes()[1].format, Format::Raw);
    assert_eq!(chain(&d.join("q.qcow2")).unwrap().nodes()[1].format, Format::Qcow2);
}

#[test]
fn other_formats_are_named_and_refused() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    for format in ["vmdk", "vdi", "vhdx", "qed", "vpc", "parallels"] {
        let name = format!("base.{format}");
        img(d, &["create", "-q", "-f", format, &name, "1M"]);
        // qemu-img's own probe agrees with ours.
        let info =
            Command::new("qemu-img").args(["info", "--output=json"]).arg(d.join(&name)).output().unwrap();
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(info.contains(&format!("\"format\": \"{format}\"")), "{format}: {info}");
        let head = std::fs::read(d.join(&name)).unwrap();
        assert_eq!(probe(&head[..head.len().min(512)]).to_string(), format);
        // As a backing file with its format recorded, and probed.
        let top = format!("over-{format}.qcow2");
        img(d, &["create", "-q", "-f", "qcow2", "-b", &name, "-F", format, &top]);
        for path in [d.join(&name), d.join(&top)] {
            let err = chain(&path).unwrap_err();
            assert!(matches!(&err, ChainError::UnsupportedFormat { format: f, .. } if f == format), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("unsupported format {format}")) && msg.contains("--no-chain"),
                "{msg}"
            );
        }
    }
}

#[test]
fn names_that_are_not_local_files_are_refused() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    let cases = [
        ("nbd://localhost/x", Some("nbd")),
        ("nbd:unix:/tmp/x.sock", Some("nbd")),
        ("http://example.invalid/x", Some("http")),
        ("gluster://h/v/x", Some("gluster")),
        ("json:{\"driver\":\"file\",\"filename\":\"/x\"}", None),
    ];
    for (i, (name, protocol)) in cases.iter().enumerate() {
        let top = format!("p{i}.qcow2");
        img(d, &["create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2", &top, "1M"]);
        let err = chain(&d.join(&top)).unwrap_err();
        match (protocol, &err) {
            (Some(p), ChainError::Protocol { protocol, .. }) => assert_eq!(protocol, p),
            (None, ChainError::JsonName { .. }) => {}
            _ => panic!("{name}: {err:?}"),
        }
        assert!(err.to_string().contains("--no-chain"), "{err}");
    }
}

#[test]
fn missing_backing_files_fail_as_in_qemu() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    img(d, &["create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "top.qcow2", "1M"]);
    let err = chain(&d.join("top.qcow2")).unwrap_err();
    let gone = d.join("gone.qcow2");
    assert_eq!(
        err.to_string(),
        format!(
            "Could not open backing file: Could not open '{}': No such file or directory",
            gone.display()
        )
    );
    // qemu-io says the same after its own prefix.
    if common::have("qemu-io") {
        let mut cmd = Command::new("qemu-io");
        let out =
            cmd.env("LC_ALL", "C").args(["-r", "-c", "quit"]).arg(d.join("top.qcow2")).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stderr).contains(&err.to_string()));
    }
}

#[test]
fn loops_are_found_by_device_and_inode() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    img(d, &["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2"]);
    // a -> b -> a, with b reached through a hard link under another name.
    std::fs::hard_link(d.join("b.qcow2"), d.join("b-link.qcow2")).unwrap();
    img(d, &["rebase", "-u", "-b", "b-link.qcow2", "-F", "qcow2", "a.qcow2"]);
    let err = chain(&d.join("b.qcow2")).unwrap_err();
    assert!(
        matches!(&err, ChainError::Loop { path, first } if path.ends_with("b-link.qcow2") && first.ends_with("b.qcow2")),
        "{err:?}"
    );
    // A self-referencing image.
    img(d, &["create", "-q", "-f", "qcow2", "self.qcow2", "1M"]);
    img(d, &["rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", "self.qcow2"]);
    assert!(matches!(chain(&d.join("self.qcow2")), Err(ChainError::Loop { .. })));
}

#[test]
fn absurd_depth_is_refused() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    let base = std::fs::read(d.join("base.qcow2")).unwrap();
    img(d, &["create", "-q", "-f", "qcow2", "-b", "n0.qcow2", "-F", "qcow2", "-u", "proto.qcow2", "1M"]);
    let proto = std::fs::read(d.join("proto.qcow2")).unwrap();
    // Overlays n{i} -> n{i-1} ... -> n0, written by patching the name in one qemu-img output
    // (same length names keep the header intact): far quicker than 257 qemu-img runs.
    let name_at = usize::try_from(u64::from_be_bytes(proto[8..16].try_into().unwrap())).unwrap();
    let name = |i: usize| format!("n{i:03}.qcow2");
    let mut proto = proto;
    proto[16..20].copy_from_slice(&u32::try_from(name(0).len()).unwrap().to_be_bytes());
    std::fs::write(d.join(name(0)), &base).unwrap();
    let depth = qlock_core::graph::MAX_DEPTH + 1;
    for i in 1..=depth {
        proto[name_at..name_at + name(0).len()].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(d.join(name(i)), &proto).unwrap();
    }
    let ok = chain(&d.join(name(depth - 1))).unwrap();
    assert_eq!(ok.nodes().len(), depth);
    let err = chain(&d.join(name(depth))).unwrap_err();
    assert!(matches!(err, ChainError::TooDeep { limit: 256, .. }), "{err:?}");
}

#[test]
fn corrupt_and_truncated_headers_are_typed_errors() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    img(d, &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "-u", "top.qcow2", "1M"]);
    let good = std::fs::read(d.join("top.qcow2")).unwrap();
    type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: [(&str, Corrupt, HeaderError); 3] = [
        ("truncated.qcow2", Box::new(|b| b.truncate(60)), HeaderError::Truncated { need: 104, have: 60 }),
        ("version.qcow2", Box::new(|b| b[7] = 9), HeaderError::UnsupportedVersion(9)),
        (
            "long-name.qcow2",
            Box::new(|b| b[16..20].copy_from_slice(&4000u32.to_be_bytes())),
            HeaderError::BackingNameTooLong(4000),
        ),
    ];
    for (name, corrupt, want) in cases {
        let mut b = good.clone();
        corrupt(&mut b);
        let path: PathBuf = d.join(name);
        std::fs::write(&path, b).unwrap();
        // Probed, a qcow2 magic makes it qcow2; its header then fails.
        match chain(&path) {
            Err(ChainError::Header { source, .. }) => assert_eq!(source, want, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    // Under a recorded qcow2 format, a file without the magic is a header error, not raw.
    raw(&d.join("base.raw"));
    img(d, &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "qcow2", "-u", "liar.qcow2", "1M"]);
    assert!(matches!(
        chain(&d.join("liar.qcow2")),
        Err(ChainError::Header { source: HeaderError::NotQcow2, .. })
    ));
}

#[test]
fn the_chain_holds_the_descriptors_that_will_hold_the_locks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    raw(&path);
    let c = chain(&path).unwrap();
    let mut nodes = c.into_nodes();
    nodes[0].image.set_access(Access::READ).unwrap();
    assert_eq!(nodes[0].image.held().to_string(), "100 | 201 203");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any bytes: an answer, never a panic.
    #[test]
    fn header_parser_never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Header::parse(&bytes);
        let _ = Header::needed_len(&bytes);
        let _ = probe(&bytes);
    }

    /// A valid qcow2 start with random fields and extension area: never a panic either.
    #[test]
    fn header_parser_never_panics_on_qcow2_like_bytes(
        version in prop_oneof![Just(2u32), Just(3u32), any::<u32>()],
        cluster_bits in prop_oneof![9u32..=21, any::<u32>()],
        fields in proptest::collection::vec(any::<u8>(), 96),
        tail in proptest::collection::vec(any::<u8>(), 0..2048),
        truncate in any::<prop::sample::Index>(),
    ) {
        let mut b = b"QFI\xfb".to_vec();
        b.extend(version.to_be_bytes());
        b.extend(&fields[..12]);
        b.extend(cluster_bits.to_be_bytes());
        b.extend(&fields[16..]);
        b.extend(tail);
        let cut = truncate.index(b.len() + 1);
        let _ = Header::parse(&b[..cut]);
        let _ = Header::parse(&b);
    }
}

#[test]
fn relative_data_file_names_resolve_against_the_working_directory() {
    let Some(dir) = scratch() else { return };
    let d = dir.path();
    raw(&d.join("data.raw"));
    img(d, &["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw,data_file_raw=on", "top.qcow2", "1M"]);
    // This test runs in the crate's directory, where there is no data.raw: QEMU fails the same.
    let err = chain(&d.join("top.qcow2")).unwrap_err();
    assert_eq!(err.to_string(), "Could not open 'data.raw': No such file or directory");
}
