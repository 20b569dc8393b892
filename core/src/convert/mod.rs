//! Lossless JSON <-> Lua conversion.
//!
//! Rules (`docs/architecture.md`, "Data conversion"; ADR 003):
//! - JSON arrays become Lua sequences carrying a hidden array marker, so an
//!   emptied array (and `[]`) encodes back as `[]`. Objects become plain
//!   tables; an unmarked empty table encodes as `{}`.
//! - `null` becomes `json.null` (a NULL light userdata, as in lua-cjson).
//! - Numbers are LuaJIT doubles: an integral value within the i64 range
//!   encodes back as a JSON integer, anything else as a float; NaN and
//!   infinities are errors (and JSON numbers beyond a double are refused).
//! - Strings keep their bytes; a Lua string that is not UTF-8 cannot become
//!   JSON and is an error, never silently replaced.
//! - Depth and size are bounded in both directions: deep or cyclic tables are
//!   errors, never a stack overflow.
//!
//! Inputs are **lazy** (`lazy.rs`): `request`, `response`, `backends`, the
//! bodies and every object inside a body are empty tables whose fields
//! convert the first time they are read. A routing script that reads
//! `request.body.viplevel` does not pay for a 1 MB `messages` array, nor
//! for the headers. Iterating (`pairs`,
//! `next`) or writing a new key turns the table into a plain one first, so
//! scripts see ordinary Lua semantics. Encoding a lazy table that was never
//! materialized re-uses the original JSON for every field the script did not
//! read, so untouched data round-trips byte for byte.

use std::borrow::Cow;
use std::ffi::{c_int, c_void};

use mlua::ffi::{self, lua_State};
use mlua::{LightUserData, Lua, Table, Value as LuaValue};
use serde_json::{Map, Number, Value};
use smallvec::SmallVec;

use crate::hooks::ResultForm;
use crate::http::fields::BodyText;
use crate::stack;

mod fields;
mod headers;
pub(crate) mod lazy;
mod numbers;
pub mod parse;
mod scalars;
mod text;

pub(crate) use fields::{push_str, Field, Fields, PushTable};
pub(crate) use headers::{HeaderValue, ResultHeaders};
pub(crate) use lazy::{defer, CallData};
pub(crate) use numbers::NumberTexts;
pub(crate) use text::sorted_json;
use text::ToText;

/// `json.null`: a NULL light userdata, like lua-cjson's `cjson.null`.
pub const NULL: LightUserData = LightUserData(std::ptr::null_mut());
/// `json.empty_array`: a sentinel that encodes as `[]`. Light userdata
/// sentinels are compared by address only and never dereferenced.
#[allow(clippy::manual_dangling_ptr)]
pub const EMPTY_ARRAY: LightUserData = LightUserData(1 as *mut c_void);
/// Largest integer a double holds exactly (2^53).
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_992.0;

/// Bounds applied to a conversion.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Maximum nesting of arrays/objects (the top level is depth 1).
    pub max_depth: usize,
    /// Maximum approximate size of the JSON text produced, in bytes.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 64,
            max_bytes: 10 << 20,
        }
    }
}

/// Why a Lua value could not become JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertError(pub String);

impl std::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConvertError {}

impl From<mlua::Error> for ConvertError {
    fn from(e: mlua::Error) -> Self {
        ConvertError(e.to_string())
    }
}

/// Per-VM objects the conversion needs: the array marker. Created once per
/// VM by [`Markers::install`] and kept in the VM's app data so Rust
/// callbacks reach it.
pub(crate) struct Markers {
    /// Metatable of every array decoded from JSON (`__metatable` hides it).
    pub array_mt: Table,
}

impl Markers {
    /// Create the markers in `lua` and store them in its app data.
    pub fn install(lua: &Lua) -> mlua::Result<()> {
        let array_mt = lua.create_table()?;
        array_mt.raw_set("__metatable", "json.array")?;
        lua.set_app_data(Markers { array_mt });
        Ok(())
    }
}

pub(super) fn markers(lua: &Lua) -> mlua::Result<mlua::AppDataRef<'_, Markers>> {
    lua.app_data_ref::<Markers>()
        .ok_or_else(|| mlua::Error::runtime("llmproxy: conversion markers missing"))
}

/// Convert a JSON value to a Lua value, eagerly.
///
/// Arrays and objects are built on the Lua stack ([`push_json`]): through
/// mlua each string and table would become a registry reference on the way.
pub fn json_to_lua(lua: &Lua, value: &Value) -> mlua::Result<LuaValue> {
    Ok(match value {
        Value::Null => LuaValue::LightUserData(NULL),
        Value::Bool(b) => LuaValue::Boolean(*b),
        Value::Number(n) => {
            let (f, needs_text) = numbers::read(n);
            if needs_text {
                record_texts(lua, vec![(f, n.clone())], &[]);
            } else {
                record_texts(lua, Vec::new(), &[f.to_bits()]);
            }
            LuaValue::Number(f)
        }
        Value::String(s) => LuaValue::String(lua.create_string(s)?),
        Value::Array(_) | Value::Object(_) => {
            let m = markers(lua)?;
            // Owned here, outside the closure: a Lua error jumps over the
            // closure's frames, and this Vec is still dropped normally.
            let mut texts = Vec::new();
            let mut plain = Vec::new();
            // SAFETY: `exec_raw` pushes the array marker (index 1) and runs
            // the closure in a protected call: an allocation failure raises
            // a Lua error that the call returns as an error (the closure's
            // frames own nothing that needs dropping; each push to `texts`
            // or `plain` completes before the next Lua call). `push_json` checks stack
            // space before each push and leaves exactly one value above the
            // marker; the marker is removed, so `exec_raw` returns the value.
            let v = unsafe {
                lua.exec_raw::<LuaValue>(&m.array_mt, |state| {
                    push_json(state, value, 1, &mut texts, &mut plain);
                    ffi::lua_remove(state, 1); // the marker: the result alone is returned
                })?
            };
            drop(m);
            record_texts(lua, texts, &plain);
            v
        }
    })
}

