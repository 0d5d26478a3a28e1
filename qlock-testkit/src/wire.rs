//! The fixed-size messages between a test and its forked holder.
//!
//! The parent plans every step (see the `raw` module); the child only runs a list of fcntl
//! operations. Messages are plain byte arrays built and read with `to_le_bytes`, so the child
//! decodes them without allocating, which is all it may do after `fork` in a threaded process.

/// The most operations one request can carry.
pub(crate) const MAX_OPS: usize = 128;
const OP_SIZE: usize = 24;
const HEADER: usize = 24;
/// Bytes in an encoded [`Request`].
pub(crate) const REQUEST_SIZE: usize = HEADER + MAX_OPS * OP_SIZE;
/// Bytes in an encoded [`Reply`].
pub(crate) const REPLY_SIZE: usize = 40;

/// What one operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmd {
    /// Set a read lock.
    Read = 0,
    /// Set a write lock (only from an explicit raw lock set).
    Write = 1,
    /// Release the range.
    Unlock = 2,
    /// Probe with a write-lock `GETLK`; any other holder is a conflict.
    Test = 3,
}

/// One fcntl call on the image descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Op {
    pub(crate) cmd: Cmd,
    /// OFD (`false`) or POSIX (`true`) lock commands.
    pub(crate) posix: bool,
    pub(crate) start: u64,
    /// 0 means "to the end of the file".
    pub(crate) len: u64,
}

impl Op {
    const NONE: Op = Op { cmd: Cmd::Unlock, posix: false, start: 0, len: 0 };
}

/// Run `prepare`, then `check`; on the first failure run `abort`, else `commit`.
///
/// This is QEMU's PREPARE / COMMIT / ABORT with every byte decided in the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    /// Leave: the child exits with status 0 and the kernel drops its locks.
    pub(crate) exit: bool,
    /// Which of the holder's images (0 = the first, the top of a chain) the operations act on.
    pub(crate) node: u32,
    pub(crate) prepare: Vec<Op>,
    pub(crate) check: Vec<Op>,
    pub(crate) commit: Vec<Op>,
    pub(crate) abort: Vec<Op>,
}

/// A request after decoding in the child: counts plus an inline array.
#[derive(Clone, Copy)]
pub(crate) struct Decoded {
    pub(crate) exit: bool,
    pub(crate) node: u32,
    /// Lengths of the prepare, check, commit and abort sections, in that order.
    pub(crate) counts: [usize; 4],
    pub(crate) ops: [Op; MAX_OPS],
}

impl Decoded {
    /// The operations of section `i` (0 prepare, 1 check, 2 commit, 3 abort).
    pub(crate) fn section(&self, i: usize) -> &[Op] {
        let start: usize = self.counts.iter().take(i).sum();
        let len = self.counts.get(i).copied().unwrap_or(0);
        self.ops.get(start..start + len).unwrap_or(&[])
    }
}

impl Request {
    /// The request that makes the child leave.
    pub(crate) fn exit() -> Request {
        Request { exit: true, node: 0, prepare: vec![], check: vec![], commit: vec![], abort: vec![] }
    }

    /// Total operations; must not exceed [`MAX_OPS`].
    pub(crate) fn len(&self) -> usize {
        self.prepare.len() + self.check.len() + self.commit.len() + self.abort.len()
    }

    /// The bytes sent to the child. `None` when there are more than [`MAX_OPS`] operations.
    pub(crate) fn encode(&self) -> Option<[u8; REQUEST_SIZE]> {
        if self.len() > MAX_OPS {
            return None;
        }
        let mut out = [0u8; REQUEST_SIZE];
        let sections = [&self.prepare, &self.check, &self.commit, &self.abort];
        put_u32(&mut out, 0, u32::from(self.exit));
        put_u32(&mut out, 20, self.node);
        for (i, s) in sections.iter().enumerate() {
            put_u32(&mut out, 4 + 4 * i, s.len() as u32);
        }
        for (n, op) in sections.iter().flat_map(|s| s.iter()).enumerate() {
            let at = HEADER + n * OP_SIZE;
            out[at] = op.cmd as u8;
            out[at + 1] = u8::from(op.posix);
            out[at + 8..at + 16].copy_from_slice(&op.start.to_le_bytes());
            out[at + 16..at + 24].copy_from_slice(&op.len.to_le_bytes());
        }
        Some(out)
    }
}

