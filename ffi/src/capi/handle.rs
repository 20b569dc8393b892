//! `llmp_handle`: one API request's life in the core (the core's
//! `RequestHandle`), driven step by step by a C host that only does I/O:
//! route, the body to send upstream, the client's answer (whole, or event
//! by event for a stream), and the charge. Each body is parsed once, by
//! the core, and every hook of the request reads that parse.
//!
//! Outputs are borrowed from the handle: each stays valid until the next
//! call of the same step on the handle, or until the handle is freed.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, CString};
use std::ptr;

use llmproxy_core::hooks::{HeaderChange, RouteDecision};
use llmproxy_core::http::script_headers::{Message, ScriptHeaders};
use llmproxy_core::request_handle::{Relay, RequestHandle, Step};
use llmproxy_core::Engine;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::boundary::{self, byte_slice, non_null, utf8_cstr};
use super::engine::llmp_engine;
use super::error::{llmp_error, llmp_result, Failure};
use super::globals::llmp_globals;
use crate::input::{self, Request};

/// A request handle: the request, its body parsed once, and what its steps
/// decided so far. Create with `llmp_handle_new`, free with
/// `llmp_handle_free`. Thread safety: one thread at a time (a step changes
/// the handle); different handles are independent.
pub struct llmp_handle {
    handle: RequestHandle,
    /// The request's canonical path (`llmp_handle_path`).
    path: CString,
    /// The backend `llmp_handle_route` chose.
    backend: Option<CString>,
    /// What `llmp_handle_upstream` decided.
    upstream_body: Option<Vec<u8>>,
    upstream_headers: Option<CString>,
    /// What `llmp_handle_respond` decided.
    answer_body: Option<Vec<u8>>,
    answer_headers: Option<CString>,
    /// What `llmp_handle_event` decided.
    event: Vec<u8>,
    event_headers: Option<CString>,
    /// What `llmp_handle_usage` decided, as JSON.
    billing: Option<CString>,
    /// The failure of the last step whose hook failed and fell back.
    fell_back: Option<llmp_error>,
}

impl llmp_handle {
    /// Keep or clear the failure of a step; the decision, or the failure
    /// of a hook whose policy denied the request.
    fn settle<T>(&mut self, step: Step<T>) -> Result<T, Failure> {
        self.fell_back = None;
        match step {
            Step::Ran(v) => Ok(v),
            Step::FellBack(v, e) => {
                self.fell_back = Some(llmp_error::from(Failure::from(e)));
                Ok(v)
            }
            Step::Denied(e) => Err(Failure::from(e)),
        }
    }
}

/// Create a request handle: the request's fields, and its body parsed once.
///
/// - `engine`: the engine whose hooks the handle runs; pass the same one to
///   every step.
/// - `request_json`, `request_len`: a JSON object of the request's fields as
///   hooks see them: `path` (required: `/v1/chat/completions`,
///   `/v1/completions` or `/v1/embeddings`), `id`, `headers`, `user_id`,
///   `api_key`, `client_ip`, any further field as is. Not `body`.
/// - `body`, `body_len`: the client's body as it came (a JSON object),
///   parsed here within the engine's `max_depth`; the OpenAI fields a host
///   acts on (`model`, `stream`, `stream_options`) must have their types.
///
/// On success returns `LLMP_OK` and stores a new handle in `*out`; free it
/// with `llmp_handle_free`. On failure returns `LLMP_INVALID_ARGUMENT` (a
/// NULL argument, text that is not UTF-8 JSON, a request that is not an
/// object or holds a body, a path that is not an API endpoint, a body that
/// is not a JSON object or has a field of the wrong type), leaves `*out`
/// unchanged and, if `err` is not NULL, stores an error to free with
/// `llmp_error_free`. The host answers such a request 400.
///
/// Thread safety: may be called from any thread.
///
/// # Safety
/// `engine` is NULL or a live engine; `request_json` is NULL or
/// `request_len` readable bytes; `body` is NULL or `body_len` readable
/// bytes; `out` and `err` are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_handle_new(
    engine: *const llmp_engine,
    request_json: *const c_char,
    request_len: usize,
    body: *const c_char,
    body_len: usize,
    out: *mut *mut llmp_handle,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let run = || {
        // SAFETY: `engine` is NULL or a live engine (the contract).
        let engine = unsafe { engine_ref(engine) }?;
        non_null(out, "out")?;
        // SAFETY: both are NULL or readable for their lengths (the contract).
        let (text, body) = unsafe {
            (
                byte_slice(request_json, request_len, "request_json")?,
                byte_slice(body, body_len, "body")?,
            )
        };
        let handle = new_handle(engine, text, body)?;
        // SAFETY: `out` is not NULL and writable (checked, contract).
        unsafe { out.write(Box::into_raw(Box::new(handle))) };
        Ok(())
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, run) }
}