/// Stage `globals` for the current call of a VM: `run` (`lazy.lua`) sets
/// them in the environment inside the call's own protected call, as it
/// sets the lazy globals, instead of a protected call of their own before
/// it (LuaJIT allocates two C closures for each of those). A `null` value
/// leaves its global absent (`nil`, not `json.null`): `if not key_info`
/// works for an unknown key.
///
/// # Safety
/// Whatever `globals` borrows (a name, a JSON value, a string of a
/// [`Scalar`]) stays alive and unchanged until the VM's current call ends,
/// as for [`lazy::defer`]; the lists themselves are copied.
pub(crate) unsafe fn stage_globals(lua: &Lua, globals: &[(&str, Global<'_>)]) -> mlua::Result<()> {
    let data = lazy::call_data(lua).ok_or_else(|| mlua::Error::runtime("llmproxy: lazy sources missing"))?;
    // SAFETY: the caller's promise.
    unsafe { data.stage(globals) }
}

/// Push `value` and store it as `name` in the table at stack index 1 (a
/// `null` leaves it absent); the array marker is at `array_mt`.
///
/// # Safety
/// `state` is live and inside a protected call (an allocation failure
/// raises), with the table at index 1. The stack is left as it was.
pub(super) unsafe fn push_global(
    state: *mut lua_State,
    name: &str,
    value: &Value,
    array_mt: c_int,
    texts: &mut Vec<(f64, Number)>,
    plain: &mut Vec<u64>,
) {
    if value.is_null() {
        return;
    }
    if ffi::lua_checkstack(state, 2) == 0 {
        ffi::luaL_error(state, c"llmproxy: the Lua stack cannot grow".as_ptr());
    }
    ffi::lua_pushlstring(state, name.as_ptr().cast(), name.len());
    push_json(state, value, array_mt, texts, plain);
    ffi::lua_rawset(state, 1);
}

/// One global of [`stage_globals`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Global<'a> {
    /// A JSON value.
    Json(&'a Value),
    /// A JSON value held for many calls: an object is a lazy table over
    /// it, as `request.body` is (when the global's name may be lazy and
    /// the call has room for one more), anything else as [`Global::Json`].
    Shared(&'a std::sync::Arc<Value>),
    /// A flat table of scalars (`standard_checks`, `rate_limit_status`,
    /// `current_time`, `metadata`): a lazy table whose fields convert when
    /// read (`scalars.rs`), without a JSON value built first.
    Fields(&'a [(&'static str, Scalar<'a>)]),
    /// A string (`backend_url`).
    Text(&'a str),
    /// A number (`latency_ms`).
    Number(f64),
}

impl<'a> From<&'a Value> for Global<'a> {
    fn from(v: &'a Value) -> Self {
        Global::Json(v)
    }
}

/// A field of [`Global::Fields`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scalar<'a> {
    /// A boolean.
    Bool(bool),
    /// An integer (a Lua number, as a JSON integer would be).
    Int(i64),
    /// A number; absent when it is not finite (as `serde_json` makes
    /// null of it).
    Num(f64),
    /// A string.
    Str(&'a str),
}

/// Record numbers whose text a double does not reproduce, and the doubles
/// of the others (see [`numbers`]).
fn record_texts(lua: &Lua, found: Vec<(f64, Number)>, plain: &[u64]) {
    if found.is_empty() && plain.is_empty() {
        return;
    }
    if let Some(d) = lazy::call_data(lua) {
        d.record(found, plain);
    }
}

/// Push `value` on the stack of `state` (the array marker at `array_mt`).
///
/// # Safety
/// `state` is live, inside a protected call, with the array marker at the
/// absolute index `array_mt`. Nesting is bounded by the input limits.
/// Numbers a double changes are added to `texts`, the doubles of the
/// others to `plain`.
pub(super) unsafe fn push_json(
    state: *mut lua_State,
    value: &Value,
    array_mt: c_int,
    texts: &mut Vec<(f64, Number)>,
    plain: &mut Vec<u64>,
) {
    if ffi::lua_checkstack(state, 3) == 0 {
        ffi::luaL_error(state, c"llmproxy: the Lua stack cannot grow".as_ptr());
    }
    match value {
        Value::Null => ffi::lua_pushlightuserdata(state, NULL.0),
        Value::Bool(b) => ffi::lua_pushboolean(state, c_int::from(*b)),
        Value::Number(n) => {
            let (f, needs_text) = numbers::read(n);
            if needs_text {
                texts.push((f, n.clone()));
            } else {
                plain.push(f.to_bits());
            }
            ffi::lua_pushnumber(state, f)
        }
        Value::String(s) => {
            ffi::lua_pushlstring(state, s.as_ptr().cast(), s.len());
        }
        Value::Array(items) => {
            ffi::lua_createtable(state, c_int::try_from(items.len()).unwrap_or(0), 0);
            for (i, item) in items.iter().enumerate() {
                push_json(state, item, array_mt, texts, plain);
                ffi::lua_rawseti(state, -2, (i + 1) as ffi::lua_Integer);
            }
            ffi::lua_pushvalue(state, array_mt);
            ffi::lua_setmetatable(state, -2);
        }
        Value::Object(map) => {
            ffi::lua_createtable(state, 0, c_int::try_from(map.len()).unwrap_or(0));
            for (k, v) in map {
                ffi::lua_pushlstring(state, k.as_ptr().cast(), k.len());
                push_json(state, v, array_mt, texts, plain);
                ffi::lua_rawset(state, -3);
            }
        }
    }
}

/// Convert a Lua value to JSON within `limits`.
///
/// Tables are walked on the Lua stack ([`RawWalk`]): going through
/// mlua's `pairs` makes a registry reference of every string and table, which
/// cost more than the conversion. A lazy view is written from its source
/// there too; a table with any other metatable of its own (a script's
/// `setmetatable`) takes the general path, [`Encoder`], for the whole
/// value; both give the same JSON and the same errors.
pub fn lua_to_json(lua: &Lua, value: &LuaValue, limits: Limits) -> Result<Value, ConvertError> {
    to_json(lua, value, limits, None)
}

/// [`lua_to_json`] leaving out the top-level field `key` of a table (a
/// result whose `body` was encoded apart, [`lua_to_json_text`]): the rest
/// of the table encodes as it would with the field.
pub(crate) fn lua_to_json_without(
    lua: &Lua,
    value: &LuaValue,
    limits: Limits,
    key: &'static str,
) -> Result<Value, ConvertError> {
    to_json(lua, value, limits, Some(key))
}

fn to_json(lua: &Lua, value: &LuaValue, limits: Limits, skip: Option<&'static str>) -> Result<Value, ConvertError> {
    if let LuaValue::Table(t) = value {
        if let Some((_, v)) = raw_walk(lua, t, limits, skip, ToValue)? {
            return Ok(v);
        }
    }
    let mut enc = Encoder {
        lua,
        limits,
        used: 0,
        texts: number_texts(lua),
        skip,
    };
    enc.value(value, 1)
}

/// This call's recorded number texts, when there are any, settled against
/// the plain numbers it saw.
fn number_texts(lua: &Lua) -> Option<NumberTexts> {
    let d = lazy::call_data(lua)?;
    let t = d.texts.borrow();
    (!t.is_empty()).then(|| t.settled())
}

/// [`RawWalk`] on `t` into `emit`: `None` when it met a table it leaves to
/// [`Encoder`] (a metatable of its own).
fn raw_walk<E: Emit>(
    lua: &Lua,
    t: &Table,
    limits: Limits,
    skip: Option<&'static str>,
    emit: E,
) -> Result<Option<(E, E::Item)>, ConvertError> {
    let array_mt = markers(lua)?.array_mt.clone();
    let headers_mt = lazy::headers_metatable(lua);
    let texts = number_texts(lua);
    let data = lazy::call_data(lua);
    let mut out = Ok(None);
    // SAFETY: `exec_raw` pushes `t` (index 1), the array marker (index 2) and
    // the headers metatable or nil (index 3), as `walk_at` wants them, and
    // runs the closure in a protected call.
    unsafe {
        lua.exec_raw::<()>((t, &array_mt, headers_mt.as_ref()), |state| {
            out = walk_at(
                state,
                1,
                limits,
                [skip, None],
                texts,
                data.as_deref().map(|d| &**d),
                emit,
            );
        })?;
    }
    out
}

/// [`RawWalk`] on the value at `idx` into `emit`, with the array marker at
/// stack index 2 and the headers metatable (or nil) at 3: `None` when it
/// met a table it leaves to [`Encoder`] (a metatable of its own).
///
/// # Safety
/// `state` is live and inside a protected call, with those values at those
/// indices. `RawWalk` only reads: it keeps the stack balanced on every
/// path, checks stack space before it pushes, never converts a key in place
/// (numbers are read with lua_tonumber), and copies string bytes while the
/// string is on the stack. It runs no Lua code (no metamethod is called).
unsafe fn walk_at<E: Emit>(
    state: *mut lua_State,
    idx: c_int,
    limits: Limits,
    skip: Skip,
    texts: Option<NumberTexts>,
    data: Option<&lazy::CallData>,
    emit: E,
) -> Result<Option<(E, E::Item)>, ConvertError> {
    let mut walk = RawWalk {
        data,
        limits,
        used: 0,
        array_mt: 2,
        headers_mt: 3,
        texts,
        skip,
        emit,
    };
    match walk.value(state, idx, 1) {
        Ok(item) => Ok(Some((walk.emit, item))),
        Err(RawError::General) => Ok(None),
        Err(RawError::Convert(e)) => Err(e),
    }
}

/// A result encoded inside its call.
///
/// Moved by value through every layer of a call, so the texts are boxed:
/// inline they made it 416 bytes, copied with `memcpy` at each move, which
/// a routing call (a string result) paid ~500 instructions for.
#[derive(Debug)]
pub(crate) struct Encoded {
    /// The result, without the parts below when they were taken apart.
    pub value: Value,
    /// A transform's `body` as JSON text.
    pub body: Option<Box<BodyText>>,
    /// A transform's `headers` as they were (see `headers.rs`).
    pub headers: Option<ResultHeaders>,
    /// The whole result as JSON text, every object's keys sorted, with
    /// where its billing fields are ([`ResultForm::SortedText`]); `value`
    /// is then null.
    pub text: Option<Box<BodyText>>,
}

/// [`encode_result_at`]'s outcome.
pub(crate) type EncodedResult = Result<Encoded, ConvertError>;

/// A call's result encoded where it was returned, inside the call (see
/// `lazy.lua`'s `run`): the result at stack index 1, the array marker at 2
/// and the headers metatable (or nil) at 3, in `form` (a table result
/// only, for the forms but [`ResultForm::Value`]):
/// - [`ResultForm::BodyText`]: the table's `body` as JSON text and its
///   `headers` read as they are when they have the common shape, the rest
///   as a value ([`crate::vm`]'s split, in the same order and limits);
/// - [`ResultForm::SortedText`]: the whole table as JSON text, every
///   object's keys sorted (also those of views no script read).
///
/// `None` when a part needs the general [`Encoder`]: the host then encodes
/// the whole result after the call, as a value.
///
/// # Safety
/// As [`walk_at`], with a table at index 1 for the text forms. `texts`
/// gives this call's number texts (settled again for each walk).
pub(crate) unsafe fn encode_result_at(
    state: *mut lua_State,
    limits: Limits,
    form: ResultForm,
    texts: impl Fn() -> Option<NumberTexts>,
    data: &lazy::CallData,
) -> Option<EncodedResult> {
    if form == ResultForm::SortedText {
        let noted = &crate::hooks::BILLING_FIELDS;
        return match walk_at(state, 1, limits, NO_SKIP, texts(), Some(data), ToText::sorted(noted)) {
            Ok(Some((text, ()))) => Some(Ok(Encoded {
                value: Value::Null,
                body: None,
                headers: None,
                text: Some(Box::new(BodyText {
                    text: text.out,
                    top: text.top,
                })),
            })),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        };
    }
    let mut body = None;
    let mut headers = None;
    let mut rest = limits;
    if form == ResultForm::BodyText {
        if ffi::lua_checkstack(state, 4) == 0 {
            return None;
        }
        ffi::lua_pushlstring(state, c"body".as_ptr(), 4);
        match ffi::lua_rawget(state, 1) {
            ffi::LUA_TNIL => ffi::lua_pop(state, 1),
            ffi::LUA_TTABLE => {
                let top = ffi::lua_gettop(state);
                let text = walk_at(state, top, limits, NO_SKIP, texts(), Some(data), ToText::new());
                ffi::lua_settop(state, top - 1);
                match text {
                    Ok(Some((text, ()))) => {
                        body = Some(Box::new(BodyText {
                            text: text.out,
                            top: text.top,
                        }))
                    }
                    Ok(None) => return None,
                    Err(e) => return Some(Err(e)),
                }
            }
            // A body that is not a table: the general path's rules.
            _ => {
                ffi::lua_pop(state, 1);
                return None;
            }
        }
        rest.max_bytes = rest.max_bytes.saturating_sub(body.as_ref().map_or(0, |b| b.text.len()));
        ffi::lua_pushlstring(state, c"headers".as_ptr(), 7);
        if ffi::lua_rawget(state, 1) == ffi::LUA_TTABLE {
            let top = ffi::lua_gettop(state);
            // Charged as the walk of the rest would: the key, then the table.
            if let Some((read, charged)) = headers::read(state, top, 3) {
                let charged = charged.saturating_add("headers".len() + 4);
                // Past the limit: left to the walk, which says so as ever.
                if charged <= rest.max_bytes {
                    rest.max_bytes -= charged;
                    headers = Some(read);
                }
            }
        }
        ffi::lua_pop(state, 1);
    }
    let skip = [body.is_some().then_some("body"), headers.is_some().then_some("headers")];
    match walk_at(state, 1, rest, skip, texts(), Some(data), ToValue) {
        Ok(Some((_, value))) => Some(Ok(Encoded {
            value,
            body,
            headers,
            text: None,
        })),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    }
}

/// Fields of a result's top-level table that a walk leaves out (a
/// transform's body and headers, taken apart).
type Skip = [Option<&'static str>; 2];

/// Nothing left out.
const NO_SKIP: Skip = [None, None];

/// Convert a Lua value to JSON text within `limits`: the text
/// [`lua_to_json`]'s value encodes as (`serde_json::to_writer`), without
/// building the value where [`RawWalk`] applies.
pub fn lua_to_json_text(lua: &Lua, value: &LuaValue, limits: Limits) -> Result<Vec<u8>, ConvertError> {
    if let LuaValue::Table(t) = value {
        if let Some((text, ())) = raw_walk(lua, t, limits, None, ToText::new())? {
            return Ok(text.out);
        }
    }
    let v = lua_to_json(lua, value, limits)?;
    serde_json::to_vec(&v).map_err(|e| ConvertError(format!("cannot write JSON: {e}")))
}

/// Why [`RawWalk`] stopped.
enum RawError {
    /// The value cannot be JSON (the same error [`Encoder`] gives).
    Convert(ConvertError),
    /// A table with a metatable other than the array marker, the headers
    /// metatable or a lazy view's of the current call: use [`Encoder`].
    General,
}

impl From<ConvertError> for RawError {
    fn from(e: ConvertError) -> Self {
        RawError::Convert(e)
    }
}

/// What a [`RawWalk`] produces, value by value: a `serde_json::Value`
/// ([`ToValue`]) or JSON text ([`ToText`]). Containers are opened, filled
/// item by item (`*_next` before each item is walked, `*_push` after) and
/// closed.
trait Emit {
    /// One converted value.
    type Item;
    /// An array being filled.
    type Array;
    /// An object being filled.
    type Object;
    fn null(&mut self) -> Self::Item;
    fn boolean(&mut self, b: bool) -> Self::Item;
    fn number(&mut self, n: Number) -> Self::Item;
    fn integer(&mut self, i: i64) -> Self::Item;
    fn string(&mut self, s: &str) -> Self::Item;
    fn array_open(&mut self, len: usize) -> Self::Array;
    fn array_next(&mut self, a: &mut Self::Array, index: usize);
    fn array_push(&mut self, a: &mut Self::Array, item: Self::Item);
    fn array_close(&mut self, a: Self::Array) -> Self::Item;
    fn object_open(&mut self, len: usize) -> Self::Object;
    fn object_next(&mut self, o: &mut Self::Object, index: usize, key: &str);
    fn object_push(&mut self, o: &mut Self::Object, item: Self::Item);
    fn object_close(&mut self, o: Self::Object) -> Self::Item;
    /// A field of a lazy table no script read: its source's JSON.
    fn json(&mut self, v: &Value) -> Self::Item;
    /// Whether the fields of a lazy table are written with their keys
    /// sorted, as a table's are, rather than in the source's order.
    fn sorts_views(&self) -> bool {
        false
    }
}

/// [`Emit`] into a `serde_json::Value`.
struct ToValue;

impl Emit for ToValue {
    type Item = Value;
    type Array = Vec<Value>;
    /// The map, and the key of the item being walked.
    type Object = (Map<String, Value>, String);

    fn null(&mut self) -> Value {
        Value::Null
    }
    fn boolean(&mut self, b: bool) -> Value {
        Value::Bool(b)
    }
    fn number(&mut self, n: Number) -> Value {
        Value::Number(n)
    }
    fn integer(&mut self, i: i64) -> Value {
        Value::from(i)
    }
    fn string(&mut self, s: &str) -> Value {
        Value::String(s.to_owned())
    }
    fn array_open(&mut self, len: usize) -> Vec<Value> {
        Vec::with_capacity(len)
    }
    fn array_next(&mut self, _: &mut Vec<Value>, _: usize) {}
    fn array_push(&mut self, a: &mut Vec<Value>, item: Value) {
        a.push(item);
    }
    fn array_close(&mut self, a: Vec<Value>) -> Value {
        Value::Array(a)
    }
    fn object_open(&mut self, len: usize) -> Self::Object {
        (Map::with_capacity(len), String::new())
    }
    fn object_next(&mut self, o: &mut Self::Object, _: usize, key: &str) {
        key.clone_into(&mut o.1);
    }
    fn object_push(&mut self, o: &mut Self::Object, item: Value) {
        o.0.insert(std::mem::take(&mut o.1), item);
    }
    fn json(&mut self, v: &Value) -> Value {
        v.clone()
    }
    fn object_close(&mut self, o: Self::Object) -> Value {
        Value::Object(o.0)
    }
}

/// Most pairs an object may have for [`RawWalk`] to keep them all on the
/// stack while it writes the object (a bigger one is walked key by key).
const MAX_PAIRS_ON_STACK: usize = 64;

/// [`Encoder`]'s rules, on the raw Lua stack, into an [`Emit`].
struct RawWalk<'d, E> {
    /// The call's conversion data, to encode its lazy tables (`None`: a
    /// lazy table is left to [`Encoder`]).
    data: Option<&'d lazy::CallData>,
    limits: Limits,
    used: usize,
    /// Stack index of the array marker.
    array_mt: c_int,
    /// Stack index of the headers metatable (lookups only: a headers table
    /// encodes as a plain one).
    headers_mt: c_int,
    /// Original texts of numbers a double changed.
    texts: Option<NumberTexts>,
    /// Fields of the top-level table left out.
    skip: Skip,
    emit: E,
}

impl<E: Emit> RawWalk<'_, E> {
    fn charge(&mut self, bytes: usize) -> Result<(), RawError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.limits.max_bytes {
            return Err(RawError::Convert(ConvertError(format!(
                "value is larger than the limit of {} bytes",
                self.limits.max_bytes
            ))));
        }
        Ok(())
    }

    /// The value at absolute stack index `idx`.
    ///
    /// # Safety
    /// `state` is live, inside a protected call, with a value at `idx` and
    /// the array marker at `self.array_mt`.
    unsafe fn value(&mut self, state: *mut lua_State, idx: c_int, depth: usize) -> Result<E::Item, RawError> {
        match ffi::lua_type(state, idx) {
            ffi::LUA_TNIL => {
                self.charge(4)?;
                Ok(self.emit.null())
            }
            ffi::LUA_TLIGHTUSERDATA => {
                let p = ffi::lua_touserdata(state, idx);
                if p.is_null() {
                    self.charge(4)?;
                    Ok(self.emit.null())
                } else if p == EMPTY_ARRAY.0 {
                    self.charge(2)?;
                    let a = self.emit.array_open(0);
                    Ok(self.emit.array_close(a))
                } else {
                    Err(ConvertError(String::from("a lightuserdata cannot be converted to JSON")).into())
                }
            }
            ffi::LUA_TBOOLEAN => {
                self.charge(5)?;
                Ok(self.emit.boolean(ffi::lua_toboolean(state, idx) != 0))
            }
            ffi::LUA_TNUMBER => {
                let n = ffi::lua_tonumber(state, idx);
                if let Some(text) = numbers::recorded(&self.texts, n) {
                    self.charge(text.as_str().len())?;
                    Ok(self.emit.number(text))
                } else if let Some(i) = stack::as_integer(n) {
                    self.charge(20)?;
                    Ok(self.emit.integer(i))
                } else {
                    self.charge(24)?;
                    Ok(self.emit.number(number(n)?))
                }
            }
            ffi::LUA_TSTRING => {
                let bytes = stack::str_at(state, idx);
                self.charge(bytes.len() + 2)?;
                match stack::utf8(bytes) {
                    Ok(s) => Ok(self.emit.string(s)),
                    Err(e) => Err(ConvertError(format!(
                        "string is not valid UTF-8 (invalid byte at offset {})",
                        e.valid_up_to()
                    ))
                    .into()),
                }
            }
            ffi::LUA_TTABLE => {
                if depth > self.limits.max_depth {
                    return Err(ConvertError(format!(
                        "nesting is deeper than {} levels (or the table refers to itself)",
                        self.limits.max_depth
                    ))
                    .into());
                }
                self.table(state, idx, depth)
            }
            other => Err(ConvertError(format!(
                "a {} cannot be converted to JSON",
                stack::type_name(state, other)
            ))
            .into()),
        }
    }

    /// # Safety
    /// As [`RawWalk::value`], with a table at `idx`.
    unsafe fn table(&mut self, state: *mut lua_State, idx: c_int, depth: usize) -> Result<E::Item, RawError> {
        if ffi::lua_checkstack(state, 4) == 0 {
            return Err(ConvertError(String::from("the Lua stack cannot grow")).into());
        }
        let mut marked_array = false;
        if ffi::lua_getmetatable(state, idx) != 0 {
            marked_array = ffi::lua_rawequal(state, -1, self.array_mt) != 0;
            let headers = ffi::lua_rawequal(state, -1, self.headers_mt) != 0;
            if !marked_array && !headers {
                // The metatable stays on the stack for `lazy`.
                return self.lazy(state, depth);
            }
            ffi::lua_pop(state, 1);
        }
        // A table without item 1 nor the array marker is an object (`{}`
        // when empty) whatever its keys: its pairs are then walked once,
        // without counting them first.
        let mut count = 0;
        if marked_array || ffi::lua_objlen(state, idx) != 0 {
            let shape = stack::table_shape(state, idx);
            if shape.is_array(marked_array) {
                self.charge(2)?;
                let mut items = self.emit.array_open(shape.len);
                for i in 1..=shape.len {
                    self.emit.array_next(&mut items, i - 1);
                    ffi::lua_rawgeti(state, idx, i as ffi::lua_Integer);
                    let item = self.value(state, ffi::lua_gettop(state), depth + 1);
                    ffi::lua_pop(state, 1);
                    self.emit.array_push(&mut items, item?);
                }
                return Ok(self.emit.array_close(items));
            }
            if marked_array {
                return Err(ConvertError(String::from(
                    "a table marked as a JSON array has keys that are not 1..n",
                ))
                .into());
            }
            count = shape.count;
        }
        self.charge(2)?;
        let base = ffi::lua_gettop(state);
        let object = self.object_on_stack(state, idx, depth, base);
        ffi::lua_settop(state, base);
        match object? {
            Some(object) => Ok(object),
            None => self.object_by_keys(state, idx, depth, count),
        }
    }

    /// The object at `idx`, too big to keep on the stack: its keys are
    /// copied and each value looked up again by its key. `count`: the
    /// number of pairs when known (0 when not).
    ///
    /// # Safety
    /// As [`RawWalk::table`].
    unsafe fn object_by_keys(
        &mut self,
        state: *mut lua_State,
        idx: c_int,
        depth: usize,
        count: usize,
    ) -> Result<E::Item, RawError> {
        // Keys first (in table order, as Encoder), then values by sorted key.
        // (JSON key, the Lua key when it is a number)
        let mut keys: Vec<(String, Option<f64>)> = Vec::with_capacity(count);
        ffi::lua_pushnil(state);
        while ffi::lua_next(state, idx) != 0 {
            let number = (ffi::lua_type(state, -2) == ffi::LUA_TNUMBER).then(|| ffi::lua_tonumber(state, -2));
            let key = object_key(state, -2).and_then(|k| {
                if depth == 1 && number.is_none() && self.skip.contains(&Some(k.as_str())) {
                    return Ok(None);
                }
                self.charge(k.len() + 4)?;
                Ok(Some(k))
            });
            ffi::lua_pop(state, 1);
            match key {
                Ok(Some(k)) => keys.push((k, number)),
                Ok(None) => {}
                Err(e) => {
                    ffi::lua_pop(state, 1);
                    return Err(e);
                }
            }
        }
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        no_duplicate_key(keys.iter().map(|k| k.0.as_str()))?;
        let mut map = self.emit.object_open(keys.len());
        for (i, (key, number)) in keys.into_iter().enumerate() {
            match number {
                Some(n) => ffi::lua_pushnumber(state, n),
                None => {
                    ffi::lua_pushlstring(state, key.as_ptr().cast(), key.len());
                }
            }
            self.emit.object_next(&mut map, i, &key);
            ffi::lua_rawget(state, idx);
            let value = self.value(state, ffi::lua_gettop(state), depth + 1);
            ffi::lua_pop(state, 1);
            self.emit.object_push(&mut map, value?);
        }
        Ok(self.emit.object_close(map))
    }
}

impl<E: Emit> RawWalk<'_, E> {
    /// A lazy table whose metatable is on top of the stack (which this
    /// pops), as [`Encoder`] writes one: the fields in the source's order,
    /// the Lua value of each field a script read and the source's JSON of
    /// the others. [`RawError::General`] for a table with any other
    /// metatable.
    ///
    /// # Safety
    /// As [`RawWalk::table`], with the table's metatable on top of the
    /// stack and room for three more values.
    unsafe fn lazy(&mut self, state: *mut lua_State, depth: usize) -> Result<E::Item, RawError> {
        let below = ffi::lua_gettop(state) - 1;
        let source = self.data.and_then(|data| lazy::view_source(state, data));
        let Some(source) = source else {
            ffi::lua_settop(state, below);
            return Err(RawError::General);
        };
        // The cache is on top, above the metatable.
        let cache = ffi::lua_gettop(state);
        if let Some(object) = source.json_object() {
            if !lazy::holds_a_field(state, cache) {
                // No script read a field: the object as parsed, without a
                // lookup per field in the cache and in the object.
                let result = self.unread_object(object, depth);
                ffi::lua_settop(state, below);
                return result;
            }
        }
        let fields = source.fields();
        let mut names = fields.names();
        if self.emit.sorts_views() {
            names.sort_unstable();
        }
        let mut object = self.emit.object_open(names.len());
        let mut written = 0;
        let mut result = Ok(());
        for name in names {
            ffi::lua_pushlstring(state, name.as_ptr().cast(), name.len());
            let item = if ffi::lua_rawget(state, cache) != ffi::LUA_TNIL {
                self.emit.object_next(&mut object, written, name);
                let item = self.value(state, cache + 1, depth + 1);
                ffi::lua_pop(state, 1);
                item
            } else {
                ffi::lua_pop(state, 1);
                let Some(original) = fields.json(name) else {
                    continue;
                };
                self.emit.object_next(&mut object, written, name);
                self.original(&original, depth)
            };
            match item {
                Ok(item) => self.emit.object_push(&mut object, item),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            written += 1;
        }
        ffi::lua_settop(state, below);
        result.map(|()| self.emit.object_close(object))
    }

    /// A lazy table at `depth` over `object` whose fields no script read:
    /// what the loop of [`RawWalk::lazy`] writes for it, field by field.
    fn unread_object(&mut self, object: &Map<String, Value>, depth: usize) -> Result<E::Item, RawError> {
        if self.emit.sorts_views() {
            let mut fields: Vec<(&String, &Value)> = object.iter().collect();
            fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
            return self.unread_fields(fields.into_iter(), object.len(), depth);
        }
        self.unread_fields(object.iter(), object.len(), depth)
    }

    /// The `len` fields of [`RawWalk::unread_object`], in their order.
    fn unread_fields<'v>(
        &mut self,
        fields: impl Iterator<Item = (&'v String, &'v Value)>,
        len: usize,
        depth: usize,
    ) -> Result<E::Item, RawError> {
        let mut out = self.emit.object_open(len);
        for (written, (name, original)) in fields.enumerate() {
            self.emit.object_next(&mut out, written, name);
            let item = self.original(original, depth)?;
            self.emit.object_push(&mut out, item);
        }
        Ok(self.emit.object_close(out))
    }

    /// A field of a lazy table at `depth` that no script read: its JSON,
    /// charged and bounded as [`Encoder`] does.
    fn original(&mut self, original: &Value, depth: usize) -> Result<E::Item, RawError> {
        self.charge(json_size(original))?;
        unread_field_fits(original, depth, self.limits)?;
        Ok(self.emit.json(original))
    }

    /// The object at `idx` with its pairs kept on the stack above `base`
    /// while it is written: keys are read where they are (no copy, and no
    /// second lookup of each value by its key). `None` when it has more
    /// than [`MAX_PAIRS_ON_STACK`] pairs or the stack cannot hold them
    /// (nothing written then). The caller resets the stack to `base`
    /// afterwards.
    ///
    /// # Safety
    /// As [`RawWalk::table`]; `base` is the top of the stack.
    unsafe fn object_on_stack(
        &mut self,
        state: *mut lua_State,
        idx: c_int,
        depth: usize,
        base: c_int,
    ) -> Result<Option<E::Item>, RawError> {
        ffi::lua_pushnil(state);
        let mut pairs: c_int = 0;
        while ffi::lua_next(state, idx) != 0 {
            pairs += 1;
            // Room for this pair's key again and the next pair.
            if pairs as usize > MAX_PAIRS_ON_STACK || ffi::lua_checkstack(state, 3) == 0 {
                return Ok(None);
            }
            // The key again, for `lua_next` to take; the pair stays.
            ffi::lua_pushvalue(state, -2);
        }
        // Pair i: its key at base + 2i + 1, its value just above.
        let mut keys: SmallVec<[(Cow<'_, str>, c_int); 16]> = SmallVec::with_capacity(pairs as usize);
        for i in 0..pairs {
            let at = base + 2 * i + 1;
            let key = if ffi::lua_type(state, at) == ffi::LUA_TSTRING {
                let text = stack::utf8(stack::str_at(state, at))
                    .map_err(|_| ConvertError(String::from("object key is not valid UTF-8")))?;
                if depth == 1 && self.skip.contains(&Some(text)) {
                    continue;
                }
                Cow::Borrowed(text)
            } else {
                Cow::Owned(object_key(state, at)?)
            };
            self.charge(key.len() + 4)?;
            keys.push((key, at + 1));
        }
        // Stable, as the other path: keys equal as JSON keep table order.
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        no_duplicate_key(keys.iter().map(|k| &*k.0))?;
        let mut map = self.emit.object_open(keys.len());
        for (i, (key, at)) in keys.iter().enumerate() {
            self.emit.object_next(&mut map, i, key);
            let value = self.value(state, *at, depth + 1)?;
            self.emit.object_push(&mut map, value);
        }
        Ok(Some(self.emit.object_close(map)))
    }
}

/// An error when two keys of one table are the same JSON key (`[1]` and
/// `["1"]`): JSON text would have the key twice, which every parser of
/// ours refuses. `keys` are sorted.
fn no_duplicate_key<'k>(keys: impl Iterator<Item = &'k str>) -> Result<(), ConvertError> {
    let mut last = None;
    for key in keys {
        if last == Some(key) {
            return Err(ConvertError(format!(
                "a table has two keys that are both the JSON key \"{key}\" (a number and a string)"
            )));
        }
        last = Some(key);
    }
    Ok(())
}

/// The object key at `idx` as [`Encoder`] writes it.
///
/// # Safety
/// `state` is live with a value at `idx`.
unsafe fn object_key(state: *mut lua_State, idx: c_int) -> Result<String, RawError> {
    match ffi::lua_type(state, idx) {
        ffi::LUA_TSTRING => stack::utf8(stack::str_at(state, idx))
            .map(str::to_owned)
            .map_err(|_| ConvertError(String::from("object key is not valid UTF-8")).into()),
        ffi::LUA_TNUMBER => {
            let n = ffi::lua_tonumber(state, idx);
            if let Some(i) = stack::as_integer(n) {
                Ok(i.to_string())
            } else if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
                Ok(format!("{}", n as i64))
            } else if n.is_finite() {
                Ok(n.to_string())
            } else {
                Err(ConvertError(String::from("a table key of type number cannot be a JSON object key")).into())
            }
        }
        other => Err(ConvertError(format!(
            "a table key of type {} cannot be a JSON object key",
            stack::type_name(state, other)
        ))
        .into()),
    }
}

struct Encoder<'l> {
    lua: &'l Lua,
    limits: Limits,
    used: usize,
    /// Original texts of numbers a double changed.
    texts: Option<NumberTexts>,
    /// A field of the top-level table left out.
    skip: Option<&'static str>,
}

