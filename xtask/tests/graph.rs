//! What real QEMU locks on each node of an image graph (issue 13), watched from outside.
//!
//! For every QEMU build at hand (the one on `PATH`, and Debian bookworm's 7.2 unpacked by
//! `cargo xtask compat` into `target/qemu-7.2`), every holder below opens the top of every
//! graph below; then this process reads each node's locks from `/proc/PID/fdinfo` (through
//! `qlock_core::inspect`) and keeps the bytes of the holder's own pid. The table that results
//! is asserted against [`EXPECTED`]: it is the observation that `docs/graph.md` writes down,
//! and the one the per-node rules of qlock are to be held against.
//!
//! Readiness is QEMU's own: `qemu-io`'s prompt and the daemons' QMP round trip (through
//! qlock-testkit), `qemu-nbd --fork` returning once the export is up. Set `QLOCK_GRAPH_PRINT=1`
//! to print the observed tables. A missing QEMU skips with a message, and fails under
//! `CI=true`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qlock_core::LockSet;
use qlock_core::inspect;
use qlock_testkit::{FakeQemu, Format, FrontEnd, NbdServer};
use xtask::qemu::QemuBuild;

/// Skips (or fails under `CI=true`) when a QEMU build cannot be had.
fn unavailable(what: &str, why: &str) {
    qlock_testkit::skip(format_args!("{what}: {why}"));
}

