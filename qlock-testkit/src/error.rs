//! Why a holder could not be spawned, changed or stopped.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use crate::front_end::{Format, FrontEnd};
use crate::raw::RawLock;

/// A `Result` with the testkit's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with a holder.
///
/// A refusal by the locking protocol is [`Error::Refused`], whose text is QEMU's own
/// (`Failed to get "write" lock` and the hint). [`Error::is_skip`] tells a test to skip rather
/// than fail: the real QEMU it asked for is not installed, or cannot hold locks at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The front end has no meaning on this format (the spec's table says n/a).
    #[error("{front_end} does not apply to a {format} image")]
    NotApplicable {
        /// The front end asked for.
        front_end: FrontEnd,
        /// The image format.
        format: Format,
    },
    /// The builder was given nothing to hold, or a lock set fcntl cannot express.
    #[error("invalid holder request: {0}")]
    Invalid(String),
    /// The holder could not open the image.
    #[error("holder could not open '{}': {}", .path.display(), qlock_core::strerror(.source))]
    Open {
        /// The image.
        path: PathBuf,
        /// The error from `open(2)` in the holder.
        source: io::Error,
    },
    /// The locking protocol refused the access, as QEMU would: a conflict found by the check
    /// phase, or a write lock in the way of the lock phase (also after a timeout). Nothing of
    /// the attempt stays held. Only refusals: [`qlock_core::Error::is_conflict`] holds.
    #[error(transparent)]
    Refused(qlock_core::Error),
    /// qlock failed for another reason than a refusal (the filesystem cannot lock, a lock call
    /// failed): the error as qlock reports it.
    #[error(transparent)]
    Lock(qlock_core::Error),
    /// A chain holder ([`HolderBuilder::chain`](crate::HolderBuilder::chain)) could not
    /// discover the graph, or a node refused: QEMU's message with its prefix, naming the node.
    #[error(transparent)]
    Chain(#[from] qlock_core::graph::ChainError),
    /// A lock of a raw set could not be taken (someone holds a conflicting lock, or the
    /// descriptor is read-only for a write lock). Nothing of the attempt stays held.
    #[error("Failed to lock {lock}: {}", qlock_core::strerror(.source))]
    RawLock {
        /// The lock that failed.
        lock: RawLock,
        /// The error from `fcntl(2)` in the holder.
        source: io::Error,
    },
    /// A real QEMU front end refused to start; `message` is what it printed on stderr.
    #[error("{program} failed: {message}")]
    Qemu {
        /// The program run.
        program: String,
        /// Its exit status.
        status: Option<ExitStatus>,
        /// Its standard error, trimmed.
        message: String,
    },
    /// The real QEMU binary for this front end is not installed: skip the test.
    #[error("{program} not found in {searched}: skipping the real-QEMU case")]
    Unavailable {
        /// The binary looked for.
        program: String,
        /// Where it was looked for (a directory, or `PATH`).
        searched: String,
    },
    /// No real process holds this front end's locks for longer than an instant (`qemu-img`
    /// subcommands exit when done): skip the real-QEMU case, or use the fake.
    #[error("{0} exits as soon as it is done, so no real process can hold its locks")]
    NotAHolder(FrontEnd),
    /// No real QEMU process available here holds what this front end holds on this format:
    /// skip the real-QEMU case, or use the fake.
    #[error("no real stand-in for {front_end} on {format}: {why}")]
    NoRealEquivalent {
        /// The front end asked for.
        front_end: FrontEnd,
        /// The image format.
        format: Format,
        /// Why not.
        why: &'static str,
    },
    /// The operation exists only for fake holders (a real QEMU cannot be given a lock set).
    #[error("{0} is not possible on a real QEMU holder")]
    Unsupported(&'static str),
    /// This machine cannot have the GlusterFS test bed (not root, no FUSE, no network
    /// namespaces, GlusterFS not installed): skip the test.
    #[error("no GlusterFS test bed here: {0}")]
    NoTestBed(String),
    /// The holder process died or stopped answering.
    #[error("holder pid {pid} is gone{}", .status.map(|s| format!(" ({s})")).unwrap_or_default())]
    Gone {
        /// Its pid.
        pid: u32,
        /// Its exit status, when it could be reaped.
        status: Option<ExitStatus>,
    },
    /// A system call in the test process failed (socket, fork, wait, reading QEMU's output).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

impl From<qlock_core::Error> for Error {
    /// A refusal by the protocol becomes [`Error::Refused`], anything else [`Error::Lock`].
    fn from(e: qlock_core::Error) -> Error {
        if e.is_conflict() { Error::Refused(e) } else { Error::Lock(e) }
    }
}

impl Error {
    /// True when a test should be skipped, not failed: the real QEMU asked for is absent or
    /// cannot hold locks.
    pub fn is_skip(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. }
                | Error::NotAHolder(_)
                | Error::NoRealEquivalent { .. }
                | Error::NoTestBed(_)
        )
    }

    /// QEMU's one-line message for a protocol refusal (`Failed to get "write" lock`), whether
    /// it came from a fake or a real holder; `None` for other errors.
    pub fn qemu_message(&self) -> Option<String> {
        match self {
            Error::Refused(e) => e.conflict().map(|c| c.qemu_message()),
            Error::Chain(e) => e.conflict().map(|c| c.qemu_message()),
            Error::Qemu { message, .. } => {
                let line = message.lines().next()?;
                let at = line.find("Failed to ")?;
                Some(line[at..].to_string())
            }
            _ => None,
        }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}
