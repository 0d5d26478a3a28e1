//! [`TempImage`]: a disk image in a temporary directory of its own, for tests with or without
//! rstest (the `fixtures` feature builds its fixtures on it).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::front_end::Format;
use crate::real::find_program;

/// Size of [`TempImage`]s: 1 MiB.
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
