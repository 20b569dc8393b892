//! `llmproxy.hop_by_hop(headers)`: the names of a request's headers that
//! describe the client's connection and must not go upstream (core's rule,
//! `llmproxy_core::http::hop_by_hop`, so nginx and the gateway drop the
//! same names), read off the host's stack.
//!
//! nginx calls it on every request with `ngx.req.get_headers()`'s table.
//! Walked through mlua's table iterator, each header became a string
//! reference and a value of its own (1.5 µs for a dozen headers); here the
//! table is walked once, in one protected call, and only the names to drop
//! are copied.
//!
//! ```lua
//! llmproxy.hop_by_hop({ connection = "close, X-Secret", ["x-secret"] = "s",
//!     ["content-type"] = "application/json" })
//! --> { "connection", "x-secret" }   -- (table order); nil when none
//! ```

use std::ffi::c_int;

use llmproxy_core::http::hop_by_hop;
use llmproxy_core::stack;
use mlua::ffi::{self, lua_State};
use mlua::{Lua, Table, Value};

use super::protect;

/// The Lua function: the names to drop, or nil when there are none.
pub(crate) fn names(lua: &Lua, headers: Table) -> mlua::Result<Value> {
    // SAFETY: `with_tables` pushes the table (index 1) and runs the closure
    // in a protected call; `to_drop` keeps the stack balanced and copies
    // what it keeps while the string is on the stack.
    let drop = unsafe { protect::with_tables(lua, &[&headers], |state| to_drop(state, 1))? };
    if drop.is_empty() {
        return Ok(Value::Nil);
    }
    Ok(Value::Table(lua.create_sequence_from(drop)?))
}

/// The names of the headers table at `idx` to drop: the fixed hop-by-hop
/// names and those its `connection` header lists (a string, or a table of
/// strings for a header sent more than once). Keys and values of other
/// types are not headers and are skipped.
///
/// # Safety
/// `state` is live, inside a protected call, with a table at `idx`.
unsafe fn to_drop(state: *mut lua_State, idx: c_int) -> Vec<String> {
    // SAFETY: the function's contract; every push below is popped before
    // the next, and strings are read while they are on the stack.
    unsafe {
        if ffi::lua_checkstack(state, 3) == 0 {
            return Vec::new();
        }
        let listed = connection_names(state, idx);
        let mut drop = Vec::new();
        ffi::lua_pushnil(state);
        while ffi::lua_next(state, idx) != 0 {
            // Only the key: `lua_next` needs it as it is (not converted).
            if ffi::lua_type(state, -2) == ffi::LUA_TSTRING {
                if let Ok(name) = std::str::from_utf8(stack::str_at(state, -2)) {
                    if hop_by_hop::is_hop_by_hop(name) || listed.iter().any(|l| l.eq_ignore_ascii_case(name)) {
                        drop.push(name.to_owned());
                    }
                }
            }
            ffi::lua_pop(state, 1);
        }
        drop
    }
}

/// The names the table at `idx`'s `connection` header lists.
///
/// # Safety
/// As [`to_drop`], with room for two more values.
unsafe fn connection_names(state: *mut lua_State, idx: c_int) -> Vec<String> {
    // SAFETY: the function's contract; the stack is restored before return.
    unsafe {
        let top = ffi::lua_gettop(state);
        ffi::lua_pushlstring(state, c"connection".as_ptr(), 10);
        let mut value = String::new();
        match ffi::lua_rawget(state, idx) {
            ffi::LUA_TSTRING => value.push_str(&String::from_utf8_lossy(stack::str_at(state, -1))),
            ffi::LUA_TTABLE => {
                let list = ffi::lua_gettop(state);
                for i in 1..=ffi::lua_objlen(state, list) {
                    if ffi::lua_rawgeti(state, list, i as ffi::lua_Integer) == ffi::LUA_TSTRING {
                        if !value.is_empty() {
                            value.push(',');
                        }
                        value.push_str(&String::from_utf8_lossy(stack::str_at(state, -1)));
                    }
                    ffi::lua_pop(state, 1);
                }
            }
            _ => {}
        }
        ffi::lua_settop(state, top);
        hop_by_hop::connection_names(&value).collect()
    }
}
