//! One test at a time, for the tests of a binary that spawn processes.
//!
//! A child that one test thread is spawning shares *every* open file description of the test
//! process from `fork` until its `exec` (docs/protocol.md §7 pitfall 4). A guard another test
//! thread drops in that window keeps its OFD locks a few microseconds longer, so that test's
//! next step (a fresh acquire, a probe) sees them; a file another test has open on a FUSE mount
//! stays open, so that test's unmount fails with "Device or resource busy". Real programs have
//! the same window; tests must not.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Holds the test binary's one lock until dropped: `let _serial = qlock_testkit::serial();`
/// first in every test of a binary that spawns processes and drops guards or unmounts. A test
/// that panicked while holding it does not stop the others.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}
