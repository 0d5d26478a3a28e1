//! Taking an access on several images at once, all or nothing, with optional waiting.

use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use qlock_core::{Access, Backoff, Error, ImageLock, retry_blocking};
use qlock_core::{CloseWatch, sleep_or_close};

use crate::cli::HoldArgs;
use crate::images::Names;
use crate::{Failure, Outcome, sys};

/// `qlock check`: could the access be taken now (or, with `--timeout`, within that time)?
/// Leaves nothing locked.
pub(crate) fn check(args: &HoldArgs, out: &mut impl Write) -> Result<Outcome, Failure> {
    let locks = take_for(args, args.waiting(false), crate::EXIT_CONFLICT)?;
    release_all(locks).map_err(Failure::lock)?;
    let access = args.access.access();
    for image in &args.images {
        writeln!(out, "free: {} ({access})", image.display()).map_err(Failure::Output)?;
    }
    Ok(Outcome::Success)
}

/// `qlock wait`: return once the access could be taken.
pub(crate) fn wait(args: &HoldArgs) -> Result<Outcome, Failure> {
    let locks = take_for(args, args.waiting(true), crate::EXIT_CONFLICT)?;
    release_all(locks).map_err(Failure::lock)?;
    Ok(Outcome::Success)
}

/// [`take`], or with `--chain` every image's whole graph ([`crate::chain::take`]); a conflict
/// exits with `conflict`. With `--strict`, an unlocked writer of any image taken is a conflict
/// too ([`crate::strict`]).
pub(crate) fn take_for(
    args: &HoldArgs,
    waiting: Option<Backoff>,
    conflict: u8,
) -> Result<Vec<ImageLock>, Failure> {
    let locks = |waiting: Option<Backoff>| {
        if args.chain {
            return crate::chain::take(args, waiting, conflict);
        }
        take(args, waiting).map_err(|error| Failure::Lock { error, conflict })
    };
    if args.strict {
        return crate::strict::take(waiting, conflict, locks);
    }
    locks(waiting)
}

/// Opens every image (each file once, however many names it was given by), then takes the
/// access on all of them, or on none: an attempt that meets a conflict on one image releases
/// those it took before it retries or fails, so a waiter never sits on some images while it
/// waits for others. Without `waiting`, one attempt.
pub(crate) fn take(args: &HoldArgs, waiting: Option<Backoff>) -> Result<Vec<ImageLock>, Error> {
    let access = args.access.access();
    // Attempts do not name holders; the one in the way is named once, at the end.
    let options = args.lock.options().with_find_holders(false);
    let names = Names::of(&args.images);
    let mut locks = Vec::with_capacity(names.distinct().len());
    for image in names.distinct() {
        locks.push(ImageLock::open(image, &options)?);
    }
    let Some(backoff) = waiting else {
        return match attempt(&mut locks, access) {
            Ok(()) => Ok(locks),
            Err((i, e)) => Err(locks[i].with_holders(e)),
        };
    };
    let mut progress = Progress::new();
    let mut last = None;
    // Made at the first sleep: an uncontended wait should not pay ~10 ms to close them.
    let mut watches: Option<Vec<CloseWatch>> = None;
    let result = retry_blocking(
        &backoff,
        || {
            attempt(&mut locks, access).map_err(|(i, e)| {
                last = Some(i);
                tracing::debug!(image = %locks[i].path().display(), "waiting: {e}");
                progress.show(&locks[i], &e);
                e
            })
        },
        |d| {
            let w = watches.get_or_insert_with(|| {
                names.distinct().iter().filter_map(|p| CloseWatch::new(p).ok()).collect()
            });
            sleep_or_close(w, d);
        },
    );
    progress.clear();
    match result {
        Ok(()) => Ok(locks),
        Err(e) => Err(match last {
            Some(i) => locks[i].with_holders(e),
            None => e,
        }),
    }
}

/// One all-or-nothing attempt; on failure, the index of the image in the way.
fn attempt(locks: &mut [ImageLock], access: Access) -> Result<(), (usize, Error)> {
    for i in 0..locks.len() {
        if let Err(e) = locks[i].set_access(access) {
            for taken in &mut locks[..i] {
                // Dropping everything takes QEMU's fast path: it only unlocks.
                let _ = taken.set_access(Access::NONE);
            }
            return Err((i, e));
        }
    }
    Ok(())
}

fn release_all(locks: Vec<ImageLock>) -> Result<(), Error> {
    locks.into_iter().try_for_each(ImageLock::release)
}

/// The waiting line on a terminal: elapsed time and who holds the image, refreshed about twice
/// a second (naming holders walks /proc, so not on every attempt), cut to the terminal's
/// width so that it never wraps (a wrapped line cannot be taken back with `\r`).
struct Progress {
    start: Instant,
    last: Option<Instant>,
    tty: bool,
}

impl Progress {
    fn new() -> Progress {
        Progress { start: Instant::now(), last: None, tty: io::stderr().is_terminal() }
    }

    fn show(&mut self, lock: &ImageLock, err: &Error) {
        let Some(conflict) = err.conflict() else { return };
        if !self.tty || self.last.is_some_and(|t| t.elapsed() < Duration::from_millis(500)) {
            return;
        }
        self.last = Some(Instant::now());
        let named = lock.with_holders(Error::Conflict(Box::new(conflict.clone())));
        let who = named
            .conflict()
            .map(|c| c.holders.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "holder unknown".into());
        let line = format!(
            "waiting {:.1}s for '{}': {} (held by {who})",
            self.start.elapsed().as_secs_f64(),
            lock.path().display(),
            conflict.qemu_message(),
        );
        let mut out = io::stderr().lock();
        let _ = write!(out, "\r\x1b[K{}", fit(&line, width(&out)));
        let _ = out.flush();
    }

    fn clear(&self) {
        if self.tty && self.last.is_some() {
            let _ = write!(io::stderr(), "\r\x1b[K");
        }
    }
}

/// The terminal's width: its size, else `$COLUMNS`, else 80.
fn width(term: &impl AsFd) -> usize {
    sys::columns(term.as_fd())
        .or_else(|| std::env::var("COLUMNS").ok()?.parse().ok())
        .filter(|&w| w > 0)
        .unwrap_or(80)
}

/// `line` cut to fewer than `width` characters (the last column would make some terminals wrap
/// at once), ending in `…` when cut.
fn fit(line: &str, width: usize) -> String {
    let room = width.saturating_sub(1);
    if line.chars().count() <= room {
        return line.to_string();
    }
    if room == 0 {
        return String::new();
    }
    let mut cut: String = line.chars().take(room.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn a_line_is_cut_to_the_width() {
        assert_eq!(fit("waiting", 80), "waiting");
        assert_eq!(fit("waiting 1.0s", 8), "waitin…");
        assert_eq!(fit("waiting 1.0s", 8).chars().count(), 7);
        assert_eq!(fit("abc", 1), "");
    }
}
