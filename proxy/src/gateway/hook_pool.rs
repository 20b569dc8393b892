//! The threads that run hook calls.
//!
//! Engine calls may block (a LuaJIT call may run up to its `timeout_ms`).
//! [`HookPool::call`] first runs a job on the caller's thread (the connection
//! worker serving the request, docs/adr/050) under a short budget (`gateway.inline_budget_ms`, docs/adr/049-inline-hooks-with-a-budget.md):
//! a job whose hook calls all finish within it makes no trip at all. A job
//! that passes it is stopped there and runs again on the hook threads: a
//! fixed set of OS threads, as many as the engine has VMs, taking jobs from
//! a queue while the async caller awaits a oneshot. One slow script
//! therefore holds one thread and one VM, and every other request keeps the
//! rest (docs/adr/011-hook-threads.md).
//!
//! The queue is bounded and every awaited job has a deadline to *start*
//! (docs/adr/037-hook-queue-bound.md): a job that does not fit in the queue
//! fails at once with [`JobError::QueueFull`], one still queued when the
//! deadline passes is cancelled ([`JobError::Expired`]) and never runs.
//! Jobs that must not be lost (usage records) bypass the bound.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use llmproxy_core::inline;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A job waiting for a thread.
const QUEUED: u8 = 0;
/// A thread took the job: it runs to completion.
const STARTED: u8 = 1;
/// The caller gave up before the job started: it will not run.
const CANCELLED: u8 = 2;

/// Why a hook job did not give a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobError {
    /// The job did not run to completion (it panicked, or the pool is
    /// closed).
    Lost,
    /// The queue was full: the job was not queued.
    QueueFull,
    /// The job was still queued when its deadline passed: it was cancelled.
    Expired,
}

impl JobError {
    /// The pool is overloaded (the job never started): the request gets a
    /// fast 503 rather than the hook's failure policy.
    pub fn is_overload(self) -> bool {
        matches!(self, JobError::QueueFull | JobError::Expired)
    }
}

/// Kept for callers that only care that the job gave nothing back.
pub type JobLost = JobError;

/// Counters of jobs refused by the bound and the deadline, and of jobs
/// that could not finish inline.
#[derive(Debug, Default)]
pub struct Rejections {
    /// Jobs refused because the queue was full.
    pub queue_full: AtomicU64,
    /// Jobs cancelled because they did not start before their deadline.
    pub expired: AtomicU64,
    /// Jobs tried inline that went to a hook thread, by
    /// [`inline::Overrun`] (in [`inline::Overrun::ALL`] order).
    pub offloaded: [AtomicU64; 3],
}

