//! The process's deadline timer: one thread that, while any call is armed,
//! wakes every [`TICK`] and interrupts the VMs whose call is past its
//! deadline ([`Watchdog::interrupt_if_overdue`]).
//!
//! Arming a call costs a clock read and two atomic operations; the timer is
//! never woken for it unless it has parked. It parks after [`IDLE_TICKS`]
//! ticks with nothing armed (a second of idleness), so an idle process
//! makes no wakeups, and a busy one a thousand a second, whatever its
//! request rate.
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

use super::watchdog::{now_ns, Watchdog};

/// How often the timer looks at armed calls: how late, at most, a call is
/// stopped after its deadline (plus the time to its next VM instruction).
pub const TICK: Duration = Duration::from_millis(1);

/// Ticks with nothing armed before the timer parks.
const IDLE_TICKS: u32 = 1000;

/// The timer of one process.
#[derive(Debug)]
pub(crate) struct Timer {
    fork_generation: u64,
    watched: Mutex<Vec<Weak<Watchdog>>>,
    /// Set by the timer before it sleeps without ticking; `arm` wakes it.
    /// Both sides use sequentially consistent operations (the timer stores
    /// `parked` then reads deadlines; `arm` stores a deadline then reads
    /// `parked`), so at least one of them sees the other.
    parked: AtomicBool,
    /// Set to end the thread (the last VM was released).
    stop: AtomicBool,
    wake_lock: Mutex<()>,
    wake: Condvar,
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
    let timer: &'static Timer = Box::leak(Box::new(Timer {
        fork_generation: generation,
        watched: Mutex::new(Vec::new()),
        parked: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        wake_lock: Mutex::new(()),
        wake: Condvar::new(),
        thread: Mutex::new(Running::default()),
    }));
    CURRENT.store(std::ptr::from_ref(timer).cast_mut(), Ordering::Release);
    Ok((timer, generation))
}

fn live(generation: u64) -> Option<&'static Timer> {
    // SAFETY: `CURRENT` only ever holds leaked, never freed timers.
    let timer = unsafe { CURRENT.load(Ordering::Acquire).as_ref() }?;
    (timer.fork_generation == generation).then_some(timer)
}

impl Timer {
    /// Watch `watchdog` until [`Timer::release`]; starts the thread if it
    /// is not running.
    pub fn watch(&'static self, watchdog: &Arc<Watchdog>) -> std::io::Result<()> {
        let mut running = lock(&self.thread);
        if running.handle.is_none() {
            self.stop.store(false, Ordering::SeqCst);
            self.parked.store(false, Ordering::SeqCst);
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
            self.parked.store(false, Ordering::SeqCst);
            self.notify();
            let _ = handle.join();
        }
    }

    /// Wake the timer if it parked (the first call after an idle second).
    pub fn wake_if_parked(&self) {
        if self.parked.load(Ordering::SeqCst) && self.parked.swap(false, Ordering::SeqCst) {
            self.notify();
        }
    }

    /// Wake the parked thread (after `parked` was cleared).
    fn notify(&self) {
        let _guard = lock(&self.wake_lock);
        self.wake.notify_one();
    }

    /// Interrupt every overdue call; `true` if any call is armed.
    fn scan(&self) -> bool {
        let now = now_ns();
        let mut any_armed = false;
        lock(&self.watched).retain(|weak| {
            let Some(watchdog) = weak.upgrade() else { return false };
            if watchdog.armed() {
                any_armed = true;
                watchdog.interrupt_if_overdue(now);
            }
            true
        });
        any_armed
    }

    fn run(&self) {
        let mut idle = 0;
        while !self.stop.load(Ordering::SeqCst) {
            if self.scan() {
                idle = 0;
            } else {
                idle += 1;
            }
            if idle >= IDLE_TICKS {
                self.parked.store(true, Ordering::SeqCst);
                if self.scan() {
                    // Armed between the last tick and parking.
                    self.parked.store(false, Ordering::SeqCst);
                } else {
                    let mut guard = lock(&self.wake_lock);
                    while self.parked.load(Ordering::SeqCst) {
                        guard = self.wake.wait(guard).unwrap_or_else(PoisonError::into_inner);
                    }
                }
                idle = 0;
                continue;
            }
            std::thread::sleep(TICK);
        }
    }
}

/// Lock a mutex whose data stays consistent through a panic (single
/// assignments and pushes).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
