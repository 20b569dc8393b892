//! The field read LuaJIT can compile: a plain C function `lazy.lua` calls
//! through the FFI, for the fields whose value needs no Lua object (a
//! number, a boolean, an absent field, an object that becomes a view).
//!
//! [`super::load_field`] is a `lua_CFunction`. LuaJIT cannot compile a call
//! to one: a compiled trace that reaches it exits to the interpreter, the
//! call runs there, and a new trace is stitched on after it. A field read
//! cost ~2,000 instructions that way, half of a seed routing call. A call
//! through the FFI is compiled into the trace like any other instruction;
//! its price is that the callee may not touch the Lua state (no stack, no
//! allocation, no error), so it describes the value in `kind` and
//! `lazy.lua` makes it: a number is returned as is, an object's new source
//! slot becomes a view there. Every other field (a string, an array,
//! headers, host tables, JSON null) and every error go to
//! [`super::load_field`], which converts them as before, under the same
//! memory accounting.
//!
//! Only where the JIT compiler is on for sandbox VMs ([`crate::sandbox::jit`]):
//! interpreted, an FFI call costs twice a C function's.

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

/// The C declaration `lazy.lua` casts [`fast_field`]'s address to.
pub(super) const SIGNATURE: &str = "double (*)(void *, double, double, const char *, size_t, int *)";

/// Field `len` bytes at `key` of source `slot` of call `generation`, as
/// [`super::load_field`] would convert it, when it is a number, a boolean,
/// absent or an object; `*kind` says which ([`NIL`] ... [`OTHER`]).
///
/// # Safety
/// Called by LuaJIT's FFI from `lazy.lua` only: `data` is the VM's
/// [`CallData`], `key` points at `len` readable bytes (a Lua string the
/// caller holds), `kind` at one writable `int`. It touches no Lua state and
/// cannot unwind (`extern "C"`: a panic aborts, and nothing here panics on
/// any input).
pub(super) unsafe extern "C" fn fast_field(
    data: *const CallData,
    slot: f64,
    generation: f64,
    key: *const u8,
    len: usize,
    kind: *mut c_int,
) -> f64 {
    // SAFETY: the function's contract.
    let (data, key, kind) = unsafe {
        let Some(kind) = kind.as_mut() else {
            return 0.0;
        };
        *kind = OTHER;
        let Some(data) = data.as_ref() else {
            return 0.0;
        };
        (data, std::slice::from_raw_parts(key, len), kind)
    };
    // A key that is not UTF-8 names no field (as `load_field` reads it).
    let Ok(name) = std::str::from_utf8(key) else {
        *kind = NIL;
        return 0.0;
    };
    // A lazy table of another call: `load_field` raises the error.
    let Ok(source) = data.source(slot, generation) else {
        return 0.0;
    };
    let (found, value) = read(data, &source, name);
    *kind = found;
    value
}

/// The kind and value of field `name` of `source` (see [`fast_field`]).
fn read(data: &CallData, source: &Source, name: &str) -> (c_int, f64) {
    let field = source.fields().field(name);
    let child = match field {
        Field::Nil => return (NIL, 0.0),
        Field::Bool(b) => return (if b { TRUE } else { FALSE }, 0.0),
        Field::Json(Value::Bool(b)) => return (if *b { TRUE } else { FALSE }, 0.0),
        Field::Number(n) => return (NUMBER, n),
        Field::Json(Value::Number(n)) => {
            let (f, needs_text) = numbers::read(n);
            if needs_text {
                data.record(vec![(f, n.clone())], &[]);
            } else {
                data.record(Vec::new(), &[f.to_bits()]);
            }
            return (NUMBER, f);
        }
        Field::Object(object) => Some(Source::body(object)),
        Field::Json(object @ Value::Object(_)) => source.nested(object),
        _ => None,
    };
    match child {
        Some(child) => (OBJECT, data.push(child) as f64),
        None => (OTHER, 0.0),
    }
}
