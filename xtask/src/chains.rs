//! The chain matrix: image graphs held and opened by real QEMU and by the `qlock` binary, both
//! ways (issue 13).
//!
//! Each graph is built with the build's own `qemu-img` in a directory of its own per holder
//! row. A row is a holder of one image of the graph, its whole graph with it: a real QEMU
//! front end (`qemu-io`, `-r`, `-r -U`, storage-daemon exports, and a VM's disk where the
//! build has `qemu-system`) or `qlock run --chain --access PRESET`. A column is a newcomer on
//! one node: the real `qemu-io [-r] -f FMT -c quit NODE`, or `qlock check --chain --access
//! PRESET NODE`, run in the graph's directory with the node's relative name. Checks:
//!
//! - every qlock newcomer answers as its `qemu-io` twin (same exit class, same message once
//!   the opening prefix is cut), against every holder;
//! - every newcomer, QEMU's and qlock's, meets a `qlock run --chain` holder as it meets the
//!   `qemu-io` twin holder on the same image;
//! - a `qlock run --chain` holder holds, on every node, the bytes its twin holds there.
//!
//! Twins (`docs/graph.md`): on a qcow2 image `write`/`read` are `qemu-io`/`qemu-io -r`; on a
//! raw image `write-shared` is `qemu-io -f raw` and `force-share` is `qemu-io -r -f raw`.
//! A raw node also meets `qemu-img resize` and `qlock check --op resize` (only a resize meets
//! the `203` a qcow2 image keeps on its data file). `-U` newcomers are left to the 153 port
//! (these holders never refuse them).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use qlock_core::inspect;
use qlock_testkit::{Format, FrontEnd};

use crate::answer::Answer;
use crate::compat::{Options, Pair, table};
use crate::qemu::QemuBuild;
use crate::qlock_bin::{self, ChainHolder};
use crate::section::{self, Section};

/// An image graph, made by `qemu-img` commands in an empty directory.
#[derive(Debug, Clone, Copy)]
pub struct Graph {
    /// `qcow2-3`.
    pub name: &'static str,
    /// The files, for the report.
    pub shape: &'static str,
    /// The `qemu-img` command lines, in order, split at spaces; `{DIR}` is the directory
    /// (absolute names).
    pub make: &'static [&'static str],
    /// The images holders open, each with its whole graph.
    pub held: &'static [(&'static str, Format)],
    /// The nodes newcomers open.
    pub nodes: &'static [(&'static str, Format)],
}

use Format::{Qcow2, Raw};

const fn qcow2(name: &'static str) -> (&'static str, Format) {
    (name, Qcow2)
}

/// The graphs: 2 and 3 qcow2 levels, a raw base, a raw data file, absolute and relative names
/// across directories, and a base shared by overlays (two images on one base may be opened
/// together, a writer of the base may not).
pub const GRAPHS: &[Graph] = &[
    Graph {
        name: "qcow2-2",
        shape: "top.qcow2 -> base.qcow2 (relative name)",
        make: &["create -q -f qcow2 base.qcow2 1M", "create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2"],
        held: &[qcow2("top.qcow2")],
        nodes: &[qcow2("top.qcow2"), qcow2("base.qcow2")],
    },
    Graph {
        name: "qcow2-3",
        shape: "top.qcow2 -> mid.qcow2 -> base.qcow2",
        make: &[
            "create -q -f qcow2 base.qcow2 1M",
            "create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2",
            "create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
        ],
        held: &[qcow2("top.qcow2")],
        nodes: &[qcow2("top.qcow2"), qcow2("mid.qcow2"), qcow2("base.qcow2")],
    },
    Graph {
        name: "raw-base",
        shape: "top.qcow2 -> base.raw (-F raw); also held as base.raw alone",
        make: &["create -q -f raw base.raw 1M", "create -q -f qcow2 -b base.raw -F raw top.qcow2"],
        held: &[qcow2("top.qcow2"), ("base.raw", Raw)],
        nodes: &[qcow2("top.qcow2"), ("base.raw", Raw)],
    },
    Graph {
        name: "data-file",
        shape: "top.qcow2 with data_file=/abs/data.raw, data_file_raw=on",
        make: &[
            "create -q -f raw data.raw 1M",
            "create -q -f qcow2 -o data_file={DIR}/data.raw,data_file_raw=on top.qcow2 1M",
        ],
        held: &[qcow2("top.qcow2")],
        nodes: &[qcow2("top.qcow2"), ("data.raw", Raw)],
    },
    Graph {
        name: "other-dirs",
        shape: "images/top.qcow2 -> ../mids/mid.qcow2 (relative) -> /abs/bases/base.qcow2 (absolute)",
        make: &[
            "create -q -f qcow2 bases/base.qcow2 1M",
            "create -q -f qcow2 -b {DIR}/bases/base.qcow2 -F qcow2 mids/mid.qcow2",
            "create -q -f qcow2 -b ../mids/mid.qcow2 -F qcow2 images/top.qcow2",
        ],
        held: &[qcow2("images/top.qcow2")],
        nodes: &[qcow2("images/top.qcow2"), qcow2("mids/mid.qcow2"), qcow2("bases/base.qcow2")],
    },
    Graph {
        name: "shared-base",
        shape: "vm1.qcow2, vm2.qcow2 -> base.qcow2; vm3.qcow2 -> vm2.qcow2; held as vm1 and as base",
        make: &[
            "create -q -f qcow2 base.qcow2 1M",
            "create -q -f qcow2 -b base.qcow2 -F qcow2 vm1.qcow2",
            "create -q -f qcow2 -b base.qcow2 -F qcow2 vm2.qcow2",
            "create -q -f qcow2 -b vm2.qcow2 -F qcow2 vm3.qcow2",
        ],
        held: &[qcow2("vm1.qcow2"), qcow2("base.qcow2")],
        nodes: &[qcow2("vm2.qcow2"), qcow2("vm3.qcow2"), qcow2("base.qcow2")],
    },
];

