//! A toy backup agent, standing in for any crate built on qlock: it copies a disk image only
//! while no one else may write it, exactly as `qemu-img convert` would. Its tests use nothing
//! but `qlock-testkit` as a dev-dependency.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::Path;

use qlock_core::{Access, ImageLock};

/// Why a backup did not happen.
#[derive(Debug)]
pub enum BackupError {
    /// Someone holds the image in a way that excludes a consistent copy (a running VM).
    Busy(qlock_core::Error),
    /// Reading the image or writing the copy failed.
    Io(io::Error),
}

impl fmt::Display for BackupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackupError::Busy(e) => write!(f, "image busy: {e}"),
            BackupError::Io(e) => write!(f, "backup failed: {e}"),
        }
    }
}

impl std::error::Error for BackupError {}

/// Copies `image` to `dest` under QEMU's "convert source" locks (`100 | 201 203`), so no VM or
/// `qemu-io` can start writing mid-copy; returns the bytes copied.
///
/// # Errors
/// [`BackupError::Busy`] when a writer holds the image, with QEMU's message.
pub fn backup(image: &Path, dest: &Path) -> Result<u64, BackupError> {
    let guard = ImageLock::acquire(image, Access::READ).map_err(BackupError::Busy)?;
    let copied = io::copy(&mut guard.file(), &mut File::create(dest).map_err(BackupError::Io)?)
        .map_err(BackupError::Io)?;
    guard.release().map_err(BackupError::Busy)?;
    Ok(copied)
}
