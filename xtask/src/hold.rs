//! Holders that are not QEMU: qlock itself, and "foreign" raw locks (write locks, POSIX locks,
//! bytes outside the protocol), each in a child process (`xtask hold IMAGE SPEC`).
//!
//! The child takes its locks, prints `READY` and holds them until its stdin closes. A separate
//! process is what QEMU meets in real life, and POSIX locks only conflict across processes.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::path::Path;
use std::str::FromStr;

use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;
use qlock_core::{Access, ImageLock, LockOptions};

/// One explicit lock a foreign holder takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawLock {
    /// POSIX (`F_SETLK`) instead of OFD (`F_OFD_SETLK`).
    pub posix: bool,
    /// A write (exclusive) lock; QEMU never takes one.
    pub write: bool,
    /// First byte.
    pub start: u64,
    /// Length; 0 means "to the end of the file and beyond".
    pub len: u64,
}

impl FromStr for RawLock {
    type Err = String;

    /// `ofd-r@100`, `posix-w@0+0` (length 0: whole file), `ofd-r@201+3`.
    fn from_str(s: &str) -> Result<RawLock, String> {
        let bad = || format!("bad raw lock {s:?}: expected (ofd|posix)-(r|w)@START[+LEN]");
        let (kind, range) = s.split_once('@').ok_or_else(bad)?;
        let (posix, write) = match kind {
            "ofd-r" => (false, false),
            "ofd-w" => (false, true),
            "posix-r" => (true, false),
            "posix-w" => (true, true),
            _ => return Err(bad()),
        };
        let (start, len) = match range.split_once('+') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => (range.parse().map_err(|_| bad())?, 1),
        };
        Ok(RawLock { posix, write, start, len })
    }
}

impl fmt::Display for RawLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.posix { "posix" } else { "ofd" };
        let rw = if self.write { "w" } else { "r" };
        write!(f, "{kind}-{rw}@{}", self.start)?;
        if self.len != 1 {
            write!(f, "+{}", self.len)?;
        }
        Ok(())
    }
}

/// What a hold child takes: a qlock access, or raw locks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldSpec {
    /// `ImageLock::acquire` with this access.
    Qlock(Access),
    /// These locks, in order, on one descriptor.
    Raw(Vec<RawLock>),
}

impl FromStr for HoldSpec {
    type Err = String;

    /// `raw:LOCK,LOCK...` or an access as `qlock` parses it (`write`, `perm=...;shared=...`).
    fn from_str(s: &str) -> Result<HoldSpec, String> {
        match s.strip_prefix("raw:") {
            Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>().map(HoldSpec::Raw),
            None => s.parse().map(HoldSpec::Qlock),
        }
    }
}

impl fmt::Display for HoldSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HoldSpec::Qlock(a) => write!(f, "{a}"),
            HoldSpec::Raw(locks) => {
                let v: Vec<String> = locks.iter().map(RawLock::to_string).collect();
                write!(f, "raw:{}", v.join(","))
            }
        }
    }
}

/// A held lock set; dropping it releases everything.
#[derive(Debug)]
pub enum Held {
    /// A qlock guard.
    Qlock(ImageLock),
    /// The descriptor holding raw locks.
    Raw(File),
}

/// Takes `spec` on `image` in this process.
///
/// # Errors
/// The qlock error's text, or the failing `fcntl`'s.
pub fn take(image: &Path, spec: &HoldSpec) -> Result<Held, String> {
    match spec {
        HoldSpec::Qlock(access) => ImageLock::acquire_with(image, *access, &LockOptions::default())
            .map(Held::Qlock)
            .map_err(|e| e.to_string()),
        HoldSpec::Raw(locks) => {
            // Write locks need a descriptor open for writing.
            let write = locks.iter().any(|l| l.write);
            let file = OpenOptions::new()
                .read(true)
                .write(write)
                .open(image)
                .map_err(|e| format!("open {}: {e}", image.display()))?;
            for l in locks {
                raw_lock(&file, *l).map_err(|e| format!("{l}: {e}"))?;
            }
            Ok(Held::Raw(file))
        }
    }
}

fn raw_lock(file: &File, l: RawLock) -> io::Result<()> {
    let ty = if l.write { libc::F_WRLCK } else { libc::F_RDLCK };
    let fl = libc::flock {
        l_type: ty as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: l.start as libc::off_t,
        l_len: l.len as libc::off_t,
        l_pid: 0,
    };
    // Non-blocking set only: a test holder that waited could hang the whole run.
    let arg = if l.posix { FcntlArg::F_SETLK(&fl) } else { FcntlArg::F_OFD_SETLK(&fl) };
    fcntl(file, arg).map(drop).map_err(io::Error::from)
}

/// The body of `xtask hold`: take, print `READY`, hold until stdin reaches EOF.
///
/// # Errors
/// When the locks cannot be taken; the parent sees the message on stderr.
pub fn serve(image: &Path, spec: &HoldSpec) -> Result<(), String> {
    let held = take(image, spec)?;
    let mut out = io::stdout().lock();
    writeln!(out, "READY").and_then(|()| out.flush()).map_err(|e| e.to_string())?;
    drop(out);
    let mut sink = Vec::new();
    // EOF (the parent closed our stdin or died) ends the hold.
    let _ = io::stdin().lock().read_to_end(&mut sink);
    drop(held);
    Ok(())
}

/// Reads lines from a child's stdout until one equals `READY` (true) or EOF (false).
pub(crate) fn wait_ready(out: &mut impl BufRead) -> bool {
    let mut line = String::new();
    loop {
        line.clear();
        match out.read_line(&mut line) {
            Ok(0) | Err(_) => return false,
            Ok(_) if line.trim_end() == "READY" => return true,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip() {
        for s in ["raw:ofd-w@100", "raw:posix-r@101,posix-r@201", "raw:ofd-r@0+0", "write", "read"] {
            let spec: HoldSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        assert!("raw:ofd-x@1".parse::<HoldSpec>().is_err());
        assert!("raw:ofd-r@".parse::<HoldSpec>().is_err());
        assert!("bogus".parse::<HoldSpec>().is_err());
    }
}
