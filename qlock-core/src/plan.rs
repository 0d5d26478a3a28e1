//! The protocol as pure data, public on purpose: which bytes to lock, test and release for a
//! request, and what QEMU would answer it.
//!
//! Nothing here touches a file. [`plan`] turns the bytes a descriptor holds and the bytes it
//! wants into the steps of QEMU's `raw_handle_perm_lock` (PREPARE, then COMMIT or ABORT), and
//! [`decide`] is the reference verdict of docs/protocol.md §9, which the tests hold the real lock
//! path against. Callers can replay the protocol without a file: a model checker, a simulator,
//! another VMM. The vocabulary these speak ([`LockSet`](crate::LockSet),
//! [`Verdict`](crate::Verdict), [`Others`](crate::Others), [`Check`](crate::Check)) is at the
//! crate root with every other type; only the steps themselves live here.
//!
//! ```
//! use qlock_core::plan::{decide, plan};
//! use qlock_core::{Access, LockSet, Others, Perm, Verdict};
//!
//! let write = LockSet::new(Access::WRITE.perm, Access::WRITE.unshared());
//! let steps = plan(LockSet::EMPTY, write);
//! assert_eq!(steps.add, write);
//! let vm = Others { held: write, ..Others::default() };
//! assert!(matches!(decide(vm, LockSet::EMPTY, LockSet::new(Perm::CONSISTENT_READ, Access::READ.unshared())), Verdict::Conflict(_)));
//! ```

pub use crate::protocol::{Plan, decide, plan};
