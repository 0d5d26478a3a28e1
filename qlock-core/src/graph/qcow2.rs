//! The qcow2 header, as far as the image graph needs it: pure parsing of the first cluster.
//!
//! Layout (big-endian, from the published qcow2 specification): magic `QFI\xfb`, version (2 or
//! 3), backing file offset (u64 at 8) and size (u32 at 16), cluster bits (u32 at 20); version 3
//! adds incompatible, compatible and autoclear feature bits (u64 at 72, 80, 88) and the header
//! length (u32 at 100). Header extensions (type u32, length u32, data padded to 8 bytes, ended
//! by type 0) follow the header, up to the backing file name or the end of the first cluster.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Header extension: the backing file's format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: the external data file's name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bits this parser knows: dirty, corrupt, external data file,
/// compression type, extended L2 entries.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Autoclear feature bit 1: the external data file is a valid raw image by itself.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// The version 2 header ends here (no feature bits, no header length field).
const V2_HEADER_LEN: usize = 72;
/// The version 3 header is at least this long.
const V3_MIN_HEADER_LEN: usize = 104;
/// QEMU refuses backing file names longer than this.
pub const MAX_BACKING_NAME: usize = 1023;
/// The backing-format extension holds a short name (QEMU keeps it in 16 bytes with its NUL).
const MAX_FORMAT_NAME: usize = 15;
/// Bytes enough to read every fixed field: read this much first.
pub const FIXED_LEN: usize = V3_MIN_HEADER_LEN;

/// The header fields that shape the image graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Cluster size is `1 << cluster_bits` (9..=21).
    pub cluster_bits: u32,
    /// The backing file name as stored (`None` when there is no backing file).
    pub backing: Option<Vec<u8>>,
    /// The backing-format extension, when present (`None`: QEMU probes the backing file).
    pub backing_format: Option<String>,
    /// The external data file's name, when the incompatible bit says there is one.
    pub data_file: Option<Vec<u8>>,
    /// Incompatible feature bits (0 on version 2).
    pub incompatible: u64,
    /// Autoclear feature bits (0 on version 2).
    pub autoclear: u64,
}

impl Header {
    /// The cluster size: the header and its extensions live in the first cluster.
    pub fn cluster_size(&self) -> usize {
        1 << self.cluster_bits
    }

    /// Whether guest data is in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }

    /// Whether the external data file is itself a valid raw image (`data_file_raw=on`).
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// The backing file name as a path-like string (bytes, as stored).
    pub fn backing_name(&self) -> Option<PathBuf> {
        self.backing.as_deref().map(|b| PathBuf::from(OsStr::from_bytes(b)))
    }

    /// How many bytes from offset 0 [`Header::parse`] needs, given at least [`FIXED_LEN`]
    /// bytes (or the whole file when shorter): the whole first cluster.
    ///
    /// # Errors
    /// The errors of the fixed fields (magic, version, cluster bits).
    pub fn needed_len(fixed: &[u8]) -> Result<usize, HeaderError> {
        let (_, cluster_bits) = version_and_cluster_bits(fixed)?;
        Ok(1 << cluster_bits)
    }

    /// Parses a qcow2 header from the start of an image: `buf` is the first cluster, or the
    /// whole file when it is shorter. Never panics, whatever the bytes.
    ///
    /// # Errors
    /// [`HeaderError`] saying what is wrong, for anything QEMU would refuse to open too, and
    /// for what this parser does not follow (unknown incompatible features).
    pub fn parse(buf: &[u8]) -> Result<Header, HeaderError> {
        let (version, cluster_bits) = version_and_cluster_bits(buf)?;
        let cluster = 1usize << cluster_bits;
        let buf = &buf[..buf.len().min(cluster)];
        let (header_len, incompatible, autoclear) = if version == 2 {
            (V2_HEADER_LEN, 0, 0)
        } else {
            let len = be32(buf, 100)? as usize;
            if len < V3_MIN_HEADER_LEN || len > cluster || len % 8 != 0 {
                return Err(HeaderError::BadHeaderLength(len));
            }
            (len, be64(buf, 72)?, be64(buf, 88)?)
        };
        if incompatible & !INCOMPAT_KNOWN != 0 {
            return Err(HeaderError::UnknownFeatures(incompatible & !INCOMPAT_KNOWN));
        }
        let backing_offset = be64(buf, 8)?;
        let backing_size = be32(buf, 16)? as usize;
        let backing = if backing_offset == 0 || backing_size == 0 {
            None
        } else {
            if backing_size > MAX_BACKING_NAME {
                return Err(HeaderError::BackingNameTooLong(backing_size));
            }
            let start =
                usize::try_from(backing_offset).ok().filter(|&s| s.saturating_add(backing_size) <= cluster);
            let start = start.ok_or(HeaderError::BackingNameOutside(backing_offset))?;
            Some(cstr(bytes(buf, start, backing_size)?).to_vec())
        };
        // Extensions run up to the backing file name when there is one, else to the cluster's
        // end (checked above to fit in the cluster).
        let end = if backing.is_some() { backing_offset as usize } else { cluster };
        let mut backing_format = None;
        let mut data_file_name = None;
        let mut at = header_len;
        while at + 8 <= end {
            let ty = be32(buf, at)?;
            if ty == 0 {
                break;
            }
            let len = be32(buf, at + 4)? as usize;
            let data_at = at + 8;
            if len > end - data_at {
                return Err(HeaderError::ExtensionOverrun { ext: ty, offset: at });
            }
            let data = bytes(buf, data_at, len)?;
            match ty {
                EXT_BACKING_FORMAT => {
                    if len > MAX_FORMAT_NAME {
                        return Err(HeaderError::BadBackingFormat(len));
                    }
                    backing_format = Some(String::from_utf8_lossy(cstr(data)).into_owned());
                }
                EXT_DATA_FILE => data_file_name = Some(cstr(data).to_vec()),
                _ => {}
            }
            at = data_at + len.div_ceil(8) * 8;
        }
        let data_file = if incompatible & INCOMPAT_DATA_FILE != 0 {
            match data_file_name {
                Some(name) if !name.is_empty() => Some(name),
                _ => return Err(HeaderError::MissingDataFileName),
            }
        } else {
            None
        };
        Ok(Header { version, cluster_bits, backing, backing_format, data_file, incompatible, autoclear })
    }
}

