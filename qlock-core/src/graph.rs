//! The image graph: which files QEMU opens, and in which role, when it opens an image.
//!
//! QEMU does not lock a file, it locks a graph: a qcow2 image opens its backing file (and that
//! one its own, to the end of the chain) and its external data file, and locks each of them.
//! [`Chain::discover`] finds the same files, reading each qcow2 header ([`qcow2`]) through the
//! descriptor that will hold the node's locks, and resolving names as QEMU does (observed on
//! 10.0.2 and 7.2, see `docs/graph.md`):
//!
//! - a relative backing name is taken from the directory of the overlay's path *as opened*
//!   (through a symlink, the link's directory); an absolute one as it is;
//! - `file:NAME` is `NAME` taken as it is (relative to the working directory);
//! - a relative external data-file name is taken from the working directory of the opener;
//! - `json:` and protocol names (`nbd://`, `http:`, ...: a `:` before any `/`) are not local
//!   files: discovery refuses them;
//! - with no backing format recorded, the format is probed: qcow2 by its magic, else raw.
//!
//! qcow2 and raw are followed; raw is a leaf. Other formats are refused, naming the format.
//! Nothing is ever written: every node is opened read-only with `O_CLOEXEC`.

mod lock;
pub mod op;
pub mod qcow2;
pub mod rules;

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::image::{ImageLock, LockOptions};
pub use lock::ChainLock;
use qcow2::{Header, HeaderError, Probed};

/// The deepest backing chain followed. Each node holds a descriptor (twice that with data
/// files), and the usual soft limit on descriptors is 1024; QEMU itself sets no limit, but a
/// chain this deep is a loop through names the kernel cannot see or a mistake.
pub const MAX_DEPTH: usize = 256;

/// An image format qlock follows (and the testkit's holders open: one type for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// qcow2 (`-f qcow2`): may have a backing file and an external data file.
    Qcow2,
    /// raw (`-f raw`): a leaf.
    Raw,
}

impl Format {
    /// Both formats, for table-driven tests.
    pub const ALL: [Format; 2] = [Format::Qcow2, Format::Raw];

    /// QEMU's name for it, as its `-f` option takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

impl std::fmt::Display for Format {
    /// QEMU's name: `qcow2`, `raw`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a node is to the image at the top.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The image itself.
    Top,
    /// A backing file, `depth` levels below the top (1 = the top's backing file).
    Backing {
        /// 1 for the top's backing file, 2 for its backing file, ...
        depth: usize,
    },
    /// The external data file of the qcow2 node at `depth` (0 = the top).
    DataFile {
        /// The depth of the image it belongs to.
        depth: usize,
        /// `data_file_raw=on`: the data file is a valid raw image by itself.
        raw: bool,
    },
}

/// One file of the graph, open read-only through the descriptor that will hold its locks.
#[derive(Debug)]
pub struct Node {
    /// The open file (no locks taken by discovery).
    pub image: ImageLock,
    /// Its role.
    pub role: Role,
    /// How QEMU reads it.
    pub format: Format,
    /// Its qcow2 header, for qcow2 nodes.
    pub header: Option<Header>,
}

impl Node {
    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        self.image.path()
    }
}

