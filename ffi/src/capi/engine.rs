//! `llmp_engine`: build an engine from a config, run hooks with JSON in and
//! JSON out, free what the library handed out.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;
use std::sync::OnceLock;

use llmproxy_core::convert::{self, Limits};
use llmproxy_core::{Config, Engine};
use serde_json::Value;

use super::boundary::{self, byte_slice, cstr_bytes, non_null, utf8_cstr};
use super::error::{llmp_error, llmp_result, Failure};
use super::globals::llmp_globals;
use super::request::llmp_request;
use crate::input;

/// A compiled configuration: every enabled hook's script, its limits and a
/// pool of sandboxed LuaJIT states. Immutable once built.
///
/// Create with `llmp_engine_new` or `llmp_engine_new_from_file`, free with
/// `llmp_engine_free`. Thread safety: `llmp_engine_run` and
/// `llmp_engine_run_prepared` may be called on one engine from any number
/// of threads at once.
pub struct llmp_engine {
    engine: Engine,
}

impl llmp_engine {
    /// The engine inside.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Build an engine and hand it out through `out`.
fn build(config: Result<Config, llmproxy_core::ConfigError>, out: *mut *mut llmp_engine) -> Result<(), Failure> {
    let engine = Engine::new(config?)?;
    let boxed = Box::into_raw(Box::new(llmp_engine { engine }));
    // SAFETY: `out` was checked not NULL by the caller of `build` and points
    // to writable storage for one pointer (the entry point's contract).
    unsafe { out.write(boxed) };
    Ok(())
}

/// Build an engine from YAML configuration text (the gateway's config
/// format: `scripts.<hook>.script`, limits, ...), compiling every enabled
/// script.
///
/// `yaml` points to `len` bytes of UTF-8 text (a terminating NUL is neither
/// needed nor read). Relative `script_file` paths are resolved against the
/// process's current directory.
///
/// On success returns `LLMP_OK` and stores a new engine in `*out`; the
/// caller owns it and frees it with `llmp_engine_free`. On failure returns
/// `LLMP_CONFIG` (invalid YAML, an unknown key, an unreadable script file, a
/// script that does not compile: every problem is listed in the message) or
/// `LLMP_INVALID_ARGUMENT` (NULL `yaml` or `out`, text that is not UTF-8),
/// leaves `*out` unchanged and, if `err` is not NULL, stores an error the
/// caller frees with `llmp_error_free`.
///
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `yaml` is NULL or points to `len` readable bytes; `out` is NULL or
/// writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_engine_new(
    yaml: *const c_char,
    len: usize,
    out: *mut *mut llmp_engine,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let body = || {
        non_null(out, "out")?;
        // SAFETY: `yaml` is NULL or `len` readable bytes (the contract).
        let bytes = unsafe { byte_slice(yaml, len, "yaml") }?;
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Failure::invalid(format!("yaml is not valid UTF-8 (byte {})", e.valid_up_to())))?;
        build(Config::from_yaml(text, Path::new(".")), out)
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, body) }
}

/// Build an engine from a YAML configuration file; relative `script_file`
/// paths are resolved against the file's directory.
///
/// `path` is a NUL-terminated file name (any bytes but NUL).
///
/// Ownership, results and errors as for `llmp_engine_new`; a file that
/// cannot be read is `LLMP_CONFIG`.
///
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or writable;
/// `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_engine_new_from_file(
    path: *const c_char,
    out: *mut *mut llmp_engine,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let body = || {
        non_null(out, "out")?;
        // SAFETY: `path` is NULL or NUL-terminated (the contract).
        let path = unsafe { cstr_bytes(path, "path") }?;
        build(Config::from_file(Path::new(OsStr::from_bytes(path))), out)
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, body) }
}

