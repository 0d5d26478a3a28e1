//! `cargo xtask bench`: runs `cargo bench --workspace` and prints one table of the ratios.
//!
//! # The ratio line
//! Benchmarks are `harness = false` binaries that measure qlock against a baseline measured in
//! the same run and print one line per goal on stdout:
//!
//! ```text
//! ratio <name>: <x.xx>x (goal <= <y>)
//! ```
//!
//! `<name>` is free text without `: `; `<x.xx>` is qlock's cost divided by the baseline's;
//! `<y>` is the largest acceptable ratio. Everything else a bench prints is passed through.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// One parsed ratio line.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    /// What was measured.
    pub name: String,
    /// Measured ratio.
    pub ratio: f64,
    /// The goal: the ratio must not exceed it.
    pub goal: f64,
}

impl Ratio {
    /// Parses `ratio <name>: <x.xx>x (goal <= <y>)`; other lines give `None`.
    ///
    /// ```
    /// let r = xtask::bench::Ratio::parse("ratio acquire write: 1.25x (goal <= 2)").unwrap();
    /// assert_eq!((r.name.as_str(), r.ratio, r.goal), ("acquire write", 1.25, 2.0));
    /// assert!(r.met());
    /// assert!(xtask::bench::Ratio::parse("acquire: 3 ns").is_none());
    /// ```
    pub fn parse(line: &str) -> Option<Ratio> {
        let rest = line.trim().strip_prefix("ratio ")?;
        let (name, rest) = rest.rsplit_once(": ")?;
        let (ratio, rest) = rest.split_once("x (goal <= ")?;
        let goal = rest.strip_suffix(')')?;
        Some(Ratio {
            name: name.trim().to_string(),
            ratio: ratio.trim().parse().ok()?,
            goal: goal.trim().parse().ok()?,
        })
    }

    /// Whether the goal is met.
    pub fn met(&self) -> bool {
        self.ratio <= self.goal
    }
}

/// The table printed after the benches.
pub fn table(ratios: &[Ratio]) -> String {
    let width = ratios.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    let mut out = format!("{:width$}  {:>8}  {:>8}  status\n", "name", "ratio", "goal");
    for r in ratios {
        let status = if r.met() { "ok" } else { "OVER GOAL" };
        out.push_str(&format!(
            "{:width$}  {:>7.2}x  {:>7}  {status}\n",
            r.name,
            r.ratio,
            format!("<= {}", r.goal)
        ));
    }
    out
}

/// Runs the benches, passing their output through, and prints the table.
///
/// # Errors
/// When `cargo bench` fails, or with `strict` when a goal is missed.
pub fn run(extra: &[String], strict: bool) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(["bench", "--workspace"])
        .args(extra)
        .current_dir(crate::workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cargo bench: {e}"))?;
    let mut ratios = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            ratios.extend(Ratio::parse(&line));
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    println!("\n{}", table(&ratios));
    if !status.success() {
        return Err(format!("cargo bench failed: {status}"));
    }
    if ratios.is_empty() {
        println!("no ratio lines printed (see the format in `cargo doc -p xtask`, module bench)");
    }
    let over = ratios.iter().filter(|r| !r.met()).count();
    if strict && over > 0 { Err(format!("{over} goal(s) missed")) } else { Ok(()) }
}
