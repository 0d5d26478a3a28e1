//! The images this process holds through POSIX locks, which POSIX makes fragile.
//!
//! A POSIX lock belongs to the process, not to the descriptor: when the process closes *any*
//! descriptor of the file, all its locks on the file go, and `F_GETLK` does not report the
//! process's own locks. Two [`crate::ImageLock`]s on one image in one process would therefore
//! not see each other, and dropping either would silently unlock the other. qlock cannot stop
//! other code from opening the file, but it can refuse to do it itself: a POSIX-mode open
//! claims the image's (device, inode) here *before* opening it, and a second claim fails.
//! OFD locks (Linux >= 3.15) have none of this and never come here.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use crate::error::{Error, Result};

static CLAIMED: Mutex<BTreeSet<(u64, u64)>> = Mutex::new(BTreeSet::new());

/// This process's claim on one image under POSIX locks; released on drop.
#[derive(Debug)]
pub(crate) struct PosixClaim((u64, u64));

impl PosixClaim {
    /// Claims `path` (by `stat`, before anything opens it).
    ///
    /// # Errors
    /// [`Error::PosixSameProcess`] when this process already holds the image under POSIX
    /// locks; the `stat` error, classified like an open error.
    pub(crate) fn claim(path: &Path) -> Result<PosixClaim> {
        let md = std::fs::metadata(path).map_err(|e| Error::open(path, e))?;
        let key = (md.dev(), md.ino());
        if !CLAIMED.lock().unwrap_or_else(PoisonError::into_inner).insert(key) {
            return Err(Error::PosixSameProcess { path: path.to_path_buf() });
        }
        Ok(PosixClaim(key))
    }
}

impl Drop for PosixClaim {
    fn drop(&mut self) {
        CLAIMED.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use crate::image::temp_image;
    use crate::{Access, Error, ImageLock, LockOptions, Locking, inspect};

    #[test]
    fn a_second_posix_guard_on_one_image_is_refused_and_the_first_keeps_its_locks() {
        let (_dir, path) = temp_image();
        let posix = LockOptions::default().with_locking(Locking::On).with_force_posix(true);
        let first = ImageLock::acquire_with(&path, Access::WRITE, &posix).unwrap();
        let err = ImageLock::acquire_with(&path, Access::READ, &posix).unwrap_err();
        assert!(matches!(err, Error::PosixSameProcess { .. }), "{err}");
        // The refused open never opened a descriptor, so the first guard's locks survive: an OFD
        // description (which does see this process's POSIX locks) still meets them.
        let seen = inspect(&[&path]).remove(0).unwrap();
        assert_eq!(seen.others.held, first.held());
        drop(first);
        drop(ImageLock::acquire_with(&path, Access::READ, &posix).expect("free once the first is gone"));
    }
}