impl Encoder<'_> {
    fn charge(&mut self, bytes: usize) -> Result<(), ConvertError> {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.limits.max_bytes {
            return Err(ConvertError(format!(
                "value is larger than the limit of {} bytes",
                self.limits.max_bytes
            )));
        }
        Ok(())
    }

    fn value(&mut self, value: &LuaValue, depth: usize) -> Result<Value, ConvertError> {
        match value {
            LuaValue::Nil => {
                self.charge(4)?;
                Ok(Value::Null)
            }
            LuaValue::LightUserData(p) if p.0.is_null() => {
                self.charge(4)?;
                Ok(Value::Null)
            }
            LuaValue::LightUserData(p) if *p == EMPTY_ARRAY => {
                self.charge(2)?;
                Ok(Value::Array(Vec::new()))
            }
            LuaValue::Boolean(b) => {
                self.charge(5)?;
                Ok(Value::Bool(*b))
            }
            LuaValue::Integer(i) => {
                if let Some(text) = numbers::recorded(&self.texts, *i as f64) {
                    self.charge(text.as_str().len())?;
                    return Ok(Value::Number(text));
                }
                self.charge(20)?;
                Ok(Value::from(*i))
            }
            LuaValue::Number(n) => {
                if let Some(text) = numbers::recorded(&self.texts, *n) {
                    self.charge(text.as_str().len())?;
                    return Ok(Value::Number(text));
                }
                self.charge(24)?;
                number(*n).map(Value::Number)
            }
            LuaValue::String(s) => {
                let bytes = s.as_bytes();
                self.charge(bytes.len() + 2)?;
                match stack::utf8(&bytes) {
                    Ok(s) => Ok(Value::String(s.to_owned())),
                    Err(e) => Err(ConvertError(format!(
                        "string is not valid UTF-8 (invalid byte at offset {})",
                        e.valid_up_to()
                    ))),
                }
            }
            LuaValue::Table(t) => {
                if depth > self.limits.max_depth {
                    return Err(ConvertError(format!(
                        "nesting is deeper than {} levels (or the table refers to itself)",
                        self.limits.max_depth
                    )));
                }
                self.table(t, depth)
            }
            other => Err(ConvertError(format!(
                "a {} cannot be converted to JSON",
                other.type_name()
            ))),
        }
    }

    fn table(&mut self, t: &Table, depth: usize) -> Result<Value, ConvertError> {
        if let Some(cache) = lazy::cache_of(t) {
            return self.lazy(&cache, depth);
        }
        let marked_array = t
            .metatable()
            .and_then(|mt| mt.raw_get::<String>("__metatable").ok())
            .is_some_and(|tag| tag == "json.array");

        let mut entries: Vec<(LuaValue, LuaValue)> = Vec::new();
        for pair in t.pairs::<LuaValue, LuaValue>() {
            entries.push(pair?);
        }
        let len = t.raw_len();
        let is_sequence = entries.len() == len
            && entries.iter().all(|(k, _)| match k {
                LuaValue::Integer(i) => *i >= 1 && (*i as usize) <= len,
                LuaValue::Number(n) => n.fract() == 0.0 && *n >= 1.0 && (*n as usize) <= len,
                _ => false,
            });

        if is_sequence && (len > 0 || marked_array) {
            self.charge(2)?;
            let mut items = Vec::with_capacity(len);
            for i in 1..=len {
                let v: LuaValue = t.raw_get(i)?;
                items.push(self.value(&v, depth + 1)?);
            }
            return Ok(Value::Array(items));
        }
        if marked_array {
            return Err(ConvertError(String::from(
                "a table marked as a JSON array has keys that are not 1..n",
            )));
        }
        self.charge(2)?;
        let mut fields = Vec::with_capacity(entries.len());
        for (k, v) in &entries {
            let key = match k {
                LuaValue::String(s) if depth == 1 && self.skip.is_some_and(|skip| s.as_bytes() == skip.as_bytes()) => {
                    continue;
                }
                LuaValue::String(s) => s
                    .to_str()
                    .map_err(|_| ConvertError(String::from("object key is not valid UTF-8")))?
                    .to_owned(),
                LuaValue::Integer(i) => i.to_string(),
                LuaValue::Number(n) if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER => {
                    format!("{}", *n as i64)
                }
                LuaValue::Number(n) if n.is_finite() => n.to_string(),
                other => {
                    return Err(ConvertError(format!(
                        "a table key of type {} cannot be a JSON object key",
                        other.type_name()
                    )))
                }
            };
            self.charge(key.len() + 4)?;
            fields.push((key, v));
        }
        // Lua tables have no order; sorted keys make the output the same in
        // every host and every run.
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        no_duplicate_key(fields.iter().map(|f| f.0.as_str()))?;
        let mut map = Map::with_capacity(fields.len());
        for (key, v) in fields {
            let value = self.value(v, depth + 1)?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }

    /// A lazy table never materialised: original JSON for every field the
    /// script did not read, the (possibly modified) Lua value for the others.
    fn lazy(&mut self, cache: &Table, depth: usize) -> Result<Value, ConvertError> {
        let fields = lazy::encoding_fields(self.lua, cache)?;
        let mut map = Map::with_capacity(fields.len());
        for (name, field) in fields {
            let value = match field {
                Ok(read) => self.value(&read, depth + 1)?,
                Err(original) => {
                    self.charge(json_size(&original))?;
                    unread_field_fits(&original, depth, self.limits)?;
                    original
                }
            };
            map.insert(name, value);
        }
        Ok(Value::Object(map))
    }
}

