//! [`Tokio`]: tokio as a [`Runtime`] for the async guard.

use std::future::Future;
use std::time::Duration;

use qlock_async::Runtime;
use qlock_core::CloseWatch;
use qlock_core::Error;

use crate::hint::Hint;
use crate::pool;

/// tokio as a [`Runtime`] for [`qlock_async::AsyncImageLock`]: its blocking pool
/// ([`tokio::task::spawn_blocking`]), its timers and its reactor. Only a type parameter,
/// never a value.
#[derive(Debug)]
pub enum Tokio {}

impl Runtime for Tokio {
    type Hint = Hint;

    /// Runs `f` on tokio's blocking pool. `f` owns what it opens: if the caller's future is
    /// dropped, `f` still finishes and its result (a guard, say) is dropped on the pool thread.
    fn asyncify<T, F>(f: F) -> impl Future<Output = Result<T, Error>> + Send
    where
        F: FnOnce() -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        pool::asyncify(f)
    }

    /// On the current runtime's blocking pool; inline outside a runtime.
    fn drop_in_pool<T: Send + 'static>(value: T) {
        pool::drop_in_pool(value);
    }

    fn register(watch: Option<CloseWatch>) -> Hint {
        Hint::register(watch)
    }

    fn unregister(hint: Hint) -> Option<CloseWatch> {
        hint.into_watch()
    }

    fn sleep(hint: &Hint, delay: Duration) -> impl Future<Output = ()> + Send {
        hint.sleep(delay)
    }
}
