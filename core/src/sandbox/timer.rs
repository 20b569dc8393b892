//! The process's deadline timer: one thread that interrupts the VMs whose
//! call is past its deadline ([`Watchdog::interrupt_if_overdue`]).
//!
//! It sleeps until the next moment a deadline can pass, not on a fixed
//! tick: the earliest deadline of the calls armed when it last looked, or,
//! for calls armed after that, the shortest time any call has been given
//! from arming to its deadline ([`Timer::armed`] keeps that minimum). So
//! every call armed while it sleeps has its deadline at or after the
//! wake-up, and arming never wakes the timer except to lower that minimum
//! or after the timer parked. It never sleeps less than [`TICK`]: a call is
//! stopped at most a tick after its deadline (plus the time to its next VM
//! instruction), and a busy process with short deadlines (the gateway's
//! inline budget) makes a thousand wake-ups a second, as a fixed tick did;
//! one whose calls may run 100 ms (the nginx module, a C host) makes ten.
//! With nothing armed for [`IDLE`] it parks until the next call.
//!
//! Arming a call costs a clock read and three atomic operations.
//!
//! The thread runs while any VM exists: it stops when the last one is
//! released (a C host that freed its engines keeps no thread of ours), and
//! starts again with the next.
//!
//! Threads do not survive `fork`: a child (an nginx worker forked from a
//! master that had built VMs) starts its own timer, and VMs built before
//! the fork are not reused in it ([`fork_generation`]).

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::watchdog::{duration_ns, now_ns, Watchdog};

/// The shortest sleep of the timer: how late, at most, a call is stopped
/// after its deadline (plus the time to its next VM instruction).
pub const TICK: Duration = Duration::from_millis(1);

/// How long the timer goes on looking with nothing armed before it parks.
const IDLE: Duration = Duration::from_secs(1);

/// [`Timer::wake_at_ns`] of a parked timer.
const PARKED: u64 = u64::MAX;

/// The timer of one process.
#[derive(Debug)]
pub(crate) struct Timer {
    fork_generation: u64,
    watched: Mutex<Vec<Weak<Watchdog>>>,
    /// When the sleeping timer looks next ([`PARKED`]: when woken). The
    /// timer stores it, then (before parking) reads the deadlines again; an
    /// arm stores its deadline, then reads it. Both sequentially
    /// consistent, so at least one side sees the other.
    wake_at_ns: AtomicU64,
    /// The shortest time from arming to deadline any call has had.
    min_span_ns: AtomicU64,
    /// Set to end the thread (the last VM was released).
    stop: AtomicBool,
    /// Whether a wake-up is pending: the timer looks again at once.
    wake_lock: Mutex<bool>,
    wake: Condvar,
    /// Times the timer looked at the armed calls.
    scans: AtomicU64,
    /// Watchdogs not yet released, and the thread while there are any.
    thread: Mutex<Running>,
}

/// See [`Timer::thread`].
#[derive(Debug, Default)]
struct Running {
    watchdogs: usize,
    handle: Option<JoinHandle<()>>,
}

static CURRENT: AtomicPtr<Timer> = AtomicPtr::new(std::ptr::null_mut());
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static START: Mutex<()> = Mutex::new(());

/// Incremented in a child process after every `fork`.
pub(crate) fn fork_generation() -> u64 {
    FORK_GENERATION.load(Ordering::Relaxed)
}

