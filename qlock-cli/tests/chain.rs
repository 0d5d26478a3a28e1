//! The image graph through the `qlock` binary, against real QEMU: `check --op` against the real
//! `qemu-img OP`, `run --chain` against what `qemu-io` holds on every node, `status --chain`.
//!
//! Every (holder, op) pair gets a graph of its own in a fresh directory, so a `qemu-img` that
//! gets past locking changes only a throwaway image. The tools are the ones on `PATH`: put a
//! directory of wrappers for another build first on `PATH` to run these against it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{QLOCK, stderr, stdout};
use qlock_core::inspect;
use qlock_testkit::{FakeQemu, Format, FrontEnd};

fn img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img").current_dir(dir).env("LC_ALL", "C").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}", stderr(&out));
}

/// `qlock ARGS` run in `dir`, where the graph's relative names resolve.
fn qlock_in<S: AsRef<std::ffi::OsStr>>(dir: &Path, args: &[S]) -> Output {
    Command::new(QLOCK).current_dir(dir).args(args).output().unwrap()
}

/// top.qcow2 -> base.qcow2; dtop.qcow2 with data.raw (absolute name); rtop.qcow2 -> rbase.raw;
/// other.qcow2 (a free image for compare and rebase).
fn graph() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    img(d, &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    img(d, &["create", "-q", "-f", "raw", "data.raw", "1M"]);
    let data = format!("data_file={},data_file_raw=on", d.join("data.raw").display());
    img(d, &["create", "-q", "-f", "qcow2", "-o", &data, "dtop.qcow2", "1M"]);
    img(d, &["create", "-q", "-f", "raw", "rbase.raw", "1M"]);
    img(d, &["create", "-q", "-f", "qcow2", "-b", "rbase.raw", "-F", "raw", "rtop.qcow2"]);
    img(d, &["create", "-q", "-f", "qcow2", "other.qcow2", "1M"]);
    dir
}

/// The `qemu-img` command line for `op` on `image`, and qlock's `check` arguments.
fn commands(op: &str, u: bool, image: &str) -> (Vec<String>, Vec<String>) {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut q = match op {
        "info" | "check" | "map" => s(&[op, image]),
        "compare" => s(&["compare", image, "other.qcow2"]),
        "amend" => s(&["amend", "-f", "qcow2", "-o", "lazy_refcounts=on", image]),
        "commit" => s(&["commit", image]),
        "resize" => s(&["resize", image, "2M"]),
        "rebase" => s(&["rebase", "-b", "other.qcow2", "-F", "qcow2", image]),
        "snapshot" => s(&["snapshot", "-c", "s1", image]),
        "convert" => s(&["convert", "-O", "raw", image, "out.raw"]),
        "dd" => {
            vec!["dd".into(), format!("if={image}"), "of=out.raw".into(), "bs=64k".into(), "count=1".into()]
        }
        "bench" => s(&["bench", "-c", "1", image]),
        "bench-write" => s(&["bench", "-w", "-c", "1", image]),
        "create" => s(&["create", "-f", "qcow2", image, "1M"]),
        _ => unreachable!("{op}"),
    };
    if u {
        q.insert(1, "-U".into());
    }
    let mut c = s(&["check", image, "--op", op]);
    if u {
        c.push("-U".into());
    }
    if op == "create" {
        c.extend(s(&["-f", "qcow2"]));
    }
    (q, c)
}

/// The first two lines of stderr after the tool's own `NAME: ` prefix.
fn said(out: &Output, prefix: &str) -> String {
    let text = stderr(out);
    let lines: Vec<&str> = text.lines().take(2).collect();
    lines.join("\n").strip_prefix(prefix).unwrap_or_default().to_string()
}

fn refused_on_locks(out: &Output) -> bool {
    let e = stderr(out);
    !out.status.success() && (e.contains("Failed to get") || e.contains("Failed to lock byte"))
}

