//! [`ImageLock`]: the async guard over [`qlock_core::ImageLock`].

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use qlock_core::sys::is_local_fs;
use qlock_core::wait::retry;
use qlock_core::{Access, Backoff, Error, LockOptions, LockSet};

use crate::hint::Hint;
use crate::offload::asyncify;

type Core = qlock_core::ImageLock;

/// An open image holding QEMU-compatible read locks, for tokio.
///
/// The async twin of [`qlock_core::ImageLock`], with the same methods, errors and QEMU
/// semantics. Dropping it releases every lock without blocking the executor (see the
/// [crate docs](crate#dropping-a-guard)).
#[must_use = "the locks are released when the ImageLock is dropped"]
#[derive(Debug)]
pub struct ImageLock {
    /// `None` once a call that owned the descriptor in the pool was cancelled.
    inner: Option<Core>,
    path: PathBuf,
    /// Lock calls may run inline (see [`is_local_fs`]).
    local: bool,
    find_holders: bool,
}

impl ImageLock {
    /// Opens `path` and takes `access` with default options, failing at once on a conflict.
    /// One pool round trip.
    ///
    /// # Errors
    /// As [`qlock_core::ImageLock::acquire`]: [`Error::Conflict`] naming the holders, open and
    /// filesystem errors.
    pub async fn acquire(path: impl AsRef<Path>, access: Access) -> Result<ImageLock, Error> {
        ImageLock::acquire_with(path, access, &LockOptions::default()).await
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
    ) -> Result<ImageLock, Error> {
        let (path, opts) = (path.as_ref().to_path_buf(), options.clone());
        let find_holders = opts.find_holders;
        asyncify(move || Core::acquire_with(&path, access, &opts))
            .await
            .map(|l| ImageLock::wrap(l, find_holders))
    }

    /// [`ImageLock::acquire_with`] without naming the holders on a conflict: the cheap attempt
    /// for callers that poll themselves (the `try_` of [`qlock_core::ImageLock::try_set_access`]).
    ///
    /// # Errors
    /// As [`ImageLock::acquire_with`], with [`qlock_core::Conflict::holders`] left empty.
    pub async fn try_acquire(
        path: impl AsRef<Path>,
        access: Access,
        options: &LockOptions,
    ) -> Result<ImageLock, Error> {
        let options = LockOptions { find_holders: false, ..options.clone() };
        ImageLock::acquire_with(path, access, &options).await
    }