/// Run one hook and return the script's result as JSON.
///
/// - `hook`: the hook's config name, NUL-terminated: `"routing"`, `"auth"`,
///   `"request_transform"`, `"response_transform"`, `"rate_limit"`,
///   `"usage"` or `"error_handler"`. It must be enabled in the engine.
/// - `input_json`, `input_len`: a JSON object holding the hook's globals
///   (`{"request": {...}, "backends": {...}}` for routing), `input_len`
///   bytes of UTF-8 (no terminating NUL needed). `request.body` may be given
///   parsed, or as JSON text in `request.body_raw`.
/// - `out_json`, `out_len`: on success, `*out_json` receives the result as
///   NUL-terminated JSON (`null` when the script returned nil) and, if
///   `out_len` is not NULL, `*out_len` its length without the NUL. The
///   caller owns the string and frees it with `llmp_string_free`.
///
/// The result is validated against the hook's contract (a routing script
/// must name a backend from `backends`, an auth verdict needs `allow`, ...).
///
/// Errors: `LLMP_TIMEOUT`, `LLMP_MEMORY`, `LLMP_SCRIPT_ERROR`,
/// `LLMP_BAD_OUTPUT` when the script fails (apply the hook's `on_error`
/// policy); `LLMP_INVALID_ARGUMENT` for a NULL argument, an unknown or
/// disabled hook, input that is not UTF-8, not valid JSON, not an object,
/// or past the size and nesting limits; `LLMP_INTERNAL` when no VM became
/// free in time. On failure the out-parameters are left unchanged and, if
/// `err` is not NULL, `*err` receives an error to free with
/// `llmp_error_free`.
///
/// Thread safety: any number of threads may run hooks on one engine at
/// once (each call checks a VM out of the engine's pool); the engine must
/// not be freed while a call is running.
///
/// # Safety
/// `engine` is NULL or a live engine; `hook` is NULL or NUL-terminated;
/// `input_json` is NULL or `input_len` readable bytes; `out_json`, `out_len`
/// and `err` are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_engine_run(
    engine: *const llmp_engine,
    hook: *const c_char,
    input_json: *const c_char,
    input_len: usize,
    out_json: *mut *mut c_char,
    out_len: *mut usize,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let body = || {
        // SAFETY: `engine` is NULL or a live engine (the contract).
        let engine = unsafe { engine.as_ref() }.ok_or_else(|| Failure::invalid("engine is NULL"))?;
        non_null(out_json, "out_json")?;
        // SAFETY: `hook` is NULL or NUL-terminated (the contract).
        let hook = unsafe { utf8_cstr(hook, "hook") }?;
        // SAFETY: `input_json` is NULL or `input_len` readable bytes.
        let input = unsafe { byte_slice(input_json, input_len, "input_json") }?;
        let result = run(&engine.engine, hook, input)?;
        // SAFETY: `out_json` is not NULL; both are writable (the contract).
        unsafe { write_result(&result, out_json, out_len) }
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, body) }
}

/// Parse the input, run the hook.
fn run(engine: &Engine, hook: &str, input: &[u8]) -> Result<Value, Failure> {
    let (hook, cfg) = input::enabled(engine, hook)?;
    // The globals object itself is one level above the hook's depth limit.
    let limits = Limits {
        max_depth: cfg.limits.max_depth.saturating_add(1),
        max_bytes: cfg.limits.max_input_bytes,
    };
    let value = convert::parse_json(input, limits).map_err(|e| Failure::invalid(format!("input_json: {e}")))?;
    Ok(engine.run_json(hook, &value)?)
}

/// Run one hook on a request and globals parsed once
/// (`llmp_request_new`, `llmp_globals_new`), and return the script's result
/// as JSON: what `llmp_engine_run` does with the same JSON as one input,
/// without parsing it again.
///
/// - `hook`: as for `llmp_engine_run`.
/// - `request`: the `request` global, or NULL for a hook call without one.
/// - `globals`: the hook's other globals (`backends` for routing, ...), or
///   NULL for none.
/// - `out_json`, `out_len`: as for `llmp_engine_run`; free the string with
///   `llmp_string_free`.
///
/// The request and the globals are checked against the hook's limits
/// (`max_depth`, `max_input_bytes`; their text sizes count together) on
/// every call. The result is validated against the hook's contract (a
/// routing script must name a backend from the globals' `backends`, ...).
///
/// Errors: as for `llmp_engine_run`: `LLMP_TIMEOUT`, `LLMP_MEMORY`,
/// `LLMP_SCRIPT_ERROR`, `LLMP_BAD_OUTPUT` when the script fails;
/// `LLMP_INVALID_ARGUMENT` for a NULL `engine`, `hook` or `out_json`, an
/// unknown or disabled hook, or a request or globals past the hook's
/// limits; `LLMP_INTERNAL` when no VM became free in time. On failure the
/// out-parameters are left unchanged and, if `err` is not NULL, `*err`
/// receives an error to free with `llmp_error_free`.
///
/// Thread safety: any number of threads may run hooks at once on one
/// engine with the same or different requests and globals: all three are
/// only read. None of them may be freed while a call using it is running.
///
/// # Safety
/// `engine` is NULL or a live engine; `hook` is NULL or NUL-terminated;
/// `request` is NULL or a live request; `globals` is NULL or a live
/// globals object; `out_json`, `out_len` and `err` are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_engine_run_prepared(
    engine: *const llmp_engine,
    hook: *const c_char,
    request: *const llmp_request,
    globals: *const llmp_globals,
    out_json: *mut *mut c_char,
    out_len: *mut usize,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let body = || {
        // SAFETY: `engine` is NULL or a live engine (the contract).
        let engine = unsafe { engine.as_ref() }.ok_or_else(|| Failure::invalid("engine is NULL"))?;
        non_null(out_json, "out_json")?;
        // SAFETY: `hook` is NULL or NUL-terminated (the contract).
        let hook = unsafe { utf8_cstr(hook, "hook") }?;
        // SAFETY: `request` and `globals` are NULL or live (the contract).
        let (request, globals) = unsafe { (request.as_ref(), globals.as_ref()) };
        let result = input::run(
            &engine.engine,
            hook,
            request.map(llmp_request::request),
            globals.map(llmp_globals::globals),
        )?;
        // SAFETY: `out_json` is not NULL; both are writable (the contract).
        unsafe { write_result(&result, out_json, out_len) }
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, body) }
}

