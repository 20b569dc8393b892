//! The threads that run hook calls.
//!
//! Engine calls block (a LuaJIT call may run up to its `timeout_ms`), so they
//! never run on a tokio worker. A fixed set of OS threads, as many as the
//! engine has VMs, takes jobs from a queue; an async caller awaits a oneshot.
//! One slow script therefore holds one thread and one VM, and every other
//! request keeps the rest (see docs/adr/011-hook-threads.md).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed pool of threads for blocking hook calls.
#[derive(Debug)]
pub struct HookPool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    threads: usize,
    handles: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// The job did not run to completion (it panicked, or the pool is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLost;

impl HookPool {
    /// Start `threads` threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<HookPool> {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let h = std::thread::Builder::new()
                .name(format!("llmproxy-hook-{i}"))
                .spawn(move || loop {
                    let job = {
                        let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
                        guard.recv()
                    };
                    match job {
                        // A panicking job loses its reply; the thread lives on.
                        Ok(job) => drop(catch_unwind(AssertUnwindSafe(job))),
                        Err(_) => return,
                    }
                })?;
            handles.push(h);
        }
        Ok(HookPool {
            tx: Mutex::new(Some(tx)),
            threads,
            handles: Mutex::new(handles),
        })
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f` on a hook thread and await its result.
    pub async fn run<T, F>(&self, f: F) -> Result<T, JobLost>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        self.spawn(move || {
            let _ = reply.send(f());
        })?;
        result.await.map_err(|_| JobLost)
    }

    /// Run `f` on a hook thread and await its result; then, on the same
    /// thread and after the result was handed over, run `then` (work that
    /// must not delay the caller, without a second trip to the pool).
    pub async fn run_then<T, F, G>(&self, f: F, then: G) -> Result<T, JobLost>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
        G: FnOnce() + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        self.spawn(move || {
            let _ = reply.send(f());
            then();
        })?;
        result.await.map_err(|_| JobLost)
    }

    /// Run `f` on a hook thread without waiting for it.
    pub fn spawn<F>(&self, f: F) -> Result<(), JobLost>
    where
        F: FnOnce() + Send + 'static,
    {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(tx) => tx.send(Box::new(f)).map_err(|_| JobLost),
            None => Err(JobLost),
        }
    }

    /// Run `f` on a hook thread without waiting for it; when the pool is
    /// closed (shutdown), run it here instead, so the work is never lost.
    pub fn spawn_or_inline<F>(&self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let job: Job = Box::new(f);
        let job = match guard.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        drop(guard);
        job();
    }

    /// Stop taking jobs; threads exit once the queue is drained.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Stop taking jobs and wait until every queued job has run (blocking).
    /// Jobs queued by running jobs still run (they hold the queue open only
    /// until they finish: the threads exit when it is empty and closed).
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