    /// Opens `path` and waits for `access`, polling with `backoff` until its timeout and
    /// retrying at once when the image is closed by anyone (see the
    /// [crate docs](crate#waiting)).
    ///
    /// The open and the first attempt share one pool round trip; on a local filesystem the
    /// retries then run inline.
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
    ) -> Result<ImageLock, Error> {
        let (path, opts) = (path.as_ref().to_path_buf(), options.clone());
        let find_holders = opts.find_holders;
        let (lock, first, watch) = asyncify(move || {
            let mut lock = Core::open(&path, &opts)?;
            let first = lock.try_set_access(access);
            // Watch before the next attempt, so no close in between goes unseen.
            let watch = match &first {
                Err(e) if e.is_conflict() => Hint::watch(&path),
                _ => None,
            };
            Ok((lock, first, watch))
        })
        .await?;
        let mut guard = ImageLock::wrap(lock, find_holders);
        match first {
            Ok(()) => Ok(guard),
            Err(e) if !e.is_conflict() => Err(e),
            Err(_) => {
                guard.wait_loop(access, backoff, Hint::register(watch)).await?;
                Ok(guard)
            }
        }
    }

    /// Changes the access of this open image with QEMU's semantics (see
    /// [`qlock_core::ImageLock::set_access`]), failing at once on a conflict.
    ///
    /// # Errors
    /// As [`qlock_core::ImageLock::set_access`]; the previous access is still held.
    pub async fn set_access(&mut self, access: Access) -> Result<(), Error> {
        let r = self.run(move |l| l.try_set_access(access)).await;
        match r {
            Err(e) if e.is_conflict() && self.find_holders => Err(self.name_holders(e).await),
            r => r,
        }
    }

    /// [`ImageLock::set_access`] without naming the holders on a conflict.
    ///
    /// # Errors
    /// As [`ImageLock::set_access`], with [`qlock_core::Conflict::holders`] left empty.
    pub async fn try_set_access(&mut self, access: Access) -> Result<(), Error> {
        self.run(move |l| l.try_set_access(access)).await
    }

    /// Waits until `access` can be had on this open image, then takes it, as
    /// [`ImageLock::acquire_wait`] does.
    ///
    /// # Errors
    /// As [`ImageLock::acquire_wait`]; the previous access is still held on error.
    pub async fn wait_for(&mut self, access: Access, backoff: &Backoff) -> Result<(), Error> {
        let path = self.path.clone();
        let watch =
            if self.local { Hint::watch(&path) } else { asyncify(move || Ok(Hint::watch(&path))).await? };
        self.wait_loop(access, backoff, Hint::register(watch)).await
    }

    /// Releases every lock and closes the image, reporting an unlock failure that dropping would
    /// only log. Inline on a local filesystem, one pool round trip elsewhere.
    ///
    /// # Errors
    /// As [`qlock_core::ImageLock::release`]; the descriptor is closed regardless.
    pub async fn release(mut self) -> Result<(), Error> {
        let lock = self.inner.take().ok_or_else(|| lost(&self.path))?;
        if self.local { lock.release() } else { asyncify(move || lock.release()).await }
    }

    /// The access held now (nothing once [lost](ImageLock::is_lost)).
    pub fn access(&self) -> Access {
        self.inner
            .as_ref()
            .map_or(Access::new(qlock_core::Perm::empty(), qlock_core::Perm::ALL), Core::access)
    }

    /// The protocol bytes this descriptor holds.
    pub fn held(&self) -> LockSet {
        self.inner.as_ref().map_or(LockSet::EMPTY, Core::held)
    }

    /// The path as given when opening.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open image, for I/O; `None` once [lost](ImageLock::is_lost).
    pub fn file(&self) -> Option<&File> {
        self.inner.as_ref().map(Core::file)
    }

    /// Whether lock calls on this image run inline on the executor (a local filesystem).
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// True when a call that had handed the descriptor to the blocking pool was cancelled, so
    /// the descriptor was closed there: the guard holds nothing and its calls fail.
    pub fn is_lost(&self) -> bool {
        self.inner.is_none()
    }

    /// The synchronous guard inside, for blocking code.
    ///
    /// # Errors
    /// [`Error::Io`] when the guard [is lost](ImageLock::is_lost).
    pub fn into_core(mut self) -> Result<Core, Error> {
        self.inner.take().ok_or_else(|| lost(&self.path))
    }

    fn wrap(lock: Core, find_holders: bool) -> ImageLock {
        let local = is_local_fs(lock.as_fd());
        ImageLock { path: lock.path().to_path_buf(), inner: Some(lock), local, find_holders }
    }

    /// The waiting loop proper: the core's [`retry`], attempting inline or in the pool.
    async fn wait_loop(&mut self, access: Access, backoff: &Backoff, hint: Hint) -> Result<(), Error> {
        let result = {
            let slot = Slot::new(&mut self.inner);
            let (slot, local) = (&slot, self.local);
            retry(backoff, || slot.run(local, move |l| l.try_set_access(access)), |d| hint.sleep(d)).await
        };
        match result {
            Err(e) if self.find_holders => Err(self.name_holders(e).await),
            r => r,
        }
    }

    /// Runs one lock operation on the descriptor, inline or in the pool.
    async fn run<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Core) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        Slot::new(&mut self.inner).run(self.local, f).await
    }

    /// Fills in the holders of a conflict (a walk over `/proc`, so in the pool).
    async fn name_holders(&mut self, err: Error) -> Error {
        let slot = Slot::new(&mut self.inner);
        let named = slot.run(false, move |l| Ok(l.with_holders(err))).await;
        named.unwrap_or_else(|e| e)
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        let Some(lock) = self.inner.take() else { return };
        if self.local {
            return drop(lock);
        }
        // close(2) may wait for a file server: leave it to the pool when there is one.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || drop(lock))),
            Err(_) => drop(lock),
        }
    }
}

/// Lends the guard's descriptor to one operation at a time, from closures the waiting loop
/// calls repeatedly, and puts it back when dropped (also when the caller's future is).
struct Slot<'a> {
    home: &'a mut Option<Core>,
    lent: Mutex<Option<Core>>,
}

impl<'a> Slot<'a> {
    fn new(home: &'a mut Option<Core>) -> Slot<'a> {
        let lent = Mutex::new(home.take());
        Slot { home, lent }
    }

    fn take(&self) -> Option<Core> {
        self.lent.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn put(&self, lock: Core) {
        *self.lent.lock().unwrap_or_else(PoisonError::into_inner) = Some(lock);
    }

    /// Runs `f` inline when `local`, else in the pool with the descriptor moved there: if this
    /// future is dropped meanwhile, the pool thread drops (closes) it.
    async fn run<T: Send + 'static>(
        &self,
        local: bool,
        f: impl FnOnce(&mut Core) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let mut lock = self.take().ok_or_else(|| lost(Path::new("")))?;
        if local {
            let r = f(&mut lock);
            self.put(lock);
            return r;
        }
        let (lock, r) = asyncify(move || {
            let r = f(&mut lock);
            Ok((lock, r))
        })
        .await?;
        self.put(lock);
        r
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.home = self.take();
    }
}

fn lost(path: &Path) -> Error {
    Error::Io {
        what: format!(
            "'{}': the image lock was released when an earlier call on it was cancelled",
            path.display()
        ),
        source: io::Error::from(io::ErrorKind::NotConnected),
    }
}
