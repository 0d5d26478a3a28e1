//! rstest fixtures: temporary images and holders on them.
//!
//! Import them with `use qlock_testkit::fixtures::*;` and name them as test arguments. Each
//! image lives in its own temporary directory, removed on drop; a [`HeldImage`] drops its
//! holder before its image. Fixtures panic with a clear message when the machine cannot
//! provide them, as a failed test setup should.
//!
//! ```
//! use qlock_testkit::fixtures::{TempImage, raw_image};
//! use rstest::rstest;
//!
//! #[rstest]
//! fn starts_empty(raw_image: TempImage) {
//!     assert_eq!(std::fs::metadata(raw_image.path()).unwrap().len(), 1 << 20);
//! }
//! # fn main() {}
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use rstest::fixture;
use tempfile::TempDir;

use crate::front_end::{Format, FrontEnd};
use crate::holder::FakeQemu;
use crate::real::find_program;

/// Size of fixture images: 1 MiB.
pub const IMAGE_SIZE: u64 = 1 << 20;

/// A disk image in a temporary directory of its own, removed on drop.
#[derive(Debug)]
pub struct TempImage {
    path: PathBuf,
    format: Format,
    by_qemu_img: bool,
    _dir: TempDir,
}

impl TempImage {
    /// Creates a 1 MiB image: raw as a sparse file, qcow2 with `qemu-img create` from `PATH`
    /// (or, without qemu-img, a file with only a qcow2 header, which fake holders do not
    /// read and no QEMU is around to read).
    ///
    /// # Errors
    /// The I/O error of creating the directory or file, or qemu-img's stderr.
    pub fn new(format: Format) -> io::Result<TempImage> {
        TempImage::with_qemu_bin_dir(format, None)
    }

    /// As [`TempImage::new`], taking `qemu-img` from `dir` when given.
    ///
    /// # Errors
    /// As [`TempImage::new`].
    pub fn with_qemu_bin_dir(format: Format, dir: Option<&Path>) -> io::Result<TempImage> {
        let tmp = tempfile::Builder::new().prefix("qlock-image-").tempdir()?;
        let path = tmp.path().join(format!("disk.{}", format.as_str()));
        let mut by_qemu_img = false;
        match (format, find_program("qemu-img", dir)) {
            (Format::Qcow2, Ok(qemu_img)) => {
                let out = Command::new(qemu_img)
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&path)
                    .arg(IMAGE_SIZE.to_string())
                    .output()?;
                if !out.status.success() {
                    return Err(io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()));
                }
                by_qemu_img = true;
            }
            (Format::Qcow2, Err(_)) => {
                let mut header = vec![0u8; 512];
                header[..4].copy_from_slice(b"QFI\xfb");
                header[4..8].copy_from_slice(&3u32.to_be_bytes());
                header[24..32].copy_from_slice(&IMAGE_SIZE.to_be_bytes());
                std::fs::write(&path, header)?;
            }
            (Format::Raw, _) => std::fs::File::create(&path)?.set_len(IMAGE_SIZE)?,
        }
        Ok(TempImage { path, format, by_qemu_img, _dir: tmp })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Whether `qemu-img create` made it (so real QEMU can open it).
    pub fn is_real_qcow2(&self) -> bool {
        self.by_qemu_img
    }
}

impl AsRef<Path> for TempImage {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// An image with a holder on it. The holder is dropped (killed and reaped) before the image.
#[derive(Debug)]
pub struct HeldImage {
    /// The holder.
    pub holder: FakeQemu,
    /// The image.
    pub image: TempImage,
}

/// Spawns a fake `front_end` on `image`, panicking with the reason if it cannot.
pub fn hold(image: TempImage, front_end: FrontEnd) -> HeldImage {
    let holder = FakeQemu::builder(image.path())
        .front_end(front_end, image.format())
        .spawn()
        .unwrap_or_else(|e| panic!("fixture: cannot spawn {front_end} on {}: {e}", image.path().display()));
    HeldImage { holder, image }
}

/// A fresh 1 MiB raw image.
#[fixture]
pub fn raw_image() -> TempImage {
    TempImage::new(Format::Raw).unwrap_or_else(|e| panic!("fixture: cannot create a raw image: {e}"))
}

/// A fresh 1 MiB qcow2 image, from `qemu-img create` when it is on `PATH`.
#[fixture]
pub fn qcow2_image() -> TempImage {
    TempImage::new(Format::Qcow2).unwrap_or_else(|e| panic!("fixture: cannot create a qcow2 image: {e}"))
}

/// A qcow2 image held by a fake VM disk (`100 101 103 | 201 203`).
#[fixture]
pub fn vm_on_qcow2(qcow2_image: TempImage) -> HeldImage {
    hold(qcow2_image, FrontEnd::VmDisk)
}

/// A raw image held by a fake VM disk (`100 101 | 201`).
#[fixture]
pub fn vm_on_raw(raw_image: TempImage) -> HeldImage {
    hold(raw_image, FrontEnd::VmDisk)
}
