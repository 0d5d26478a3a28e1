//! [`AsyncChainLock`]: a whole image graph locked as QEMU locks it, for the async runtime `R`.

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use qlock_core::graph::{ChainError, ChainLock, Node};
use qlock_core::{Access, Backoff, Error, LockOptions, LockSet, retry};

use crate::runtime::Runtime;

/// The async twin of [`qlock_core::graph::ChainLock`]: every node of an image graph (the top, its
/// backing files, its external data files) holding what the QEMU front end the preset is
/// named after holds there, all nodes or none.
///
/// **One pool hop.** Discovery (reading each header) and locking every node are blocking file
/// calls: [`AsyncChainLock::acquire`] runs both in one closure on the runtime's pool.
///
/// **Cancellation.** A dropped acquire leaks no lock on any node: the closure on the pool owns
/// the descriptors it opens, and if nobody awaits its result any more the chain guard it made
/// is dropped there, which closes (and so releases) every node. A wait
/// ([`AsyncChainLock::acquire_wait`]) is a loop of such attempts with the runtime's timer in
/// between, each attempt all or nothing, so a wait dropped at any point holds nothing either.
/// Dropping the guard hands it to the pool ([`Runtime::drop_in_pool`]): closing a node on a
/// network filesystem may wait for a server.
///
/// There is no async access change on a chain: release the guard and acquire again.
#[must_use = "the locks are released when the chain guard is dropped"]
pub struct AsyncChainLock<R: Runtime> {
    inner: Option<ChainLock>,
    runtime: PhantomData<fn() -> R>,
}

impl<R: Runtime> AsyncChainLock<R> {
    /// Discovers the graph of `path` and takes `access` on it (see
    /// [`qlock_core::graph::ChainLock::acquire`]), failing at once on a conflict. One pool round trip.
    ///
    /// # Errors
    /// As [`qlock_core::graph::ChainLock::acquire`]; nothing is held on any node after an error.
    pub async fn acquire(
        path: impl AsRef<Path>,
        access: Access,
        options: &LockOptions,
    ) -> Result<Self, ChainError> {
        let (path, opts) = (path.as_ref().to_path_buf(), options.clone());
        let r = R::asyncify(move || Ok(ChainLock::acquire(&path, access, &opts))).await;
        match r {
            Ok(Ok(lock)) => Ok(Self::wrap(lock)),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(ChainError::Open(Box::new(e))),
        }
    }

    /// Waits for `access` on the whole graph of `path`, one all-or-nothing attempt per pool
    /// round trip, sleeping on the runtime's timer with `backoff` in between. Discovery is
    /// redone at each attempt (a graph changed meanwhile is locked as it is then). The
    /// holders are named once, by a last attempt, when the wait times out.
    ///
    /// # Errors
    /// [`ChainError::TimedOut`] with the last refusal; any error other than a refusal ends the
    /// wait at once. Nothing is held on any node after an error.
    pub async fn acquire_wait(
        path: impl AsRef<Path>,
        access: Access,
        options: &LockOptions,
        backoff: &Backoff,
    ) -> Result<Self, ChainError> {
        let path = path.as_ref();
        let quiet = options.clone().with_find_holders(false);
        let hint = R::register(None);
        let result = retry(backoff, || Self::acquire(path, access, &quiet), |d| R::sleep(&hint, d)).await;
        drop(R::unregister(hint));
        match result {
            Err(ChainError::TimedOut { waited, last })
                if options.find_holders && last.conflict().is_some() =>
            {
                match Self::acquire(path, access, options).await {
                    Ok(lock) => Ok(lock),
                    Err(again) if again.conflict().is_some() => {
                        Err(ChainError::TimedOut { waited, last: Box::new(again) })
                    }
                    Err(other) => Err(other),
                }
            }
            other => other,
        }
    }

    fn wrap(lock: ChainLock) -> Self {
        AsyncChainLock { inner: Some(lock), runtime: PhantomData }
    }

    fn lock(&self) -> &ChainLock {
        self.inner.as_ref().expect("the chain guard is only emptied by release or drop")
    }

    /// The nodes, top first, each with the bytes it holds (`node.image.held()`).
    pub fn nodes(&self) -> &[Node] {
        self.lock().nodes()
    }

    /// The bytes held on each node, top first.
    pub fn held(&self) -> Vec<LockSet> {
        self.lock().held()
    }

    /// The access held on the top.
    pub fn access(&self) -> Option<Access> {
        self.lock().access()
    }

    /// Releases every lock on every node on the pool and reports the first unlock failure (see
    /// [`qlock_core::graph::ChainLock::release`]). If the future is dropped, the release still runs to
    /// its end on the pool.
    ///
    /// # Errors
    /// [`Error::Unlock`]; every descriptor is closed anyway.
    pub async fn release(mut self) -> Result<(), Error> {
        match self.inner.take() {
            Some(lock) => R::asyncify(move || lock.release()).await,
            None => Ok(()),
        }
    }
}

impl<R: Runtime> Drop for AsyncChainLock<R> {
    fn drop(&mut self) {
        if let Some(lock) = self.inner.take() {
            R::drop_in_pool(lock);
        }
    }
}

impl<R: Runtime> fmt::Debug for AsyncChainLock<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncChainLock").field("inner", &self.inner).finish()
    }
}
