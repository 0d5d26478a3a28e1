//! `qlock`: take, respect and inspect QEMU's disk-image locks from the shell.
//!
//! ```text
//! qlock status IMAGE...                     who holds what, and which accesses are free
//! qlock check IMAGE --access PRESET         exit 0 if free now, 1 on conflict, 2 on error
//! qlock run IMAGE... --access PRESET -- CMD hold the locks while CMD runs (like flock(1))
//! qlock wait IMAGE --access PRESET          return once the access could be taken
//! ```

mod cli;
mod hold;
mod run;
mod status;

use std::process::ExitCode;

use clap::Parser;

/// Exit status for a conflict with another holder (or a wait that timed out).
const EXIT_CONFLICT: u8 = 1;
/// Exit status for any other error.
const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match args.command {
        cli::Command::Status(a) => status::main(&a),
        cli::Command::Check(a) => hold::check(&a),
        cli::Command::Wait(a) => hold::wait(&a),
        cli::Command::Run(a) => run::main(&a),
    }
}

/// Prints an error the way QEMU's tools do (`qlock: PATH: message`) and picks the exit code.
fn report(err: &qlock_core::Error) -> ExitCode {
    let text = err.to_string();
    let path = match err {
        qlock_core::Error::Conflict(c) => Some(c.path.display().to_string()),
        qlock_core::Error::TimedOut { .. } => None,
        qlock_core::Error::Unsupported { path, .. }
        | qlock_core::Error::Lock { path, .. }
        | qlock_core::Error::Unlock { path, .. } => Some(path.display().to_string()),
        _ => None,
    };
    match path {
        Some(p) => eprintln!("qlock: {p}: {text}"),
        None => eprintln!("qlock: {text}"),
    }
    print_hint(err);
    let conflict = err.is_conflict() || matches!(err, qlock_core::Error::TimedOut { .. });
    ExitCode::from(if conflict { EXIT_CONFLICT } else { EXIT_ERROR })
}

/// Prints what to do about `err`, if the library knows, on the lines after its message.
fn print_hint(err: &qlock_core::Error) {
    for line in err.hint().iter().flat_map(|h| h.lines()) {
        eprintln!("hint: {line}");
    }
}
