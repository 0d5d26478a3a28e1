//! The `blocking` pool: the one crossing to it, drops there, and the count of closures in
//! flight. A leaf: the runtime glue and the close hint both use it.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_lock::Semaphore;
use qlock_core::Error;

/// At most this many closures of this crate run on the pool at once (see
/// [`qlock_async::POOL_LIMIT`]); the others wait for a permit as tasks, holding no thread.
static PERMITS: Semaphore = Semaphore::new(qlock_async::POOL_LIMIT);

/// Runs `f` on the `blocking` crate's pool, once one of the [`PERMITS`] is free. `f` owns what
/// it opens: if the caller's future is dropped, a started `f` still finishes and its result is
/// dropped on the pool thread; an unstarted one (or one still waiting for a permit) never runs.
pub(crate) async fn asyncify<T, F>(f: F) -> Result<T, Error>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    let flight = Flight::start();
    let permit = PERMITS.acquire().await;
    blocking::unblock(move || {
        let r = f();
        drop(permit);
        drop(flight);
        r
    })
    .await
}

/// Drops `value` on the pool, without waiting.
pub(crate) fn drop_in_pool<T: Send + 'static>(value: T) {
    let flight = Flight::start();
    blocking::unblock(move || {
        drop(value);
        drop(flight);
    })
    .detach();
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
