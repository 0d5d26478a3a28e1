//! tokio's blocking pool: the one crossing to it, and drops there. A leaf: the runtime glue
//! and the close hint both use it.

use qlock_async::Batch;
use qlock_core::Error;

/// This crate's queue of closures for the pool, drained by at most
/// [`qlock_async::POOL_LIMIT`] pool tasks (see [`Batch`]).
static BATCH: Batch = Batch::new(qlock_async::POOL_LIMIT);

/// Runs `f` on tokio's blocking pool ([`tokio::task::spawn_blocking`]), through [`BATCH`]. `f`
/// owns what it opens: if the caller's future is dropped, a started `f` still finishes and its
/// result is dropped on the pool thread; an unstarted one never runs.
pub(crate) async fn asyncify<T, F>(f: F) -> Result<T, Error>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    let reply = BATCH.run(|task| drop(tokio::task::spawn_blocking(task)), f);
    reply.await.unwrap_or_else(|| Err(lost()))
}

/// The error of a closure the pool dropped unrun (a runtime shutting down) or that panicked.
fn lost() -> Error {
    Error::Pool { message: "the blocking pool dropped the operation (a runtime shutting down?)".into() }
}

/// Drops `value` on the current runtime's blocking pool; inline outside a runtime.
pub(crate) fn drop_in_pool<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(move || drop(value))),
        Err(_) => drop(value),
    }
}
