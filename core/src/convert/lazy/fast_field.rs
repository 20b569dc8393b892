//! The field read LuaJIT can compile: a plain C function `lazy.lua` calls
//! through the FFI, for the fields whose value it can make without the
//! Lua API (a number, a boolean, a short string, an absent field, an
//! object that becomes a view).
//!
//! [`super::load_field`] is a `lua_CFunction`. LuaJIT cannot compile a call
//! to one: a compiled trace that reaches it exits to the interpreter, the
//! call runs there, and a new trace is stitched on after it. A field read
//! cost ~2,000 instructions that way, half of a seed routing call. A call
//! through the FFI is compiled into the trace like any other instruction;
//! its price is that the callee may not touch the Lua state (no stack, no
//! allocation, no error), so it describes the value in a [`Found`] and
//! `lazy.lua` makes it: a number is returned as is, a string is copied
//! from the bytes `Found` points at (`ffi.string`), an object's new source
//! slot becomes a view. Every other field (a long string, an array,
//! headers, host tables, JSON null) and every error go to
//! [`super::load_field`], which converts them as before.
//!
//! Wherever the JIT compiler is on for the sandbox's own code
//! ([`crate::sandbox::jit::Mode`]): interpreted, an FFI call costs twice a
//! C function's.

use std::ffi::c_int;

use serde_json::Value;

use super::{CallData, Source};
use crate::convert::fields::Field;
use crate::convert::numbers;

/// The field is absent: the read is `nil`.
pub(super) const NIL: c_int = 0;
/// The returned double is the field's value.
pub(super) const NUMBER: c_int = 1;
/// The field is `true`.
pub(super) const TRUE: c_int = 2;
/// The field is `false`.
pub(super) const FALSE: c_int = 3;
/// The field is an object: the returned double is the slot of its source,
/// for a view.
pub(super) const OBJECT: c_int = 4;
/// Anything else: `load_field` reads it.
pub(super) const OTHER: c_int = 5;
/// The field is the string [`Found`] points at.
pub(super) const STRING: c_int = 6;

/// Longest string read this way. Unlike `load_field`'s, its copy is
/// allocated under the script's memory limit (the FFI callee cannot lift
/// it): a short one, once per field and call, is noise next to any limit.
pub(super) const MAX_STRING: usize = 1024;

/// The C declarations `lazy.lua` needs: [`Found`], and the type it casts
/// [`fast_field`]'s address to.
pub(super) const DECLARATIONS: &str = "struct llmproxy_found { int kind; int len; const char *text; };";
/// See [`DECLARATIONS`].
pub(super) const SIGNATURE: &str = "double (*)(void *, double, double, const char *, size_t, struct llmproxy_found *)";

/// What [`fast_field`] found (`struct llmproxy_found`).
#[repr(C)]
pub(super) struct Found {
    /// [`NIL`] ... [`STRING`].
    kind: c_int,
    /// A [`STRING`]'s length.
    len: c_int,
    /// A [`STRING`]'s bytes, alive until the call ends (they belong to its
    /// input).
    text: *const u8,
}

/// Field `len` bytes at `key` of source `slot` of call `generation`, as
/// [`super::load_field`] would convert it, when it is a number, a
/// boolean, a string of at most [`MAX_STRING`] bytes, absent or an object;
/// `found` says which, and where the string is.
///
/// # Safety
/// Called by LuaJIT's FFI from `lazy.lua` only: `data` is the VM's
/// [`CallData`], `key` points at `len` readable bytes (a Lua string the
/// caller holds), `found` at a writable [`Found`]. It touches no Lua state
/// and does not unwind: a panic (none is expected; the call data's cells
/// are never borrowed while Lua runs) is caught and the field left to
/// `load_field`, as an unwinding `extern "C"` function would abort the
/// process.
pub(super) unsafe extern "C" fn fast_field(
    data: *const CallData,
    slot: f64,
    generation: f64,
    key: *const u8,
    len: usize,
    found: *mut Found,
) -> f64 {
    // SAFETY: the function's contract.
    let (data, key, found) = unsafe {
        let Some(found) = found.as_mut() else {
            return 0.0;
        };
        found.kind = OTHER;
        let Some(data) = data.as_ref() else {
            return 0.0;
        };
        (data, std::slice::from_raw_parts(key, len), found)
    };
    // A key that is not UTF-8 names no field (as `load_field` reads it).
    let Ok(name) = std::str::from_utf8(key) else {
        found.kind = NIL;
        return 0.0;
    };
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut out = Found {
            kind: OTHER,
            len: 0,
            text: std::ptr::null(),
        };
        // A lazy table of another call: `load_field` raises the error.
        let value = match data.source(slot, generation) {
            Ok(source) => read(data, &source, name, &mut out),
            Err(_) => 0.0,
        };
        (out, value)
    }));
    match read {
        Ok((out, value)) => {
            *found = out;
            value
        }
        Err(_) => 0.0,
    }
}

/// Field `name` of `source` into `found` (see [`fast_field`]).
fn read(data: &CallData, source: &Source, name: &str, found: &mut Found) -> f64 {
    let field = source.fields().field(name);
    let text = match field {
        Field::Text(s) => Some(s),
        Field::Json(Value::String(s)) => Some(s.as_str()),
        _ => None,
    };
    if let Some(text) = text {
        match c_int::try_from(text.len()) {
            Ok(len) if text.len() <= MAX_STRING => {
                found.kind = STRING;
                found.len = len;
                found.text = text.as_ptr();
            }
            _ => {}
        }
        return 0.0;
    }
    let (kind, value) = scalar(data, source, field);
    found.kind = kind;
    value
}

/// The kind and value of a field that is not a string.
fn scalar(data: &CallData, source: &Source, field: Field<'_>) -> (c_int, f64) {
    match field {
        Field::Nil => (NIL, 0.0),
        Field::Bool(b) => (if b { TRUE } else { FALSE }, 0.0),
        Field::Json(Value::Bool(b)) => (if *b { TRUE } else { FALSE }, 0.0),
        Field::Number(n) => (NUMBER, n),
        Field::Json(Value::Number(n)) => {
            let (f, needs_text) = numbers::read(n);
            if needs_text {
                data.record(vec![(f, n.clone())], &[]);
            } else {
                data.record(Vec::new(), &[f.to_bits()]);
            }
            (NUMBER, f)
        }
        other => match source.child(&other) {
            Some(child) => (OBJECT, data.push(child) as f64),
            None => (OTHER, 0.0),
        },
    }
}
