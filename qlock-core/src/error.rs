//! Typed errors whose `Display` reads like QEMU's own messages, plus what to do about them.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::libc;

use crate::proc::Holder;
use crate::protocol::Check;

/// A `Result` with qlock's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while opening, locking, inspecting or releasing an image.
///
/// The first line of each lock error is the text QEMU prints for the same situation, so
/// `Failed to get "write" lock` means here what it means from `qemu-img`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image does not exist.
    #[error("Could not open '{}': No such file or directory", .path.display())]
    NotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// The path names a directory.
    #[error("Could not open '{}': Is a directory", .path.display())]
    IsADirectory {
        /// The path as given.
        path: PathBuf,
    },
    /// The path names something that is neither a regular file nor a block device.
    #[error("Could not open '{}': it is a {kind}, not a regular file or block device", .path.display())]
    NotAnImage {
        /// The path as given.
        path: PathBuf,
        /// What it is instead (`fifo`, `socket`, `character device`).
        kind: &'static str,
    },
    /// Opening was refused; qlock opens read-only unless asked to write.
    #[error("Could not open '{}': Permission denied", .path.display())]
    PermissionDenied {
        /// The path as given.
        path: PathBuf,
    },
    /// Opening failed for another reason.
    #[error("Could not open '{}': {}", .path.display(), strerror(.source))]
    Open {
        /// The path as given.
        path: PathBuf,
        /// The error from `open(2)`.
        source: io::Error,
    },
    /// Under POSIX locks (no OFD), this process already holds the image through another
    /// `ImageLock`: a second descriptor would be blind to the first's locks and would drop them
    /// when closed, so qlock refuses to open it.
    #[error("Could not open '{}' a second time in this process under POSIX locks", .path.display())]
    PosixSameProcess {
        /// The path as given.
        path: PathBuf,
    },
    /// Another description holds a conflicting lock: the check phase failed, or a write lock
    /// stopped the lock phase. Nothing this call took is left locked.
    #[error("{0}")]
    Conflict(Box<Conflict>),
    /// The filesystem cannot do byte-range locks (`ENOLCK`, `ENOSYS`, `EOPNOTSUPP`, `EINVAL`):
    /// NFS without lockd, FUSE filesystems that fail or lack the lock operation. QEMU fails the
    /// same way, with the same first line; [`Error::hint`] says what to do.
    #[error("{}: {}", failed_call(*.probe, *.byte), strerror(.source))]
    Unsupported {
        /// The path as given.
        path: PathBuf,
        /// The first byte of the lock or probe that failed.
        byte: u64,
        /// True when a probe (`F_OFD_GETLK`, while inspecting an image) failed, false
        /// for a lock (QEMU's `Failed to lock byte N`).
        probe: bool,
        /// The error from `fcntl(2)`.
        source: io::Error,
    },
    /// A lock or probe call failed for another reason (`Failed to lock byte N: ...` or
    /// `Failed to get "name" lock: ...`).
    #[error("{message}: {}", strerror(.source))]
    Lock {
        /// The path as given.
        path: PathBuf,
        /// QEMU's message without the errno part.
        message: String,
        /// The error from `fcntl(2)`.
        source: io::Error,
    },
    /// Releasing a byte failed (seen on NFS). The descriptor is closed anyway.
    #[error("Failed to unlock byte {byte}: {}", strerror(.source))]
    Unlock {
        /// The path as given.
        path: PathBuf,
        /// The first byte of the range that could not be released.
        byte: u64,
        /// The error from `fcntl(2)` or `close(2)`.
        source: io::Error,
    },
    /// A wait ran out of time; `last` is the conflict still in the way.
    #[error("Timed out after {:.1}s waiting for '{}': {last}", .waited.as_secs_f64(), .path.display())]
    TimedOut {
        /// The path as given.
        path: PathBuf,
        /// How long the wait lasted.
        waited: Duration,
        /// The error of the last attempt.
        last: Box<Error>,
    },
    /// A task an async adapter sent to its blocking pool failed (it panicked, or its runtime
    /// shut down). Nothing it took is left locked: a closure owns what it opens, and a guard's
    /// descriptor comes back however the closure ends.
    #[error("qlock: a blocking-pool task failed: {message}")]
    Pool {
        /// What the runtime said about the task.
        message: String,
    },
    /// Reading `/proc` or the image's metadata failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    /// The conflict behind this error, also through a timeout.
    pub fn conflict(&self) -> Option<&Conflict> {
        match self {
            Error::Conflict(c) => Some(c),
            Error::TimedOut { last, .. } => last.conflict(),
            _ => None,
        }
    }

    /// True when another holder is in the way, also through a timeout: exactly when
    /// [`Error::conflict`] is `Some`.
    pub fn is_conflict(&self) -> bool {
        self.conflict().is_some()
    }

    /// What to do about this error, beyond QEMU's message in `Display`; `None` when there is
    /// nothing more to say. Every piece of advice is here, so that `Display` stays the line QEMU
    /// prints. For a filesystem without lock support: why, and the ways out (two lines, no
    /// trailing newline).
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::IsADirectory { .. } => Some("An image is a regular file or a block device.".into()),
            Error::PermissionDenied { .. } => Some(
                "qlock needs read access to lock an image (it opens read-only unless asked to write).".into(),
            ),
            Error::PosixSameProcess { .. } => Some(
                "Closing either descriptor would drop the locks of both, and POSIX locks cannot see \
                 conflicts within one process. Keep one ImageLock per image per process, or use OFD \
                 locks (Linux >= 3.15)."
                    .into(),
            ),
            Error::Unsupported { path, source, .. } => Some(unsupported_hint(path, source)),
            // The check phase of a lock (QEMU's `Failed to get "write" lock: ...`) on the same
            // kind of filesystem keeps QEMU's message.
            Error::Lock { path, source, .. } if is_unsupported(source) => {
                Some(unsupported_hint(path, source))
            }
            Error::TimedOut { last, .. } => last.hint(),
            _ => None,
        }
    }

    /// Classifies an `open(2)` or `stat(2)` error on `path`.
    pub(crate) fn open(path: &Path, source: io::Error) -> Error {
        let path = path.to_path_buf();
        match source.kind() {
            io::ErrorKind::NotFound => Error::NotFound { path },
            io::ErrorKind::PermissionDenied => Error::PermissionDenied { path },
            io::ErrorKind::IsADirectory => Error::IsADirectory { path },
            _ => Error::Open { path, source },
        }
    }
}

