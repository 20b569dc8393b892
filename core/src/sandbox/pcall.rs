//! The protected call of a VM's `run` function (`convert/lazy.lua`) made
//! with LuaJIT's API instead of mlua's `Function::call`.
//!
//! Every hook call goes through it. mlua turns each argument into an mlua
//! value before pushing it and collects the results in a `MultiValue`
//! before turning them into Rust values: ~1,300 instructions around the
//! `lua_pcall` of a seed routing call of ~9,600, more than the script
//! itself. Here the arguments are numbers pushed as they are and the two
//! results are read on the stack (~800 instructions fewer a call); the
//! first becomes an mlua value only when the call did not encode it.
//!
//! Errors come out as `Function::call` reports them, which `vm.rs`
//! classifies: the same message handler (a traceback appended to an error
//! that is not one of mlua's wrapped Rust errors, which carry their own),
//! and the same mapping of the error object to an `mlua::Error`.

use std::ffi::c_int;
use std::ptr;

use mlua::{ffi, Function, IntoLua, Lua, Table, Value};

/// The message handler of the call: as mlua's, a traceback is appended to
/// an error raised by Lua code (so `vm.rs` finds the script's line in it
/// when the message has none); an error from a Rust callback is a userdata
/// that already holds the traceback taken where it was raised.
///
/// # Safety
/// Called by LuaJIT as a message handler, with the error object on top.
pub(crate) unsafe extern "C-unwind" fn traceback(state: *mut ffi::lua_State) -> c_int {
    if ffi::lua_checkstack(state, 2) == 0 || ffi::lua_type(state, -1) == ffi::LUA_TUSERDATA {
        return 1;
    }
    let message = ffi::luaL_tolstring(state, -1, ptr::null_mut());
    if ffi::lua_checkstack(state, ffi::LUA_TRACEBACK_STACK) != 0 {
        ffi::luaL_traceback(state, state, message, 0);
        ffi::lua_remove(state, -2);
    }
    1
}

/// What `run` returned: its first result (nil when the call encoded it),
/// and its second as a boolean.
pub(crate) type RunResult = (Value, bool);

/// Call `run(chunk, env, args...)` in protected mode with `handler` (a
/// function made of [`traceback`]) as its message handler.
pub(crate) fn call_run(
    lua: &Lua,
    handler: &Function,
    run: &Function,
    chunk: &Function,
    env: &Table,
    args: &[f64],
) -> mlua::Result<RunResult> {
    let nargs = c_int::try_from(args.len() + 2).map_err(|_| mlua::Error::StackError)?;
    lua.exec_raw_lua(|raw| {
        let state = raw.state();
        // SAFETY: mlua's lock is held (`exec_raw_lua`) and the stack above
        // `top` is ours: it is put back to `top` on every path. Pushing a
        // handle (`push_into_stack`) copies a reference and allocates
        // nothing; numbers allocate nothing; room for all of them is made
        // first. `lua_pcall` catches every error of the call, and
        // `pop_value` turns the error object into an mlua value as
        // `Function::call` does (a wrapped Rust error becomes
        // `Value::Error`, a Rust panic resumes unwinding here).
        unsafe {
            let top = ffi::lua_gettop(state);
            if ffi::lua_checkstack(state, nargs + 3) == 0 {
                return Err(mlua::Error::StackError);
            }
            let pushed = handler
                .push_into_stack(raw)
                .and_then(|()| run.push_into_stack(raw))
                .and_then(|()| chunk.push_into_stack(raw))
                .and_then(|()| env.push_into_stack(raw));
            if let Err(e) = pushed {
                ffi::lua_settop(state, top);
                return Err(e);
            }
            for &arg in args {
                ffi::lua_pushnumber(state, arg);
            }
            let code = ffi::lua_pcall(state, nargs, 2, top + 1);
            let result = if code == ffi::LUA_OK {
                let second = ffi::lua_toboolean(state, -1) != 0;
                ffi::lua_pop(state, 1);
                let first = if ffi::lua_isnil(state, -1) != 0 {
                    Value::Nil
                } else {
                    raw.pop_value()
                };
                Ok((first, second))
            } else {
                Err(error_of(raw.pop_value(), code))
            };
            ffi::lua_settop(state, top);
            result
        }
    })
}

/// The `mlua::Error` of a failed call's error object, as mlua's
/// `Function::call` makes it.
fn error_of(object: Value, code: c_int) -> mlua::Error {
    match object {
        Value::Error(e) => *e,
        other => {
            let message = match &other {
                Value::String(s) => s.to_string_lossy(),
                // The handler turned every other object into a string; a
                // memory error skips the handler, and its object is a string.
                v => format!("(error object is a {} value)", v.type_name()),
            };
            if code == ffi::LUA_ERRMEM {
                mlua::Error::MemoryError(message)
            } else {
                mlua::Error::RuntimeError(message)
            }
        }
    }
}
