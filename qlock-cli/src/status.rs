//! `qlock status`: who holds what on each image, as a table or as JSON.

use std::process::ExitCode;

use qlock_core::holders::{HeldRange, Holder, ImageStatus};
use qlock_core::plan::Verdict;
use qlock_core::{LockKind, LockSet, Perm, inspect};
use serde_json::{Value, json};

use crate::EXIT_ERROR;
use crate::cli::StatusArgs;

/// Inspects every image with one walk over /proc; exit 2 if any image could not be inspected.
pub(crate) fn main(args: &StatusArgs) -> ExitCode {
    let results = inspect(&args.images);
    let failed = results.iter().any(Result::is_err);
    if args.json {
        let images: Vec<Value> = args
            .images
            .iter()
            .zip(&results)
            .map(|(path, r)| match r {
                Ok(s) => to_json(s),
                Err(e) => {
                    json!({ "path": path.display().to_string(), "error": e.to_string(), "hint": e.hint() })
                }
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json!({ "images": images })).unwrap_or_default());
    } else {
        for (n, (path, r)) in args.images.iter().zip(&results).enumerate() {
            if n > 0 {
                println!();
            }
            match r {
                Ok(s) => print_table(s),
                Err(e) => {
                    eprintln!("qlock: {}: {e}", path.display());
                    crate::print_hint(e);
                }
            }
        }
    }
    if failed { ExitCode::from(EXIT_ERROR) } else { ExitCode::SUCCESS }
}

fn print_table(s: &ImageStatus) {
    let row = |k: &str, v: &str| println!("{k:<14}{v}");
    row("image", &s.path.display().to_string());
    if s.lock_kind.is_none() {
        row("locking", "unavailable on this host (no OFD locks): nothing can be seen");
    }
    let held = s.others.held;
    row("held", &held.to_string());
    row("uses", &held.perm.to_string());
    row("unshares", &held.unshared.to_string());
    if !s.others.write_locked.is_empty() {
        row("write-locked", &s.others.write_locked.to_string());
    }
    for h in &s.holders {
        row("holder", &h.to_string());
    }
    if s.unidentified {
        row("holder", "unknown (another user's process, another host, or a lock the probes saw only)");
    }
    for f in &s.foreign {
        let pid = f.pid.map_or_else(|| "unknown holder".to_string(), |p| format!("pid {p}"));
        row("foreign", &format!("{} by {pid}: {}", f.range, f.reason));
    }
    for (name, verdict) in &s.presets {
        let v = verdict.message().map_or_else(|| "free".to_string(), |m| format!("no: {m}"));
        row(name, &v);
    }
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

fn verdict_json(v: &Verdict) -> Value {
    let byte = match v {
        Verdict::Granted => None,
        Verdict::LockByte(b) => Some(*b),
        Verdict::Conflict(c) => Some(c.byte()),
    };
    json!({ "free": *v == Verdict::Granted, "message": v.message(), "byte": byte })
}

fn to_json(s: &ImageStatus) -> Value {
    let held = s.others.held;
    json!({
        "path": s.path.display().to_string(),
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
        "foreign": s.foreign.iter().map(|f| json!({
            "range": range_json(&f.range),
            "pid": f.pid,
            "reason": f.reason,
        })).collect::<Vec<_>>(),
        "presets": s.presets.iter().map(|(n, v)| (n.to_string(), verdict_json(v))).collect::<serde_json::Map<_, _>>(),
    })
}
