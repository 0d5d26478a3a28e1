//! `qlock doctor`: what the storage under each image can promise about locks (filesystem,
//! mount, whether OFD locks work, who sees them) and what can defeat them, each with what to do.

use std::io::Write;
use std::path::Path;

use qlock_core::Storage;
use serde_json::{Value, json};

use crate::cli::DoctorArgs;
use crate::{Failure, Outcome, report};

/// Reports on every path; [`Outcome::SomeFailed`] if any could not be inspected.
pub(crate) fn main(args: &DoctorArgs, out: &mut impl Write) -> Result<Outcome, Failure> {
    let results: Vec<_> = args.paths.iter().map(|p| (p, Storage::probe(p))).collect();
    let each = || results.iter().map(|(name, r)| (name.as_path(), r));
    if args.json {
        let paths = report::json_entries(each(), to_json);
        let text = serde_json::to_string_pretty(&json!({ "schema": 1, "paths": paths }))
            .map_err(|e| Failure::Other(format!("cannot print JSON: {e}")))?;
        writeln!(out, "{text}").map_err(Failure::Output)?;
    } else {
        report::print_tables(out, each(), print_table)?;
    }
    Ok(if results.iter().any(|(_, r)| r.is_err()) { Outcome::SomeFailed } else { Outcome::Success })
}

fn print_table(out: &mut impl Write, s: &Storage, name: &Path) -> std::io::Result<()> {
    let mut row = |k: &str, v: &str| writeln!(out, "{k:<14}{v}");
    row("path", &name.display().to_string())?;
    row("filesystem", &s.filesystem)?;
    if let Some(m) = &s.mount {
        row("mount point", &m.mount_point.display().to_string())?;
        row("mount source", &m.source)?;
        row("mount options", &m.options)?;
    } else {
        row("mount", "not found in /proc/self/mountinfo")?;
    }
    let ofd = match &s.ofd_error {
        None => "yes".to_string(),
        Some(e) => format!("no ({e})"),
    };
    row("OFD locks", &ofd)?;
    row("lock scope", s.lock_scope.describe())?;
    if s.hazards.is_empty() {
        row("hazards", "none known")?;
    }
    for h in &s.hazards {
        row("hazard", &format!("{}: {}", h.id, h.text))?;
        row("  what to do", &h.advice)?;
    }
    Ok(())
}

fn to_json(s: &Storage, name: &Path) -> Value {
    let m = s.mount.as_ref();
    json!({
        "path": name.display().to_string(),
        "filesystem": s.filesystem,
        "statfs_magic": s.magic.map(|m| format!("{m:#x}")),
        "mount_point": m.map(|m| m.mount_point.display().to_string()),
        "mount_source": m.map(|m| m.source.as_str()),
        "mount_options": m.map(|m| m.options.as_str()),
        "lock_scope": s.lock_scope.as_str(),
        "ofd": s.ofd,
        "ofd_error": s.ofd_error,
        "hazards": s.hazards.iter().map(|h| json!({ "id": h.id, "text": h.text, "advice": h.advice })).collect::<Vec<_>>(),
    })
}
