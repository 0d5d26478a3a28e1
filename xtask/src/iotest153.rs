//! QEMU's own image-locking test, qemu-iotests 153, as a differential test: each of its rounds
//! run with the real `qemu-img`/`qemu-io`/storage daemon and as the `qlock` command that
//! answers the same question, against a running holder of an overlay with a backing file.
//!
//! Written from what 153 does (its rounds and `153.out`), not from its code: a qcow2 overlay
//! `t.qcow2` over `t.qcow2.base` (absolute name), held by one holder per column, and every
//! round compared on exit class (0 or not) and message (`TEST_DIR` for the scratch directory,
//! as 153's filter). What stands for what:
//!
//! | 153 | real side | qlock side |
//! |---|---|---|
//! | holder `-drive if=none` (`''`, `read-only=on`, `read-only=on,force-share=on`) | `qemu-io`, `-r`, `-r -U`; a storage-daemon `--blockdev` with no user (the closest to `if=none`), its exports rw/ro; a VM disk where `qemu-system` exists; and `qlock run --chain` with the twin presets | |
//! | "Launching another QEMU, opts2" | `qemu-storage-daemon --blockdev` with those options (10.0.2 has no `qemu-system` here) | `check --chain --access write\|read\|force-share` |
//! | `qemu-io [-r] [-U]`, `-c 'open [-r] [-U]'` | the same | `check --chain --access write\|read\|force-share` |
//! | `qemu-img OP [-U]` | the same | `check --op OP [-U]` (`snapshot -l` as `--op check`, `docs/graph.md`) |
//! | `create -f qcow2 -b BASE` (holder running) | the same | `check --op create -f qcow2` |
//! | symbolic link, overlay created while the guest runs | the same | `check --chain`, `--op create` |
//! | two devices sharing a backing file (`a`,`b`,`c`), backing file also active, commit to an intermediate layer while the base is in use | holder on `t.qcow2.a`; newcomers on `b`, `c`, `t` | `check --chain`, `--op commit` |
//!
//! Left out, because they are not about a pair qlock can answer: `qemu-io -U` and `open -U`
//! read-write (refused by option checking before any lock; qlock has no read-write force
//! share), the `null-co` option pairs (`readonly=off,force-share=on`, `-U` against
//! `force-share=off`), two `-drive`s in *one* process (ported as two processes, above), and the
//! hot-plug rounds (`drive_add`/`drive_del` over HMP: QEMU dropping its own locks on close),
//! and the `_img_info -U` after `create` (reads the format back, not a lock).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use qlock_core::inspect;
use qlock_testkit::{Format, FrontEnd};

use crate::answer::Answer;
use crate::compat::{Options, Pair, table};
use crate::qemu::QemuBuild;
use crate::qlock_bin::{self, ChainHolder};
use crate::run;
use crate::section::{self, Section};

/// The image size (153's is 32M; the size does not matter to locks).
const SIZE: &str = "1M";