/// Encode a result as a NUL-terminated JSON string owned by the caller
/// (`llmp_string_free`) and hand it out.
///
/// # Safety
/// `out_json` is not NULL and writable; `out_len` is NULL or writable.
unsafe fn write_result(result: &Value, out_json: *mut *mut c_char, out_len: *mut usize) -> Result<(), Failure> {
    let text = serde_json::to_vec(result)
        .map_err(|e| Failure::new(llmp_result::LLMP_INTERNAL, format!("cannot encode the result: {e}")))?;
    // JSON text never holds a raw NUL (serde_json escapes it as \u0000).
    let json =
        CString::new(text).map_err(|_| Failure::new(llmp_result::LLMP_INTERNAL, "result JSON holds a NUL byte"))?;
    let len = json.as_bytes().len();
    // SAFETY: `out_json` is not NULL and writable (this function's contract).
    unsafe { out_json.write(json.into_raw()) };
    if !out_len.is_null() {
        // SAFETY: `out_len` is not NULL and writable (the contract).
        unsafe { out_len.write(len) };
    }
    Ok(())
}

/// Free an engine. `llmp_engine_free(NULL)` does nothing.
///
/// Ownership: takes `engine`; it is invalid afterwards. Strings and errors
/// it returned stay valid (they are owned by the caller).
/// Thread safety: no call may be running on `engine`, on any thread.
///
/// # Safety
/// `engine` is NULL or a live engine, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_engine_free(engine: *mut llmp_engine) {
    boundary::call_or((), || {
        if !engine.is_null() {
            // SAFETY: a non-NULL `engine` came from `Box::into_raw` in
            // `build` and is freed once (the contract).
            drop(unsafe { Box::from_raw(engine) });
        }
    })
}

/// Free a string returned by `llmp_engine_run` or
/// `llmp_engine_run_prepared`. `llmp_string_free(NULL)` does nothing.
///
/// Ownership: takes `s`; it is invalid afterwards. Only strings returned by
/// this library may be passed, and `free()` must not be used on them (they
/// belong to the library's allocator).
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `s` is NULL or a string from this library, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_string_free(s: *mut c_char) {
    boundary::call_or((), || {
        if !s.is_null() {
            // SAFETY: a non-NULL `s` came from `CString::into_raw` in
            // `write_result` and is freed once (the contract).
            drop(unsafe { CString::from_raw(s) });
        }
    })
}

/// The library's version (`"0.1.0"`), NUL-terminated.
///
/// Ownership: static; do not free it. Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn llmp_version() -> *const c_char {
    static VERSION: OnceLock<CString> = OnceLock::new();
    boundary::call_or(ptr::null(), || {
        VERSION
            .get_or_init(|| CString::new(llmproxy_core::VERSION).unwrap_or_default())
            .as_ptr()
    })
}

/// What LuaJIT's JIT compiler compiles in this library's sandbox VMs,
/// NUL-terminated: `"everything"` (scripts too: their compiled loops still
/// stop at the deadline, on the LuaJIT this library brings), `"sandbox"`
/// (the sandbox's own code; scripts run interpreted, as on a host's
/// LuaJIT without `LUAJIT_ENABLE_CHECKHOOK`) or `"off"`.
/// `LLMPROXY_SANDBOX_JIT=off|sandbox` in the environment lowers it; the
/// first call may take a few milliseconds (the library checks once that
/// its LuaJIT interrupts a compiled loop).
///
/// Ownership: static; do not free it. Thread safety: safe from any thread.
#[unsafe(no_mangle)]
pub extern "C" fn llmp_sandbox_jit() -> *const c_char {
    static NAME: OnceLock<CString> = OnceLock::new();
    boundary::call_or(ptr::null(), || {
        NAME.get_or_init(|| CString::new(llmproxy_core::sandbox::jit::mode().name()).unwrap_or_default())
            .as_ptr()
    })
}
