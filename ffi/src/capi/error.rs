//! `llmp_result` and the caller-owned `llmp_error` object.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, CStr, CString};
use std::ptr;

use llmproxy_core::{ConfigError, ErrorKind, HookError, HookName};

use super::boundary;

/// The result of every fallible `llmp_*` function.
///
/// `LLMP_OK` is 0. Other codes are grouped: 1xxx the caller's mistake (fix
/// the call or the config), 2xxx the script failed (the hook's `on_error`
/// policy applies), 3xxx the engine failed (not caused by the script or the
/// input; a retry may succeed).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum llmp_result {
    /// Success.
    LLMP_OK = 0,
    /// A NULL or malformed argument: non-UTF-8 text, invalid or truncated
    /// JSON, an unknown hook name, a hook that is not enabled, input that
    /// breaks the size or nesting limits. Kind `"invalid_argument"`.
    LLMP_INVALID_ARGUMENT = 1000,
    /// The configuration is invalid, unreadable, or a script does not
    /// compile. Kind `"config"`.
    LLMP_CONFIG = 1001,
    /// The script ran past its time limit. Kind `"timeout"`.
    LLMP_TIMEOUT = 2000,
    /// The script allocated past its memory limit. Kind `"memory"`.
    LLMP_MEMORY = 2001,
    /// The script raised an error (including sandbox violations). Kind
    /// `"script_error"`.
    LLMP_SCRIPT_ERROR = 2002,
    /// The script returned a value that does not fit the hook's contract.
    /// Kind `"bad_output"`.
    LLMP_BAD_OUTPUT = 2003,
    /// The engine could not run the script: every VM stayed busy past the
    /// pool's checkout timeout, or LuaJIT could not create a state. Kind
    /// `"internal"`.
    LLMP_INTERNAL = 3000,
    /// A bug: the library panicked. The panic was caught at the boundary;
    /// the engine stays usable. Kind `"panic"`.
    LLMP_PANIC = 3001,
}

impl llmp_result {
    /// The stable kind name of this code (`llmp_error_kind`).
    pub fn kind(self) -> &'static CStr {
        match self {
            llmp_result::LLMP_OK => c"ok",
            llmp_result::LLMP_INVALID_ARGUMENT => c"invalid_argument",
            llmp_result::LLMP_CONFIG => c"config",
            llmp_result::LLMP_TIMEOUT => c"timeout",
            llmp_result::LLMP_MEMORY => c"memory",
            llmp_result::LLMP_SCRIPT_ERROR => c"script_error",
            llmp_result::LLMP_BAD_OUTPUT => c"bad_output",
            llmp_result::LLMP_INTERNAL => c"internal",
            llmp_result::LLMP_PANIC => c"panic",
        }
    }

    /// The code a core error kind maps to.
    pub fn from_kind(kind: ErrorKind) -> llmp_result {
        match kind {
            ErrorKind::Timeout => llmp_result::LLMP_TIMEOUT,
            ErrorKind::Memory => llmp_result::LLMP_MEMORY,
            ErrorKind::ScriptError => llmp_result::LLMP_SCRIPT_ERROR,
            ErrorKind::BadOutput => llmp_result::LLMP_BAD_OUTPUT,
            ErrorKind::BadInput => llmp_result::LLMP_INVALID_ARGUMENT,
            ErrorKind::Internal => llmp_result::LLMP_INTERNAL,
        }
    }
}

/// A failure on its way out of the library: what a host learns about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The code returned to the caller.
    pub code: llmp_result,
    /// A human-readable description: for a hook failure, the hook, the
    /// script location and the message (`routing hook (scripts.routing:3):
    /// ...`). The kind is not repeated.
    pub message: String,
    /// The hook that ran, when known.
    pub hook: Option<HookName>,
    /// The script's name, when known.
    pub script: Option<String>,
    /// The line in the script, when known.
    pub line: Option<u32>,
}

impl Failure {
    /// A failure with a code and a message, and no location.
    pub fn new(code: llmp_result, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            hook: None,
            script: None,
            line: None,
        }
    }

    /// `LLMP_INVALID_ARGUMENT` with a message.
    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(llmp_result::LLMP_INVALID_ARGUMENT, message)
    }
}

