//! `compat (gluster, across hosts)`: a slice of the differential check with the holders on one
//! host and the newcomers on another, through two clients of one real GlusterFS volume
//! (qlock-testkit's [`GlusterBed`]).
//!
//! The holders run on host A: real QEMU front ends (`qemu-io` rw, `-r`, `-r -U`, `qemu-nbd`,
//! a storage-daemon export; qcow2 and raw) started inside host A's network namespace, the
//! qlock presets, and the foreign holders named in [`RAW`], on images under host A's mount.
//! The newcomers run on host B: the QEMU front ends inside host B's namespace, and qlock in
//! this process, on the same images under host B's mount. A QEMU command enters its host
//! through a wrapper directory of scripts (`exec nsenter --net=/run/netns/NS -- TOOL "$@"`,
//! the same pid, the same mount namespace), so the matrix machinery of [`compat`] runs
//! unchanged. qlock's own processes (testkit forks, and this one) are not moved: on a FUSE
//! mount the host is the client daemon behind the path, not the network namespace of the
//! process using it.
//!
//! Checks: those of [`compat`] (qlock against its QEMU twins, QEMU newcomers against qlock and
//! against its QEMU twins, the bytes host B sees held), plus one per cell: the verdict and
//! message across hosts must be those of the same cell run on one host
//! ([`compat::Report::check_against`]).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use qlock_core::Access;
use qlock_testkit::gluster::{GlusterBed, Host};

use crate::catalogue::{self, HolderProgram};
use crate::compat::{self, MatrixHolder, MatrixNewcomer, RAW_HOLDERS, Report, Side, Sides};
use crate::qemu::{QemuBuild, TOOLS};

/// The foreign holders of the slice: the `info` twin, a write lock, and POSIX locks (which the
/// kernel forwards to the filesystem too).
pub const RAW: &[&str] = &["ext rd 201 203 (info)", "ext wr 201 (V23)", "ext posix rd 101 201 (V24)"];

/// The holders of the slice: every QEMU front end but the VMs, the qlock presets, [`RAW`].
pub fn holders() -> Vec<MatrixHolder> {
    let qemu = catalogue::holders().into_iter().filter(|h| !matches!(h.program, HolderProgram::Vm { .. }));
    let mut v: Vec<MatrixHolder> = qemu.map(MatrixHolder::Qemu).collect();
    v.extend(Access::PRESETS.iter().map(|p| MatrixHolder::Qlock { name: p.name, access: p.access }));
    v.extend(
        RAW_HOLDERS
            .iter()
            .filter(|(name, _)| RAW.contains(name))
            .map(|(name, locks)| MatrixHolder::Raw { name, locks }),
    );
    v
}

/// The newcomers of the slice: the qlock presets, and the QEMU front ends that open the image
/// once and exit (`qemu-io`, `qemu-img`); the daemons run as holders.
pub fn newcomers() -> Vec<MatrixNewcomer> {
    let mut v: Vec<MatrixNewcomer> = Access::PRESETS
        .iter()
        .map(|p| MatrixNewcomer::Qlock { name: p.name, claimed: p.access, run: p.access })
        .collect();
    let once = qlock_testkit::newcomer::all().into_iter().filter(|n| {
        !matches!(n.command, catalogue::NewcomerCommand::Nbd { .. } | catalogue::NewcomerCommand::Qsd { .. })
    });
    v.extend(once.map(MatrixNewcomer::Qemu));
    v
}

/// `build` with every QEMU tool run inside `host`'s network namespace, through wrapper scripts
/// written to `dir`.
///
/// # Errors
/// A tool missing from `build`, or the wrappers could not be written.
pub fn on_host(build: &QemuBuild, host: &Host, dir: &Path) -> Result<QemuBuild, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for tool in TOOLS {
        let path = build.tool_path(tool).ok_or_else(|| format!("{tool} not found"))?;
        let script = format!(
            "#!/bin/sh\nexec nsenter --net=/run/netns/{} -- '{}' \"$@\"\n",
            host.netns(),
            path.display()
        );
        let wrapper = dir.join(tool);
        std::fs::write(&wrapper, script).map_err(|e| format!("{}: {e}", wrapper.display()))?;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{}: {e}", wrapper.display()))?;
    }
    let mut wrapped = QemuBuild::from_dir(dir)?;
    wrapped.origin = format!("{}, host {}", build.origin, host.name());
    wrapped.lib_path.clone_from(&build.lib_path);
    wrapped.module_dir.clone_from(&build.module_dir);
    Ok(wrapped)
}

/// Holders on host A of `bed`, newcomers on host B, each running `build` in its host's
/// namespace (wrappers in the bed's directory, gone with it).
///
/// # Errors
/// When the wrappers cannot be made.
pub fn sides(build: &QemuBuild, bed: &GlusterBed) -> Result<Sides, String> {
    let a = on_host(build, bed.host_a(), &bed.dir().join("bin-a"))?;
    let b = on_host(build, bed.host_b(), &bed.dir().join("bin-b"))?;
    Ok(Sides {
        holder: Side { build: a, images: Some(bed.host_a().mount().to_path_buf()) },
        newcomer: Side { build: b, images: Some(bed.host_b().mount().to_path_buf()) },
        place: Some("gluster, across hosts".into()),
    })
}

/// Runs the slice with holders on host A and newcomers on host B of `bed`, then on one host
/// (`jobs` rows at once), and checks each cell against its one-host twin.
///
/// Across hosts the rows run one at a time: with four at once, GlusterFS 10.3's FUSE client
/// of host B deadlocked in two runs out of two (both its epoll threads waiting inside the
/// FUSE translator's lock callback; every lock call on that mount then hangs, unkillable,
/// until the client daemon is killed). One at a time it has not.
///
/// # Errors
/// When the wrappers or a scratch directory cannot be made.
pub fn run(build: &QemuBuild, bed: &GlusterBed, jobs: usize) -> Result<Report, String> {
    let mut across = compat::run_matrix(&sides(build, bed)?, holders(), newcomers(), 1)?;
    let here = compat::run_matrix(&Sides::local(build), holders(), newcomers(), jobs)?;
    across.check_against(&here, "one host");
    across.build = build.label();
    Ok(across)
}
