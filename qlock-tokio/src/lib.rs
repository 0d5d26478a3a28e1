//! QEMU-compatible disk-image locks for tokio: [`qlock_core`]'s operations as async functions
//! that never block the executor.
//!
//! ```
//! use qlock_core::{Access, Backoff, LockOptions};
//! use qlock_tokio::ImageLock;
//! use std::time::Duration;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), qlock_core::Error> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("vm.qcow2");
//! # std::fs::write(&path, b"").unwrap();
//!
//! // A backup agent: wait up to a minute for the VM to let go, then read with writers refused.
//! let backoff = Backoff::default().with_timeout(Duration::from_secs(60));
//! let mut guard = ImageLock::acquire_wait(&path, Access::READ, &LockOptions::default(), &backoff).await?;
//! // ... copy from guard.file() ...
//! guard.set_access(Access::FORCE_SHARE).await?; // done reading: stop refusing writers
//! guard.release().await?;                      // or just drop it
//! # Ok(())
//! # }
//! ```
//!
//! # What runs where
//!
//! Work that may block crosses to tokio's blocking pool ([`tokio::task::spawn_blocking`]) in one closure per
//! operation, not one per `fcntl`: opening an image (a path lookup that can stall on NFS),
//! naming holders (a walk over `/proc`), and [`inspect`] always go there. A conflict on an
//! open guard crosses once, to name the holders; a wait that fails crosses once more at its
//! end, naming the holders and closing its inotify watch in the same closure (once in all
//! when its deadline has passed by the first attempt).
//!
//! On a local filesystem (ext2/3/4, xfs, btrfs, tmpfs, per
//! [`qlock_core::is_local_fs`]) a lock call is a non-blocking syscall of well under a
//! microsecond, a tenth of a pool round trip, so the retries of a wait, access changes on an
//! open guard and releases run inline on the executor. On any other filesystem (NFS, CIFS,
//! FUSE) each of those goes to the pool too.
//!
//! # Waiting
//!
//! [`ImageLock::acquire_wait`] and [`ImageLock::wait_for`] poll with the core's jittered
//! exponential [`Backoff`](qlock_core::Backoff) through the core's one waiting loop,
//! [`qlock_core::retry`], sleeping on tokio timers. While they sleep they also watch the
//! image with inotify ([`qlock_core::SharedCloseWatch`]: one watch per image on one
//! process-wide inotify instance, so a thousand waiters are a thousand watches, not a thousand
//! instances past the per-user limit): when some process closes the image, which is when QEMU's
//! locks go away, they retry at once. Polling stays the fallback for holders that drop locks
//! without closing and for closes inotify cannot see (other hosts). The runtime needs its time
//! driver (`Builder::enable_time` or `enable_all`).
//!
//! # Cancellation
//!
//! Dropping any future of this crate at any await point never leaks a lock, and never loses
//! one a guard held:
//!
//! - A closure already running on the blocking pool cannot be stopped, so it owns everything it
//!   opens. An acquire whose future was dropped finishes in the pool, and then its guard is
//!   dropped there, which closes the descriptor and releases every byte. A closure that had not
//!   started yet never runs.
//! - A wait dropped between attempts drops what it opened (acquire) or leaves the guard with
//!   the access it held before the call ([`ImageLock::wait_for`]).
//! - [`ImageLock::set_access`] and [`ImageLock::wait_for`] change the access as QEMU does, all
//!   or nothing, so a dropped call has either changed it fully or not at all. Naming the
//!   holders of a conflict sends the pool the file's device and inode, not the descriptor. On
//!   a non-local filesystem, where the change itself runs in the pool, a dropped call's closure
//!   finishes there and gives the descriptor back; the guard's next call takes it up again.
//!
//! This mirrors [`tokio::fs`](https://docs.rs/tokio/latest/tokio/fs/index.html): work handed to the pool completes, and its result is dropped.
//!
//! # Dropping a guard
//!
//! Dropping an [`ImageLock`] closes its descriptor, which releases its locks. On a local
//! filesystem `close(2)` of a read-only descriptor is a few microseconds, so it happens inline.
//! On other filesystems `close(2)` may wait for the server to drop the locks, so the drop hands
//! the descriptor to the blocking pool (inline only outside a runtime). Use
//! [`ImageLock::release`] to wait for the release and see its errors.
#![forbid(unsafe_code)]

mod pool;
mod runtime;
mod status;

pub use runtime::Tokio;
pub use status::inspect;

/// An open image holding QEMU-compatible read locks, for tokio.
///
/// The async twin of [`qlock_core::ImageLock`], with the same methods, errors and QEMU
/// semantics: [`qlock_async::AsyncImageLock`], the guard both async crates share, running
/// on tokio. Dropping it releases every lock without blocking the executor (see the
/// [crate docs](crate#dropping-a-guard)).
pub type ImageLock = qlock_async::AsyncImageLock<Tokio>;

/// A whole image graph (backing files, external data files) locked as QEMU locks it, all
/// nodes or none: [`qlock_async::AsyncChainLock`] on this runtime. One pool round trip per
/// attempt; a dropped acquire or wait leaks no lock on any node.
pub type ChainLock = qlock_async::AsyncChainLock<Tokio>;

#[cfg(test)]
mod tests {
    use super::*;
    use qlock_core::{Access, Backoff, LockOptions};

    /// Compile-time: `tokio::spawn` accepts every future of the guard (they are `Send`).
    #[allow(dead_code)]
    fn futures_spawn(mut guard: ImageLock, owned: ImageLock) {
        let (opts, backoff) = (LockOptions::default(), Backoff::default());
        tokio::spawn(ImageLock::acquire("p", Access::READ));
        tokio::spawn(inspect(["p"]));
        tokio::spawn(owned.release());
        tokio::spawn(async move {
            drop(ImageLock::acquire_with("p", Access::READ, &opts).await?);
            drop(ImageLock::acquire_wait("p", Access::READ, &opts, &backoff).await?);
            guard.set_access(Access::READ).await?;
            guard.wait_for(Access::READ, &backoff).await
        });
    }
}