fn new_handle(engine: &Engine, text: &[u8], body: &[u8]) -> Result<llmp_handle, Failure> {
    let handle = input::request_handle(engine, Request::parse(text)?, body, None)?;
    // Canonical paths hold no NUL (core refuses controls and `%00`).
    let path = c_text(handle.request().path.clone().unwrap_or_default())?;
    Ok(llmp_handle {
        handle,
        path,
        backend: None,
        upstream_body: None,
        upstream_headers: None,
        answer_body: None,
        answer_headers: None,
        event: Vec::new(),
        event_headers: None,
        billing: None,
        fell_back: None,
    })
}

/// The routing step: which backend of `globals`' `backends` gets the
/// request.
///
/// On success returns `LLMP_OK` and stores in `*backend` the chosen
/// backend's name (NUL-terminated, borrowed from the handle), or NULL for
/// "the host's own balancer" (no routing script, it returned nil, or it
/// failed under `on_error: standard`: see `llmp_handle_fell_back`).
///
/// Errors: `LLMP_INVALID_ARGUMENT` for a NULL argument or `globals` without
/// a valid `backends` object; a hook failure code (`LLMP_TIMEOUT`,
/// `LLMP_MEMORY`, `LLMP_SCRIPT_ERROR`, `LLMP_BAD_OUTPUT`) when the script
/// failed and its policy is `deny`: the host answers 503.
///
/// # Safety
/// `engine`, `handle` and `globals` are NULL or live; `backend` and `err`
/// are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_handle_route(
    engine: *const llmp_engine,
    handle: *mut llmp_handle,
    globals: *const llmp_globals,
    backend: *mut *const c_char,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let run = || {
        // SAFETY: NULL or live, writable for `handle` (the contract).
        let (engine, h) = unsafe { (engine_ref(engine)?, handle_mut(handle)?) };
        non_null(backend, "backend")?;
        // SAFETY: `globals` is NULL or live (the contract).
        let globals = unsafe { globals.as_ref() }.ok_or_else(|| Failure::invalid("globals is NULL"))?;
        let backends = globals.globals().backends()?;
        let step = h.handle.route(engine, backends);
        h.backend = match h.settle(step)? {
            RouteDecision::Default => None,
            RouteDecision::Backend(name) => Some(c_text(name)?),
        };
        let name = h.backend.as_ref().map_or(ptr::null(), |n| n.as_ptr());
        // SAFETY: `backend` is not NULL and writable (the contract).
        unsafe { backend.write(name) };
        Ok(())
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, run) }
}

