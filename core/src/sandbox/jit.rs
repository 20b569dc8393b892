//! How much of a sandbox VM LuaJIT's JIT compiler may compile.
//!
//! A compiled loop checks for hooks only in a LuaJIT built with
//! `LUAJIT_ENABLE_CHECKHOOK`: elsewhere the deadline timer's hook would
//! wait for the loop to leave its trace, which an endless loop never does.
//! The vendored LuaJIT is built with the flag (`.cargo/config.toml`), but a
//! flag can be lost (a `CFLAGS` of the builder's own replaces ours), so the
//! answer comes from trying once per process: a compiled loop under a 2 ms
//! deadline must be stopped by the watchdog. Where it is, everything is
//! compiled ([`Mode::Everything`]). Module builds run on the host's LuaJIT
//! (Debian's and OpenResty's are built without the flag): there only the
//! sandbox's own Lua code is compiled (the lazy views, the prelude's
//! wrappers), whose loops are bounded by the call's input, and every
//! script's functions are marked not to be compiled
//! ([`Mode::SandboxOnly`]). An operator can choose with
//! `LLMPROXY_SANDBOX_JIT` in the environment: `off` (nothing compiled) or
//! `sandbox` (scripts interpreted). See `docs/adr/045-deadline-watchdog.md`
//! and `docs/adr/064-the-sandbox-code-compiled-everywhere.md`.

use std::sync::OnceLock;
use std::time::Duration;

use super::watchdog::Watchdog;

/// Iterations of the probe's loop: a tenth of a second or more compiled.
const ITERATIONS: f64 = 4e8;

/// The environment variable that chooses the [`Mode`] of sandbox VMs
/// (`off`, `sandbox`); read once per process.
pub const ENV_VAR: &str = "LLMPROXY_SANDBOX_JIT";

/// What the JIT compiler compiles in a sandbox VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing: the JIT compiler is off (`LLMPROXY_SANDBOX_JIT=off`).
    Off,
    /// The sandbox's own Lua code only; scripts run interpreted, where the
    /// deadline's hook reaches every loop.
    SandboxOnly,
    /// Everything, scripts included: compiled loops check for the
    /// deadline's hook.
    Everything,
}

impl Mode {
    /// The mode as an operator names it: `off`, `sandbox` (the values of
    /// [`ENV_VAR`]) or `everything`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::SandboxOnly => "sandbox",
            Mode::Everything => "everything",
        }
    }
}

/// The [`Mode`] of sandbox VMs in this process.
pub fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| {
        match std::env::var(ENV_VAR).as_deref() {
            Ok("off") => return Mode::Off,
            Ok("sandbox") => return Mode::SandboxOnly,
            _ => {}
        }
        if !cfg!(feature = "vendored") {
            return Mode::SandboxOnly;
        }
        if compiled_loops_interruptible() {
            return Mode::Everything;
        }
        tracing::warn!(
            "LuaJIT was built without LUAJIT_ENABLE_CHECKHOOK: compiled loops cannot be \
             interrupted, so sandboxed scripts run interpreted"
        );
        Mode::SandboxOnly
    })
}

/// Whether scripts' own code is compiled in this process
/// ([`Mode::Everything`]).
pub fn enabled() -> bool {
    mode() == Mode::Everything
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
        if std::env::var_os(super::ENV_VAR).is_none() {
            assert!(super::enabled());
        }
    }
}
