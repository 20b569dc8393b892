//! One sandboxed VM: a sandbox state, its compiled-chunk cache and the call
//! protocol (lazy inputs, limits armed only while the script runs, the
//! environment emptied after the call).

use std::sync::Arc;
use std::time::Duration;

use mlua::chunk::ChunkMode;
use mlua::{ffi, Function, Lua, Table, Value};

use crate::config::{Script, ScriptLimits};
use crate::convert::{self, Limits};
use crate::error::{ErrorKind, HookError};
use crate::hooks::{HookName, ResultForm};
use crate::http::fields::BodyText;
use crate::sandbox::{self, SandboxState};

/// What one call runs and under which limits.
pub(crate) struct CallSpec<'a> {
    pub hook: HookName,
    pub script: &'a Script,
    pub limits: &'a ScriptLimits,
    pub request_id: Option<&'a str>,
    /// An inline budget shorter than `limits.timeout_ms`: the watchdog stops
    /// the call there and [`Vm::over_budget`] tells it apart from a timeout.
    pub budget: Option<Duration>,
    /// How the result is encoded ([`crate::hooks::HookInput::RESULT_FORM`]).
    pub result_form: ResultForm,
}

/// What a call returned, as JSON: the result, with a transform's `body`
/// as JSON text and its `headers` as read, when the call asked for them
/// ([`CallSpec::result_form`]) and they could be taken apart.
pub(crate) type Output = convert::Encoded;

/// A sandboxed LuaJIT state with its compiled scripts.
pub(crate) struct Vm {
    state: SandboxState,
    /// Every chunk's environment: the call's globals, read through to the
    /// read-only base. Emptied after each call ([`Vm::reset_env`]), so
    /// nothing a call writes reaches the next one.
    env: Table,
    /// Compiled chunks, with the address of their script's source text.
    /// Scripts live in the engine's immutable config, which outlives its
    /// VMs, so an address names one script for the VM's whole life; hashing
    /// the text itself would cost microseconds per call for long scripts.
    /// A list: a VM runs its engine's scripts, one per hook at most, and a
    /// scan of a few addresses costs less than hashing one.
    chunks: Vec<(usize, Function)>,
    /// Calls made on this VM.
    pub calls: u64,
    /// The pool's tag of the thread that checked this VM out last (0 for
    /// none), so that thread gets it back (`pool.rs`).
    pub thread: u64,
    /// Set when mlua itself failed (e.g. its stack): the state is suspect.
    broken: bool,
    /// Whether the last call was stopped by its inline budget.
    over_budget: bool,
    /// Set when `run` in `lazy.lua` returned: whether it emptied the
    /// environment (false: the call left too many globals).
    env_emptied: Option<bool>,
}

// SAFETY: mlua is built without its `send` feature (it refuses `send` in
// `module` mode), so its handles count references to their Lua state with
// non-atomic `Rc`s. A `Vm` owns its state and every handle into it: the chunk
// cache, `SandboxState` (`lua`, `env_mt`, `run`), the environment, the app
// data and the closures registered in the state. No handle leaves a `Vm`:
// `call` returns plain JSON and `compile` returns nothing. The pointers to a
// call's inputs in the app data (`convert::lazy`) are dropped before `call`
// returns. The pool hands a `Vm` to one thread at a time,
// so those counts are only touched by the thread that owns the whole bundle;
// moving the bundle between threads is then sound, as for a `Vec<Rc<T>>`
// moved whole. LuaJIT states are not tied to the thread that created them,
// and the watchdog shared with the deadline timer is an `Arc` of atomics
// (its state pointer is only used for `lua_sethook`, see `watchdog.rs`).
unsafe impl Send for Vm {}

impl Vm {
    /// A new VM. Fails only if LuaJIT cannot start.
    pub fn new() -> Result<Vm, HookError> {
        let start = |e: mlua::Error| HookError::new(ErrorKind::Internal, format!("cannot create a sandbox VM: {e}"));
        let state = sandbox::build().map_err(start)?;
        let env = state.lua.create_table().map_err(start)?;
        env.set_metatable(Some(state.env_mt.clone())).map_err(start)?;
        env.raw_set("_G", &env).map_err(start)?;
        Ok(Vm {
            state,
            env,
            chunks: Vec::new(),
            calls: 0,
            thread: 0,
            broken: false,
            over_budget: false,
            env_emptied: None,
        })
    }