/// Why an image graph could not be discovered. Each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// A backing file could not be opened (QEMU's prefix).
    #[error("Could not open backing file: {0}")]
    OpenBacking(#[source] Box<Error>),
    /// The top or a data file could not be opened.
    #[error("{0}")]
    Open(#[source] Box<Error>),
    /// Reading a header failed.
    #[error("Could not read '{}': {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error from `pread(2)`.
        source: io::Error,
    },
    /// A qcow2 header is truncated or corrupt.
    #[error("'{}' is not a valid qcow2 image: {source}; repair it (qemu-img check) or use --no-chain to lock the file alone", .path.display())]
    Header {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: HeaderError,
    },
    /// A format qlock does not follow.
    #[error("'{}': unsupported format {format}: qlock follows qcow2 and raw chains only; use --no-chain to lock the file alone", .path.display())]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// QEMU's name for the format.
        format: String,
    },
    /// A `json:` name.
    #[error("'{}' names its {what} with a json: description ({name}), which qlock does not follow; use --no-chain to lock the file alone", .overlay.display())]
    JsonName {
        /// The image holding the name.
        overlay: PathBuf,
        /// `backing file` or `data file`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A protocol name: not a local file.
    #[error("'{}' names its {what} '{name}' on protocol '{protocol}', not a local file: it has no file lock to take; use --no-chain to lock the file alone", .overlay.display())]
    Protocol {
        /// The image holding the name.
        overlay: PathBuf,
        /// `backing file` or `data file`.
        what: &'static str,
        /// The name.
        name: String,
        /// The part before the first `:`.
        protocol: String,
    },
    /// A node is reached twice.
    #[error("'{}' is reached again below '{}': the image graph has a loop; fix the backing file names (qemu-img rebase -u)", .path.display(), .first.display())]
    Loop {
        /// The path it is reached by the second time.
        path: PathBuf,
        /// The path it was first opened by.
        first: PathBuf,
    },
    /// A node could not be locked: another holder refused (QEMU's message, naming the node),
    /// or the filesystem failed. `prefix` is how many times QEMU prefixes the message with
    /// `Could not open backing file: ` (once per level of backing file above the node while
    /// the graph is being opened; never for a data file of the top or once the graph is open).
    #[error("{}{source}", "Could not open backing file: ".repeat(*.prefix))]
    Node {
        /// The node's path, as it was opened.
        path: PathBuf,
        /// Its role.
        role: Role,
        /// Levels of `Could not open backing file: ` in QEMU's message.
        prefix: usize,
        /// The lock error on that node.
        source: Box<Error>,
    },
    /// A wait for the whole graph ran out of time; `last` is the refusal still in the way.
    #[error("Timed out after {:.1}s: {last}", .waited.as_secs_f64())]
    TimedOut {
        /// How long the wait lasted.
        waited: std::time::Duration,
        /// The last refusal.
        last: Box<ChainError>,
    },
    /// The chain is deeper than [`MAX_DEPTH`].
    #[error("the backing chain of '{}' is deeper than {limit} levels; flatten it (qemu-img commit or convert) or use --no-chain", .top.display())]
    TooDeep {
        /// The top image.
        top: PathBuf,
        /// [`MAX_DEPTH`].
        limit: usize,
    },
}

/// A name stored in an image, made a path the way QEMU would open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    /// A local file.
    Path(PathBuf),
    /// `json:{...}`.
    Json,
    /// `PROTO:...`, with the protocol.
    Protocol(String),
}

/// Resolves a stored name. `base` is the overlay's path as opened for a backing name (a
/// relative name is taken from its directory), `None` for a data-file name (taken from the
/// working directory).
pub fn resolve(name: &[u8], base: Option<&Path>) -> Name {
    if name.starts_with(b"json:") {
        return Name::Json;
    }
    let first = name.iter().position(|&c| c == b':' || c == b'/');
    if let Some(i) = first.filter(|&i| name[i] == b':') {
        let protocol = &name[..i];
        if protocol != b"file" {
            return Name::Protocol(String::from_utf8_lossy(protocol).into_owned());
        }
        return Name::Path(PathBuf::from(OsStr::from_bytes(&name[i + 1..])));
    }
    let path = Path::new(OsStr::from_bytes(name));
    match base.and_then(Path::parent) {
        Some(dir) if path.is_relative() => Name::Path(dir.join(path)),
        _ => Name::Path(path.to_path_buf()),
    }
}

/// The files of an image graph, top first: each qcow2 node, then its data file, then its
/// backing file.
#[derive(Debug)]
pub struct Chain {
    nodes: Vec<Node>,
}

