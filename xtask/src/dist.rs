//! `cargo xtask dist`: the `qlock` binary as shipped, statically linked.
//!
//! A `qlock check` is one short process, so most of what a caller pays is starting it. With
//! glibc, start-up is expensive on a VM: its loader maps and relocates `libc` and `libgcc_s`,
//! and even a static glibc probes the CPU's caches with `cpuid` at start-up (half of a static
//! glibc `qlock check`'s user time on the project's VM, where each `cpuid` traps to the
//! hypervisor). musl does neither. Medians of 60 spawns on the project's VM: `qlock check` 0.42
//! ms static with musl, 0.98 ms static with glibc, 1.43 ms dynamically linked; `/bin/true` 0.83
//! ms; `qemu-img info` 4.2 ms.
//!
//! So the shipped binary is a static PIE for `x86_64-unknown-linux-musl` (the target's own C
//! runtime, no musl toolchain needed: `rustup target add x86_64-unknown-linux-musl`), built
//! with the `dist` profile (LTO, one codegen unit, `panic = "abort"`, stripped: ~1.8 MB). qlock
//! needs nothing musl lacks: no NSS lookups, no `dlopen`, no locale, and its allocations are few.
//! Without the musl target, it falls back to a static glibc build (`-C
//! target-feature=+crt-static` through `cargo rustc`, which passes the flag to the binary alone:
//! given to every crate, as `.cargo/config.toml` would, it breaks the proc-macro crates).
//! `cargo install --locked --path qlock-cli` still works and gives the dynamic glibc binary.

use std::path::PathBuf;
use std::process::Command;

/// The target of the shipped binary, when its standard library is installed.
pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// How the shipped binary was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dist {
    /// `target/<target>/dist/qlock` or `target/dist/qlock`.
    pub path: PathBuf,
    /// `musl` or `glibc`.
    pub libc: &'static str,
}

/// Builds the shipped `qlock`: static musl when the target is installed, else static glibc.
///
/// # Errors
/// Cargo's failure, with a hint when a static C library is what is missing.
pub fn build() -> Result<Dist, String> {
    if musl_installed() {
        cargo(&[
            "build",
            "--quiet",
            "--profile",
            "dist",
            "--target",
            MUSL,
            "-p",
            "qlock-cli",
            "--bin",
            "qlock",
        ])?;
        return Ok(Dist { path: crate::target_dir().join(MUSL).join("dist/qlock"), libc: "musl" });
    }
    let args = ["rustc", "--quiet", "--profile", "dist", "-p", "qlock-cli", "--bin", "qlock"];
    cargo(&[&args[..], &["--", "-C", "target-feature=+crt-static"]].concat())?;
    Ok(Dist { path: crate::target_dir().join("dist/qlock"), libc: "glibc" })
}

/// Whether the musl target's standard library is in the toolchain's sysroot.
fn musl_installed() -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|sysroot| sysroot.join("lib/rustlib").join(MUSL).join("lib").is_dir())
}

/// [`crate::cargo_build`], with a hint when a static C library is what is missing.
fn cargo(args: &[&str]) -> Result<(), String> {
    crate::cargo_build(args).map_err(|err| {
        let static_libc = err.contains("-lc") || err.contains("libc.a");
        let hint = if static_libc {
            "\nhint: the static glibc build needs glibc's libc.a: apt-get install libc6-dev"
        } else {
            ""
        };
        format!("building the dist qlock failed: {err}{hint}")
    })
}
