//! One report per path, for the commands that look at several (`status`, `doctor`): a JSON
//! entry or a table for each, a failure in its place, in the order the paths were given.

use std::io::Write;
use std::path::Path;

use qlock_core::Error;
use serde_json::{Value, json};

use crate::{Failure, message, say};

/// Each result's JSON entry as `entry` makes it, or the failure's path, error and hint.
pub(crate) fn json_entries<'a, T: 'a>(
    results: impl Iterator<Item = (&'a Path, &'a Result<T, Error>)>,
    entry: impl Fn(&T, &Path) -> Value,
) -> Vec<Value> {
    results
        .map(|(name, r)| match r {
            Ok(s) => entry(s, name),
            Err(e) => json!({ "path": name.display().to_string(), "error": e.to_string(), "hint": e.hint() }),
        })
        .collect()
}

/// Each result's table as `table` prints it, a blank line between two; a failure goes to
/// stderr with its hint, in order with the tables around it.
pub(crate) fn print_tables<'a, T: 'a, W: Write>(
    out: &mut W,
    results: impl Iterator<Item = (&'a Path, &'a Result<T, Error>)>,
    table: impl Fn(&mut W, &T, &Path) -> std::io::Result<()>,
) -> Result<(), Failure> {
    for (n, (name, r)) in results.enumerate() {
        if n > 0 {
            writeln!(out).map_err(Failure::Output)?;
        }
        match r {
            Ok(s) => table(out, s, name).map_err(Failure::Output)?,
            Err(e) => {
                out.flush().map_err(Failure::Output)?;
                say(&message(e));
                crate::print_hint(e.hint());
            }
        }
    }
    Ok(())
}