/// The builds to observe: PATH (required) and bookworm's 7.2 when it can be had.
fn builds() -> Vec<QemuBuild> {
    let mut out = Vec::new();
    match QemuBuild::from_path() {
        Ok(b) => out.push(b),
        Err(e) => unavailable("QEMU on PATH", &e),
    }
    let dir = xtask::target_dir().join("qemu-7.2");
    if std::env::var_os("QLOCK_GRAPH_NO_DOWNLOAD").is_some() && !dir.join(".complete").exists() {
        unavailable("QEMU 7.2", "QLOCK_GRAPH_NO_DOWNLOAD is set and target/qemu-7.2 is empty");
    } else {
        match xtask::fetch::bookworm(&dir) {
            Ok(b) => out.push(b),
            Err(e) => unavailable("QEMU 7.2 (Debian bookworm)", &e),
        }
    }
    out
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `qemu-img create -q -f qcow2 ARGS` with this build, in `dir`.
fn create(build: &QemuBuild, dir: &Path, args: &[&str]) {
    ok(build.command("qemu-img").current_dir(dir).args(["create", "-q", "-f", "qcow2"]).args(args));
}

fn raw_file(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(1 << 20).unwrap();
}

/// Replaces the first header extension of type `ext` in a qcow2 file by an end marker, as if
/// the image had been written without it (QEMU then probes the backing file's format).
fn drop_extension(path: &Path, ext: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    let header_len = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    let mut at = header_len;
    loop {
        let ty = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(ty, 0, "no extension {ext:#x} in {}", path.display());
        if ty == ext {
            bytes[at..at + 4].copy_from_slice(&0u32.to_be_bytes());
            break;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    std::fs::write(path, bytes).unwrap();
}

/// One graph: a directory of files whose top is `top.qcow2`, and its nodes by role.
struct Graph {
    name: &'static str,
    nodes: Vec<(&'static str, PathBuf)>,
}

/// Builds every graph of the table in `root` with `build`'s qemu-img. Names are relative where
/// QEMU resolves them against the overlay; data-file names are absolute (they resolve against
/// the opener's working directory, which the holders do not share).
fn graphs(build: &QemuBuild, root: &Path) -> Vec<Graph> {
    let mut out = Vec::new();
    let dir = |name: &'static str| {
        let d = root.join(name);
        std::fs::create_dir(&d).unwrap();
        (name, d)
    };
    let (name, d) = dir("qcow2-2");
    create(build, &d, &["base.qcow2", "1M"]);
    create(build, &d, &["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    out.push(Graph {
        name,
        nodes: vec![("top", d.join("top.qcow2")), ("backing 1 qcow2", d.join("base.qcow2"))],
    });

    let (name, d) = dir("qcow2-3");
    create(build, &d, &["base.qcow2", "1M"]);
    create(build, &d, &["-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"]);
    create(build, &d, &["-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"]);
    out.push(Graph {
        name,
        nodes: vec![
            ("top", d.join("top.qcow2")),
            ("backing 1 qcow2", d.join("mid.qcow2")),
            ("backing 2 qcow2", d.join("base.qcow2")),
        ],
    });

    let (name, d) = dir("raw-base");
    raw_file(&d.join("base.raw"));
    create(build, &d, &["-b", "base.raw", "-F", "raw", "top.qcow2"]);
    out.push(Graph {
        name,
        nodes: vec![("top", d.join("top.qcow2")), ("backing 1 raw", d.join("base.raw"))],
    });

    for (name, raw) in [("data-file-raw", "on"), ("data-file", "off")] {
        let (name, d) = dir(name);
        let data = d.join("data.raw");
        raw_file(&data);
        let opt = format!("data_file={},data_file_raw={raw}", data.display());
        create(build, &d, &["-o", &opt, "top.qcow2", "1M"]);
        out.push(Graph { name, nodes: vec![("top", d.join("top.qcow2")), ("data-file", data)] });
    }

    // No backing-format extension: QEMU probes the backing file.
    let (name, d) = dir("probed-qcow2");
    create(build, &d, &["base.qcow2", "1M"]);
    create(build, &d, &["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    drop_extension(&d.join("top.qcow2"), 0xe279_2aca);
    out.push(Graph {
        name,
        nodes: vec![("top", d.join("top.qcow2")), ("backing 1 qcow2", d.join("base.qcow2"))],
    });

    let (name, d) = dir("probed-raw");
    raw_file(&d.join("base.raw"));
    create(build, &d, &["-b", "base.raw", "-F", "raw", "top.qcow2"]);
    drop_extension(&d.join("top.qcow2"), 0xe279_2aca);
    out.push(Graph {
        name,
        nodes: vec![("top", d.join("top.qcow2")), ("backing 1 raw", d.join("base.raw"))],
    });
    out
}

/// The holders of the table: a label and the front end run for real on a top image (the NBD
/// ones as a qemu-storage-daemon export; [`QEMU_NBD_HOLDERS`] follow them in the table).
const HOLDERS: [(&str, FrontEnd); 10] = [
    ("qemu-io -f qcow2 top", FrontEnd::QemuIoRw),
    ("qemu-io -r -f qcow2 top", FrontEnd::QemuIoReadOnly),
    ("qemu-io -r -U -f qcow2 top", FrontEnd::QemuIoForceShare),
    ("q-s-d export writable=on", FrontEnd::QemuNbdRw),
    ("q-s-d export writable=off (read-only=on)", FrontEnd::QemuNbdReadOnly),
    ("q-s-d --blockdev, no user", FrontEnd::StorageDaemonBlockdev),
    ("q-s-d --blockdev overlay over top", FrontEnd::BackingFile),
    ("qemu-system -drive (VmDisk)", FrontEnd::VmDisk),
    ("qemu-system -drive share-rw=on", FrontEnd::VmDiskShareRw),
    ("qemu-system -drive readonly=on", FrontEnd::VmDiskReadonly),
];

/// The NBD holders again, served by `qemu-nbd` itself.
const QEMU_NBD_HOLDERS: [(&str, FrontEnd); 2] =
    [("qemu-nbd -f qcow2 top", FrontEnd::QemuNbdRw), ("qemu-nbd -r -f qcow2 top", FrontEnd::QemuNbdReadOnly)];

/// Every holder of the table, in its order, with the server of its NBD export.
fn holders() -> impl Iterator<Item = (&'static str, FrontEnd, NbdServer)> {
    let daemon = HOLDERS.into_iter().map(|(label, fe)| (label, fe, NbdServer::StorageDaemon));
    daemon.chain(QEMU_NBD_HOLDERS.into_iter().map(|(label, fe)| (label, fe, NbdServer::QemuNbd)))
}

/// Starts front end `fe` on `top` (an NBD export served by `nbd`); `Ok(None)` when this build
/// cannot run it (no qemu-system).
fn start(build: &QemuBuild, fe: FrontEnd, nbd: NbdServer, top: &Path) -> Result<Option<FakeQemu>, String> {
    if matches!(fe, FrontEnd::VmDisk | FrontEnd::VmDiskShareRw | FrontEnd::VmDiskReadonly)
        && build.system.is_err()
    {
        return Ok(None);
    }
    build
        .holder(top)
        .front_end(fe, Format::Qcow2)
        .nbd_server(nbd)
        .spawn_real()
        .map(Some)
        .map_err(|e| e.to_string())
}

/// `100 101 103 | 201 203`, or `-` for nothing at all.
fn show(set: LockSet) -> String {
    if set.is_empty() { "-".into() } else { set.to_string() }
}

/// The bytes `pid` holds on each node of `graph`.
fn observe(graph: &Graph, pid: u32) -> Vec<String> {
    let paths: Vec<&PathBuf> = graph.nodes.iter().map(|(_, p)| p).collect();
    inspect(&paths)
        .into_iter()
        .map(|status| {
            let status = status.expect("inspect a node");
            let mut set = LockSet::EMPTY;
            for h in status.holders.iter().filter(|h| h.pid == pid) {
                set = set.union(h.bytes());
            }
            show(set)
        })
        .collect()
}

/// The observed table of one build: `holder | graph | node | bytes` lines.
fn observe_build(build: &QemuBuild) -> String {
    let root = tempfile::tempdir().unwrap();
    let graphs = graphs(build, root.path());
    let mut table = String::new();
    for (label, fe, nbd) in holders() {
        for graph in &graphs {
            let top = &graph.nodes[0].1;
            let running = match start(build, fe, nbd, top) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    let _ = writeln!(table, "{} | {} | - | refused: {e}", label, graph.name);
                    continue;
                }
            };
            for ((role, _), bytes) in graph.nodes.iter().zip(observe(graph, running.pid())) {
                let _ = writeln!(table, "{} | {} | {role} | {bytes}", label, graph.name);
            }
        }
    }
    table
}

/// The table as observed on 10.0.2 and 7.2.22 (identical rows; VM rows only where the build
/// has a qemu-system-x86_64, which 7.2 from bookworm has and the PATH build here does not).
const EXPECTED: &str = include_str!("graph_expected.txt");

fn expected_for(build: &QemuBuild) -> String {
    EXPECTED
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter(|l| build.system.is_ok() || !l.starts_with("qemu-system"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn each_holder_locks_each_node_as_observed() {
    let mut failures = Vec::new();
    for build in builds() {
        let observed = observe_build(&build);
        if std::env::var_os("QLOCK_GRAPH_PRINT").is_some() {
            println!("# QEMU {}\n{observed}", build.label());
        }
        let expected = expected_for(&build);
        if observed != expected {
            let diff: Vec<String> = observed
                .lines()
                .zip(expected.lines())
                .filter(|(o, e)| o != e)
                .map(|(o, e)| format!("  observed {o}\n  expected {e}"))
                .collect();
            failures.push(format!("QEMU {}:\n{}\nfull table:\n{observed}", build.label(), diff.join("\n")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The first line of a command's stderr, with `dir` replaced by `DIR`.
fn message(out: &Output, dir: &Path) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("-").to_string();
    line.replace(&dir.display().to_string(), "DIR")
}

/// What `qemu-img` prints when a backing file's lock is in the way, for each subcommand that
/// opens the chain, with a writer (`qemu-io` rw) on the base and with a reader of the overlay.
#[test]
fn qemu_img_names_the_backing_file_that_refused() {
    for build in builds() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        create(&build, d, &["base.qcow2", "1M"]);
        create(&build, d, &["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
        create(&build, d, &["other.qcow2", "1M"]);
        let img = |args: &[&str]| {
            let out = run(build.command("qemu-img").current_dir(d).args(args));
            (out.status.code(), message(&out, d))
        };
        let cases: [(&str, &[&str]); 5] = [
            ("info", &["info", "top.qcow2"]),
            ("info -U", &["info", "-U", "top.qcow2"]),
            ("commit", &["commit", "top.qcow2"]),
            ("rebase", &["rebase", "-F", "qcow2", "-b", "other.qcow2", "top.qcow2"]),
            ("resize", &["resize", "top.qcow2", "2M"]),
        ];
        let mut seen = String::new();
        {
            let writer = build.holder(&d.join("base.qcow2")).front_end(FrontEnd::QemuIoRw, Format::Qcow2);
            let _writer = writer.spawn_real().unwrap();
            for (name, args) in cases {
                let (code, msg) = img(args);
                let _ = writeln!(seen, "writer on base | qemu-img {name} | {code:?} | {msg}");
            }
        }
        for (who, image) in [("qemu-io -r on top", "top.qcow2"), ("qemu-io -r on base", "base.qcow2")] {
            let reader = build.holder(&d.join(image)).front_end(FrontEnd::QemuIoReadOnly, Format::Qcow2);
            let reader = reader.spawn_real().unwrap();
            for (name, args) in &cases[2..] {
                let (code, msg) = img(args);
                let _ = writeln!(seen, "{who} | qemu-img {name} | {code:?} | {msg}");
            }
            drop(reader);
            // A rebase that succeeded changed the chain: put it back for the next holder.
            ok(build.command("qemu-img").current_dir(d).args([
                "rebase",
                "-u",
                "-F",
                "qcow2",
                "-b",
                "base.qcow2",
                "top.qcow2",
            ]));
        }
        if std::env::var_os("QLOCK_GRAPH_PRINT").is_some() {
            println!("# QEMU {}\n{seen}", build.label());
        }
        let expected = include_str!("graph_messages.txt");
        let expected: String = expected
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(seen, expected, "QEMU {}", build.label());
    }
}

/// Name resolution: a relative backing name is taken from the overlay's directory (the
/// directory of the path as opened, not of a symlink's target); a `file:` backing name and a
/// relative data-file name are taken from the opener's working directory.
#[test]
fn names_resolve_as_observed() {
    for build in builds() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["images", "elsewhere"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let images = d.join("images");
        create(&build, &images, &["base.qcow2", "1M"]);
        create(&build, &images, &["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
        create(&build, &images, &["-u", "-b", "file:base.qcow2", "-F", "qcow2", "prefixed.qcow2", "1M"]);
        raw_file(&images.join("data.raw"));
        create(&build, &images, &["-o", "data_file=data.raw,data_file_raw=on", "data.qcow2", "1M"]);
        std::os::unix::fs::symlink("../images/top.qcow2", d.join("elsewhere/link.qcow2")).unwrap();
        let open = |cwd: &Path, image: &str| {
            let out = run(build
                .command("qemu-io")
                .current_dir(cwd)
                .args(["-r", "-c", "quit", "-f", "qcow2", image]));
            (out.status.success(), message(&out, d))
        };
        let elsewhere = d.join("elsewhere");
        let rows = [
            ("relative backing, opened from elsewhere", open(&elsewhere, "../images/top.qcow2")),
            ("relative backing through a symlink in elsewhere/", open(&images, "../elsewhere/link.qcow2")),
            ("file: backing, opened from images/", open(&images, "prefixed.qcow2")),
            ("file: backing, opened from elsewhere", open(&elsewhere, "../images/prefixed.qcow2")),
            ("relative data file, opened from images/", open(&images, "data.qcow2")),
            ("relative data file, opened from elsewhere", open(&elsewhere, "../images/data.qcow2")),
        ];
        let seen: String = rows.iter().map(|(what, (ok, msg))| format!("{what} | {ok} | {msg}\n")).collect();
        if std::env::var_os("QLOCK_GRAPH_PRINT").is_some() {
            println!("# QEMU {}\n{seen}", build.label());
        }
        let expected = BTreeMap::from([
            ("relative backing, opened from elsewhere", (true, "-")),
            (
                "relative backing through a symlink in elsewhere/",
                (
                    false,
                    "qemu-io: can't open device ../elsewhere/link.qcow2: Could not open backing file: \
                     Could not open '../elsewhere/base.qcow2': No such file or directory",
                ),
            ),
            ("file: backing, opened from images/", (true, "-")),
            (
                "file: backing, opened from elsewhere",
                (
                    false,
                    "qemu-io: can't open device ../images/prefixed.qcow2: Could not open backing file: Could not open 'base.qcow2': No such file or directory",
                ),
            ),
            ("relative data file, opened from images/", (true, "-")),
            (
                "relative data file, opened from elsewhere",
                (
                    false,
                    "qemu-io: can't open device ../images/data.qcow2: Could not open 'data.raw': No such file or directory",
                ),
            ),
        ]);
        for (what, (ok, msg)) in rows {
            let (want_ok, want_msg) = expected[what];
            assert_eq!((ok, msg.as_str()), (want_ok, want_msg), "QEMU {}: {what}", build.label());
        }
    }
}
