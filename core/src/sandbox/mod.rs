//! The sandbox: a LuaJIT state in which untrusted scripts can run.
//!
//! What a script sees is data ([`allowlist`]): a safe subset of the base
//! library, read-only proxies of `string`, `table`, `math`, `bit` and three
//! functions of `os`, and the helpers `json`, `string_utils`, `time`, `hash`
//! and `log`. Every chunk runs in the VM's one environment, whose reads fall
//! through to this read-only base and which is emptied after each call
//! (`vm.rs`), so nothing a script writes survives the call. The string metatable is hidden (`getmetatable("")` is
//! `false`) and its `__index` points at the guarded string functions.
//!
//! Limits ([`watchdog`], `docs/adr/002-limits.md`, `docs/adr/045`): a call
//! runs with no hook until the deadline timer finds it overdue; the JIT
//! compiler stays on only where compiled loops check for that hook
//! ([`jit`]); pattern functions are a Rust port with a step
//! budget ([`pattern`]); `string.rep` is bounded by the memory allowance; the
//! memory limit itself is mlua's allocator limit, set around each call.
//! Helpers that work outside the Lua heap charge the same allowance and poll
//! the same deadline (`json.decode`), or take bounded inputs (`time.*`,
//! `os.date`).
//!
//! Helpers never change a metatable they did not create (`json.array`
//! refuses a table that has one), so no path makes a shared table writable;
//! `math.random` keeps its state per call ([`random`]).

pub mod allowlist;
pub(crate) mod context;
mod helpers;
pub mod jit;
pub mod pattern;
pub(crate) mod pcall;
mod random;
mod timer;
pub(crate) mod watchdog;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{LuaOptions, StdLib, Table, Value};

use crate::convert::{self, Markers};
use context::{CallContext, SharedContext};
use watchdog::Watchdog;

const PRELUDE: &str = include_str!("prelude.lua");

/// Most nested calls of C functions that call back into Lua (see
/// `prelude.lua`): far below what a 2 MB thread stack holds.
const MAX_CALLBACK_NESTING: u32 = 64;

/// A freshly built sandbox state.
pub(crate) struct SandboxState {
    /// The Lua state. Its raw globals are emptied; scripts never run in them.
    pub lua: mlua::Lua,
    /// Metatable of the VM's environment: reads fall through to the
    /// read-only base environment.
    pub env_mt: Table,
    /// The time limit of this state.
    pub watchdog: Arc<Watchdog>,
    /// Runs one call: sets the call's lazy inputs, then the script
    /// (`convert::lazy`).
    pub run: mlua::Function,
    /// The message handler `run` is called with ([`pcall`]).
    pub traceback: mlua::Function,
    /// In [`jit::Mode::SandboxOnly`], LuaJIT's `jit.off`: every script's
    /// chunk is marked with it, functions inside included, before it first
    /// runs, so no script code is ever compiled.
    pub scripts_interpreted: Option<mlua::Function>,
    /// The conversions' per-call data (`convert::lazy`).
    pub call_data: Rc<convert::CallData>,
    /// What the helpers know of the call running (also app data).
    pub context: SharedContext,
}

impl Drop for SandboxState {
    fn drop(&mut self) {
        // Before the state closes (the fields drop after this).
        self.watchdog.release();
    }
}

/// Build a sandbox state. Fails only if LuaJIT itself fails to start.
pub(crate) fn build() -> mlua::Result<SandboxState> {
    let watchdog =
        Watchdog::new().map_err(|e| mlua::Error::runtime(format!("cannot start the deadline timer: {e}")))?;
    // On success the state releases it when dropped.
    build_on(Arc::clone(&watchdog)).inspect_err(|_| watchdog.release())
}

