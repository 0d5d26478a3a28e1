//! [`AsyncImageLock`]: the async guard, written once for every runtime.
//!
//! The async crates (`qlock-tokio`, `qlock-async-std`) differ only in how they reach their
//! runtime: which thread pool runs blocking calls, which timer sleeps, which reactor watches
//! the image for closes. Everything else, and in particular what happens when a future is
//! dropped half-way, is the same, so it lives here, on plain `std` futures, generic over a
//! [`Runtime`] that supplies those few pieces. Each async crate implements [`Runtime`] for a
//! marker type and names the guard `type ImageLock = AsyncImageLock<ItsRuntime>`; its crate
//! docs say what that means for its users (cancellation, dropping, examples).
//!
//! What runs where: opening an image, naming holders and [`inspect`] always cross to the pool,
//! once per operation. On a local filesystem ([`is_local_fs`]) lock calls are non-blocking
//! syscalls far cheaper than a pool round trip, so access changes, retries and releases run
//! inline on the executor; elsewhere (NFS, CIFS, FUSE) they go to the pool too, and the guard's
//! drop hands the descriptor to the pool ([`Runtime::drop_in_pool`]) because `close(2)` may
//! wait for a server.
//!
//! Cancellation: a closure on the pool owns what it works on, so a dropped future never leaks
//! a lock. An operation on an open guard borrows the descriptor through a `Slot` that puts it
//! back when the operation's future is dropped; if the descriptor was in the pool at that
//! moment (non-local filesystems only), the pool closes it and the guard is
//! [lost](AsyncImageLock::is_lost).
//!
//! The async crates name the guard with a type alias rather than a newtype: rustdoc shows the
//! methods on the alias's page all the same, while a newtype would need a forwarding copy of
//! every method in every crate, the very duplication this module removes.
//!
//! A runtime is a handful of functions on a marker type. This one runs everything inline and
//! never sleeps, which is only fit for a doc test, but shows the shape:
//!
//! ```
//! use std::time::Duration;
//! use qlock_core::offload::{AsyncImageLock, Runtime};
//! use qlock_core::{Access, Error, wake::CloseWatch};
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
//!     fn register(_: Option<CloseWatch>) {}
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

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::holders::ImageStatus;
use crate::sys::is_local_fs;
use crate::wait::{Backoff, retry};
use crate::wake::CloseWatch;
use crate::{Access, Error, LockOptions, LockSet, Perm};

type Core = crate::ImageLock;

/// What an async runtime supplies to [`AsyncImageLock`]: a blocking pool, and a sleep that a
/// close of the image can cut short. Implemented on a marker type by each async crate.
///
/// Every future returned must be `Send`, so the guard's futures are too (`tokio::spawn` needs
/// that).
pub trait Runtime: Send + Sync + 'static {
    /// A [`CloseWatch`] registered with the runtime's reactor, or nothing (the wait then only
    /// polls). Dropping it must not block the executor: closing an inotify descriptor waits
    /// for a kernel grace period of about 10 ms.
    type Hint: Send + Sync;

    /// Runs `f` on the blocking pool. `f` owns what it opens: if the returned future is dropped
    /// after `f` started, `f` still finishes and its result (a guard, say) is dropped there.
    fn asyncify<T, F>(f: F) -> impl Future<Output = Result<T, Error>> + Send
    where
        F: FnOnce() -> Result<T, Error> + Send + 'static,
        T: Send + 'static;

    /// Drops `value` on the blocking pool without waiting (inline where there is no pool).
    fn drop_in_pool<T: Send + 'static>(value: T);

    /// Registers `watch` with the reactor; called from within the runtime.
    fn register(watch: Option<CloseWatch>) -> Self::Hint;

    /// Sleeps for `delay`, or less if `hint` sees the image closed meanwhile.
    fn sleep(hint: &Self::Hint, delay: Duration) -> impl Future<Output = ()> + Send;

    /// Whether waits watch the image for closes at all; a switch for benchmarks.
    fn close_hint_enabled() -> bool {
        true
    }
}

