//! `llmproxy.request(tbl)` read in place.
//!
//! The nginx host builds one fields table per request (`id`,
//! `headers_raw`, `client_ip`, `path`, `api_key`, `body_raw`). Turning it into a JSON
//! object and that object into the core's [`RequestInfo`] copied every
//! string twice and the body's text once more; this reads the table on the
//! host's stack, in one protected call (`protect`), straight into a `RequestInfo`, and
//! parses `body_raw` from the Lua string's own bytes.
//!
//! The JSON path stays the reference: a table this walk cannot read
//! exactly as that path would (a field of an unusual type, a header table
//! that is an array, a key or a string that is not UTF-8, an error) is
//! handed back, and [`super::request`] builds it the old way, so both give
//! the same request, the same limits and the same error messages.

use std::ffi::c_int;
use std::sync::Arc;

use llmproxy_core::convert::{self, Limits};
use llmproxy_core::hooks::RequestInfo;
use llmproxy_core::http::script_headers::{Message, ScriptHeaders};
use llmproxy_core::stack;
use mlua::ffi::{self, lua_State};
use mlua::{Lua, Table};

use super::convert::Walk;
use super::protect;
use crate::input::{Request, MAX_BYTES, MAX_DEPTH};

/// Read `t` in place: `None` when it needs the JSON path.
pub(super) fn read(lua: &Lua, t: &Table, array_mt: &Table) -> Option<Request> {
    let walk = Walk {
        array_mt: 2,
        max_depth: MAX_DEPTH,
    };
    // SAFETY: `with_tables` pushes the table (index 1) and `array_mt`
    // (index 2) and runs the closure in a protected call. The walk keeps the
    // stack balanced (every early exit pops what it pushed) and borrows
    // string bytes only while their string is on the stack.
    unsafe { protect::with_tables(lua, &[t, array_mt], |state| fields(state, 1, &walk)) }.ok()?
}

/// What the walk found, before the body's limits are recorded.
#[derive(Default)]
struct Read {
    info: RequestInfo,
    /// Deepest field (0 for a string), for the request's own nesting.
    deepest: usize,
    /// `body_raw`'s size and the nesting of what it parsed into.
    raw_body: Option<(usize, usize)>,
    /// Whether `body` was given parsed.
    body: bool,
    /// Whether `headers` or `headers_raw` was given.
    headers: bool,
}

/// # Safety
/// `state` is live, inside a protected call, with the fields table at
/// `idx` and `llmproxy.array_mt` at `walk.array_mt`.
unsafe fn fields(state: *mut lua_State, idx: c_int, walk: &Walk) -> Option<Request> {
    if ffi::lua_checkstack(state, 6) == 0 {
        return None;
    }
    let mut read = Read::default();
    ffi::lua_pushnil(state);
    while ffi::lua_next(state, idx) != 0 {
        let top = ffi::lua_gettop(state);
        let step = match text(state, top - 1) {
            Some(key) => field(state, top, key, walk, &mut read),
            None => Step::Fallback,
        };
        ffi::lua_pop(state, 1);
        match step {
            Step::Next => {}
            Step::Fallback => {
                ffi::lua_pop(state, 1); // the key: the walk stops here
                return None;
            }
        }
    }
    let depth = 1 + read.deepest;
    let (raw_body_bytes, raw_body_depth) = read.raw_body.unwrap_or((0, 0));
    Some(Request::from_parts(read.info, depth, raw_body_depth, raw_body_bytes))
}

enum Step {
    Next,
    Fallback,
}

/// One field, its value at `idx`.
///
/// # Safety
/// As [`fields`], with the field's value at `idx`.
unsafe fn field(state: *mut lua_State, idx: c_int, key: &str, walk: &Walk, read: &mut Read) -> Step {
    let info = &mut read.info;
    if key == "id" {
        return match text(state, idx) {
            Some(s) => {
                info.id = s.to_owned();
                Step::Next
            }
            None => Step::Fallback,
        };
    }
    let optional = match key {
        "user_id" => Some(&mut info.user_id),
        "api_key" => Some(&mut info.api_key),
        "client_ip" => Some(&mut info.client_ip),
        "path" => Some(&mut info.path),
        "backend_url" => Some(&mut info.backend_url),
        _ => None,
    };
    if let Some(slot) = optional {
        return match text(state, idx) {
            Some(s) => {
                *slot = Some(s.to_owned());
                Step::Next
            }
            None => Step::Fallback,
        };
    }
    match key {
        // Both: the JSON path decides which wins.
        "headers" | "headers_raw" if read.headers => Step::Fallback,
        "headers" => match headers(state, idx, walk) {
            Some(h) => {
                info.headers = h;
                read.headers = true;
                read.deepest = read.deepest.max(1);
                Step::Next
            }
            None => Step::Fallback,
        },
        "headers_raw" => match raw_headers(state, idx, walk) {
            Some((h, depth)) => {
                info.headers = h;
                read.headers = true;
                read.deepest = read.deepest.max(depth);
                Step::Next
            }
            None => Step::Fallback,
        },
        "body_raw" => {
            if ffi::lua_type(state, idx) != ffi::LUA_TSTRING || read.body {
                return Step::Fallback;
            }
            // Not checked as UTF-8 first: the parser refuses what is not.
            let bytes = stack::str_at(state, idx);
            let limits = Limits {
                max_depth: MAX_DEPTH,
                max_bytes: MAX_BYTES,
            };
            match convert::parse_json(bytes, limits) {
                Ok(body) => {
                    read.raw_body = Some((bytes.len(), convert::json_depth(&body)));
                    info.body = Arc::new(body);
                    Step::Next
                }
                // The JSON path gives the error, with its words.
                Err(_) => Step::Fallback,
            }
        }
        // Both `body` and `body_raw`: the JSON path decides which wins.
        "body" if read.raw_body.is_some() => Step::Fallback,
        _ => match walk.value(state, idx, 2) {
            Ok(v) => {
                read.deepest = read.deepest.max(convert::json_depth(&v));
                if key == "body" {
                    info.body = Arc::new(v);
                    read.body = true;
                } else {
                    info.extra.insert(key.to_owned(), v);
                }
                Step::Next
            }
            Err(_) => Step::Fallback,
        },
    }
}

