//! QEMU front ends and the bytes each one locks (protocol spec, section 5).
//!
//! The table is the point of this module: a fake holder built from a [`FrontEnd`] holds what
//! the real front end holds on QEMU 10.0.2, so code under test cannot tell them apart.

use std::fmt;

use qlock_core::graph::rules::User;
use qlock_core::{Access, Perm};

/// The image format the front end opens, which changes what lands on the file (qlock-core's
/// own `graph::Format`, re-exported).
///
/// A qcow2 node always asks its file for consistent read (plus write and resize when writable)
/// and never shares write or resize, so a qcow2 file always shows `201 203`. The raw format
/// passes the top user's request through unchanged.
pub use qlock_core::graph::Format;

/// A QEMU front end, named after what a person would run.
///
/// [`FrontEnd::access`] gives the permissions it asks of the file; a fake holder built from it
/// holds exactly their bytes.
///
/// ```
/// use qlock_core::Access;
/// use qlock_testkit::{Format, FrontEnd};
///
/// assert_eq!(FrontEnd::QemuIoRw.access(Format::Qcow2), Some(Access::WRITE));
/// assert_eq!(FrontEnd::QemuNbdRw.access(Format::Raw).unwrap().bytes(), vec![100, 101, 203]);
/// assert_eq!(FrontEnd::QemuImgCheck.access(Format::Raw), None); // n/a for raw
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrontEnd {
    /// `qemu-io IMG` (read-write, shares everything): qcow2 `100 101 103 | 201 203`, raw `100 101`.
    QemuIoRw,
    /// `qemu-io -r IMG`: qcow2 `100 | 201 203`, raw `100`.
    QemuIoReadOnly,
    /// `qemu-io -r -U IMG`: `100` on both.
    QemuIoForceShare,
    /// `qemu-img info IMG` while it runs: qcow2 `- | 201 203`, raw nothing at all.
    QemuImgInfo,
    /// `qemu-img info -U IMG`: nothing on either format.
    QemuImgInfoForceShare,
    /// `qemu-img check IMG`: qcow2 `100 | 201 203`; n/a for raw.
    QemuImgCheck,
    /// `qemu-img check -r all IMG`: qcow2 `100 101 103 | 201 203`; n/a for raw.
    QemuImgCheckRepair,
    /// A `qemu-img convert` source: `100 | 201 203` on both (QEMU >= 6.1 unshares write).
    QemuImgConvertSource,
    /// A `qemu-img convert -U` source: `100` on both.
    QemuImgConvertSourceForceShare,
    /// `qemu-img resize IMG`: qcow2 `100 101 103 | 201 203`, raw `100 101 103`.
    QemuImgResize,
    /// A VM's writable `-drive` with a disk device: qcow2 `100 101 103 | 201 203`, raw
    /// `100 101 | 201`.
    VmDisk,
    /// The same with `share-rw=on`: qcow2 unchanged, raw `100 101`.
    VmDiskShareRw,
    /// A VM disk with `readonly=on`: qcow2 `100 | 201 203`, raw `100 | 201`.
    VmDiskReadonly,
    /// A backing file under a qcow2 overlay whose user does not share write (a VM, qemu-img):
    /// `100 | 201 203` on both.
    BackingFile,
    /// `qemu-nbd IMG` or a writable qemu-storage-daemon NBD export: qcow2
    /// `100 101 103 | 201 203`, raw `100 101 | 203` (an export never shares resize).
    QemuNbdRw,
    /// `qemu-nbd -r IMG` or a read-only export: qcow2 `100 | 201 203`, raw `100 | 203`.
    QemuNbdReadOnly,
    /// A qemu-storage-daemon `--blockdev` with no user: qcow2 `100 101 103 | 201 203`, raw
    /// nothing.
    StorageDaemonBlockdev,
}

const CR: Perm = Perm::CONSISTENT_READ;
const W: Perm = Perm::WRITE;
const WU: Perm = Perm::WRITE_UNCHANGED;
const RS: Perm = Perm::RESIZE;

