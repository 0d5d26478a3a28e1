//! Taking an access on several images at once, all or nothing, with optional waiting.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use qlock_core::wake::{CloseWatch, sleep_or_close};
use qlock_core::{Access, Error, ImageLock, Perm, wait};

use crate::cli::HoldArgs;
use crate::{EXIT_ERROR, report};

/// `qlock check`: could the access be taken now? Leaves nothing locked.
pub(crate) fn check(args: &HoldArgs) -> ExitCode {
    match take(args, false).map(release_all) {
        Ok(Ok(())) => {
            let access = args.access.access().map(|a| a.to_string()).unwrap_or_default();
            for image in &args.images {
                println!("free: {} ({access})", image.display());
            }
            ExitCode::SUCCESS
        }
        Ok(Err(e)) | Err(Failure::Lock(e)) => report(&e),
        Err(Failure::Usage(msg)) => usage(&msg),
    }
}

/// `qlock wait`: return once the access could be taken.
pub(crate) fn wait(args: &HoldArgs) -> ExitCode {
    match take(args, true).map(release_all) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) | Err(Failure::Lock(e)) => report(&e),
        Err(Failure::Usage(msg)) => usage(&msg),
    }
}

/// Why the images could not be taken.
pub(crate) enum Failure {
    /// The command line does not say what to lock.
    Usage(String),
    /// Opening or locking failed.
    Lock(Error),
}

pub(crate) fn usage(msg: &str) -> ExitCode {
    eprintln!("qlock: {msg}");
    ExitCode::from(EXIT_ERROR)
}

/// Opens every image, then takes the access on all of them, or on none: an attempt that meets
/// a conflict on one image releases those it took before it retries or fails, so a waiter never
/// sits on some images while it waits for others.
pub(crate) fn take(args: &HoldArgs, wait_for_it: bool) -> Result<Vec<ImageLock>, Failure> {
    let access = args.access.access().map_err(Failure::Usage)?;
    let backoff = args.backoff().map_err(Failure::Usage)?;
    let options = args.lock.options();
    let mut locks = Vec::with_capacity(args.images.len());
    for image in &args.images {
        locks.push(ImageLock::open(image, &options).map_err(Failure::Lock)?);
    }
    if !wait_for_it {
        return match attempt(&mut locks, access) {
            Ok(()) => Ok(locks),
            Err((i, e)) => Err(Failure::Lock(locks[i].with_holders(e))),
        };
    }
    let mut progress = Progress::new();
    let mut last = None;
    // Made at the first sleep: an uncontended wait should not pay ~10 ms to close them.
    let mut watches: Option<Vec<CloseWatch>> = None;
    let result = wait::retry_blocking(
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
            let w = watches
                .get_or_insert_with(|| args.images.iter().filter_map(|p| CloseWatch::new(p).ok()).collect());
            sleep_or_close(w, d);
        },
    );
    progress.clear();
    match result {
        Ok(()) => Ok(locks),
        Err(e) => Err(Failure::Lock(match last {
            Some(i) => locks[i].with_holders(e),
            None => e,
        })),
    }
}

/// One all-or-nothing attempt; on failure, the index of the image in the way.
fn attempt(locks: &mut [ImageLock], access: Access) -> Result<(), (usize, Error)> {
    for i in 0..locks.len() {
        if let Err(e) = locks[i].try_set_access(access) {
            for taken in &mut locks[..i] {
                // Dropping everything takes QEMU's fast path: it only unlocks.
                let _ = taken.set_access(Access::new(Perm::empty(), Perm::LEGACY_ALL));
            }
            return Err((i, e));
        }
    }
    Ok(())
}

fn release_all(locks: Vec<ImageLock>) -> Result<(), Error> {
    locks.into_iter().try_for_each(ImageLock::release)
}

/// Releases every image; an unlock error is reported but changes nothing else.
pub(crate) fn release_all_quietly(locks: Vec<ImageLock>) {
    for lock in locks {
        if let Err(e) = lock.release() {
            eprintln!("qlock: warning: {e}");
        }
    }
}

/// The waiting line on a terminal: elapsed time and who holds the image, refreshed about twice
/// a second (naming holders walks /proc, so not on every attempt).
struct Progress {
    start: Instant,
    last: Option<Instant>,
    tty: bool,
}

impl Progress {
    fn new() -> Progress {
        Progress { start: Instant::now(), last: None, tty: std::io::stderr().is_terminal() }
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
        let mut out = std::io::stderr().lock();
        let _ = write!(out, "\r\x1b[K{line}");
        let _ = out.flush();
    }

    fn clear(&self) {
        if self.tty && self.last.is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}
