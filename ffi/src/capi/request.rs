//! `llmp_request`: a request parsed once (its body included), for any
//! number of hook calls through `llmp_engine_run_prepared`.

#![allow(non_camel_case_types)]

use std::ffi::c_char;

use super::boundary::{self, byte_slice, non_null};
use super::error::{llmp_error, llmp_result};
use crate::input::Request;

/// A client request parsed once: id, headers, body, ... as the `request`
/// global of every hook. Immutable once built.
///
/// Create with `llmp_request_new`, free with `llmp_request_free`. Thread
/// safety: one request may be passed to any number of
/// `llmp_engine_run_prepared` calls at once, on any threads, and on any
/// engine.
pub struct llmp_request {
    request: Request,
}

impl llmp_request {
    /// The parsed request inside.
    pub fn request(&self) -> &Request {
        &self.request
    }
}

/// Parse a request once, for every hook that runs on it.
///
/// `request_json` points to `len` bytes of UTF-8 (no terminating NUL
/// needed): the JSON object a hook sees as `request`, e.g.
/// `{"id": "r1", "headers": {...}, "body_raw": "{\"model\": ...}"}`. The
/// body may be given parsed (`body`) or as JSON text (`body_raw`, what a
/// host usually holds); either way it is parsed here, once. The headers
/// may be given as scripts see them (`headers`, kept as given) or as the
/// HTTP message carried them (`headers_raw`: names in any case, an array
/// of values for a header sent more than once), which the core turns into
/// the form every HTTP host gives scripts (`Title-Case` names, repeated
/// values joined by `, `). Other fields: `id`, `user_id`, `api_key`,
/// `client_ip`, `path`, `backend_url`; any further field is passed to
/// scripts as is.
///
/// Limits: no engine is involved yet, so the text is parsed within the
/// largest limits a config may set (4 GiB, 1000 levels; JSON nested deeper
/// than 128 levels is rejected by the parser on every path). Each
/// `llmp_engine_run_prepared` call then checks the request against the
/// hook's own `max_input_bytes` and `max_depth`, so a hook accepts a
/// request exactly when it would accept the same JSON in
/// `llmp_engine_run`'s input.
///
/// On success returns `LLMP_OK` and stores a new request in `*out`; the
/// caller owns it and frees it with `llmp_request_free` once its last call
/// has returned. On failure returns `LLMP_INVALID_ARGUMENT` (NULL
/// `request_json` or `out`, text that is not UTF-8, not valid JSON, not an
/// object, a `body_raw` that is not valid JSON), leaves `*out` unchanged
/// and, if `err` is not NULL, stores an error the caller frees with
/// `llmp_error_free`.
///
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `request_json` is NULL or points to `len` readable bytes; `out` is NULL
/// or writable; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_request_new(
    request_json: *const c_char,
    len: usize,
    out: *mut *mut llmp_request,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let body = || {
        non_null(out, "out")?;
        // SAFETY: `request_json` is NULL or `len` readable bytes (contract).
        let text = unsafe { byte_slice(request_json, len, "request_json") }?;
        let request = Request::parse(text)?;
        let boxed = Box::into_raw(Box::new(llmp_request { request }));
        // SAFETY: `out` is not NULL and writable (checked, contract).
        unsafe { out.write(boxed) };
        Ok(())
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, body) }
}

/// Free a request. `llmp_request_free(NULL)` does nothing.
///
/// Ownership: takes `request`; it is invalid afterwards. Results and errors
/// of calls that used it stay valid.
/// Thread safety: no `llmp_engine_run_prepared` call using `request` may be
/// running, on any thread.
///
/// # Safety
/// `request` is NULL or a live request, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_request_free(request: *mut llmp_request) {
    boundary::call_or((), || {
        if !request.is_null() {
            // SAFETY: a non-NULL `request` came from `Box::into_raw` in
            // `llmp_request_new` and is freed once (the contract).
            drop(unsafe { Box::from_raw(request) });
        }
    })
}