/// Reads a request in the child. No allocation, no panic: malformed input yields `None`.
pub(crate) fn decode(buf: &[u8; REQUEST_SIZE]) -> Option<Decoded> {
    let mut d = Decoded {
        exit: get_u32(buf, 0)? != 0,
        node: get_u32(buf, 20)?,
        counts: [0; 4],
        ops: [Op::NONE; MAX_OPS],
    };
    let mut total = 0usize;
    for i in 0..4 {
        let n = get_u32(buf, 4 + 4 * i)? as usize;
        d.counts[i] = n;
        total = total.checked_add(n)?;
    }
    if total > MAX_OPS {
        return None;
    }
    for n in 0..total {
        let at = HEADER + n * OP_SIZE;
        let cmd = match buf.get(at)? {
            0 => Cmd::Read,
            1 => Cmd::Write,
            2 => Cmd::Unlock,
            3 => Cmd::Test,
            _ => return None,
        };
        let op = Op {
            cmd,
            posix: *buf.get(at + 1)? != 0,
            start: get_u64(buf, at + 8)?,
            len: get_u64(buf, at + 16)?,
        };
        *d.ops.get_mut(n)? = op;
    }
    Some(d)
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Everything was done.
    Done = 0,
    /// `open(2)` of the image failed with `errno`.
    OpenFailed = 1,
    /// The prepare operation `index` failed with `errno`; abort ran.
    LockFailed = 2,
    /// Check `index` found another holder (`found`); abort ran.
    Conflict = 3,
    /// Check `index` itself failed with `errno`; abort ran.
    CheckFailed = 4,
    /// The request could not be decoded.
    BadRequest = 5,
}

/// The child's answer to the first request (readiness) and to each later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) status: Status,
    pub(crate) index: u32,
    pub(crate) errno: i32,
    /// For a conflict: the lock found, as `(start, len, write, pid)`; pid is -1 for OFD locks.
    pub(crate) found: (u64, u64, bool, i32),
}

impl Reply {
    /// A reply with only a status.
    pub(crate) const fn status(status: Status) -> Reply {
        Reply { status, index: 0, errno: 0, found: (0, 0, false, 0) }
    }

    pub(crate) fn encode(&self) -> [u8; REPLY_SIZE] {
        let mut out = [0u8; REPLY_SIZE];
        put_u32(&mut out, 0, self.status as u32);
        put_u32(&mut out, 4, self.index);
        out[8..12].copy_from_slice(&self.errno.to_le_bytes());
        out[12..16].copy_from_slice(&self.found.3.to_le_bytes());
        out[16..24].copy_from_slice(&self.found.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.found.1.to_le_bytes());
        put_u32(&mut out, 32, u32::from(self.found.2));
        out
    }

    pub(crate) fn decode(buf: &[u8; REPLY_SIZE]) -> Option<Reply> {
        let status = match get_u32(buf, 0)? {
            0 => Status::Done,
            1 => Status::OpenFailed,
            2 => Status::LockFailed,
            3 => Status::Conflict,
            4 => Status::CheckFailed,
            5 => Status::BadRequest,
            _ => return None,
        };
        let i32_at = |at: usize| Some(i32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?));
        Some(Reply {
            status,
            index: get_u32(buf, 4)?,
            errno: i32_at(8)?,
            found: (get_u64(buf, 16)?, get_u64(buf, 24)?, get_u32(buf, 32)? != 0, i32_at(12)?),
        })
    }
}

fn put_u32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn get_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let op = |cmd, start, len| Op { cmd, posix: start == 0, start, len };
        let req = Request {
            exit: false,
            node: 3,
            prepare: vec![op(Cmd::Read, 100, 1), op(Cmd::Write, 0, 0)],
            check: vec![op(Cmd::Test, 201, 1)],
            commit: vec![op(Cmd::Unlock, 203, 1)],
            abort: vec![op(Cmd::Unlock, 100, 1), op(Cmd::Unlock, u64::MAX >> 1, 7)],
        };
        let d = decode(&req.encode().unwrap()).unwrap();
        assert!(!d.exit);
        assert_eq!(d.node, 3);
        assert_eq!(d.section(0), &req.prepare[..]);
        assert_eq!(d.section(1), &req.check[..]);
        assert_eq!(d.section(2), &req.commit[..]);
        assert_eq!(d.section(3), &req.abort[..]);
        assert!(decode(&Request::exit().encode().unwrap()).unwrap().exit);

        let reply = Reply { status: Status::Conflict, index: 3, errno: -2, found: (200, 0, true, -1) };
        assert_eq!(Reply::decode(&reply.encode()), Some(reply));
    }

    #[test]
    fn oversized_or_malformed_requests_are_refused() {
        let op = Op { cmd: Cmd::Read, posix: false, start: 1, len: 1 };
        let mut req = Request::exit();
        req.prepare = vec![op; MAX_OPS + 1];
        assert!(req.encode().is_none());
        let mut bytes = Request::exit().encode().unwrap();
        bytes[4] = 200; // 200 prepare ops > MAX_OPS
        assert!(decode(&bytes).is_none());
        let mut bytes = Request { prepare: vec![op], ..Request::exit() }.encode().unwrap();
        bytes[HEADER] = 9; // unknown command
        assert!(decode(&bytes).is_none());
        assert!(Reply::decode(&[0xff; REPLY_SIZE]).is_none());
    }
}
