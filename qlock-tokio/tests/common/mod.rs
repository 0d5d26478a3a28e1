//! The tokio [`Harness`] the test binaries share: the scenarios of `qlock_async::testing`
//! (`locks`) and the GlusterFS tests (`gluster`) run on it.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use qlock_async::testing::scenarios::Harness;
use qlock_core::{Error, ImageStatus};

/// A fresh two-worker tokio runtime per `block_on`, the way services run it.
pub(crate) enum Tokio {}

impl Harness for Tokio {
    type R = qlock_tokio::Tokio;
    const NAME: &'static str = "tokio";

    fn block_on<T>(fut: impl Future<Output = T>) -> T {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let out = rt.block_on(fut);
        // Dropping the runtime waits for every closure still running on its blocking pool.
        drop(rt);
        out
    }

    fn spawn<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> impl Future<Output = T> {
        let task = tokio::spawn(fut);
        async { task.await.unwrap() }
    }

    async fn timeout<T>(d: Duration, fut: impl Future<Output = T>) -> Option<T> {
        tokio::time::timeout(d, fut).await.ok()
    }

    async fn inspect(path: &Path) -> Result<ImageStatus, Error> {
        qlock_tokio::inspect([path]).await.remove(0)
    }
}
