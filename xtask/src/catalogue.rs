//! The QEMU holders the differential check runs, with the access each takes (docs/protocol.md §5);
//! its newcomers are qlock-testkit's catalogue ([`qlock_testkit::newcomer`]), shared with
//! qlock's own tests.
//!
//! Every image is a valid qcow2 file. A front end's *format* is the `-f` it is run with: a
//! `raw` front end opens the same file with the raw driver, which passes the user's
//! permissions straight through, exactly as on a real raw image. Locks only concern the file,
//! so holders and newcomers of either format meet on one image.
//!
//! A holder's access is qlock-testkit's [`FrontEnd`] table, the one downstream tests rely on:
//! the bytes check of `compat` holds it against what the real front end holds on every QEMU
//! version. The newcomers' accesses are written in the testkit's catalogue. Neither is derived
//! from qlock: a wrong
//! entry makes the differential check disagree (newcomers) or fails the bytes check (holders).

use qlock_core::{Access, Perm};
pub use qlock_testkit::newcomer::{self, Command as NewcomerCommand, Newcomer as QemuNewcomer};
pub use qlock_testkit::{Format, FrontEnd};

/// The long-running QEMU program (and its options) a matrix holder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderProgram {
    /// `qemu-io [-r [-U]] IMAGE`, started by the testkit, ready at its `qemu-io> ` prompt.
    Io {
        /// `-r`
        read_only: bool,
        /// `-U`
        force_share: bool,
    },
    /// `qemu-nbd [-r] --fork`, started by the testkit, ready when its first process exits.
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
    pub program: HolderProgram,
    /// `-f` format.
    pub format: Format,
    /// The access it takes on the file: its front end's in the testkit's table.
    pub access: Access,
}

impl HolderProgram {
    /// The program the testkit runs for an NBD front end.
    pub fn nbd_server(self) -> qlock_testkit::NbdServer {
        match self {
            HolderProgram::Nbd { .. } => qlock_testkit::NbdServer::QemuNbd,
            _ => qlock_testkit::NbdServer::StorageDaemon,
        }
    }

    /// The testkit front end this holder is (qemu-nbd and a storage-daemon export take the
    /// same bytes; [`nbd_server`](Self::nbd_server) says which runs).
    pub fn front_end(self) -> FrontEnd {
        match self {
            HolderProgram::Io { read_only: false, .. } => FrontEnd::QemuIoRw,
            HolderProgram::Io { force_share: true, .. } => FrontEnd::QemuIoForceShare,
            HolderProgram::Io { .. } => FrontEnd::QemuIoReadOnly,
            HolderProgram::Nbd { read_only: false } | HolderProgram::Qsd { writable: true } => {
                FrontEnd::QemuNbdRw
            }
            HolderProgram::Nbd { read_only: true } | HolderProgram::Qsd { writable: false } => {
                FrontEnd::QemuNbdReadOnly
            }
            HolderProgram::Vm { readonly: true, .. } => FrontEnd::VmDiskReadonly,
            HolderProgram::Vm { share_rw: true, .. } => FrontEnd::VmDiskShareRw,
            HolderProgram::Vm { .. } => FrontEnd::VmDisk,
        }
    }
}

impl QemuHolder {
    /// A short label such as `qemu-io -r (qcow2)`.
    pub fn label(&self) -> String {
        let what = match self.program {
            HolderProgram::Io { read_only: false, .. } => "qemu-io",
            HolderProgram::Io { force_share: true, .. } => "qemu-io -r -U",
            HolderProgram::Io { .. } => "qemu-io -r",
            HolderProgram::Nbd { read_only: false } => "qemu-nbd",
            HolderProgram::Nbd { read_only: true } => "qemu-nbd -r",
            HolderProgram::Qsd { writable: true } => "q-s-d export rw",
            HolderProgram::Qsd { writable: false } => "q-s-d export ro",
            HolderProgram::Vm { readonly: true, .. } => "VM readonly=on",
            HolderProgram::Vm { share_rw: true, .. } => "VM share-rw=on",
            HolderProgram::Vm { .. } => "VM rw",
        };
        format!("{what} ({})", self.format)
    }

    /// Whether it needs `qemu-system-x86_64`.
    pub fn needs_system(&self) -> bool {
        matches!(self.program, HolderProgram::Vm { .. })
    }
}

const ALL: Perm = Perm::ALL;

/// The holders, in matrix order. VM rows need `qemu-system-x86_64`.
pub fn holders() -> Vec<QemuHolder> {
    use Format::*;
    use HolderProgram::*;
    let groups: [&[HolderProgram]; 4] = [
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
            v.extend(group.iter().filter_map(|&program| {
                program.front_end().access(format).map(|access| QemuHolder { program, format, access })
            }));
        }
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
