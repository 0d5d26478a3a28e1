//! `cargo xtask compat`: the differential check of qlock against real QEMU.
//!
//! Every holder (QEMU front ends, qlock presets, foreign raw locks) gets its own image and
//! process; every newcomer (QEMU front ends, qlock presets) then runs against it in turn. From
//! that matrix of verdicts three kinds of pairs follow, all comparisons between real runs:
//!
//! - **qlock newcomer**: against any holder, qlock with preset `p` must get the verdict and
//!   message of every QEMU newcomer whose access is `p` (its *twins*);
//! - **qlock holder**: every QEMU newcomer must get the same verdict and message against qlock
//!   holding `p` as against every QEMU holder whose access is `p` (for `info`, whose QEMU front
//!   end exits at once, the twin is a foreign holder of bytes 201 and 203);
//! - **bytes**: each QEMU and qlock holder holds exactly the bytes of its catalogued access,
//!   as seen from outside with [`qlock_core::inspect`]; for a qlock preset, so does
//!   `ImageLock` itself, checked in this process before the holder starts.
//!
//! A cell that could not run at all (an `E`) fails its own check.
//!
//! The qlock and foreign holders are qlock-testkit processes ([`qlock_testkit::FakeQemu`]):
//! the differential check runs on the same holders downstream tests use, and its bytes check
//! verifies the testkit's front-end table against every QEMU version.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;

use qlock_core::{Access, LockSet, Perm};
use qlock_testkit::RawLock;

use crate::catalogue::{self, QemuHolder, QemuNewcomer, same_bytes};
use crate::qemu::QemuBuild;
use crate::run::{self, Outcome, Running, Scratch};
use crate::section::Section;

/// A write lock on `byte`.
const fn wr(byte: u64) -> RawLock {
    RawLock::byte(byte).exclusive()
}

/// Foreign holders: what other software (or a broken one) may hold. The name says which spec
/// test vector it reproduces.
pub const RAW_HOLDERS: &[(&str, &[RawLock])] = &[
    ("ext wr 100 (V21)", &[wr(100)]),
    ("ext wr 201 (V23)", &[wr(201)]),
    ("ext wr 203", &[wr(203)]),
    ("ext posix wr 101", &[wr(101).posix()]),
    ("ext posix rd 101 201 (V24)", &[RawLock::byte(101).posix(), RawLock::byte(201).posix()]),
    ("ext rd 0 (libvirt)", &[RawLock::byte(0)]),
    ("ext wr 0", &[wr(0)]),
    ("ext rd 102 (V19)", &[RawLock::byte(102)]),
    ("ext rd 104 204 (V20)", &RawLock::LEGACY_GRAPH_MOD),
    ("ext rd 200 (V15)", &[RawLock::byte(200)]),
    ("ext rd 100 201-203 (V17)", &[RawLock::byte(100), RawLock::range(201, 3)]),
    ("ext rd 201 203 (info)", INFO_TWIN),
    ("ext rd whole file", &[RawLock::WHOLE_FILE]),
    ("ext wr whole file", &[RawLock::WHOLE_FILE.exclusive()]),
    ("ext posix wr whole file", &[RawLock::WHOLE_FILE.exclusive().posix()]),
];

/// The foreign holder standing in for `qemu-img info` on qcow2 (`{– | 201 203}`), which cannot
/// be kept running.
const INFO_TWIN: &[RawLock] = &[RawLock::byte(201), RawLock::byte(203)];

/// A row of the matrix: a process holding the image while the newcomers run.
#[derive(Debug, Clone)]
pub enum MatrixHolder {
    /// A QEMU front end.
    Qemu(QemuHolder),
    /// A testkit process holding a preset's access, taken the QEMU way.
    Qlock {
        /// Preset name.
        name: &'static str,
        /// Its access.
        access: Access,
    },
    /// A testkit process holding raw locks.
    Raw {
        /// Label.
        name: &'static str,
        /// The locks, taken in order on one descriptor.
        locks: &'static [RawLock],
    },
}

impl MatrixHolder {
    /// Its row label.
    pub fn label(&self) -> String {
        match self {
            MatrixHolder::Qemu(h) => h.label(),
            MatrixHolder::Qlock { name, .. } => format!("qlock {name}"),
            MatrixHolder::Raw { name, .. } => name.to_string(),
        }
    }

    /// A qlock holder's preset access.
    fn qlock_access(&self) -> Option<Access> {
        match self {
            MatrixHolder::Qlock { access, .. } => Some(*access),
            _ => None,
        }
    }

