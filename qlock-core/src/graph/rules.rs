//! Which bytes QEMU takes on each node of an image graph, as a pure function.
//!
//! Derived from the observations of `docs/graph.md` (QEMU 10.0.2 and 7.2, every row of
//! `xtask/tests/graph_expected.txt`, which `tests/graph_rules.rs` holds [`User::node`] against),
//! never from QEMU's source. What a node gets depends on the node's role and format and on the
//! [`User`] at the top: the device, export or `qemu-io` that asks QEMU for the image. In words:
//!
//! - **A qcow2 node** (the top or a backing file at any depth) locks its file for itself:
//!   consistent read (unless the opener does no I/O, as `qemu-img info`), plus write and
//!   resize when the image is opened read-write (only ever the top), and it never shares write
//!   or resize: `100 101 103 | 201 203` read-write, `100 | 201 203` read-only. What the user
//!   asks or shares does not reach the file.
//! - **A raw node** passes its user's request through unchanged. At the top that is the user
//!   itself; below a qcow2 node the user is the overlay, which asks consistent read only if its
//!   own user does, and refuses write *and* resize exactly when its own user refuses write
//!   (qemu-io shares everything: a raw backing file is `100 | -`; a VM disk without
//!   `share-rw=on` refuses write: `100 | 201 203`; nothing attached: `-`).
//! - **An external data file** gets the user's permissions (write bringing resize along) and
//!   shares what the user shares, except resize, which a qcow2 node never shares of its data
//!   file: `100 101 103 | 203` under qemu-io, `100 101 103 | 201 203` under a VM disk.
//! - **Force share** (`-U`) shares everything on every node.
//!
//! QEMU takes the nodes in two passes (watched with `strace` on `qemu-io`): while it opens the
//! graph, top first, then each node's data file, then its backing file, every node gets what
//! it gets with no user attached ([`User::detached`]); then the user attaches and the nodes
//! whose bytes depend on it (data files, raw backing files) are raised to their final bytes in
//! the same order. A refusal in the first pass carries `Could not open backing file: ` once per
//! level of backing file above the node; one in the second pass carries no prefix.

use crate::access::Access;
use crate::graph::{Format, Role};
use crate::perm::Perm;

const CR: Perm = Perm::CONSISTENT_READ;
const W: Perm = Perm::WRITE;
const WU: Perm = Perm::WRITE_UNCHANGED;
const RS: Perm = Perm::RESIZE;
/// Everything shared, graph-mod included (no preset or front end ever locks byte 204).
const EVERYTHING: Perm = Perm::LEGACY_ALL;
/// What a qcow2 node shares of its own file.
const QCOW2_SHARES: Perm = CR.union(WU).union(Perm::GRAPH_MOD);

/// The user of the top node: what it asks of the image, and how QEMU opens the graph for it.
///
/// The front ends differ in what they share even where they take the same bytes on a qcow2
/// top: `qemu-io` shares write, a VM disk without `share-rw=on` does not, and that reaches the
/// raw leaves. The constants below are the one table of front ends (the testkit's
/// `FrontEnd::user` and [`crate::graph::op`] use them); [`User::for_access`] reads an
/// [`Access`] asked on a chain: a preset as the `qemu-io` front end it is named after.
///
/// ```
/// use qlock_core::graph::{Format, Role, rules::User};
/// use qlock_core::Access;
///
/// let base = Role::Backing { depth: 1 };
/// assert_eq!(User::QEMU_IO_RW.node(Role::Top, Format::Qcow2), Access::WRITE);
/// assert_eq!(User::QEMU_IO_RW.node(base, Format::Raw).bytes(), vec![100]);
/// // The `write` preset on a chain is `qemu-io` (read-write) ...
/// assert_eq!(User::for_access(Access::WRITE), User::QEMU_IO_RW);
/// // ... while a VM disk refuses writers on a raw base too.
/// assert_eq!(User::VM_DISK.node(base, Format::Raw).bytes(), vec![100, 201, 203]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct User {
    /// The permissions the user takes on the top node.
    pub perm: Perm,
    /// The permissions it lets others take.
    pub shared: Perm,
    /// The image is opened read-write (qcow2 then takes write and resize on its file).
    pub writable: bool,
    /// `-U` / `force-share=on`: every node shares everything.
    pub force_share: bool,
    /// The opener does no I/O (`qemu-img info`): qcow2 files are not even read consistently.
    pub no_io: bool,
}

