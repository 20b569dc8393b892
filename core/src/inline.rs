//! Hook calls tried on the caller's own thread under a short budget
//! (docs/adr/049-inline-hooks-with-a-budget.md).
//!
//! An async host runs a job of hook calls inside [`attempt`]: every call the
//! job makes on this thread then runs with its watchdog armed at the budget
//! (not the script's `timeout_ms`) and takes only an idle VM. When a call
//! passes the budget, or no VM is idle, the attempt is *overrun*: that call
//! and every later call of the job fail at once, nothing is logged or
//! counted for them, and [`attempt`] returns [`OverBudget`]. The host then
//! runs the same job where it may block (a hook thread) with the full
//! limits. This is sound because a hook call is a pure function of its
//! inputs: nothing a call writes reaches the next one.
//!
//! A budget counts the CPU time a call keeps its thread busy (the deadline
//! timer looks at the thread's CPU clock, `Watchdog::arm_budget`): a worker
//! the scheduler preempted mid-call is not stopped for the time it waited.
//! One overrun still proves little about the script (the same call may be
//! fast on the next input, or slow once while the JIT compiles). The call
//! that overran runs again where it may block, and there the CPU time it
//! takes is measured (its thread's, [`ThreadCpu`]): when that run also
//! spends more than the budget, the hook is slow and skips the inline
//! attempt for [`SLOW_PERIOD`] (per engine and hook). A script that is slow
//! on some inputs thus costs a worker about one budget per period; a fast
//! script preempted once costs one re-run. The re-run's wall time would
//! not tell: on a saturated machine the hook thread is preempted as the
//! worker was, every re-run looked slow, and fast hooks stayed off the
//! workers for good.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::hooks::HookName;

/// How long a hook that overran its budget stays on the hook threads.
pub const SLOW_PERIOD: Duration = Duration::from_secs(5);

/// The job could not finish inline: run it again where it may block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    /// The hook whose call stopped the attempt.
    pub hook: HookName,
    /// Why it stopped.
    pub reason: Overrun,
}

/// Why a hook call stopped an inline attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overrun {
    /// The call ran past the budget (and was stopped there).
    Budget,
    /// The hook overran within the last [`SLOW_PERIOD`]: not tried.
    SlowHook,
    /// No VM was idle: not tried (an inline call does not wait).
    NoIdleVm,
}

impl Overrun {
    /// Every reason, in a fixed order (metric labels).
    pub const ALL: [Overrun; 3] = [Overrun::Budget, Overrun::SlowHook, Overrun::NoIdleVm];

    /// The reason as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Overrun::Budget => "over_budget",
            Overrun::SlowHook => "slow_hook",
            Overrun::NoIdleVm => "no_idle_vm",
        }
    }
}

#[derive(Clone, Copy)]
struct Attempt {
    budget: Duration,
    overrun: Option<(HookName, Overrun)>,
}

thread_local! {
    static ATTEMPT: Cell<Option<Attempt>> = const { Cell::new(None) };
}

/// Run `job` with every hook call it makes on this thread under `budget`.
/// `Err` when a call overran: `job`'s own result is then meaningless and
/// dropped. Attempts do not nest: an inner one runs under the outer budget.
pub fn attempt<T>(budget: Duration, job: impl FnOnce() -> T) -> Result<T, OverBudget> {
    if ATTEMPT.with(Cell::get).is_some() {
        return Ok(job());
    }
    /// Clears the attempt even when `job` panics.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ATTEMPT.with(|a| a.set(None));
        }
    }
    ATTEMPT.with(|a| a.set(Some(Attempt { budget, overrun: None })));
    let reset = Reset;
    let value = job();
    let overrun = ATTEMPT.with(Cell::get).and_then(|a| a.overrun);
    drop(reset);
    match overrun {
        Some((hook, reason)) => Err(OverBudget { hook, reason }),
        None => Ok(value),
    }
}

/// The budget of the attempt running on this thread, if any and not yet
/// overrun. A call under a budget must not block (see the module docs).
pub(crate) fn budget() -> Option<Duration> {
    ATTEMPT
        .with(Cell::get)
        .filter(|a| a.overrun.is_none())
        .map(|a| a.budget)
}

/// Whether an attempt runs on this thread and has overrun: what a call
/// does now is thrown away, so it is neither logged nor counted.
pub fn overrun() -> bool {
    ATTEMPT.with(Cell::get).is_some_and(|a| a.overrun.is_some())
}

/// Mark the attempt on this thread as stopped by `hook`, for `reason`
/// (the first mark wins).
pub(crate) fn mark_overrun(hook: HookName, reason: Overrun) {
    ATTEMPT.with(|a| {
        if let Some(mut at) = a.get() {
            at.overrun.get_or_insert((hook, reason));
            a.set(Some(at));
        }
    });
}

