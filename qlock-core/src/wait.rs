//! Waiting for an image: jittered exponential backoff, written once for every runtime.
//!
//! QEMU holds its locks for the life of the open image and never queues, so waiting means
//! polling. [`retry`] is the one waiting loop; it is generic over how to sleep, so the sync
//! core ([`retry_blocking`]) and the async crates share it. Jitter matters: two peers that
//! lock and check at the same instant both fail (docs/protocol.md §2), and without jitter they
//! could keep failing each other.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use crate::error::Error;

/// A retry policy: delays grow from `initial` by `multiplier` up to `max`, each shortened by a
/// random fraction of up to `jitter`, until `timeout` (if any) has passed.
///
/// Start from [`Backoff::default`] and change what differs with the `with_*` methods; the
/// struct is `#[non_exhaustive]`, so a policy can gain knobs without breaking callers.
///
/// ```
/// use std::time::Duration;
/// use qlock_core::Backoff;
///
/// let b = Backoff::default().with_max(Duration::from_millis(100)).with_timeout(Duration::from_secs(30));
/// let first: Vec<Duration> = b.delays().take(3).collect();
/// assert!(first.iter().all(|d| *d <= b.max));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Growth factor per attempt (at least 1).
    pub multiplier: f64,
    /// Fraction of each delay that is random, 0.0 to 1.0.
    pub jitter: f64,
    /// Give up after this long; `None` waits forever.
    pub timeout: Option<Duration>,
}

impl Default for Backoff {
    /// 2 ms doubling to 250 ms with 50 % jitter, no timeout.
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(2),
            max: Duration::from_millis(250),
            multiplier: 2.0,
            jitter: 0.5,
            timeout: None,
        }
    }
}

impl Backoff {
    /// The same policy with a deadline `timeout` after the first attempt.
    pub fn with_timeout(mut self, timeout: Duration) -> Backoff {
        self.timeout = Some(timeout);
        self
    }

    /// The same policy with a first delay of `initial`.
    pub fn with_initial(mut self, initial: Duration) -> Backoff {
        self.initial = initial;
        self
    }

    /// The same policy with delays capped at `max`.
    pub fn with_max(mut self, max: Duration) -> Backoff {
        self.max = max;
        self
    }

    /// The same policy with delays growing by `multiplier` per attempt (at least 1).
    pub fn with_multiplier(mut self, multiplier: f64) -> Backoff {
        self.multiplier = multiplier;
        self
    }

    /// The same policy with `jitter` (0.0 to 1.0) of each delay random.
    pub fn with_jitter(mut self, jitter: f64) -> Backoff {
        self.jitter = jitter;
        self
    }

    /// The successive delays (endless).
    pub fn delays(&self) -> Delays {
        let seed =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
                ^ (u64::from(std::process::id()) << 32);
        Delays { policy: self.clone(), next: self.initial.min(self.max), rng: seed | 1 }
    }
}

/// The delays of a [`Backoff`], jittered.
#[derive(Debug, Clone)]
pub struct Delays {
    policy: Backoff,
    next: Duration,
    rng: u64,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // xorshift64: a few cycles, and good enough to decorrelate peers.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        let jitter = self.policy.jitter.clamp(0.0, 1.0);
        let delay = self.next.mul_f64(1.0 - jitter * unit);
        self.next = self.next.mul_f64(self.policy.multiplier.max(1.0)).min(self.policy.max);
        Some(delay)
    }
}

/// An error a waiting loop can retry or give up on.
pub trait Retry: Sized {
    /// True when another attempt may succeed (a conflict with another holder).
    fn is_retryable(&self) -> bool;
    /// The error to report when the deadline passed with `self` as the last failure.
    fn timed_out(self, waited: Duration) -> Self;
}

impl Retry for Error {
    fn is_retryable(&self) -> bool {
        // A conflict, not a timeout that carries one: a timeout ends the wait.
        matches!(self, Error::Conflict(_))
    }

