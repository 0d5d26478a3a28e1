//! [`AsyncStd`]: async-std and smol as a [`Runtime`](qlock_async::Runtime) for the async guard.

use crate::pool;

/// async-std and smol as a [`Runtime`](qlock_async::Runtime) for [`qlock_async::AsyncImageLock`]: the [`blocking`]
/// pool, and [`async_io`]'s timers and reactor, which both share. Only a type parameter, never
/// a value.
#[derive(Debug)]
pub enum AsyncStd {}

// The pool crossing (`pool`: the caller's future may be dropped, the closure still finishes
// and drops its result there) and the timer are this crate's; the close hint that cuts the
// timer short and the forwarding to the trait are qlock-async's, shared with the other
// runtime crates.
qlock_async::runtime_from_parts!(AsyncStd, pool = pool, timer = async_io::Timer::after);
