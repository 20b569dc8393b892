//! The per-VM time limit.
//!
//! A call pays nothing for its deadline while it runs within it: no hook is
//! set, so the interpreter runs at full speed and the JIT compiler, where
//! it may stay on ([`super::jit`]), compiles loops as usual. The process's
//! deadline timer ([`super::timer`]) looks at the armed watchdogs when a
//! deadline can have passed; once a call's has, it sets a count hook of 1 on
//! the VM (`lua_sethook` may be called from another thread). The next VM
//! instruction, or the next iteration of a compiled loop in a LuaJIT built
//! with `LUAJIT_ENABLE_CHECKHOOK`, enters [`on_hook`], which raises the
//! timeout error; the hook stays set, so every later instruction raises
//! again, and the sandbox `pcall`/`xpcall` re-raise: no script can swallow
//! its own timeout. A hook left over from a call that ended just before the
//! timer reached it removes itself. See `docs/adr/045-deadline-watchdog.md`.
//!
//! An inline budget ([`Watchdog::arm_budget`], `crate::inline`) limits the
//! time a call keeps its thread busy, and a thread the scheduler took away
//! is not busy with the script: stopping a fast call its worker was
//! preempted in cost a whole re-run elsewhere and the VM (a stopped VM is
//! discarded, and the next one compiles its traces again). So a budgeted
//! call's deadline is a point to look, not to stop: the timer samples the
//! thread's CPU clock there and again half a budget later, and stops the
//! call only when the thread ran for at least half of that time; otherwise
//! it looks again later, up to the call's own time limit.

use std::ffi::c_void;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mlua::ffi;

use super::timer::{self, Timer};

const DISARMED: u64 = u64::MAX;

/// No thread CPU clock: the call's deadline is a wall-clock deadline.
const NO_CLOCK: i64 = i64::MIN;

/// No CPU sample taken yet for the budgeted call.
const UNSAMPLED: u64 = u64::MAX;

/// The clock every deadline is measured on.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
pub(super) fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(DISARMED - 1)
}

/// The main state of a VM, for the timer thread. Null once the VM is gone.
struct StatePtr(*mut ffi::lua_State);

/// Prints whether the state is open, nothing of the pointer.
impl std::fmt::Debug for StatePtr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_null() { "closed" } else { "open" })
    }
}

// SAFETY: the pointer is only used under the watchdog's mutex, for
// `lua_sethook`, which LuaJIT allows from any thread at any time
// (lj_dispatch.c: "can be called asynchronously"). It is nulled (under the
// same mutex) before the state is closed ([`Watchdog::release`]).
unsafe impl Send for StatePtr {}

/// Deadline state shared between a VM, its hook and the deadline timer.
#[derive(Debug)]
pub(crate) struct Watchdog {
    deadline_ns: AtomicU64,
    limit_ms: AtomicU64,
    /// A budgeted call's CPU clock: the calling thread's
    /// (`pthread_getcpuclockid`), or [`NO_CLOCK`].
    cpu_clock: AtomicI64,
    /// A budgeted call: half its budget, the interval between two looks.
    look_ns: AtomicU64,
    /// A budgeted call: its own time limit, past which it stops anyway.
    hard_deadline_ns: AtomicU64,
    /// A budgeted call: the thread's CPU time at the timer's last look
    /// ([`UNSAMPLED`] before the first), and when that was.
    cpu_seen_ns: AtomicU64,
    wall_seen_ns: AtomicU64,
    /// The deadline of the budgeted call the timer decided to stop: the
    /// call's own thread fires when its deadline is still this one (so a
    /// decision about a call that has ended never reaches the next).
    stop_ns: AtomicU64,
    fired: AtomicBool,
    memory: AtomicBool,
    state: Mutex<StatePtr>,
    timer: &'static Timer,
    /// The fork generation the timer belongs to ([`timer::fork_generation`]).
    fork_generation: u64,
}

impl Watchdog {
    /// A watchdog watched by this process's deadline timer, not yet tied to
    /// a state ([`Watchdog::install`]). Fails only if the timer thread
    /// cannot be started.
    pub fn new() -> std::io::Result<Arc<Self>> {
        let (timer, fork_generation) = timer::current()?;
        Self::watched_by(timer, fork_generation)
    }