/// An open image holding QEMU-compatible read locks, for the async runtime `R`.
///
/// The async twin of [`crate::ImageLock`], with the same methods, errors and QEMU semantics,
/// and futures that never block the executor and leak no lock when dropped (see the
/// [module docs](self)). Dropping the guard releases every lock: inline on a local
/// filesystem, on the pool elsewhere. Users name it through their runtime's crate, e.g.
/// `qlock_tokio::ImageLock`.
#[must_use = "the locks are released when the ImageLock is dropped"]
pub struct AsyncImageLock<R: Runtime> {
    /// `None` once a call that owned the descriptor in the pool was cancelled.
    inner: Option<Core>,
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
    /// As [`crate::ImageLock::acquire`]: [`Error::Conflict`] naming the holders, open and
    /// filesystem errors.
    pub async fn acquire(path: impl AsRef<Path>, access: Access) -> Result<Self, Error> {
        Self::acquire_with(path, access, &LockOptions::default()).await
    }

    /// Opens `path` and takes `access` with `options`, failing at once on a conflict. One pool
    /// round trip.
    ///
    /// # Errors
    /// As [`crate::ImageLock::acquire_with`].
    pub async fn acquire_with(
        path: impl AsRef<Path>,
        access: Access,
        options: &LockOptions,
    ) -> Result<Self, Error> {
        let (path, opts) = (path.as_ref().to_path_buf(), options.clone());
        let find_holders = opts.find_holders;
        R::asyncify(move || Core::acquire_with(&path, access, &opts).map(Opened::new))
            .await
            .map(|o| Self::wrap(o, find_holders))
    }

    /// [`AsyncImageLock::acquire_with`] without naming the holders on a conflict: the cheap
    /// attempt for callers that poll themselves (the `try_` of
    /// [`crate::ImageLock::try_set_access`]).
    ///
    /// # Errors
    /// As [`AsyncImageLock::acquire_with`], with [`crate::Conflict::holders`] left empty.
    pub async fn try_acquire(
        path: impl AsRef<Path>,
        access: Access,
        options: &LockOptions,
    ) -> Result<Self, Error> {
        let options = LockOptions { find_holders: false, ..options.clone() };
        Self::acquire_with(path, access, &options).await
    }

    /// Opens `path` and waits for `access`, polling with `backoff` until its timeout through
    /// the core's one waiting loop ([`retry`]), and retrying at once when the image is closed
    /// by anyone ([`CloseWatch`]).
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
    ) -> Result<Self, Error> {
        let (path, opts) = (path.as_ref().to_path_buf(), options.clone());
        let find_holders = opts.find_holders;
        let (lock, first, watch) = R::asyncify(move || {
            let mut lock = Core::open(&path, &opts)?;
            let first = lock.try_set_access(access);
            // Watch before the next attempt, so no close in between goes unseen.
            let watch = match &first {
                Err(e) if e.is_conflict() => Self::watch(&path),
                _ => None,
            };
            Ok((Opened::new(lock), first, watch))
        })
        .await?;
        let mut guard = Self::wrap(lock, find_holders);
        match first {
            Ok(()) => Ok(guard),
            Err(e) if !e.is_conflict() => Err(e),
            Err(_) => {
                guard.wait_loop(access, backoff, R::register(watch)).await?;
                Ok(guard)
            }
        }
    }

    /// Changes the access of this open image with QEMU's semantics (see
    /// [`crate::ImageLock::set_access`]), failing at once on a conflict.
    ///
    /// # Errors
    /// As [`crate::ImageLock::set_access`]; the previous access is still held.
    pub async fn set_access(&mut self, access: Access) -> Result<(), Error> {
        let r = self.run(move |l| l.try_set_access(access)).await;
        match r {
            Err(e) if e.is_conflict() && self.find_holders => Err(self.name_holders(e).await),
            r => r,
        }
    }

    /// [`AsyncImageLock::set_access`] without naming the holders on a conflict.
    ///
    /// # Errors
    /// As [`AsyncImageLock::set_access`], with [`crate::Conflict::holders`] left empty.
    pub async fn try_set_access(&mut self, access: Access) -> Result<(), Error> {
        self.run(move |l| l.try_set_access(access)).await
    }

    /// Waits until `access` can be had on this open image, then takes it, as
    /// [`AsyncImageLock::acquire_wait`] does.
    ///
    /// # Errors
    /// As [`AsyncImageLock::acquire_wait`]; the previous access is still held on error.
    pub async fn wait_for(&mut self, access: Access, backoff: &Backoff) -> Result<(), Error> {
        let path = self.path.clone();
        let watch =
            if self.local { Self::watch(&path) } else { R::asyncify(move || Ok(Self::watch(&path))).await? };
        self.wait_loop(access, backoff, R::register(watch)).await
    }

    /// Releases every lock and closes the image, reporting an unlock failure that dropping would
    /// only log. Inline on a local filesystem, one pool round trip elsewhere.
    ///
    /// # Errors
    /// As [`crate::ImageLock::release`]; the descriptor is closed regardless.
    pub async fn release(mut self) -> Result<(), Error> {
        let lock = self.inner.take().ok_or_else(|| lost(&self.path))?;
        if self.local { lock.release() } else { R::asyncify(move || lock.release()).await }
    }

    /// The access held now (nothing once [lost](AsyncImageLock::is_lost)).
    pub fn access(&self) -> Access {
        self.inner.as_ref().map_or(Access::new(Perm::empty(), Perm::ALL), Core::access)
    }

    /// The protocol bytes this descriptor holds.
    pub fn held(&self) -> LockSet {
        self.inner.as_ref().map_or(LockSet::EMPTY, Core::held)
    }

    /// The path as given when opening.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open image, for I/O; `None` once [lost](AsyncImageLock::is_lost).
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
    /// [`Error::Io`] when the guard [is lost](AsyncImageLock::is_lost).
    pub fn into_core(mut self) -> Result<Core, Error> {
        self.inner.take().ok_or_else(|| lost(&self.path))
    }

    fn wrap(Opened { lock, local }: Opened, find_holders: bool) -> Self {
        let path = lock.path().to_path_buf();
        AsyncImageLock { path, inner: Some(lock), local, find_holders, runtime: PhantomData }
    }

    /// Watches `path` for closes. Cheap (two syscalls), but a path lookup: call it where
    /// lookups may run.
    fn watch(path: &Path) -> Option<CloseWatch> {
        if !R::close_hint_enabled() {
            return None;
        }
        CloseWatch::new(path).ok()
    }

    /// The waiting loop proper: the core's [`retry`], attempting inline or in the pool.
    async fn wait_loop(&mut self, access: Access, backoff: &Backoff, hint: R::Hint) -> Result<(), Error> {
        let result = {
            let slot = Slot::<R>::new(&mut self.inner);
            let (slot, local) = (&slot, self.local);
            let hint = &hint;
            retry(backoff, || slot.run(local, move |l| l.try_set_access(access)), |d| R::sleep(hint, d)).await
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
        Slot::<R>::new(&mut self.inner).run(self.local, f).await
    }

    /// Fills in the holders of a conflict (a walk over `/proc`, so in the pool).
    async fn name_holders(&mut self, err: Error) -> Error {
        let slot = Slot::<R>::new(&mut self.inner);
        let named = slot.run(false, move |l| Ok(l.with_holders(err))).await;
        named.unwrap_or_else(|e| e)
    }
}