impl User {
    /// `qemu-io IMG` (read-write, shares everything); also `qemu-img` opening an image
    /// read-write (amend, commit, rebase, snapshot, bench -w: watched with `strace`).
    pub const QEMU_IO_RW: User = User::new(CR.union(W), EVERYTHING, true);
    /// `qemu-io -r IMG`; also `qemu-img check`, `map`, `compare`, `dd`, `bench`.
    pub const QEMU_IO_READ_ONLY: User = User::new(CR, EVERYTHING, false);
    /// `qemu-io -r -U IMG`, and every `qemu-img` subcommand that reads with `-U`.
    pub const QEMU_IO_FORCE_SHARE: User = User { force_share: true, ..User::QEMU_IO_READ_ONLY };
    /// `qemu-img info IMG`: no I/O (and it opens the top alone).
    pub const QEMU_IMG_INFO: User = User { no_io: true, ..User::new(Perm::empty(), EVERYTHING, false) };
    /// `qemu-img info -U IMG`: nothing at all.
    pub const QEMU_IMG_INFO_FORCE_SHARE: User = User { force_share: true, ..User::QEMU_IMG_INFO };
    /// A `qemu-img convert` source: reads, refuses writers (QEMU >= 6.1).
    pub const CONVERT_SOURCE: User = User::new(CR, CR.union(WU).union(Perm::GRAPH_MOD), false);
    /// `qemu-img resize IMG`: also asks resize of the top.
    pub const RESIZE: User = User::new(CR.union(W).union(RS), EVERYTHING, true);
    /// A VM's writable disk device (`-drive` + virtio-blk): refuses write.
    pub const VM_DISK: User = User::new(CR.union(W), CR.union(WU).union(RS).union(Perm::GRAPH_MOD), true);
    /// The same with `share-rw=on`.
    pub const VM_DISK_SHARE_RW: User = User::QEMU_IO_RW;
    /// A VM disk with `readonly=on`.
    pub const VM_DISK_READONLY: User = User::new(CR, CR.union(WU).union(RS).union(Perm::GRAPH_MOD), false);
    /// `qemu-nbd IMG` or a writable storage-daemon export: never shares resize.
    pub const NBD_RW: User = User::new(CR.union(W), CR.union(W).union(WU).union(Perm::GRAPH_MOD), true);
    /// `qemu-nbd -r IMG` or a read-only export.
    pub const NBD_READ_ONLY: User = User::new(CR, CR.union(W).union(WU).union(Perm::GRAPH_MOD), false);

    const fn new(perm: Perm, shared: Perm, writable: bool) -> User {
        User { perm, shared, writable, force_share: false, no_io: false }
    }