    /// The access a qlock holder may be compared against, if it is a twin: QEMU holders by
    /// their catalogued access, the `info` stand-in by `Access::INFO`.
    fn twin_access(&self) -> Option<Access> {
        match self {
            MatrixHolder::Qemu(h) => Some(h.access),
            MatrixHolder::Raw { locks, .. } if *locks == INFO_TWIN => Some(Access::INFO),
            _ => None,
        }
    }
}

/// A column of the matrix: something that opens the image once.
#[derive(Debug, Clone)]
pub enum MatrixNewcomer {
    /// A QEMU front end.
    Qemu(QemuNewcomer),
    /// qlock in-process with `run`, checked as if it were the preset `name`.
    Qlock {
        /// Preset name.
        name: &'static str,
        /// The access the preset stands for (what its twins are looked up by).
        claimed: Access,
        /// The access actually requested: `claimed`, unless a test mutated it.
        run: Access,
    },
}

impl MatrixNewcomer {
    /// Its column label.
    pub fn label(&self) -> String {
        match self {
            MatrixNewcomer::Qemu(n) => n.label(),
            MatrixNewcomer::Qlock { name, .. } => format!("qlock {name}"),
        }
    }

    /// The access a qlock newcomer stands for (not the mutated one it runs).
    fn qlock_access(&self) -> Option<Access> {
        match self {
            MatrixNewcomer::Qlock { claimed, .. } => Some(*claimed),
            MatrixNewcomer::Qemu(_) => None,
        }
    }

    /// The access a qlock newcomer may be compared against: a QEMU newcomer's single request.
    fn twin_access(&self) -> Option<Access> {
        match self {
            MatrixNewcomer::Qemu(q) => q.access,
            MatrixNewcomer::Qlock { .. } => None,
        }
    }
}

/// How to run the check.
#[derive(Debug, Clone)]
pub struct Options {
    /// Holders run in parallel, each on its own image.
    pub jobs: usize,
    /// Keep only holders and newcomers whose label contains one of these (all when empty).
    pub only: Vec<String>,
    /// Run these presets with another access (`name`, access), for testing the check itself.
    pub mutate: Vec<(String, Access)>,
}

/// Where one run's holders and newcomers meet their image: both on this host (the default), or
/// each through its own client of a shared filesystem ([`crate::across`]).
#[derive(Debug, Clone)]
pub struct Sides {
    /// Holders: the build they run (its commands may enter another host's namespace) and the
    /// directory their images are created in.
    pub holder: Side,
    /// Newcomers: their build, and the same directory as their host sees it.
    pub newcomer: Side,
    /// `gluster, across hosts`; `None` on one host.
    pub place: Option<String>,
}

/// One side of a run.
#[derive(Debug, Clone)]
pub struct Side {
    /// The QEMU build this side runs.
    pub build: QemuBuild,
    /// Where the images are, as this side sees them; `None`: the run's scratch directory.
    pub images: Option<PathBuf>,
}

impl Sides {
    /// Holders and newcomers on this host, running `build`, on a scratch directory.
    pub fn local(build: &QemuBuild) -> Sides {
        let side = Side { build: build.clone(), images: None };
        Sides { holder: side.clone(), newcomer: side, place: None }
    }
}

/// The outcome for one QEMU build.
#[derive(Debug)]
pub struct Report {
    /// Which build.
    pub build: String,
    /// Where holders and newcomers ran, when not on one host ([`Sides::place`]).
    pub place: Option<String>,
    /// Row labels.
    pub holders: Vec<MatrixHolder>,
    /// Column labels.
    pub newcomers: Vec<MatrixNewcomer>,
    /// `cells[h][n]`; `None` when the holder could not be started.
    pub cells: Vec<Vec<Option<Outcome>>>,
    /// The pairs, in order.
    pub pairs: Vec<Pair>,
    /// The image-graph sections, after the matrix: the chain matrix and the qemu-iotests 153
    /// port ([`crate::chains`], [`crate::iotest153`]). Their pairs count in the summary.
    pub sections: Vec<Section>,
}

/// One comparison of two runs (or a holder's bytes) that must agree.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Whether both sides agree.
    pub ok: bool,
    /// The pair and, when failing, both messages.
    pub detail: String,
    /// Cells this check reads (for marking the matrix).
    cells: Vec<(usize, usize)>,
}

