//! `cargo xtask ci`: every step CI runs, in CI's order. If it passes locally, CI is green.

/// The cargo steps, before `compat`.
pub const STEPS: &[(&str, &[&str])] = &[
    ("fmt", &["fmt", "--all", "--check"]),
    ("clippy", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
    ("test", &["test", "--workspace"]),
    ("doc", &["doc", "--workspace", "--no-deps", "--quiet"]),
];

/// Runs the cargo steps not named in `skip`, stopping at the first failure. `compat` is run by
/// the caller.
///
/// # Errors
/// The name of the failing step.
pub fn run_cargo_steps(skip: &[String]) -> Result<(), String> {
    for (name, args) in STEPS.iter().filter(|(name, _)| !skip.iter().any(|s| s == name)) {
        println!("ci: cargo {}", args.join(" "));
        let mut cmd = crate::cargo();
        cmd.args(*args);
        if *name == "doc" {
            cmd.env("RUSTDOCFLAGS", "-D warnings");
        }
        let status = cmd.status().map_err(|e| format!("{name}: {e}"))?;
        if !status.success() {
            return Err(format!("ci: step {name} failed ({status})"));
        }
    }
    Ok(())
}
