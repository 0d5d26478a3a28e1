//! QEMU newcomers: commands run once against a held image, with the access each asks for
//! (docs/protocol.md §5). The one catalogue of them, for qlock's own tests, this crate's tests
//! and `cargo xtask compat`.
//!
//! The accesses are written here, not derived from the [`FrontEnd`] table nor from qlock: a
//! wrong entry makes a differential check disagree. [`Newcomer::front_end`] names the table's
//! row for the same command, which a test holds against the entry.
//!
//! ```
//! use qlock_testkit::{Access, Format, newcomer::{self, Newcomer}};
//!
//! let info = newcomer::find("img info (qcow2)").unwrap();
//! assert_eq!(info.access, Some(Access::INFO));
//! assert_eq!(info.args("/i/d.qcow2".as_ref(), "/i/out".as_ref()).unwrap().join(" "),
//!            "qemu-img info -f qcow2 /i/d.qcow2");
//! assert!(newcomer::all().iter().all(|n: &Newcomer| n.label().ends_with(")")));
//! # let _ = Format::Raw;
//! ```

use std::path::Path;

use qlock_core::{Access, Perm};

use crate::front_end::{Format, FrontEnd};

/// What a newcomer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `qemu-io [-r [-U]] -c quit`
    Io {
        /// `-r`
        read_only: bool,
        /// `-U`
        force_share: bool,
    },
    /// `qemu-img info [-U]`
    Info {
        /// `-U`
        force_share: bool,
    },
    /// `qemu-img check [-r all]`
    Check {
        /// `-r all`
        repair: bool,
    },
    /// `qemu-img convert` with the image as source.
    Convert,
    /// `qemu-img resize IMAGE 2M`
    Resize,
    /// `qemu-img commit` (the image has no backing file: the verdict is the open's).
    Commit,
    /// `qemu-img create IMAGE 1M` over the existing image.
    Create,
    /// `qemu-nbd [-r] --fork`, stopped once up (a [`FakeQemu`](crate::FakeQemu) with
    /// [`NbdServer::QemuNbd`](crate::NbdServer::QemuNbd)).
    Nbd {
        /// `-r`
        read_only: bool,
    },
    /// `qemu-storage-daemon` with an NBD export, quit once up (a real
    /// [`FakeQemu`](crate::FakeQemu)).
    Qsd {
        /// `writable=on`
        writable: bool,
    },
}

/// A QEMU newcomer with the access it takes on the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Newcomer {
    /// What to run.
    pub command: Command,
    /// `-f` format.
    pub format: Format,
    /// The access it asks for, when that is one request; `None` for `create`, which locks a
    /// different set for its creation step and then reopens the image.
    pub access: Option<Access>,
}

const CR: Perm = Perm::CONSISTENT_READ;
const W: Perm = Perm::WRITE;
const RS: Perm = Perm::RESIZE;
const ALL: Perm = Perm::ALL;

/// Everything but resize: NBD exports never share resize (newcomer exports).
const NO_RESIZE: Access = Access::new(CR.union(W), ALL.difference(RS));
/// A read-only NBD export of a raw file: `100 | 203`.
const RO_NO_RESIZE: Access = Access::new(CR, ALL.difference(RS));

/// Every newcomer, in the order they run against one holder: image-changing ones last, `create`
/// of raw very last.
pub fn all() -> Vec<Newcomer> {
    use Command::*;
    use Format::*;
    let n = |command, format, access| Newcomer { command, format, access: Some(access) };
    let mut v = vec![
        n(Io { read_only: false, force_share: false }, Qcow2, Access::WRITE),
        n(Io { read_only: true, force_share: false }, Qcow2, Access::READ),
        n(Io { read_only: true, force_share: true }, Qcow2, Access::FORCE_SHARE),
        n(Io { read_only: false, force_share: false }, Raw, Access::WRITE_SHARED),
        n(Io { read_only: true, force_share: false }, Raw, Access::FORCE_SHARE),
        n(Io { read_only: true, force_share: true }, Raw, Access::FORCE_SHARE),
        n(Info { force_share: false }, Qcow2, Access::INFO),
        n(Info { force_share: true }, Qcow2, Access::NONE),
        // `qemu-img info` of a raw file takes and tests nothing.
        n(Info { force_share: false }, Raw, Access::NONE),
        n(Check { repair: false }, Qcow2, Access::READ),
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
        // `check -r all` writes to the image only when it finds something to repair.
        n(Check { repair: true }, Qcow2, Access::WRITE),
        n(Resize, Qcow2, Access::WRITE),
        n(Resize, Raw, Access::new(CR.union(W).union(RS), ALL)),
        n(Commit, Qcow2, Access::WRITE),
    ];
    for format in [Qcow2, Raw] {
        v.push(Newcomer { command: Create, format, access: None });
    }
    v
}

/// The newcomer whose [`label`](Newcomer::label) is `label`.
pub fn find(label: &str) -> Option<Newcomer> {
    all().into_iter().find(|n| n.label() == label)
}

impl Newcomer {
    /// A short label such as `img info (raw)`.
    pub fn label(&self) -> String {
        use Command::*;
        let what = match self.command {
            Io { read_only: false, .. } => "qemu-io",
            Io { force_share: true, .. } => "qemu-io -r -U",
            Io { .. } => "qemu-io -r",
            Info { force_share: false } => "img info",
            Info { force_share: true } => "img info -U",
            Check { repair: false } => "img check",
            Check { repair: true } => "img check -r all",
            Convert => "img convert",
            Resize => "img resize",
            Commit => "img commit",
            Create => "img create",
            Nbd { read_only: false } => "qemu-nbd",
            Nbd { read_only: true } => "qemu-nbd -r",
            Qsd { writable: true } => "q-s-d rw",
            Qsd { writable: false } => "q-s-d ro",
        };
        format!("{what} ({})", self.format)
    }