impl Chain {
    /// Opens `path` read-only and discovers its graph, each node opened the same way with no
    /// lock taken. The format of `path` is probed, as QEMU does without `-f`.
    ///
    /// # Errors
    /// [`ChainError`].
    pub fn open(path: impl AsRef<Path>, options: &LockOptions) -> Result<Chain, ChainError> {
        let opts = options.clone().with_write(false);
        let open = |p: &Path| ImageLock::open(p, &opts);
        let top = open(path.as_ref()).map_err(|e| ChainError::Open(Box::new(e)))?;
        Chain::discover(top, None, open)
    }

    /// Opens `path` alone, as a chain of one node (its format probed): what `qemu-img info`
    /// opens, which follows no backing file and no data file.
    ///
    /// # Errors
    /// [`ChainError`]: the top cannot be opened, its header is corrupt, or its format is not
    /// one qlock follows.
    pub fn open_top(path: impl AsRef<Path>, options: &LockOptions) -> Result<Chain, ChainError> {
        let opts = options.clone().with_write(false);
        let top = ImageLock::open(path.as_ref(), &opts).map_err(|e| ChainError::Open(Box::new(e)))?;
        let (format, header) = read_format(&top, None)?;
        Ok(Chain { nodes: vec![Node { image: top, role: Role::Top, format, header }] })
    }

    /// Discovers the graph below `top`, reading each header through the node's own
    /// descriptor: `top` as given, the others as `open` returns them (so a guard built on the
    /// chain holds its locks on the very descriptors that were read). `format` is the top's
    /// format (`-f`), or `None` to probe it.
    ///
    /// # Errors
    /// [`ChainError`].
    pub fn discover(
        top: ImageLock,
        format: Option<Format>,
        mut open: impl FnMut(&Path) -> Result<ImageLock, Error>,
    ) -> Result<Chain, ChainError> {
        let top_path = top.path().to_path_buf();
        let mut nodes: Vec<Node> = Vec::new();
        let mut next = Some((top, format, Role::Top));
        while let Some((image, recorded, role)) = next.take() {
            if let Some(first) = nodes.iter().find(|n| n.image.file_key() == image.file_key()) {
                return Err(ChainError::Loop { path: image.path().into(), first: first.path().into() });
            }
            let depth = match role {
                Role::Backing { depth } => depth,
                _ => 0,
            };
            let (format, header) = read_format(&image, recorded)?;
            let mut data_node = None;
            if let Some(h) = &header {
                if let Some(name) = &h.data_file {
                    let path = local(name, None, image.path(), "data file")?;
                    let data = open(&path).map_err(|e| ChainError::Open(Box::new(e)))?;
                    let key = data.file_key();
                    let first = nodes.iter().map(|n| &n.image).chain([&image]).find(|i| i.file_key() == key);
                    if let Some(first) = first {
                        return Err(ChainError::Loop { path, first: first.path().into() });
                    }
                    let role = Role::DataFile { depth, raw: h.data_file_raw() };
                    data_node = Some(Node { image: data, role, format: Format::Raw, header: None });
                }
                if let Some(name) = &h.backing {
                    next = Some(backing_of(&image, name, h, depth, &top_path, &mut open)?);
                }
            }
            nodes.push(Node { image, role, format, header });
            nodes.extend(data_node);
        }
        Ok(Chain { nodes })
    }

    /// The nodes, top first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The nodes, to build a guard from.
    pub fn into_nodes(self) -> Vec<Node> {
        self.nodes
    }
}

