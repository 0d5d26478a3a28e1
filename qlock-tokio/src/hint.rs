//! Sleeping between attempts: a tokio timer, cut short by an inotify close event.

use std::future::pending;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use qlock_core::CloseWatch;
use tokio::io::unix::AsyncFd;

use crate::pool;

/// An image's [`CloseWatch`] registered with tokio's reactor; absent when inotify or the
/// reactor is unavailable, and the wait then just polls.
pub struct Hint(Option<AsyncFd<Watch>>);

/// [`CloseWatch`] owns its descriptor for its whole life, which is what [`AsyncFd`] needs.
struct Watch(CloseWatch);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Hint {
    /// Registers a watch with the current runtime's reactor.
    pub(crate) fn register(watch: Option<CloseWatch>) -> Hint {
        // `AsyncFd::new` is deprecated in favour of an `unsafe` constructor whose contract is that
        // the descriptor stays open and the same while registered: `Watch` owns it and never
        // replaces it, so the safe, deprecated constructor is sound here.
        #[allow(deprecated)]
        Hint(watch.and_then(|w| AsyncFd::new(Watch(w)).ok()))
    }

    /// The watch, out of the reactor again, for the caller to close (on the pool).
    pub(crate) fn into_watch(mut self) -> Option<CloseWatch> {
        self.0.take().map(|fd| fd.into_inner().0)
    }

    /// Sleeps for `delay`, or less if the image is closed by anyone meanwhile.
    pub(crate) async fn sleep(&self, delay: Duration) {
        let timer = tokio::time::sleep(delay);
        match &self.0 {
            None => timer.await,
            Some(fd) => futures_lite::future::or(timer, closed(fd)).await,
        }
    }
}

impl Drop for Hint {
    /// Closing an inotify descriptor waits for an SRCU grace period in the kernel (about 10 ms
    /// here), far too long for an executor thread: the pool closes it.
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            pool::drop_in_pool(fd.into_inner());
        }
    }
}

/// Completes on the next close event (or one already queued); never completes on errors.
async fn closed(fd: &AsyncFd<Watch>) {
    loop {
        let Ok(mut ready) = fd.readable().await else { return pending().await };
        match ready.get_inner().0.drain() {
            Ok(true) => return,
            Ok(false) => ready.clear_ready(),
            Err(_) => return pending().await,
        }
    }
}
