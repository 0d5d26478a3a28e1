//! `--strict`: a process with an image open read-write and no lock counts as a conflict.
//!
//! Locks only stop those who take part. QEMU with `locking=off` (Proxmox's default), a tool that
//! ignores locks, or a QEMU waiting for an incoming migration writes (or will write) an image
//! while leaving no byte behind. Without `--strict` qlock trusts the locks; with it, after the
//! locks are taken, the openers of every image taken (the same walk over `/proc` as `status`)
//! must hold no unlocked writer, else the answer is a conflict (exit 1), or, when waiting,
//! qlock lets the locks go and polls until the writer is gone or the time is up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qlock_core::{Backoff, CloseWatch, ImageLock, Opener, inspect, sleep_or_close};

use crate::Failure;
use crate::release_all_quietly;

/// An unlocked writer found on an image.
struct Unlocked {
    path: PathBuf,
    opener: Opener,
}

impl Unlocked {
    /// The first unlocked writer of `paths` other than this process, if any.
    fn find(paths: &[&Path]) -> Option<Unlocked> {
        let me = std::process::id();
        paths.iter().zip(inspect(paths)).find_map(|(path, status)| {
            let opener = status.ok()?.openers.into_iter().find(|o| o.is_unlocked_writer() && o.pid != me)?;
            Some(Unlocked { path: path.to_path_buf(), opener })
        })
    }

    /// In QEMU's words for an image in use, naming the writer, then what to do.
    fn failure(&self, code: u8, waited: Option<Duration>) -> Failure {
        let o = &self.opener;
        let path = self.path.display();
        let said = format!(
            "Image is open read-write without a lock by pid {} ({}) fd {}\n\
             Is another process using the image [{path}]?",
            o.pid,
            o.command.as_deref().unwrap_or("?"),
            o.fd
        );
        let text = match waited {
            Some(w) => format!("Timed out after {:.1}s waiting for '{path}': {said}", w.as_secs_f64()),
            None => format!("{path}: {said}"),
        };
        let hint = "--strict counts a writer without locks as a conflict: QEMU with locking=off, a tool \
                    that ignores locks, or an inactive migration target. Wait for it to close the image \
                    (--timeout SECS), or leave out --strict to trust the locks alone.";
        Failure::Said { text, hint: Some(hint.into()), code }
    }
}

/// Takes the locks with `take` (which waits for lock conflicts itself, with `waiting`), then
/// refuses an unlocked writer on any image taken: at once, or, with `waiting`, by releasing
/// everything and trying again until the writer is gone or the deadline passes.
pub(crate) fn take(
    waiting: Option<Backoff>,
    conflict: u8,
    mut take: impl FnMut(Option<Backoff>) -> Result<Vec<ImageLock>, Failure>,
) -> Result<Vec<ImageLock>, Failure> {
    let start = Instant::now();
    let mut delays = waiting.as_ref().map(Backoff::delays);
    loop {
        let left = waiting.as_ref().and_then(|b| b.timeout.map(|t| t.saturating_sub(start.elapsed())));
        let policy = waiting.clone().map(|b| match left {
            Some(l) => b.with_timeout(l),
            None => b,
        });
        let locks = take(policy)?;
        let paths: Vec<PathBuf> = locks.iter().map(|l| l.path().to_path_buf()).collect();
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let Some(found) = Unlocked::find(&refs) else { return Ok(locks) };
        release_all_quietly(locks);
        let Some(delays) = delays.as_mut() else { return Err(found.failure(conflict, None)) };
        let left = waiting.as_ref().and_then(|b| b.timeout.map(|t| t.saturating_sub(start.elapsed())));
        if left == Some(Duration::ZERO) {
            return Err(found.failure(conflict, Some(start.elapsed())));
        }
        tracing::debug!(image = %found.path.display(), "waiting: unlocked writer pid {}", found.opener.pid);
        let delay = delays.next().unwrap_or(Duration::from_millis(250));
        // The writer closing the image ends the sleep early.
        let watches: Vec<CloseWatch> = refs.iter().filter_map(|p| CloseWatch::new(p).ok()).collect();
        sleep_or_close(&watches, left.map_or(delay, |l| delay.min(l)));
    }
}