impl Pair {
    /// A check on no cell of a table (a holder's bytes, a holder that did not start): `detail`
    /// names the pair and, when failing, both answers.
    pub fn new(ok: bool, detail: String) -> Pair {
        Pair { ok, detail, cells: vec![] }
    }

    /// The pair named `pair` of two answers `(whose, answer)`, read from `cells` of its table;
    /// when they disagree, its detail shows both.
    pub fn compare<A: Compared>(
        pair: String,
        a: (&str, &A),
        b: (&str, &A),
        cells: Vec<(usize, usize)>,
    ) -> Pair {
        let ok = a.1.agrees(b.1);
        let detail = if ok {
            pair
        } else {
            format!("{pair}\n    {}: {}\n    {}: {}", a.0, a.1.describe(), b.0, b.1.describe())
        };
        Pair { ok, detail, cells }
    }
}

/// A run's answer as a [`Pair`] compares it: the matrix's [`Outcome`], the sections'
/// [`crate::answer::Answer`].
pub trait Compared {
    /// Whether `other` is the same answer.
    fn agrees(&self, other: &Self) -> bool;
    /// On one line, for a failing pair's detail.
    fn describe(&self) -> String;
}

/// The printed tables' parts: the matrix's and each section's.
pub mod table {
    use std::fmt::Write as _;

    use super::Pair;

    /// The cells the failing `pairs` read, marked `!` in the table.
    pub fn failed_cells(pairs: &[Pair]) -> Vec<(usize, usize)> {
        pairs.iter().filter(|c| !c.ok).flat_map(|c| c.cells.iter().copied()).collect()
    }

    /// The columns' numbers and labels, four to a line, each label padded to `width`.
    pub fn legend(out: &mut String, labels: impl ExactSizeIterator<Item = String>, width: usize) {
        let n = labels.len();
        for (i, label) in labels.enumerate() {
            let _ = write!(out, "{:>4} {label:<width$}", i + 1);
            if i % 4 == 3 || i + 1 == n {
                out.push('\n');
            }
        }
    }

    /// `DISAGREE detail`, a line for each failing pair.
    pub fn disagreements(out: &mut String, pairs: &[Pair]) {
        for c in pairs.iter().filter(|c| !c.ok) {
            let _ = writeln!(out, "DISAGREE {}", c.detail);
        }
    }
}

impl Report {
    /// Checks that disagree, the sections' included.
    pub fn failures(&self) -> impl Iterator<Item = &Pair> {
        self.all_pairs().filter(|c| !c.ok)
    }

    /// The matrix's pairs, then the sections'.
    pub fn all_pairs(&self) -> impl Iterator<Item = &Pair> {
        self.pairs.iter().chain(self.sections.iter().flat_map(|s| s.pairs.iter()))
    }

    /// `compat: N/N agree (QEMU ...)`, every pair of the matrix and the sections, then each
    /// part's own tally (`matrix 882/882, chains 610/610, ...`) for the parts that ran.
    pub fn summary(&self) -> String {
        let ok = self.all_pairs().filter(|c| c.ok).count();
        let matrix = self.pairs.iter().filter(|c| c.ok).count();
        let mut parts = vec![format!("matrix {matrix}/{}", self.pairs.len())];
        parts.extend(self.sections.iter().filter(|s| !s.pairs.is_empty()).map(Section::tally));
        let total = self.all_pairs().count();
        match &self.place {
            None => format!("compat: {ok}/{total} agree (QEMU {}: {})", self.build, parts.join(", ")),
            Some(place) => format!("compat ({place}): {ok}/{total} agree (QEMU {})", self.build),
        }
    }

    /// Adds one check per cell: its verdict and message must be those of the same cell in
    /// `other`, the same matrix run elsewhere (`label` says where, e.g. `one host`). Cells
    /// missing on either side (a holder that did not start) already fail their own check.
    pub fn check_against(&mut self, other: &Report, label: &str) {
        for (h, holder) in self.holders.iter().enumerate() {
            for (n, newcomer) in self.newcomers.iter().enumerate() {
                let theirs = other.cells.get(h).and_then(|r| r.get(n)).and_then(Option::as_ref);
                let (Some(a), Some(b)) = (self.cells[h][n].as_ref(), theirs) else { continue };
                let place = self.place.as_deref().unwrap_or("here");
                self.pairs.push(Pair::compare(
                    format!("holder {}, newcomer {}: {place} vs {label}", holder.label(), newcomer.label()),
                    (place, a),
                    (label, b),
                    vec![(h, n)],
                ));
            }
        }
    }

