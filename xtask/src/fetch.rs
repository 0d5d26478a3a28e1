//! Debian bookworm's QEMU 7.2, downloaded with `apt-get download` and unpacked with `dpkg -x`
//! under `target/qemu-7.2/`, never installed.
//!
//! The 7.2 binaries link libraries the host may lack. They are found with `ldd`, named after
//! Debian's library package rule (`libfoo.so.1` is in `libfoo1`, `libfoo-3.so.200` in
//! `libfoo-3-200`), downloaded and unpacked beside them; `LD_LIBRARY_PATH` is set only for
//! this build's processes. A finished unpack is marked with `.complete` so later runs are fast.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::qemu::QemuBuild;

const UTILS: &[&str] = &["qemu-utils"];
const SYSTEM: &[&str] = &["qemu-system-x86", "qemu-system-common"];
const MARKER: &str = ".complete";

/// Returns bookworm's QEMU from `dir` (normally `target/qemu-7.2`), downloading it first if
/// needed. A missing qemu-system only makes [`QemuBuild::system`] an `Err` with the reason.
///
/// # Errors
/// Why the tools cannot be had (no apt, no network, no bookworm candidate, a library missing).
pub fn bookworm(dir: &Path) -> Result<QemuBuild, String> {
    let root = dir.join("root");
    // Test binaries and xtask may fetch at once: one unpacks, the others wait for its marker
    // (two at once once left a tree without qemu-system-x86_64 and a marker saying all is well).
    let _one_at_a_time = lock_beside(dir)?;
    if !dir.join(MARKER).exists() {
        unpack(dir, &root)?;
    }
    let lib = lib_path(&root);
    let modules = root.join("usr/lib/x86_64-linux-gnu/qemu");
    let mut build = QemuBuild::probe(
        "Debian bookworm, unpacked in target/".into(),
        Some(root.join("usr/bin")),
        Some(lib),
        Some(modules).filter(|m| m.is_dir()),
    )?;
    if let Ok(reason) = fs::read_to_string(dir.join(MARKER))
        && let Some(why) = reason.strip_prefix("no-system: ")
    {
        build.system = Err(why.trim().to_string());
    }
    Ok(build)
}

/// An exclusive `flock(2)` on `DIR.lock`, held until the returned value is dropped.
fn lock_beside(dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, String> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let path = dir.with_file_name(name);
    let file = fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("locking {}: {e}", path.display()))
}

fn unpack(dir: &Path, root: &Path) -> Result<(), String> {
    let debs = dir.join("debs");
    fs::create_dir_all(&debs).map_err(|e| format!("{}: {e}", debs.display()))?;
    if !has_bookworm_candidate()? {
        run(Command::new("apt-get").args(["update", "-qq"]), "apt-get update")?;
        if !has_bookworm_candidate()? {
            return Err("apt knows no bookworm qemu-utils (is bookworm in sources.list?)".into());
        }
    }
    download(&debs, UTILS)?;
    let system = download(&debs, SYSTEM);
    for deb in list(&debs, ".deb")? {
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(root), "dpkg -x")?;
    }
    let mut bins: Vec<PathBuf> = ["qemu-io", "qemu-img", "qemu-nbd", "qemu-storage-daemon"]
        .iter()
        .map(|t| root.join("usr/bin").join(t))
        .collect();
    let sys_bin = root.join("usr/bin/qemu-system-x86_64");
    if system.is_ok() {
        bins.push(sys_bin.clone());
    }
    let libs = fetch_libraries(&debs, root, &bins);
    let note = match (&system, &libs) {
        (Err(e), _) => format!("no-system: {e}\n"),
        (Ok(()), Err(e)) if missing(root, &bins[..4]).is_empty() => {
            let _ = fs::remove_file(&sys_bin);
            format!("no-system: {e}\n")
        }
        (Ok(()), Err(e)) => return Err(e.clone()),
        (Ok(()), Ok(())) => String::new(),
    };
    fs::write(dir.join(MARKER), note).map_err(|e| e.to_string())
}

fn has_bookworm_candidate() -> Result<bool, String> {
    let out = Command::new("apt-cache")
        .args(["policy", "qemu-utils"])
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("apt-cache: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.contains("1:7.2") && text.contains("bookworm"))
}

fn download(debs: &Path, packages: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new("apt-get");
    cmd.arg("download").arg("-qq").current_dir(debs);
    cmd.args(packages.iter().map(|p| format!("{p}/bookworm")));
    run(&mut cmd, &format!("apt-get download {}", packages.join(" ")))
}

/// Downloads the library packages the binaries still miss, until nothing is missing.
fn fetch_libraries(debs: &Path, root: &Path, bins: &[PathBuf]) -> Result<(), String> {
    for _round in 0..6 {
        let sonames = missing(root, bins);
        if sonames.is_empty() {
            return Ok(());
        }
        let packages: Vec<String> = sonames.iter().filter_map(|s| package_of(s)).collect();
        let refs: Vec<&str> = packages.iter().map(String::as_str).collect();
        download(debs, &refs).map_err(|e| format!("libraries {}: {e}", sonames.join(" ")))?;
        for pkg in &packages {
            for deb in list(debs, ".deb")? {
                let name = deb.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if name.starts_with(&format!("{pkg}_")) {
                    run(Command::new("dpkg").arg("-x").arg(&deb).arg(root), "dpkg -x")?;
                }
            }
        }
    }
    let left = missing(root, bins);
    if left.is_empty() { Ok(()) } else { Err(format!("libraries still missing: {}", left.join(" "))) }
}

/// Debian's rule for library package names: `libfoo.so.1` → `libfoo1`, `libfoo-3.so.200` →
/// `libfoo-3-200` (a dash when the name ends in a digit).
pub fn package_of(soname: &str) -> Option<String> {
    let (name, version) = soname.split_once(".so.")?;
    let version = version.split('.').next()?;
    let sep = if name.ends_with(|c: char| c.is_ascii_digit()) { "-" } else { "" };
    Some(format!("{name}{sep}{version}").to_lowercase())
}

fn missing(root: &Path, bins: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for bin in bins {
        let Ok(o) = Command::new("ldd").arg(bin).env("LD_LIBRARY_PATH", lib_path(root)).output() else {
            continue;
        };
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some((so, _)) = line.trim().split_once(" => not found")
                && !out.iter().any(|s| s == so)
            {
                out.push(so.to_string());
            }
        }
    }
    out
}

fn lib_path(root: &Path) -> OsString {
    let dirs = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"].map(|d| root.join(d));
    std::env::join_paths(dirs).unwrap_or_default()
}

fn list(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>, String> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    Ok(v)
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.starts_with("W:")).unwrap_or("").trim();
        Err(format!("{what} failed ({}): {first}", out.status))
    }
}

#[cfg(test)]
mod tests {
    use super::package_of;

    #[test]
    fn library_packages_follow_debian_naming() {
        assert_eq!(package_of("libfdt.so.1").as_deref(), Some("libfdt1"));
        assert_eq!(package_of("libnl-route-3.so.200").as_deref(), Some("libnl-route-3-200"));
        assert_eq!(package_of("libvdeplug.so.2").as_deref(), Some("libvdeplug2"));
        assert_eq!(package_of("ld-linux"), None);
    }
}
