//! The protocol as pure data: which bytes to lock, test and release for a request.
//!
//! Nothing here touches a file. [`plan`] turns the bytes a descriptor holds and the bytes it
//! wants into the steps of QEMU's `raw_handle_perm_lock` (PREPARE, then COMMIT or ABORT), and
//! [`decide`] is the reference verdict of docs/protocol.md §9, which the
//! tests hold the real lock path against.

use crate::perm::{PERM_BASE, PROTOCOL_BYTES, Perm, UNSHARE_BASE};

/// Contiguous bytes `start..start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Number of bytes; 0 means to the end of the file and beyond, as in `fcntl(2)`.
    pub len: u64,
}

impl ByteRange {
    /// One range over every protocol byte and the gap between them (`100..=204`): what a
    /// release unlocks in one call.
    pub const PROTOCOL: ByteRange = ByteRange::from_to(PROTOCOL_BYTES[0], PROTOCOL_BYTES[9]);

    /// One byte.
    pub const fn byte(b: u64) -> ByteRange {
        ByteRange { start: b, len: 1 }
    }

    /// The bytes `first..=last`.
    pub const fn from_to(first: u64, last: u64) -> ByteRange {
        ByteRange { start: first, len: last - first + 1 }
    }

    /// The bytes of the range, ascending.
    pub fn bytes(self) -> std::ops::Range<u64> {
        self.start..self.start + self.len
    }

    /// Last byte of the range (`u64::MAX` for a range to the end of the file).
    pub fn last(self) -> u64 {
        if self.len == 0 { u64::MAX } else { self.start + self.len - 1 }
    }
}

/// The protocol bytes one open file description holds (or wants), as two masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LockSet {
    /// Permission bytes `100 + i`.
    pub perm: Perm,
    /// Unshare bytes `200 + i`.
    pub unshared: Perm,
}

impl LockSet {
    /// No byte.
    pub const EMPTY: LockSet = LockSet { perm: Perm::empty(), unshared: Perm::empty() };

    /// A set from its masks.
    pub const fn new(perm: Perm, unshared: Perm) -> LockSet {
        LockSet { perm, unshared }
    }

    /// True when no byte is in the set.
    pub fn is_empty(self) -> bool {
        self.perm.is_empty() && self.unshared.is_empty()
    }

    /// Bytes in either set.
    pub fn union(self, other: LockSet) -> LockSet {
        LockSet::new(self.perm | other.perm, self.unshared | other.unshared)
    }

    /// Bytes in `self` and not in `other`.
    pub fn minus(self, other: LockSet) -> LockSet {
        LockSet::new(self.perm - other.perm, self.unshared - other.unshared)
    }

    /// Bytes in both sets.
    pub fn intersect(self, other: LockSet) -> LockSet {
        LockSet::new(self.perm & other.perm, self.unshared & other.unshared)
    }

    /// True when every byte of `other` is in `self`.
    pub fn contains(self, other: LockSet) -> bool {
        self.perm.contains(other.perm) && self.unshared.contains(other.unshared)
    }

    /// Whether `byte` is in the set.
    pub fn has_byte(self, byte: u64) -> bool {
        match Perm::from_byte(byte) {
            Some((p, false)) => self.perm.contains(p),
            Some((p, true)) => self.unshared.contains(p),
            None => false,
        }
    }

    /// Adds one protocol byte; other bytes are ignored.
    pub fn add_byte(&mut self, byte: u64) {
        match Perm::from_byte(byte) {
            Some((p, false)) => self.perm |= p,
            Some((p, true)) => self.unshared |= p,
            None => {}
        }
    }

    /// The bytes in QEMU's lock order: permission bytes ascending, then unshare bytes ascending.
    pub fn bytes(self) -> impl Iterator<Item = u64> {
        let perm = self.perm.each().filter_map(Perm::perm_byte);
        perm.chain(self.unshared.each().filter_map(Perm::unshare_byte))
    }

    /// The bytes as maximal contiguous runs, in lock order (at most three per side).
    pub fn runs(self) -> Runs {
        let mut runs = Runs::default();
        for (mask, base) in [(self.perm, PERM_BASE), (self.unshared, UNSHARE_BASE)] {
            let mut bits = mask.bits();
            let mut i = 0;
            while bits != 0 {
                if bits & 1 == 0 {
                    bits >>= 1;
                    i += 1;
                    continue;
                }
                let len = bits.trailing_ones();
                runs.push(ByteRange { start: base + u64::from(i), len: u64::from(len) });
                bits = bits.checked_shr(len).unwrap_or(0);
                i += len;
            }
        }
        runs
    }
}

impl std::fmt::Display for LockSet {
    /// `100 101 103 | 201 203`, the notation of the protocol spec.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = |mask: Perm, byte: fn(Perm) -> Option<u64>| {
            let v: Vec<String> = mask.each().filter_map(byte).map(|b| b.to_string()).collect();
            if v.is_empty() { "-".to_string() } else { v.join(" ") }
        };
        write!(f, "{} | {}", side(self.perm, Perm::perm_byte), side(self.unshared, Perm::unshare_byte))
    }
}

