//! [`CloseHint`]: sleeping between attempts on a runtime's timer, cut short by a close of the
//! image. The runtime crates differ only in the timer, so the rest is written once, here.

use std::future::Future;

use qlock_core::SharedCloseWatch;

/// An image's [`SharedCloseWatch`] (one watch on the process-wide inotify instance, whose
/// reader thread wakes the waiting task: nothing to register with a reactor); absent when
/// inotify is unavailable, and the wait then just polls. The `Runtime::Hint` of the runtime
/// crates ([`runtime_from_parts!`](crate::runtime_from_parts)).
#[derive(Debug)]
pub struct CloseHint(Option<SharedCloseWatch>);

impl CloseHint {
    /// The hint of a wait.
    pub fn new(watch: Option<SharedCloseWatch>) -> CloseHint {
        CloseHint(watch)
    }

    /// The watch, for the caller to drop.
    pub fn into_watch(self) -> Option<SharedCloseWatch> {
        self.0
    }

    /// Waits for `timer` (a runtime's sleep), or less if the image is closed by anyone
    /// meanwhile.
    pub async fn sleep<T>(&self, timer: impl Future<Output = T>) {
        let timer = async {
            timer.await;
        };
        match &self.0 {
            None => timer.await,
            Some(watch) => futures_lite::future::or(timer, watch.closed()).await,
        }
    }
}
