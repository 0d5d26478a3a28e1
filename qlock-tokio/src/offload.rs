//! The one crossing to the blocking pool.

use std::io;

use qlock_core::Error;

/// Runs `f` on tokio's blocking pool. `f` owns what it opens: if the caller's future is dropped,
/// `f` still finishes and its result (a guard, say) is dropped on the pool thread.
pub(crate) async fn asyncify<T, F>(f: F) -> Result<T, Error>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => {
            Err(Error::Io { what: "qlock: background task failed".into(), source: io::Error::other(e) })
        }
    }
}
