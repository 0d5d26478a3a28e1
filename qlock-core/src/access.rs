//! What an opener asks for: the permissions it uses and the ones it lets others use.

use std::fmt;
use std::str::FromStr;

use crate::perm::Perm;
use crate::protocol::LockSet;

/// A request in QEMU's terms: `perm` is what the opener uses, `shared` what it lets others use.
///
/// Everything not in `shared` is *unshared*: the opener read-locks its unshare byte `200 + i`
/// and refuses to open if someone holds permission byte `100 + i`.
///
/// ```
/// use qlock_core::{Access, Perm};
///
/// let a = Access::WRITE; // what qemu-io or a VM does to a qcow2 file
/// assert_eq!(a.perm, Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE);
/// assert_eq!(a.unshared(), Perm::WRITE | Perm::RESIZE);
/// assert_eq!(a.bytes(), vec![100, 101, 103, 201, 203]);
/// assert_eq!("write".parse::<Access>().unwrap(), a);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access {
    /// Permissions used: their bytes `100 + i` are read-locked.
    pub perm: Perm,
    /// Permissions others may still use; the rest get their bytes `200 + i` read-locked.
    pub shared: Perm,
}

/// A named [`Access`], after what a QEMU front end asks for (protocol spec, section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// The name used on the command line and in JSON.
    pub name: &'static str,
    /// The access it stands for.
    pub access: Access,
    /// The QEMU front ends that take the same bytes.
    pub qemu: &'static str,
}

/// What readers that refuse writers share: consistent read, write unchanged, and graph-mod
/// (which every QEMU front end shared, so presets never lock byte 204 even in legacy mode).
const SHARED_READ: Perm = Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED).union(Perm::GRAPH_MOD);

impl Access {
    /// No permission, everything shared: locks no byte. What [`crate::ImageLock::open`] starts
    /// with (QEMU's state before the first parent attaches), and what an all-or-nothing caller
    /// steps back to (QEMU's fast path: it only releases).
    pub const NONE: Access = Access::new(Perm::empty(), Perm::LEGACY_ALL);
    /// `force-share`: consistent read, unshares nothing; bytes `100`.
    /// Like `qemu-io -r -U` or `qemu-img convert -U`.
    pub const FORCE_SHARE: Access = Access::new(Perm::CONSISTENT_READ, Perm::LEGACY_ALL);
    /// `read`: consistent read, unshares write and resize; bytes `100 | 201 203`.
    /// Like `qemu-io -r` on qcow2 or a `qemu-img convert` source.
    pub const READ: Access =
        Access::new(Perm::CONSISTENT_READ, Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED));
    /// `write`: consistent read, write, resize; unshares write and resize;
    /// bytes `100 101 103 | 201 203`. Like `qemu-io` on qcow2, or a VM's qcow2 disk.
    pub const WRITE: Access =
        Access::new(Perm::CONSISTENT_READ.union(Perm::WRITE).union(Perm::RESIZE), SHARED_READ);
    /// `write-shared`: consistent read and write, unshares nothing; bytes `100 101`.
    /// Like a raw disk with `share-rw=on`.
    pub const WRITE_SHARED: Access = Access::new(Perm::CONSISTENT_READ.union(Perm::WRITE), Perm::ALL);
    /// `info`: no permission, unshares write and resize; bytes `201 203`.
    /// Like `qemu-img info` on qcow2.
    pub const INFO: Access = Access::new(Perm::empty(), Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED));

    /// The presets, in the order the README lists them.
    pub const PRESETS: [Preset; 5] = [
        Preset {
            name: "force-share",
            access: Access::FORCE_SHARE,
            qemu: "qemu-io -r -U, qemu-img convert -U",
        },
        Preset { name: "read", access: Access::READ, qemu: "qemu-io -r on qcow2, qemu-img convert source" },
        Preset { name: "write", access: Access::WRITE, qemu: "qemu-io on qcow2, a VM's disk" },
        Preset { name: "write-shared", access: Access::WRITE_SHARED, qemu: "raw disk with share-rw=on" },
        Preset { name: "info", access: Access::INFO, qemu: "qemu-img info on qcow2" },
    ];

    /// An access from explicit sets. Leave [`Perm::GRAPH_MOD`] in `shared` unless you mean to
    /// unshare it (which only matters with [`crate::LockOptions::legacy_graph_mod`]).
    pub const fn new(perm: Perm, shared: Perm) -> Access {
        Access { perm, shared }
    }

    /// The permissions this access refuses to others among the four current ones.
    pub fn unshared(&self) -> Perm {
        Perm::ALL - self.shared
    }

    /// The protocol bytes this access read-locks when the protocol knows the permissions `all`
    /// ([`Perm::ALL`] for QEMU >= 7.0, [`Perm::LEGACY_ALL`] to honour graph-mod as QEMU <= 6.2
    /// did): the one way from an access to its bytes.
    ///
    /// ```
    /// use qlock_core::{Access, Perm};
    ///
    /// assert_eq!(Access::WRITE.lock_set(Perm::ALL).to_string(), "100 101 103 | 201 203");
    /// assert!(Access::NONE.lock_set(Perm::LEGACY_ALL).is_empty());
    /// ```
    pub fn lock_set(&self, all: Perm) -> LockSet {
        LockSet::new(self.perm & all, all - self.shared)
    }

    /// The bytes this access read-locks (without graph-mod), in QEMU's lock order.
    pub fn bytes(&self) -> Vec<u64> {
        self.lock_set(Perm::ALL).bytes().collect()
    }

    /// The preset with this name, if any.
    pub fn preset(name: &str) -> Option<Access> {
        Access::PRESETS.iter().find(|p| p.name == name).map(|p| p.access)
    }

    /// The name of the preset equal to this access, if any.
    pub fn preset_name(&self) -> Option<&'static str> {
        let norm = |a: &Access| a.lock_set(Perm::ALL);
        Access::PRESETS.iter().find(|p| norm(&p.access) == norm(self)).map(|p| p.name)
    }
}

