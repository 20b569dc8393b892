//! Host Lua values <-> JSON, for the module's arguments and results.
//!
//! This converts in the **host's** Lua state (the nginx worker's, the
//! `luajit` CLI's), not in a sandbox VM. The rules match the sandbox's
//! (`llmproxy_core::convert`) and lua-cjson's where they meet:
//!
//! - `nil` (a top-level argument only) and `llmproxy.null` (a NULL light
//!   userdata, the same value as `cjson.null`) are `null`;
//! - a table whose metatable is `llmproxy.array_mt` is an array, even when
//!   empty; `llmproxy.empty_array` is `[]`; any other table is an array when
//!   its keys are exactly `1..n` with `n > 0`, and an object otherwise (so
//!   `{}` is `{}`);
//! - object keys are strings, or numbers written as JSON strings;
//! - numbers that are integral within +-2^53 are JSON integers; NaN and
//!   infinities are errors;
//! - strings must be UTF-8 (JSON cannot carry anything else): an error, not
//!   a silent replacement;
//! - nesting deeper than the limit (or a table that contains itself) is an
//!   error, never a stack overflow.
//!
//! Results come back the other way: arrays get `llmproxy.array_mt`, so an
//! empty array passed back in stays an array.

use std::ffi::c_int;

use llmproxy_core::stack;
use mlua::ffi::{self, lua_State};
use mlua::{Lua, Table, Value};
use serde_json::{Map, Number, Value as Json};

/// `llmproxy.empty_array`: the same sentinel as the sandbox's
/// `json.empty_array`.
pub use llmproxy_core::convert::EMPTY_ARRAY;
/// Largest integer a double holds exactly (2^53).
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_992.0;

/// Why a value could not become JSON: the message and the key path (built
/// innermost first while unwinding).
#[derive(Debug)]
pub struct ToJsonError {
    path: Vec<String>,
    message: String,
}

impl ToJsonError {
    fn new(message: impl Into<String>) -> Self {
        ToJsonError {
            path: Vec::new(),
            message: message.into(),
        }
    }

    pub(super) fn at(mut self, segment: String) -> Self {
        self.path.push(segment);
        self
    }

    /// `root.a.b[2]: message`.
    pub fn describe(&self, root: &str) -> String {
        let mut path = String::from(root);
        for seg in self.path.iter().rev() {
            path.push_str(seg);
        }
        format!("{path}: {}", self.message)
    }
}

/// Converts host Lua values to JSON.
pub struct ToJson<'a> {
    /// The host's state.
    pub lua: &'a Lua,
    /// `llmproxy.array_mt`.
    pub array_mt: &'a Table,
    /// Deepest nesting accepted (the top level is depth 1).
    pub max_depth: usize,
}

impl ToJson<'_> {
    /// Convert `value` (depth 1).
    pub fn convert(&self, value: &Value) -> Result<Json, ToJsonError> {
        self.value(value, 1)
    }

    /// Convert `value` found at nesting `depth` (a member of a top-level
    /// table is at depth 2).
    pub fn convert_at(&self, value: &Value, depth: usize) -> Result<Json, ToJsonError> {
        self.value(value, depth)
    }

    fn value(&self, value: &Value, depth: usize) -> Result<Json, ToJsonError> {
        match value {
            Value::Nil => Ok(Json::Null),
            Value::LightUserData(p) if p.0.is_null() => Ok(Json::Null),
            Value::LightUserData(p) if *p == EMPTY_ARRAY => Ok(Json::Array(Vec::new())),
            Value::Boolean(b) => Ok(Json::Bool(*b)),
            Value::Integer(i) => Ok(Json::from(*i)),
            Value::Number(n) => number(*n),
            Value::String(s) => utf8(&s.as_bytes()).map(|s| Json::String(s.to_owned())),
            Value::Table(t) => self.table(t, depth),
            other => Err(ToJsonError::new(format!(
                "a {} cannot be converted to JSON",
                other.type_name()
            ))),
        }
    }

    /// A table, walked on the host's stack: mlua's `pairs` would make a
    /// registry reference of every string and table it yields, which cost
    /// more than the conversion itself.
    fn table(&self, t: &Table, depth: usize) -> Result<Json, ToJsonError> {
        let mut out = Err(ToJsonError::new("the table was not converted"));
        let walk = Walk {
            array_mt: 2,
            max_depth: self.max_depth,
        };
        // SAFETY: `exec_raw` pushes the table (index 1) and `array_mt`
        // (index 2) and calls the closure in a protected call with them on
        // the stack. `Walk` only reads: it keeps the stack balanced, checks
        // stack space before each push, never converts a key in place
        // (numbers are read with lua_tonumber), and borrows string bytes
        // only while the string is on the stack.
        let ran = unsafe {
            self.lua
                .exec_raw::<()>((t, self.array_mt), |state| out = walk.value(state, 1, depth))
        };
        ran.map_err(|e| ToJsonError::new(e.to_string()))?;
        out
    }
}