impl FrontEnd {
    /// Every front end, in declaration order, for table-driven tests.
    pub const ALL: [FrontEnd; 17] = [
        FrontEnd::QemuIoRw,
        FrontEnd::QemuIoReadOnly,
        FrontEnd::QemuIoForceShare,
        FrontEnd::QemuImgInfo,
        FrontEnd::QemuImgInfoForceShare,
        FrontEnd::QemuImgCheck,
        FrontEnd::QemuImgCheckRepair,
        FrontEnd::QemuImgConvertSource,
        FrontEnd::QemuImgConvertSourceForceShare,
        FrontEnd::QemuImgResize,
        FrontEnd::VmDisk,
        FrontEnd::VmDiskShareRw,
        FrontEnd::VmDiskReadonly,
        FrontEnd::BackingFile,
        FrontEnd::QemuNbdRw,
        FrontEnd::QemuNbdReadOnly,
        FrontEnd::StorageDaemonBlockdev,
    ];

    /// What this front end asks of the image file on `format` (docs/protocol.md §5), or `None` when
    /// the table says n/a (`qemu-img check` of a raw image).
    pub fn access(self, format: Format) -> Option<Access> {
        use FrontEnd::*;
        let qcow2 = match self {
            QemuIoRw
            | QemuImgCheckRepair
            | QemuImgResize
            | VmDisk
            | VmDiskShareRw
            | QemuNbdRw
            | StorageDaemonBlockdev => Access::WRITE,
            QemuIoReadOnly | QemuImgCheck | QemuImgConvertSource | VmDiskReadonly | BackingFile
            | QemuNbdReadOnly => Access::READ,
            QemuIoForceShare | QemuImgConvertSourceForceShare => Access::FORCE_SHARE,
            QemuImgInfo => Access::INFO,
            QemuImgInfoForceShare => Access::NONE,
        };
        if format == Format::Qcow2 {
            return Some(qcow2);
        }
        Some(match self {
            QemuImgCheck | QemuImgCheckRepair => return None,
            QemuIoRw | VmDiskShareRw => Access::WRITE_SHARED,
            QemuIoReadOnly | QemuIoForceShare | QemuImgConvertSourceForceShare => Access::FORCE_SHARE,
            QemuImgInfo | QemuImgInfoForceShare | StorageDaemonBlockdev => Access::NONE,
            QemuImgConvertSource | BackingFile => Access::READ,
            QemuImgResize => Access::new(CR | W | RS, Perm::ALL),
            VmDisk => Access::new(CR | W, CR | WU | RS),
            VmDiskReadonly => Access::new(CR, CR | WU | RS),
            QemuNbdRw => Access::new(CR | W, CR | W | WU),
            QemuNbdReadOnly => Access::new(CR, CR | W | WU),
        })
    }

    /// The user this front end is at the top of an image graph: what it asks and shares, and
    /// how it opens the graph. [`User::node`] then gives what it takes on every node of a chain
    /// (`qlock_core::graph::rules`); on the top that is [`FrontEnd::access`].
    ///
    /// Below the top, watched on 10.0.2 and 7.2 for the qemu-io, qemu-nbd, storage-daemon and
    /// VM rows (`docs/graph.md`), and with `strace` on 10.0.2 for `qemu-img check`, `convert`
    /// and `resize`; `qemu-img check -r all` is assumed to be `check` opened read-write.
    pub fn user(self) -> User {
        use FrontEnd::*;
        match self {
            QemuIoRw | VmDiskShareRw => User::QEMU_IO_RW,
            // Assumed: `check` opened read-write.
            QemuImgCheckRepair => User::QEMU_IO_RW,
            QemuIoReadOnly | QemuImgCheck => User::QEMU_IO_READ_ONLY,
            QemuIoForceShare | QemuImgConvertSourceForceShare => User::QEMU_IO_FORCE_SHARE,
            QemuImgInfo => User::QEMU_IMG_INFO,
            QemuImgInfoForceShare => User::QEMU_IMG_INFO_FORCE_SHARE,
            QemuImgConvertSource => User::CONVERT_SOURCE,
            QemuImgResize => User::RESIZE,
            VmDisk => User::VM_DISK,
            VmDiskReadonly => User::VM_DISK_READONLY,
            BackingFile => User::VM_DISK.backing(),
            QemuNbdRw => User::NBD_RW,
            QemuNbdReadOnly => User::NBD_READ_ONLY,
            StorageDaemonBlockdev => User::nobody(true),
        }
    }

    /// Whether the front end opens the image's backing files and data file at all while it
    /// holds the image: `qemu-img info` does not (with `--backing-chain` it opens each image
    /// in turn, never two at once), every other front end does.
    pub fn opens_chain(self) -> bool {
        !matches!(self, FrontEnd::QemuImgInfo | FrontEnd::QemuImgInfoForceShare)
    }

