//! `cargo xtask bench`: runs the workspace's bench targets (`cargo bench --workspace --bench
//! '*'`, so no unit test runs in bench mode) and prints one table of every goal. It builds the
//! shipped `qlock` first ([`crate::dist`]) and names it to the benches in `QLOCK_DIST_BIN`.
//!
//! # The goal lines
//! Benchmarks are `harness = false` binaries that print one line per goal on stdout, in one of
//! two shapes:
//!
//! ```text
//! ratio <name>: <x.xx>x (goal <= <y>)
//! goal <name>: <value> <unit> (goal <= <y>)
//! ```
//!
//! A `ratio` line compares qlock with a baseline measured in the same run: `<x.xx>` is qlock's
//! cost divided by the baseline's. A `goal` line states an absolute measure, such as a count or
//! a latency, in `<unit>` (one word: `ms`, `calls`). `<name>` is free text without `: `, unique
//! within the run; the comparison is `<=` or `<`. Everything else a bench prints is passed
//! through, but a line that mentions a goal in any other shape is reported as unparsed, so a
//! goal cannot silently drop out of the table.
//!
//! # A loaded machine
//!
//! The table starts and ends with the machine's load average (`/proc/loadavg`), so a reader can
//! tell a noisy run from a slow change. `--loaded` runs the benches while two busy-loop
//! processes (`sh -c 'while :; do :; done'`, started after the build and killed at the end)
//! compete for the cores: the ratios are meant to hold there too, because each compares
//! variants measured in interleaved rounds of the same run, so the load hits qlock and its
//! baseline alike. What does not cancel out is scheduling latency: a task woken on a loaded
//! core waits for the spinner's time slice (up to a few ms with CFS), so absolute latencies
//! (the `goal ... ms` lines) grow under load, and ratios whose two sides wait for wake-ups a
//! different number of times (a pool hop against none) pick up that difference.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// How a measure is held against its goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `<=`
    AtMost,
    /// `<`
    Below,
}

impl fmt::Display for Cmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cmp::AtMost => "<=",
            Cmp::Below => "<",
        })
    }
}

/// One parsed goal line.
#[derive(Debug, Clone, PartialEq)]
pub struct Goal {
    /// What was measured.
    pub name: String,
    /// The measure as printed (`1.25`), kept for the table.
    pub shown: String,
    /// The measure.
    pub value: f64,
    /// `x` for a ratio, else the unit of a `goal` line.
    pub unit: String,
    /// The comparison.
    pub cmp: Cmp,
    /// The bound the measure is held to.
    pub goal: f64,
}

impl Goal {
    /// Parses either goal line shape; other lines give `None`.
    ///
    /// ```
    /// use xtask::bench::Goal;
    ///
    /// let r = Goal::parse("ratio acquire write: 1.25x (goal <= 2)").unwrap();
    /// assert_eq!((r.name.as_str(), r.value, r.unit.as_str(), r.goal), ("acquire write", 1.25, "x", 2.0));
    /// assert!(r.met());
    /// let g = Goal::parse("goal latency p50: 2.0 ms (goal < 2)").unwrap();
    /// assert_eq!((g.value, g.unit.as_str()), (2.0, "ms"));
    /// assert!(!g.met());
    /// assert!(Goal::parse("acquire: 3 ns").is_none());
    /// ```
    pub fn parse(line: &str) -> Option<Goal> {
        let line = line.trim();
        let (ratio, rest) = match (line.strip_prefix("ratio "), line.strip_prefix("goal ")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return None,
        };
        let (name, rest) = rest.rsplit_once(": ")?;
        let (measure, rest) = rest.split_once(" (goal ")?;
        let bound = rest.strip_suffix(')')?;
        let (cmp, bound) = match bound.strip_prefix("<= ") {
            Some(b) => (Cmp::AtMost, b),
            None => (Cmp::Below, bound.strip_prefix("< ")?),
        };
        let (shown, unit) =
            if ratio { (measure.strip_suffix('x')?, "x") } else { measure.split_once(' ')? };
        if name.trim().is_empty() || unit.is_empty() || unit.contains(char::is_whitespace) {
            return None;
        }
        Some(Goal {
            name: name.trim().to_string(),
            shown: shown.to_string(),
            value: shown.parse().ok()?,
            unit: unit.to_string(),
            cmp,
            goal: bound.trim().parse().ok()?,
        })
    }

    /// Whether the goal is met.
    pub fn met(&self) -> bool {
        match self.cmp {
            Cmp::AtMost => self.value <= self.goal,
            Cmp::Below => self.value < self.goal,
        }
    }
}

/// A line that mentions a goal but is in neither shape: a bench whose goal would be lost.
/// libtest's own `test NAME ... ok` lines are not bench output.
pub fn is_unparsed_goal(line: &str) -> bool {
    let libtest = line.starts_with("test ") && line.contains(" ... ");
    line.contains("goal") && !libtest && Goal::parse(line).is_none()
}