/// Why a table of hook globals could not become a JSON object.
#[derive(Debug)]
pub enum GlobalsError {
    /// A key that is not a string (its Lua type).
    Key(String),
    /// A key that is not UTF-8.
    KeyNotUtf8,
    /// `request` where it may not be (it is passed as a handle).
    Request,
    /// The value of global `.0` could not be converted.
    Value(String, ToJsonError),
    /// The walk itself failed (the Lua stack).
    Lua(String),
}

impl ToJson<'_> {
    /// The globals table `t` as a JSON object, walked once on the host's
    /// stack (one protected call for the whole table, no registry
    /// references for its keys and values); members are at depth 2. With
    /// `skip_request`, the `request` global is left out (a handle the
    /// caller passes on its own); without, it is an error.
    pub fn globals(&self, t: &Table, skip_request: bool) -> Result<Map<String, Json>, GlobalsError> {
        let mut out = Err(GlobalsError::Lua("the table was not converted".into()));
        let walk = Walk {
            array_mt: 2,
            max_depth: self.max_depth,
        };
        // SAFETY: as in `ToJson::table`: the table is at index 1 and
        // `array_mt` at index 2 inside a protected call; the walk keeps the
        // stack balanced (on an early return it pops the key it holds).
        let ran = unsafe {
            self.lua
                .exec_raw::<()>((t, self.array_mt), |state| out = walk.globals(state, 1, skip_request))
        };
        ran.map_err(|e| GlobalsError::Lua(e.to_string()))?;
        out
    }
}

/// The raw-stack walk behind [`ToJson::table`].
pub(super) struct Walk {
    /// Stack index of `llmproxy.array_mt`.
    pub(super) array_mt: c_int,
    /// Deepest nesting accepted (the top level is depth 1).
    pub(super) max_depth: usize,
}

impl Walk {
    /// The value at absolute stack index `idx`.
    ///
    /// # Safety
    /// `state` is a live state with a valid value at `idx` and `array_mt`
    /// at `self.array_mt`, inside a protected call.
    pub(super) unsafe fn value(&self, state: *mut lua_State, idx: c_int, depth: usize) -> Result<Json, ToJsonError> {
        match ffi::lua_type(state, idx) {
            ffi::LUA_TNIL => Ok(Json::Null),
            ffi::LUA_TBOOLEAN => Ok(Json::Bool(ffi::lua_toboolean(state, idx) != 0)),
            ffi::LUA_TNUMBER => {
                let n = ffi::lua_tonumber(state, idx);
                match stack::as_integer(n) {
                    Some(i) => Ok(Json::from(i)),
                    None => number(n),
                }
            }
            ffi::LUA_TSTRING => utf8(stack::str_at(state, idx)).map(|s| Json::String(s.to_owned())),
            ffi::LUA_TLIGHTUSERDATA => {
                let p = ffi::lua_touserdata(state, idx);
                if p.is_null() {
                    Ok(Json::Null)
                } else if p == EMPTY_ARRAY.0 {
                    Ok(Json::Array(Vec::new()))
                } else {
                    Err(ToJsonError::new("a lightuserdata cannot be converted to JSON"))
                }
            }
            ffi::LUA_TTABLE => self.table(state, idx, depth),
            other => Err(ToJsonError::new(format!(
                "a {} cannot be converted to JSON",
                stack::type_name(state, other)
            ))),
        }
    }

    /// The globals table at `idx` (see [`ToJson::globals`]).
    ///
    /// # Safety
    /// As [`Walk::value`], with a table at `idx`.
    unsafe fn globals(
        &self,
        state: *mut lua_State,
        idx: c_int,
        skip_request: bool,
    ) -> Result<Map<String, Json>, GlobalsError> {
        if ffi::lua_checkstack(state, 4) == 0 {
            return Err(GlobalsError::Lua("the Lua stack cannot grow".into()));
        }
        let mut map = Map::new();
        ffi::lua_pushnil(state);
        while ffi::lua_next(state, idx) != 0 {
            let top = ffi::lua_gettop(state);
            let entry = match ffi::lua_type(state, top - 1) {
                ffi::LUA_TSTRING => match std::str::from_utf8(stack::str_at(state, top - 1)) {
                    Ok("request") if skip_request => None,
                    Ok("request") => Some(Err(GlobalsError::Request)),
                    Ok(key) => Some(
                        self.value(state, top, 2)
                            .map(|v| (key.to_owned(), v))
                            .map_err(|e| GlobalsError::Value(key.to_owned(), e)),
                    ),
                    Err(_) => Some(Err(GlobalsError::KeyNotUtf8)),
                },
                other => Some(Err(GlobalsError::Key(stack::type_name(state, other)))),
            };
            ffi::lua_pop(state, 1);
            match entry {
                None => {}
                Some(Ok((key, value))) => {
                    map.insert(key, value);
                }
                Some(Err(e)) => {
                    ffi::lua_pop(state, 1); // the key: the walk stops here
                    return Err(e);
                }
            }
        }
        Ok(map)
    }

