//! A bounded pool of sandboxed VMs, safe to use from many threads.
//!
//! A call checks a VM out, runs, and checks it back in. A VM that hit a
//! limit (timeout, memory) or whose call panicked is dropped, never reused;
//! a VM is also replaced after `recycle_after_calls` calls or when its heap
//! stays above `recycle_memory_mb` after a full collection. When every VM is
//! busy a caller waits up to `checkout_timeout_ms`, then fails with an
//! `internal` error rather than queueing without bound. A thread gets back
//! the VM it used last when that one is idle.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::PoolConfig;
use crate::error::{ErrorKind, HookError};
use crate::vm::Vm;

/// Counters a host can export as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Most VMs the pool keeps alive at once.
    pub capacity: usize,
    /// VMs alive (idle + busy).
    pub alive: usize,
    /// VMs idle in the pool.
    pub idle: usize,
    /// VMs created since the pool was built.
    pub created: u64,
    /// VMs dropped after hitting a limit or a panic.
    pub discarded: u64,
    /// VMs dropped because of age or memory.
    pub recycled: u64,
}

struct Inner {
    /// Boxed, as `PooledVm` holds them: a checkout and a checkin move a
    /// pointer, not the whole `Vm`.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<Vm>>,
    stats: PoolStats,
    /// Callers blocked in `checkout`: a checkin wakes one only if there is
    /// one (a futex wake per call was a syscall per hook call).
    waiters: usize,
}

/// The pool. Owned by an [`crate::Engine`].
pub struct Pool {
    inner: Mutex<Inner>,
    freed: Condvar,
    max: usize,
    config: PoolConfig,
}

impl Pool {
    /// A pool with the given settings (`size` 0 means two VMs per CPU).
    pub fn new(config: PoolConfig) -> Pool {
        let max = if config.size == 0 {
            std::thread::available_parallelism().map_or(4, |n| n.get() * 2)
        } else {
            config.size
        };
        Pool {
            inner: Mutex::new(Inner {
                idle: Vec::new(),
                stats: PoolStats::default(),
                waiters: 0,
            }),
            freed: Condvar::new(),
            max,
            config,
        }
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            capacity: self.max,
            idle: inner.idle.len(),
            ..inner.stats
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave `Inner` inconsistent
        // (every update is a single assignment), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a VM, creating one if the pool is below capacity, else waiting.
    pub(crate) fn checkout(&self) -> Result<PooledVm<'_>, HookError> {
        let mut inner = self.lock();
        // Read the clock only when the pool is exhausted.
        let mut deadline = None;
        loop {
            inner = match self.take(inner) {
                Ok(taken) => return taken,
                Err(inner) => inner,
            };
            let now = Instant::now();
            let deadline = *deadline.get_or_insert(now + Duration::from_millis(self.config.checkout_timeout_ms));
            if now >= deadline {
                return Err(HookError::new(
                    ErrorKind::Internal,
                    format!(
                        "all {} script VMs are busy (waited {} ms)",
                        self.max, self.config.checkout_timeout_ms
                    ),
                ));
            }
            inner.waiters += 1;
            inner = self
                .freed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            inner.waiters -= 1;
        }
    }