    /// How qlock's chain guards read an access asked on the top image: a preset as the QEMU
    /// front end it is named after, so that `--chain` holds on every node what that front end
    /// holds there (`docs/graph.md`):
    ///
    /// | preset | front end |
    /// |---|---|
    /// | `force-share` | `qemu-io -r -U` |
    /// | `read` | `qemu-io -r` |
    /// | `write` | `qemu-io` (read-write): shares write, so a raw backing file refuses nothing |
    /// | `write-shared` | a raw disk with `share-rw=on` (`qemu-io` read-write below the top) |
    /// | `info` | `qemu-img info`: the top alone ([`User::opens_chain`] is false) |
    ///
    /// Any other access is taken literally ([`User::from_access`]). A VM disk refuses more
    /// below the top than `write` does: use [`User::VM_DISK`] through
    /// [`crate::graph::ChainLock::lock_as`] to stand in for one.
    pub fn for_access(access: Access) -> User {
        let norm = |a: Access| a.lock_set(Perm::ALL);
        let presets = [
            (Access::FORCE_SHARE, User::QEMU_IO_FORCE_SHARE),
            (Access::READ, User::QEMU_IO_READ_ONLY),
            (Access::WRITE, User::QEMU_IO_RW),
            (Access::WRITE_SHARED, User::QEMU_IO_RW),
            (Access::INFO, User::QEMU_IMG_INFO),
        ];
        presets
            .into_iter()
            .find(|(a, _)| norm(*a) == norm(access))
            .map_or_else(|| User::from_access(access), |(_, user)| user)
    }

    /// Whether this user's opening reaches below the top: `qemu-img info` opens the top alone
    /// (watched with `strace`: not even the data file).
    pub const fn opens_chain(self) -> bool {
        !self.no_io
    }

    /// A node nobody attaches to (a `qemu-storage-daemon --blockdev` with no export), opened
    /// read-write or read-only.
    pub const fn nobody(writable: bool) -> User {
        User { perm: Perm::empty(), shared: EVERYTHING, writable, force_share: false, no_io: false }
    }

    /// An [`Access`] taken literally as the user's own request: its permissions, and exactly
    /// what it shares (so `perm=consistent-read;shared=consistent-read,write-unchanged` reads
    /// as a `qemu-img convert` source, refusing writers on raw leaves too). An access that
    /// shares all four permissions and writes nothing is force share (`-U`); one without
    /// consistent read does no I/O (`info`); one that writes or resizes opens the image
    /// read-write.
    pub fn from_access(access: Access) -> User {
        let writable = access.perm.intersects(W | WU | RS);
        User {
            perm: access.perm,
            shared: access.shared,
            writable,
            force_share: !writable && access.shared.contains(Perm::ALL),
            no_io: !access.perm.contains(CR),
        }
    }

    /// The same opening with nobody attached yet: what every node gets in QEMU's first pass.
    pub const fn detached(self) -> User {
        User { perm: Perm::empty(), shared: EVERYTHING, ..self }
    }

    /// What a qcow2 node, opened for this user, asks of its backing file: consistent read if
    /// the user reads, read-only; it refuses write and resize exactly when the user refuses
    /// write.
    pub fn backing(self) -> User {
        let shared = if self.force_share {
            EVERYTHING
        } else if self.shared.contains(W) {
            self.shared | RS | Perm::GRAPH_MOD
        } else {
            (self.shared - RS) | Perm::GRAPH_MOD
        };
        User { perm: self.perm & CR, shared, writable: false, ..self }
    }

    /// The user seen by the node at `role`: this one for the top and the top's data file, the
    /// [`backing`](User::backing) user `depth` times below.
    pub fn at(self, role: Role) -> User {
        let depth = match role {
            Role::Top => 0,
            Role::Backing { depth } | Role::DataFile { depth, .. } => depth,
        };
        (0..depth).fold(self, |u, _| u.backing())
    }

    /// The access QEMU takes on the node at `role` in `format` for this user.
    pub fn node(self, role: Role, format: Format) -> Access {
        let user = self.at(role);
        match (role, format) {
            (Role::DataFile { .. }, _) => user.data_file(),
            (_, Format::Qcow2) => user.qcow2_file(),
            (_, Format::Raw) => user.raw(),
        }
    }

    /// A qcow2 node's own file.
    fn qcow2_file(self) -> Access {
        let mut perm = if self.no_io { Perm::empty() } else { CR };
        if self.writable {
            perm |= W | RS;
        }
        Access::new(perm, if self.force_share { EVERYTHING } else { QCOW2_SHARES })
    }