impl fmt::Display for Access {
    /// The preset name when there is one, else `perm=...;shared=...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.preset_name() {
            Some(name) => f.write_str(name),
            None => write!(f, "perm={};shared={}", self.perm, self.shared),
        }
    }
}

impl FromStr for Access {
    type Err = String;

    /// Parses a preset name, or `perm=LIST;shared=LIST` as [`Display`](fmt::Display) prints it.
    fn from_str(s: &str) -> Result<Access, String> {
        if let Some(a) = Access::preset(s.trim()) {
            return Ok(a);
        }
        if s.contains('=') {
            let mut access = Access::NONE;
            for part in s.split(';') {
                match part.trim().split_once('=') {
                    Some(("perm", list)) => access.perm = Perm::parse_list(list)?,
                    Some(("shared", list)) => access.shared = Perm::parse_list(list)?,
                    _ => return Err(format!("cannot parse {part:?}: expected perm=LIST or shared=LIST")),
                }
            }
            return Ok(access);
        }
        let names: Vec<_> = Access::PRESETS.iter().map(|p| p.name).collect();
        Err(format!("unknown access preset {s:?}: expected one of {}", names.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_take_the_bytes_of_the_spec_table() {
        let table: [(&str, &[u64]); 5] = [
            ("force-share", &[100]),
            ("read", &[100, 201, 203]),
            ("write", &[100, 101, 103, 201, 203]),
            ("write-shared", &[100, 101]),
            ("info", &[201, 203]),
        ];
        for (name, bytes) in table {
            let a: Access = name.parse().unwrap();
            assert_eq!(a.bytes(), bytes, "{name}");
            assert_eq!(a.to_string(), name);
        }
    }

    #[test]
    fn explicit_access_round_trips() {
        let a: Access = "perm=write;shared=none".parse().unwrap();
        assert_eq!(a, Access::new(Perm::WRITE, Perm::empty()));
        assert_eq!(a.to_string().parse::<Access>().unwrap(), a);
        assert!("bogus".parse::<Access>().unwrap_err().contains("force-share"));
    }
}