    /// The matrix, legend and disagreements, as printed by `cargo xtask compat`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let bad = table::failed_cells(&self.pairs);
        let _ = writeln!(
            out,
            "QEMU {}{}: {} holders x {} newcomers",
            self.build,
            self.place.as_ref().map_or(String::new(), |p| format!(" ({p})")),
            self.holders.len(),
            self.newcomers.len()
        );
        table::legend(&mut out, self.newcomers.iter().map(MatrixNewcomer::label), 20);
        let width = self.holders.iter().map(|h| h.label().len()).max().unwrap_or(0);
        let _ = write!(out, "{:width$} ", "holder \\ newcomer");
        for i in 0..self.newcomers.len() {
            let _ = write!(out, "{:>3}", i + 1);
        }
        out.push('\n');
        for (h, holder) in self.holders.iter().enumerate() {
            let _ = write!(out, "{:width$} ", holder.label());
            for n in 0..self.newcomers.len() {
                let sym = self.cells[h][n].as_ref().map_or('-', Outcome::symbol);
                let mark = if bad.contains(&(h, n)) { '!' } else { ' ' };
                let _ = write!(out, " {sym}{mark}");
            }
            out.push('\n');
        }
        out.push_str(
            "legend: . granted   g Failed to get \"X\" lock   s Failed to get shared \"X\" lock   \
             L Failed to lock byte N   E error   - holder did not start   ! disagreement\n",
        );
        table::disagreements(&mut out, &self.pairs);
        for s in &self.sections {
            out.push_str(&s.text);
        }
        out
    }
}

/// The matrix for `build`: QEMU holders (VMs when it has qemu-system), qlock presets and
/// foreign holders as rows; qlock presets then QEMU front ends as columns.
pub fn matrix(build: &QemuBuild, opts: &Options) -> (Vec<MatrixHolder>, Vec<MatrixNewcomer>) {
    let keep = |label: String| opts.only.is_empty() || opts.only.iter().any(|o| label.contains(o.as_str()));
    let mut holders: Vec<MatrixHolder> = catalogue::holders()
        .into_iter()
        .filter(|h| !h.needs_system() || build.system.is_ok())
        .map(MatrixHolder::Qemu)
        .collect();
    holders.extend(Access::PRESETS.iter().map(|p| MatrixHolder::Qlock { name: p.name, access: p.access }));
    holders.extend(RAW_HOLDERS.iter().map(|(name, locks)| MatrixHolder::Raw { name, locks }));
    holders.retain(|h| keep(h.label()));
    let mut newcomers: Vec<MatrixNewcomer> = Access::PRESETS
        .iter()
        .map(|p| {
            let run = opts.mutate.iter().find(|(n, _)| n == p.name).map_or(p.access, |(_, a)| *a);
            MatrixNewcomer::Qlock { name: p.name, claimed: p.access, run }
        })
        .collect();
    newcomers.extend(qlock_testkit::newcomer::all().into_iter().map(MatrixNewcomer::Qemu));
    newcomers.retain(|n| keep(n.label()));
    (holders, newcomers)
}

/// Runs the whole matrix for one build and derives the pairs.
///
/// # Errors
/// When no scratch directory can be made.
pub fn run(build: &QemuBuild, opts: &Options) -> Result<Report, String> {
    let (holders, newcomers) = matrix(build, opts);
    let mut report = run_matrix(&Sides::local(build), holders, newcomers, opts.jobs)?;
    let tmp = tempfile::Builder::new().prefix("xtask-compat-").tempdir().map_err(|e| e.to_string())?;
    report.sections =
        vec![crate::chains::run(build, opts, tmp.path()), crate::iotest153::run(build, opts, tmp.path())];
    Ok(report)
}