    /// Whether the table at `idx` carries `llmproxy.array_mt`, and its
    /// shape: together they say whether it is a JSON array.
    ///
    /// # Safety
    /// As [`Walk::value`], with a table at `idx` and room for two more
    /// values on the stack.
    pub(super) unsafe fn shape(&self, state: *mut lua_State, idx: c_int) -> (bool, stack::TableShape) {
        let marked = ffi::lua_getmetatable(state, idx) != 0 && {
            let same = ffi::lua_rawequal(state, -1, self.array_mt) != 0;
            ffi::lua_pop(state, 1);
            same
        };
        (marked, stack::table_shape(state, idx))
    }

    /// # Safety
    /// As [`Walk::value`], with a table at `idx`.
    unsafe fn table(&self, state: *mut lua_State, idx: c_int, depth: usize) -> Result<Json, ToJsonError> {
        if depth > self.max_depth {
            return Err(ToJsonError::new(format!(
                "nesting is deeper than {} levels (or a table contains itself)",
                self.max_depth
            )));
        }
        if ffi::lua_checkstack(state, 4) == 0 {
            return Err(ToJsonError::new("the Lua stack cannot grow"));
        }
        let (marked, shape) = self.shape(state, idx);
        if shape.is_array(marked) {
            let mut items = Vec::with_capacity(shape.len);
            for i in 1..=shape.len {
                ffi::lua_rawgeti(state, idx, i as ffi::lua_Integer);
                let item = self.value(state, ffi::lua_gettop(state), depth + 1);
                ffi::lua_pop(state, 1);
                items.push(item.map_err(|e| e.at(format!("[{i}]")))?);
            }
            return Ok(Json::Array(items));
        }
        if marked {
            return Err(ToJsonError::new(
                "a table marked as an array (llmproxy.array_mt) has keys that are not 1..n",
            ));
        }
        let mut map = Map::with_capacity(shape.count);
        ffi::lua_pushnil(state);
        while ffi::lua_next(state, idx) != 0 {
            let top = ffi::lua_gettop(state);
            let entry = object_key(state, top - 1).and_then(|key| {
                let value = self.value(state, top, depth + 1).map_err(|e| e.at(format!(".{key}")))?;
                Ok((key, value))
            });
            ffi::lua_pop(state, 1);
            match entry {
                Ok((key, value)) => {
                    map.insert(key, value);
                }
                Err(e) => {
                    ffi::lua_pop(state, 1); // the key: the walk stops here
                    return Err(e);
                }
            }
        }
        Ok(Json::Object(map))
    }
}

/// The object key at `idx`: a string, or a number written as JSON writes it.
///
/// # Safety
/// `state` is live with a value at `idx`.
unsafe fn object_key(state: *mut lua_State, idx: c_int) -> Result<String, ToJsonError> {
    match ffi::lua_type(state, idx) {
        ffi::LUA_TSTRING => utf8(stack::str_at(state, idx))
            .map(str::to_owned)
            .map_err(|_| ToJsonError::new("an object key is not valid UTF-8")),
        ffi::LUA_TNUMBER => {
            let n = ffi::lua_tonumber(state, idx);
            match stack::as_integer(n) {
                Some(i) => Ok(i.to_string()),
                None if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER => Ok(format!("{}", n as i64)), // -0
                None if n.is_finite() => Ok(n.to_string()),
                None => Err(ToJsonError::new(
                    "a table key of type number cannot be a JSON object key",
                )),
            }
        }
        other => Err(ToJsonError::new(format!(
            "a table key of type {} cannot be a JSON object key",
            stack::type_name(state, other)
        ))),
    }
}

/// `bytes` as UTF-8, or the error JSON gives for them.
fn utf8(bytes: &[u8]) -> Result<&str, ToJsonError> {
    std::str::from_utf8(bytes).map_err(|e| {
        ToJsonError::new(format!(
            "string is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })
}

fn number(n: f64) -> Result<Json, ToJsonError> {
    if !n.is_finite() {
        return Err(ToJsonError::new(format!("number {n} cannot be represented in JSON")));
    }
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
        return Ok(Json::from(n as i64));
    }
    Number::from_f64(n)
        .map(Json::Number)
        .ok_or_else(|| ToJsonError::new(format!("number {n} cannot be represented in JSON")))
}

/// Convert a JSON value to a host Lua value: `null` is `llmproxy.null`,
/// arrays carry `array_mt`. Depth is bounded by the engine's output limits.
pub fn to_lua(lua: &Lua, value: &Json, array_mt: &Table) -> mlua::Result<Value> {
    Ok(match value {
        Json::Null => Value::NULL,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) if i.unsigned_abs() <= 1 << 53 => Value::Integer(i),
            _ => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item, array_mt)?)?;
            }
            t.set_metatable(Some(array_mt.clone()))?;
            Value::Table(t)
        }
        Json::Object(map) => {
            let t = lua.create_table_with_capacity(0, map.len())?;
            for (k, v) in map {
                t.raw_set(k.as_str(), to_lua(lua, v, array_mt)?)?;
            }
            Value::Table(t)
        }
    })
}