/// The JSON a Lua number encodes as (integral values as integers).
pub(crate) fn number(n: f64) -> Result<Number, ConvertError> {
    if !n.is_finite() {
        return Err(ConvertError(format!("number {n} cannot be represented in JSON")));
    }
    if n == 0.0 && n.is_sign_negative() {
        return Ok(negative_zero());
    }
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
        return Ok(Number::from(n as i64));
    }
    Number::from_f64(n).ok_or_else(|| ConvertError(format!("number {n} cannot be represented in JSON")))
}

/// `-0`, as JSON writes it (a double keeps the sign; JSON text `-0` came in).
fn negative_zero() -> Number {
    "-0".parse().unwrap_or_else(|_| Number::from(0))
}

/// Whether the source's JSON of an unread field of a lazy table at `depth`
/// stays within `limits.max_depth` once written (both encoders' rule).
fn unread_field_fits(original: &Value, depth: usize, limits: Limits) -> Result<(), ConvertError> {
    if depth + json_depth(original) > limits.max_depth + 1 {
        return Err(ConvertError(format!(
            "nesting is deeper than {} levels",
            limits.max_depth
        )));
    }
    Ok(())
}

/// Approximate encoded size of a JSON value (used for the output budget).
fn json_size(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 20,
        Value::String(s) => s.len() + 2,
        Value::Array(a) => a.iter().map(json_size).sum::<usize>() + 2,
        Value::Object(o) => o.iter().map(|(k, v)| k.len() + 4 + json_size(v)).sum::<usize>() + 2,
    }
}

/// Nesting depth of a JSON value (scalars are 0, `[]` is 1).
pub fn json_depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Parse JSON text within `limits` (size, then depth, duplicate keys
/// refused; see [`parse`]).
pub fn parse_json(text: &[u8], limits: Limits) -> Result<Value, ConvertError> {
    if text.len() > limits.max_bytes {
        return Err(ConvertError(format!(
            "JSON text is {} bytes, larger than the limit of {} bytes",
            text.len(),
            limits.max_bytes
        )));
    }
    let bounds = parse::Bounds {
        max_depth: limits.max_depth,
        max_memory: usize::MAX,
        interrupt: None,
    };
    parse::parse(text, &bounds).map_err(|e| ConvertError(e.to_string()))
}
