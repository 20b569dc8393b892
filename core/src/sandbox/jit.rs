//! Whether sandbox VMs keep LuaJIT's JIT compiler on.
//!
//! A compiled loop checks for hooks only in a LuaJIT built with
//! `LUAJIT_ENABLE_CHECKHOOK`: elsewhere the deadline timer's hook would
//! wait for the loop to leave its trace, which an endless loop never does.
//! The vendored LuaJIT is built with the flag (`.cargo/config.toml`), but a
//! flag can be lost (a `CFLAGS` of the builder's own replaces ours), so the
//! answer comes from trying once per process: a compiled loop under a 2 ms
//! deadline must be stopped by the watchdog. Module builds run on the host's
//! LuaJIT (Debian's and OpenResty's are built without the flag) and keep
//! the JIT compiler off without trying. An operator can turn it off
//! anywhere with `LLMPROXY_SANDBOX_JIT=off` in the environment. See
//! `docs/adr/045-deadline-watchdog.md`.

use std::sync::OnceLock;
use std::time::Duration;

use super::watchdog::Watchdog;

/// Iterations of the probe's loop: a tenth of a second or more compiled.
const ITERATIONS: f64 = 4e8;

/// The environment variable that turns the JIT compiler off for sandbox
/// VMs (`off`); read once per process.
pub const ENV_VAR: &str = "LLMPROXY_SANDBOX_JIT";

/// Whether sandbox VMs run with the JIT compiler on in this process: the
/// vendored LuaJIT, compiled loops interruptible, and not turned off by
/// [`ENV_VAR`].
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        if !cfg!(feature = "vendored") || std::env::var(ENV_VAR).is_ok_and(|v| v == "off") {
            return false;
        }
        let interruptible = compiled_loops_interruptible();
        if !interruptible {
            tracing::warn!(
                "LuaJIT was built without LUAJIT_ENABLE_CHECKHOOK: compiled loops cannot be \
                 interrupted, so sandboxed scripts run interpreted"
            );
        }
        interruptible
    })
}

/// Run a loop the JIT compiler turns into one trace within its first
/// hundred iterations under a 2 ms deadline: `true` if the watchdog stopped
/// it inside the loop. The global `reached` says how far it got: a LuaJIT
/// without the flag runs the trace to its end and stops at the next
/// interpreted instruction, after the loop.
fn compiled_loops_interruptible() -> bool {
    let Ok(lua) = mlua::Lua::new_with(mlua::StdLib::JIT, mlua::LuaOptions::new()) else {
        return false;
    };
    if !lua.load("return (jit.status())").eval::<bool>().unwrap_or(false) {
        return false;
    }
    let Ok(watchdog) = Watchdog::new() else { return false };
    watchdog.install(&lua);
    watchdog.arm(Duration::from_millis(2));
    let probe = format!("local x = 0 for i = 1, {ITERATIONS} do x = x + i reached = i end return x");
    let stopped = lua.load(probe).exec().is_err();
    watchdog.disarm();
    watchdog.release();
    let reached = lua.globals().raw_get::<f64>("reached").unwrap_or(ITERATIONS);
    stopped && watchdog.fired() && reached < ITERATIONS
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(feature = "vendored")]
    fn the_vendored_luajit_interrupts_compiled_loops() {
        assert!(
            super::compiled_loops_interruptible(),
            "the vendored LuaJIT must be built with LUAJIT_ENABLE_CHECKHOOK (.cargo/config.toml)"
        );
        assert!(super::enabled());
    }
}
