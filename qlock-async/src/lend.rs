//! Where a guard's descriptor lives, and how it is lent to one operation at a time, so that no
//! cancellation can lose it.
//!
//! The descriptor is normally with the guard ([`Home::here`]). An operation borrows it through
//! a [`Slot`], which gives it back when the operation ends or its future is dropped. On a
//! non-local filesystem the operation moves it into a pool closure inside a [`Lent`]; whatever
//! happens to that closure (finishes after its caller was dropped, is dropped unrun, panics),
//! dropping the `Lent` parks the descriptor in [`Home::away`], from where the guard takes it
//! back at its next call. Naming holders never lends the descriptor at all
//! ([`qlock_core::HolderLookup`]).

use std::marker::PhantomData;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use qlock_core::{Access, Error, LockSet};

use crate::runtime::Runtime;

pub(crate) type Core = qlock_core::ImageLock;

/// The guard's descriptor: with it, or on its way back from the pool.
pub(crate) struct Home {
    pub(crate) here: Option<Core>,
    away: Arc<Parked>,
    /// The access and bytes held when the descriptor was last lent: still true while it is away.
    before: (Access, LockSet),
}

/// Where a lent descriptor comes back to.
#[derive(Default)]
struct Parked {
    lock: Mutex<Option<Core>>,
    back: Condvar,
}

impl Parked {
    fn slot(&self) -> MutexGuard<'_, Option<Core>> {
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Home {
    pub(crate) fn new(lock: Core) -> Home {
        let before = (lock.access(), lock.held());
        Home { here: Some(lock), away: Arc::default(), before }
    }

    /// The descriptor, if it is with the guard or already parked; `None` only while a closure
    /// of a cancelled call still runs with it.
    pub(crate) fn get(&mut self) -> Option<&mut Core> {
        if self.here.is_none() {
            self.here = self.away.slot().take();
        }
        self.here.as_mut()
    }

    /// The descriptor, waiting (on the pool, where the closure that has it runs too) for a
    /// closure of a cancelled call to give it back.
    pub(crate) async fn reclaim<R: Runtime>(&mut self) -> Result<&mut Core, Error> {
        if self.get().is_none() {
            let away = Arc::clone(&self.away);
            R::asyncify(move || {
                let slot = away.slot();
                drop(away.back.wait_while(slot, |s| s.is_none()).unwrap_or_else(PoisonError::into_inner));
                Ok(())
            })
            .await?;
        }
        Ok(self.get().expect("a parked descriptor stays parked until the guard takes it"))
    }

    /// As [`Home::reclaim`], blocking the thread: for the guard's conversion to the sync core.
    pub(crate) fn reclaim_blocking(&mut self) -> Core {
        if let Some(lock) = self.here.take() {
            return lock;
        }
        let slot = self.away.slot();
        let mut slot =
            self.away.back.wait_while(slot, |s| s.is_none()).unwrap_or_else(PoisonError::into_inner);
        slot.take().expect("waited for it")
    }

    /// What is held now, or while the descriptor is away, what was held when it left (a lent
    /// descriptor comes back holding that or the new access, never less).
    pub(crate) fn state(&self) -> (Access, LockSet) {
        if let Some(lock) = &self.here {
            return (lock.access(), lock.held());
        }
        self.away.slot().as_ref().map_or(self.before, |l| (l.access(), l.held()))
    }

    /// True when the descriptor is neither here, nor parked, nor with a closure that will park
    /// it: a state the lending above never produces.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn is_lost(&self) -> bool {
        self.here.is_none() && Arc::strong_count(&self.away) == 1 && self.away.slot().is_none()
    }

    /// The descriptor, for dropping; `None` while a closure has it (it is then closed when the
    /// closure's `Lent` and this home are both gone).
    pub(crate) fn take(&mut self) -> Option<Core> {
        self.here.take().or_else(|| self.away.slot().take())
    }

    /// Starts an operation: the descriptor goes into a [`Slot`] until the operation ends.
    pub(crate) fn slot<R: Runtime>(&mut self) -> Slot<'_, R> {
        self.get();
        let lock = self.here.take();
        if let Some(l) = &lock {
            self.before = (l.access(), l.held());
        }
        Slot { home: self, lent: Mutex::new(lock), runtime: PhantomData }
    }
}

/// Lends the guard's descriptor to one operation at a time, from closures the waiting loop
/// calls repeatedly, and puts it back when dropped (also when the caller's future is).
pub(crate) struct Slot<'a, R> {
    home: &'a mut Home,
    lent: Mutex<Option<Core>>,
    runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> Slot<'_, R> {
    fn take(&self) -> Option<Core> {
        self.lent.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn put(&self, lock: Option<Core>) {
        *self.lent.lock().unwrap_or_else(PoisonError::into_inner) = lock;
    }

    /// Runs `f` inline when `local`, else in the pool with the descriptor moved there inside a
    /// [`Lent`], which parks it for the guard however the closure ends.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        local: bool,
        f: impl FnOnce(&mut Core) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let Some(mut lock) = self.take() else { return Err(busy()) };
        if local {
            let r = f(&mut lock);
            self.put(Some(lock));
            return r;
        }
        let lent = Lent::<R> { lock: Some(lock), away: Arc::clone(&self.home.away), runtime: PhantomData };
        let r = R::asyncify(move || {
            let mut lent = lent;
            let r = f(lent.lock.as_mut().expect("lent with a descriptor"));
            // Dropping `lent` parks the descriptor before this closure's result is sent.
            drop(lent);
            Ok(r)
        })
        .await;
        self.put(self.home.away.slot().take());
        r?
    }
}

impl<R> Drop for Slot<'_, R> {
    fn drop(&mut self) {
        if let Some(lock) = self.lent.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            self.home.here = Some(lock);
        }
    }
}

/// A descriptor inside a pool closure. Dropping it, wherever and however that happens, parks
/// the descriptor for its guard, or closes it on the pool when the guard is gone.
struct Lent<R: Runtime> {
    lock: Option<Core>,
    away: Arc<Parked>,
    runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> Drop for Lent<R> {
    fn drop(&mut self) {
        let Some(lock) = self.lock.take() else { return };
        if Arc::strong_count(&self.away) == 1 {
            // The guard was dropped meanwhile: close(2) may wait for a file server.
            return R::drop_in_pool(lock);
        }
        *self.away.slot() = Some(lock);
        self.away.back.notify_all();
    }
}

/// The descriptor is with a pool closure that has not given it back yet. Unreachable as the
/// lending above is written (a lent descriptor is parked however its closure ends, and every
/// operation reclaims it first), so it is reported as the pool failure it would be.
pub(crate) fn busy() -> Error {
    Error::Pool { message: "the image's descriptor is still with a task of an earlier call".into() }
}