/// Runs the matrix `holders` x `newcomers` with each side where `sides` puts it, and derives
/// the checks. Holders get an image each, in a fresh directory under the holder side's
/// `images` (the newcomers see it under theirs); sockets, pid files and outputs stay in a local
/// scratch directory.
///
/// # Errors
/// When no scratch directory can be made.
pub fn run_matrix(
    sides: &Sides,
    holders: Vec<MatrixHolder>,
    newcomers: Vec<MatrixNewcomer>,
    jobs: usize,
) -> Result<Report, String> {
    let tmp = tempfile::Builder::new().prefix("xtask-compat-").tempdir().map_err(|e| e.to_string())?;
    // A fresh directory of images on each side (a name reused on a shared filesystem can give
    // ESTALE on the other client for a moment).
    let images = match &sides.holder.images {
        Some(dir) => Some(
            tempfile::Builder::new().prefix("xtask-compat-").tempdir_in(dir).map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let image_dir = |side: &Side| match (&side.images, &images) {
        (Some(root), Some(made)) => made.path().file_name().map_or(root.clone(), |n| root.join(n)),
        _ => tmp.path().to_path_buf(),
    };
    let (holder_dir, newcomer_dir) = (image_dir(&sides.holder), image_dir(&sides.newcomer));
    let next = Mutex::new(0usize);
    let rows: Mutex<Vec<Option<Row>>> = Mutex::new(vec![None; holders.len()]);
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let h = {
                        let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                        let h = *n;
                        *n += 1;
                        h
                    };
                    let Some(holder) = holders.get(h) else { break };
                    let name = format!("h{h}");
                    let scratch = tmp.path().join(&name);
                    let holder_side =
                        Scratch { image: holder_dir.join(&name).join("disk.qcow2"), dir: scratch.clone() };
                    let newcomer_side =
                        Scratch { image: newcomer_dir.join(&name).join("disk.qcow2"), dir: scratch };
                    let row = run_row(sides, holder, &newcomers, &holder_side, &newcomer_side);
                    rows.lock().unwrap_or_else(|e| e.into_inner())[h] = Some(row);
                }
            });
        }
    });
    let rows: Vec<Row> = rows.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().flatten().collect();
    let pairs = derive_checks(&holders, &newcomers, &rows);
    let cells = rows.into_iter().map(|r| r.cells).collect();
    let build = sides.newcomer.build.label();
    Ok(Report { build, place: sides.place.clone(), holders, newcomers, cells, pairs, sections: vec![] })
}

/// One holder's results.
#[derive(Debug, Clone)]
struct Row {
    /// Why the holder did not start, or its bytes were not the catalogued ones.
    holder_error: Option<String>,
    /// The bytes check, for QEMU and qlock holders: what was wrong.
    bytes: Option<Result<(), String>>,
    cells: Vec<Option<Outcome>>,
}

/// One holder's row: `scratch` is its image as the holder's side sees it, `theirs` the same
/// image as the newcomers' side sees it (the same paths on one host).
fn run_row(
    sides: &Sides,
    holder: &MatrixHolder,
    newcomers: &[MatrixNewcomer],
    scratch: &Scratch,
    theirs: &Scratch,
) -> Row {
    let mut row = Row { holder_error: None, bytes: None, cells: vec![None; newcomers.len()] };
    let build = &sides.holder.build;
    let made = [&scratch.dir, &scratch.image.parent().map(PathBuf::from).unwrap_or_default()]
        .into_iter()
        .try_for_each(std::fs::create_dir_all);
    if let Err(e) = made.map_err(|e| e.to_string()).and_then(|()| run::create_image(build, scratch)) {
        row.holder_error = Some(format!("cannot create the image: {e}"));
        return row;
    }
    // What qlock itself holds for a preset, before its testkit stand-in takes the image.
    let qlock_held = match holder {
        MatrixHolder::Qlock { access, .. } => Some(run::qlock_holds(*access, scratch, &theirs.image)),
        _ => None,
    };
    let started: Result<Running, String> = match holder {
        MatrixHolder::Qemu(h) => run::start_qemu(build, h, scratch),
        MatrixHolder::Qlock { access, .. } => {
            run::start_testkit(build.holder(&scratch.image).access(*access), false).map_err(|e| e.to_string())
        }
        MatrixHolder::Raw { locks, .. } => {
            run::start_testkit(build.holder(&scratch.image).raw(locks.iter().copied()), false)
                .map_err(|e| e.to_string())
        }
    };
    let running = match started {
        Ok(r) => r,
        Err(e) => {
            row.holder_error = Some(format!("{} did not start: {}", holder.label(), e.trim()));
            return row;
        }
    };
    let expected = match holder {
        MatrixHolder::Qemu(h) => Some(h.access),
        MatrixHolder::Qlock { access, .. } => Some(*access),
        MatrixHolder::Raw { .. } => None,
    };
    if let Some(access) = expected {
        let want = lockset(access);
        // Seen from the newcomers' side: on shared storage, what the other host sees.
        let seen = match qlock_core::inspect(&[&theirs.image]).remove(0) {
            Ok(status) => status.others.held,
            Err(_) => LockSet::EMPTY,
        };
        let label = holder.label();
        row.bytes = Some(match qlock_held {
            Some(Ok(q)) if q != want => {
                Err(format!("holder {label}: ImageLock holds {{{q}}}, the preset is {{{want}}}"))
            }
            Some(Err(e)) => Err(format!("holder {label}: ImageLock could not take the preset: {e}")),
            _ if seen != want => Err(format!("holder {label}: holds {{{seen}}}, catalogue says {{{want}}}")),
            _ => Ok(()),
        });
    }
    let image = theirs.image.display().to_string();
    for (i, n) in newcomers.iter().enumerate() {
        let verdict = match n {
            MatrixNewcomer::Qemu(q) => run::run_qemu(&sides.newcomer.build, q, theirs),
            MatrixNewcomer::Qlock { run, .. } => run::run_qlock(*run, theirs),
        };
        // Each holder has its own image: name it IMAGE so that rows compare. A message naming
        // another path keeps it, and still disagrees.
        row.cells[i] = Some(verdict.map_message(|m| m.replace(&image, "IMAGE")));
    }
    running.stop();
    row
}