/// The table printed after the benches.
pub fn table(goals: &[Goal]) -> String {
    let width = goals.iter().map(|g| g.name.len()).max().unwrap_or(4).max(4);
    let value = |g: &Goal| {
        if g.unit == "x" { format!("{}x", g.shown) } else { format!("{} {}", g.shown, g.unit) }
    };
    let vw = goals.iter().map(|g| value(g).len()).max().unwrap_or(5).max(5);
    let mut out = format!("{:width$}  {:>vw$}  {:<10}  status\n", "name", "value", "goal");
    for g in goals {
        let status = if g.met() { "ok" } else { "MISSED" };
        let bound = format!("{} {}", g.cmp, g.goal);
        out.push_str(&format!("{:width$}  {:>vw$}  {bound:<10}  {status}\n", g.name, value(g)));
    }
    out
}

/// Runs the benches, passing their output through, and prints the table.
///
/// # Errors
/// When `cargo bench` fails, or with `strict` when a goal is missed or a goal line does not
/// parse.
pub fn run(extra: &[String], strict: bool, loaded: bool) -> Result<(), String> {
    // The CLI bench measures the binary as shipped (see `dist`).
    let dist = crate::dist::build()?;
    let bench = || {
        let mut c = crate::cargo();
        c.args(["bench", "--workspace", "--bench", "*"]).args(extra);
        c.env("QLOCK_DIST_BIN", &dist.path).env("QLOCK_DIST_LIBC", dist.libc);
        c
    };
    let mut spinners = Vec::new();
    if loaded {
        // Build first, so the spinners load the benches and not the compiler.
        let built = bench().arg("--no-run").status().map_err(|e| format!("cargo bench: {e}"))?;
        if !built.success() {
            return Err(format!("cargo bench --no-run failed: {built}"));
        }
        for _ in 0..2 {
            let spin = Command::new("sh").args(["-c", "while :; do :; done"]).spawn();
            spinners.push(spin.map_err(|e| format!("busy loop: {e}"))?);
        }
    }
    let load_start = loadavg();
    let result = measure(bench(), strict, loaded, &load_start);
    for mut s in spinners {
        let _ = s.kill();
        let _ = s.wait();
    }
    result
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` prints them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn measure(mut bench: Command, strict: bool, loaded: bool, load_start: &str) -> Result<(), String> {
    let mut child = bench.stdout(Stdio::piped()).spawn().map_err(|e| format!("cargo bench: {e}"))?;
    let mut goals = Vec::new();
    let mut unparsed = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            match Goal::parse(&line) {
                Some(g) => goals.push(g),
                None if is_unparsed_goal(&line) => unparsed.push(line),
                None => {}
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let spin = if loaded { ", with two busy loops running" } else { "" };
    println!("\nload average (1 5 15 min): {load_start} at start, {} at end{spin}", loadavg());
    println!("{}", table(&goals));
    for line in &unparsed {
        println!("UNPARSED goal line (see `cargo doc -p xtask`, module bench): {line}");
    }
    if !status.success() {
        return Err(format!("cargo bench failed: {status}"));
    }
    if goals.is_empty() {
        println!("no goal lines printed (see the format in `cargo doc -p xtask`, module bench)");
    }
    let missed = goals.iter().filter(|g| !g.met()).count();
    if strict && missed + unparsed.len() > 0 {
        Err(format!("{missed} goal(s) missed, {} goal line(s) unparsed", unparsed.len()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_parse_and_others_are_flagged() {
        let g = Goal::parse("goal fcntl calls (tmpfs): 5 calls (goal <= 8)").unwrap();
        assert_eq!((g.name.as_str(), g.value, g.cmp, g.goal), ("fcntl calls (tmpfs)", 5.0, Cmp::AtMost, 8.0));
        assert!(g.met());
        let r = Goal::parse("ratio async / (sync + 1 hop): 1.151x (goal <= 1.15)").unwrap();
        assert!(!r.met());
        assert_eq!(r.shown, "1.151");
        assert!(Goal::parse("goal p50: 1.9 ms (goal < 2)").unwrap().met());
        // The shapes the benches used to print: their goals would be lost, so they are flagged.
        for old in [
            "fcntl calls: 5 (qemu 15, goal <= 8)",
            "ratio async / (sync + 1 hop) = 0.864  (goal <= 1.15)",
            "inspect 1000 images / 500 holders: 43.1 ms (goal <= 50); per-image ...",
            "goal latency: 3 (goal < 2)",
            "ratio x: 1.2 (goal <= 2)",
        ] {
            assert!(Goal::parse(old).is_none(), "{old}");
            assert!(is_unparsed_goal(old), "{old}");
        }
        assert!(!is_unparsed_goal("sync core  1.20 us"));
        assert!(!is_unparsed_goal("test bench::tests::goal_lines ... ignored"));
    }

    #[test]
    fn the_table_says_which_goals_were_missed() {
        let goals: Vec<Goal> = ["ratio a: 0.50x (goal <= 1)", "goal b: 3.0 ms (goal < 2)"]
            .iter()
            .filter_map(|l| Goal::parse(l))
            .collect();
        let t = table(&goals);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[1].starts_with("a ") && lines[1].contains("0.50x") && lines[1].ends_with("ok"), "{t}");
        assert!(
            lines[2].contains("3.0 ms") && lines[2].contains("< 2") && lines[2].ends_with("MISSED"),
            "{t}"
        );
    }
}
