//! `qlock`: take, respect and inspect QEMU's disk-image locks from the shell.
//!
//! ```text
//! qlock status IMAGE...                     who holds what, and which accesses are free
//! qlock check IMAGE --access PRESET         exit 0 if free now, 1 on conflict, 2 on error
//! qlock run IMAGE... --access PRESET -- CMD hold the locks while CMD runs (like flock(1))
//! qlock wait IMAGE --access PRESET          return once the access could be taken
//! qlock check IMAGE --op NAME [-U]          would `qemu-img NAME IMAGE` get past locking?
//! qlock doctor IMAGE...                     what the storage can promise: fs, mount, lock scope
//! ```
//!
//! `--strict` (check, wait, run) also refuses an unlocked writer ([`strict`]).
//!
//! `--chain` (run, check, wait, status) takes or shows each image's whole graph ([`chain`]).
//!
//! The shape is ripgrep's: `main` parses the command line once ([`cli`]), [`try_main`] runs a
//! subcommand to an [`Outcome`] or a [`Failure`], and [`exit`] alone prints the failure and
//! picks the exit status.
//!
//! Output is written as a careful Unix tool writes it: a full disk (or any write error) is an
//! error (one line on stderr, exit 2); a reader that went away (`| head`) ends qlock quietly,
//! killed by SIGPIPE as `cat` would be, unless qlock was started with SIGPIPE ignored, in which
//! case it is a write error like any other.

mod chain;
mod cli;
mod doctor;
mod hold;
mod images;
mod report;
mod run;
mod status;
mod strict;
mod sys;

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};

use clap::Parser;
use nix::sys::signal::Signal;
use qlock_core::Error;
use qlock_core::strerror;

/// Exit status for a conflict with another holder (or a wait that timed out).
pub(crate) const EXIT_CONFLICT: u8 = 1;
/// Exit status for any other error.
pub(crate) const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // Usage errors exit 2, --help and --version 0; a closed stdout is no reason to panic.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_ERROR));
        }
    };
    let log = tracing_subscriber::fmt().with_writer(io::stderr).with_target(false).without_time();
    // An env filter is parsed (its directives can hold regexes) only when asked for: a plain
    // level is the same filter for the default, and `qlock check` pays for process start-up
    // alone (see benches/cli.rs).
    match std::env::var_os("QLOCK_LOG") {
        Some(_) => log
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("QLOCK_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .init(),
        None => log.with_max_level(tracing::Level::WARN).init(),
    }
    exit(try_main(args))
}

/// How a subcommand ended without a failure of its own.
pub(crate) enum Outcome {
    /// Exit 0.
    Success,
    /// Some images could not be inspected; each was reported where it appeared. Exit 2.
    SomeFailed,
    /// `run`'s command ended so: qlock exits with its code, or 128 + its signal.
    Command(ExitStatus),
}

/// Why a subcommand failed; [`exit`] reports it.
pub(crate) enum Failure {
    /// Opening or locking an image failed. A conflict (or a wait that timed out on one) exits
    /// with `conflict`, anything else with 2.
    Lock { error: Error, conflict: u8 },
    /// Standard output could not be written.
    Output(io::Error),
    /// `run`'s command could not be started: 127 when it was not found, else 126 (the
    /// shell's codes).
    Spawn { program: OsString, error: io::Error },
    /// Anything else, already phrased: exit 2.
    Other(String),
    /// Already phrased, with its exit status and advice (the chain's and `check --op`'s
    /// refusals).
    Said { text: String, hint: Option<String>, code: u8 },
}

impl Failure {
    /// A lock error of `check` or `wait`: a conflict exits 1.
    pub(crate) fn lock(error: Error) -> Failure {
        Failure::Lock { error, conflict: EXIT_CONFLICT }
    }
}

/// Runs the subcommand; its output goes to stdout, flushed before the outcome counts.
fn try_main(args: cli::Cli) -> Result<Outcome, Failure> {
    let mut out = io::stdout().lock();
    let outcome = match args.command {
        cli::Command::Status(a) if a.chain => chain::status(&a, &mut out)?,
        cli::Command::Status(a) => status::main(&a, &mut out)?,
        cli::Command::Check(a) => match a.op {
            Some(op) => chain::check_op(&a, op, &mut out)?,
            None => hold::check(&a.hold, &mut out)?,
        },
        cli::Command::Wait(a) => hold::wait(&a)?,
        cli::Command::Run(a) => run::main(&a)?,
        cli::Command::Doctor(a) => doctor::main(&a, &mut out)?,
    };
    out.flush().map_err(Failure::Output)?;
    Ok(outcome)
}

/// The one place that turns an outcome into an exit status, printing failures on stderr.
fn exit(result: Result<Outcome, Failure>) -> ExitCode {
    let code = match result {
        Ok(Outcome::Success) => 0,
        Ok(Outcome::SomeFailed) => EXIT_ERROR,
        Ok(Outcome::Command(status)) => match (status.code(), status.signal()) {
            (Some(code), _) => u8::try_from(code).unwrap_or(EXIT_ERROR),
            (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(EXIT_ERROR),
            (None, None) => EXIT_ERROR,
        },
        Err(Failure::Lock { error, conflict }) => {
            say(&message(&error));
            print_hint(error.hint());
            if error.is_conflict() { conflict } else { EXIT_ERROR }
        }
        Err(Failure::Output(e)) => {
            if e.kind() == io::ErrorKind::BrokenPipe && !sys::started_ignoring(Signal::SIGPIPE) {
                sys::die_of_sigpipe();
            }
            say(&format!("cannot write output: {}", strerror(&e)));
            EXIT_ERROR
        }
        Err(Failure::Spawn { program, error }) => {
            say(&format!("cannot run '{}': {}", program.to_string_lossy(), strerror(&error)));
            if error.kind() == io::ErrorKind::NotFound { 127 } else { 126 }
        }
        Err(Failure::Other(text)) => {
            say(&text);
            EXIT_ERROR
        }
        Err(Failure::Said { text, hint, code }) => {
            say(&text);
            print_hint(hint);
            code
        }
    };
    ExitCode::from(code)
}

/// An error as QEMU's tools print it: `PATH: message`, with the path once. Messages that
/// already name the path (`Could not open 'PATH': ...`, timeouts) are left as they are.
pub(crate) fn message(err: &Error) -> String {
    let path = match err {
        Error::Conflict(c) => Some(&c.path),
        Error::Unsupported { path, .. } | Error::Lock { path, .. } | Error::Unlock { path, .. } => Some(path),
        _ => None,
    };
    match path {
        Some(p) => format!("{}: {err}", p.display()),
        None => err.to_string(),
    }
}

/// One message on stderr, `qlock: ` first. A stderr that cannot be written loses it: there is
/// nowhere left to complain.
pub(crate) fn say(text: &str) {
    let _ = writeln!(io::stderr().lock(), "qlock: {text}");
}

/// Prints what to do about `err`, if the library knows, on the lines after its message.
pub(crate) fn print_hint(hint: Option<String>) {
    let mut stderr = io::stderr().lock();
    for line in hint.iter().flat_map(|h| h.lines()) {
        let _ = writeln!(stderr, "hint: {line}");
    }
}

/// Releases every image; an unlock error is reported but changes nothing else.
pub(crate) fn release_all_quietly(locks: Vec<qlock_core::ImageLock>) {
    for lock in locks {
        if let Err(e) = lock.release() {
            say(&format!("warning: {}", message(&e)));
        }
    }
}