/// The request_transform step for the backend at `backend_url` (a
/// NUL-terminated URL; scripts see it as `request.backend_url`), and the
/// body to send it.
///
/// On success returns `LLMP_OK` and stores:
/// - `*body`, `*body_len`: the body to send (borrowed), or NULL and 0 to
///   send the client's bytes unchanged;
/// - `*headers`: the header changes as a NUL-terminated JSON object
///   (borrowed; a string sets a header, `null` removes it), or NULL for
///   none;
/// - `*stream`: 1 when the request is a stream (answer it with
///   `llmp_handle_stream` and `llmp_handle_event`), else 0.
///
/// For a stream whose client did not ask for
/// `stream_options.include_usage`, the body asks for it (the backend
/// reports usage only then) and the events hide it from the client.
///
/// Errors: as for `llmp_handle_route`. Call again for a retry on another
/// backend.
///
/// # Safety
/// `engine` and `handle` are NULL or live; `backend_url` is NULL or
/// NUL-terminated; the out-parameters and `err` are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_handle_upstream(
    engine: *const llmp_engine,
    handle: *mut llmp_handle,
    backend_url: *const c_char,
    body: *mut *const c_char,
    body_len: *mut usize,
    headers: *mut *const c_char,
    stream: *mut i32,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let run = || {
        // SAFETY: NULL or live, writable for `handle` (the contract).
        let (engine, h) = unsafe { (engine_ref(engine)?, handle_mut(handle)?) };
        // SAFETY: NULL or NUL-terminated (the contract).
        let url = unsafe { utf8_cstr(backend_url, "backend_url") }?;
        non_null(body, "body")?;
        non_null(body_len, "body_len")?;
        non_null(headers, "headers")?;
        non_null(stream, "stream")?;
        let step = h.handle.upstream(engine, url);
        let up = h.settle(step)?;
        h.upstream_headers = header_changes(&up.headers)?;
        h.upstream_body = up.body;
        let (p, len) = bytes_out(h.upstream_body.as_deref());
        let hp = h.upstream_headers.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        // SAFETY: all four are not NULL and writable (checked, contract).
        unsafe {
            body.write(p);
            body_len.write(len);
            headers.write(hp);
            stream.write(i32::from(up.stream));
        }
        Ok(())
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, run) }
}

/// The response_transform step on a backend's whole (non-stream) answer:
/// `status`, its headers as a JSON object (`headers_json`, `headers_len`;
/// NULL for none) whose values are strings (or numbers), or arrays of
/// strings for a header sent more than once, its body as it came, and `latency_ms`
/// since the request went upstream (scripts see it). Scripts see the
/// headers as in every host: names in Title-Case, repeated values joined
/// with `, `, without `Content-Length` and hop-by-hop headers (which a
/// script may not set). The body is parsed
/// once, here, when response_transform is on; with only the usage hook on
/// it is copied and parsed only if the usage script reads `response.body`.
/// The usage it reports is kept for `llmp_handle_usage`.
///
/// On success returns `LLMP_OK` and stores the status to send in
/// `*out_status`, the body to send in `*out_body`, `*out_body_len`
/// (borrowed; NULL and 0 to send the backend's bytes unchanged), and the
/// header changes in `*out_headers` (as for `llmp_handle_upstream`).
///
/// Errors: `LLMP_INVALID_ARGUMENT` for a NULL argument or headers that are
/// not such an object; a hook failure code when the script failed under
/// `on_error: deny` (the host answers 503).
///
/// # Safety
/// `engine` and `handle` are NULL or live; `headers_json` is NULL or
/// `headers_len` readable bytes; `body` is NULL or `body_len` readable
/// bytes; the out-parameters and `err` are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_handle_respond(
    engine: *const llmp_engine,
    handle: *mut llmp_handle,
    status: u16,
    headers_json: *const c_char,
    headers_len: usize,
    body: *const c_char,
    body_len: usize,
    latency_ms: f64,
    out_status: *mut u16,
    out_body: *mut *const c_char,
    out_body_len: *mut usize,
    out_headers: *mut *const c_char,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let run = || {
        // SAFETY: NULL or live, writable for `handle` (the contract).
        let (engine, h) = unsafe { (engine_ref(engine)?, handle_mut(handle)?) };
        non_null(out_status, "out_status")?;
        non_null(out_body, "out_body")?;
        non_null(out_body_len, "out_body_len")?;
        non_null(out_headers, "out_headers")?;
        // SAFETY: NULL or readable for their lengths (the contract).
        let (headers, body) = unsafe {
            (
                optional_bytes(headers_json, headers_len)?,
                byte_slice(body, body_len, "body")?,
            )
        };
        let headers = response_headers(headers)?;
        let step = h.handle.respond(engine, status, headers, body, latency_ms);
        let answer = h.settle(step)?;
        h.answer_headers = header_changes(&answer.headers)?;
        h.answer_body = answer.body;
        let (p, len) = bytes_out(h.answer_body.as_deref());
        let hp = h.answer_headers.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        // SAFETY: all four are not NULL and writable (checked, contract).
        unsafe {
            out_status.write(answer.status);
            out_body.write(p);
            out_body_len.write(len);
            out_headers.write(hp);
        }
        Ok(())
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, run) }
}