/// What is wrong with a qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The file ends before the field at `need` bytes.
    #[error("the header is truncated: {need} bytes needed, the file has {have}")]
    Truncated {
        /// Bytes the field needs from offset 0.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Not `QFI\xfb`.
    #[error("no qcow2 magic")]
    NotQcow2,
    /// A version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// Cluster bits outside 9..=21.
    #[error("invalid cluster size (cluster_bits {0})")]
    BadClusterBits(u32),
    /// A v3 header length below 104, not a multiple of 8, or past the first cluster.
    #[error("invalid header length {0}")]
    BadHeaderLength(usize),
    /// Incompatible feature bits QEMU does not know either.
    #[error("unsupported qcow2 feature(s): incompatible bits {0:#x}")]
    UnknownFeatures(u64),
    /// The backing file name is longer than QEMU accepts.
    #[error("backing file name too long ({0} bytes)")]
    BackingNameTooLong(usize),
    /// The backing file name lies outside the first cluster.
    #[error("invalid backing file offset {0}")]
    BackingNameOutside(u64),
    /// A header extension runs past its area.
    #[error("header extension {ext:#x} at offset {offset} runs past the header area")]
    ExtensionOverrun {
        /// Its type.
        ext: u32,
        /// Where it starts.
        offset: usize,
    },
    /// The backing-format extension is too long to be a format name.
    #[error("backing format name too long ({0} bytes)")]
    BadBackingFormat(usize),
    /// The external data file bit is set but no name is recorded.
    #[error("the image has an external data file but does not name it")]
    MissingDataFileName,
}

fn version_and_cluster_bits(buf: &[u8]) -> Result<(u32, u32), HeaderError> {
    if bytes(buf, 0, 4)? != MAGIC {
        return Err(HeaderError::NotQcow2);
    }
    let version = be32(buf, 4)?;
    if version != 2 && version != 3 {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let cluster_bits = be32(buf, 20)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(HeaderError::BadClusterBits(cluster_bits));
    }
    // The fixed fields of the version must be there too.
    bytes(buf, 0, if version == 2 { V2_HEADER_LEN } else { V3_MIN_HEADER_LEN })?;
    Ok((version, cluster_bits))
}

fn bytes(buf: &[u8], at: usize, len: usize) -> Result<&[u8], HeaderError> {
    let need = at.saturating_add(len);
    buf.get(at..need).ok_or(HeaderError::Truncated { need, have: buf.len() })
}

fn be32(buf: &[u8], at: usize) -> Result<u32, HeaderError> {
    let b = bytes(buf, at, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(buf: &[u8], at: usize) -> Result<u64, HeaderError> {
    let b = bytes(buf, at, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_be_bytes(a))
}

/// A stored name up to its first NUL (QEMU treats names as C strings).
fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |n| &b[..n])
}

/// An image format as probed from its first bytes, the way QEMU guesses when no format is
/// recorded: qcow2 by its magic, a handful of other formats by theirs, raw otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// qcow2 (version 2 or 3).
    Qcow2,
    /// Nothing recognised: raw.
    Raw,
    /// Another format QEMU knows, by QEMU's name for it.
    Other(&'static str),
}

impl fmt::Display for Probed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Probed::Qcow2 => "qcow2",
            Probed::Raw => "raw",
            Probed::Other(name) => name,
        })
    }
}

/// Bytes [`probe`] looks at (the VDI signature sits at 0x40).
pub const PROBE_LEN: usize = 512;

