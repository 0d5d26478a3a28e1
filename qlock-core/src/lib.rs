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
//! Modules, in the order data flows: [`perm`] (bits and bytes), [`access`] (requests and
//! presets), [`plan`] (the protocol as pure data), [`sys`] (the fcntl calls), [`image`] (the
//! guard), [`inspect`] (status from outside, over the [`Holder`]s of one `/proc` walk), [`wait`] (backoff), [`wake`] (the
//! inotify hint that ends a wait's sleep early), [`error`]. The async guard, generic over a
//! runtime, is the `qlock-async` crate's: the sync core ends at [`wake`].
#![forbid(unsafe_code)]

pub mod access;
pub mod error;
pub mod graph;
pub mod image;
mod inspect;
pub mod perm;
pub mod plan;
mod posix;
mod proc;
pub mod sys;
pub mod wait;
pub mod wake;

pub use access::{Access, Preset};
pub use error::{Conflict, ConflictReason, Error, Result};
pub use graph::lock::ChainLock;
pub use graph::{Chain, ChainError, Role};
pub use image::{HolderLookup, ImageLock, LockOptions, Locking};
pub use inspect::{ForeignLock, ImageStatus, inspect};
pub use perm::Perm;
pub use plan::{LockSet, Verdict};
pub use proc::{HeldRange, Holder};
pub use sys::LockKind;
pub use wait::Backoff;