/// A stream's answer begins: the backend's `status` and headers (as for
/// `llmp_handle_respond`), which response_transform sees with each event.
///
/// Errors: `LLMP_INVALID_ARGUMENT` for a NULL `handle` or headers that are
/// not such an object.
///
/// # Safety
/// `handle` is NULL or live; `headers_json` is NULL or `headers_len`
/// readable bytes; `err` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_handle_stream(
    handle: *mut llmp_handle,
    status: u16,
    headers_json: *const c_char,
    headers_len: usize,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let run = || {
        // SAFETY: NULL or live and writable (the contract).
        let h = unsafe { handle_mut(handle) }?;
        // SAFETY: NULL or readable for its length (the contract).
        let headers = response_headers(unsafe { optional_bytes(headers_json, headers_len) }?)?;
        h.handle.stream(status, headers);
        Ok(())
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, run) }
}

/// One event of a backend's stream: its `data` field (`data`, `data_len`),
/// `latency_ms` since the request went upstream.
/// The usage it carries is kept for `llmp_handle_usage`, what the forced
/// `include_usage` added is removed, and response_transform runs on it.
///
/// On success returns `LLMP_OK` and stores in `*out`, `*out_len` the data
/// to send (borrowed; NULL and 0: send the event as it came), in `*drop` 1
/// when the event must not reach the client at all (the usage chunk the
/// client did not ask for), else 0, and the response head changes the
/// transform asked for: `*status` (0 for none) and `*headers` (as for
/// `llmp_handle_upstream`, borrowed, or NULL). A host sends the response
/// head with the first event it relays, with that event's changes applied
/// (as the gateway does); later events' come too late.
///
/// Errors: `LLMP_INVALID_ARGUMENT` for a NULL argument; a hook failure code
/// when the script failed under `on_error: deny` (the host ends the
/// stream with an error event).
///
/// # Safety
/// `engine` and `handle` are NULL or live; `data` is NULL or `data_len`
/// readable bytes; the out-parameters and `err` are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_handle_event(
    engine: *const llmp_engine,
    handle: *mut llmp_handle,
    data: *const c_char,
    data_len: usize,
    latency_ms: f64,
    out: *mut *const c_char,
    out_len: *mut usize,
    drop: *mut i32,
    status: *mut u16,
    headers: *mut *const c_char,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let run = || {
        // SAFETY: NULL or live, writable for `handle` (the contract).
        let (engine, h) = unsafe { (engine_ref(engine)?, handle_mut(handle)?) };
        non_null(out, "out")?;
        non_null(out_len, "out_len")?;
        non_null(drop, "drop")?;
        non_null(status, "status")?;
        non_null(headers, "headers")?;
        // SAFETY: NULL or readable for its length (the contract).
        let data = unsafe { byte_slice(data, data_len, "data") }?;
        let step = h.handle.event(engine, data, latency_ms);
        let ev = h.settle(step)?;
        h.event_headers = header_changes(&ev.headers)?;
        let hp = h.event_headers.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        let dropped = ev.relay == Relay::Drop;
        let (p, len) = match ev.relay {
            Relay::Data(d) => {
                h.event = d;
                (h.event.as_ptr().cast::<c_char>(), h.event.len())
            }
            Relay::Unchanged | Relay::Drop => (ptr::null(), 0),
        };
        // SAFETY: all five are not NULL and writable (checked, contract).
        unsafe {
            out.write(p);
            out_len.write(len);
            drop.write(i32::from(dropped));
            status.write(ev.status.unwrap_or(0));
            headers.write(hp);
        }
        Ok(())
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, run) }
}

