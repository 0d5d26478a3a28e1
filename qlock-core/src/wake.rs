//! A wake-up hint for waiters: inotify close events on the image.
//!
//! A holder's locks go away when its last descriptor of the image closes, and the kernel
//! reports that close to inotify as `IN_CLOSE_WRITE` or `IN_CLOSE_NOWRITE`. A waiter that
//! watches for them can retry at once instead of at the end of its backoff delay. It is only a
//! hint: a holder can drop locks without closing (QEMU inactivating an image for migration),
//! closes on other hosts of a network filesystem are never reported, and unrelated closes wake
//! the waiter for nothing. So waiting stays polling (the backoff loop of [`Backoff`](crate::Backoff)); the hint only
//! ends a sleep early.
//!
//! Two costs to plan for: closing a watch waits for an SRCU grace period in the kernel (about
//! 10 ms), so async callers close it on a blocking pool; and each watch is an inotify instance,
//! of which a user may have only `fs.inotify.max_user_instances` (often 128): past that,
//! [`CloseWatch::new`] fails with `EMFILE` and the waiter just polls.
//!
//! The descriptor is non-blocking, so async runtimes can register it with their reactor
//! (tokio's `AsyncFd`, async-io's `Async`) and call [`CloseWatch::drain`] when it is readable.
//!
//! ```
//! use qlock_core::CloseWatch;
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("disk.img");
//! # std::fs::write(&path, b"").unwrap();
//!
//! let watch = CloseWatch::new(&path)?;
//! assert!(!watch.drain()?);                 // nothing closed yet
//! drop(std::fs::File::open(&path)?);        // someone opens and closes the image
//! assert!(watch.drain()?);                  // ... and the watch saw it
//! assert!(!watch.drain()?);                 // events are consumed
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # References
//! - [`inotify(7)`](https://man7.org/linux/man-pages/man7/inotify.7.html)

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// An inotify instance watching one image for close events.
#[derive(Debug)]
pub struct CloseWatch {
    inotify: Inotify,
}

impl CloseWatch {
    /// Watches `path` for `IN_CLOSE_WRITE | IN_CLOSE_NOWRITE`, on a non-blocking, close-on-exec
    /// descriptor.
    ///
    /// # Errors
    /// The `inotify_init1(2)` or `inotify_add_watch(2)` error, e.g. `EMFILE` when the per-user
    /// limit of inotify instances is reached; waiters then just poll.
    pub fn new(path: impl AsRef<Path>) -> io::Result<CloseWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(path.as_ref(), AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_CLOSE_NOWRITE)?;
        Ok(CloseWatch { inotify })
    }

    /// Consumes every pending event without blocking; true when there was at least one.
    ///
    /// # Errors
    /// A `read(2)` error other than `EAGAIN`.
    pub fn drain(&self) -> io::Result<bool> {
        let mut seen = false;
        loop {
            match self.inotify.read_events() {
                Ok(events) if events.is_empty() => return Ok(seen),
                Ok(_) => seen = true,
                Err(Errno::EAGAIN) => return Ok(seen),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for CloseWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

/// Sleeps up to `timeout`, returning early when one of `watches` sees a close: the blocking
/// waiter's sleep. Without watches (inotify unavailable) it is a plain sleep.
pub fn sleep_or_close(watches: &[CloseWatch], timeout: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    if watches.is_empty() {
        return std::thread::sleep(timeout);
    }
    let mut fds: Vec<PollFd<'_>> =
        watches.iter().map(|w| PollFd::new(w.as_fd(), PollFlags::POLLIN)).collect();
    let ms = PollTimeout::try_from(timeout.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(n) if n > 0 => watches.iter().for_each(|w| drop(w.drain())),
        Ok(_) => {}
        Err(_) => std::thread::sleep(timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::temp_image;
    use crate::{Access, ImageLock};

    #[test]
    fn a_holder_releasing_its_image_is_seen_and_our_own_probes_are_not_missed() {
        let (_dir, path) = temp_image();
        let holder = ImageLock::acquire(&path, Access::WRITE).unwrap();
        let watch = CloseWatch::new(&path).unwrap();
        assert!(!watch.drain().unwrap());
        drop(holder);
        assert!(watch.drain().unwrap());
    }

    #[test]
    fn a_missing_image_is_an_error_not_a_panic() {
        let err = CloseWatch::new("/nonexistent/qlock/img").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