/// Whether a lock call's error means the filesystem has no byte-range locks at all:
/// `ENOLCK` (NFS without lockd), `ENOSYS` (a FUSE filesystem without a lock operation that
/// still asked the kernel to forward locks), `EOPNOTSUPP` and `EINVAL` (filesystems that refuse
/// the command).
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL))
}

/// QEMU's words for a failed lock (`Failed to lock byte 100`), or ours for a failed probe.
fn failed_call(probe: bool, byte: u64) -> String {
    if probe { "Failed to probe byte-range locks".to_string() } else { format!("Failed to lock byte {byte}") }
}

fn unsupported_hint(path: &Path, source: &io::Error) -> String {
    let why = match source.raw_os_error() {
        Some(libc::ENOSYS) => "it does not implement locks",
        Some(libc::ENOLCK) => "it has no lock service",
        _ => "it refuses the lock call",
    };
    format!(
        "The filesystem holding '{}' cannot lock ({why}): neither QEMU nor qlock can coordinate \
         access to the image or see who uses it.\n\
         Move the image to a local filesystem, or mount it with lock support (NFS: run \
         rpc.statd, do not mount with 'nolock'; FUSE: a filesystem whose lock operation works, \
         or that leaves locks to the kernel). Only if nothing else opens the image, use \
         --locking off (QEMU: file.locking=off).",
        path.display()
    )
}