fn build_on(watchdog: Arc<Watchdog>) -> mlua::Result<SandboxState> {
    let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::BIT | StdLib::OS | StdLib::JIT;
    let lua = mlua::Lua::new_with(libs, LuaOptions::new())?;
    let g = lua.globals();

    // The JIT compiler compiles scripts only where the deadline can
    // interrupt compiled loops, and the sandbox's own code wherever it is
    // not turned off (`jit.rs`).
    let mode = jit::mode();
    let jit = if mode == jit::Mode::Off {
        "jit.off() jit.flush()"
    } else {
        "jit.on()"
    };
    lua.load(jit).set_name("=llmproxy.jit").exec()?;
    let jit_on: bool = lua
        .load("return (jit.status())")
        .set_name("=llmproxy.jit_status")
        .eval()?;
    if jit_on != (mode != jit::Mode::Off) {
        return Err(mlua::Error::runtime("llmproxy: could not set the JIT engine's mode"));
    }
    let scripts_interpreted = match mode {
        jit::Mode::SandboxOnly => Some(lua.load("return jit.off").set_name("=llmproxy.jit_off").eval()?),
        jit::Mode::Off | jit::Mode::Everything => None,
    };

    Markers::install(&lua)?;
    let context: SharedContext = Rc::new(RefCell::new(CallContext::idle()));
    lua.set_app_data(Rc::clone(&context));

    watchdog.install(&lua);
    // Helpers that run long outside the interpreter poll the deadline.
    lua.set_app_data(Arc::clone(&watchdog));

    // Raw functions the prelude wraps, plus the Rust callbacks it needs.
    let raw = lua.create_table()?;
    for name in [
        "pcall",
        "xpcall",
        "next",
        "pairs",
        "rawget",
        "error",
        "setmetatable",
        "getmetatable",
        "collectgarbage",
    ] {
        raw.raw_set(name, g.raw_get::<Value>(name)?)?;
    }
    let poison_watchdog = Arc::clone(&watchdog);
    raw.raw_set(
        "poisoned",
        lua.create_function(move |_, err: Value| {
            if is_memory_error(&err) {
                poison_watchdog.set_memory_hit();
            }
            Ok(poison_watchdog.fired() || poison_watchdog.memory_hit())
        })?,
    )?;
    let lazy = convert::lazy::install(&lua)?;
    raw.raw_set("materialize", &lazy.materialize)?;
    raw.raw_set("log_info", helpers::log(&lua)?.raw_get::<Value>("info")?)?;
    raw.raw_set("max_nesting", MAX_CALLBACK_NESTING)?;
    let prelude: Table = lua.load(PRELUDE).set_name("=llmproxy.prelude").call(raw)?;
    let readonly: mlua::Function = prelude.raw_get("readonly")?;
    let guard: mlua::Function = prelude.raw_get("guard")?;
    let guarded = |f: Value| -> mlua::Result<Value> { guard.call(f) };

    let base = lua.create_table()?;
    for name in allowlist::BASE {
        base.raw_set(*name, g.raw_get::<Value>(*name)?)?;
    }
    for name in allowlist::WRAPPED {
        base.raw_set(*name, prelude.raw_get::<Value>(*name)?)?;
    }
    for name in allowlist::CALLS_BACK {
        base.raw_set(*name, guarded(base.raw_get::<Value>(*name)?)?)?;
    }

    // Libraries: copy the allowed functions into fresh tables, swap in the
    // guarded versions, expose read-only proxies.
    let mut safe_string = None;
    for (lib, names) in allowlist::LIBRARIES {
        let src: Table = g.raw_get(*lib)?;
        let dst = lua.create_table()?;
        for name in *names {
            dst.raw_set(*name, src.raw_get::<Value>(*name)?)?;
        }
        if *lib == "string" {
            dst.raw_set("rep", helpers::string_rep(&lua)?)?;
            let step_watchdog = Arc::clone(&watchdog);
            pattern::install(&lua, &dst, Arc::new(move || step_watchdog.check()))?;
            for name in ["format", "gsub"] {
                dst.raw_set(name, guarded(dst.raw_get::<Value>(name)?)?)?;
            }
            safe_string = Some(dst.clone());
        }
        if *lib == "table" {
            dst.raw_set("sort", guarded(dst.raw_get::<Value>("sort")?)?)?;
        }
        if *lib == "math" {
            random::install(&lua, &dst)?;
        }
        if *lib == "os" {
            dst.raw_set("date", helpers::os_date(&lua, dst.raw_get("date")?)?)?;
        }
        base.raw_set(*lib, readonly.call::<Table>((dst, *lib))?)?;
    }
    let helpers: [(&str, Table); 5] = [
        ("json", helpers::json(&lua)?),
        ("string_utils", helpers::string_utils(&lua)?),
        ("time", helpers::time(&lua)?),
        ("hash", helpers::hash(&lua)?),
        ("log", helpers::log(&lua)?),
    ];
    for (name, table) in helpers {
        if name == "log" {
            for level in ["info", "warn", "error"] {
                table.raw_set(level, guarded(table.raw_get::<Value>(level)?)?)?;
            }
        }
        base.raw_set(name, readonly.call::<Table>((table, name))?)?;
    }

    // String methods (`s:rep(n)`) go through the guarded table, and the
    // string metatable cannot be fetched, so it cannot be changed.
    let string_mt: Table = lua
        .load("return getmetatable('')")
        .set_name("=llmproxy.string_mt")
        .eval()?;
    if let Some(safe_string) = safe_string {
        string_mt.raw_set("__index", safe_string)?;
    }
    string_mt.raw_set("__metatable", false)?;

    let env_mt = lua.create_table()?;
    env_mt.raw_set("__index", base)?;
    env_mt.raw_set("__metatable", false)?;

    // Nothing runs in the raw globals from here on; empty them so that no
    // forgotten path can reach `jit`, `os.exit` or the real libraries.
    lua.set_globals(lua.create_table()?)?;
    // SAFETY: `traceback` is a message handler as LuaJIT calls one.
    let traceback = unsafe { lua.create_c_function(pcall::traceback)? };
    lua.gc_collect()?;

    Ok(SandboxState {
        lua,
        env_mt,
        watchdog,
        run: lazy.run,
        traceback,
        scripts_interpreted,
        call_data: lazy.data,
        context,
    })
}

/// Whether an error value caught by `pcall` is an out-of-memory error.
fn is_memory_error(err: &Value) -> bool {
    match err {
        Value::Error(e) => is_memory(e),
        Value::String(s) => s.as_bytes().as_ref() == b"not enough memory",
        _ => false,
    }
}

/// Whether an mlua error is (or wraps) an out-of-memory error.
pub(crate) fn is_memory(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::RuntimeError(m) => m == "not enough memory",
        mlua::Error::CallbackError { cause, .. } => is_memory(cause),
        _ => false,
    }
}
