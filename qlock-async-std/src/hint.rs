//! Sleeping between attempts: an async-io timer, cut short by an inotify close event.

use std::future::pending;
use std::time::Duration;

use async_io::{Async, Timer};
use qlock_core::CloseWatch;

use crate::pool;

/// An image's [`CloseWatch`] registered with async-io's reactor (the one async-std and smol
/// share); absent when inotify is unavailable, and the wait then just polls.
pub struct Hint(Option<Async<CloseWatch>>);

impl Hint {
    /// Registers a watch with the reactor.
    pub(crate) fn register(watch: Option<CloseWatch>) -> Hint {
        Hint(watch.and_then(|w| Async::new(w).ok()))
    }

    /// The watch, out of the reactor again, for the caller to close (on the pool).
    pub(crate) fn into_watch(mut self) -> Option<CloseWatch> {
        self.0.take().and_then(|fd| fd.into_inner().ok())
    }

    /// Sleeps for `delay`, or less if the image is closed by anyone meanwhile.
    pub(crate) async fn sleep(&self, delay: Duration) {
        let timer = async {
            Timer::after(delay).await;
        };
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
        if let Some(watch) = self.0.take().and_then(|fd| fd.into_inner().ok()) {
            pool::drop_in_pool(watch);
        }
    }
}

/// Completes on the next close event (or one already queued); never completes on errors.
async fn closed(fd: &Async<CloseWatch>) {
    loop {
        match fd.get_ref().drain() {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => return pending().await,
        }
        if fd.readable().await.is_err() {
            return pending().await;
        }
    }
}