fn lockset(a: Access) -> LockSet {
    a.lock_set(Perm::ALL)
}

fn derive_checks(holders: &[MatrixHolder], newcomers: &[MatrixNewcomer], rows: &[Row]) -> Vec<Pair> {
    let mut pairs = Vec::new();
    let cell = |h: usize, n: usize| rows[h].cells[n].as_ref();
    for (h, holder) in holders.iter().enumerate() {
        let row = &rows[h];
        if let Some(e) = &row.holder_error {
            pairs.push(Pair { ok: false, detail: e.clone(), cells: vec![] });
            continue;
        }
        match &row.bytes {
            Some(Ok(())) => pairs.push(Pair { ok: true, detail: String::new(), cells: vec![] }),
            Some(Err(detail)) => pairs.push(Pair { ok: false, detail: detail.clone(), cells: vec![] }),
            None => {}
        }
        for (n, newcomer) in newcomers.iter().enumerate() {
            if let Some(Outcome::Failed(m)) = cell(h, n) {
                pairs.push(Pair {
                    ok: false,
                    detail: format!(
                        "holder {}, newcomer {}: could not run: {m}",
                        holder.label(),
                        newcomer.label()
                    ),
                    cells: vec![(h, n)],
                });
            }
        }
    }
    // qlock newcomers against every holder: their verdict is that of each QEMU twin newcomer.
    for (p, t) in twins(newcomers, MatrixNewcomer::qlock_access, MatrixNewcomer::twin_access) {
        let (qlock, twin) = (newcomers[p].label(), newcomers[t].label());
        for (h, holder) in holders.iter().enumerate() {
            let (Some(a), Some(b)) = (cell(h, p), cell(h, t)) else { continue };
            let pair = format!("holder {}, newcomer {qlock} vs {twin}", holder.label());
            pairs.push(Pair::compare(pair, ("qlock", a), (&twin, b), vec![(h, p), (h, t)]));
        }
    }
    // qlock holders: every newcomer sees them as it sees each QEMU holder with the same access.
    for (q, t) in twins(holders, MatrixHolder::qlock_access, MatrixHolder::twin_access) {
        let (qlock, twin) = (holders[q].label(), holders[t].label());
        for (n, newcomer) in newcomers.iter().enumerate() {
            let (Some(a), Some(b)) = (cell(q, n), cell(t, n)) else { continue };
            let pair = format!("newcomer {}, holder {qlock} vs {twin}", newcomer.label());
            let against_twin = format!("against {twin}");
            pairs.push(Pair::compare(pair, ("against qlock", a), (&against_twin, b), vec![(q, n), (t, n)]));
        }
    }
    pairs
}

/// `(q, t)` for each qlock line `q` of one axis of the matrix (`qlock`: its preset's access) and
/// each line `t` it must answer as (`twin`: a line's access as a twin; the same bytes).
fn twins<L>(
    lines: &[L],
    qlock: impl Fn(&L) -> Option<Access>,
    twin: impl Fn(&L) -> Option<Access>,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (q, line) in lines.iter().enumerate() {
        let Some(preset) = qlock(line) else { continue };
        let same = |other: &L| twin(other).is_some_and(|a| same_bytes(a, preset));
        out.extend(lines.iter().enumerate().filter(|(_, other)| same(other)).map(|(t, _)| (q, t)));
    }
    out
}