    /// A raw node: the user's request, passed through.
    fn raw(self) -> Access {
        Access::new(self.perm, if self.force_share { EVERYTHING } else { self.shared })
    }

    /// The external data file of a qcow2 node.
    fn data_file(self) -> Access {
        let mut perm = self.perm;
        if perm.contains(W) {
            perm |= RS;
        }
        Access::new(perm, if self.force_share { EVERYTHING } else { self.shared - RS })
    }
}

/// The access qlock's chain guards take on the node at `role` in `format` when `top` is asked
/// on the top image: `top` itself on the top (so `--chain` never changes what the top holds),
/// and below it what [`User::for_access`] (the front end the preset is named after) gets there.
pub fn node_access(top: Access, role: Role, format: Format) -> Access {
    match role {
        Role::Top => top,
        _ => User::for_access(top).node(role, format),
    }
}

/// The access of the first pass, while QEMU opens the graph with nobody attached yet (see the
/// module documentation); equal to [`node_access`] on the top and every qcow2 node.
pub fn opening_access(top: Access, role: Role, format: Format) -> Access {
    match role {
        Role::Top if format == Format::Qcow2 => top,
        _ => User::for_access(top).detached().node(role, format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(a: Access) -> String {
        a.lock_set(Perm::ALL).to_string()
    }

    #[test]
    fn presets_on_a_qcow2_top_keep_their_bytes() {
        for p in Access::PRESETS {
            if p.name == "write-shared" {
                continue; // a raw disk's preset: no qcow2 front end shares write of its file
            }
            assert_eq!(
                bytes(User::from_access(p.access).node(Role::Top, Format::Qcow2)),
                bytes(p.access),
                "{}",
                p.name
            );
            assert_eq!(
                bytes(User::from_access(p.access).node(Role::Top, Format::Raw)),
                bytes(p.access),
                "{}",
                p.name
            );
        }
    }

    #[test]
    fn presets_read_as_their_qemu_io_front_ends_below_the_top() {
        let base = Role::Backing { depth: 1 };
        let data = Role::DataFile { depth: 0, raw: true };
        // The rows of `qemu-io`, `qemu-io -r`, `qemu-io -r -U` in docs/graph.md.
        let table = [
            ("force-share", "100 | -", "100 | -", "100 | -"),
            ("read", "100 | 201 203", "100 | -", "100 | 203"),
            ("write", "100 | 201 203", "100 | -", "100 101 103 | 203"),
            ("write-shared", "100 | 201 203", "100 | -", "100 101 103 | 203"),
            // `info` opens the top alone: these are never taken by a chain guard.
            ("info", "- | 201 203", "- | -", "- | 203"),
        ];
        for (name, qcow2, raw, data_file) in table {
            let a: Access = name.parse().unwrap();
            assert_eq!(bytes(node_access(a, base, Format::Qcow2)), qcow2, "{name}");
            assert_eq!(bytes(node_access(a, base, Format::Raw)), raw, "{name}");
            assert_eq!(bytes(node_access(a, data, Format::Raw)), data_file, "{name}");
            assert_eq!(node_access(a, Role::Top, Format::Qcow2), a);
        }
    }

    #[test]
    fn the_first_pass_takes_what_nobody_attached_gets() {
        let data = Role::DataFile { depth: 0, raw: false };
        assert_eq!(bytes(opening_access(Access::WRITE, data, Format::Raw)), "- | 203");
        assert_eq!(bytes(opening_access(Access::WRITE, Role::Backing { depth: 2 }, Format::Raw)), "- | -");
        assert_eq!(
            bytes(opening_access(Access::WRITE, Role::Backing { depth: 1 }, Format::Qcow2)),
            "100 | 201 203"
        );
        assert_eq!(bytes(opening_access(Access::FORCE_SHARE, data, Format::Raw)), "- | -");
        assert_eq!(
            opening_access(Access::READ, Role::Top, Format::Raw),
            Access::new(Perm::empty(), EVERYTHING)
        );
    }
}
