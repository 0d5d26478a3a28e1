//! [`ChainLock`]: every node of an image graph locked as QEMU locks it, all nodes or none.
//!
//! The guard takes QEMU's two passes (see [`rules`]): first every node, in
//! discovery order (the top, its data file, its backing file, ...), gets what it gets while
//! QEMU opens the graph with nobody attached; then the nodes whose bytes depend on the user
//! (data files, raw backing files) are raised to their final bytes, in the same order. So the
//! node that refuses, and the message, are the ones QEMU gives when several nodes are in the
//! way (watched with `strace` on `qemu-io` 10.0.2). Any failure releases every byte taken on
//! every node before it returns.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::access::Access;
use crate::error::Error;
use crate::graph::rules::{self, User};
use crate::graph::{Chain, ChainError, Format, Node, Role};
use crate::image::LockOptions;
use crate::protocol::LockSet;
use crate::wait::{self, Backoff, Retry};
use crate::wake::{self, CloseWatch};

/// An image graph holding, on every node, the bytes the matching QEMU front end holds there.
///
/// Built on [`Chain::discover`]: the locks are taken on the very descriptors whose headers
/// were read. Dropping it closes every node, which releases every lock;
/// [`ChainLock::release`] unlocks explicitly first and reports errors. To lock the top file
/// alone (`--no-chain`), use [`ImageLock`](crate::ImageLock).
///
/// ```no_run
/// use qlock_core::graph::ChainLock;
/// use qlock_core::{Access, LockOptions};
///
/// // A backup of an overlay: refuse writers on the overlay *and* on its backing files.
/// let guard = ChainLock::acquire("vm.qcow2", Access::READ, &LockOptions::default())?;
/// for node in guard.nodes() {
///     println!("{} {:?}: {}", node.path().display(), node.role, node.image.held());
/// }
/// guard.release()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "the locks are released when the ChainLock is dropped"]
#[derive(Debug)]
pub struct ChainLock {
    nodes: Vec<Node>,
    want: Want,
}

/// What the guard was asked for, to recompute every node's access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// An access on the top, read below it as the front end it is named after
    /// ([`rules::node_access`]).
    Top(Access),
    /// A front end's precise user ([`User::node`] on every node).
    User(User),
}

impl Want {
    /// The accesses of the first pass and the final one for a node.
    fn passes(self, role: Role, format: Format) -> (Access, Access) {
        let user = match self {
            Want::Top(a) => User::for_access(a),
            Want::User(u) => u,
        };
        if role != Role::Top && !user.opens_chain() {
            // `qemu-img info` opens the top alone: nothing below it.
            let nothing = Access::NONE;
            return (nothing, nothing);
        }
        match self {
            Want::Top(a) => (rules::opening_access(a, role, format), rules::node_access(a, role, format)),
            Want::User(u) => (u.detached().node(role, format), u.node(role, format)),
        }
    }
}

impl ChainLock {
    /// Opens `path` (its format probed, as QEMU does without `-f`), discovers its graph and
    /// takes `access` on the top and, on every other node, what the QEMU front end the preset
    /// is named after takes there ([`User::for_access`]): `write` holds what `qemu-io` holds
    /// (a raw backing file then refuses nothing, the data file only resize), `read` what
    /// `qemu-io -r` holds, `force-share` what `qemu-io -r -U` holds, and `info` the top alone,
    /// as `qemu-img info`. A VM disk refuses more on raw leaves (`100 | 201 203` on a raw
    /// backing file, write refused on the data file): to stand in for one, use
    /// [`ChainLock::lock_as`] with [`User::VM_DISK`].
    ///
    /// # Errors
    /// [`ChainError`]: discovery errors, or [`ChainError::Node`] naming the node that refused
    /// with QEMU's message (and QEMU's `Could not open backing file: ` prefix where it has
    /// one). Nothing is left locked on any node.
    pub fn acquire(
        path: impl AsRef<Path>,
        access: Access,
        options: &LockOptions,
    ) -> Result<ChainLock, ChainError> {
        let chain = if User::for_access(access).opens_chain() {
            Chain::open(path, options)?
        } else {
            Chain::open_top(path, options)?
        };
        ChainLock::lock(chain, access)
    }

    /// Locks an already discovered chain for `access` on its top (see [`ChainLock::acquire`]).
    ///
    /// # Errors
    /// [`ChainError::Node`]; nothing is left locked on any node.
    pub fn lock(chain: Chain, access: Access) -> Result<ChainLock, ChainError> {
        ChainLock::take(chain.into_nodes(), Want::Top(access))
    }