/// Up to six byte runs, kept inline: an acquire should not allocate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Runs {
    items: [Option<ByteRange>; 6],
}

impl Runs {
    fn push(&mut self, r: ByteRange) {
        if let Some(slot) = self.items.iter_mut().find(|s| s.is_none()) {
            *slot = Some(r);
        }
    }

    /// The runs in order.
    pub fn iter(&self) -> impl Iterator<Item = ByteRange> + '_ {
        self.items.iter().map_while(|r| *r)
    }
}

/// One test of the check phase: does anyone else hold the opposite byte of `perm`?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Check {
    /// The single permission concerned.
    pub perm: Perm,
    /// `false`: we use `perm`, so we test its unshare byte `200 + i`
    /// (`Failed to get "<name>" lock`). `true`: we unshare `perm`, so we test its permission
    /// byte `100 + i` (`Failed to get shared "<name>" lock`).
    pub shared: bool,
}

impl Check {
    /// The byte this check tests.
    pub fn byte(self) -> u64 {
        let byte = if self.shared { self.perm.perm_byte() } else { self.perm.unshare_byte() };
        byte.unwrap_or(0)
    }

    /// QEMU's message for a failed check, without the hint.
    pub fn message(self) -> String {
        let name = self.perm.qemu_name().unwrap_or("?");
        if self.shared {
            format!("Failed to get shared \"{name}\" lock")
        } else {
            format!("Failed to get \"{name}\" lock")
        }
    }
}

/// The steps of one permission update, from [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Bytes to read-lock now (PREPARE), those of old ∪ new not yet held.
    pub add: LockSet,
    /// The request being checked: its permissions' unshare bytes and its unshared permissions'
    /// permission bytes are tested, in [`Plan::checks`] order. Empty on the fast path.
    pub check: LockSet,
    /// Bytes to release on COMMIT: held before, not wanted now.
    pub release: LockSet,
    /// What the descriptor holds after COMMIT.
    pub target: LockSet,
}

impl Plan {
    /// The checks in QEMU's order: for each wanted permission ascending its unshare byte, then
    /// for each unshared permission ascending its permission byte. The first conflict wins.
    pub fn checks(&self) -> impl Iterator<Item = Check> + '_ {
        let used = self.check.perm.each().map(|perm| Check { perm, shared: false });
        used.chain(self.check.unshared.each().map(|perm| Check { perm, shared: true }))
    }

    /// One range covering every tested byte, so that a clean acquire needs a single probe.
    /// Bytes in between are harmless: a hit there sends the caller to the exact per-byte checks.
    pub fn probe_cover(&self) -> Option<ByteRange> {
        let (lo, hi) =
            self.checks().map(Check::byte).fold((u64::MAX, 0), |(lo, hi), b| (lo.min(b), hi.max(b)));
        (lo <= hi).then(|| ByteRange { start: lo, len: hi - lo + 1 })
    }
}

/// Plans moving a descriptor from holding `held` to holding `wanted` (QEMU's PREPARE/COMMIT).
///
/// A request that adds no permission and unshares nothing new takes QEMU's fast path: nothing is
/// locked or checked, and old-only bytes are released at COMMIT. Otherwise the union is locked
/// first and only the new request is checked, so there is never a window weaker than either
/// state.
pub fn plan(held: LockSet, wanted: LockSet) -> Plan {
    let release = held.minus(wanted);
    if held.contains(wanted) {
        return Plan { add: LockSet::EMPTY, check: LockSet::EMPTY, release, target: wanted };
    }
    Plan { add: wanted.union(held).minus(held), check: wanted, release, target: wanted }
}

/// What other open file descriptions hold on the protocol bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Others {
    /// Bytes on which another description holds any lock (read or write).
    pub held: LockSet,
    /// Bytes on which another description holds a write lock (a subset of `held`).
    pub write_locked: LockSet,
}

/// The outcome QEMU would give a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The request gets in.
    Granted,
    /// `Failed to lock byte N`: a write lock blocks the lock phase.
    LockByte(u64),
    /// `Failed to get ["shared"] "<name>" lock`: the check phase found a holder.
    Conflict(Check),
}

impl Verdict {
    /// QEMU's message for a refusal (`Failed to get "write" lock`), `None` when granted.
    pub fn message(&self) -> Option<String> {
        match self {
            Verdict::Granted => None,
            Verdict::LockByte(b) => Some(format!("Failed to lock byte {b}")),
            Verdict::Conflict(c) => Some(c.message()),
        }
    }
}

