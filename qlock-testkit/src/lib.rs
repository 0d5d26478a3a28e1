//! Fake QEMU holder processes for testing code that meets QEMU's image locks.
//!
//! "What does my backup agent do while a VM holds this disk?" needs a process holding exactly
//! the locks a VM would hold, not a VM. [`FakeQemu`] forks one: it holds what a QEMU
//! [`FrontEnd`] holds on a [`Format`] (docs/protocol.md §5), any [`Access`], or any [`RawLock`] set
//! (write locks, POSIX locks, libvirt's byte 0, the legacy bytes 104/204, whole-file locks).
//! [`FakeQemu::real`] runs the real `qemu-io` or `qemu-storage-daemon` behind the same handle,
//! so one scenario can run against both, and skips cleanly where QEMU is absent.
//!
//! ```
//! use qlock_testkit::{Access, FakeQemu, Format, FrontEnd, RawLock};
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("disk.img");
//! # std::fs::write(&path, b"").unwrap();
//!
//! // spawn() returns once the child holds its locks, or fails with the child's own error.
//! let vm = FakeQemu::builder(&path).front_end(FrontEnd::VmDisk, Format::Raw).spawn()?;
//! let status = qlock_core::inspect(&[&path]).remove(0)?;
//! assert_eq!(status.others.held.to_string(), "100 101 | 201");
//! assert_eq!(status.holders[0].pid, vm.pid());
//!
//! // A second VM on the same disk is refused the way QEMU refuses it.
//! let err = FakeQemu::builder(&path).front_end(FrontEnd::VmDisk, Format::Raw).spawn().unwrap_err();
//! assert_eq!(err.qemu_message().as_deref(), Some("Failed to get \"write\" lock"));
//!
//! // A foreign holder: libvirt-style exclusive lease on byte 0.
//! let _lease = FakeQemu::builder(&path).raw([RawLock::byte(0).exclusive()]).spawn()?;
//! drop(vm); // killed and reaped: its locks are gone
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # How the fake works, and why that way
//! [`HolderBuilder::spawn`] `fork`s without `exec` (see the `fork` module source): a
//! downstream test binary has libtest's `main`, so re-running `/proc/self/exe` would need a
//! hook in every downstream crate, and a helper binary would need a build step. The child
//! makes only raw system calls on data prepared before the fork, takes its locks, answers on a
//! socket, then waits for commands there. Every decision (which bytes, in which order, what to
//! undo) is made in the parent by [`qlock_core::plan`], so the child is a dumb fcntl runner.
//! Closing the socket, which happens when the handle is dropped or the test process dies, makes
//! the child exit; [`Drop`] also kills and reaps it, so a panicking test leaves no zombie and
//! no lock.
//!
//! Modules: [`front_end`] (the spec's table), [`raw`] (lock sets and change plans),
//! [`holder`] (the handle), `ready` ([`ReadyChild`]: any program with an image open, ready on
//! its own output), `fixtures` (rstest fixtures, the default feature `fixtures`),
//! `fuse` (a real FUSE filesystem whose locks fail, feature `fuse`), `gluster` (a real
//! two-host GlusterFS bed, feature `gluster`), [`error`].
//!
//! See README.md for the downstream testing guide.

pub mod error;
#[cfg(feature = "fixtures")]
pub mod fixtures;
mod fork;
pub mod front_end;
#[cfg(feature = "fuse")]
pub mod fuse;
#[cfg(feature = "gluster")]
pub mod gluster;
pub mod holder;
mod image;
pub mod newcomer;
pub mod raw;
mod ready;
mod real;
pub mod reexec;
mod serial;
mod skip;
mod wire;

pub use error::{Error, Result};
pub use front_end::{Format, FrontEnd};
pub use holder::{ChainNode, FakeQemu, HolderBuilder, NbdServer};
pub use image::{IMAGE_SIZE, TempImage};
pub use newcomer::Newcomer;
pub use qlock_core::{Access, LockKind, Perm};
pub use raw::RawLock;
pub use ready::ReadyChild;
pub use serial::serial;
pub use skip::{in_ci, require, require_all, skip};
