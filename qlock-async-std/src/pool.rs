//! The `blocking` pool: the one crossing to it, drops there, and the count of closures in
//! flight. A leaf: the runtime glue and the close hint both use it.

use std::sync::atomic::{AtomicUsize, Ordering};

use qlock_async::Batch;
use qlock_core::Error;

/// This crate's queue of closures for the pool, drained by at most
/// [`qlock_async::POOL_LIMIT`] pool tasks (see [`Batch`]).
static BATCH: Batch = Batch::new(qlock_async::POOL_LIMIT);

/// Runs `f` on the `blocking` crate's pool, through [`BATCH`]. `f` owns what it opens: if the
/// caller's future is dropped, a started `f` still finishes and its result is dropped on the
/// pool thread; an unstarted one never runs.
pub(crate) async fn asyncify<T, F>(f: F) -> Result<T, Error>
where
    F: FnOnce() -> Result<T, Error> + Send + 'static,
    T: Send + 'static,
{
    let flight = Flight::start();
    let reply = BATCH.run(
        |task| blocking::unblock(task).detach(),
        move || {
            let r = f();
            drop(flight);
            r
        },
    );
    reply.await.unwrap_or_else(|| Err(Error::Pool { message: "a pool closure panicked".into() }))
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
