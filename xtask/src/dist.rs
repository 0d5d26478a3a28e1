//! `cargo xtask dist`: the `qlock` binary as shipped, in `target/dist/qlock`.
//!
//! A `qlock check` is one short process, so most of what a caller pays is starting it: with
//! glibc's dynamic loader, mapping and relocating `libc` and `libgcc_s` costs a Rust binary
//! about as much again as everything qlock does after `main` (measured on the project's VM:
//! `qlock check` 1.43 ms dynamically linked, 0.98 ms static, `/bin/true` 0.83 ms, `qemu-img
//! info` 4.2 ms, each the median of 60 spawns). So the shipped binary is a static PIE
//! (`-C target-feature=+crt-static`, glibc's `libc.a` from `libc6-dev`, which every Rust
//! toolchain on Linux needs anyway), built with the `dist` profile (LTO, one codegen unit,
//! `panic = "abort"`, stripped: about 2 MB, and fewer pages touched at start-up).
//!
//! Why not `.cargo/config.toml`: `crt-static` given to every crate breaks the proc-macro
//! crates (clap's and serde's derives cannot be built static), and `--target` would move every
//! build's output; `cargo rustc` passes the flag to the binary alone, and std and the `libc`
//! crate pick their static libraries at that link. qlock calls nothing from glibc that loads
//! modules at run time (no NSS lookups, no `dlopen`, no `iconv`), so a static glibc is safe.
//! `cargo install --locked --path qlock-cli` still works and gives the dynamic binary.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Builds the shipped `qlock` and returns its path (`target/dist/qlock`).
///
/// # Errors
/// Cargo's failure, with a hint when glibc's static library is what is missing.
pub fn build() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["rustc", "--quiet", "--profile", "dist", "-p", "qlock-cli", "--bin", "qlock"])
        .args(["--", "-C", "target-feature=+crt-static"])
        .current_dir(crate::workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo to build the dist qlock: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let hint = if err.contains("-lc") || err.contains("libc.a") {
            "\nhint: the static build needs glibc's libc.a: apt-get install libc6-dev"
        } else {
            ""
        };
        return Err(format!("building the dist qlock failed:\n{err}{hint}"));
    }
    Ok(crate::target_dir().join("dist/qlock"))
}
