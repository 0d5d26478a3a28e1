//! Take, respect and inspect QEMU's disk-image locks.
//!
//! QEMU's `file` driver protects images with byte-range **read** locks: byte `100 + i` means
//! "I use permission i", byte `200 + i` "I refuse to share permission i" (consistent read,
//! write, write unchanged, resize). A newcomer read-locks its own bytes, then tests with
//! `F_OFD_GETLK` write-lock probes whether anyone else holds the opposite bytes, and backs out
//! on conflict. qlock does exactly that, byte for byte, so QEMU cannot tell it from another
//! QEMU: it never takes a write lock, never waits in the kernel, and opens images read-only
//! with `O_CLOEXEC`.
//!
//! ```
//! use qlock_core::{Access, ImageLock};
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("vm.qcow2");
//! # std::fs::write(&path, b"").unwrap();
//!
//! // A backup agent reading an image: refuse writers while we copy, like `qemu-img convert`.
//! let guard = ImageLock::acquire(&path, Access::READ)?;
//! // ... read through guard.file() ...
//! guard.release()?; // or just drop it
//! # Ok::<(), qlock_core::Error>(())
//! ```
//!
//! One path per item, as fd-lock and `tokio::fs` do: every type and function is at the crate
//! root, and the modules that define them are private. Two modules are public on purpose,
//! because each is a namespace a caller reads as a whole: [`plan`], the protocol as pure data
//! (the steps of an access change and QEMU's reference verdict, replayable without a file), and
//! [`graph`], image formats and backing chains (qcow2 headers, the per-node rules, the chain
//! guard), whose names (`Node`, `Role`, `Format`, `rules::User`) only mean something next to
//! each other.
//!
//! Modules, bottom up, in the order data flows: `perm` (bits and bytes), `access` (requests
//! and presets), `protocol` (byte sets, plans and verdicts, behind [`plan`]), `sys` (the fcntl
//! calls), `proc` (the one `/proc` walk that names holders and openers: a leaf), `error`, `wait`
//! (backoff) and `wake` (the inotify hint that ends a wait's sleep early), `image` (the guard),
//! `opener` (what each process with an image open is), `storage` (what the filesystem under an
//! image can promise: [`Storage`], [`LockScope`]), `inspect` (status from outside: probes and
//! one `/proc` walk for holders and openers together), [`graph`]. The async guard, generic over a runtime, is the
//! `qlock-async` crate's: the sync core ends at the wake hint ([`CloseWatch`]).
#![forbid(unsafe_code)]

mod access;
mod error;
pub mod graph;
mod image;
mod inspect;
mod opener;
mod perm;
pub mod plan;
mod posix;
mod proc;
mod protocol;
mod storage;
mod sys;
mod wait;
mod wake;

pub use access::{Access, Preset};
pub use error::{Conflict, ConflictReason, Error, Result, strerror};
pub use image::{HolderLookup, ImageLock, LockOptions, Locking};
pub use inspect::{ForeignLock, ImageStatus, inspect};
pub use opener::{Label, OpenMode, Opener};
pub use perm::{PERM_BASE, PROTOCOL_BYTES, Perm, UNSHARE_BASE};
pub use proc::{HeldRange, Holder};
pub use protocol::{ByteRange, Check, LockSet, Others, Runs, Verdict};
pub use storage::{Hazard, LockScope, Mount, Storage, is_local_fs};
pub use sys::LockKind;
#[cfg(any(test, feature = "test-hooks"))]
pub use sys::fcntl_calls;
pub use wait::{Backoff, Delays, Retry, retry, retry_blocking};
pub use wake::{CloseWatch, Closed, SharedCloseWatch, sleep_or_close};
