//! A transform's `headers` read straight off the Lua stack.
//!
//! A transform returns a handful of headers (`{["X-User-ID"] = ...}`, or
//! the `response.headers` it was given). Encoding them as a
//! `serde_json::Value` and then reading that back cost more than the
//! script: an `IndexMap` per table, a heap string per key, and the checks
//! copying every name and value again. Here the common shape, a table of
//! string keys whose values are strings, booleans or `json.null`, is read
//! as it is; any other shape (numbers, nested tables, lazy views, keys
//! that are not strings, text that is not UTF-8) returns `None` and is
//! encoded as a value, as before, so its conversion errors and checks are
//! exactly the general path's.

use std::ffi::c_int;

use mlua::ffi::{self, lua_State};

use crate::stack;

/// One header value as a transform's result holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderValue {
    /// A string.
    Text(String),
    /// `true` or `false`.
    Bool(bool),
    /// `json.null`.
    Null,
}

/// A result's headers, sorted by name.
pub(crate) type ResultHeaders = Vec<(String, HeaderValue)>;

/// Most headers read here; a bigger table is left to the general path.
const MAX_HEADERS: usize = 64;

/// The table at `idx` as headers, with the bytes [`super::RawWalk`] would
/// have charged for it; `None` when it is not of the common shape.
/// `headers_mt` is the stack index of the headers metatable (or nil).
///
/// # Safety
/// `state` is live with a table at the absolute index `idx` and room for
/// three more values; the stack is left as it was. Only raw reads: no
/// metamethod runs and nothing is allocated in Lua.
pub(crate) unsafe fn read(state: *mut lua_State, idx: c_int, headers_mt: c_int) -> Option<(ResultHeaders, usize)> {
    // SAFETY: the function's contract; every path below restores the top.
    unsafe {
        let base = ffi::lua_gettop(state);
        if ffi::lua_getmetatable(state, idx) != 0 {
            let plain = ffi::lua_rawequal(state, -1, headers_mt) != 0;
            ffi::lua_settop(state, base);
            if !plain {
                return None;
            }
        }
        // Item 1 would make it an array (or keys that are not names).
        if ffi::lua_objlen(state, idx) != 0 {
            return None;
        }
        // The object's braces, then per pair its quoted key and colon, as
        // the encoder counts them.
        let mut charged = 2usize;
        let mut out = ResultHeaders::new();
        ffi::lua_pushnil(state);
        while ffi::lua_next(state, idx) != 0 {
            let pair = pair_at(state);
            ffi::lua_pop(state, 1);
            let Some((name, value, bytes)) = pair else {
                ffi::lua_settop(state, base);
                return None;
            };
            if out.len() == MAX_HEADERS {
                ffi::lua_settop(state, base);
                return None;
            }
            charged = charged.saturating_add(name.len() + 4 + bytes);
            out.push((name, value));
        }
        // The order the encoder writes (keys sorted), so that the checks
        // meet the same header first.
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Some((out, charged))
    }
}

/// The pair on top of the stack (key at -2, value at -1) with the bytes its
/// value is charged; `None` when it is not of the common shape.
///
/// # Safety
/// `state` is live with a key and a value on top.
unsafe fn pair_at(state: *mut lua_State) -> Option<(String, HeaderValue, usize)> {
    // SAFETY: the function's contract; strings are copied while on the
    // stack, and `lua_type` is checked first so nothing converts in place.
    unsafe {
        if ffi::lua_type(state, -2) != ffi::LUA_TSTRING {
            return None;
        }
        let name = stack::utf8(stack::str_at(state, -2)).ok()?.to_owned();
        let (value, bytes) = match ffi::lua_type(state, -1) {
            ffi::LUA_TSTRING => {
                let text = stack::utf8(stack::str_at(state, -1)).ok()?;
                (HeaderValue::Text(text.to_owned()), text.len() + 2)
            }
            ffi::LUA_TBOOLEAN => (HeaderValue::Bool(ffi::lua_toboolean(state, -1) != 0), 5),
            ffi::LUA_TLIGHTUSERDATA if ffi::lua_touserdata(state, -1).is_null() => (HeaderValue::Null, 4),
            _ => return None,
        };
        Some((name, value, bytes))
    }
}