    /// Locks an already discovered chain for `access` on its top, then `then` in order:
    /// `(index, access)` raising node `index` (discovery order) while everything else is
    /// held, as QEMU does when it reopens a node (`qemu-img commit` reopens the base for
    /// writing). Used by [`crate::graph::op`].
    ///
    /// # Errors
    /// [`ChainError::Node`] (the open) or, for a later step, the step's index and its error.
    /// Nothing is left locked on any node.
    pub(crate) fn lock_steps(
        chain: Chain,
        user: User,
        then: &[(usize, Access)],
    ) -> Result<ChainLock, (Option<usize>, ChainError)> {
        let mut lock = ChainLock::take(chain.into_nodes(), Want::User(user)).map_err(|e| (None, e))?;
        for (step, &(index, access)) in then.iter().enumerate() {
            let Some(node) = lock.nodes.get_mut(index) else { continue };
            if let Err(e) = node.image.set_access(access) {
                let err = ChainError::node(node, false, e);
                release_all(lock.nodes);
                return Err((Some(step), err));
            }
        }
        Ok(lock)
    }

    /// Locks an already discovered chain exactly as the front end `user` does, the top
    /// included ([`User::node`] on every node): for test kits and for a caller that knows
    /// which QEMU it stands in for.
    ///
    /// # Errors
    /// [`ChainError::Node`]; nothing is left locked on any node.
    pub fn lock_as(chain: Chain, user: User) -> Result<ChainLock, ChainError> {
        ChainLock::take(chain.into_nodes(), Want::User(user))
    }

    /// Waits until `access` can be had on the whole graph of `path`, retrying with `backoff`
    /// (a close of any node ends a sleep early). Discovery is redone at each attempt, so a
    /// graph changed meanwhile (a commit, a rebase) is locked as it is then.
    ///
    /// # Errors
    /// [`ChainError::TimedOut`] with the last refusal; any error other than a refusal ends
    /// the wait at once.
    pub fn acquire_wait(
        path: impl AsRef<Path>,
        access: Access,
        options: &LockOptions,
        backoff: &Backoff,
    ) -> Result<ChainLock, ChainError> {
        let path = path.as_ref();
        let quiet = options.clone().with_find_holders(false);
        // The nodes of the first graph seen: a close of any of them wakes the sleep. Made at
        // the first sleep, as for a single image (an uncontended wait should not pay for it).
        let nodes: RefCell<Vec<PathBuf>> = RefCell::new(Vec::new());
        let mut watches: Option<Vec<CloseWatch>> = None;
        let result = wait::retry_blocking(
            backoff,
            || {
                let chain = Chain::open(path, &quiet)?;
                if nodes.borrow().is_empty() {
                    *nodes.borrow_mut() = chain.nodes().iter().map(|n| n.path().to_path_buf()).collect();
                }
                ChainLock::lock(chain, access)
            },
            |d| {
                let w = watches.get_or_insert_with(|| {
                    nodes.borrow().iter().filter_map(|p| CloseWatch::new(p).ok()).collect()
                });
                wake::sleep_or_close(w, d);
            },
        );
        match result {
            // Name the holders once, at the end: one more attempt with the scan on.
            Err(e) if options.find_holders && e.conflict().is_some() => {
                match ChainLock::acquire(path, access, options) {
                    Ok(lock) => Ok(lock),
                    Err(last) if last.conflict().is_some() => Err(e.with_last(last)),
                    Err(other) => Err(other),
                }
            }
            other => other,
        }
    }

    fn take(mut nodes: Vec<Node>, want: Want) -> Result<ChainLock, ChainError> {
        let user = match want {
            Want::Top(a) => User::for_access(a),
            Want::User(u) => u,
        };
        if !user.opens_chain() {
            // `qemu-img info`: the top alone; the other nodes are closed unlocked.
            nodes.truncate(1);
        }
        let passes: Vec<(Access, Access)> = nodes.iter().map(|n| want.passes(n.role, n.format)).collect();
        let mut failure = None;
        for (node, (first, _)) in nodes.iter_mut().zip(&passes) {
            if let Err(e) = node.image.set_access(*first) {
                failure = Some(ChainError::node(node, true, e));
                break;
            }
        }
        if failure.is_none() {
            for (node, (first, last)) in nodes.iter_mut().zip(&passes) {
                if first == last {
                    continue;
                }
                if let Err(e) = node.image.set_access(*last) {
                    failure = Some(ChainError::node(node, false, e));
                    break;
                }
            }
        }
        match failure {
            None => Ok(ChainLock { nodes, want }),
            Some(err) => {
                release_all(nodes);
                Err(err)
            }
        }
    }

    /// The nodes, top first (each with the bytes it holds: `node.image.held()`).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The top image.
    pub fn top(&self) -> &Node {
        &self.nodes[0]
    }

    /// The guard's nodes as plain image guards, top first, each keeping its locks: for a
    /// caller that manages descriptors itself (`qlock run` hands them to its command).
    pub fn into_images(self) -> Vec<crate::ImageLock> {
        self.nodes.into_iter().map(|n| n.image).collect()
    }