impl<R: Runtime> fmt::Debug for AsyncImageLock<R> {
    /// As the runtime crates' `ImageLock` has always printed itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageLock")
            .field("inner", &self.inner)
            .field("path", &self.path)
            .field("local", &self.local)
            .field("find_holders", &self.find_holders)
            .finish()
    }
}

impl<R: Runtime> Drop for AsyncImageLock<R> {
    fn drop(&mut self) {
        let Some(lock) = self.inner.take() else { return };
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

/// Lends the guard's descriptor to one operation at a time, from closures the waiting loop
/// calls repeatedly, and puts it back when dropped (also when the caller's future is).
struct Slot<'a, R> {
    home: &'a mut Option<Core>,
    lent: Mutex<Option<Core>>,
    runtime: PhantomData<fn() -> R>,
}

impl<'a, R: Runtime> Slot<'a, R> {
    fn new(home: &'a mut Option<Core>) -> Slot<'a, R> {
        let lent = Mutex::new(home.take());
        Slot { home, lent, runtime: PhantomData }
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
        let (lock, r) = R::asyncify(move || {
            let r = f(&mut lock);
            Ok((lock, r))
        })
        .await?;
        self.put(lock);
        r
    }
}

impl<R> Drop for Slot<'_, R> {
    fn drop(&mut self) {
        *self.home = self.lent.get_mut().unwrap_or_else(PoisonError::into_inner).take();
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

/// [`crate::inspect`] on `R`'s blocking pool: probes each image and names the holders with one
/// walk over `/proc`, locking nothing.
///
/// # Errors
/// One result per path, in order; a path that cannot be opened or probed fails alone, and a
/// failed pool task fails them all with [`Error::Io`].
pub async fn inspect<R: Runtime, P: AsRef<Path>>(
    paths: impl IntoIterator<Item = P>,
) -> Vec<Result<ImageStatus, Error>> {
    let paths: Vec<PathBuf> = paths.into_iter().map(|p| p.as_ref().to_path_buf()).collect();
    let n = paths.len();
    match R::asyncify(move || Ok(crate::inspect(&paths))).await {
        Ok(all) => all,
        Err(e) => {
            let msg = e.to_string();
            (0..n)
                .map(|_| Err(Error::Io { what: msg.clone(), source: io::Error::other("task failed") }))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::{Pin, pin};
    use std::task::{Context, Poll, Waker};

    use super::*;

    /// A runtime without a pool or a reactor: everything inline, and a sleep that only yields
    /// once, so a wait stays pending between attempts like a real one.
    enum Inline {}

    impl Runtime for Inline {
        type Hint = Option<CloseWatch>;
        async fn asyncify<T, F>(f: F) -> Result<T, Error>
        where
            F: FnOnce() -> Result<T, Error> + Send + 'static,
            T: Send + 'static,
        {
            f()
        }
        fn drop_in_pool<T: Send + 'static>(value: T) {
            drop(value);
        }
        fn register(watch: Option<CloseWatch>) -> Option<CloseWatch> {
            watch
        }
        async fn sleep(_: &Option<CloseWatch>, _: Duration) {
            let mut yielded = false;
            std::future::poll_fn(|_| {
                if std::mem::replace(&mut yielded, true) { Poll::Ready(()) } else { Poll::Pending }
            })
            .await;
        }
    }

    fn send<T: Send>(_: &T) {}

    /// Compile-time: every future of the guard is `Send` for any runtime, so executors that
    /// move tasks between threads (`tokio::spawn`) accept them.
    #[allow(dead_code)]
    fn futures_are_send<R: Runtime>(guard: &mut AsyncImageLock<R>, owned: AsyncImageLock<R>) {
        let (opts, backoff) = (LockOptions::default(), Backoff::default());
        send(&AsyncImageLock::<R>::acquire("p", Access::READ));
        send(&AsyncImageLock::<R>::acquire_with("p", Access::READ, &opts));
        send(&AsyncImageLock::<R>::try_acquire("p", Access::READ, &opts));
        send(&AsyncImageLock::<R>::acquire_wait("p", Access::READ, &opts, &backoff));
        send(&inspect::<R, _>(["p"]));
        send(&guard.set_access(Access::READ));
        send(&guard.try_set_access(Access::READ));
        send(&guard.wait_for(Access::READ, &backoff));
        send(&owned.release());
    }

    fn poll<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
        fut.poll(&mut Context::from_waker(Waker::noop()))
    }

    fn block_on<F: Future>(fut: F) -> F::Output {
        let mut fut = pin!(fut);
        loop {
            if let Poll::Ready(out) = poll(fut.as_mut()) {
                return out;
            }
        }
    }

    #[test]
    fn the_generic_guard_keeps_qemu_semantics_and_failed_or_dropped_waits_keep_the_old_access() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"").unwrap();
        let vm = Core::acquire(&path, Access::WRITE).unwrap();
        let err = block_on(AsyncImageLock::<Inline>::acquire(&path, Access::READ)).unwrap_err();
        assert_eq!(err.conflict().unwrap().holders[0].pid, std::process::id());
        let mut guard = block_on(AsyncImageLock::<Inline>::acquire(&path, Access::FORCE_SHARE)).unwrap();
        assert!(guard.is_local());
        let before = guard.held();
        // A wait dropped between attempts, and one that times out, keep what was held before.
        let patient = Backoff::default();
        {
            let mut wait = pin!(guard.wait_for(Access::READ, &patient));
            for _ in 0..3 {
                assert!(poll(wait.as_mut()).is_pending());
            }
        }
        assert_eq!((guard.access(), guard.held(), guard.is_lost()), (Access::FORCE_SHARE, before, false));
        let policy = Backoff::default().with_timeout(Duration::from_millis(20));
        let err = block_on(guard.wait_for(Access::READ, &policy)).unwrap_err();
        assert!(matches!(err, Error::TimedOut { .. }), "{err}");
        assert_eq!((guard.access(), guard.held(), guard.is_lost()), (Access::FORCE_SHARE, before, false));
        drop(vm);
        block_on(guard.wait_for(Access::READ, &policy)).unwrap();
        assert_eq!(guard.access(), Access::READ);
        let status = block_on(inspect::<Inline, _>([&path])).remove(0).unwrap();
        assert_eq!(status.holders[0].pid, std::process::id());
        let core = guard.into_core().unwrap();
        assert_eq!(core.access(), Access::READ);
    }
}
