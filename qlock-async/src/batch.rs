//! [`Batch`]: a few long-lived pool tasks that run queued closures back to back, so a burst of
//! operations costs neither a pool thread each nor a thread hand-over each.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A closure queued for the pool.
type Job = Box<dyn FnOnce() + Send>;

/// How many times a pool task that found the queue empty yields its thread and looks again
/// before it ends (rayon's workers, too, look a while before they sleep). A caller that
/// acquires images one after another queues its next closure within tens of microseconds of
/// the last reply: a task still looking takes it at once, where an ended one leaves a parked
/// pool thread to wake, whose CPU has been idle long enough to halt (on the project's VM:
/// sequential acquire+release 45 us without, 13 us with). A yield is a `sched_yield(2)` of
/// well under a microsecond when nothing else wants the CPU. When something does, the yield
/// lasts that task's time slice and the closures queued meanwhile would wait for it, so one
/// yield longer than [`BUSY_YIELD`] ends the looking: a loaded machine then gets the plain
/// pool hop, whose woken thread the scheduler runs at once. (Measured and rejected: waiting on
/// a condition variable instead, 72 us idle, the halted-CPU wake-up again; spinning without
/// yielding, 66 us idle and 50 us loaded, the spinner contending for the queue's lock.)
const LINGER_ROUNDS: u32 = 100;

/// A yield this long means another task ran meanwhile: the CPU is wanted elsewhere.
const BUSY_YIELD: Duration = Duration::from_micros(200);

/// A queue of closures and the pool tasks draining it: at most `limit` of them, started on
/// demand by [`Batch::run`] and ended when the queue stays empty a moment. See the
/// [crate docs](crate#many-operations-at-once) for why.
pub struct Batch {
    limit: usize,
    state: Mutex<State>,
}

struct State {
    queue: VecDeque<Job>,
    /// Pool tasks started and not yet ended (counted under the same lock as the queue, so a
    /// queued closure always has a task that will see it).
    workers: usize,
}

