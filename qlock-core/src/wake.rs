//! A wake-up hint for waiters: inotify close events on the image.
//!
//! A holder's locks go away when its last descriptor of the image closes, and the kernel
//! reports that close to inotify as `IN_CLOSE_WRITE` or `IN_CLOSE_NOWRITE`. A waiter that
//! watches for them can retry at once instead of at the end of its backoff delay. It is only a
//! hint: a holder can drop locks without closing (QEMU inactivating an image for migration),
//! closes on other hosts of a network filesystem are never reported, and unrelated closes wake
//! the waiter for nothing. So waiting stays polling (the backoff loop of [`Backoff`](crate::Backoff)); the hint only
//! ends a sleep early.
//!
//! Two costs to plan for: closing a watch waits for an SRCU grace period in the kernel (about
//! 10 ms), so async callers close it on a blocking pool; and each watch is an inotify instance,
//! of which a user may have only `fs.inotify.max_user_instances` (often 128): past that,
//! [`CloseWatch::new`] fails with `EMFILE` and the waiter just polls.
//!
//! Many waiters in one process (an async service waiting on a thousand images) therefore share
//! one instance instead: [`SharedCloseWatch`] adds a watch (not an instance) per image to one
//! process-wide inotify instance, read by one thread that wakes the waiters of the image an
//! event names. Watches are limited per user too (`fs.inotify.max_user_watches`, 8,192 or
//! more), and removing one does not wait for a grace period, so dropping it is cheap anywhere.
//!
//! The descriptor is non-blocking, so async runtimes can register it with their reactor
//! (tokio's `AsyncFd`, async-io's `Async`) and call [`CloseWatch::drain`] when it is readable.
//!
//! ```
//! use qlock_core::CloseWatch;
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("disk.img");
//! # std::fs::write(&path, b"").unwrap();
//!
//! let watch = CloseWatch::new(&path)?;
//! assert!(!watch.drain()?);                 // nothing closed yet
//! drop(std::fs::File::open(&path)?);        // someone opens and closes the image
//! assert!(watch.drain()?);                  // ... and the watch saw it
//! assert!(!watch.drain()?);                 // events are consumed
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # References
//! - [`inotify(7)`](https://man7.org/linux/man-pages/man7/inotify.7.html)

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// An inotify instance watching one image for close events.
#[derive(Debug)]
pub struct CloseWatch {
    inotify: Inotify,
}