    /// Whether this VM hit a limit and must not be reused (or was built
    /// before this process was forked, so no deadline timer watches it).
    pub fn poisoned(&self) -> bool {
        self.broken || self.state.watchdog.fired() || self.state.watchdog.memory_hit() || !self.watched()
    }

    /// Whether this process's deadline timer watches this VM (it does not
    /// in a child forked after the VM was built).
    pub fn watched(&self) -> bool {
        self.state.watchdog.timer_alive()
    }

    /// Bytes held by the Lua heap.
    pub fn used_memory(&self) -> usize {
        self.state.lua.used_memory()
    }

    /// Run a full garbage collection.
    pub fn collect(&self) {
        let _ = self.state.lua.gc_collect();
    }

    /// Compile `script` (text mode only) unless it is cached.
    pub fn compile(&mut self, script: &Script) -> Result<(), HookError> {
        self.chunk_index(script).map(|_| ())
    }

    /// Where `script`'s compiled chunk is in `chunks`, compiled first if
    /// it is not there.
    fn chunk_index(&mut self, script: &Script) -> Result<usize, HookError> {
        let key = chunk_key(script);
        if let Some(at) = self.chunks.iter().position(|(k, _)| *k == key) {
            return Ok(at);
        }
        let f = self
            .state
            .lua
            .load(&*script.source)
            .set_name(format!("={}", script.name))
            .set_mode(ChunkMode::Text)
            .into_function()
            .map_err(|e| classify(e, &script.name, ErrorKind::ScriptError))?;
        f.set_environment(self.env.clone()).map_err(internal)?;
        if let Some(off) = &self.state.scripts_interpreted {
            // `jit.off(chunk, true)`: the chunk and every function defined
            // in it (a script can define no other: there is no `load`).
            off.call::<()>((&f, true)).map_err(internal)?;
        }
        self.chunks.push((key, f));
        Ok(self.chunks.len() - 1)
    }

    /// Run one call: `set_globals` fills the (empty) environment, then the
    /// script runs under its limits, and its first return value comes back
    /// as JSON. Lazy views of the input built by `set_globals` live until
    /// this returns (`convert::defer`); the environment is emptied.
    pub fn call(
        &mut self,
        spec: &CallSpec<'_>,
        set_globals: impl FnOnce(&Lua, &Table) -> mlua::Result<()>,
    ) -> Result<Output, HookError> {
        self.state.call_data.begin_call();
        self.over_budget = false;
        let result = self.run(spec, set_globals);
        self.state.call_data.end_call();
        self.state.context.borrow_mut().release_held(!self.over_budget);
        match self.env_emptied.take() {
            Some(true) => {}
            Some(false) => self.broken = true,
            None => self.reset_env(),
        }
        result
    }

    /// Whether the last call was stopped by its inline budget rather than
    /// by its own time limit (the call then failed with a timeout error).
    pub fn over_budget(&self) -> bool {
        self.over_budget
    }

    /// Empty the environment after a call that failed (`run` in
    /// `lazy.lua` does it after one that returned) and put `_G` back. A
    /// script that left more than [`MAX_REUSED_GLOBALS`] globals gets its
    /// VM discarded instead: the table would keep its size, and emptying it
    /// would walk all of it after every later call.
    fn reset_env(&mut self) {
        let env = &self.env;
        let keys = self.state.lua.exec_raw_lua(|raw| {
            // SAFETY: mlua's lock is held and the stack is ours; it is left
            // as it was. `push_into_stack` pushes a reference (no
            // allocation, hence no error). Walking with `lua_next` and
            // assigning nil to keys that exist allocates nothing and raises
            // nothing, so no protected call is needed (what `Table::clear`
            // does too).
            unsafe {
                let state = raw.state();
                if ffi::lua_checkstack(state, 4) == 0 || mlua::IntoLua::push_into_stack(env, raw).is_err() {
                    return usize::MAX;
                }
                let mut keys = 0usize;
                ffi::lua_pushnil(state);
                while ffi::lua_next(state, -2) != 0 {
                    ffi::lua_pop(state, 1);
                    ffi::lua_pushvalue(state, -1);
                    ffi::lua_pushnil(state);
                    ffi::lua_rawset(state, -4);
                    keys += 1;
                }
                ffi::lua_pop(state, 1);
                keys
            }
        });
        // With no memory limit set, mlua stores `_G` without a protected call.
        if keys > MAX_REUSED_GLOBALS || self.env.raw_set("_G", &self.env).is_err() {
            self.broken = true;
        }
    }