    /// The command line this front end stands for, as a person would type it.
    pub fn command(self) -> &'static str {
        use FrontEnd::*;
        match self {
            QemuIoRw => "qemu-io IMG",
            QemuIoReadOnly => "qemu-io -r IMG",
            QemuIoForceShare => "qemu-io -r -U IMG",
            QemuImgInfo => "qemu-img info IMG",
            QemuImgInfoForceShare => "qemu-img info -U IMG",
            QemuImgCheck => "qemu-img check IMG",
            QemuImgCheckRepair => "qemu-img check -r all IMG",
            QemuImgConvertSource => "qemu-img convert IMG OUT",
            QemuImgConvertSourceForceShare => "qemu-img convert -U IMG OUT",
            QemuImgResize => "qemu-img resize IMG SIZE",
            VmDisk => "qemu-system -drive file=IMG,if=none,id=d -device virtio-blk,drive=d",
            VmDiskShareRw => {
                "qemu-system -drive file=IMG,if=none,id=d -device virtio-blk,drive=d,share-rw=on"
            }
            VmDiskReadonly => {
                "qemu-system -drive file=IMG,if=none,id=d,readonly=on -device virtio-blk,drive=d"
            }
            BackingFile => "qemu-system -drive file=OVERLAY (IMG is OVERLAY's backing file)",
            QemuNbdRw => "qemu-nbd IMG",
            QemuNbdReadOnly => "qemu-nbd -r IMG",
            StorageDaemonBlockdev => "qemu-storage-daemon --blockdev driver=FMT,file.filename=IMG",
        }
    }
}

impl fmt::Display for FrontEnd {
    /// The command line, as [`FrontEnd::command`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.command())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Section 5 of the spec, transcribed by hand as byte strings: a second, independent copy
    /// of the table that the `access` match is held against.
    const SPEC: [(FrontEnd, &str, &str); 17] = [
        (FrontEnd::QemuIoRw, "100 101 103 | 201 203", "100 101 | -"),
        (FrontEnd::QemuIoReadOnly, "100 | 201 203", "100 | -"),
        (FrontEnd::QemuIoForceShare, "100 | -", "100 | -"),
        (FrontEnd::QemuImgInfo, "- | 201 203", "- | -"),
        (FrontEnd::QemuImgInfoForceShare, "- | -", "- | -"),
        (FrontEnd::QemuImgCheck, "100 | 201 203", "n/a"),
        (FrontEnd::QemuImgCheckRepair, "100 101 103 | 201 203", "n/a"),
        (FrontEnd::QemuImgConvertSource, "100 | 201 203", "100 | 201 203"),
        (FrontEnd::QemuImgConvertSourceForceShare, "100 | -", "100 | -"),
        (FrontEnd::QemuImgResize, "100 101 103 | 201 203", "100 101 103 | -"),
        (FrontEnd::VmDisk, "100 101 103 | 201 203", "100 101 | 201"),
        (FrontEnd::VmDiskShareRw, "100 101 103 | 201 203", "100 101 | -"),
        (FrontEnd::VmDiskReadonly, "100 | 201 203", "100 | 201"),
        (FrontEnd::BackingFile, "100 | 201 203", "100 | 201 203"),
        (FrontEnd::QemuNbdRw, "100 101 103 | 201 203", "100 101 | 203"),
        (FrontEnd::QemuNbdReadOnly, "100 | 201 203", "100 | 203"),
        (FrontEnd::StorageDaemonBlockdev, "100 101 103 | 201 203", "- | -"),
    ];

    fn show(a: Option<Access>) -> String {
        a.map_or("n/a".into(), |a| a.lock_set(Perm::ALL).to_string())
    }

    #[test]
    fn each_user_takes_the_table_bytes_on_the_top() {
        use qlock_core::graph::Role;
        for fe in FrontEnd::ALL {
            for format in Format::ALL {
                let Some(access) = fe.access(format) else { continue };
                let got = fe.user().node(Role::Top, format);
                assert_eq!(show(Some(got)), show(Some(access)), "{fe} on {format}");
            }
        }
    }

    #[test]
    fn access_matches_the_spec_table() {
        assert_eq!(SPEC.len(), FrontEnd::ALL.len());
        for (fe, qcow2, raw) in SPEC {
            assert_eq!(show(fe.access(Format::Qcow2)), qcow2, "{fe} on qcow2");
            assert_eq!(show(fe.access(Format::Raw)), raw, "{fe} on raw");
        }
    }
}
