//! [`AsyncImageLock`]: the async guard, written once for every runtime.

use std::fmt;
use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use qlock_core::SharedCloseWatch;
use qlock_core::is_local_fs;
use qlock_core::{Access, Error, LockOptions, LockSet};
use qlock_core::{Backoff, Retry, retry};

use crate::lend::{Core, Home, busy};
use crate::runtime::Runtime;

/// An open image holding QEMU-compatible read locks, for the async runtime `R`.
///
/// The async twin of [`qlock_core::ImageLock`], with the same methods, errors and QEMU
/// semantics, and futures that never block the executor and leak no lock when dropped (see
/// the [crate docs](crate)). Dropping the guard releases every lock: inline on a local
/// filesystem, on the pool elsewhere. Users name it through their runtime's crate, e.g.
/// `qlock_tokio::ImageLock`.
#[must_use = "the locks are released when the ImageLock is dropped"]
pub struct AsyncImageLock<R: Runtime> {
    home: Home,
    path: PathBuf,
    /// Lock calls may run inline (see [`is_local_fs`]).
    local: bool,
    find_holders: bool,
    runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> AsyncImageLock<R> {
    /// Opens `path` and takes `access` with default options, failing at once on a conflict.
    /// One pool round trip.
    ///
    /// # Errors
    /// As [`qlock_core::ImageLock::acquire`]: [`Error::Conflict`] naming the holders, open and
    /// filesystem errors.
    pub async fn acquire(path: impl AsRef<Path>, access: Access) -> Result<Self, Error> {
        Self::acquire_with(path, access, &LockOptions::default()).await
    }

    /// Opens `path` and takes `access` with `options`, failing at once on a conflict. One pool
    /// round trip.
    ///
    /// # Errors
    /// As [`qlock_core::ImageLock::acquire_with`].
    pub async fn acquire_with(
        path: impl AsRef<Path>,
        access: Access,
        options: &LockOptions,
    ) -> Result<Self, Error> {
        let (path, opts, find_holders) = Self::quiet(path.as_ref(), options);
        R::asyncify(move || {
            let mut lock = Core::open(&path, &opts)?;
            match lock.set_access(access) {
                Ok(()) => Ok(Opened::new(lock)),
                Err(e) => Err(if find_holders { lock.with_holders(e) } else { e }),
            }
        })
        .await
        .map(|o| Self::wrap(o, find_holders))
    }

    /// Opens `path` and waits for `access`, polling with `backoff` until its timeout through
    /// the core's one waiting loop ([`retry`]), and retrying at once when the image is closed
    /// by anyone ([`SharedCloseWatch`]).
    ///
    /// The open and the first attempt share one pool round trip; on a local filesystem the
    /// retries then run inline. A wait that times out crosses once more, at the end, to name
    /// the holders (a walk over `/proc`) and close its inotify watch in the same closure; one
    /// whose deadline has passed by the first attempt names them in the first round trip.
    ///
    /// # Errors
    /// [`Error::TimedOut`] naming the last conflict and its holders (with
    /// [`LockOptions::find_holders`]); any error other than a conflict ends the wait at once.
    /// Nothing is held after an error.
    pub async fn acquire_wait(
        path: impl AsRef<Path>,
        access: Access,
        options: &LockOptions,
        backoff: &Backoff,
    ) -> Result<Self, Error> {
        let start = Instant::now();
        let (path, opts, find_holders) = Self::quiet(path.as_ref(), options);
        let timeout = backoff.timeout;
        let (opened, watch) = R::asyncify(move || {
            let mut lock = Core::open(&path, &opts)?;
            match lock.set_access(access) {
                Ok(()) => Ok((Opened::new(lock), None)),
                Err(e) if !e.is_conflict() => Err(e),
                Err(e) if timeout.is_some_and(|t| start.elapsed() >= t) => {
                    // The deadline passed already: end the wait in this round trip.
                    let e = e.timed_out(start.elapsed());
                    Err(if find_holders { lock.with_holders(e) } else { e })
                }
                // Watch before the next attempt, so no close in between goes unseen.
                Err(_) => Ok((Opened::new(lock), Some(Self::watch(&path)))),
            }
        })
        .await?;
        let mut guard = Self::wrap(opened, find_holders);
        let Some(watch) = watch else { return Ok(guard) };
        let rest = backoff.clone();
        guard.wait_loop(access, &rest, R::register(watch)).await?;
        Ok(guard)
    }

    /// Changes the access of this open image with QEMU's semantics (see
    /// [`qlock_core::ImageLock::set_access`]), failing at once on a conflict.
    ///
    /// # Errors
    /// As [`qlock_core::ImageLock::set_access`]; the previous access is still held.
    pub async fn set_access(&mut self, access: Access) -> Result<(), Error> {
        let r = self.run(move |l| l.set_access(access)).await;
        match r {
            Err(e) if e.is_conflict() => Err(self.name_holders(e, None).await),
            r => r,
        }
    }

    /// Waits until `access` can be had on this open image, then takes it, as
    /// [`AsyncImageLock::acquire_wait`] does.
    ///
    /// # Errors
    /// As [`AsyncImageLock::acquire_wait`]; the previous access is still held on error.
    pub async fn wait_for(&mut self, access: Access, backoff: &Backoff) -> Result<(), Error> {
        self.home.reclaim::<R>().await?;
        let path = self.path.clone();
        let watch =
            if self.local { Self::watch(&path) } else { R::asyncify(move || Ok(Self::watch(&path))).await? };
        self.wait_loop(access, backoff, R::register(watch)).await
    }

    /// Releases every lock and closes the image, reporting an unlock failure that dropping would
    /// only log. Inline on a local filesystem, one pool round trip elsewhere.
    ///
    /// # Errors
    /// As [`qlock_core::ImageLock::release`]; the descriptor is closed regardless.
    pub async fn release(mut self) -> Result<(), Error> {
        self.home.reclaim::<R>().await?;
        let lock = self.home.take().ok_or_else(busy)?;
        if self.local { lock.release() } else { R::asyncify(move || lock.release()).await }
    }

    /// The access held now. While a cancelled call on a non-local filesystem still finishes in
    /// the pool, the access from before it (which it either keeps or replaces in full).
    pub fn access(&self) -> Access {
        self.home.state().0
    }

    /// The protocol bytes this descriptor holds (as [`AsyncImageLock::access`], before a
    /// cancelled call that still finishes in the pool).
    pub fn held(&self) -> LockSet {
        self.home.state().1
    }

    /// The path as given when opening.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open image, for I/O; `None` after a call on a non-local filesystem was cancelled
    /// while its pool closure had the descriptor: while that closure still runs, and after it
    /// has parked the descriptor, until the guard's next call takes it back (any later call
    /// waits for it to come back).
    pub fn file(&self) -> Option<&File> {
        self.home.here.as_ref().map(Core::file)
    }

    /// Whether lock calls on this image run inline on the executor (a local filesystem).
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// True if the guard had lost its descriptor. Cancellation never loses it (a descriptor
    /// lent to the pool always comes back, see the [crate docs](crate#cancellation)), so there
    /// is no `Error::Lost` and this is false for every guard: a check of that promise for the
    /// tests (and the `testing` feature's scenarios), not part of the release API.
    #[cfg(any(test, feature = "testing"))]
    pub fn is_lost(&self) -> bool {
        self.home.is_lost()
    }

    /// The synchronous guard inside, for blocking code. Blocks while a cancelled call on a
    /// non-local filesystem still finishes in the pool with the descriptor.
    ///
    /// # Errors
    /// None today; kept so that a later failure to hand over can be reported.
    pub fn into_core(mut self) -> Result<Core, Error> {
        Ok(self.home.reclaim_blocking())
    }

    /// Sends every lock call to the pool, as on a non-local filesystem: the unit tests' way to
    /// that path on a local one.
    #[cfg(test)]
    pub(crate) fn force_pool(&mut self) {
        self.local = false;
    }

    /// Waits until the descriptor is back from a cancelled call's pool closure.
    #[cfg(test)]
    pub(crate) async fn settle(&mut self) {
        self.home.reclaim::<R>().await.expect("the pool runs");
    }

    fn wrap(Opened { lock, local }: Opened, find_holders: bool) -> Self {
        let path = lock.path().to_path_buf();
        AsyncImageLock { path, home: Home::new(lock), local, find_holders, runtime: PhantomData }
    }

    /// The path, the options of the guard's core, and whether the caller wants holders named.
    /// The core never names them itself: a walk over `/proc` must not run inline on the
    /// executor, so the guard names them on the pool ([`Self::name_holders`]) or in the
    /// closure that already runs there.
    fn quiet(path: &Path, options: &LockOptions) -> (PathBuf, LockOptions, bool) {
        (path.to_path_buf(), options.clone().with_find_holders(false), options.find_holders)
    }

    /// Watches `path` for closes. Cheap (two syscalls), but a path lookup: call it where
    /// lookups may run.
    fn watch(path: &Path) -> Option<SharedCloseWatch> {
        SharedCloseWatch::new(path).ok()
    }

    /// The waiting loop proper: the core's [`retry`], attempting inline or in the pool.
    async fn wait_loop(&mut self, access: Access, backoff: &Backoff, hint: R::Hint) -> Result<(), Error> {
        let result = {
            let local = self.local;
            let slot = self.home.slot::<R>();
            let (slot, hint) = (&slot, &hint);
            retry(backoff, || slot.run(local, move |l| l.set_access(access)), |d| R::sleep(hint, d)).await
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => Err(self.name_holders(e, R::unregister(hint)).await),
        }
    }

    /// Runs one lock operation on the descriptor, inline or in the pool.
    async fn run<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Core) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let local = self.local;
        self.home.reclaim::<R>().await?;
        self.home.slot::<R>().run(local, f).await
    }

    /// Fills in the holders of a conflict: a walk over `/proc`, so in the pool, which gets only
    /// what the walk needs ([`qlock_core::HolderLookup`]); the descriptor stays with the guard,
    /// so dropping this future loses nothing. `watch`, the inotify watch of a finished wait, is
    /// closed in the same closure.
    async fn name_holders(&mut self, err: Error, watch: Option<SharedCloseWatch>) -> Error {
        let lookup = self.home.get().map(|l| l.holder_lookup());
        let Some(lookup) = lookup.filter(|_| self.find_holders && err.conflict().is_some()) else {
            if let Some(watch) = watch {
                R::drop_in_pool(watch);
            }
            return err;
        };
        let named = R::asyncify(move || {
            let named = lookup.with_holders(err);
            drop(watch);
            Ok(named)
        });
        named.await.unwrap_or_else(|e| e)
    }
}

impl<R: Runtime> fmt::Debug for AsyncImageLock<R> {
    /// As the runtime crates' `ImageLock` has always printed itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageLock")
            .field("inner", &self.home.here)
            .field("path", &self.path)
            .field("local", &self.local)
            .field("find_holders", &self.find_holders)
            .finish()
    }
}

impl<R: Runtime> Drop for AsyncImageLock<R> {
    fn drop(&mut self) {
        let Some(lock) = self.home.take() else { return };
        if self.local {
            return drop(lock);
        }
        // close(2) may wait for a file server: leave it to the pool.
        R::drop_in_pool(lock);
    }
}

/// A lock opened in the pool, with its filesystem classified there too: `fstatfs` on a
/// network filesystem asks the server, so it must not run on the executor.
struct Opened {
    lock: Core,
    local: bool,
}

impl Opened {
    fn new(lock: Core) -> Opened {
        let local = is_local_fs(lock.as_fd());
        Opened { lock, local }
    }
}
