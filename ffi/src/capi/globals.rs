//! `llmp_globals`: a hook's other globals (`backends`, `key_info`, ...)
//! parsed once, for any number of calls through `llmp_engine_run_prepared`.

#![allow(non_camel_case_types)]

use std::ffi::c_char;

use super::boundary::{self, byte_slice, non_null};
use super::error::{llmp_error, llmp_result};
use crate::input::Globals;

/// A hook's globals other than `request`, parsed once. Immutable once
/// built.
///
/// Create with `llmp_globals_new`, free with `llmp_globals_free`. Thread
/// safety: one globals object may be passed to any number of
/// `llmp_engine_run_prepared` calls at once, on any threads, and on any
/// engine.
pub struct llmp_globals {
    globals: Globals,
}

impl llmp_globals {
    /// The parsed globals inside.
    pub fn globals(&self) -> &Globals {
        &self.globals
    }
}

/// Parse a hook's other globals once: build one when they change (the
/// backend set, say), not on every call.
///
/// `json` points to `len` bytes of UTF-8 (no terminating NUL needed): a
/// JSON object of globals, e.g. `{"backends": {"ultra": {"url": ...}}}` for
/// routing, `{"key_info": {...}}` for auth, `{"usage": {...}}` for usage.
/// `response` (response_transform) is parsed into the response scripts
/// see (`status_code`, `headers`, `body`, `is_stream`). `request` is not
/// accepted here: it goes in an `llmp_request`.
///
/// Limits: as for `llmp_request_new`, parsed within the largest limits a
/// config may set and checked against the hook's limits on every call;
/// the request's and the globals' text count together against
/// `max_input_bytes`, as one input would.
///
/// On success returns `LLMP_OK` and stores a new globals object in `*out`;
/// the caller owns it and frees it with `llmp_globals_free` once its last
/// call has returned. On failure returns `LLMP_INVALID_ARGUMENT` (NULL
/// `json` or `out`, text that is not UTF-8, not valid JSON, not an object,
/// an object with a `request` key, a `response` that is not an object or
/// has a non-numeric `status_code`), leaves `*out` unchanged and, if `err`
/// is not NULL, stores an error the caller frees with `llmp_error_free`.
///
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `json` is NULL or points to `len` readable bytes; `out` is NULL or
/// writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_globals_new(
    json: *const c_char,
    len: usize,
    out: *mut *mut llmp_globals,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let body = || {
        non_null(out, "out")?;
        // SAFETY: `json` is NULL or `len` readable bytes (the contract).
        let text = unsafe { byte_slice(json, len, "json") }?;
        let globals = Globals::parse(text)?;
        let boxed = Box::into_raw(Box::new(llmp_globals { globals }));
        // SAFETY: `out` is not NULL and writable (checked, contract).
        unsafe { out.write(boxed) };
        Ok(())
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, body) }
}

/// Free a globals object. `llmp_globals_free(NULL)` does nothing.
///
/// Ownership: takes `globals`; it is invalid afterwards. Results and errors
/// of calls that used it stay valid.
/// Thread safety: no `llmp_engine_run_prepared` call using `globals` may be
/// running, on any thread.
///
/// # Safety
/// `globals` is NULL or a live globals object, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_globals_free(globals: *mut llmp_globals) {
    boundary::call_or((), || {
        if !globals.is_null() {
            // SAFETY: a non-NULL `globals` came from `Box::into_raw` in
            // `llmp_globals_new` and is freed once (the contract).
            drop(unsafe { Box::from_raw(globals) });
        }
    })
}