impl From<HookError> for Failure {
    fn from(e: HookError) -> Failure {
        let message = match e.hook {
            Some(hook) => format!("{hook} hook ({}): {}", e.location(), e.message),
            None => e.message.clone(),
        };
        Failure {
            code: llmp_result::from_kind(e.kind),
            message,
            hook: e.hook,
            script: e.script,
            line: e.line,
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Failure {
        Failure::new(llmp_result::LLMP_CONFIG, e.to_string())
    }
}

/// Details of a failed call: kind, message and, for hook failures, where
/// it happened. Created by the library, owned by the caller, freed with
/// `llmp_error_free`. Immutable: safe to read from any thread.
pub struct llmp_error {
    code: llmp_result,
    message: CString,
    hook: Option<&'static CStr>,
    script: Option<CString>,
    line: u32,
}

/// A C string from Rust text; an interior NUL (a script can put one in an
/// error message) is shown as `\0` rather than cutting the text short.
fn c_string(text: String) -> CString {
    match CString::new(text) {
        Ok(s) => s,
        Err(e) => {
            let text = String::from_utf8_lossy(&e.into_vec()).replace('\0', "\\0");
            CString::new(text).unwrap_or_default()
        }
    }
}

fn hook_name(hook: HookName) -> &'static CStr {
    match hook {
        HookName::Routing => c"routing",
        HookName::Auth => c"auth",
        HookName::RequestTransform => c"request_transform",
        HookName::ResponseTransform => c"response_transform",
        HookName::RateLimit => c"rate_limit",
        HookName::Usage => c"usage",
        HookName::ErrorHandler => c"error_handler",
    }
}

impl From<Failure> for llmp_error {
    fn from(f: Failure) -> llmp_error {
        llmp_error {
            code: f.code,
            message: c_string(f.message),
            hook: f.hook.map(hook_name),
            script: f.script.map(c_string),
            line: f.line.unwrap_or(0),
        }
    }
}

/// Read `err` for an accessor: `None` when it is NULL.
///
/// # Safety
/// `err` is NULL or a pointer returned through an `llmp_error **` by this
/// library and not yet freed.
unsafe fn error_ref<'a>(err: *const llmp_error) -> Option<&'a llmp_error> {
    // SAFETY: the caller passes NULL or a live error from `Box::into_raw`;
    // `as_ref` maps NULL to `None`.
    unsafe { err.as_ref() }
}

/// The error's kind: `"invalid_argument"`, `"config"`, `"timeout"`,
/// `"memory"`, `"script_error"`, `"bad_output"`, `"internal"` or `"panic"`.
///
/// Ownership: the string is static; do not free it. NULL when `err` is NULL.
/// Thread safety: safe from any thread.
///
/// # Safety
/// `err` is NULL or an error from this library that is not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_error_kind(err: *const llmp_error) -> *const c_char {
    boundary::call_or(ptr::null(), || {
        // SAFETY: `err` is NULL or a live error (the function's contract).
        match unsafe { error_ref(err) } {
            Some(e) => e.code.kind().as_ptr(),
            None => ptr::null(),
        }
    })
}

/// The error's code, the same value the failed call returned.
///
/// `LLMP_INVALID_ARGUMENT` when `err` is NULL.
///
/// Ownership: returns a value; `err` stays owned by the caller.
/// Thread safety: safe from any thread.
///
/// # Safety
/// `err` is NULL or an error from this library that is not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_error_code(err: *const llmp_error) -> llmp_result {
    boundary::call_or(llmp_result::LLMP_INVALID_ARGUMENT, || {
        // SAFETY: `err` is NULL or a live error (the function's contract).
        match unsafe { error_ref(err) } {
            Some(e) => e.code,
            None => llmp_result::LLMP_INVALID_ARGUMENT,
        }
    })
}

/// A human-readable description of the failure, for logs: for a hook
/// failure the hook, `script:line` when known, and the message
/// (`routing hook (scripts.routing:3): attempt to index a nil value`); the
/// kind is not repeated (see `llmp_error_kind`). Never contains the request
/// body.
///
/// Ownership: the string belongs to `err` and lives until
/// `llmp_error_free(err)`; do not free it. NULL when `err` is NULL.
/// Thread safety: safe from any thread.
///
/// # Safety
/// `err` is NULL or an error from this library that is not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_error_message(err: *const llmp_error) -> *const c_char {
    boundary::call_or(ptr::null(), || {
        // SAFETY: `err` is NULL or a live error (the function's contract).
        match unsafe { error_ref(err) } {
            Some(e) => e.message.as_ptr(),
            None => ptr::null(),
        }
    })
}

/// The hook that failed (`"routing"`, ...), or NULL when the failure is not
/// tied to a hook (configuration, argument checks) or `err` is NULL.
///
/// Ownership: static string; do not free it.
/// Thread safety: safe from any thread.
///
/// # Safety
/// `err` is NULL or an error from this library that is not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_error_hook(err: *const llmp_error) -> *const c_char {
    boundary::call_or(ptr::null(), || {
        // SAFETY: `err` is NULL or a live error (the function's contract).
        match unsafe { error_ref(err) }.and_then(|e| e.hook) {
            Some(h) => h.as_ptr(),
            None => ptr::null(),
        }
    })
}

/// The script that failed (`"scripts.routing"` for an inline script, the
/// file name for a `script_file`), or NULL when unknown or `err` is NULL.
///
/// Ownership: the string belongs to `err`; do not free it.
/// Thread safety: safe from any thread.
///
/// # Safety
/// `err` is NULL or an error from this library that is not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_error_script(err: *const llmp_error) -> *const c_char {
    boundary::call_or(ptr::null(), || {
        // SAFETY: `err` is NULL or a live error (the function's contract).
        match unsafe { error_ref(err) }.and_then(|e| e.script.as_ref()) {
            Some(s) => s.as_ptr(),
            None => ptr::null(),
        }
    })
}

/// The line in the script where the failure happened; 0 when unknown or
/// `err` is NULL.
///
/// Ownership: returns a value; `err` stays owned by the caller.
/// Thread safety: safe from any thread.
///
/// # Safety
/// `err` is NULL or an error from this library that is not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_error_line(err: *const llmp_error) -> u32 {
    boundary::call_or(0, || {
        // SAFETY: `err` is NULL or a live error (the function's contract).
        unsafe { error_ref(err) }.map_or(0, |e| e.line)
    })
}

/// Free an error returned through an `llmp_error **` out-parameter.
/// `llmp_error_free(NULL)` does nothing.
///
/// Ownership: takes `err`; it and every string read from it are invalid
/// afterwards. Thread safety: do not free an error another thread is still
/// reading.
///
/// # Safety
/// `err` is NULL or an error from this library, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_error_free(err: *mut llmp_error) {
    boundary::call_or((), || {
        if !err.is_null() {
            // SAFETY: a non-NULL `err` came from `Box::into_raw` in
            // `boundary::call` and is freed once (the function's contract).
            drop(unsafe { Box::from_raw(err) });
        }
    })
}