    /// The bytes held on each node, top first.
    pub fn held(&self) -> Vec<LockSet> {
        self.nodes.iter().map(|n| n.image.held()).collect()
    }

    /// The access held on the top, when the guard was made from one.
    pub fn access(&self) -> Option<Access> {
        match self.want {
            Want::Top(a) => Some(a),
            Want::User(_) => None,
        }
    }

    /// Changes to `access` on the top and the matching bytes on every other node, with
    /// QEMU's semantics on each node (the union is locked, then only the new request is
    /// checked). All nodes or none: when a node refuses, the nodes already changed are put
    /// back (which only releases, so it cannot fail), and the old access is held throughout.
    ///
    /// # Errors
    /// [`ChainError::Node`] naming the node that refused (no prefix: the graph is open).
    pub fn set_access(&mut self, access: Access) -> Result<(), ChainError> {
        let want = Want::Top(access);
        // First every node to the union of its old and new bytes (checking the new request),
        // then down to the new bytes; a refusal puts the nodes already raised back.
        let old: Vec<Access> = self.nodes.iter().map(|n| n.image.access()).collect();
        for k in 0..self.nodes.len() {
            let node = &mut self.nodes[k];
            let new = want.passes(node.role, node.format).1;
            let union = Access::new(old[k].perm | new.perm, old[k].shared & new.shared);
            if let Err(e) = node.image.prepare(union, new) {
                let err = ChainError::node(node, false, e);
                for (node, back) in self.nodes.iter_mut().zip(&old).take(k) {
                    // From the union down to the old bytes: QEMU's fast path, unlock only.
                    let _ = node.image.set_access(*back);
                }
                return Err(err);
            }
        }
        for node in &mut self.nodes {
            let new = want.passes(node.role, node.format).1;
            // Down from the union: unlock only.
            let _ = node.image.set_access(new);
        }
        self.want = want;
        Ok(())
    }

    /// Releases every lock on every node and closes them, reporting the first unlock failure
    /// (the other nodes are released regardless).
    ///
    /// # Errors
    /// [`Error::Unlock`] (seen on NFS); every descriptor is closed anyway.
    pub fn release(self) -> Result<(), Error> {
        let mut first = Ok(());
        for node in self.nodes {
            let r = node.image.release();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Rolls back a failed acquire: unlocks each node explicitly (no fork-window), top first.
fn release_all(nodes: Vec<Node>) {
    for node in nodes {
        if let Err(e) = node.image.release() {
            tracing::warn!("{e}");
        }
    }
}

impl ChainError {
    /// A lock error on `node`: in the first pass (`opening`) it carries QEMU's
    /// `Could not open backing file: ` once per level of backing file above the node.
    fn node(node: &Node, opening: bool, source: Error) -> ChainError {
        let levels = match node.role {
            Role::Top => 0,
            Role::Backing { depth } | Role::DataFile { depth, .. } => depth,
        };
        ChainError::Node {
            path: node.path().to_path_buf(),
            role: node.role,
            prefix: if opening { levels } else { 0 },
            source: Box::new(source),
        }
    }

    /// The conflict behind this error (another holder in the way), also through a timeout.
    pub fn conflict(&self) -> Option<&crate::Conflict> {
        match self {
            ChainError::Node { source, .. } => source.conflict(),
            ChainError::TimedOut { last, .. } => last.conflict(),
            _ => None,
        }
    }

    /// What to do about the node's error, beyond QEMU's message ([`Error::hint`]); `None` when
    /// there is nothing more to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            ChainError::OpenBacking(e) | ChainError::Open(e) => e.hint(),
            ChainError::Node { source, .. } => source.hint(),
            ChainError::TimedOut { last, .. } => last.hint(),
            _ => None,
        }
    }

    fn with_last(self, last: ChainError) -> ChainError {
        match self {
            ChainError::TimedOut { waited, .. } => ChainError::TimedOut { waited, last: Box::new(last) },
            _ => last,
        }
    }
}

impl Retry for ChainError {
    fn is_retryable(&self) -> bool {
        // A conflict on a node, not a timeout that carries one: a timeout ends the wait.
        matches!(self, ChainError::Node { source, .. } if matches!(**source, Error::Conflict(_)))
    }

