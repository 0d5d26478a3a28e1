//! [`Tokio`]: tokio as a [`Runtime`](qlock_async::Runtime) for the async guard.

use crate::pool;

/// tokio as a [`Runtime`](qlock_async::Runtime) for [`qlock_async::AsyncImageLock`]: its blocking pool
/// ([`tokio::task::spawn_blocking`]), its timers and its reactor. Only a type parameter,
/// never a value.
#[derive(Debug)]
pub enum Tokio {}

// The pool crossing (`pool`: the caller's future may be dropped, the closure still finishes
// and drops its result there) and the timer are this crate's; the close hint that cuts the
// timer short and the forwarding to the trait are qlock-async's, shared with the other
// runtime crates.
qlock_async::runtime_from_parts!(Tokio, pool = pool, timer = tokio::time::sleep);