    fn run(
        &mut self,
        spec: &CallSpec<'_>,
        set_globals: impl FnOnce(&Lua, &Table) -> mlua::Result<()>,
    ) -> Result<Output, HookError> {
        let at = self.chunk_index(spec.script)?;
        let chunk = &self.chunks[at].1;
        let lua = &self.state.lua;
        let limits = Limits {
            max_depth: spec.limits.max_depth,
            max_bytes: spec.limits.max_output_bytes,
        };
        let memory = usize::try_from(spec.limits.memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        self.calls += 1;

        set_globals(lua, &self.env)
            .map_err(|e| HookError::bad_input(format!("cannot build the script's input: {e}")))?;

        let timeout = Duration::from_millis(spec.limits.timeout_ms);
        let budget = spec.budget.filter(|b| *b < timeout);
        self.state.context.borrow_mut().begin(
            spec.hook,
            &spec.script.name,
            spec.request_id,
            limits,
            memory,
            budget.is_some(),
        );

        // Limits are armed only while the script runs: with a memory limit
        // set, mlua protects every API call, which costs more than the call
        // itself for the input tables built above (see ADR 002).
        let used = lua.used_memory();
        lua.set_memory_limit(used.saturating_add(memory)).map_err(internal)?;
        match budget {
            Some(budget) => self.state.watchdog.arm_budget(budget, timeout),
            None => self.state.watchdog.arm(timeout),
        }
        let args = self.state.call_data.run_args(limits, spec.result_form);
        let result = sandbox::pcall::call_run(lua, &self.state.traceback, &self.state.run, chunk, &self.env, &args);
        let result = result.map(|(value, emptied)| {
            self.env_emptied = Some(emptied);
            value
        });
        self.state.watchdog.disarm();
        let _ = lua.set_memory_limit(0);
        let encoded = self.state.call_data.take_result();

        // A limit can fire inside a helper whose error a script never sees
        // (`print` of a table whose `__tostring` loops, then a normal
        // return): the call still failed.
        let result = match result {
            Ok(_) if self.state.watchdog.fired() => Err(mlua::Error::runtime("time limit")),
            Ok(_) if self.state.watchdog.memory_hit() => Err(mlua::Error::MemoryError("not enough memory".into())),
            other => other,
        };
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                if !is_script_level(&e) {
                    self.broken = true;
                }
                if self.state.watchdog.fired() {
                    if let Some(budget) = budget {
                        self.over_budget = true;
                        return Err(HookError::new(
                            ErrorKind::Timeout,
                            format!("over its inline budget of {} µs", budget.as_micros()),
                        ));
                    }
                    return Err(located(
                        HookError::new(
                            ErrorKind::Timeout,
                            format!("script exceeded its time limit of {} ms", spec.limits.timeout_ms),
                        ),
                        &e,
                        &spec.script.name,
                    ));
                }
                if sandbox::is_memory(&e) || self.state.watchdog.memory_hit() {
                    self.state.watchdog.set_memory_hit();
                    return Err(located(
                        HookError::new(
                            ErrorKind::Memory,
                            format!("script exceeded its memory limit of {} MB", spec.limits.memory_mb),
                        ),
                        &e,
                        &spec.script.name,
                    ));
                }
                return Err(classify(e, &spec.script.name, ErrorKind::ScriptError));
            }
        };
        let bad = |e: convert::ConvertError| HookError::bad_output(format!("{} returned {e}", spec.hook));
        if let Some(encoded) = encoded {
            return encoded.map_err(bad);
        }
        let body = match &value {
            Value::Table(t) if spec.result_form == ResultForm::BodyText => body_text(lua, t, limits).map_err(bad)?,
            _ => None,
        };
        let rest = Limits {
            max_bytes: limits.max_bytes.saturating_sub(body.as_ref().map_or(0, Vec::len)),
            ..limits
        };
        let value = match body {
            Some(_) => convert::lua_to_json_without(lua, &value, rest, "body"),
            None => convert::lua_to_json(lua, &value, rest),
        }
        .map_err(bad)?;
        Ok(Output {
            value,
            body: body.map(|b| Box::new(BodyText::from(b))),
            headers: None,
            text: None,
        })
    }
}