/// The reference decision of docs/protocol.md §9, written from the spec and independent of the lock
/// path: what QEMU answers a descriptor holding `held` that asks for `wanted` while `others`
/// hold their bytes.
pub fn decide(others: Others, held: LockSet, wanted: LockSet) -> Verdict {
    if held.contains(wanted) {
        return Verdict::Granted;
    }
    let to_lock = wanted.union(held).minus(held);
    if let Some(b) = to_lock.bytes().find(|b| others.write_locked.has_byte(*b)) {
        return Verdict::LockByte(b);
    }
    for perm in wanted.perm.each() {
        if others.held.unshared.contains(perm) {
            return Verdict::Conflict(Check { perm, shared: false });
        }
    }
    for perm in wanted.unshared.each() {
        if others.held.perm.contains(perm) {
            return Verdict::Conflict(Check { perm, shared: true });
        }
    }
    Verdict::Granted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Access;

    #[test]
    fn runs_merge_contiguous_bytes_in_lock_order() {
        let runs: Vec<_> = Access::WRITE.lock_set(Perm::ALL).runs().iter().collect();
        assert_eq!(
            runs,
            vec![
                ByteRange { start: 100, len: 2 },
                ByteRange::byte(103),
                ByteRange::byte(201),
                ByteRange::byte(203)
            ]
        );
        let all = LockSet::new(Perm::LEGACY_ALL, Perm::LEGACY_ALL);
        let runs: Vec<_> = all.runs().iter().collect();
        assert_eq!(runs, vec![ByteRange { start: 100, len: 5 }, ByteRange { start: 200, len: 5 }]);
        assert_eq!(LockSet::EMPTY.runs().iter().count(), 0);
        let alt = LockSet::new(Perm::from_bits_retain(0b10101), Perm::from_bits_retain(0b01010));
        assert_eq!(alt.runs().iter().count(), 5);
    }

    #[test]
    fn checks_follow_qemu_order_and_one_probe_covers_them() {
        let p = plan(LockSet::EMPTY, Access::WRITE.lock_set(Perm::ALL));
        let bytes: Vec<u64> = p.checks().map(Check::byte).collect();
        assert_eq!(bytes, vec![200, 201, 203, 101, 103]);
        assert_eq!(p.probe_cover(), Some(ByteRange { start: 101, len: 103 }));
        assert_eq!(plan(LockSet::EMPTY, LockSet::EMPTY).probe_cover(), None);
    }

    #[test]
    fn fast_path_locks_and_checks_nothing() {
        let p = plan(Access::WRITE.lock_set(Perm::ALL), Access::READ.lock_set(Perm::ALL));
        assert!(p.add.is_empty() && p.check.is_empty());
        assert_eq!(p.release, LockSet::new(Perm::WRITE | Perm::RESIZE, Perm::empty()));
    }

    #[test]
    fn change_locks_the_union_and_checks_only_the_new_request() {
        // reopen -w of a qemu-io -r opener (spec V25): adds 101 and 103, keeps 100 | 201 203.
        let p = plan(Access::READ.lock_set(Perm::ALL), Access::WRITE.lock_set(Perm::ALL));
        assert_eq!(p.add, LockSet::new(Perm::WRITE | Perm::RESIZE, Perm::empty()));
        assert_eq!(p.check, Access::WRITE.lock_set(Perm::ALL));
        assert!(p.release.is_empty());
        // Dropping an unshare while adding a permission keeps the old unshare byte until COMMIT.
        let p = plan(Access::READ.lock_set(Perm::ALL), Access::WRITE_SHARED.lock_set(Perm::ALL));
        assert_eq!(p.add, LockSet::new(Perm::WRITE, Perm::empty()));
        assert_eq!(p.release, LockSet::new(Perm::empty(), Perm::WRITE | Perm::RESIZE));
    }

    #[test]
    fn decide_reproduces_spec_vectors() {
        let qemu_io_rw = Others { held: Access::WRITE.lock_set(Perm::ALL), ..Others::default() };
        let shared_write = Verdict::Conflict(Check { perm: Perm::WRITE, shared: true });
        let get_write = Verdict::Conflict(Check { perm: Perm::WRITE, shared: false });
        // V1, V3, V4
        assert_eq!(decide(qemu_io_rw, LockSet::EMPTY, Access::INFO.lock_set(Perm::ALL)), shared_write);
        assert_eq!(decide(qemu_io_rw, LockSet::EMPTY, Access::READ.lock_set(Perm::ALL)), shared_write);
        assert_eq!(decide(qemu_io_rw, LockSet::EMPTY, Access::WRITE.lock_set(Perm::ALL)), get_write);
        // V15: a holder of 200 stops even a force-share reader.
        let only_200 =
            Others { held: LockSet::new(Perm::empty(), Perm::CONSISTENT_READ), ..Others::default() };
        assert_eq!(
            decide(only_200, LockSet::EMPTY, Access::FORCE_SHARE.lock_set(Perm::ALL)),
            Verdict::Conflict(Check { perm: Perm::CONSISTENT_READ, shared: false })
        );
        // V21: a write lock on 100 fails the lock phase on that byte.
        let wr100 = LockSet::new(Perm::CONSISTENT_READ, Perm::empty());
        let w = Others { held: wr100, write_locked: wr100 };
        assert_eq!(decide(w, LockSet::EMPTY, Access::READ.lock_set(Perm::ALL)), Verdict::LockByte(100));
        assert_eq!(decide(w, LockSet::EMPTY, Access::INFO.lock_set(Perm::ALL)), Verdict::Granted);
    }
}
