//! The threads that serve client connections (docs/adr/050-connection-workers.md).
//!
//! Each worker is an OS thread running its own single-threaded tokio
//! runtime. The public listener's accept loop hands every accepted
//! connection to the next worker in turn; from then on the connection, its
//! requests, their inline hook jobs and the upstream connections they use
//! (each worker has its own upstream pools, [`current`]) live on that one
//! thread. A request therefore never waits for a wake-up from another
//! thread of the runtime, which the multi-threaded runtime's work stealing
//! costs on every idle-to-busy step.

use std::cell::Cell;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker running on this thread, if any.
pub fn current() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// The number of workers `configured` asks for: 0 means one per CPU.
pub fn resolve(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// How far ahead a worker's runtime always has a timer due.
const TIMER_ANCHOR: Duration = Duration::from_secs(1);

/// Keep a timer due within [`TIMER_ANCHOR`] in the runtime's timer wheel.
///
/// Every request arms timers (hyper's 30 s header read timeout while a
/// connection waits for its next request, the upstream and write
/// timeouts), and tokio's time driver wakes its own thread (a write to its
/// eventfd, then one more `epoll_wait`) for a timer that is due before the
/// driver's next wake-up, or for any timer when the wheel was empty as it
/// parked. Between two requests on a connection the wheel often is, so
/// nearly every request paid those two system calls. With a timer always
/// due within a second, a request timer of a second or more (the header
/// read timeout, the default upstream and write timeouts) is never due
/// before the next wake-up, and the driver is woken once a second for the
/// anchor instead.
async fn anchor_timers() {
    loop {
        tokio::time::sleep(TIMER_ANCHOR).await;
    }
}

/// Running workers.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Connections handed to each worker.
    connections: Vec<AtomicU64>,
    /// Each worker's stop signal and thread.
    threads: Mutex<Vec<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl Workers {
    /// Start `n` workers (at least one).
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(n.max(1));
        let mut threads = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let (ready, started) = std::sync::mpsc::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("llmproxy-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some(i)));
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(rt.handle().clone()));
                    // Until told to stop; then the runtime is dropped with
                    // whatever is left (the gateway drains connections
                    // before it stops its workers).
                    rt.block_on(async move {
                        tokio::select! {
                            _ = stopped => {}
                            () = anchor_timers() => {}
                        }
                    });
                })?;
            let handle = started
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread died while starting"))??;
            handles.push(handle);
            threads.push((stop, thread));
        }
        Ok(Workers {
            connections: handles.iter().map(|_| AtomicU64::new(0)).collect(),
            handles,
            next: AtomicUsize::new(0),
            threads: Mutex::new(threads),
        })
    }

    /// Run `f`, a client connection, on the next worker, round robin.
    pub fn spawn<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.connections[i].fetch_add(1, Ordering::Relaxed);
        drop(self.handles[i].spawn(f));
    }

    /// Append `llmproxy_worker_connections_total{worker}`.
    pub fn render(&self, out: &mut String) {
        let name = "llmproxy_worker_connections_total";
        super::metrics::head(out, name);
        for (i, n) in self.connections.iter().enumerate() {
            let _ = writeln!(out, "{name}{{worker=\"{i}\"}} {}", n.load(Ordering::Relaxed));
        }
    }

    /// Stop every worker and wait for its thread (blocking): call once
    /// their connections are drained.
    pub fn stop_and_join(&self) {
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for (stop, thread) in threads {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Without a join: a gateway dropped without `shutdown` must not
        // block its caller. The threads end on their own.
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for (stop, _) in threads {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_go_round_robin_and_run_on_their_worker() {
        let workers = Workers::start(2).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (tx, rx) = oneshot::channel();
            workers.spawn(async move {
                let _ = tx.send(current());
            });
            seen.push(rx.await.unwrap());
        }
        assert_eq!(seen, [Some(0), Some(1), Some(0), Some(1)]);
        let mut text = String::new();
        workers.render(&mut text);
        assert!(
            text.contains("llmproxy_worker_connections_total{worker=\"1\"} 2"),
            "{text}"
        );
        assert_eq!(current(), None, "not a worker thread");
        tokio::task::spawn_blocking(move || workers.stop_and_join())
            .await
            .unwrap();
    }
}
