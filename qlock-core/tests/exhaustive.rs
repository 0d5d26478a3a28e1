//! The real lock path against the reference verdict [`qlock_core::plan::decide`], exhaustively.
//!
//! Every case runs on a real file with real OFD locks: the "others" are one raw open file
//! description (in this process, which OFD treats as a stranger), the newcomer is an
//! [`ImageLock`]. After each attempt the newcomer's bytes are read twice: from the holder's own
//! description (which sees only the newcomer's locks, so leftovers cannot hide behind the
//! holder's bytes) and from a third, fresh description (which sees everyone's).

mod common;

use common::{Raw, all_accesses, held_from_outside, image, lockset_of_mask, set, verdict_of};
use qlock_core::Others;
use qlock_core::plan::decide;
use qlock_core::{Access, Error, ImageLock, LockOptions, LockSet, Verdict};

/// Holder lookup in `/proc` is not what these tests are about and would dominate their time.
fn opts() -> LockOptions {
    LockOptions::default().with_find_holders(false)
}

/// A small deterministic generator, so that a failure names a reproducible case.
struct XorShift(u64);

impl XorShift {
    fn next_u8(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 32) as u8
    }
}

/// Checks one first acquisition of `wanted` against holders `others` held by `holder`.
fn check_acquire(path: &std::path::Path, holder: &Raw, others: Others, wanted: Access) {
    let expected = decide(others, LockSet::EMPTY, set(wanted));
    let case = || format!("others {:?} wanted {wanted} ({})", others, set(wanted));
    // `acquire` itself (its guard closes at once), then its two steps, keeping the guard alive
    // after a failure so that leftover bytes would still be visible.
    assert_eq!(verdict_of(&ImageLock::acquire_with(path, wanted, &opts()).map(drop)), expected, "{}", case());
    let mut newcomer = ImageLock::open(path, &opts()).expect("open");
    let result = newcomer.set_access(wanted);
    assert_eq!(verdict_of(&result), expected, "{}", case());
    if let Err(Error::Conflict(c)) = &result {
        let text = c.to_string();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(c.qemu_message().as_str()));
        if matches!(expected, Verdict::Conflict(_)) {
            assert_eq!(
                lines.next(),
                Some(format!("Is another process using the image [{}]?", path.display()).as_str())
            );
        } else {
            assert_eq!(lines.next(), None, "no hint after a lock-phase failure, as in QEMU");
        }
    }
    let mine = if result.is_ok() { set(wanted) } else { LockSet::EMPTY };
    assert_eq!(newcomer.held(), mine, "{}", case());
    assert_eq!(holder.others().0, mine, "newcomer's bytes as the holder sees them: {}", case());
    assert_eq!(held_from_outside(path), others.held.union(mine), "third description: {}", case());
}

/// Every wanted access against each `(read, write)` set of raw locks a holder takes in turn.
fn check_every_acquire_against(holds: impl Iterator<Item = (LockSet, LockSet)>) {
    let (_dir, path) = image();
    let holder = Raw::open(&path);
    for (read, write) in holds {
        holder.hold(read, write);
        let others = Others { held: read.union(write), write_locked: write };
        for wanted in all_accesses() {
            check_acquire(&path, &holder, others, wanted);
        }
    }
}

/// All 65,536 pairs (held, wanted) of accesses over the four bits, the holder taking its bytes
/// as OFD read locks.
#[test]
fn every_held_and_wanted_access_pair_matches_the_reference() {
    check_every_acquire_against(all_accesses().map(|held| (set(held), LockSet::EMPTY)));
}

/// Foreign write locks on every subset of the protocol bytes (with read locks on a random part
/// of the rest), against every wanted access: the lock phase must name the first write-locked
/// byte in QEMU's lock order, and roll back the bytes it took before it.
#[test]
fn write_locked_bytes_fail_the_lock_phase_like_qemu() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    check_every_acquire_against((1..=255u8).map(|mask| {
        let write = lockset_of_mask(mask);
        (lockset_of_mask(rng.next_u8() & !mask), write)
    }));
}

/// Access changes on a held lock (docs/protocol.md §3): every (old, new) pair, each against a
/// pseudo-random set of others (read locks anywhere, write locks only where the newcomer holds
/// nothing, as the kernel requires). The others are *sampled*: one of the 2^16 possible sets per
/// pair. The state afterwards must be exactly the old one on failure and the new one on success.
#[test]
fn access_changes_match_the_reference_and_keep_old_or_new_exactly() {
    let (_dir, path) = image();
    let holder = Raw::open(&path);
    let mut newcomer = ImageLock::open(&path, &opts()).expect("open");
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let (mut granted, mut refused, mut lock_byte) = (0u32, 0u32, 0u32);
    for old in all_accesses() {
        for new in all_accesses() {
            holder.unlock_all();
            newcomer.set_access(old).expect("nobody else holds anything");
            assert_eq!(holder.others().0, set(old));
            let read = lockset_of_mask(rng.next_u8());
            // Write locks are rare (1 in 4 pairs) so that the check phase gets most cases.
            let free = !(mask_of(set(old)) | mask_of(read));
            let write =
                if rng.next_u8() < 64 { lockset_of_mask(rng.next_u8() & free) } else { LockSet::EMPTY };
            holder.hold(read.minus(write), write);
            let others = Others { held: read.union(write), write_locked: write };
            let expected = decide(others, set(old), set(new));
            let result = newcomer.set_access(new);
            let case = format!("old {old} new {new} others {others:?}");
            assert_eq!(verdict_of(&result), expected, "{case}");
            let now = if result.is_ok() { new } else { old };
            match expected {
                Verdict::Granted => granted += 1,
                Verdict::Conflict(_) => refused += 1,
                Verdict::LockByte(_) => lock_byte += 1,
            }
            assert_eq!(newcomer.access(), now, "{case}");
            assert_eq!(newcomer.held(), set(now), "{case}");
            assert_eq!(holder.others().0, set(now), "bytes seen by the others: {case}");
        }
    }
    // The sample must exercise all three outcomes substantially, or it proves little.
    assert!(granted > 5_000 && refused > 5_000 && lock_byte > 1_000, "{granted} {refused} {lock_byte}");
}

fn mask_of(s: LockSet) -> u8 {
    s.perm.bits() & 0x0f | (s.unshared.bits() & 0x0f) << 4
}

/// The fast path: a request that adds nothing locks and checks nothing, so it succeeds even when
/// others hold conflicting bytes (QEMU's PREPARE returns at once), and only releases.
#[test]
fn narrowing_an_access_never_fails_even_against_conflicting_holders() {
    let (_dir, path) = image();
    let mut lock = ImageLock::acquire_with(&path, Access::WRITE, &opts()).expect("write");
    let holder = Raw::open(&path);
    // Others now hold 200 and 101 (which WRITE forbids): only possible by ignoring qlock.
    holder.hold(LockSet::new(qlock_core::Perm::WRITE, qlock_core::Perm::CONSISTENT_READ), LockSet::EMPTY);
    lock.set_access(Access::READ).expect("fast path");
    assert_eq!(holder.others().0, set(Access::READ));
    let err = lock.set_access(Access::WRITE).unwrap_err();
    assert_eq!(err.conflict().expect("conflict").qemu_message(), "Failed to get \"consistent read\" lock");
    assert_eq!(holder.others().0, set(Access::READ), "rolled back to READ");
}
