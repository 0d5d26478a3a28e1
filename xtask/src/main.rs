//! `cargo xtask`: see the library docs (`cargo doc -p xtask --open`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qlock_core::Access;
use xtask::compat::{self, Options};
use xtask::qemu::QemuBuild;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "qlock's project tasks", version)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Differential check: qlock against real QEMU front ends, on every QEMU version at hand.
    Compat(CompatArgs),
    /// Run the workspace benchmarks and print one table of their goals.
    Bench {
        /// Exit 1 when a goal is missed or a goal line does not parse.
        #[arg(long)]
        strict: bool,
        /// Run the benches while two busy-loop processes keep both cores loaded (started and
        /// stopped here, after the build).
        #[arg(long)]
        loaded: bool,
        /// Passed to `cargo bench`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the `qlock` binary as shipped (static musl, else static glibc; LTO) and print its path.
    Dist,
    /// The two-host GlusterFS test bed (root): up, down [ID...], status.
    Gluster {
        #[command(subcommand)]
        action: GlusterAction,
    },
    /// Everything CI runs: fmt, clippy, tests, docs, compat.
    Ci {
        /// Skip these steps (fmt, clippy, test, doc, compat); repeatable.
        #[arg(long, value_name = "STEP")]
        skip: Vec<String>,
        #[command(flatten)]
        compat: CompatArgs,
    },
}

#[derive(Subcommand)]
enum GlusterAction {
    /// Start a bed and leave it running; prints its mounts and id.
    Up {
        /// `gluster volume set` before the volume starts, e.g. client.strict-locks=on; repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        options: Vec<String>,
    },
    /// Tear down these beds (default: every bed found).
    Down { ids: Vec<String> },
    /// List the beds and what they have mounted and running.
    Status,
}

#[derive(clap::Args, Clone)]
struct CompatArgs {
    /// Also run this QEMU build (a `bin` directory or a prefix); repeatable.
    #[arg(long = "qemu", value_name = "DIR")]
    qemu: Vec<PathBuf>,
    /// Do not download Debian bookworm's QEMU 7.2 (it is reported as skipped).
    #[arg(long)]
    no_download: bool,
    /// Holders run at once (default: twice the CPUs).
    #[arg(short, long)]
    jobs: Option<usize>,
    /// Do not run the slice across two hosts of a GlusterFS volume (it is reported as skipped).
    #[arg(long)]
    no_gluster: bool,
    /// Only holders and newcomers whose label contains this; repeatable. `chain` (or
    /// `chain qcow2-3`, ...) selects graphs of the chain matrix, `153` (or `153 qemu-io`, ...)
    /// the qemu-iotests 153 rounds (by holder); no filter runs everything. The slice across
    /// hosts is not filtered.
    #[arg(long)]
    only: Vec<String>,
    /// Run preset NAME with another access, to see the check catch it (NAME=ACCESS);
    /// `chain:PRESET=ACCESS` for qlock's chain holders and newcomers, `op:NAME=ACCESS` to
    /// answer `check --op NAME` as `check --chain --access ACCESS` in the 153 rounds.
    #[arg(long, hide = true, value_parser = parse_mutation)]
    mutate: Vec<(String, Access)>,
}