/// The usage step, after the answer was sent: the usage hook on the
/// backend's usage (for a stream whose usage never came, the core's
/// estimate from the request's text and the events passed to
/// `llmp_handle_event`, marked `"estimated": true`; else zeros when it
/// reported none) and what the request is charged. Never fails because of the script: a failing one records the
/// backend's usage (see `llmp_handle_fell_back`).
///
/// On success returns `LLMP_OK` and stores in `*json`, `*json_len` a
/// NUL-terminated JSON object (borrowed): `usage` (the backend's),
/// `record` (the script's record, or `null` when the usage is the
/// record), `billable_tokens` (the quota charge), `limit_tokens` (the
/// tokens-per-minute charge), `prompt_tokens`, `completion_tokens`,
/// `total_tokens` (the ledger's columns) and `cost` (or `null`).
///
/// # Safety
/// `engine` and `handle` are NULL or live; `json`, `json_len` and `err` are
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_handle_usage(
    engine: *const llmp_engine,
    handle: *mut llmp_handle,
    json: *mut *const c_char,
    json_len: *mut usize,
    err: *mut *mut llmp_error,
) -> llmp_result {
    let run = || {
        // SAFETY: NULL or live, writable for `handle` (the contract).
        let (engine, h) = unsafe { (engine_ref(engine)?, handle_mut(handle)?) };
        non_null(json, "json")?;
        non_null(json_len, "json_len")?;
        let step = h.handle.usage(engine);
        let b = h.settle(step)?;
        let c = &b.charge;
        // The record's text, written as it is (it is JSON: core wrote it).
        let record = b
            .custom
            .then(|| serde_json::from_str::<&RawValue>(&b.record_json))
            .transpose()
            .map_err(|e| Failure::new(llmp_result::LLMP_INTERNAL, format!("cannot read the record: {e}")))?;
        let out = BillingJson {
            usage: &b.usage,
            record,
            billable_tokens: c.billable_tokens,
            limit_tokens: c.limit_tokens,
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            total_tokens: c.total_tokens,
            cost: c.cost,
        };
        let text = serde_json::to_string(&out)
            .map_err(|e| Failure::new(llmp_result::LLMP_INTERNAL, format!("cannot encode the charge: {e}")))?;
        let text = h.billing.insert(c_text(text)?);
        // SAFETY: both are not NULL and writable (checked, contract).
        unsafe {
            json.write(text.as_ptr());
            json_len.write(text.as_bytes().len());
        }
        Ok(())
    };
    // SAFETY: `err` is NULL or writable (this function's contract).
    unsafe { boundary::call(err, run) }
}

/// What `llmp_handle_usage` hands out, encoded as it is written (no
/// intermediate JSON value).
#[derive(serde::Serialize)]
struct BillingJson<'a> {
    usage: &'a Value,
    record: Option<&'a RawValue>,
    billable_tokens: u64,
    limit_tokens: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    cost: Option<f64>,
}

/// The failure of the handle's last step when its hook failed and the
/// policy (`on_error: standard`) made the step succeed with the decision
/// for nil; NULL when the last step's hook did not fail. For the host's
/// metrics: the core has logged it already.
///
/// Ownership: borrowed from the handle, valid until its next step; read it
/// with the `llmp_error_*` accessors, never `llmp_error_free` it.
///
/// # Safety
/// `handle` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_handle_fell_back(handle: *const llmp_handle) -> *const llmp_error {
    boundary::call_or(ptr::null(), || {
        // SAFETY: NULL or live (the contract).
        match unsafe { handle.as_ref() } {
            Some(h) => h.fell_back.as_ref().map_or(ptr::null(), |e| e as *const llmp_error),
            None => ptr::null(),
        }
    })
}

/// The request's path in core's canonical form (`http::path`: unreserved
/// escapes decoded, duplicate slashes and dot segments removed), which
/// `llmp_handle_new` matched the endpoint on and scripts see as
/// `request.path`: the path a host sends upstream, with the client's query
/// string. (A path with no canonical form, such as one with an encoded
/// `/`, makes `llmp_handle_new` fail with `LLMP_INVALID_ARGUMENT`; the
/// gateway answers it 400 `invalid_path`.) NULL for a NULL handle.
///
/// Ownership: borrowed from the handle, valid until it is freed.
///
/// # Safety
/// `handle` is NULL or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_handle_path(handle: *const llmp_handle) -> *const c_char {
    boundary::call_or(ptr::null(), || {
        // SAFETY: NULL or live (the contract).
        unsafe { handle.as_ref() }.map_or(ptr::null(), |h| h.path.as_ptr())
    })
}