/// Opens the backing file `name` of `image` (at `depth`).
fn backing_of(
    image: &ImageLock,
    name: &[u8],
    header: &Header,
    depth: usize,
    top: &Path,
    open: &mut impl FnMut(&Path) -> Result<ImageLock, Error>,
) -> Result<(ImageLock, Option<Format>, Role), ChainError> {
    if depth >= MAX_DEPTH {
        return Err(ChainError::TooDeep { top: top.into(), limit: MAX_DEPTH });
    }
    let path = local(name, Some(image.path()), image.path(), "backing file")?;
    let recorded = match header.backing_format.as_deref() {
        None => None,
        Some("qcow2") => Some(Format::Qcow2),
        Some("raw") => Some(Format::Raw),
        Some(other) => return Err(ChainError::UnsupportedFormat { path, format: other.to_string() }),
    };
    let backing = open(&path).map_err(|e| ChainError::OpenBacking(Box::new(e)))?;
    Ok((backing, recorded, Role::Backing { depth: depth + 1 }))
}

/// A stored name as a local path, or the error for what is not one.
fn local(
    name: &[u8],
    base: Option<&Path>,
    overlay: &Path,
    what: &'static str,
) -> Result<PathBuf, ChainError> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    match resolve(name, base) {
        Name::Path(p) => Ok(p),
        Name::Json => Err(ChainError::JsonName { overlay: overlay.into(), what, name: shown() }),
        Name::Protocol(protocol) => {
            Err(ChainError::Protocol { overlay: overlay.into(), what, name: shown(), protocol })
        }
    }
}

/// The node's format (recorded, or probed) and, for qcow2, its header, read with `pread`
/// through the node's own descriptor.
fn read_format(image: &ImageLock, recorded: Option<Format>) -> Result<(Format, Option<Header>), ChainError> {
    let path = image.path();
    let bad = |source| ChainError::Header { path: path.into(), source };
    if recorded == Some(Format::Raw) {
        return Ok((Format::Raw, None));
    }
    let start = read_prefix(image, qcow2::PROBE_LEN)?;
    match (recorded, qcow2::probe(&start)) {
        (None, Probed::Raw) => return Ok((Format::Raw, None)),
        (None, Probed::Other(format)) => {
            return Err(ChainError::UnsupportedFormat { path: path.into(), format: format.into() });
        }
        _ => {}
    }
    // qcow2, recorded or probed: a wrong magic under a recorded qcow2 is a header error.
    let need = Header::needed_len(&start).map_err(bad)?;
    let cluster = if need <= start.len() { start } else { read_prefix(image, need)? };
    let header = Header::parse(&cluster).map_err(bad)?;
    Ok((Format::Qcow2, Some(header)))
}

/// Up to `len` bytes from offset 0 (fewer at the end of the file).
fn read_prefix(image: &ImageLock, len: usize) -> Result<Vec<u8>, ChainError> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match image.file().read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(ChainError::Read { path: image.path().into(), source }),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Name {
        Name::Path(PathBuf::from(s))
    }

    #[test]
    fn names_resolve_as_qemu_does() {
        let top = Some(Path::new("/imgs/vm/top.qcow2"));
        assert_eq!(resolve(b"base.qcow2", top), p("/imgs/vm/base.qcow2"));
        assert_eq!(resolve(b"../b/base.qcow2", top), p("/imgs/vm/../b/base.qcow2"));
        assert_eq!(resolve(b"/abs/base", top), p("/abs/base"));
        assert_eq!(resolve(b"base.qcow2", Some(Path::new("link.qcow2"))), p("base.qcow2"));
        assert_eq!(resolve(b"data.raw", None), p("data.raw"));
        assert_eq!(resolve(b"file:base.qcow2", top), p("base.qcow2"));
        assert_eq!(resolve(b"a/b:c", top), p("/imgs/vm/a/b:c"));
        assert_eq!(resolve(b"json:{\"driver\":\"file\"}", top), Name::Json);
        assert_eq!(resolve(b"nbd://host/x", top), Name::Protocol("nbd".into()));
        assert_eq!(resolve(b"nbd:unix:/s", top), Name::Protocol("nbd".into()));
        assert_eq!(resolve(b"gluster://h/v/x", top), Name::Protocol("gluster".into()));
        assert_eq!(resolve(b"foo:bar", top), Name::Protocol("foo".into()));
    }
}
