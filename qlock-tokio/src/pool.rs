//! tokio's blocking pool: the one crossing to it, and drops there. A leaf: the runtime glue
//! and the close hint both use it.

use qlock_core::Error;

/// Runs `f` on tokio's blocking pool ([`tokio::task::spawn_blocking`]). `f` owns what it
/// opens: if the caller's future is dropped, `f` still finishes and its result is dropped on
/// the pool thread.
pub(crate) async fn asyncify<T, F>(f: F) -> Result<T, Error>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
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
