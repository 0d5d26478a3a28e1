//! The async-std and smol glue: the one crossing to the blocking pool, and [`AsyncStd`] itself.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use qlock_core::Error;
use qlock_core::offload::Runtime;
use qlock_core::wake::CloseWatch;

use crate::hint::Hint;

/// async-std and smol as a [`Runtime`] for [`qlock_core::offload::AsyncImageLock`]: the
/// [`blocking`] pool, and [`async_io`]'s timers and reactor, which both share. Only a type
/// parameter, never a value.
#[derive(Debug)]
pub enum AsyncStd {}

impl Runtime for AsyncStd {
    type Hint = Hint;

    /// Runs `f` on the `blocking` crate's pool. `f` owns what it opens: if the caller's future
    /// is dropped, a started `f` still finishes and its result (a guard, say) is dropped on the
    /// pool thread; an unstarted one never runs.
    async fn asyncify<T, F>(f: F) -> Result<T, Error>
    where
        F: FnOnce() -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        let flight = Flight::start();
        blocking::unblock(move || {
            let r = f();
            drop(flight);
            r
        })
        .await
    }

    /// Drops `value` on the pool, without waiting.
    fn drop_in_pool<T: Send + 'static>(value: T) {
        let flight = Flight::start();
        blocking::unblock(move || {
            drop(value);
            drop(flight);
        })
        .detach();
    }

    fn register(watch: Option<CloseWatch>) -> Hint {
        Hint::register(watch)
    }

    fn sleep(hint: &Hint, delay: Duration) -> impl Future<Output = ()> + Send {
        hint.sleep(delay)
    }
}

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts a closure from its hand-over to the pool until it has finished or was dropped unrun.
struct Flight;

impl Flight {
    fn start() -> Flight {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        Flight
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How many closures this crate has handed to the pool that are still running or queued.
///
/// Unlike tokio, the `blocking` pool cannot be waited for; tests and orderly shutdowns wait
/// for this to reach zero to know every cancelled acquire has released what it took.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::SeqCst)
}