/// Free a request handle. `llmp_handle_free(NULL)` does nothing.
///
/// Ownership: takes `handle`; it and everything borrowed from it are
/// invalid afterwards.
///
/// # Safety
/// `handle` is NULL or a live handle, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn llmp_handle_free(handle: *mut llmp_handle) {
    boundary::call_or((), || {
        if !handle.is_null() {
            // SAFETY: a non-NULL `handle` came from `Box::into_raw` in
            // `llmp_handle_new` and is freed once (the contract).
            drop(unsafe { Box::from_raw(handle) });
        }
    })
}

/// # Safety
/// `engine` is NULL or live.
unsafe fn engine_ref<'a>(engine: *const llmp_engine) -> Result<&'a Engine, Failure> {
    // SAFETY: the caller's promise.
    unsafe { engine.as_ref() }
        .map(llmp_engine::engine)
        .ok_or_else(|| Failure::invalid("engine is NULL"))
}

/// # Safety
/// `handle` is NULL or live, and no other reference to it is in use.
unsafe fn handle_mut<'a>(handle: *mut llmp_handle) -> Result<&'a mut llmp_handle, Failure> {
    // SAFETY: the caller's promise.
    unsafe { handle.as_mut() }.ok_or_else(|| Failure::invalid("handle is NULL"))
}

/// # Safety
/// `p` is NULL or `len` readable bytes.
unsafe fn optional_bytes<'a>(p: *const c_char, len: usize) -> Result<Option<&'a [u8]>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's promise.
    unsafe { byte_slice(p, len, "headers_json") }.map(Some)
}

/// A backend's answer headers from a JSON object (a name's value a string
/// or a number, or an array of strings for a header sent more than once), in the form
/// scripts see in every host (core's [`ScriptHeaders`]: Title-Case names,
/// repeated values joined, without `Content-Length` and hop-by-hop
/// headers).
fn response_headers(text: Option<&[u8]>) -> Result<Vec<(String, String)>, Failure> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let map: Map<String, Value> =
        serde_json::from_slice(text).map_err(|e| Failure::invalid(format!("headers_json: {e}")))?;
    let mut out = ScriptHeaders::new(Message::Answer, map.len());
    for (name, value) in &map {
        match value {
            Value::String(s) => out.add(name, s.as_bytes()),
            Value::Number(n) => out.add(name, n.to_string().as_bytes()),
            Value::Array(values) => {
                for v in values {
                    let Value::String(s) = v else {
                        return Err(not_a_header(name));
                    };
                    out.add(name, s.as_bytes());
                }
            }
            _ => return Err(not_a_header(name)),
        }
    }
    Ok(out.into_pairs())
}

fn not_a_header(name: &str) -> Failure {
    Failure::invalid(format!(
        "headers_json: header {name} must be a string, a number or an array of strings"
    ))
}

/// Header changes as a JSON object (`null` removes), or `None` for none:
/// written as text, without a JSON value built first (the changes are
/// checked and sorted by name; a Lua table's keys are unique).
fn header_changes(changes: &[(String, HeaderChange)]) -> Result<Option<CString>, Failure> {
    if changes.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(2 + changes.iter().map(|(n, _)| n.len() + 32).sum::<usize>());
    out.push(b'{');
    for (i, (name, change)) in changes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_string(&mut out, name)?;
        out.push(b':');
        match change {
            HeaderChange::Set(value) => json_string(&mut out, value)?,
            HeaderChange::Remove => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
    CString::new(out)
        .map(Some)
        .map_err(|_| Failure::new(llmp_result::LLMP_INTERNAL, "text holds a NUL byte"))
}

/// Append `s` as a JSON string.
fn json_string(out: &mut Vec<u8>, s: &str) -> Result<(), Failure> {
    serde_json::to_writer(&mut *out, s)
        .map_err(|e| Failure::new(llmp_result::LLMP_INTERNAL, format!("cannot encode a header: {e}")))
}

fn bytes_out(bytes: Option<&[u8]>) -> (*const c_char, usize) {
    bytes.map_or((ptr::null(), 0), |b| (b.as_ptr().cast::<c_char>(), b.len()))
}

/// A NUL-terminated copy of `text` (JSON and backend names hold no NUL).
fn c_text(text: String) -> Result<CString, Failure> {
    CString::new(text).map_err(|_| Failure::new(llmp_result::LLMP_INTERNAL, "text holds a NUL byte"))
}