/// The C library's text for an OS error, as QEMU prints it (`No locks available`), without
/// Rust's ` (os error 37)` suffix.
pub fn strerror(e: &io::Error) -> String {
    // std formats OS errors with the C library's strerror_r, the text QEMU prints.
    let text = e.to_string();
    match e.raw_os_error() {
        Some(n) => text.strip_suffix(&format!(" (os error {n})")).unwrap_or(&text).to_string(),
        None => text,
    }
}

/// Why an access cannot be had now: QEMU's message, the byte, and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The image path as the caller gave it (QEMU prints it the same way in the hint).
    pub path: PathBuf,
    /// What failed.
    pub reason: ConflictReason,
    /// Processes found holding the contested byte (empty when none could be identified:
    /// another user's processes, another host over NFS, or lookup skipped).
    pub holders: Vec<Holder>,
}

/// The two ways QEMU's protocol refuses an opener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictReason {
    /// The check phase found someone holding the opposite byte of `Check`.
    Check(Check),
    /// Someone holds a *write* lock on this byte, so the lock phase could not read-lock it
    /// (`Failed to lock byte N`, with no hint, as QEMU prints it).
    WriteLocked(u64),
}

impl Conflict {
    /// The byte someone else holds.
    pub fn byte(&self) -> u64 {
        match self.reason {
            ConflictReason::Check(c) => c.byte(),
            ConflictReason::WriteLocked(b) => b,
        }
    }

    /// QEMU's message, without the hint: `Failed to get "write" lock`.
    pub fn qemu_message(&self) -> String {
        match self.reason {
            ConflictReason::Check(c) => c.message(),
            ConflictReason::WriteLocked(b) => format!("Failed to lock byte {b}"),
        }
    }
}

impl fmt::Display for Conflict {
    /// QEMU's message and hint on two lines, then one line per known holder.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.qemu_message())?;
        if let ConflictReason::Check(_) = self.reason {
            write!(f, "\nIs another process using the image [{}]?", self.path.display())?;
        }
        for h in &self.holders {
            write!(f, "\nHeld by {h}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perm::Perm;
    use crate::protocol::Check;

    fn conflict() -> Error {
        let reason = ConflictReason::Check(Check { perm: Perm::WRITE, shared: true });
        Error::Conflict(Box::new(Conflict { path: "vm.qcow2".into(), reason, holders: Vec::new() }))
    }

    #[test]
    fn a_timed_out_conflict_is_a_conflict_by_both_questions() {
        let timed_out =
            Error::TimedOut { path: "vm.qcow2".into(), waited: Duration::ZERO, last: Box::new(conflict()) };
        assert!(timed_out.is_conflict());
        assert_eq!(timed_out.conflict().map(Conflict::byte), Some(101));
        let other = Error::NotFound { path: "vm.qcow2".into() };
        assert_eq!((other.is_conflict(), other.conflict().is_some()), (false, false));
    }

    #[test]
    fn display_is_qemus_line_and_the_advice_is_in_the_hint() {
        let path = PathBuf::from("vm.qcow2");
        let cases = [
            (
                Error::PermissionDenied { path: path.clone() },
                "Could not open 'vm.qcow2': Permission denied",
                "read access",
            ),
            (
                Error::IsADirectory { path: path.clone() },
                "Could not open 'vm.qcow2': Is a directory",
                "regular file",
            ),
            (
                Error::PosixSameProcess { path },
                "Could not open 'vm.qcow2' a second time in this process under POSIX locks",
                "one ImageLock per image",
            ),
        ];
        for (err, display, advice) in cases {
            assert_eq!(err.to_string(), display);
            assert!(err.hint().is_some_and(|h| h.contains(advice)), "{:?}", err.hint());
        }
    }
}