    /// A watchdog watched by `timer`.
    fn watched_by(timer: &'static Timer, fork_generation: u64) -> std::io::Result<Arc<Self>> {
        let watchdog = Arc::new(Watchdog {
            deadline_ns: AtomicU64::new(DISARMED),
            limit_ms: AtomicU64::new(0),
            cpu_clock: AtomicI64::new(NO_CLOCK),
            look_ns: AtomicU64::new(0),
            hard_deadline_ns: AtomicU64::new(DISARMED),
            cpu_seen_ns: AtomicU64::new(UNSAMPLED),
            wall_seen_ns: AtomicU64::new(0),
            stop_ns: AtomicU64::new(DISARMED),
            fired: AtomicBool::new(false),
            memory: AtomicBool::new(false),
            state: Mutex::new(StatePtr(std::ptr::null_mut())),
            timer,
            fork_generation,
        });
        timer.watch(&watchdog)?;
        Ok(watchdog)
    }

    /// Tie this watchdog to `lua`: the hook finds it in the registry, and
    /// the timer may interrupt the state. `self` must outlive `lua`'s
    /// state (the sandbox state holds the `Arc`), and
    /// [`Watchdog::release`] must run before the state is closed.
    pub fn install(self: &Arc<Self>, lua: &mlua::Lua) {
        let me = Arc::as_ptr(self).cast_mut().cast::<c_void>();
        let main = lua.exec_raw_lua(|raw| {
            let state = raw.state();
            // SAFETY: mlua's lock is held and we are not inside a callback,
            // so `state` is the main state, valid until the `Lua` is
            // dropped. Pushing a light userdata and a key and `rawset` on
            // the registry allocate at most one table slot, before any
            // memory limit is set; the stack is left as it was.
            unsafe {
                if ffi::lua_checkstack(state, 2) != 0 {
                    ffi::lua_pushlightuserdata(state, registry_key());
                    ffi::lua_pushlightuserdata(state, me);
                    ffi::lua_rawset(state, ffi::LUA_REGISTRYINDEX);
                }
            }
            state
        });
        *timer::lock(&self.state) = StatePtr(main);
    }

    /// Stop the timer from touching the state, and let the timer stop if
    /// this was the last VM: called once, before the state is closed.
    pub fn release(&self) {
        *timer::lock(&self.state) = StatePtr(std::ptr::null_mut());
        self.timer.release();
    }

    /// Whether this watchdog's timer runs in this process (it does not in
    /// a child forked after the VM was built: such a VM must not run).
    pub fn timer_alive(&self) -> bool {
        self.fork_generation == timer::fork_generation()
    }

    /// Start a call that may run for `timeout`.
    pub fn arm(&self, timeout: Duration) {
        self.cpu_clock.store(NO_CLOCK, Ordering::Relaxed);
        self.set_deadline(now_ns(), timeout, timeout);
    }

    /// Start a call that may keep its thread busy for `budget` (the
    /// calling thread's CPU time, looked at by the timer from `budget / 2`
    /// on: see the module's doc) and may last `timeout` in all.
    pub fn arm_budget(&self, budget: Duration, timeout: Duration) {
        let now = now_ns();
        let look = duration_ns(budget) / 2;
        self.cpu_clock.store(thread_cpu_clock(), Ordering::Relaxed);
        self.look_ns.store(look, Ordering::Relaxed);
        self.hard_deadline_ns
            .store(now.saturating_add(duration_ns(timeout)), Ordering::Relaxed);
        self.cpu_seen_ns.store(UNSAMPLED, Ordering::Relaxed);
        self.set_deadline(now, Duration::from_nanos(look), budget);
    }

