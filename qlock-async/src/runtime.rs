//! [`Runtime`]: the few pieces an async runtime supplies to the guard.

use std::future::Future;
use std::time::Duration;

use qlock_core::Error;
use qlock_core::SharedCloseWatch;

/// What an async runtime supplies to [`AsyncImageLock`](crate::AsyncImageLock): a blocking
/// pool, and a sleep that a close of the image can cut short. Implemented on a marker type by
/// each runtime crate.
///
/// Every future returned must be `Send`, so the guard's futures are too (`tokio::spawn` needs
/// that).
///
/// There is no switch for the close hint here: a benchmark that measures waits without it
/// wraps a runtime in its own marker type whose [`Runtime::register`] drops the watch and
/// registers nothing, so the release surface carries no knob meant for benchmarks.
pub trait Runtime: Send + Sync + 'static {
    /// A [`SharedCloseWatch`] (a watch on the process-wide inotify instance, woken by its own
    /// reader thread, so no reactor registration is needed) next to the runtime's timer, or
    /// nothing (the wait then only polls).
    type Hint: Send + Sync;

    /// Runs `f` on the blocking pool. `f` owns what it works on: if the returned future is
    /// dropped after `f` started, `f` still finishes and its result is dropped there; if it is
    /// dropped before, `f` may never run and is dropped unrun.
    fn asyncify<T, F>(f: F) -> impl Future<Output = Result<T, Error>> + Send
    where
        F: FnOnce() -> Result<T, Error> + Send + 'static,
        T: Send + 'static;

    /// Drops `value` on the blocking pool without waiting (inline where there is no pool).
    fn drop_in_pool<T: Send + 'static>(value: T);

    /// Makes the hint of a wait from its watch; called from within the runtime.
    fn register(watch: Option<SharedCloseWatch>) -> Self::Hint;

    /// Takes the watch back out of a hint, so the guard can drop it in a pool closure it makes
    /// anyway (naming the holders of a failed wait).
    fn unregister(hint: Self::Hint) -> Option<SharedCloseWatch>;

    /// Sleeps for `delay`, or less if `hint` sees the image closed meanwhile.
    fn sleep(hint: &Self::Hint, delay: Duration) -> impl Future<Output = ()> + Send;
}

/// Implements [`Runtime`] for a runtime crate's marker type from its two parts: a `pool` module
/// with `asyncify` and `drop_in_pool` (the crossing to its blocking pool), and a `timer`
/// function from a delay to a future that ends after it (its timer), which a
/// [`CloseHint`](crate::CloseHint) cuts short. The runtime crates differ only in those parts, so
/// the forwarding between them and the trait is written once, here.
///
/// Used as `qlock_async::runtime_from_parts!(Tokio, pool = pool, timer = tokio::time::sleep);`
/// in a module that can name both (`pool` is a module path of the calling crate).
#[macro_export]
macro_rules! runtime_from_parts {
    ($runtime:ty, pool = $($pool:ident)::+, timer = $($timer:ident)::+) => {
        impl $crate::Runtime for $runtime {
            type Hint = $crate::CloseHint;

            fn asyncify<T, F>(
                f: F,
            ) -> impl ::std::future::Future<Output = ::std::result::Result<T, ::qlock_core::Error>> + Send
            where
                F: FnOnce() -> ::std::result::Result<T, ::qlock_core::Error> + Send + 'static,
                T: Send + 'static,
            {
                $($pool)::+::asyncify(f)
            }

            fn drop_in_pool<T: Send + 'static>(value: T) {
                $($pool)::+::drop_in_pool(value);
            }

            fn register(watch: Option<::qlock_core::SharedCloseWatch>) -> $crate::CloseHint {
                $crate::CloseHint::new(watch)
            }

            fn unregister(hint: $crate::CloseHint) -> Option<::qlock_core::SharedCloseWatch> {
                hint.into_watch()
            }

            fn sleep(
                hint: &$crate::CloseHint,
                delay: ::std::time::Duration,
            ) -> impl ::std::future::Future<Output = ()> + Send {
                hint.sleep($($timer)::+(delay))
            }
        }
    };
}
