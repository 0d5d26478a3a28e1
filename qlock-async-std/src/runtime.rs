//! [`AsyncStd`]: async-std and smol as a [`Runtime`] for the async guard.

use std::future::Future;
use std::time::Duration;

use qlock_async::Runtime;
use qlock_core::CloseWatch;
use qlock_core::Error;

use crate::hint::Hint;
use crate::pool;

/// async-std and smol as a [`Runtime`] for [`qlock_async::AsyncImageLock`]: the [`blocking`]
/// pool, and [`async_io`]'s timers and reactor, which both share. Only a type parameter, never
/// a value.
#[derive(Debug)]
pub enum AsyncStd {}

impl Runtime for AsyncStd {
    type Hint = Hint;

    /// Runs `f` on the `blocking` crate's pool. `f` owns what it opens: if the caller's future
    /// is dropped, a started `f` still finishes and its result (a guard, say) is dropped on the
    /// pool thread; an unstarted one never runs.
    fn asyncify<T, F>(f: F) -> impl Future<Output = Result<T, Error>> + Send
    where
        F: FnOnce() -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        pool::asyncify(f)
    }

    /// Drops `value` on the pool, without waiting.
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
