//! Sleeping between attempts: an async-io timer, cut short by a close of the image.

use std::time::Duration;

use async_io::Timer;
use qlock_core::SharedCloseWatch;

/// An image's [`SharedCloseWatch`] (one watch on the process-wide inotify instance, whose
/// reader thread wakes this task: nothing to register with the reactor); absent when inotify
/// is unavailable, and the wait then just polls.
pub struct Hint(Option<SharedCloseWatch>);

impl Hint {
    /// The hint of a wait.
    pub(crate) fn register(watch: Option<SharedCloseWatch>) -> Hint {
        Hint(watch)
    }

    /// The watch, for the caller to drop.
    pub(crate) fn into_watch(self) -> Option<SharedCloseWatch> {
        self.0
    }

    /// Sleeps for `delay`, or less if the image is closed by anyone meanwhile.
    pub(crate) async fn sleep(&self, delay: Duration) {
        let timer = async {
            Timer::after(delay).await;
        };
        match &self.0 {
            None => timer.await,
            Some(watch) => futures_lite::future::or(timer, watch.closed()).await,
        }
    }
}