/// Guesses the format of an image from its first [`PROBE_LEN`] bytes (fewer if the file is
/// shorter). Formats recognised only at the end of the file (dmg) are taken for raw.
pub fn probe(buf: &[u8]) -> Probed {
    let starts = |magic: &[u8]| buf.starts_with(magic);
    if starts(&MAGIC) {
        return match buf.get(4..8) {
            Some([0, 0, 0, 1]) => Probed::Other("qcow"),
            _ => Probed::Qcow2,
        };
    }
    const MAGICS: [(&[u8], &str); 11] = [
        (b"QED\0", "qed"),
        (b"KDMV", "vmdk"),
        (b"COWD", "vmdk"),
        (b"# Disk DescriptorFile", "vmdk"),
        (b"vhdxfile", "vhdx"),
        (b"conectix", "vpc"),
        (b"LUKS\xba\xbe", "luks"),
        (b"WithoutFreeSpace", "parallels"),
        (b"WithouFreSpacExt", "parallels"),
        (b"Bochs Virtual HD Image", "bochs"),
        (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
    ];
    if let Some((_, name)) = MAGICS.iter().find(|(m, _)| starts(m)) {
        return Probed::Other(name);
    }
    if buf.get(0x40..0x44) == Some(&0xbeda_107f_u32.to_le_bytes()[..]) {
        return Probed::Other("vdi");
    }
    Probed::Raw
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A v3 header of `cluster` bytes with the given backing name, and extensions.
    pub(crate) fn v3(
        backing: Option<&[u8]>,
        exts: &[(u32, &[u8])],
        incompat: u64,
        autoclear: u64,
    ) -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[72..80].copy_from_slice(&incompat.to_be_bytes());
        b[88..96].copy_from_slice(&autoclear.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        let mut at = 112;
        for (ty, data) in exts {
            b[at..at + 4].copy_from_slice(&ty.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            b[at + 8..at + 8 + data.len()].copy_from_slice(data);
            at += 8 + data.len().div_ceil(8) * 8;
        }
        if let Some(name) = backing {
            let off = 512;
            b[8..16].copy_from_slice(&(off as u64).to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b[off..off + name.len()].copy_from_slice(name);
        }
        b
    }

    #[test]
    fn reads_backing_name_format_and_data_file() {
        let h = Header::parse(&v3(Some(b"base.qcow2"), &[(EXT_BACKING_FORMAT, b"qcow2")], 0, 0)).unwrap();
        assert_eq!(h.backing.as_deref(), Some(&b"base.qcow2"[..]));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        assert!(!h.has_data_file());
        let h = Header::parse(&v3(None, &[(EXT_DATA_FILE, b"d.raw")], INCOMPAT_DATA_FILE, 2)).unwrap();
        assert_eq!(h.data_file.as_deref(), Some(&b"d.raw"[..]));
        assert!(h.data_file_raw());
    }

    #[test]
    fn corrupt_headers_are_typed_errors() {
        let good = v3(Some(b"b"), &[], 0, 0);
        assert!(matches!(Header::parse(&good[..50]), Err(HeaderError::Truncated { .. })));
        assert_eq!(Header::parse(b"QFI"), Err(HeaderError::Truncated { need: 4, have: 3 }));
        let mut bad = good.clone();
        bad[7] = 4;
        assert_eq!(Header::parse(&bad), Err(HeaderError::UnsupportedVersion(4)));
        let mut bad = good.clone();
        bad[23] = 40;
        assert_eq!(Header::parse(&bad), Err(HeaderError::BadClusterBits(40)));
        let mut bad = good.clone();
        bad[16..20].copy_from_slice(&2000u32.to_be_bytes());
        assert_eq!(Header::parse(&bad), Err(HeaderError::BackingNameTooLong(2000)));
        let mut bad = good.clone();
        bad[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(Header::parse(&bad), Err(HeaderError::BackingNameOutside(u64::MAX)));
        let overrun = v3(Some(b"b"), &[(0x1234, &[0; 8])], 0, 0);
        let mut bad = overrun.clone();
        bad[116..120].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(Header::parse(&bad), Err(HeaderError::ExtensionOverrun { ext: 0x1234, .. })));
        let no_name = v3(None, &[], INCOMPAT_DATA_FILE, 0);
        assert_eq!(Header::parse(&no_name), Err(HeaderError::MissingDataFileName));
        assert_eq!(Header::parse(&v3(None, &[], 1 << 9, 0)), Err(HeaderError::UnknownFeatures(1 << 9)));
        assert_eq!(Header::parse(b"not an image at all"), Err(HeaderError::NotQcow2));
    }

    #[test]
    fn probes_formats_by_magic() {
        assert_eq!(probe(&v3(None, &[], 0, 0)), Probed::Qcow2);
        assert_eq!(probe(b"QFI\xfb\0\0\0\x01"), Probed::Other("qcow"));
        assert_eq!(probe(b"KDMV...."), Probed::Other("vmdk"));
        assert_eq!(probe(b""), Probed::Raw);
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107f_u32.to_le_bytes());
        assert_eq!(probe(&vdi), Probed::Other("vdi"));
    }
}
