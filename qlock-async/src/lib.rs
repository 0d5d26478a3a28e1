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
//! would hand the pool ten thousand closures: tokio's pool grows a thread for each closure
//! that finds no idle thread, up to 512 (measured: 280 to 306 threads, 2.8x to 3.4x the time
//! of the same opens done one after another in sync code), and even a semaphore bounding the
//! closures in flight does not bound tokio's threads (a closure hands its permit on before its
//! thread is idle again, so the next closure starts another thread). So the runtime crates
//! queue their closures in a [`Batch`]: at most [`POOL_LIMIT`] long-lived pool tasks run them
//! back to back, started when closures are queued and none is free, ending when the queue has
//! stayed empty a moment. A burst then costs a few threads and no thread hand-over per operation; a lone
//! operation costs what one closure on the pool did (one task started, one closure run).
//! Why not the alternatives:
//!
//! - Opening inline on the executor, even on a local filesystem, is not safe: whether the file
//!   is local is only known after the open (`fstatfs`), and a path lookup crosses every
//!   directory on the way, any of which may be an NFS mount point that stalls.
//! - A semaphore in front of the pool bounds the work but not tokio's threads (above), and
//!   keeps a thread hand-over per operation.
//!
//! Cancellation is as before: a closure whose caller has gone when a pool task reaches it is
//! dropped unrun; one already started finishes and its result is dropped on the pool thread.
//! A pool task dropped unrun (a runtime shutting down drops its queued pool work) takes the
//! closures queued behind it along when it was the last one, and their callers get
//! [`Error::Pool`](qlock_core::Error::Pool) instead of waiting forever. Detached drops
//! ([`Runtime::drop_in_pool`]) are not queued; there is at most one per guard. The cost of the
//! bound: when [`POOL_LIMIT`] opens stall on a dead server, the other opens of the process
//! queue behind them.
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
//! Modules, bottom up: `runtime` (the trait), `hint` (the close hint the runtime crates share), `lend` (where the descriptor lives, and how an
//! operation borrows it), `guard`, `inspect`; and, with the `testing` feature, `testing`: the
//! scenarios every runtime crate's tests run.
#![forbid(unsafe_code)]

mod batch;
mod chain;
mod guard;
mod hint;
mod inspect;
mod lend;
mod runtime;
#[cfg(feature = "testing")]
pub mod testing;

pub use batch::{Batch, Reply};
pub use chain::AsyncChainLock;
pub use guard::AsyncImageLock;
pub use hint::CloseHint;
pub use inspect::inspect;
pub use runtime::Runtime;

/// How many pool tasks a runtime crate's [`Batch`] runs at once (see
/// [the crate docs](crate#many-operations-at-once)). Measured on two cores with 10,000
/// concurrent acquisitions: 16 tasks took 2.4x the sequential sync time (the tasks contend for
/// the queue and the cores), 4 took 1.07x. Four also rides out up to three opens stalled on a
/// dead server before the others queue behind them.
pub const POOL_LIMIT: usize = 4;

#[cfg(test)]
mod tests;