impl Batch {
    /// An empty queue drained by at most `limit` pool tasks.
    pub const fn new(limit: usize) -> Batch {
        Batch { limit, state: Mutex::new(State { queue: VecDeque::new(), workers: 0 }) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `f`; `spawn` starts a pool task (detached) when fewer than the limit run. The
    /// returned future gives `f`'s result, or `None` if `f` was dropped unrun (its pool task
    /// was dropped by a runtime shutting down). Dropping the future before `f` started drops
    /// `f` unrun; after, `f` finishes and its result is dropped on the pool thread.
    pub fn run<T, F>(&'static self, spawn: impl FnOnce(Job), f: F) -> Reply<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let slot = Arc::new(Mutex::new(Slot { value: None, waker: None, state: Stage::Queued }));
        // The pool side's only handle on the reply: dropping it unused (the closure dropped
        // unrun, or `f` panicking) tells the caller the reply will never come.
        let unrun = Unrun(Some(Arc::clone(&slot)));
        let job: Job = Box::new(move || {
            let mut unrun = unrun;
            if unrun.0.as_ref().is_some_and(|s| Arc::strong_count(s) == 1) {
                unrun.0 = None;
                return; // the caller is gone: `f` is dropped unrun
            }
            let value = f();
            if let Some(slot) = unrun.0.take() {
                let mut s = lock(&slot);
                s.value = Some(value);
                s.state = Stage::Done;
                if let Some(w) = s.waker.take() {
                    w.wake();
                }
            }
        });
        let start = {
            let mut state = self.state();
            state.queue.push_back(job);
            let start = state.workers < self.limit;
            state.workers += usize::from(start);
            start
        };
        if start {
            let worker = Worker(self);
            spawn(Box::new(move || self.drain(worker)));
        }
        Reply { slot }
    }

    /// A pool task: runs queued closures until the queue is empty, and ends after it has
    /// stayed empty for [`LINGER_ROUNDS`] yields (or one busy one, see [`BUSY_YIELD`]). If the
    /// task is dropped unrun, `worker` still counts it down.
    fn drain(&'static self, worker: Worker) {
        let mut idle = 0;
        loop {
            let job = {
                let mut state = self.state();
                match state.queue.pop_front() {
                    Some(job) => job,
                    None if idle < LINGER_ROUNDS => {
                        drop(state);
                        idle += 1;
                        let yielded = Instant::now();
                        std::thread::yield_now();
                        if yielded.elapsed() > BUSY_YIELD {
                            idle = LINGER_ROUNDS;
                        }
                        continue;
                    }
                    None => {
                        state.workers -= 1;
                        std::mem::forget(worker);
                        return;
                    }
                }
            };
            idle = 0;
            job();
        }
    }
}

/// Counts a pool task down if it ends other than by finding the queue empty: a closure
/// panicked, or the task was dropped unrun (a runtime shutting down drops its queued pool
/// tasks). If it was the last task, the queued closures are dropped unrun too, and their
/// callers get `None` rather than waiting for a task that will never come.
struct Worker(&'static Batch);

impl Drop for Worker {
    fn drop(&mut self) {
        let orphans = {
            let mut state = self.0.state();
            state.workers -= 1;
            if state.workers == 0 { std::mem::take(&mut state.queue) } else { VecDeque::new() }
        };
        drop(orphans);
    }
}

/// Marks a reply as never coming when its closure is dropped unrun or panics.
struct Unrun<T>(Option<Arc<Mutex<Slot<T>>>>);

impl<T> Drop for Unrun<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            let mut s = lock(&slot);
            s.state = Stage::Lost;
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    }
}

enum Stage {
    Queued,
    Done,
    Lost,
}

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
    state: Stage,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The result of a closure queued by [`Batch::run`]: `None` if it never ran (or panicked).
pub struct Reply<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

impl<T> Future for Reply<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = lock(&self.slot);
        match s.state {
            Stage::Queued => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Stage::Done => Poll::Ready(s.value.take()),
            Stage::Lost => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn wait<T>(reply: Reply<T>) -> Option<T> {
        futures_lite::future::block_on(reply)
    }

    #[test]
    fn a_burst_starts_at_most_the_limit_of_pool_tasks_and_every_closure_runs_once() {
        static BATCH: Batch = Batch::new(4);
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        static RAN: AtomicUsize = AtomicUsize::new(0);
        let spawn = |task: Job| {
            STARTED.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(task);
        };
        let (hold, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        // The first four closures block until released, so the burst finds every task busy.
        let replies: Vec<_> = (0..1000)
            .map(|i| {
                let gate = Arc::clone(&gate);
                BATCH.run(spawn, move || {
                    if i < 4 {
                        let _ = lock(&gate).recv();
                    }
                    RAN.fetch_add(1, Ordering::SeqCst);
                    i
                })
            })
            .collect();
        assert_eq!(STARTED.load(Ordering::SeqCst), 4);
        drop(hold);
        let got: Vec<_> = replies.into_iter().map(wait).collect();
        assert!(got.iter().enumerate().all(|(i, r)| *r == Some(i)));
        assert_eq!(RAN.load(Ordering::SeqCst), 1000);
    }

    #[test]
    fn a_dropped_caller_s_closure_never_runs_and_a_dropped_task_fails_the_queue() {
        static BATCH: Batch = Batch::new(1);
        static RAN: AtomicUsize = AtomicUsize::new(0);
        let tasks = Mutex::new(Vec::new());
        let keep = |task: Job| lock(&tasks).push(task);
        let dropped = BATCH.run(keep, || RAN.fetch_add(1, Ordering::SeqCst));
        let kept = BATCH.run(keep, || RAN.fetch_add(1, Ordering::SeqCst));
        drop(dropped);
        let task = lock(&tasks).pop().expect("one pool task");
        assert!(lock(&tasks).is_empty(), "the limit is one task");
        task();
        assert_eq!(wait(kept), Some(0), "only the kept closure ran");
        assert_eq!(RAN.load(Ordering::SeqCst), 1);
        // A pool task dropped unrun (a runtime shutting down) fails what was queued behind it.
        let orphan = BATCH.run(keep, || RAN.fetch_add(1, Ordering::SeqCst));
        drop(lock(&tasks).pop().expect("a new pool task"));
        assert_eq!(wait(orphan), None);
        assert_eq!(RAN.load(Ordering::SeqCst), 1);
    }
}