    /// Whether a granted run may change the image (these run last, `create` of raw very last).
    pub fn mutates(&self) -> bool {
        matches!(
            self.command,
            Command::Resize | Command::Commit | Command::Create | Command::Check { repair: true }
        )
    }

    /// The row of the [`FrontEnd`] table for the same command (a long-running daemon newcomer
    /// is the holder front end it becomes); `None` for `commit` and `create`.
    pub fn front_end(&self) -> Option<FrontEnd> {
        use Command::*;
        Some(match self.command {
            Io { read_only: false, .. } => FrontEnd::QemuIoRw,
            Io { force_share: true, .. } => FrontEnd::QemuIoForceShare,
            Io { .. } => FrontEnd::QemuIoReadOnly,
            Info { force_share: false } => FrontEnd::QemuImgInfo,
            Info { force_share: true } => FrontEnd::QemuImgInfoForceShare,
            Check { repair: false } => FrontEnd::QemuImgCheck,
            Check { repair: true } => FrontEnd::QemuImgCheckRepair,
            Convert => FrontEnd::QemuImgConvertSource,
            Resize => FrontEnd::QemuImgResize,
            Nbd { read_only: true } | Qsd { writable: false } => FrontEnd::QemuNbdReadOnly,
            Nbd { .. } | Qsd { .. } => FrontEnd::QemuNbdRw,
            Commit | Create => return None,
        })
    }

    /// The command line of a one-shot newcomer on `image` (`out`: where `convert` writes),
    /// program first; `None` for the daemons ([`Command::Nbd`], [`Command::Qsd`]), which run as
    /// holders ([`front_end`](Self::front_end)) and are stopped once up.
    pub fn args(&self, image: &Path, out: &Path) -> Option<Vec<String>> {
        use Command::*;
        let f = self.format.as_str();
        let image = image.display().to_string();
        let mut v: Vec<String> = match self.command {
            Io { read_only, force_share } => {
                let mut v = vec!["qemu-io", "-f", f];
                v.extend(read_only.then_some("-r"));
                v.extend(force_share.then_some("-U"));
                v.extend(["-c", "quit"]);
                v
            }
            Info { force_share } => {
                let mut v = vec!["qemu-img", "info"];
                v.extend(force_share.then_some("-U"));
                v.extend(["-f", f]);
                v
            }
            Check { repair } => {
                let mut v = vec!["qemu-img", "check", "-q"];
                v.extend(if repair { &["-r", "all"][..] } else { &[] });
                v.extend(["-f", f]);
                v
            }
            Convert => vec!["qemu-img", "convert", "-f", f, "-O", "raw"],
            Resize => vec!["qemu-img", "resize", "-q", "-f", f],
            Commit => vec!["qemu-img", "commit", "-q", "-f", f],
            Create => vec!["qemu-img", "create", "-q", "-f", f],
            Nbd { .. } | Qsd { .. } => return None,
        }
        .into_iter()
        .map(String::from)
        .collect();
        v.push(image);
        match self.command {
            Convert => v.push(out.display().to_string()),
            Resize => v.push("2M".into()),
            Create => v.push("1M".into()),
            _ => {}
        }
        Some(v)
    }
}

/// QEMU's refusal in a front end's stderr, without its prefix (`qemu-io: can't open device
/// IMG: `): the `Failed to ...` line, and the hint line after it when QEMU printed one; `None`
/// when no lock was refused.
pub fn refusal(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr.lines().collect();
    lines.iter().enumerate().find_map(|(i, line)| {
        let at = line.find("Failed to get ").or_else(|| line.find("Failed to lock byte"))?;
        let mut msg = line[at..].trim_end().to_string();
        if let Some(hint) = lines.get(i + 1).filter(|l| l.starts_with("Is another process using")) {
            msg.push('\n');
            msg.push_str(hint.trim_end());
        }
        Some(msg)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newcomers_that_change_the_image_run_last_and_raw_create_very_last() {
        let all = all();
        let first_mutating = all.iter().position(Newcomer::mutates).unwrap();
        assert!(all[first_mutating..].iter().all(Newcomer::mutates), "a reader runs after a writer");
        let last = all.last().unwrap();
        assert!(matches!((last.command, last.format), (Command::Create, Format::Raw)));
    }

    #[test]
    fn labels_are_unique_and_entries_agree_with_the_front_end_table() {
        let all = all();
        let mut labels: Vec<String> = all.iter().map(Newcomer::label).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), all.len());
        for n in &all {
            if let (Some(fe), Some(access)) = (n.front_end(), n.access) {
                let table = fe.access(n.format).unwrap_or_else(|| panic!("{}: n/a in the table", n.label()));
                assert_eq!(table.lock_set(ALL), access.lock_set(ALL), "{} vs {fe}", n.label());
            }
        }
    }

    #[test]
    fn refusals_lose_their_prefix_and_keep_the_hint() {
        let io = "qemu-io: can't open device /i/d.qcow2: Failed to get \"write\" lock\n\
                  Is another process using the image [/i/d.qcow2]?\n";
        let want = "Failed to get \"write\" lock\nIs another process using the image [/i/d.qcow2]?";
        assert_eq!(refusal(io).as_deref(), Some(want));
        let img = "qemu-img: Could not open '/i/d.qcow2': Failed to lock byte 100\n";
        assert_eq!(refusal(img).as_deref(), Some("Failed to lock byte 100"));
        assert_eq!(refusal("qemu-img: Image does not have a backing file\n"), None);
    }
}
