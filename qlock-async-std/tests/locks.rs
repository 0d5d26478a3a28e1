//! qlock-async-std against real processes and real files: the scenarios of
//! `qlock_async::testing` (shared with qlock-tokio), each under async-std and then under smol.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use async_io::Timer;
use qlock_async::testing::scenarios::Harness;
use qlock_core::{Error, ImageStatus};

/// `Some(output)` if `fut` completes within `d`, on async-io's timer (both runtimes use it).
async fn within<T>(d: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        Timer::after(d).await;
        None
    })
    .await
}

/// Waits until every closure handed to the pool has finished (cancelled acquires included).
/// The `blocking` pool cannot be joined, so this watches the crate's [`qlock_async_std::in_flight`].
async fn pool_settled() {
    let deadline = Instant::now() + Duration::from_secs(30);
    while qlock_async_std::in_flight() > 0 {
        assert!(Instant::now() < deadline, "pool closures never finished");
        Timer::after(Duration::from_millis(1)).await;
    }
}

/// async-std (discontinued upstream, still in use).
enum AsyncStd {}

impl Harness for AsyncStd {
    type R = qlock_async_std::AsyncStd;
    const NAME: &'static str = "async-std";

    fn block_on<T>(fut: impl Future<Output = T>) -> T {
        async_std::task::block_on(async {
            let out = fut.await;
            pool_settled().await;
            out
        })
    }

    fn spawn<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> impl Future<Output = T> {
        async_std::task::spawn(fut)
    }

    fn timeout<T>(d: Duration, fut: impl Future<Output = T>) -> impl Future<Output = Option<T>> {
        within(d, fut)
    }

    async fn inspect(path: &Path) -> Result<ImageStatus, Error> {
        qlock_async_std::inspect([path]).await.remove(0)
    }
}

/// smol, async-std's successor: the same crate, the same `qlock_async_std::AsyncStd` runtime.
enum Smol {}

impl Harness for Smol {
    type R = qlock_async_std::AsyncStd;
    const NAME: &'static str = "smol";

    fn block_on<T>(fut: impl Future<Output = T>) -> T {
        smol::block_on(async {
            let out = fut.await;
            pool_settled().await;
            out
        })
    }

    fn spawn<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> impl Future<Output = T> {
        smol::spawn(fut)
    }

    fn timeout<T>(d: Duration, fut: impl Future<Output = T>) -> impl Future<Output = Option<T>> {
        within(d, fut)
    }

    async fn inspect(path: &Path) -> Result<ImageStatus, Error> {
        qlock_async_std::inspect([path]).await.remove(0)
    }
}

qlock_async::scenario_tests!(AsyncStd, Smol);