    fn timed_out(self, waited: Duration) -> Error {
        let path = self.conflict().map(|c| c.path.clone()).unwrap_or_default();
        Error::TimedOut { path, waited, last: Box::new(self) }
    }
}

/// The waiting loop: calls `attempt` until it succeeds, fails for good, or the policy's
/// deadline passes, sleeping with `sleep` in between.
///
/// `sleep` may return early (a wake-up hint such as an inotify close event); the loop then just
/// tries again and carries on with the same backoff.
///
/// # Errors
/// The first non-retryable error, or the last retryable one turned into a timeout.
pub async fn retry<T, E, A, AF, S, SF>(policy: &Backoff, mut attempt: A, mut sleep: S) -> Result<T, E>
where
    E: Retry,
    A: FnMut() -> AF,
    AF: Future<Output = Result<T, E>>,
    S: FnMut(Duration) -> SF,
    SF: Future<Output = ()>,
{
    let start = Instant::now();
    let mut delays = policy.delays();
    loop {
        let err = match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => e,
        };
        let elapsed = start.elapsed();
        let left = policy.timeout.map(|t| t.saturating_sub(elapsed));
        if left == Some(Duration::ZERO) {
            return Err(err.timed_out(elapsed));
        }
        let delay = delays.next().unwrap_or(policy.max);
        sleep(left.map_or(delay, |l| delay.min(l))).await;
    }
}

/// [`retry`] for blocking callers: `sleep` blocks the thread between attempts
/// ([`std::thread::sleep`], or [`crate::wake::sleep_or_close`] to wake early on a close).
///
/// # Errors
/// As [`retry`].
pub fn retry_blocking<T, E: Retry>(
    policy: &Backoff,
    mut attempt: impl FnMut() -> Result<T, E>,
    mut sleep: impl FnMut(Duration),
) -> Result<T, E> {
    let fut = retry(
        policy,
        || std::future::ready(attempt()),
        |d| {
            sleep(d);
            std::future::ready(())
        },
    );
    // Every future inside is ready at once, so one poll finishes the loop.
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum E {
        Busy,
        Fatal,
        Timeout(u32),
    }

    impl Retry for E {
        fn is_retryable(&self) -> bool {
            *self == E::Busy
        }
        fn timed_out(self, _: Duration) -> E {
            E::Timeout(0)
        }
    }

    fn quick() -> Backoff {
        Backoff::default().with_initial(Duration::from_micros(10)).with_max(Duration::from_micros(100))
    }

    #[test]
    fn delays_grow_to_the_cap_with_jitter_below_the_nominal_value() {
        let b = Backoff::default().with_jitter(0.5);
        let d: Vec<Duration> = b.delays().take(20).collect();
        let mut nominal = b.initial;
        for got in d {
            assert!(got <= nominal && got >= nominal / 2, "{got:?} vs {nominal:?}");
            nominal = (nominal * 2).min(b.max);
        }
        let exact = Backoff::default().with_jitter(0.0);
        assert_eq!(exact.delays().nth(30), Some(exact.max));
    }

    #[test]
    fn retries_until_success_and_stops_on_fatal_errors() {
        let mut n = 0;
        let r: Result<u32, E> = retry_blocking(
            &quick(),
            || {
                n += 1;
                if n < 5 { Err(E::Busy) } else { Ok(n) }
            },
            std::thread::sleep,
        );
        assert_eq!(r, Ok(5));
        let mut n = 0;
        let r: Result<(), E> = retry_blocking(
            &quick(),
            || {
                n += 1;
                Err(if n < 3 { E::Busy } else { E::Fatal })
            },
            std::thread::sleep,
        );
        assert_eq!((r, n), (Err(E::Fatal), 3));
    }

    #[test]
    fn deadline_turns_the_last_conflict_into_a_timeout() {
        let policy = quick().with_timeout(Duration::from_millis(5));
        let start = Instant::now();
        let r: Result<(), E> = retry_blocking(&policy, || Err(E::Busy), std::thread::sleep);
        assert_eq!(r, Err(E::Timeout(0)));
        assert!(start.elapsed() >= Duration::from_millis(5));
    }
}
