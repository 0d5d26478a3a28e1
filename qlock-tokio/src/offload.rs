//! The tokio glue: the one crossing to the blocking pool, and [`Tokio`] itself.

use std::future::Future;
use std::io;
use std::time::Duration;

use qlock_core::Error;
use qlock_core::offload::Runtime;
use qlock_core::wake::CloseWatch;

use crate::hint::{self, Hint};

/// tokio as a [`Runtime`] for [`qlock_core::offload::AsyncImageLock`]: its blocking pool
/// ([`tokio::task::spawn_blocking`]), its timers and its reactor. Only a type parameter,
/// never a value.
#[derive(Debug)]
pub enum Tokio {}

impl Runtime for Tokio {
    type Hint = Hint;

    /// Runs `f` on tokio's blocking pool. `f` owns what it opens: if the caller's future is
    /// dropped, `f` still finishes and its result (a guard, say) is dropped on the pool thread.
    async fn asyncify<T, F>(f: F) -> Result<T, Error>
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

    /// On the current runtime's blocking pool; inline outside a runtime.
    fn drop_in_pool<T: Send + 'static>(value: T) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || drop(value))),
            Err(_) => drop(value),
        }
    }

    fn register(watch: Option<CloseWatch>) -> Hint {
        Hint::register(watch)
    }

    fn sleep(hint: &Hint, delay: Duration) -> impl Future<Output = ()> + Send {
        hint.sleep(delay)
    }

    fn close_hint_enabled() -> bool {
        hint::enabled()
    }
}