/// The CPU time the calling thread has used: what a blocking re-run of a
/// call spent, whatever the scheduler did meanwhile.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThreadCpu(Duration);

impl ThreadCpu {
    /// The calling thread's CPU time now; `None` where the clock is missing.
    pub fn now() -> Option<ThreadCpu> {
        crate::sandbox::watchdog::cpu_time_ns(libc::CLOCK_THREAD_CPUTIME_ID)
            .map(|ns| ThreadCpu(Duration::from_nanos(ns)))
    }

    /// CPU time this thread spent since `self` (taken on the same thread).
    pub fn elapsed(self) -> Duration {
        ThreadCpu::now().map_or(Duration::ZERO, |now| now.0.saturating_sub(self.0))
    }
}

/// Per hook: whether it overran lately, and until when its calls skip the
/// inline attempt.
#[derive(Debug, Default)]
pub(crate) struct SlowHooks {
    /// The budget (µs) a call of the hook overran, until a blocking call
    /// of it shows whether the script itself is slow; 0 = none.
    suspect_us: [AtomicU64; 7],
    /// Milliseconds since [`epoch`] until which the hook is slow; 0 = never.
    until_ms: [AtomicU64; 7],
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl SlowHooks {
    /// A call of `hook` was stopped by `budget`.
    pub fn overran(&self, hook: HookName, budget: Duration) {
        let us = u64::try_from(budget.as_micros()).unwrap_or(u64::MAX).max(1);
        self.suspect_us[hook.index()].store(us, Ordering::Relaxed);
    }

    /// Whether a blocking call of `hook` should report its duration.
    pub fn is_suspect(&self, hook: HookName) -> bool {
        self.suspect_us[hook.index()].load(Ordering::Relaxed) != 0
    }

    /// A blocking call of a suspect `hook` spent `took` of CPU time: the
    /// hook is slow for [`SLOW_PERIOD`] when that is past the budget it
    /// overran.
    pub fn ran(&self, hook: HookName, took: Duration) {
        let budget_us = self.suspect_us[hook.index()].swap(0, Ordering::Relaxed);
        if budget_us != 0 && took.as_micros() >= u128::from(budget_us) {
            let until = now_ms().saturating_add(SLOW_PERIOD.as_millis() as u64);
            self.until_ms[hook.index()].store(until.max(1), Ordering::Relaxed);
        }
    }

    /// Whether `hook` proved slow within the last [`SLOW_PERIOD`].
    pub fn is_slow(&self, hook: HookName) -> bool {
        let until = self.until_ms[hook.index()].load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_reports_the_first_overrun_and_clears_itself() {
        let r = attempt(Duration::from_millis(1), || {
            assert!(budget().is_some());
            mark_overrun(HookName::Routing, Overrun::Budget);
            assert!(overrun() && budget().is_none());
            mark_overrun(HookName::Usage, Overrun::SlowHook);
            7
        });
        let first = OverBudget {
            hook: HookName::Routing,
            reason: Overrun::Budget,
        };
        assert_eq!(r, Err(first));
        assert!(!overrun() && budget().is_none());
        assert_eq!(attempt(Duration::from_millis(1), || 7), Ok(7));
    }

    #[test]
    fn a_panicking_job_leaves_no_attempt_behind() {
        let r = std::panic::catch_unwind(|| attempt(Duration::from_millis(1), || panic!("boom")));
        assert!(r.is_err());
        assert!(budget().is_none());
    }

    #[test]
    fn a_thread_waiting_spends_no_cpu_time() {
        // What a preempted re-run looks like: time passes, the thread does
        // not run.
        let start = ThreadCpu::now().expect("a thread CPU clock");
        std::thread::sleep(Duration::from_millis(60));
        assert!(start.elapsed() < Duration::from_millis(30), "{:?}", start.elapsed());
    }

    #[test]
    fn a_hook_is_slow_only_when_its_blocking_run_is_slow_too_and_for_the_period_only() {
        let slow = SlowHooks::default();
        let budget = Duration::from_millis(1);
        assert!(!slow.is_slow(HookName::Routing));
        // Preempted: the run that follows is fast.
        slow.overran(HookName::Routing, budget);
        assert!(slow.is_suspect(HookName::Routing) && !slow.is_slow(HookName::Routing));
        slow.ran(HookName::Routing, Duration::from_micros(30));
        assert!(!slow.is_suspect(HookName::Routing) && !slow.is_slow(HookName::Routing));
        // Slow: the run that follows is past the budget too.
        slow.overran(HookName::Routing, budget);
        slow.ran(HookName::Routing, Duration::from_millis(20));
        assert!(slow.is_slow(HookName::Routing));
        assert!(!slow.is_slow(HookName::Usage));
        slow.until_ms[HookName::Routing.index()].store(now_ms(), Ordering::Relaxed);
        assert!(!slow.is_slow(HookName::Routing));
    }
}