/// The holders of an image of `format`: real front ends, then qlock presets.
fn holders(build: &QemuBuild, format: Format) -> Vec<ChainHolder> {
    use FrontEnd::*;
    let mut v: Vec<ChainHolder> =
        [QemuIoRw, QemuIoReadOnly, QemuIoForceShare, QemuNbdRw, QemuNbdReadOnly, VmDisk, VmDiskReadonly]
            .into_iter()
            .map(ChainHolder::Qemu)
            .filter(|h| !h.needs_system() || build.system.is_ok())
            .collect();
    let presets: &[&'static str] = match format {
        Qcow2 => &["write", "read", "force-share"],
        Raw => &["write-shared", "force-share"],
    };
    v.extend(presets.iter().map(|p| ChainHolder::Qlock(p)));
    v
}

/// A newcomer column: a node, and a real command or its qlock twin (the column before it).
#[derive(Debug, Clone)]
struct Column {
    node: &'static str,
    format: Format,
    what: ChainNewcomer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChainNewcomer {
    /// `qemu-io [-r] -f FMT -c quit NODE`.
    Io { read_only: bool },
    /// `qlock check --chain --access PRESET NODE`.
    Chain(&'static str),
    /// `qemu-img resize -f raw NODE 1M` (a raw node: only a resize meets a data file's `203`).
    Resize,
    /// `qlock check --op resize NODE`.
    OpResize,
}

impl Column {
    fn label(&self) -> String {
        let what = match self.what {
            ChainNewcomer::Io { read_only: false } => "qemu-io".to_string(),
            ChainNewcomer::Io { read_only: true } => "qemu-io -r".into(),
            ChainNewcomer::Chain(p) => format!("qlock {p}"),
            ChainNewcomer::Resize => "img resize".into(),
            ChainNewcomer::OpResize => "qlock --op resize".into(),
        };
        format!("{what} {}", self.node)
    }

    fn is_qlock(&self) -> bool {
        matches!(self.what, ChainNewcomer::Chain(_) | ChainNewcomer::OpResize)
    }
}

fn columns(graph: &Graph) -> Vec<Column> {
    let mut v = Vec::new();
    for &(node, format) in graph.nodes {
        let col = |what| Column { node, format, what };
        for read_only in [false, true] {
            let preset = match (format, read_only) {
                (Qcow2, false) => "write",
                (Qcow2, true) => "read",
                (Raw, false) => "write-shared",
                (Raw, true) => "force-share",
            };
            v.push(col(ChainNewcomer::Io { read_only }));
            v.push(col(ChainNewcomer::Chain(preset)));
        }
        if format == Raw {
            v.push(col(ChainNewcomer::Resize));
            v.push(col(ChainNewcomer::OpResize));
        }
    }
    v
}

/// A holder row: which image it holds, and how.
#[derive(Debug, Clone, Copy)]
struct RowSpec {
    held: &'static str,
    format: Format,
    holder: ChainHolder,
}

impl RowSpec {
    fn label(&self) -> String {
        format!("{} on {}", self.holder.label(), self.held)
    }
}

/// What one row observed.
#[derive(Debug)]
struct Row {
    /// Why the holder did not start.
    error: Option<String>,
    /// The bytes the holder holds on every node of the graph, `node: perm | unshared`.
    bytes: String,
    cells: Vec<Answer>,
}

/// The mutation of a preset for this section (`chain:PRESET=ACCESS`), as the access to run.
fn mutated(opts: &Options, preset: &str) -> Option<String> {
    let key = format!("chain:{preset}");
    opts.mutate.iter().find(|(n, _)| *n == key).map(|(_, a)| a.to_string())
}

/// Runs the chain matrix for `build` (the graphs `--only` selects: `chain`, `chain qcow2`...),
/// in scratch directories under `tmp`.
pub fn run(build: &QemuBuild, opts: &Options, tmp: &Path) -> Section {
    let mut section = Section::new("chains");
    for (g, graph) in GRAPHS.iter().enumerate() {
        if !section::selected(&opts.only, &format!("chain {}", graph.name)) {
            continue;
        }
        let rows: Vec<RowSpec> = graph
            .held
            .iter()
            .flat_map(|&(held, format)| {
                holders(build, format).into_iter().map(move |holder| RowSpec { held, format, holder })
            })
            .collect();
        let cols = columns(graph);
        let results = section::par_map(opts.jobs, rows.len(), |r| {
            run_row(build, opts, graph, &rows[r], &cols, tmp.join(format!("chain{g}-{r}")))
        });
        let pairs = derive(&rows, &cols, &results);
        render(&mut section.text, build, graph, &rows, &cols, &results, &pairs);
        section.pairs.extend(pairs);
    }
    section.close(&build.label());
    section
}

/// Builds the graph in `dir`: each `qemu-img` step, `{DIR}` replaced.
///
/// # Errors
/// `qemu-img`'s message.
pub fn make(build: &QemuBuild, graph: &Graph, dir: &Path) -> Result<(), String> {
    for sub in ["bases", "mids", "images"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
    }
    let d = dir.display().to_string();
    for step in graph.make {
        let args: Vec<String> = step.split(' ').map(|a| a.replace("{DIR}", &d)).collect();
        let mut cmd = build.command("qemu-img");
        cmd.args(&args).current_dir(dir).stdin(std::process::Stdio::null());
        let out = crate::run::output(&mut cmd).map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

fn run_row(
    build: &QemuBuild,
    opts: &Options,
    graph: &Graph,
    spec: &RowSpec,
    cols: &[Column],
    dir: PathBuf,
) -> Row {
    let mut row = Row { error: None, bytes: String::new(), cells: Vec::new() };
    if let Err(e) =
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string()).and_then(|()| make(build, graph, &dir))
    {
        row.error = Some(format!("chain {}: cannot build the graph: {e}", graph.name));
        return row;
    }
    let access = match spec.holder {
        ChainHolder::Qlock(p) => mutated(opts, p),
        ChainHolder::Qemu(_) => None,
    };
    let held = match spec.holder.start(build, &dir, spec.held, spec.format, access) {
        Ok(h) => h,
        Err(e) => {
            row.error =
                Some(format!("chain {}: holder {} did not start: {}", graph.name, spec.label(), e.trim()));
            return row;
        }
    };
    row.bytes = bytes_on_nodes(graph, &dir);
    let d = dir.display().to_string();
    for col in cols {
        let answer = match col.what {
            ChainNewcomer::Chain(preset) => {
                let access = mutated(opts, preset).unwrap_or_else(|| preset.to_string());
                let args = ["check", "--chain", "--access", &access, col.node].map(String::from);
                qlock_bin::answer(&dir, &args)
            }
            ChainNewcomer::Io { read_only } => {
                let mut args = vec!["-f".to_string(), col.format.as_str().into()];
                if read_only {
                    args.push("-r".into());
                }
                args.extend(["-c".into(), "quit".into(), col.node.into()]);
                qlock_bin::qemu_answer(build, "qemu-io", &dir, &args, &[])
            }
            ChainNewcomer::Resize => {
                let args = ["resize", "-q", "-f", "raw", col.node, "1M"].map(String::from);
                qlock_bin::qemu_answer(build, "qemu-img", &dir, &args, &[])
            }
            ChainNewcomer::OpResize => {
                qlock_bin::answer(&dir, &["check", col.node, "--op", "resize"].map(String::from))
            }
        };
        row.cells.push(answer.without_opening().replace(&d, "DIR"));
    }
    held.stop();
    row
}

/// `node: bytes` for every file of the graph, as held by others than this process.
fn bytes_on_nodes(graph: &Graph, dir: &Path) -> String {
    let mut names: Vec<&str> = graph.nodes.iter().chain(graph.held).map(|(n, _)| *n).collect();
    names.sort_unstable();
    names.dedup();
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    let seen = inspect(&paths);
    names
        .iter()
        .zip(seen)
        .map(|(n, s)| match s {
            Ok(s) => format!("{n}: {}", s.others.held),
            Err(e) => format!("{n}: error {e}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn derive(rows: &[RowSpec], cols: &[Column], results: &[Row]) -> Vec<Pair> {
    let mut out: Vec<Pair> = Vec::new();
    let cell = |r: usize, c: usize| results[r].cells.get(c);
    for row in results {
        if let Some(e) = &row.error {
            out.push(Pair::new(false, e.clone()));
        }
    }
    // qlock newcomers against every holder: as their qemu-io twin (the column before).
    for (c, col) in cols.iter().enumerate() {
        if !col.is_qlock() {
            continue;
        }
        let twin = c - 1;
        for (r, spec) in rows.iter().enumerate() {
            let (Some(a), Some(b)) = (cell(r, c), cell(r, twin)) else { continue };
            out.push(Pair::compare(
                format!("chain holder {}, newcomer {} vs {}", spec.label(), col.label(), cols[twin].label()),
                ("qlock", a),
                ("qemu-io", b),
                vec![(r, c), (r, twin)],
            ));
        }
    }
    // qlock holders: their bytes and every newcomer, as the twin QEMU holder.
    for (q, spec) in rows.iter().enumerate() {
        let Some(fe) = spec.holder.twin(spec.format) else { continue };
        let Some(t) = rows.iter().position(|o| o.held == spec.held && o.holder == ChainHolder::Qemu(fe))
        else {
            continue;
        };
        let twin = rows[t].label();
        if results[q].error.is_some() || results[t].error.is_some() {
            continue;
        }
        let (mine, theirs) = (&results[q].bytes, &results[t].bytes);
        let ok = mine == theirs;
        let pair = format!("chain holder {} holds what {twin} holds", spec.label());
        out.push(Pair::new(
            ok,
            if ok { pair } else { format!("{pair}\n    qlock: {mine}\n    QEMU:  {theirs}") },
        ));
        for (c, col) in cols.iter().enumerate() {
            let (Some(a), Some(b)) = (cell(q, c), cell(t, c)) else { continue };
            out.push(Pair::compare(
                format!("chain newcomer {}, holder {} vs {twin}", col.label(), spec.label()),
                ("against qlock", a),
                ("against QEMU", b),
                vec![(q, c), (t, c)],
            ));
        }
    }
    out
}

fn render(
    out: &mut String,
    build: &QemuBuild,
    graph: &Graph,
    rows: &[RowSpec],
    cols: &[Column],
    results: &[Row],
    pairs: &[Pair],
) {
    let bad = table::failed_cells(pairs);
    let _ = writeln!(out, "\nchain {} (QEMU {}): {}", graph.name, build.label(), graph.shape);
    table::legend(out, cols.iter().map(Column::label), 26);
    let width = rows.iter().map(|r| r.label().len()).max().unwrap_or(0).max(17);
    let _ = write!(out, "{:width$} ", "holder \\ newcomer");
    for i in 0..cols.len() {
        let _ = write!(out, "{:>3}", i + 1);
    }
    out.push('\n');
    for (r, spec) in rows.iter().enumerate() {
        let _ = write!(out, "{:width$} ", spec.label());
        for c in 0..cols.len() {
            let sym = results[r].cells.get(c).map_or('-', Answer::symbol);
            let mark = if bad.contains(&(r, c)) { '!' } else { ' ' };
            let _ = write!(out, " {sym}{mark}");
        }
        out.push('\n');
    }
    table::disagreements(out, pairs);
}