impl CloseWatch {
    /// Watches `path` for `IN_CLOSE_WRITE | IN_CLOSE_NOWRITE`, on a non-blocking, close-on-exec
    /// descriptor.
    ///
    /// # Errors
    /// The `inotify_init1(2)` or `inotify_add_watch(2)` error, e.g. `EMFILE` when the per-user
    /// limit of inotify instances is reached; waiters then just poll.
    pub fn new(path: impl AsRef<Path>) -> io::Result<CloseWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(path.as_ref(), AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_CLOSE_NOWRITE)?;
        Ok(CloseWatch { inotify })
    }

    /// Consumes every pending event without blocking; true when there was at least one.
    ///
    /// # Errors
    /// A `read(2)` error other than `EAGAIN`.
    pub fn drain(&self) -> io::Result<bool> {
        let mut seen = false;
        loop {
            match self.inotify.read_events() {
                Ok(events) if events.is_empty() => return Ok(seen),
                Ok(_) => seen = true,
                Err(Errno::EAGAIN) => return Ok(seen),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for CloseWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

/// Sleeps up to `timeout`, returning early when one of `watches` sees a close: the blocking
/// waiter's sleep. Without watches (inotify unavailable) it is a plain sleep.
pub fn sleep_or_close(watches: &[CloseWatch], timeout: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    if watches.is_empty() {
        return std::thread::sleep(timeout);
    }
    let mut fds: Vec<PollFd<'_>> =
        watches.iter().map(|w| PollFd::new(w.as_fd(), PollFlags::POLLIN)).collect();
    let ms = PollTimeout::try_from(timeout.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(n) if n > 0 => watches.iter().for_each(|w| drop(w.drain())),
        Ok(_) => {}
        Err(_) => std::thread::sleep(timeout),
    }
}

/// One image watched through the process-wide inotify instance: the async waiters' hint.
///
/// [`SharedCloseWatch::closed`] completes at the first close of the image since the watch was
/// made or since the last `closed` completed, from any runtime (the instance's reader thread
/// wakes the waker). Dropping the watch removes it (the image's kernel watch goes with its last
/// waiter); no grace period, so it may be dropped on an executor.
///
/// ```
/// use qlock_core::SharedCloseWatch;
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("disk.img");
/// # std::fs::write(&path, b"").unwrap();
/// let watch = SharedCloseWatch::new(&path)?;
/// drop(std::fs::File::open(&path)?); // someone opens and closes the image
/// # let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
/// # let mut closed = std::pin::pin!(watch.closed());
/// # let t = std::time::Instant::now();
/// # while closed.as_mut().poll(&mut cx).is_pending() {
/// #     assert!(t.elapsed().as_secs() < 10, "the reader thread reports the close");
/// #     std::thread::yield_now();
/// # }
/// // `watch.closed().await` completes
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct SharedCloseWatch {
    wd: WatchDescriptor,
    seen: Arc<Seen>,
}

/// A waiter's mailbox: set by the reader thread, taken by [`SharedCloseWatch::closed`].
#[derive(Debug, Default)]
struct Seen {
    closed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Seen {
    fn waker(&self) -> MutexGuard<'_, Option<Waker>> {
        self.waker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fire(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(w) = self.waker().take() {
            w.wake();
        }
    }
}

/// The process-wide instance and who waits on each of its watches.
struct Hub {
    inotify: Inotify,
    waiters: Mutex<HashMap<WatchDescriptor, Vec<Arc<Seen>>>>,
}

impl Hub {
    /// The instance, made (with its reader thread) on first use; `None` when inotify or the
    /// thread is unavailable, and waiters then poll.
    fn get() -> Option<&'static Hub> {
        static HUB: OnceLock<Option<&'static Hub>> = OnceLock::new();
        *HUB.get_or_init(|| {
            // Blocking reads: the reader thread sleeps in read(2) between events.
            let inotify = Inotify::init(InitFlags::IN_CLOEXEC).ok()?;
            let hub: &'static Hub = Box::leak(Box::new(Hub { inotify, waiters: Mutex::default() }));
            std::thread::Builder::new().name("qlock-inotify".into()).spawn(move || hub.read()).ok()?;
            Some(hub)
        })
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<WatchDescriptor, Vec<Arc<Seen>>>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reader thread: wakes every waiter of the image each close event names. On a read
    /// error it wakes everybody and stops; waiters then poll.
    fn read(&self) {
        loop {
            match self.inotify.read_events() {
                Ok(events) => {
                    let waiters = self.waiters();
                    for e in events.iter().filter(|e| !e.mask.contains(AddWatchFlags::IN_IGNORED)) {
                        waiters.get(&e.wd).into_iter().flatten().for_each(|s| s.fire());
                    }
                }
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(_) => return self.waiters().values().flatten().for_each(|s| s.fire()),
            }
        }
    }
}

impl SharedCloseWatch {
    /// Watches `path` for closes through the process-wide instance.
    ///
    /// # Errors
    /// `inotify_add_watch(2)`'s error (e.g. `ENOSPC` past `max_user_watches`), or
    /// `ENOSYS`-like `Unsupported` when the instance could not be made; waiters then poll.
    pub fn new(path: impl AsRef<Path>) -> io::Result<SharedCloseWatch> {
        let hub = Hub::get().ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?;
        // Under the lock: a watch removed by the last waiter of the same image meanwhile
        // would otherwise leave this one registered on a dead descriptor.
        let mut waiters = hub.waiters();
        let flags = AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_CLOSE_NOWRITE;
        let wd = hub.inotify.add_watch(path.as_ref(), flags)?;
        let seen = Arc::new(Seen::default());
        waiters.entry(wd).or_default().push(Arc::clone(&seen));
        Ok(SharedCloseWatch { wd, seen })
    }

    /// Completes at the next close of the image (or one seen since the last completion).
    pub fn closed(&self) -> Closed<'_> {
        Closed { seen: &self.seen }
    }
}

impl Drop for SharedCloseWatch {
    fn drop(&mut self) {
        let Some(hub) = Hub::get() else { return };
        let mut waiters = hub.waiters();
        let Some(list) = waiters.get_mut(&self.wd) else { return };
        list.retain(|s| !Arc::ptr_eq(s, &self.seen));
        if list.is_empty() {
            waiters.remove(&self.wd);
            // Fails only when the kernel removed it already (the image was deleted).
            let _ = hub.inotify.rm_watch(self.wd);
        }
    }
}

/// The future of [`SharedCloseWatch::closed`].
#[derive(Debug)]
pub struct Closed<'a> {
    seen: &'a Seen,
}

impl Future for Closed<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.seen.closed.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        *self.seen.waker() = Some(cx.waker().clone());
        // A close reported between the check and storing the waker would wake nobody.
        if self.seen.closed.swap(false, Ordering::AcqRel) { Poll::Ready(()) } else { Poll::Pending }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::temp_image;
    use crate::{Access, ImageLock};

    #[test]
    fn a_holder_releasing_its_image_is_seen_and_our_own_probes_are_not_missed() {
        let (_dir, path) = temp_image();
        let holder = ImageLock::acquire(&path, Access::WRITE).unwrap();
        let watch = CloseWatch::new(&path).unwrap();
        assert!(!watch.drain().unwrap());
        drop(holder);
        assert!(watch.drain().unwrap());
    }

    /// Polls `closed` until ready, or gives up after a generous bound (a thread of this
    /// process reports the close).
    fn reported(watch: &SharedCloseWatch) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut closed = std::pin::pin!(watch.closed());
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if closed.as_mut().poll(&mut cx).is_ready() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn more_shared_watches_than_the_instance_limit_all_see_their_image_closed() {
        let dir = tempfile::tempdir().unwrap();
        let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
            .map_or(128, |s| s.trim().parse().unwrap_or(128));
        // More waiters than instances a user may have, two per image.
        let n = (max + 8).min(2000);
        let paths: Vec<_> = (0..n / 2)
            .map(|i| {
                let p = dir.path().join(format!("{i}.img"));
                std::fs::write(&p, b"").unwrap();
                p
            })
            .collect();
        let holders: Vec<_> = paths.iter().map(|p| ImageLock::acquire(p, Access::WRITE).unwrap()).collect();
        let watches: Vec<_> =
            paths.iter().flat_map(|p| [p, p]).map(|p| SharedCloseWatch::new(p).unwrap()).collect();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(watches.iter().all(|w| std::pin::pin!(w.closed()).poll(&mut cx).is_pending()));
        drop(holders);
        assert!(watches.iter().all(reported));
        // Dropping one waiter of an image keeps the other's watch alive.
        let (first, second) =
            (SharedCloseWatch::new(&paths[0]).unwrap(), SharedCloseWatch::new(&paths[0]).unwrap());
        drop(first);
        drop(std::fs::File::open(&paths[0]).unwrap());
        assert!(reported(&second));
    }

    #[test]
    fn a_missing_image_is_an_error_not_a_panic() {
        assert_eq!(
            SharedCloseWatch::new("/nonexistent/qlock/img").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let err = CloseWatch::new("/nonexistent/qlock/img").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
