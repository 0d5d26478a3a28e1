//! tokio's blocking pool: the one crossing to it, and drops there. A leaf: the runtime glue
//! and the close hint both use it.

use qlock_core::Error;
use tokio::sync::Semaphore;

/// At most this many closures of this crate run on the pool at once (see
/// [`qlock_async::POOL_LIMIT`]); the others wait for a permit as tasks, holding no thread.
static PERMITS: Semaphore = Semaphore::const_new(qlock_async::POOL_LIMIT);

/// Runs `f` on tokio's blocking pool ([`tokio::task::spawn_blocking`]), once one of the
/// [`PERMITS`] is free. `f` owns what it opens: if the caller's future is dropped, a started `f`
/// still finishes and its result is dropped on the pool thread; one still waiting for a permit
/// never runs.
pub(crate) async fn asyncify<T, F>(f: F) -> Result<T, Error>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    let permit = PERMITS.acquire().await.map_err(|e| Error::Pool { message: e.to_string() })?;
    let task = tokio::task::spawn_blocking(move || {
        let r = f();
        drop(permit);
        r
    });
    match task.await {
        Ok(r) => r,
        Err(e) => Err(Error::Pool { message: e.to_string() }),
    }
}

/// Drops `value` on the current runtime's blocking pool; inline outside a runtime.
pub(crate) fn drop_in_pool<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(move || drop(value))),
        Err(_) => drop(value),
    }
}