#[test]
fn check_op_answers_as_the_real_qemu_img_does() {
    qlock_testkit::require!("qemu-io", "qemu-img");
    // (holder's file, front end, format, the image the ops are asked on)
    let holders = [
        ("base.qcow2", FrontEnd::QemuIoRw, Format::Qcow2, "top.qcow2"),
        ("base.qcow2", FrontEnd::QemuIoReadOnly, Format::Qcow2, "top.qcow2"),
        ("top.qcow2", FrontEnd::QemuIoReadOnly, Format::Qcow2, "top.qcow2"),
        ("top.qcow2", FrontEnd::QemuIoForceShare, Format::Qcow2, "top.qcow2"),
        ("top.qcow2", FrontEnd::QemuIoRw, Format::Qcow2, "top.qcow2"),
        ("data.raw", FrontEnd::QemuNbdReadOnly, Format::Raw, "dtop.qcow2"),
        ("data.raw", FrontEnd::QemuIoRw, Format::Raw, "dtop.qcow2"),
        ("data.raw", FrontEnd::QemuIoReadOnly, Format::Raw, "dtop.qcow2"),
        ("rbase.raw", FrontEnd::QemuIoRw, Format::Raw, "rtop.qcow2"),
        ("rbase.raw", FrontEnd::QemuIoReadOnly, Format::Raw, "rtop.qcow2"),
    ];
    let ops = [
        ("info", false),
        ("info", true),
        ("check", false),
        ("check", true),
        ("compare", false),
        ("compare", true),
        ("map", false),
        ("map", true),
        ("amend", false),
        ("commit", false),
        ("resize", false),
        ("rebase", false),
        ("rebase", true),
        ("snapshot", false),
        ("convert", false),
        ("convert", true),
        ("dd", false),
        ("dd", true),
        ("bench", false),
        ("bench", true),
        ("bench-write", false),
        ("create", false),
    ];
    let (mut pairs, mut refused, mut failures) = (0, 0, Vec::new());
    for (file, fe, format, image) in holders {
        for (op, u) in ops {
            let dir = graph();
            let d = dir.path();
            let mut holder = FakeQemu::real(d.join(file), fe, format).unwrap_or_else(|e| panic!("{fe}: {e}"));
            let (q, c) = commands(op, u, image);
            let ours = qlock_in(d, &c);
            let theirs =
                Command::new("qemu-img").current_dir(d).env("LC_ALL", "C").args(&q).output().unwrap();
            holder.release().unwrap();
            pairs += 1;
            let want = if refused_on_locks(&theirs) { 1 } else { 0 };
            refused += want;
            let got = ours.status.code();
            let case = format!("{} holding {file}, qemu-img {}", fe.command(), q.join(" "));
            if got != Some(want) {
                failures.push(format!(
                    "{case}: qlock exit {got:?} ({}), qemu-img: {}",
                    stderr(&ours),
                    stderr(&theirs)
                ));
            } else if want == 1 && said(&ours, "qlock: ") != said(&theirs, "qemu-img: ") {
                failures.push(format!(
                    "{case}:\n  qlock:    {:?}\n  qemu-img: {:?}",
                    stderr(&ours),
                    stderr(&theirs)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {pairs} pairs disagree:\n{}", failures.len(), failures.join("\n"));
    // The rounds must exercise both answers.
    assert!(refused >= 40 && pairs - refused >= 100, "{refused} refused of {pairs}");
}

#[test]
fn check_op_refuses_force_share_where_qemu_img_does_and_says_no_chain_on_json() {
    qlock_testkit::require!("qemu-io", "qemu-img");
    let dir = graph();
    let d = dir.path();
    let out = qlock_in(d, &["check", "top.qcow2", "--op", "commit", "-U"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no -U"), "{}", stderr(&out));
    img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "json:{\"file.filename\":\"base.qcow2\"}",
            "-F",
            "qcow2",
            "j.qcow2",
            "1M",
        ],
    );
    for args in
        [&["check", "j.qcow2", "--op", "check"][..], &["check", "--chain", "--access", "read", "j.qcow2"]]
    {
        let out = qlock_in(d, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("--no-chain"), "{}", stderr(&out));
    }
    let out = qlock_in(d, &["check", "--no-chain", "--access", "read", "j.qcow2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// The bytes every process but `except` holds on each path.
fn held(paths: &[PathBuf]) -> Vec<String> {
    inspect(paths).into_iter().map(|s| s.unwrap().others.held.to_string()).collect()
}

#[test]
fn run_chain_write_holds_on_every_node_what_qemu_io_holds() {
    qlock_testkit::require!("qemu-io", "qemu-img");
    for (top, nodes) in [
        ("top.qcow2", &["top.qcow2", "base.qcow2"][..]),
        ("dtop.qcow2", &["dtop.qcow2", "data.raw"]),
        ("rtop.qcow2", &["rtop.qcow2", "rbase.raw"]),
    ] {
        for (access, fe) in [
            ("write", FrontEnd::QemuIoRw),
            ("read", FrontEnd::QemuIoReadOnly),
            ("force-share", FrontEnd::QemuIoForceShare),
        ] {
            let dir = graph();
            let d = dir.path();
            let paths: Vec<PathBuf> = nodes.iter().map(|n| d.join(n)).collect();
            let mut qemu = FakeQemu::real(d.join(top), fe, Format::Qcow2).unwrap();
            let want = held(&paths);
            qemu.release().unwrap();
            assert!(held(&paths).iter().all(|s| s == "- | -"));
            // The command says it is ready, then waits for its stdin to close.
            let mut run = Command::new(QLOCK)
                .current_dir(d)
                .args([
                    "run",
                    "--chain",
                    "--access",
                    access,
                    top,
                    "--",
                    "sh",
                    "-c",
                    "echo ready; cat >/dev/null",
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let lines = common::Lines::of(&mut run);
            lines.until("ready");
            let got = held(&paths);
            drop(run.stdin.take());
            assert!(run.wait().unwrap().success());
            assert_eq!(got, want, "run --chain --access {access} {top} vs {}", fe.command());
        }
    }
}

#[test]
fn status_chain_names_each_node_and_each_holders_role() {
    qlock_testkit::require!("qemu-io", "qemu-img");
    let dir = graph();
    let d = dir.path();
    let qemu = FakeQemu::real(d.join("top.qcow2"), FrontEnd::QemuIoReadOnly, Format::Qcow2).unwrap();
    let out = qlock_in(d, &["status", "--chain", "top.qcow2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("top.qcow2 (top, qcow2)"), "{text}");
    assert!(text.contains("base.qcow2 (backing, depth 1, qcow2)"), "{text}");
    let pid = qemu.pid();
    assert!(text.contains(&format!("pid {pid} (qemu-io) holds base.qcow2 as a backing file of ")), "{text}");
    assert!(text.contains(&format!("pid {pid} (qemu-io) holds top.qcow2 as its own image")), "{text}");
    let out = qlock_in(d, &["status", "--chain", "--json", "top.qcow2"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let chain = &v["images"][0]["chain"];
    assert_eq!(chain[0]["role"], "top");
    assert_eq!(chain[1]["role"], "backing");
    assert_eq!(chain[1]["depth"], 1);
    assert_eq!(chain[1]["path"], "base.qcow2");
    assert_eq!(chain[1]["perm_bytes"], serde_json::json!([100]));
    assert_eq!(chain[1]["holders"][0]["pid"], pid);
    drop(qemu);
}

/// The chain paths (`check` with its default `--chain`, `check --op`, `status --chain`) give
/// the same advice as `--no-chain`: QEMU's line, then a `hint:` line (the advice is in
/// `Error::hint`, not in the message). No QEMU needed.
#[test]
fn chain_refusals_carry_the_node_errors_hint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for args in [
        &["check", "--access", "read", d][..],
        &["check", "--no-chain", "--access", "read", d],
        &["check", d, "--op", "check"],
        &["status", "--chain", d],
    ] {
        let out = Command::new(QLOCK).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let text = stderr(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("Is a directory"), "{args:?}: {text}");
        assert_eq!(lines[1..], ["hint: An image is a regular file or a block device."], "{args:?}: {text}");
    }
    let out = Command::new(QLOCK).args(["status", "--chain", "--json", d]).output().unwrap();
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["images"][0]["hint"], "An image is a regular file or a block device.", "{json}");
}
