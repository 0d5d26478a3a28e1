//! The async guard for QEMU's disk-image locks, on plain `std` futures, generic over a runtime.
//!
//! The runtime crates (`qlock-tokio`, `qlock-async-std`) differ only in how they reach their
//! runtime: which thread pool runs blocking calls, which timer sleeps, which reactor watches
//! the image for closes. Everything else, and in particular what happens when a future is
//! dropped half-way, is the same, so it lives here, generic over a [`Runtime`] that supplies
//! those few pieces. Each runtime crate implements [`Runtime`] for a marker type and names the
//! guard `type ImageLock = AsyncImageLock<ItsRuntime>`. This crate sits beside `qlock-core` as
//! smol's `async-fs` sits beside `blocking`: the sync core knows nothing of futures.
//!
//! # What runs where
//!
//! Opening an image, naming holders and [`inspect`] always cross to the pool, once per
//! operation. On a local filesystem ([`qlock_core::is_local_fs`]) lock calls are
//! non-blocking syscalls far cheaper than a pool round trip, so access changes, retries and
//! releases run inline on the executor; elsewhere (NFS, CIFS, FUSE) they go to the pool too,
//! and the guard's drop hands the descriptor to the pool ([`Runtime::drop_in_pool`]) because
//! `close(2)` may wait for a server.
//!
//! # Many operations at once
//!
//! A pool hop per operation is cheap alone, but ten thousand acquisitions started together
//! would ask the pool for ten thousand closures: tokio's pool grows a thread for each queued
//! closure up to 512, `blocking`'s up to 500, and a few hundred threads each doing 10 us of
//! work cost more in creation, scheduling and cache misses than the work itself (measured:
//! 280 threads, 3.4x the sequential sync time). So the runtime crates let at most
//! [`POOL_LIMIT`] of their closures run at once; the rest wait for a permit of an async
//! semaphore, as tasks, holding no thread. Why a bound and not the alternatives:
//!
//! - Opening inline on the executor, even on a local filesystem, is not safe: whether the file
//!   is local is only known after the open (`fstatfs`), and a path lookup crosses every
//!   directory on the way, any of which may be an NFS mount point that stalls.
//! - A few long-lived pool tasks draining a queue of operations would save the per-closure
//!   hand-over too, but would need their own cancellation bookkeeping (an unstarted operation
//!   must be dropped unrun, a started one must finish and drop its result) that the pools
//!   already do for one closure; the semaphore keeps the pools' own guarantees unchanged.
//!
//! A permit is taken before the closure is handed to the pool and given back when it ends, so
//! cancellation is as before: a future dropped while waiting for a permit never runs its
//! closure, one dropped after keeps its closure running to the end. Detached drops
//! ([`Runtime::drop_in_pool`]) take no permit (they cannot wait); there is at most one per
//! guard. The cost: when more than [`POOL_LIMIT`] opens stall on a dead server, the other
//! opens of the process queue behind them.
//!
//! # Cancellation
//!
//! A dropped future never leaks a lock, and a guard never loses one: after any cancellation it
//! holds exactly its old access or its new one, never less. A closure on the pool owns what it
//! opens, so a cancelled acquire's guard is closed there. Naming the holders of a conflict
//! sends the pool only the file's device and inode ([`qlock_core::HolderLookup`]), never the
//! descriptor. On a non-local filesystem a lock operation does move the descriptor into its
//! pool closure; if the call is dropped meanwhile, the closure finishes (QEMU's all-or-nothing
//! change) and gives the descriptor back, and the guard's next call takes it up again.
//!
//! # A runtime
//!
//! A runtime is a handful of functions on a marker type. This one runs everything inline and
//! never sleeps, which is only fit for a doc test, but shows the shape:
//!
//! ```
//! use std::time::Duration;
//! use qlock_async::{AsyncImageLock, Runtime};
//! use qlock_core::{Access, SharedCloseWatch, Error};
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("disk.img");
//! # std::fs::write(&path, b"").unwrap();
//!
//! enum Inline {}
//!
//! impl Runtime for Inline {
//!     type Hint = ();
//!     async fn asyncify<T, F>(f: F) -> Result<T, Error>
//!     where
//!         F: FnOnce() -> Result<T, Error> + Send + 'static,
//!         T: Send + 'static,
//!     {
//!         f()
//!     }
//!     fn drop_in_pool<T: Send + 'static>(value: T) {
//!         drop(value);
//!     }
//!     fn register(_: Option<SharedCloseWatch>) {}
//!     fn unregister(_: ()) -> Option<SharedCloseWatch> {
//!         None
//!     }
//!     async fn sleep(_: &(), _: Duration) {}
//! }
//!
//! let acquire = AsyncImageLock::<Inline>::acquire(&path, Access::READ);
//! // Every future above is ready at its first poll.
//! let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
//! let std::task::Poll::Ready(guard) = std::pin::pin!(acquire).poll(&mut cx) else { unreachable!() };
//! assert_eq!(guard?.access(), Access::READ);
//! # Ok::<(), Error>(())
//! ```
//!
//! The runtime crates name the guard with a type alias rather than a newtype: rustdoc shows the
//! methods on the alias's page all the same, while a newtype would need a forwarding copy of
//! every method in every crate.
//!
//! Modules, bottom up: `runtime` (the trait), `lend` (where the descriptor lives, and how an
//! operation borrows it), `guard`, `inspect`; and, with the `testing` feature, `testing`: the
//! scenarios every runtime crate's tests run.
#![forbid(unsafe_code)]

mod chain;
mod guard;
mod inspect;
mod lend;
mod runtime;
#[cfg(feature = "testing")]
pub mod testing;

pub use chain::AsyncChainLock;
pub use guard::AsyncImageLock;
pub use inspect::inspect;
pub use runtime::Runtime;

/// How many closures a runtime crate runs on its blocking pool at once (see
/// [the crate docs](crate#many-operations-at-once)): enough to keep two to eight cores busy with
/// opens and to ride out a few slow ones, few enough that a burst of ten thousand does not
/// grow the pool to hundreds of threads.
pub const POOL_LIMIT: usize = 32;

#[cfg(test)]
mod tests;
