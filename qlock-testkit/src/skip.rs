//! One way for a test to skip when the machine lacks a tool (QEMU, FUSE, root...), and to
//! fail instead under `CI=true`, where every tool is installed on purpose: a CI run that
//! skipped its QEMU tests would be green for nothing.
//!
//! ```
//! fn needs_qemu() {
//!     qlock_testkit::require!("qemu-io", "qemu-img"); // returns from the test when missing
//!     // ... run QEMU ...
//! }
//! # needs_qemu();
//! ```

use std::fmt::Display;
use std::path::Path;

/// True under `CI=true`: a missing tool is then a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Says why a test skips: prints `SKIPPED: why` outside CI.
///
/// # Panics
/// Under `CI=true`, with `why`: CI must not go green without running the test.
pub fn skip(why: impl Display) {
    assert!(!in_ci(), "required under CI=true: {why}");
    eprintln!("SKIPPED: {why}");
}

/// Whether `program` is on `PATH` (or, given a path, exists); when it is not, [`skip`]s:
/// prints why outside CI, panics under `CI=true`.
///
/// # Panics
/// Under `CI=true` when `program` is missing.
pub fn require(program: &str) -> bool {
    let found = if program.contains('/') {
        Path::new(program).is_file()
    } else {
        crate::real::find_program(program, None).is_ok()
    };
    if !found {
        skip(format_args!("{program} is not installed (apt-get install qemu-utils)"));
    }
    found
}

/// [`require`] for each of `programs`; true when all are there.
pub fn require_all(programs: &[&str]) -> bool {
    // Not `all`: every missing program is named, not only the first.
    programs.iter().filter(|p| !require(p)).count() == 0
}

/// Returns from the calling test (with `Default::default()`, so `()` or `None`) unless every
/// program named is installed; see [`require`]. Under `CI=true` a missing one fails the test.
#[macro_export]
macro_rules! require {
    ($($program:expr),+ $(,)?) => {
        if !$crate::require_all(&[$($program),+]) {
            return ::core::default::Default::default();
        }
    };
}