    fn set_deadline(&self, now: u64, after: Duration, limit: Duration) {
        let deadline = now.saturating_add(duration_ns(after));
        self.limit_ms
            .store(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        // Sequentially consistent with the timer's parking (see `Timer`).
        let deadline = deadline.min(DISARMED - 1);
        self.deadline_ns.store(deadline, Ordering::SeqCst);
        self.timer.armed(now, deadline);
    }

    /// End a call. A fired watchdog stays fired (the VM is then discarded).
    pub fn disarm(&self) {
        self.deadline_ns.store(DISARMED, Ordering::Relaxed);
    }

    /// The armed call's deadline, `None` when no call is armed (seen by
    /// the timer).
    pub(super) fn armed_deadline(&self) -> Option<u64> {
        let deadline = self.deadline_ns.load(Ordering::SeqCst);
        (deadline != DISARMED).then_some(deadline)
    }

    /// Whether the call is past its deadline, or the watchdog has fired;
    /// marks it fired in the first case.
    fn overran(&self) -> bool {
        if self.fired.load(Ordering::Relaxed) {
            return true;
        }
        let deadline = self.deadline_ns.load(Ordering::Relaxed);
        if deadline == DISARMED {
            return false;
        }
        let over = if self.cpu_clock.load(Ordering::Relaxed) == NO_CLOCK {
            now_ns() > deadline
        } else {
            // A budgeted call: the timer decides (it looked at the CPU
            // clock), or its own time limit passed.
            self.stop_ns.load(Ordering::Relaxed) == deadline || now_ns() > self.hard_deadline_ns.load(Ordering::Relaxed)
        };
        if over {
            self.fired.store(true, Ordering::Relaxed);
        }
        over
    }

    /// The timer at a budgeted call's deadline `deadline` (`now` is past
    /// it): `true` to leave the call running (a later look is set, or the
    /// call is no longer the one looked at), `false` to stop it. The call
    /// runs on while its thread has not been running for half the time
    /// since the last look, or at the first look.
    fn look_again(&self, deadline: u64, now: u64) -> bool {
        let clock = self.cpu_clock.load(Ordering::Relaxed);
        if clock == NO_CLOCK || now > self.hard_deadline_ns.load(Ordering::Relaxed) {
            return false;
        }
        // A clock that cannot be read (the thread is gone): stop.
        let Some(cpu) = thread_cpu_ns(clock) else { return false };
        // Should a new call have armed since `deadline` was read, these are
        // its first samples, which can only make its first look a stop:
        // what a call with no looks gets.
        let seen = self.cpu_seen_ns.swap(cpu, Ordering::Relaxed);
        let seen_at = self.wall_seen_ns.swap(now, Ordering::Relaxed);
        if seen != UNSAMPLED && cpu.saturating_sub(seen).saturating_mul(2) >= now.saturating_sub(seen_at) {
            return false;
        }
        let later = now
            .saturating_add(self.look_ns.load(Ordering::Relaxed))
            .min(DISARMED - 1);
        // Moved only if it is still this call's deadline; else the call
        // ended (or another began) and is left alone either way.
        let _ = self
            .deadline_ns
            .compare_exchange(deadline, later, Ordering::SeqCst, Ordering::Relaxed);
        true
    }

    /// Called by the timer thread: if the armed call is past its deadline,
    /// set the hook that stops it. Repeated every tick until the call ends,
    /// so a hook lost to a race with [`on_hook`] removing a stale one is
    /// set again.
    pub(super) fn interrupt_if_overdue(&self, now: u64) {
        let deadline = self.deadline_ns.load(Ordering::SeqCst);
        if deadline == DISARMED || now <= deadline {
            return;
        }
        // A budgeted call is looked at until the timer decides to stop it;
        // then, as any call, interrupted every tick until it ends.
        if self.cpu_clock.load(Ordering::Relaxed) != NO_CLOCK && self.stop_ns.load(Ordering::Relaxed) != deadline {
            if self.look_again(deadline, now) {
                return;
            }
            self.stop_ns.store(deadline, Ordering::Relaxed);
        }
        let slot = timer::lock(&self.state);
        let state = slot.0;
        if !state.is_null() {
            // SAFETY: see `StatePtr`: the state is open while the pointer
            // is set, and `lua_sethook` is safe to call from another thread.
            // Cleared first: `lua_sethook` rewrites LuaJIT's dispatch table
            // only when its recorded mode changes, and an update racing on
            // the VM's thread (a trace starting or stopping, a stale hook
            // removing itself) can leave the table behind the mode. Going
            // through the hookless mode rewrites the whole table each tick.
            unsafe {
                ffi::lua_sethook(state, None, 0, 0);
                ffi::lua_sethook(state, Some(on_hook), ffi::LUA_MASKCOUNT, 1);
            }
        }
    }

    /// Called by helpers that run long outside the interpreter: an error
    /// once the deadline has passed, and on every call after that.
    pub fn check(&self) -> mlua::Result<()> {
        if self.overran() {
            return Err(mlua::Error::runtime(self.message().as_str()));
        }
        Ok(())
    }

    fn message(&self) -> Message {
        let mut m = Message::default();
        // Cannot fail: the text fits the buffer.
        let _ = write!(
            m,
            "script exceeded its time limit of {} ms",
            self.limit_ms.load(Ordering::Relaxed)
        );
        m
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

pub(super) fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(DISARMED)
}

/// The calling thread's CPU clock, or [`NO_CLOCK`].
fn thread_cpu_clock() -> i64 {
    thread_local! {
        static CLOCK: i64 = {
            let mut id: libc::clockid_t = 0;
            // SAFETY: `id` is valid for writes; `pthread_self` is this thread.
            match unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) } {
                0 => i64::from(id),
                _ => NO_CLOCK,
            }
        };
    }
    CLOCK.with(|c| *c)
}

