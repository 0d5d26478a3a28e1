//! The QEMU front ends the differential check runs, with the access each takes (docs/protocol.md §5).
//!
//! Every image is a valid qcow2 file. A front end's *format* is the `-f` it is run with: a
//! `raw` front end opens the same file with the raw driver, which passes the user's
//! permissions straight through, exactly as on a real raw image. Locks only concern the file,
//! so holders and newcomers of either format meet on one image.
//!
//! A holder's access is qlock-testkit's [`FrontEnd`] table, the one downstream tests rely on:
//! the bytes check of `compat` holds it against what the real front end holds on every QEMU
//! version. The newcomers' accesses are written here. Neither is derived from qlock: a wrong
//! entry makes the differential check disagree (newcomers) or fails the bytes check (holders).

use qlock_core::{Access, Perm};
pub use qlock_testkit::{Format, FrontEnd};

/// A long-running QEMU process that holds an image open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderKind {
    /// `qemu-io [-r [-U]] IMAGE`, started by the testkit, ready at its `qemu-io> ` prompt.
    Io {
        /// `-r`
        read_only: bool,
        /// `-U`
        force_share: bool,
    },
    /// `qemu-nbd [-r] --fork`, ready when the parent exits.
    Nbd {
        /// `-r`
        read_only: bool,
    },
    /// `qemu-storage-daemon` with an NBD export, started by the testkit, ready at its QMP
    /// greeting (the monitor is its last option).
    Qsd {
        /// `writable=on`
        writable: bool,
    },
    /// A paused `qemu-system-x86_64 -S` with a virtio-blk disk, ready when QMP answers a command.
    Vm {
        /// `readonly=on` on the drive.
        readonly: bool,
        /// `share-rw=on` on the device.
        share_rw: bool,
    },
}

/// A QEMU holder with the bytes the spec says it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuHolder {
    /// How to run it.
    pub kind: HolderKind,
    /// `-f` format.
    pub format: Format,
    /// The access it takes on the file: its front end's in the testkit's table.
    pub access: Access,
}

impl HolderKind {
    /// The testkit front end this holder is (qemu-nbd and a storage-daemon export take the
    /// same bytes).
    pub fn front_end(self) -> FrontEnd {
        match self {
            HolderKind::Io { read_only: false, .. } => FrontEnd::QemuIoRw,
            HolderKind::Io { force_share: true, .. } => FrontEnd::QemuIoForceShare,
            HolderKind::Io { .. } => FrontEnd::QemuIoReadOnly,
            HolderKind::Nbd { read_only: false } | HolderKind::Qsd { writable: true } => FrontEnd::QemuNbdRw,
            HolderKind::Nbd { read_only: true } | HolderKind::Qsd { writable: false } => {
                FrontEnd::QemuNbdReadOnly
            }
            HolderKind::Vm { readonly: true, .. } => FrontEnd::VmDiskReadonly,
            HolderKind::Vm { share_rw: true, .. } => FrontEnd::VmDiskShareRw,
            HolderKind::Vm { .. } => FrontEnd::VmDisk,
        }
    }
}

impl QemuHolder {
    /// A short label such as `qemu-io -r (qcow2)`.
    pub fn label(&self) -> String {
        let what = match self.kind {
            HolderKind::Io { read_only: false, .. } => "qemu-io",
            HolderKind::Io { force_share: true, .. } => "qemu-io -r -U",
            HolderKind::Io { .. } => "qemu-io -r",
            HolderKind::Nbd { read_only: false } => "qemu-nbd",
            HolderKind::Nbd { read_only: true } => "qemu-nbd -r",
            HolderKind::Qsd { writable: true } => "q-s-d export rw",
            HolderKind::Qsd { writable: false } => "q-s-d export ro",
            HolderKind::Vm { readonly: true, .. } => "VM readonly=on",
            HolderKind::Vm { share_rw: true, .. } => "VM share-rw=on",
            HolderKind::Vm { .. } => "VM rw",
        };
        format!("{what} ({})", self.format)
    }

