//! `qlock status`: who holds what on each image, as a table or as JSON.
//!
//! Each name given gets its own entry (scripts index the JSON by argument), but an image named
//! twice (`disk.img ./disk.img`, a link) is inspected once, so its entries agree.

use std::io::Write;
use std::path::{Path, PathBuf};

use qlock_core::{HeldRange, Holder, ImageStatus, Opener};
use qlock_core::{Label, Verdict};
use qlock_core::{LockKind, LockSet, Perm, inspect};
use serde_json::{Value, json};

use crate::cli::StatusArgs;
use crate::images::Names;
use crate::{Failure, Outcome, report};

/// Inspects every image with one walk over /proc; [`Outcome::SomeFailed`] if any image could
/// not be inspected.
pub(crate) fn main(args: &StatusArgs, out: &mut impl Write) -> Result<Outcome, Failure> {
    let names = Names::of(&args.images);
    let results = inspect(names.distinct());
    let each = || args.images.iter().map(PathBuf::as_path).zip(names.files().map(|i| &results[i]));
    if args.json {
        print_json(out, report::json_entries(each(), to_json))?;
    } else {
        report::print_tables(out, each(), print_table)?;
    }
    Ok(if results.iter().any(Result::is_err) { Outcome::SomeFailed } else { Outcome::Success })
}

/// The version of the JSON that `status --json` prints: fields are added freely, never renamed
/// or removed, without a new version.
pub(crate) const SCHEMA: u32 = 1;

/// `{"schema": 1, "images": [...]}`, pretty-printed, `schema` first so that a reader can check
/// the version before anything else (serde_json sorts an object's keys, so the outer object is
/// written here; JSON strings hold no raw newline, so indenting every line is safe).
pub(crate) fn print_json(out: &mut impl Write, images: Vec<Value>) -> Result<(), Failure> {
    let images = serde_json::to_string_pretty(&images)
        .map_err(|e| Failure::Other(format!("cannot print JSON: {e}")))?
        .replace('\n', "\n  ");
    writeln!(out, "{{\n  \"schema\": {SCHEMA},\n  \"images\": {images}\n}}").map_err(Failure::Output)
}

pub(crate) fn print_table(out: &mut impl Write, s: &ImageStatus, name: &Path) -> std::io::Result<()> {
    let mut row = |k: &str, v: &str| writeln!(out, "{k:<14}{v}");
    row("image", &name.display().to_string())?;
    row("lock scope", s.lock_scope.describe())?;
    if s.lock_kind.is_none() {
        row("locking", "unavailable on this host (no OFD locks): nothing can be seen")?;
    }
    let held = s.others.held;
    row("held", &held.to_string())?;
    row("uses", &held.perm.to_string())?;
    row("unshares", &held.unshared.to_string())?;
    if !s.others.write_locked.is_empty() {
        row("write-locked", &s.others.write_locked.to_string())?;
    }
    for h in &s.holders {
        row("holder", &h.to_string())?;
    }
    if s.held_elsewhere {
        row("holder", "held elsewhere (another client of this filesystem)")?;
    } else if s.unidentified {
        row("holder", "unknown (another user's process, another host, or a lock the probes saw only)")?;
    }
    for o in &s.openers {
        row("opener", &o.to_string())?;
    }
    if s.unreadable_processes > 0 {
        let n = s.unreadable_processes;
        let what = if n == 1 { "1 process" } else { &format!("{n} processes") };
        row(
            "opener",
            &format!("unknown: {what} could not be read (another user's?): it may have the image open"),
        )?;
    }
    for f in &s.foreign {
        let pid = f.pid.map_or_else(|| "unknown holder".to_string(), |p| format!("pid {p}"));
        row("foreign", &format!("{} by {pid}: {}", f.range, f.reason))?;
    }
    for (name, verdict) in &s.presets {
        let v = verdict.message().map_or_else(|| "free".to_string(), |m| format!("no: {m}"));
        row(name, &v)?;
    }
    Ok(())
}

fn bytes(set: LockSet, side: bool) -> Vec<u64> {
    let mask = if side { set.unshared } else { set.perm };
    mask.each().filter_map(if side { Perm::unshare_byte } else { Perm::perm_byte }).collect()
}

fn names(mask: Perm) -> Vec<&'static str> {
    mask.each().filter_map(Perm::cli_name).collect()
}

fn range_json(r: &HeldRange) -> Value {
    json!({ "start": r.start, "end": r.end, "write": r.write })
}

fn holder_json(h: &Holder) -> Value {
    let b = h.bytes();
    json!({
        "pid": h.pid,
        "command": h.command,
        "fd": h.fd,
        "kind": match h.kind { LockKind::Ofd => "ofd", LockKind::Posix => "posix" },
        "perm_bytes": bytes(b, false),
        "unshare_bytes": bytes(b, true),
        "ranges": h.ranges.iter().map(range_json).collect::<Vec<_>>(),
    })
}

fn opener_json(o: &Opener) -> Value {
    let (uses, refuses) = match o.label {
        Label::Qemu { uses, refuses } => (Some(names(uses)), Some(names(refuses))),
        _ => (None, None),
    };
    json!({
        "pid": o.pid,
        "command": o.command,
        "fd": o.fd,
        "mode": o.mode.as_str(),
        "locks": o.locks(),
        "label": o.label.to_string(),
        "class": o.label.class(),
        "uses": uses,
        "refuses": refuses,
        "flock": o.flock.map(|x| if x { "exclusive" } else { "shared" }),
        "lock_kind": o.lock_kind.map(|k| match k { LockKind::Ofd => "ofd", LockKind::Posix => "posix" }),
        "ranges": o.ranges.iter().map(range_json).collect::<Vec<_>>(),
        "age_secs": o.age.map(|a| a.as_secs()),
        "uid": o.uid,
        "unit": o.unit,
        "cgroup": o.cgroup,
        "vm": o.vm(),
        "machine": o.machine,
        "qemu_name": o.qemu_name,
    })
}

fn verdict_json(v: &Verdict) -> Value {
    let byte = match v {
        Verdict::Granted => None,
        Verdict::LockByte(b) => Some(*b),
        Verdict::Conflict(c) => Some(c.byte()),
    };
    json!({ "free": *v == Verdict::Granted, "message": v.message(), "byte": byte })
}

pub(crate) fn to_json(s: &ImageStatus, name: &Path) -> Value {
    let held = s.others.held;
    json!({
        "path": name.display().to_string(),
        "locking": s.lock_kind.map(|k| match k { LockKind::Ofd => "ofd", LockKind::Posix => "posix" }),
        "perm_bytes": bytes(held, false),
        "unshare_bytes": bytes(held, true),
        "write_locked_bytes": bytes(s.others.write_locked, false)
            .into_iter()
            .chain(bytes(s.others.write_locked, true))
            .collect::<Vec<_>>(),
        "uses": names(held.perm),
        "unshares": names(held.unshared),
        "holders": s.holders.iter().map(holder_json).collect::<Vec<_>>(),
        "unidentified": s.unidentified,
        "openers": s.openers.iter().map(opener_json).collect::<Vec<_>>(),
        "unreadable_processes": s.unreadable_processes,
        "lock_scope": s.lock_scope.as_str(),
        "held_elsewhere": s.held_elsewhere,
        "foreign": s.foreign.iter().map(|f| json!({
            "range": range_json(&f.range),
            "pid": f.pid,
            "reason": f.reason,
        })).collect::<Vec<_>>(),
        "presets": s.presets.iter().map(|(n, v)| (n.to_string(), verdict_json(v))).collect::<serde_json::Map<_, _>>(),
    })
}