/// A headers table of strings by string names, in the table's order; `None`
/// when the JSON path would read it otherwise (an array, a marked table,
/// other types).
///
/// # Safety
/// As [`fields`], with the headers' value at `idx`.
unsafe fn headers(state: *mut lua_State, idx: c_int, walk: &Walk) -> Option<Vec<(String, String)>> {
    if ffi::lua_type(state, idx) != ffi::LUA_TTABLE || ffi::lua_checkstack(state, 4) == 0 {
        return None;
    }
    // A marked table or a sequence is a JSON array: not headers.
    let (marked, shape) = walk.shape(state, idx);
    if marked || shape.is_array(false) {
        return None;
    }
    let mut out = Vec::with_capacity(shape.count);
    ffi::lua_pushnil(state);
    while ffi::lua_next(state, idx) != 0 {
        let top = ffi::lua_gettop(state);
        let pair = text(state, top - 1).zip(text(state, top));
        ffi::lua_pop(state, 1);
        match pair {
            Some((name, value)) => out.push((name.to_owned(), value.to_owned())),
            None => {
                ffi::lua_pop(state, 1);
                return None;
            }
        }
    }
    Some(out)
}

/// A message's headers as nginx gives them (`headers_raw`: a string, or a
/// sequence of strings for a header sent more than once, by name) in the
/// form scripts see (core's [`ScriptHeaders`]: values are bytes, read
/// lossily, as the gateway reads them), with their nesting; `None` when
/// the JSON path would read it otherwise (other keys or values, a name
/// that is not UTF-8: it gives the error). Only there, when another field
/// sends the table down that path, does a value that is not UTF-8 fail the
/// request: JSON text cannot hold it.
///
/// # Safety
/// As [`fields`], with the headers' value at `idx`.
unsafe fn raw_headers(state: *mut lua_State, idx: c_int, walk: &Walk) -> Option<(Vec<(String, String)>, usize)> {
    if ffi::lua_type(state, idx) != ffi::LUA_TTABLE || ffi::lua_checkstack(state, 5) == 0 {
        return None;
    }
    let mut out = ScriptHeaders::new(Message::Request, 0);
    let mut depth = 1;
    ffi::lua_pushnil(state);
    while ffi::lua_next(state, idx) != 0 {
        let top = ffi::lua_gettop(state);
        let added = text(state, top - 1).and_then(|name| match ffi::lua_type(state, top) {
            ffi::LUA_TSTRING => {
                out.add(name, stack::str_at(state, top));
                Some(())
            }
            ffi::LUA_TTABLE => {
                depth = 2;
                repeated(state, top, walk, |value| out.add(name, value))
            }
            _ => None,
        });
        ffi::lua_pop(state, 1);
        if added.is_none() {
            ffi::lua_pop(state, 1);
            return None;
        }
    }
    Some((out.into_pairs(), depth))
}

/// Each value of a header sent more than once (a non-empty sequence of
/// strings at `idx`), in order; `None` at the first that is not one (the
/// caller then drops what was added).
///
/// # Safety
/// As [`fields`], with a table at `idx` and room for three more values.
unsafe fn repeated(state: *mut lua_State, idx: c_int, walk: &Walk, mut add: impl FnMut(&[u8])) -> Option<()> {
    let (marked, shape) = walk.shape(state, idx);
    if marked || !shape.is_array(false) {
        return None;
    }
    for i in 1..=shape.len {
        ffi::lua_rawgeti(state, idx, i as ffi::lua_Integer);
        let is_string = ffi::lua_type(state, -1) == ffi::LUA_TSTRING;
        if is_string {
            add(stack::str_at(state, -1));
        }
        ffi::lua_pop(state, 1);
        if !is_string {
            return None;
        }
    }
    Some(())
}

/// The UTF-8 string at `idx` (not a number: `lua_tolstring` would convert
/// it in place), else `None`.
///
/// # Safety
/// `state` is live with a value at `idx`; the result lives while the value
/// stays on the stack.
unsafe fn text<'s>(state: *mut lua_State, idx: c_int) -> Option<&'s str> {
    if ffi::lua_type(state, idx) != ffi::LUA_TSTRING {
        return None;
    }
    std::str::from_utf8(stack::str_at(state, idx)).ok()
}