fn parse_mutation(s: &str) -> Result<(String, Access), String> {
    let (name, access) = s.split_once('=').ok_or("expected NAME=ACCESS")?;
    Ok((name.to_string(), access.parse()?))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Compat(args) => compat_main(&args),
        Task::Bench { strict, loaded, args } => xtask::bench::run(&args, strict, loaded),
        Task::Dist => xtask::dist::build().map(|d| println!("{} (static, {})", d.path.display(), d.libc)),
        Task::Gluster { action } => match action {
            GlusterAction::Up { options } => xtask::gluster::up(&options),
            GlusterAction::Down { ids } => xtask::gluster::down(&ids),
            GlusterAction::Status => {
                xtask::gluster::status();
                Ok(())
            }
        },
        Task::Ci { skip, compat: args } => xtask::ci::run_cargo_steps(&skip).and_then(|()| {
            if skip.iter().any(|s| s == "compat") {
                return Ok(());
            }
            println!("ci: cargo xtask compat");
            compat_main(&args)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn compat_main(args: &CompatArgs) -> Result<(), String> {
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() * 2));
    let opts = Options { jobs, only: args.only.clone(), mutate: args.mutate.clone() };
    let mut builds: Vec<Result<QemuBuild, (String, String)>> =
        vec![QemuBuild::from_path().map_err(|e| ("PATH".into(), e))];
    let mut downloaded = None;
    if args.no_download {
        builds.push(Err(("Debian bookworm 7.2".into(), "--no-download".into())));
    } else {
        let dir = xtask::target_dir().join("qemu-7.2");
        eprintln!("compat: preparing Debian bookworm's QEMU 7.2 in {}", dir.display());
        let bookworm = xtask::fetch::bookworm(&dir);
        downloaded = bookworm.as_ref().ok().map(|b| b.bin_dir.clone());
        builds.push(bookworm.map_err(|e| ("Debian bookworm 7.2".into(), e)));
    }
    for dir in &args.qemu {
        builds.push(QemuBuild::from_dir(dir).map_err(|e| (dir.display().to_string(), e)));
    }
    let mut summaries = Vec::new();
    let mut failed = false;
    for build in builds {
        let build = match build {
            Ok(b) => b,
            Err((which, why)) => {
                summaries.push(format!("compat: skipped QEMU {which}: {why}"));
                continue;
            }
        };
        if let Err(why) = &build.system {
            // Bookworm's packages always hold qemu-system-x86_64: without it the unpack went
            // wrong, and a run without VM holders would pass on less than it claims.
            if downloaded.as_ref() == Some(&build.bin_dir) && std::env::var("CI").as_deref() == Ok("true") {
                return Err(format!("QEMU {}: no VM holders under CI=true: {why}", build.label()));
            }
            summaries.push(format!("compat: QEMU {}: no VM holders: {why}", build.label()));
        }
        let started = std::time::Instant::now();
        let report = compat::run(&build, &opts)?;
        print!("{}", report.render());
        failed |= report.failures().next().is_some();
        summaries.push(format!("{} in {:.1}s", report.summary(), started.elapsed().as_secs_f64()));
    }
    if args.no_gluster {
        summaries.push("compat: skipped gluster, across hosts: --no-gluster".into());
    } else {
        let (summary, agree) = compat_across_hosts(opts.jobs)?;
        failed |= !agree;
        summaries.push(summary);
    }
    println!();
    for s in &summaries {
        println!("{s}");
    }
    if !summaries.iter().any(|s| s.starts_with("compat: ") && s.contains(" agree ")) {
        return Err("no QEMU version could be run".into());
    }
    if failed { Err("qlock and QEMU disagree (see DISAGREE above)".into()) } else { Ok(()) }
}

/// The slice across two hosts of a GlusterFS bed, on the QEMU on `PATH`: its summary line and
/// whether every pair agrees, or a `skipped` line when this machine cannot have the bed (not
/// under `CI=true`, where that fails).
fn compat_across_hosts(jobs: usize) -> Result<(String, bool), String> {
    use qlock_testkit::gluster::GlusterBed;
    let started = std::time::Instant::now();
    let bed = match GlusterBed::start() {
        Ok(bed) => bed,
        Err(e) if e.is_skip() && std::env::var("CI").as_deref() != Ok("true") => {
            return Ok((format!("compat: skipped gluster, across hosts: {e}"), true));
        }
        Err(e) => return Err(format!("GlusterFS test bed: {e}")),
    };
    let build = QemuBuild::from_path()?;
    let report = xtask::across::run(&build, &bed, jobs)?;
    drop(bed);
    print!("{}", report.render());
    let summary = format!("{} in {:.1}s", report.summary(), started.elapsed().as_secs_f64());
    Ok((summary, report.failures().next().is_none()))
}