    /// Whether it needs `qemu-system-x86_64`.
    pub fn needs_system(&self) -> bool {
        matches!(self.kind, HolderKind::Vm { .. })
    }
}

/// A QEMU command run once against a held image; its verdict is what we compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewcomerKind {
    /// `qemu-io [-r [-U]] -c quit`
    Io {
        /// `-r`
        read_only: bool,
        /// `-U`
        force_share: bool,
    },
    /// `qemu-img info`
    Info,
    /// `qemu-img check`
    Check,
    /// `qemu-img convert` with the image as source.
    Convert,
    /// `qemu-img resize IMAGE 2M`
    Resize,
    /// `qemu-img commit` (the image has no backing file: the verdict is the open's).
    Commit,
    /// `qemu-img create IMAGE 1M` over the existing image.
    Create,
    /// `qemu-nbd [-r] --fork`, killed once up.
    Nbd {
        /// `-r`
        read_only: bool,
    },
    /// `qemu-storage-daemon` with an NBD export, quit once up.
    Qsd {
        /// `writable=on`
        writable: bool,
    },
}

/// A QEMU newcomer with the access it takes on the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuNewcomer {
    /// What to run.
    pub kind: NewcomerKind,
    /// `-f` format.
    pub format: Format,
    /// The access it asks for, when that is one request; `None` for `create`, which locks a
    /// different set for its creation step and then reopens the image.
    pub access: Option<Access>,
}

impl QemuNewcomer {
    /// A short label such as `img info (raw)`.
    pub fn label(&self) -> String {
        let what = match self.kind {
            NewcomerKind::Io { read_only: false, .. } => "qemu-io",
            NewcomerKind::Io { force_share: true, .. } => "qemu-io -r -U",
            NewcomerKind::Io { .. } => "qemu-io -r",
            NewcomerKind::Info => "img info",
            NewcomerKind::Check => "img check",
            NewcomerKind::Convert => "img convert",
            NewcomerKind::Resize => "img resize",
            NewcomerKind::Commit => "img commit",
            NewcomerKind::Create => "img create",
            NewcomerKind::Nbd { read_only: false } => "qemu-nbd",
            NewcomerKind::Nbd { read_only: true } => "qemu-nbd -r",
            NewcomerKind::Qsd { writable: true } => "q-s-d rw",
            NewcomerKind::Qsd { writable: false } => "q-s-d ro",
        };
        format!("{what} ({})", self.format)
    }

    /// Whether a granted run changes the image (these run last, `create` of raw very last).
    pub fn mutates(&self) -> bool {
        matches!(self.kind, NewcomerKind::Resize | NewcomerKind::Commit | NewcomerKind::Create)
    }
}

const CR: Perm = Perm::CONSISTENT_READ;
const W: Perm = Perm::WRITE;
const RS: Perm = Perm::RESIZE;
const ALL: Perm = Perm::ALL;

/// Everything but resize: NBD exports never share resize (newcomer exports).
const NO_RESIZE: Access = Access::new(CR.union(W), ALL.difference(RS));
/// A read-only NBD export of a raw file: `100 | 203`.
const RO_NO_RESIZE: Access = Access::new(CR, ALL.difference(RS));

/// The holders, in matrix order. VM rows need `qemu-system-x86_64`.
pub fn holders() -> Vec<QemuHolder> {
    use Format::*;
    use HolderKind::*;
    let groups: [&[HolderKind]; 4] = [
        &[
            Io { read_only: false, force_share: false },
            Io { read_only: true, force_share: false },
            Io { read_only: true, force_share: true },
        ],
        &[Nbd { read_only: false }, Nbd { read_only: true }],
        &[Qsd { writable: true }, Qsd { writable: false }],
        // A disk device shares consistent read, write unchanged and resize (hw/block/block.c).
        &[
            Vm { readonly: false, share_rw: false },
            Vm { readonly: true, share_rw: false },
            Vm { readonly: false, share_rw: true },
        ],
    ];
    let mut v = Vec::new();
    // Each front end on qcow2, then on raw. Every pair has an access (a test says so).
    for group in groups {
        for format in [Qcow2, Raw] {
            v.extend(group.iter().filter_map(|&kind| {
                kind.front_end().access(format).map(|access| QemuHolder { kind, format, access })
            }));
        }
    }
    v
}