    fn timed_out(self, waited: Duration) -> ChainError {
        ChainError::TimedOut { waited, last: Box::new(self) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::inspect;
    use crate::perm::Perm;
    use crate::sys::seam;
    use nix::libc;

    fn qcow2(backing: Option<(&str, &str)>, data: Option<&str>) -> Vec<u8> {
        use crate::graph::qcow2::{EXT_BACKING_FORMAT, EXT_DATA_FILE, INCOMPAT_DATA_FILE, tests::v3};
        let mut exts: Vec<(u32, &[u8])> = Vec::new();
        if let Some((_, format)) = backing {
            exts.push((EXT_BACKING_FORMAT, format.as_bytes()));
        }
        if let Some(name) = data {
            exts.push((EXT_DATA_FILE, name.as_bytes()));
        }
        let incompat = if data.is_some() { INCOMPAT_DATA_FILE } else { 0 };
        v3(backing.map(|(name, _)| name.as_bytes()), &exts, incompat, 0)
    }

    /// top.qcow2 (data file data.raw) -> mid.qcow2 -> base.raw, all in one directory.
    fn graph() -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let data = p("data.raw");
        std::fs::write(p("top.qcow2"), qcow2(Some(("mid.qcow2", "qcow2")), Some(data.to_str().unwrap())))
            .unwrap();
        std::fs::write(p("mid.qcow2"), qcow2(Some(("base.raw", "raw")), None)).unwrap();
        std::fs::write(p("base.raw"), b"").unwrap();
        std::fs::write(&data, b"").unwrap();
        let paths = vec![p("top.qcow2"), data, p("mid.qcow2"), p("base.raw")];
        (dir, paths)
    }

    fn outside(paths: &[PathBuf]) -> Vec<String> {
        inspect(paths).into_iter().map(|s| s.unwrap().others.held.to_string()).collect()
    }

    #[test]
    fn each_node_gets_its_rule_in_discovery_order() {
        let (_dir, paths) = graph();
        let lock = ChainLock::acquire(&paths[0], Access::WRITE, &LockOptions::default()).unwrap();
        let got: Vec<(PathBuf, String)> =
            lock.nodes().iter().map(|n| (n.path().to_path_buf(), n.image.held().to_string())).collect();
        let want = [
            "100 101 103 | 201 203", // top
            "100 101 103 | 203",     // data file, as under qemu-io
            "100 | 201 203",         // mid.qcow2
            "100 | -",               // base.raw, as under qemu-io
        ];
        assert_eq!(got.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), paths);
        assert_eq!(got.iter().map(|(_, b)| b.as_str()).collect::<Vec<_>>(), want);
        lock.release().unwrap();
        assert!(outside(&paths).iter().all(|s| s == "- | -"));
    }

    #[test]
    fn a_failure_at_any_call_leaves_no_byte_on_any_node() {
        let (_dir, paths) = graph();
        let mut failures = 0;
        for preset in Access::PRESETS {
            for k in 0..40 {
                for errno in [libc::ENOLCK, libc::EIO, libc::EAGAIN] {
                    seam::fail_lock_call(k, errno);
                    let result = ChainLock::acquire(&paths[0], preset.access, &LockOptions::default());
                    seam::disarm();
                    match result {
                        Ok(lock) => drop(lock),
                        Err(e) => {
                            failures += 1;
                            assert!(matches!(e, ChainError::Node { .. }), "{e}");
                            let held = outside(&paths);
                            assert!(
                                held.iter().all(|s| s == "- | -"),
                                "k={k} {}: {e}: {held:?}",
                                preset.name
                            );
                        }
                    }
                }
            }
        }
        assert!(failures > 100, "the fault reached only {failures} acquires");
    }

    #[test]
    fn set_access_moves_every_node_or_none() {
        let (_dir, paths) = graph();
        let mut lock = ChainLock::acquire(&paths[0], Access::READ, &LockOptions::default()).unwrap();
        // A reader of the data file that refuses resize (`100 | 203`, as `qemu-nbd -r`): it
        // lets the chain read, not write.
        let nbd = Access::new(Perm::CONSISTENT_READ, Perm::ALL - Perm::RESIZE);
        let other = crate::ImageLock::acquire(&paths[1], nbd).unwrap();
        let before = outside(&paths);
        let err = lock.set_access(Access::WRITE).unwrap_err();
        assert!(err.to_string().starts_with("Failed to get \"resize\" lock\nIs another process"), "{err}");
        assert!(matches!(err, ChainError::Node { role: Role::DataFile { .. }, prefix: 0, .. }), "{err:?}");
        // The top was raised before the data file refused: it is back where it was.
        assert_eq!(outside(&paths), before);
        assert_eq!(lock.access(), Some(Access::READ));
        drop(other);
        lock.set_access(Access::WRITE).unwrap();
        let held: Vec<String> = lock.held().iter().map(ToString::to_string).collect();
        assert_eq!(held, ["100 101 103 | 201 203", "100 101 103 | 203", "100 | 201 203", "100 | -"]);
        lock.set_access(Access::FORCE_SHARE).unwrap();
        assert!(outside(&paths).iter().all(|s| s == "100 | -"), "{:?}", outside(&paths));
    }
}