/// The CPU time (ns) on `clock` (a thread's, from [`thread_cpu_clock`]);
/// `None` when it cannot be read.
fn thread_cpu_ns(clock: i64) -> Option<u64> {
    cpu_time_ns(libc::clockid_t::try_from(clock).ok()?)
}

/// The time (ns) on the CPU-time clock `id` (`CLOCK_THREAD_CPUTIME_ID`
/// for the calling thread's); `None` when it cannot be read.
pub(crate) fn cpu_time_ns(id: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    if unsafe { libc::clock_gettime(id, &mut ts) } != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// The registry key of a state's watchdog: an address no one else uses.
fn registry_key() -> *mut c_void {
    static KEY: u8 = 0;
    std::ptr::addr_of!(KEY).cast_mut().cast()
}

/// The timeout message, built without the heap: [`on_hook`] raises a Lua
/// error, which unwinds its frame without running destructors.
struct Message {
    bytes: [u8; 96],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message { bytes: [0; 96], len: 0 }
    }
}

impl Message {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("script exceeded its time limit")
    }
}

impl std::fmt::Write for Message {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.bytes.len() {
            return Err(std::fmt::Error);
        }
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// The count hook the timer sets on an overdue VM.
///
/// Raises the timeout error when the VM's call is past its deadline (the
/// hook then stays set), and removes itself otherwise (set for a call that
/// has ended since). Nothing on this frame owns a destructor: `lua_error`
/// unwinds it.
unsafe extern "C-unwind" fn on_hook(state: *mut ffi::lua_State, _ar: *mut ffi::lua_Debug) {
    // SAFETY: LuaJIT calls hooks with at least LUA_MINSTACK free slots; the
    // registry read allocates nothing. The pointer was stored by `install`
    // and the `Arc` it points into outlives the state.
    unsafe {
        ffi::lua_pushlightuserdata(state, registry_key());
        ffi::lua_rawget(state, ffi::LUA_REGISTRYINDEX);
        let watchdog = ffi::lua_touserdata(state, -1).cast::<Watchdog>().cast_const();
        ffi::lua_pop(state, 1);
        let Some(watchdog) = watchdog.as_ref().filter(|w| w.overran()) else {
            ffi::lua_sethook(state, None, 0, 0);
            return;
        };
        let message = watchdog.message();
        ffi::lua_pushlstring(state, message.bytes.as_ptr().cast(), message.len);
        ffi::lua_error(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain state, interpreted: these tests are about the hook, the JIT
    /// compiler's part is `jit.rs`'s.
    fn interpreted() -> mlua::Lua {
        let lua = mlua::Lua::new();
        lua.load("jit.off()").exec().expect("jit.off");
        lua
    }

    /// Whether `lua` has a count hook set.
    fn count_hook_set(lua: &mlua::Lua) -> bool {
        // SAFETY: the main state of `lua`, on this thread.
        let mask = lua.exec_raw_lua(|raw| unsafe { ffi::lua_gethookmask(raw.state()) });
        mask & ffi::LUA_MASKCOUNT != 0
    }

    #[test]
    fn a_call_within_its_deadline_sets_no_hook() {
        let lua = interpreted();
        let dog = Watchdog::new().expect("timer");
        dog.install(&lua);
        dog.arm(Duration::from_secs(5));
        let n: i64 = lua
            .load("local n = 0 for i = 1, 1e5 do n = n + i end return n")
            .eval()
            .expect("runs");
        dog.disarm();
        assert_eq!(n, 5_000_050_000);
        assert!(!count_hook_set(&lua), "no hook while within the deadline");
        dog.release();
    }

    #[test]
    fn an_overdue_loop_is_stopped_and_stays_stopped() {
        let lua = interpreted();
        let dog = Watchdog::new().expect("timer");
        dog.install(&lua);
        dog.arm(Duration::from_millis(5));
        let started = Instant::now();
        let err = lua
            .load("local ok, e = pcall(function() while true do end end) while true do end")
            .exec()
            .expect_err("stopped");
        assert!(err.to_string().contains("time limit of 5 ms"), "{err}");
        assert!(dog.fired());
        assert!(started.elapsed() < Duration::from_secs(5));
        dog.disarm();
        assert!(dog.check().is_err(), "a fired watchdog stays fired");
        dog.release();
    }

    /// `lua` with `sleep(ms)`: the thread waits off the CPU, as a worker
    /// the scheduler preempted does.
    fn with_sleep(lua: &mlua::Lua) {
        let sleep = lua
            .create_function(|_, ms: u64| {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(())
            })
            .expect("sleep");
        lua.globals().set("sleep", sleep).expect("set sleep");
    }

    #[test]
    fn a_budgeted_call_whose_thread_waits_is_not_stopped_at_its_budget() {
        let lua = interpreted();
        with_sleep(&lua);
        let dog = Watchdog::new().expect("timer");
        dog.install(&lua);
        dog.arm_budget(Duration::from_millis(2), Duration::from_secs(5));
        // Ten budgets of waiting, then a little work: the thread never ran
        // for half of any interval the timer looked at.
        let n: i64 = lua
            .load("sleep(20) local n = 0 for i = 1, 1000 do n = n + i end return n")
            .eval()
            .expect("not stopped");
        dog.disarm();
        assert_eq!(n, 500_500);
        assert!(!dog.fired());
        dog.release();
    }

    #[test]
    fn a_budgeted_call_that_runs_is_stopped_and_one_that_waits_stops_at_its_time_limit() {
        for (script, timeout) in [
            ("while true do end", Duration::from_secs(5)),
            ("while true do sleep(2) end", Duration::from_millis(30)),
        ] {
            let lua = interpreted();
            with_sleep(&lua);
            let dog = Watchdog::new().expect("timer");
            dog.install(&lua);
            dog.arm_budget(Duration::from_millis(2), timeout);
            let started = Instant::now();
            let err = lua.load(script).exec().expect_err("stopped");
            dog.disarm();
            assert!(err.to_string().contains("time limit of 2 ms"), "{script}: {err}");
            assert!(dog.fired(), "{script}");
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "{script}: {:?}",
                started.elapsed()
            );
            dog.release();
        }
    }

    /// A watchdog on a timer of its own: the process's is shared with
    /// every other test.
    fn own_timer() -> (&'static Timer, Arc<Watchdog>) {
        let timer = Timer::leaked(timer::fork_generation());
        let dog = Watchdog::watched_by(timer, timer::fork_generation()).expect("timer");
        (timer, dog)
    }

    #[test]
    fn calls_that_may_run_long_do_not_wake_the_timer_every_tick() {
        let (timer, dog) = own_timer();
        let started = Instant::now();
        let before = timer.scans();
        // 200 ms of back-to-back calls, each allowed 100 ms.
        while started.elapsed() < Duration::from_millis(200) {
            dog.arm(Duration::from_millis(100));
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_micros(50) {}
            dog.disarm();
        }
        let scans = timer.scans() - before;
        // A fixed tick of 1 ms looked ~200 times.
        assert!(scans <= 10, "{scans} scans in 200 ms");
        dog.release();
    }

    #[test]
    fn a_call_is_stopped_on_time_after_the_timer_parked_or_slept_for_longer_calls() {
        // A new timer with nothing armed parks at once; then it sleeps for
        // the 5 s span of the first call, which a 5 ms call must cut short.
        let (_, dog) = own_timer();
        let lua = interpreted();
        dog.install(&lua);
        std::thread::sleep(Duration::from_millis(20));
        dog.arm(Duration::from_secs(5));
        let n: i64 = lua.load("return 1 + 1").eval().expect("runs");
        dog.disarm();
        assert_eq!(n, 2);
        std::thread::sleep(Duration::from_millis(20));
        dog.arm(Duration::from_millis(5));
        let started = Instant::now();
        let err = lua.load("while true do end").exec().expect_err("stopped");
        dog.disarm();
        assert!(err.to_string().contains("time limit of 5 ms"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        dog.release();
    }

    #[test]
    fn a_stale_hook_removes_itself() {
        let lua = interpreted();
        let dog = Watchdog::new().expect("timer");
        dog.install(&lua);
        lua.exec_raw_lua(|raw| {
            // SAFETY: the main state of `lua`, on this thread.
            unsafe { ffi::lua_sethook(raw.state(), Some(on_hook), ffi::LUA_MASKCOUNT, 1) };
        });
        let n: i64 = lua.load("return 1 + 1").eval().expect("runs");
        assert_eq!(n, 2);
        assert!(!count_hook_set(&lua));
        assert!(!dog.fired());
        dog.release();
    }
}