/// The newcomers, in the order they run against one holder: image-changing ones last.
pub fn newcomers() -> Vec<QemuNewcomer> {
    use Format::*;
    use NewcomerKind::*;
    let n = |kind, format, access| QemuNewcomer { kind, format, access: Some(access) };
    let mut v = vec![
        n(Io { read_only: false, force_share: false }, Qcow2, Access::WRITE),
        n(Io { read_only: true, force_share: false }, Qcow2, Access::READ),
        n(Io { read_only: true, force_share: true }, Qcow2, Access::FORCE_SHARE),
        n(Io { read_only: false, force_share: false }, Raw, Access::WRITE_SHARED),
        n(Io { read_only: true, force_share: false }, Raw, Access::FORCE_SHARE),
        n(Io { read_only: true, force_share: true }, Raw, Access::FORCE_SHARE),
        n(Info, Qcow2, Access::INFO),
        // `qemu-img info` of a raw file takes and tests nothing.
        n(Info, Raw, Access::new(Perm::empty(), ALL)),
        n(Check, Qcow2, Access::READ),
        n(Convert, Qcow2, Access::READ),
        n(Convert, Raw, Access::READ),
        n(Nbd { read_only: false }, Qcow2, Access::WRITE),
        n(Nbd { read_only: true }, Qcow2, Access::READ),
        n(Nbd { read_only: false }, Raw, NO_RESIZE),
        n(Nbd { read_only: true }, Raw, RO_NO_RESIZE),
        n(Qsd { writable: true }, Qcow2, Access::WRITE),
        n(Qsd { writable: false }, Qcow2, Access::READ),
        n(Qsd { writable: true }, Raw, NO_RESIZE),
        n(Qsd { writable: false }, Raw, RO_NO_RESIZE),
        n(Resize, Qcow2, Access::WRITE),
        n(Resize, Raw, Access::new(CR.union(W).union(RS), ALL)),
        n(Commit, Qcow2, Access::WRITE),
    ];
    for format in [Qcow2, Raw] {
        v.push(QemuNewcomer { kind: Create, format, access: None });
    }
    v
}

/// Two accesses take the same bytes (graph-mod aside).
pub fn same_bytes(a: Access, b: Access) -> bool {
    a.lock_set(ALL) == b.lock_set(ALL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newcomers_that_change_the_image_run_last_and_raw_create_very_last() {
        let all = newcomers();
        let first_mutating = all.iter().position(QemuNewcomer::mutates).unwrap();
        assert!(all[first_mutating..].iter().all(QemuNewcomer::mutates), "a reader runs after a writer");
        let last = all.last().unwrap();
        assert!(matches!((last.kind, last.format), (NewcomerKind::Create, Format::Raw)));
    }

    #[test]
    fn every_holder_has_an_access_and_a_unique_label() {
        let holders = holders();
        assert_eq!(holders.len(), 20);
        let mut labels: Vec<String> = holders.iter().map(QemuHolder::label).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), 20);
        // Spot checks against docs/protocol.md §5, independent of the testkit's table.
        let bytes = |label: &str| holders.iter().find(|h| h.label() == label).map(|h| h.access.bytes());
        assert_eq!(bytes("qemu-nbd (raw)"), Some(vec![100, 101, 203]));
        assert_eq!(bytes("VM rw (raw)"), Some(vec![100, 101, 201]));
        assert_eq!(bytes("qemu-io -r (qcow2)"), Some(vec![100, 201, 203]));
    }
}