extern "C" fn after_fork_in_child() {
    // Async-signal-safe: one atomic add.
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// This process's timer (started on first use) and its fork generation.
pub(crate) fn current() -> std::io::Result<(&'static Timer, u64)> {
    static AT_FORK: Once = Once::new();
    AT_FORK.call_once(|| {
        // SAFETY: registers a handler that only does an atomic add.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
    let generation = fork_generation();
    if let Some(timer) = live(generation) {
        return Ok((timer, generation));
    }
    let _start = lock(&START);
    if let Some(timer) = live(generation) {
        return Ok((timer, generation));
    }
    // One timer per process life; the previous one (a parent's, whose thread
    // did not survive the fork) is left as it is: VMs may still point at it.
    let timer = Timer::leaked(generation);
    CURRENT.store(std::ptr::from_ref(timer).cast_mut(), Ordering::Release);
    Ok((timer, generation))
}

fn live(generation: u64) -> Option<&'static Timer> {
    // SAFETY: `CURRENT` only ever holds leaked, never freed timers.
    let timer = unsafe { CURRENT.load(Ordering::Acquire).as_ref() }?;
    (timer.fork_generation == generation).then_some(timer)
}

impl Timer {
    /// A new timer, never freed (VMs keep a `'static` reference to it).
    pub(super) fn leaked(fork_generation: u64) -> &'static Timer {
        Box::leak(Box::new(Timer {
            fork_generation,
            watched: Mutex::new(Vec::new()),
            wake_at_ns: AtomicU64::new(0),
            min_span_ns: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            wake_lock: Mutex::new(false),
            wake: Condvar::new(),
            scans: AtomicU64::new(0),
            thread: Mutex::new(Running::default()),
        }))
    }

    /// Watch `watchdog` until [`Timer::release`]; starts the thread if it
    /// is not running.
    pub fn watch(&'static self, watchdog: &Arc<Watchdog>) -> std::io::Result<()> {
        let mut running = lock(&self.thread);
        if running.handle.is_none() {
            self.stop.store(false, Ordering::SeqCst);
            self.wake_at_ns.store(0, Ordering::SeqCst);
            let handle = std::thread::Builder::new()
                .name("llmproxy-deadline".into())
                .spawn(move || self.run())?;
            running.handle = Some(handle);
        }
        running.watchdogs += 1;
        lock(&self.watched).push(Arc::downgrade(watchdog));
        Ok(())
    }

    /// A watchdog's VM is gone: the last one stops the thread (and waits
    /// for it, at most a tick). Never called on the timer's own thread.
    pub fn release(&self) {
        let mut running = lock(&self.thread);
        running.watchdogs = running.watchdogs.saturating_sub(1);
        // In a forked child the thread does not exist: nothing to stop.
        if running.watchdogs > 0 || self.fork_generation != fork_generation() {
            return;
        }
        if let Some(handle) = running.handle.take() {
            self.stop.store(true, Ordering::SeqCst);
            self.notify();
            let _ = handle.join();
        }
    }

    /// A call was armed at `now` with its deadline at `deadline` (already
    /// stored where [`Timer::scan`] reads it). Wakes the timer only where
    /// it could otherwise look more than a tick late: it parked, or this
    /// call has a shorter span than any before it (the timer may be asleep
    /// for a longer one, or about to be: its wake-up may have been worked
    /// out with the old minimum, so that case always wakes it; the minimum
    /// only falls, so this is rare).
    pub fn armed(&self, now: u64, deadline: u64) {
        let span = deadline.saturating_sub(now);
        let shorter = span < self.min_span_ns.load(Ordering::Relaxed);
        if shorter {
            self.min_span_ns.fetch_min(span, Ordering::Relaxed);
        }
        if shorter || self.wake_at_ns.load(Ordering::SeqCst) == PARKED {
            self.notify();
        }
    }

    /// Make the timer look at once.
    fn notify(&self) {
        *lock(&self.wake_lock) = true;
        self.wake.notify_one();
    }

    /// Times the timer looked at the armed calls.
    #[cfg(test)]
    pub(super) fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    /// Interrupt every overdue call; when to look next for the calls still
    /// armed (`None`: none is). An interrupted call is looked at again a
    /// tick later, until it ends (see [`Watchdog::interrupt_if_overdue`]).
    fn scan(&self) -> Option<u64> {
        self.scans.fetch_add(1, Ordering::Relaxed);
        let now = now_ns();
        let again = now.saturating_add(duration_ns(TICK));
        let mut next: Option<u64> = None;
        lock(&self.watched).retain(|weak| {
            let Some(watchdog) = weak.upgrade() else { return false };
            if watchdog.armed_deadline().is_some() {
                watchdog.interrupt_if_overdue(now);
                // Read after: a budgeted call's look may have moved it.
                if let Some(deadline) = watchdog.armed_deadline() {
                    let at = if deadline <= now { again } else { deadline };
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
            true
        });
        next
    }

    /// When to wake after a scan at `now` that found `next`; [`PARKED`]
    /// after [`IDLE`] with nothing armed, or while no call has ever been
    /// armed (no span is known yet: the first arm wakes the timer).
    fn wake_at(&self, now: u64, next: Option<u64>, idle_since: u64) -> u64 {
        if next.is_none() && now.saturating_sub(idle_since) >= duration_ns(IDLE) {
            return PARKED;
        }
        let span = self.min_span_ns.load(Ordering::Relaxed);
        let at = next.unwrap_or(u64::MAX).min(now.saturating_add(span));
        at.max(now.saturating_add(duration_ns(TICK)))
    }

    fn run(&self) {
        let mut idle_since = now_ns();
        while !self.stop.load(Ordering::SeqCst) {
            let next = self.scan();
            let now = now_ns();
            if next.is_some() {
                idle_since = now;
            }
            let mut wake_at = self.wake_at(now, next, idle_since);
            self.wake_at_ns.store(wake_at, Ordering::SeqCst);
            if wake_at == PARKED {
                // A call armed before it saw `PARKED` is seen here.
                if let Some(next) = self.scan() {
                    wake_at = self.wake_at(now_ns(), Some(next), idle_since);
                    self.wake_at_ns.store(wake_at, Ordering::SeqCst);
                }
            }
            self.sleep_until(wake_at);
        }
    }

    /// Sleep until `wake_at` (for ever if [`PARKED`]), a notification or
    /// the stop.
    fn sleep_until(&self, wake_at: u64) {
        let mut pending = lock(&self.wake_lock);
        loop {
            if std::mem::take(&mut *pending) || self.stop.load(Ordering::SeqCst) {
                return;
            }
            if wake_at == PARKED {
                pending = self.wake.wait(pending).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let now = now_ns();
            if now >= wake_at {
                return;
            }
            let (guard, _) = self
                .wake
                .wait_timeout(pending, Duration::from_nanos(wake_at - now))
                .unwrap_or_else(PoisonError::into_inner);
            pending = guard;
        }
    }
}

/// Lock a mutex whose data stays consistent through a panic (single
/// assignments and pushes).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