/// The `body` a result table holds raw, as JSON text; `None` when it holds
/// none (then the rest of the encoding finds `body`, if a view or a
/// metatable provides one).
fn body_text(lua: &Lua, t: &Table, limits: Limits) -> Result<Option<Vec<u8>>, convert::ConvertError> {
    let body: Value = t.raw_get("body").map_err(|e| convert::ConvertError(e.to_string()))?;
    if body.is_nil() {
        return Ok(None);
    }
    convert::lua_to_json_text(lua, &body, limits).map(Some)
}

/// Most globals an environment may hold after a call and still be reused:
/// after a call that returned, those left once `lazy.lua`'s `finish` has
/// removed the host's by name (what a script defined); after one that
/// failed, all of them (the hook's inputs, `_G`, the script's).
pub(crate) const MAX_REUSED_GLOBALS: usize = 256;

/// The chunk cache key of `script`: the address of its source text.
fn chunk_key(script: &Script) -> usize {
    Arc::as_ptr(&script.source).cast::<u8>() as usize
}

/// Parse `script` without running it (text mode only): `Err` holds the Lua
/// syntax error as `name:line: message`. Used while loading a config so that
/// syntax errors are reported with every other config problem.
pub(crate) fn syntax_check(script: &Script) -> Result<(), String> {
    thread_local! {
        static CHECKER: Option<Lua> = Lua::new_with(mlua::StdLib::NONE, mlua::LuaOptions::new()).ok();
    }
    CHECKER.with(|lua| {
        let Some(lua) = lua else { return Ok(()) };
        lua.load(&*script.source)
            .set_name(format!("={}", script.name))
            .set_mode(ChunkMode::Text)
            .into_function()
            .map(drop)
            .map_err(|e| message(&e))
    })
}

fn internal(e: mlua::Error) -> HookError {
    HookError::new(ErrorKind::Internal, e.to_string())
}

/// Whether an error is one a script can cause in a healthy state (its own
/// error, a failed conversion of its arguments, running out of memory).
/// Anything else (mlua's stack, a recursive callback, ...) leaves the state
/// suspect, and the VM is discarded.
fn is_script_level(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::RuntimeError(_)
        | mlua::Error::MemoryError(_)
        | mlua::Error::SyntaxError { .. }
        | mlua::Error::BadArgument { .. }
        | mlua::Error::FromLuaConversionError { .. } => true,
        mlua::Error::CallbackError { cause, .. } | mlua::Error::WithContext { cause, .. } => is_script_level(cause),
        _ => false,
    }
}

/// Longest error message kept (a script can raise a megabyte of text).
const MAX_MESSAGE_BYTES: usize = 2048;

/// The innermost message of an mlua error, without mlua's traceback, cut to
/// [`MAX_MESSAGE_BYTES`].
fn message(e: &mlua::Error) -> String {
    let mut m = full_message(e);
    crate::error::truncate_utf8(&mut m, MAX_MESSAGE_BYTES, "… (truncated)");
    m
}

fn full_message(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, .. } => full_message(cause),
        mlua::Error::RuntimeError(m) | mlua::Error::MemoryError(m) => strip_traceback(m),
        mlua::Error::SyntaxError { message, .. } => strip_traceback(message),
        mlua::Error::WithContext { cause, context } => format!("{context}: {}", full_message(cause)),
        other => strip_traceback(&other.to_string()),
    }
}

fn strip_traceback(m: &str) -> String {
    m.split("\nstack traceback:").next().unwrap_or(m).trim_end().to_owned()
}

/// The first `script:LINE:` in the error's text or traceback.
fn line_of(e: &mlua::Error, script: &str) -> Option<u32> {
    let text = match e {
        mlua::Error::CallbackError { traceback, cause } => {
            format!("{}\n{traceback}", message(cause))
        }
        other => other.to_string(),
    };
    let needle = format!("{script}:");
    text.match_indices(&needle).find_map(|(i, _)| {
        let rest = &text[i + needle.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if rest[digits.len()..].starts_with(':') {
            digits.parse().ok()
        } else {
            None
        }
    })
}

fn classify(e: mlua::Error, script: &str, kind: ErrorKind) -> HookError {
    let mut err = HookError::new(kind, message(&e));
    err.line = line_of(&e, script);
    err.script = Some(script.to_owned());
    err
}

fn located(mut err: HookError, cause: &mlua::Error, script: &str) -> HookError {
    err.line = line_of(cause, script);
    err.script = Some(script.to_owned());
    err
}