struct Queue {
    /// Jobs, with the start state of those that count against the bound.
    jobs: VecDeque<(Job, Option<Arc<AtomicU8>>)>,
    /// Queued jobs that count against the bound (cancelled ones do not).
    bounded: usize,
    closed: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a job; a bounded job (with its start state) is refused when
    /// `capacity` bounded jobs are queued.
    fn push(&self, job: Job, bounded: Option<(usize, Arc<AtomicU8>)>) -> Result<(), (Job, JobError)> {
        let mut q = self.lock();
        if q.closed {
            return Err((job, JobError::Lost));
        }
        let state = match bounded {
            Some((cap, _)) if q.bounded >= cap => return Err((job, JobError::QueueFull)),
            Some((_, state)) => {
                q.bounded += 1;
                Some(state)
            }
            None => None,
        };
        q.jobs.push_back((job, state));
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, or `None` once the queue is closed and empty. A bounded
    /// job is marked started here, under the lock, unless it was cancelled.
    fn pop(&self) -> Option<Job> {
        let mut q = self.lock();
        loop {
            if let Some((job, state)) = q.jobs.pop_front() {
                let started = state.is_some_and(|s| {
                    s.compare_exchange(QUEUED, STARTED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                });
                if started {
                    q.bounded -= 1;
                }
                return Some(job);
            }
            if q.closed {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Cancels a queued job when the caller stops waiting for it (deadline, or
/// the request's future was dropped because the client left).
struct StartGuard(Arc<AtomicU8>, Arc<Inner>);

impl StartGuard {
    /// Cancel the job if it has not started (it then leaves the bound at
    /// once); `true` when it was cancelled.
    fn cancel(&self) -> bool {
        if self.0.load(Ordering::Acquire) != QUEUED {
            return false;
        }
        let mut q = self.1.lock();
        let cancelled = self
            .0
            .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if cancelled {
            q.bounded -= 1;
        }
        cancelled
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Whether a thread took the job (rather than skipping a cancelled one).
fn started(state: &AtomicU8) -> bool {
    state.load(Ordering::Acquire) == STARTED
}

/// A fixed pool of threads for blocking hook calls.
pub struct HookPool {
    inner: Arc<Inner>,
    threads: usize,
    capacity: usize,
    deadline: Duration,
    /// Budget of a job run inline on the caller's thread; `None`: every job
    /// goes to the threads.
    inline_budget: Option<Duration>,
    handles: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Jobs refused by the bound or the deadline.
    pub rejections: Rejections,
}

impl std::fmt::Debug for HookPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookPool")
            .field("threads", &self.threads)
            .field("capacity", &self.capacity)
            .field("deadline", &self.deadline)
            .field("inline_budget", &self.inline_budget)
            .finish_non_exhaustive()
    }
}

impl HookPool {
    /// Start `threads` threads (at least one) over a queue of at most
    /// `capacity` awaited jobs (at least one), each of which must start
    /// within `deadline`. [`HookPool::call`] tries a job inline first
    /// when `inline_budget` is not zero.
    pub fn new(
        threads: usize,
        capacity: usize,
        deadline: Duration,
        inline_budget: Duration,
    ) -> std::io::Result<HookPool> {
        let threads = threads.max(1);
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                bounded: 0,
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let inner = Arc::clone(&inner);
            let h = std::thread::Builder::new()
                .name(format!("llmproxy-hook-{i}"))
                .spawn(move || {
                    while let Some(job) = inner.pop() {
                        // A panicking job loses its reply; the thread lives on.
                        drop(catch_unwind(AssertUnwindSafe(job)));
                    }
                })?;
            handles.push(h);
        }
        Ok(HookPool {
            inner,
            threads,
            capacity: capacity.max(1),
            deadline,
            inline_budget: (!inline_budget.is_zero()).then_some(inline_budget),
            handles: Mutex::new(handles),
            rejections: Rejections::default(),
        })
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Jobs queued now (not yet taken by a thread).
    pub fn queued(&self) -> usize {
        self.inner.lock().jobs.len()
    }

    fn refused(&self, e: JobError) -> JobError {
        if e == JobError::QueueFull {
            self.rejections.queue_full.fetch_add(1, Ordering::Relaxed);
        }
        e
    }

    /// Await a queued job's result: give up (and cancel it) when it has not
    /// started within the deadline; once started it runs to the end.
    async fn await_result<T>(&self, guard: StartGuard, mut result: oneshot::Receiver<T>) -> Result<T, JobError> {
        match tokio::time::timeout(self.deadline, &mut result).await {
            Ok(r) => r.map_err(|_| JobError::Lost),
            Err(_) if guard.cancel() => {
                self.rejections.expired.fetch_add(1, Ordering::Relaxed);
                Err(JobError::Expired)
            }
            Err(_) => result.await.map_err(|_| JobError::Lost),
        }
    }

    /// Run `f` here, on the caller's thread, with every hook call it makes
    /// under the inline budget; `None` when a call passed it or the budget
    /// is off (then nothing `f` did counts: run it on a hook thread). `f`
    /// must have no effect but its hook calls and its result
    /// (`llmproxy_core::inline`).
    pub fn try_inline<T, F: Fn() -> T>(&self, f: &F) -> Option<Result<T, JobError>> {
        let budget = self.inline_budget?;
        match catch_unwind(AssertUnwindSafe(|| inline::attempt(budget, f))) {
            Ok(Ok(v)) => Some(Ok(v)),
            Ok(Err(stopped)) => {
                let i = inline::Overrun::ALL.iter().position(|r| *r == stopped.reason);
                if let Some(n) = i.and_then(|i| self.rejections.offloaded.get(i)) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Err(_) => Some(Err(JobError::Lost)),
        }
    }

    /// Run `f`, a job of hook calls with no other effect: inline when it
    /// finishes within the budget, else on a hook thread as [`HookPool::run`].
    pub async fn call<T, F>(&self, f: F) -> Result<T, JobError>
    where
        T: Send + 'static,
        F: Fn() -> T + Send + 'static,
    {
        match self.try_inline(&f) {
            Some(r) => r,
            None => self.run(f).await,
        }
    }

    /// Run `f` on a hook thread and await its result.
    pub async fn run<T, F>(&self, f: F) -> Result<T, JobError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let s = Arc::clone(&state);
        let job: Job = Box::new(move || {
            if started(&s) {
                let _ = reply.send(f());
            }
        });
        if let Err((_, e)) = self.inner.push(job, Some((self.capacity, Arc::clone(&state)))) {
            return Err(self.refused(e));
        }
        self.await_result(StartGuard(state, Arc::clone(&self.inner)), result)
            .await
    }

    /// Run `f` on a hook thread and await its result; then, on the same
    /// thread and after the result was handed over, run `then` (work that
    /// must not delay the caller, without a second trip to the pool).
    /// `then` runs even when `f` does not (queue full, deadline passed).
    pub async fn run_then<T, F, G>(&self, f: F, then: G) -> Result<T, JobError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
        G: FnOnce() + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let s = Arc::clone(&state);
        let job: Job = Box::new(move || {
            if started(&s) {
                let _ = reply.send(f());
            }
            then();
        });
        if let Err((job, e)) = self.inner.push(job, Some((self.capacity, Arc::clone(&state)))) {
            // `f` will not run (the state stays QUEUED, never STARTED);
            // `then` must.
            self.spawn_or_inline(job);
            return Err(self.refused(e));
        }
        self.await_result(StartGuard(state, Arc::clone(&self.inner)), result)
            .await
    }

    /// Run `f` on a hook thread without waiting for it (outside the bound).
    pub fn spawn<F>(&self, f: F) -> Result<(), JobError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.inner.push(Box::new(f), None).map_err(|(_, e)| e)
    }

    /// Run `f` on a hook thread without waiting for it (outside the bound:
    /// this work is never refused); when the pool is closed (shutdown), run
    /// it here instead, so the work is never lost.
    pub fn spawn_or_inline<F>(&self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        if let Err((job, _)) = self.inner.push(Box::new(f), None) {
            job();
        }
    }

    /// Stop taking jobs; threads exit once the queue is drained.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.inner.ready.notify_all();
    }

    /// Stop taking jobs and wait until every queued job has run (blocking).
    /// Jobs queued by running jobs are refused (they run inline with
    /// [`HookPool::spawn_or_inline`]); the threads exit when the queue is
    /// empty.
    pub fn close_and_join(&self) {
        self.close();
        let handles: Vec<_> = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Drop for HookPool {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Occupy the only thread for `ms`; returns once the job has started.
    async fn occupy(pool: &HookPool, ms: u64) {
        let (tx, rx) = oneshot::channel();
        pool.spawn(move || {
            let _ = tx.send(());
            std::thread::sleep(Duration::from_millis(ms));
        })
        .unwrap();
        rx.await.unwrap();
    }

    #[tokio::test]
    async fn a_full_queue_and_a_passed_deadline_refuse_fast() {
        let pool = HookPool::new(1, 2, Duration::from_millis(100), Duration::ZERO).unwrap();
        occupy(&pool, 1000).await;
        let started = Instant::now();
        let (r1, r2, r3) = tokio::join!(pool.run(|| 1), pool.run(|| 2), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            pool.run(|| 3).await
        });
        assert_eq!(r3, Err(JobError::QueueFull));
        assert_eq!((r1, r2), (Err(JobError::Expired), Err(JobError::Expired)));
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "refused before the thread was free"
        );
        assert_eq!(pool.rejections.queue_full.load(Ordering::Relaxed), 1);
        assert_eq!(pool.rejections.expired.load(Ordering::Relaxed), 2);
        // The cancelled jobs left the bound at once and never run; the pool
        // serves again once its thread is free.
        assert_eq!(pool.queued(), 2);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(pool.run(|| 7).await, Ok(7));
    }

    #[tokio::test]
    async fn run_then_runs_then_even_when_refused() {
        let pool = HookPool::new(1, 1, Duration::from_millis(50), Duration::ZERO).unwrap();
        let ran = Arc::new(AtomicU64::new(0));
        occupy(&pool, 300).await;
        let count = |ran: &Arc<AtomicU64>| {
            let ran = Arc::clone(ran);
            move || {
                ran.fetch_add(1, Ordering::SeqCst);
            }
        };
        let (r1, r2) = tokio::join!(pool.run_then(|| 1, count(&ran)), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            pool.run_then(|| 2, count(&ran)).await
        });
        assert_eq!(r1, Err(JobError::Expired));
        assert_eq!(r2, Err(JobError::QueueFull));
        pool.close_and_join();
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }
}