/// What the real side runs.
#[derive(Debug, Clone)]
enum Real {
    /// `qemu-io ARGS` or `qemu-img ARGS`.
    Tool(&'static str, Vec<String>),
    /// `qemu-storage-daemon --blockdev OPTS`, quit over QMP once up.
    Daemon(String),
}

/// One round: the real command and the qlock command asking the same.
#[derive(Debug, Clone)]
struct Round {
    label: String,
    real: Real,
    qlock: Vec<String>,
    /// `--op NAME`, for mutations (`op:NAME=ACCESS`).
    op: Option<&'static str>,
    /// Whether the tools word the opening differently (`qemu-io`, the daemon against
    /// `qlock check --chain`): compare from after it.
    cut_opening: bool,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The rounds against a holder of `t.qcow2`; `dir` is the scratch directory.
fn rounds(dir: &Path) -> Vec<Round> {
    let img = dir.join("t.qcow2").display().to_string();
    let base = format!("{img}.base");
    let conv = format!("{img}.convert");
    let mut v = Vec::new();
    let chain = |access: &str, image: &str| s(&["check", "--chain", "--access", access, image]);
    // "Launching another QEMU, opts: ..."
    for (opts, access) in
        [("", "write"), (",read-only=on", "read"), (",read-only=on,force-share=on", "force-share")]
    {
        v.push(Round {
            label: format!("another q-s-d --blockdev{opts}"),
            real: Real::Daemon(format!(
                "driver=qcow2,node-name=n0,file.driver=file,file.filename={}{opts}",
                img.replace(',', ",,")
            )),
            qlock: chain(access, &img),
            op: None,
            cut_opening: true,
        });
    }
    for u in [false, true] {
        let l: &[&str] = if u { &["-U"] } else { &[] };
        let lu = if u { " -U" } else { "" };
        let io = |label: String, args: Vec<String>, access: &str| Round {
            label,
            real: Real::Tool("qemu-io", args),
            qlock: chain(access, &img),
            op: None,
            cut_opening: true,
        };
        if !u {
            v.push(io("qemu-io -c 'read 0 512'".into(), s(&["-c", "read 0 512", &img]), "write"));
        }
        let ro = if u { "force-share" } else { "read" };
        let mut args = s(l);
        args.extend(s(&["-r", "-c", "read 0 512", &img]));
        v.push(io(format!("qemu-io{lu} -r -c 'read 0 512'"), args, ro));
        if !u {
            v.push(io(
                "qemu-io -c 'open IMG'".into(),
                s(&["-c", &format!("open {img}"), "-c", "read 0 512"]),
                "write",
            ));
        }
        v.push(io(
            format!("qemu-io -c 'open -r{lu} IMG'"),
            s(&["-c", &format!("open -r{lu} {img}"), "-c", "read 0 512"]),
            ro,
        ));
        // (label, qemu-img args with L spliced in after `at` words, --op)
        let ops: Vec<(&str, Vec<String>, usize, &'static str)> = vec![
            ("info", s(&["info", &img]), 1, "info"),
            ("check", s(&["check", &img]), 1, "check"),
            ("compare IMG IMG", s(&["compare", &img, &img]), 1, "compare"),
            ("map", s(&["map", &img]), 1, "map"),
            ("amend -o size", s(&["amend", "-o", &format!("size={SIZE}"), &img]), 3, "amend"),
            ("commit", s(&["commit", &img]), 1, "commit"),
            ("resize", s(&["resize", &img, SIZE]), 1, "resize"),
            ("rebase -b BASE", s(&["rebase", &img, "-b", &base, "-F", "qcow2"]), 1, "rebase"),
            ("snapshot -l", s(&["snapshot", "-l", &img]), 2, "check"),
            ("convert", s(&["convert", &img, &conv]), 1, "convert"),
            ("dd", s(&["dd", &format!("if={img}"), &format!("of={conv}"), "bs=512", "count=1"]), 1, "dd"),
            ("bench -c 1", s(&["bench", "-c", "1", &img]), 1, "bench"),
            ("bench -w -c 1", s(&["bench", "-w", "-c", "1", &img]), 1, "bench-write"),
        ];
        for (label, mut args, at, op) in ops {
            if u {
                args.insert(at, "-U".into());
            }
            let mut q = s(&["check", &img, "--op", op]);
            q.extend(s(l));
            v.push(Round {
                label: format!("img {label}{lu}"),
                real: Real::Tool("qemu-img", args),
                qlock: q,
                op: Some(op),
                cut_opening: false,
            });
        }
        if !u {
            v.push(Round {
                label: "img create -b BASE".into(),
                real: Real::Tool(
                    "qemu-img",
                    s(&["create", "-q", "-f", "qcow2", &img, "-b", &base, "-F", "qcow2"]),
                ),
                qlock: s(&["check", &img, "--op", "create", "-f", "qcow2"]),
                op: Some("create"),
                cut_opening: false,
            });
        }
    }
    let lnk = format!("{img}.lnk");
    v.push(Round {
        label: "symlink: qemu-io LNK".into(),
        real: Real::Tool("qemu-io", s(&["-c", "read 0 512", &lnk])),
        qlock: chain("write", &lnk),
        op: None,
        cut_opening: true,
    });
    v.push(Round {
        label: "symlink: qemu-io -r LNK".into(),
        real: Real::Tool("qemu-io", s(&["-r", "-c", "read 0 512", &lnk])),
        qlock: chain("read", &lnk),
        op: None,
        cut_opening: true,
    });
    let overlay = format!("{img}.overlay");
    v.push(Round {
        label: "img create overlay -b IMG".into(),
        real: Real::Tool(
            "qemu-img",
            s(&["create", "-q", "-f", "qcow2", "-b", &img, "-F", "qcow2", &overlay]),
        ),
        qlock: s(&["check", &overlay, "--op", "create", "-f", "qcow2"]),
        op: Some("create"),
        cut_opening: false,
    });
    v
}

/// The rounds against a holder of `t.qcow2.a` (`a`, `b` over `t`, `c` over `b`).
fn chain_rounds(dir: &Path) -> Vec<Round> {
    let p = |n: &str| dir.join(n).display().to_string();
    let (t, b, c) = (p("t.qcow2"), p("t.qcow2.b"), p("t.qcow2.c"));
    let io = |label: &str, ro: bool, image: &str| Round {
        label: label.into(),
        real: Real::Tool(
            "qemu-io",
            if ro { s(&["-r", "-c", "read 0 512", image]) } else { s(&["-c", "read 0 512", image]) },
        ),
        qlock: s(&["check", "--chain", "--access", if ro { "read" } else { "write" }, image]),
        op: None,
        cut_opening: true,
    };
    vec![
        io("sharing a backing file: qemu-io b", false, &b),
        io("sharing a backing file: qemu-io c (c -> b)", false, &c),
        io("backing file also active: qemu-io t", false, &t),
        io("backing file also active: qemu-io -r t", true, &t),
        Round {
            label: "commit c into b while t is in use".into(),
            real: Real::Tool("qemu-img", s(&["commit", "-b", &b, &c])),
            qlock: s(&["check", &c, "--op", "commit"]),
            op: Some("commit"),
            cut_opening: false,
        },
    ]
}

/// A group of rounds against holders of one image.
struct Scene {
    name: &'static str,
    held: &'static str,
    holders: Vec<ChainHolder>,
    rounds: fn(&Path) -> Vec<Round>,
}

fn scenes(build: &QemuBuild) -> Vec<Scene> {
    use FrontEnd::*;
    let real = |fes: &[FrontEnd]| -> Vec<ChainHolder> {
        fes.iter()
            .map(|&fe| ChainHolder::Qemu(fe))
            .filter(|h| !h.needs_system() || build.system.is_ok())
            .collect()
    };
    let mut main = real(&[
        QemuIoRw,
        QemuIoReadOnly,
        QemuIoForceShare,
        StorageDaemonBlockdev,
        QemuNbdRw,
        QemuNbdReadOnly,
        VmDisk,
        VmDiskReadonly,
    ]);
    main.extend(["write", "read", "force-share"].map(ChainHolder::Qlock));
    let mut side = real(&[QemuIoRw, VmDisk]);
    side.push(ChainHolder::Qlock("write"));
    vec![
        Scene { name: "153", held: "t.qcow2", holders: main, rounds },
        Scene { name: "153 backing chain", held: "t.qcow2.a", holders: side, rounds: chain_rounds },
    ]
}

/// One holder's column.
#[derive(Debug, Default)]
struct Column {
    error: Option<String>,
    bytes: String,
    /// (real, qlock) per round.
    cells: Vec<(Answer, Answer)>,
}

/// Runs the port for `build` (`--only 153` selects it, `--only "153 qemu-io"` its holders
/// whose label starts so), in scratch directories under `tmp`.
pub fn run(build: &QemuBuild, opts: &Options, tmp: &Path) -> Section {
    let mut section = Section::new("qemu-iotests 153");
    for (k, scene) in scenes(build).into_iter().enumerate() {
        let holders: Vec<ChainHolder> = scene
            .holders
            .iter()
            .copied()
            .filter(|h| section::selected(&opts.only, &format!("{} {}", scene.name, h.label())))
            .collect();
        if holders.is_empty() {
            continue;
        }
        let labels: Vec<String> =
            (scene.rounds)(Path::new("TEST_DIR")).into_iter().map(|r| r.label).collect();
        let cols = section::par_map(opts.jobs, holders.len(), |h| {
            run_column(build, opts, &scene, holders[h], tmp.join(format!("iotest153-{k}-{h}")))
        });
        let pairs = derive(&scene, &holders, &labels, &cols);
        render(&mut section.text, build, &scene, &holders, &labels, &cols, &pairs);
        section.pairs.extend(pairs);
    }
    section.close(&build.label());
    section
}

fn make(build: &QemuBuild, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let img = dir.join("t.qcow2").display().to_string();
    let p = |n: &str| dir.join(n).display().to_string();
    let steps = [
        s(&["create", "-q", "-f", "qcow2", &format!("{img}.base"), SIZE]),
        s(&["create", "-q", "-f", "qcow2", "-b", &format!("{img}.base"), "-F", "qcow2", &img]),
        s(&["create", "-q", "-f", "qcow2", "-b", &img, "-F", "qcow2", &p("t.qcow2.a")]),
        s(&["create", "-q", "-f", "qcow2", "-b", &img, "-F", "qcow2", &p("t.qcow2.b")]),
        s(&["create", "-q", "-f", "qcow2", "-b", &p("t.qcow2.b"), "-F", "qcow2", &p("t.qcow2.c")]),
    ];
    for args in steps {
        let mut cmd = build.command("qemu-img");
        cmd.args(&args).stdin(Stdio::null());
        let out = run::output(&mut cmd).map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    std::os::unix::fs::symlink(&img, format!("{img}.lnk")).map_err(|e| e.to_string())
}

fn run_column(build: &QemuBuild, opts: &Options, scene: &Scene, holder: ChainHolder, dir: PathBuf) -> Column {
    let mut col = Column::default();
    if let Err(e) = make(build, &dir) {
        col.error = Some(format!("{}: cannot build the images: {e}", scene.name));
        return col;
    }
    let held = match holder.start(build, &dir, scene.held, Format::Qcow2, None) {
        Ok(h) => h,
        Err(e) => {
            col.error =
                Some(format!("{}: holder {} did not start: {}", scene.name, holder.label(), e.trim()));
            return col;
        }
    };
    col.bytes = ["t.qcow2", "t.qcow2.base", "t.qcow2.a"]
        .iter()
        .zip(inspect(&["t.qcow2", "t.qcow2.base", "t.qcow2.a"].map(|n| dir.join(n))))
        .map(|(n, s)| format!("{n}: {}", s.map_or_else(|e| e.to_string(), |s| s.others.held.to_string())))
        .collect::<Vec<_>>()
        .join(", ");
    let d = dir.display().to_string();
    for round in (scene.rounds)(&dir) {
        let qlock_args =
            match round.op.and_then(|op| opts.mutate.iter().find(|(n, _)| *n == format!("op:{op}"))) {
                // A mutated op: answered as a chain request with another access.
                Some((_, access)) => {
                    let image = round.qlock.iter().find(|a| a.starts_with('/')).cloned().unwrap_or_default();
                    s(&["check", "--chain", "--access", &access.to_string(), &image])
                }
                None => round.qlock.clone(),
            };
        let ours = qlock_bin::answer(&dir, &qlock_args);
        let theirs = match &round.real {
            Real::Tool(tool, args) => qlock_bin::qemu_answer(build, tool, &dir, args, &[]),
            Real::Daemon(blockdev) => daemon(build, &dir, blockdev),
        };
        let fix = |a: Answer| {
            let a = if round.cut_opening { a.without_opening() } else { a };
            a.replace(&d, "TEST_DIR")
        };
        col.cells.push((fix(theirs), fix(ours)));
    }
    held.stop();
    col
}

/// `qemu-storage-daemon --blockdev OPTS` with a QMP monitor on stdin that quits at once: it
/// opens the image (or fails to) before it reads the monitor.
fn daemon(build: &QemuBuild, dir: &Path, blockdev: &str) -> Answer {
    let mut cmd = build.command("qemu-storage-daemon");
    cmd.args(["--blockdev", blockdev, "--chardev", "stdio,id=m0", "--monitor", "m0"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = match run::spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => return Answer::Broken(format!("qemu-storage-daemon: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A daemon that already failed has closed its end: nothing to say then.
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    match child.wait_with_output() {
        Ok(o) => Answer::from_output(o.status.success(), &String::from_utf8_lossy(&o.stderr), &[]),
        Err(e) => Answer::Broken(e.to_string()),
    }
}

/// Cells are `(holder, round)`; the real answer and qlock's sit in one cell.
fn derive(scene: &Scene, holders: &[ChainHolder], labels: &[String], cols: &[Column]) -> Vec<Pair> {
    let mut out: Vec<Pair> = Vec::new();
    for (h, holder) in holders.iter().enumerate() {
        if let Some(e) = &cols[h].error {
            out.push(Pair::new(false, e.clone()));
            continue;
        }
        for (r, (real, ours)) in cols[h].cells.iter().enumerate() {
            out.push(Pair::compare(
                format!("{} holder {}, round {}", scene.name, holder.label(), labels[r]),
                ("qlock", ours),
                ("QEMU ", real),
                vec![(h, r)],
            ));
        }
    }
    for (q, holder) in holders.iter().enumerate() {
        let Some(fe) = holder.twin(Format::Qcow2) else { continue };
        let Some(t) = holders.iter().position(|o| *o == ChainHolder::Qemu(fe)) else { continue };
        if cols[q].error.is_some() || cols[t].error.is_some() {
            continue;
        }
        let twin = holders[t].label();
        let ok = cols[q].bytes == cols[t].bytes;
        let pair = format!("{} holder {} holds what {twin} holds", scene.name, holder.label());
        let detail = if ok {
            pair
        } else {
            format!("{pair}\n    qlock: {}\n    QEMU:  {}", cols[q].bytes, cols[t].bytes)
        };
        out.push(Pair::new(ok, detail));
        for (r, label) in labels.iter().enumerate() {
            let (Some(a), Some(b)) = (cols[q].cells.get(r), cols[t].cells.get(r)) else { continue };
            out.push(Pair::compare(
                format!("{} round {label}, holder {} vs {twin}", scene.name, holder.label()),
                ("against qlock", &a.0),
                ("against QEMU", &b.0),
                vec![(q, r), (t, r)],
            ));
        }
    }
    out
}

fn render(
    out: &mut String,
    build: &QemuBuild,
    scene: &Scene,
    holders: &[ChainHolder],
    labels: &[String],
    cols: &[Column],
    pairs: &[Pair],
) {
    let bad = table::failed_cells(pairs);
    let _ = writeln!(
        out,
        "\nqemu-iotests {} (QEMU {}): holders of {} ({} over t.qcow2.base); each cell: QEMU's answer, then qlock's",
        scene.name,
        build.label(),
        scene.held,
        if scene.held == "t.qcow2" { "t.qcow2" } else { "t.qcow2.a over t.qcow2" },
    );
    table::legend(out, holders.iter().map(|h| h.label()), 26);
    let width = labels.iter().map(String::len).max().unwrap_or(0).max(15);
    let _ = write!(out, "{:width$} ", "round \\ holder");
    for i in 0..holders.len() {
        let _ = write!(out, "{:>4}", i + 1);
    }
    out.push('\n');
    for (r, label) in labels.iter().enumerate() {
        let _ = write!(out, "{label:width$} ");
        for (h, col) in cols.iter().enumerate() {
            let (a, b) = col.cells.get(r).map_or(('-', '-'), |(x, y)| (x.symbol(), y.symbol()));
            let mark = if bad.contains(&(h, r)) { '!' } else { ' ' };
            let _ = write!(out, " {a}{b}{mark}");
        }
        out.push('\n');
    }
    out.push_str("legend: as above; n refused before any lock (an option the command does not take)\n");
    table::disagreements(out, pairs);
}
