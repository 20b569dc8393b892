//! The per-VM time limit.
//!
//! A count hook runs every [`HOOK_INTERVAL`] VM instructions and compares the
//! clock with the call's deadline. Count hooks never fire inside JIT-compiled
//! traces, which is why sandbox states run with the JIT engine off (see
//! `docs/adr/002-limits.md`). Once the deadline has passed the watchdog stays
//! fired: every later hook raises again, and the sandbox `pcall`/`xpcall`
//! re-raise, so no script can swallow its own timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// VM instructions between two deadline checks. At interpreter speed this is
/// a check every few microseconds, far below any useful timeout.
pub const HOOK_INTERVAL: u32 = 1000;

const DISARMED: u64 = u64::MAX;

/// Deadline state shared between a VM and its count hook.
#[derive(Debug)]
pub(crate) struct Watchdog {
    epoch: Instant,
    deadline_ns: AtomicU64,
    limit_ms: AtomicU64,
    fired: AtomicBool,
    memory: AtomicBool,
}

impl Watchdog {
    pub fn new() -> Self {
        Watchdog {
            epoch: Instant::now(),
            deadline_ns: AtomicU64::new(DISARMED),
            limit_ms: AtomicU64::new(0),
            fired: AtomicBool::new(false),
            memory: AtomicBool::new(false),
        }
    }

    /// Start a call that may run for `timeout`.
    pub fn arm(&self, timeout: Duration) {
        let deadline = self.epoch.elapsed().saturating_add(timeout).as_nanos();
        self.deadline_ns
            .store(u64::try_from(deadline).unwrap_or(DISARMED - 1), Ordering::Relaxed);
        self.limit_ms.store(
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// End a call. A fired watchdog stays fired (the VM is then discarded).
    pub fn disarm(&self) {
        self.deadline_ns.store(DISARMED, Ordering::Relaxed);
    }

    /// Called by the count hook: an error once the deadline has passed, and
    /// on every call after that.
    pub fn check(&self) -> mlua::Result<()> {
        if self.fired.load(Ordering::Relaxed) {
            return Err(self.timeout_error());
        }
        let deadline = self.deadline_ns.load(Ordering::Relaxed);
        if deadline != DISARMED && self.epoch.elapsed().as_nanos() > u128::from(deadline) {
            self.fired.store(true, Ordering::Relaxed);
            return Err(self.timeout_error());
        }
        Ok(())
    }

    fn timeout_error(&self) -> mlua::Error {
        mlua::Error::runtime(format!(
            "script exceeded its time limit of {} ms",
            self.limit_ms.load(Ordering::Relaxed)
        ))
    }

    /// Whether the time limit fired during this VM's life.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Relaxed)
    }

    /// Record that the memory limit was hit.
    pub fn set_memory_hit(&self) {
        self.memory.store(true, Ordering::Relaxed);
    }

    /// Whether the memory limit was hit during this VM's life.
    pub fn memory_hit(&self) -> bool {
        self.memory.load(Ordering::Relaxed)
    }
}