    /// Take an idle VM, or create one if the pool is below capacity;
    /// `None` rather than waiting (a caller that must not block: an inline
    /// call, `crate::inline`).
    pub(crate) fn try_checkout(&self) -> Option<PooledVm<'_>> {
        self.take(self.lock()).ok().and_then(Result::ok)
    }

    /// An idle VM, or a new one (`Err` when it cannot be built) when the
    /// pool is below capacity; the lock back when neither is possible now.
    #[allow(clippy::type_complexity)]
    fn take<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
    ) -> Result<Result<PooledVm<'a>, HookError>, MutexGuard<'a, Inner>> {
        let me = thread_tag();
        let pooled = |mut vm: Box<Vm>| {
            vm.thread = me;
            PooledVm {
                pool: self,
                vm: Some(vm),
                healthy: false,
            }
        };
        // The VM this thread used last goes first, if idle: its heap is
        // likely still in this core's caches, while a VM handed from one of
        // the gateway's workers to the other misses them on every call (the
        // four-hook gateway used ~13% less CPU per request with this order;
        // docs/benchmarks.md).
        if let Some(i) = inner.idle.iter().rposition(|vm| vm.thread == me) {
            let top = inner.idle.len() - 1;
            inner.idle.swap(i, top);
        }
        while let Some(vm) = inner.idle.pop() {
            if vm.watched() {
                return Ok(Ok(pooled(vm)));
            }
            // Built before this process was forked.
            inner.stats.alive -= 1;
            inner.stats.discarded += 1;
        }
        if inner.stats.alive >= self.max {
            return Err(inner);
        }
        inner.stats.alive += 1;
        inner.stats.created += 1;
        drop(inner);
        Ok(Vm::new().map(Box::new).map(pooled).inspect_err(|_| {
            let mut inner = self.lock();
            inner.stats.alive -= 1;
            self.wake_one(&inner);
        }))
    }

    /// Wake one caller blocked in `checkout`, if any (called with the lock).
    fn wake_one(&self, inner: &Inner) {
        if inner.waiters > 0 {
            self.freed.notify_one();
        }
    }

    fn checkin(&self, vm: Box<Vm>, healthy: bool) {
        let mut keep = healthy && !vm.poisoned();
        let mut recycled = false;
        if keep && vm.calls >= self.config.recycle_after_calls {
            keep = false;
            recycled = true;
        }
        let limit = usize::try_from(self.config.recycle_memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        if keep && vm.used_memory() > limit / 2 {
            vm.collect();
            if vm.used_memory() > limit {
                keep = false;
                recycled = true;
            }
        }
        let mut inner = self.lock();
        if keep {
            inner.idle.push(vm);
            self.wake_one(&inner);
        } else {
            inner.stats.alive -= 1;
            if recycled {
                inner.stats.recycled += 1;
            } else {
                inner.stats.discarded += 1;
            }
            // A waiter may now create a VM in its place.
            self.wake_one(&inner);
            drop(inner);
            drop(vm);
        }
    }
}

/// A checked-out VM; goes back to the pool when dropped, and is discarded
/// unless the call marked it healthy (so a panic mid-call discards it).
pub(crate) struct PooledVm<'a> {
    pool: &'a Pool,
    /// Boxed: a `Vm` is a few hundred bytes, moved in and out of the idle
    /// list on every call.
    vm: Option<Box<Vm>>,
    healthy: bool,
}

impl PooledVm<'_> {
    /// The VM.
    pub fn vm(&mut self) -> &mut Vm {
        // `vm` is only taken in `drop`.
        self.vm.as_mut().expect("PooledVm used after drop")
    }

    /// Mark the call as finished without a host-side failure.
    pub fn finish(&mut self) {
        self.healthy = true;
    }
}

impl Drop for PooledVm<'_> {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            self.pool.checkin(vm, self.healthy);
        }
    }
}

/// A number naming the calling thread, for [`Vm::thread`] (never 0, the
/// tag of a VM no thread has used).
fn thread_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// The address of a checked-out VM: which VM it is.
    fn id(vm: &mut PooledVm<'_>) -> usize {
        std::ptr::from_mut(vm.vm()) as usize
    }

    /// Check `vm` in as after a call that went well.
    fn check_in(mut vm: PooledVm<'_>) {
        vm.finish();
    }

    #[test]
    fn a_thread_gets_back_the_vm_it_used_last_while_that_one_is_idle() {
        let pool = Pool::new(PoolConfig {
            size: 2,
            ..PoolConfig::default()
        });
        // This thread and another each hold a VM; ours goes back first, so
        // the other thread's VM ends on top of the idle list.
        let mut mine = pool.checkout().expect("a VM");
        let my_vm = id(&mut mine);
        std::thread::scope(|s| {
            let (held, wait_held) = mpsc::channel();
            let (go, wait_go) = mpsc::channel();
            let pool = &pool;
            let other = s.spawn(move || {
                let mut theirs = pool.checkout().expect("a second VM");
                let their_vm = id(&mut theirs);
                held.send(()).expect("this thread listens");
                wait_go.recv().expect("this thread checked its VM in");
                check_in(theirs);
                their_vm
            });
            wait_held.recv().expect("the other thread holds its VM");
            check_in(mine);
            go.send(()).expect("the other thread waits");
            assert_ne!(other.join().expect("no panic"), my_vm);
        });
        let mut again = pool.checkout().expect("an idle VM");
        assert_eq!(id(&mut again), my_vm, "not the VM this thread used last");
        check_in(again);
        // A thread that used none takes the one on top; nothing new is built.
        std::thread::scope(|s| {
            s.spawn(|| check_in(pool.checkout().expect("an idle VM")));
        });
        assert_eq!(pool.stats().created, 2);
    }
}
