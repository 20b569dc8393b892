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

    fn at(mut self, segment: String) -> Self {
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
            Value::String(s) => match s.to_str() {
                Ok(s) => Ok(Json::String(s.to_owned())),
                Err(_) => {
                    let bytes = s.as_bytes();
                    let at = std::str::from_utf8(&bytes).err().map_or(0, |e| e.valid_up_to());
                    Err(ToJsonError::new(format!(
                        "string is not valid UTF-8 (invalid byte at offset {at})"
                    )))
                }
            },
            Value::Table(t) => {
                if depth > self.max_depth {
                    return Err(ToJsonError::new(format!(
                        "nesting is deeper than {} levels (or a table contains itself)",
                        self.max_depth
                    )));
                }
                self.table(t, depth)
            }
            other => Err(ToJsonError::new(format!(
                "a {} cannot be converted to JSON",
                other.type_name()
            ))),
        }
    }

    fn table(&self, t: &Table, depth: usize) -> Result<Json, ToJsonError> {
        let marked = t
            .metatable()
            .is_some_and(|mt| mt.to_pointer() == self.array_mt.to_pointer());
        let len = t.raw_len();
        let mut count = 0usize;
        let mut sequence = true;
        let mut entries: Vec<(Value, Value)> = Vec::new();
        for pair in t.pairs::<Value, Value>() {
            let (k, v) = pair.map_err(|e| ToJsonError::new(e.to_string()))?;
            count += 1;
            sequence = sequence && index_in(&k, len);
            entries.push((k, v));
        }
        if sequence && count == len && (len > 0 || marked) {
            let mut items = Vec::with_capacity(len);
            for i in 1..=len {
                let v: Value = t.raw_get(i).map_err(|e| ToJsonError::new(e.to_string()))?;
                items.push(self.value(&v, depth + 1).map_err(|e| e.at(format!("[{i}]")))?);
            }
            return Ok(Json::Array(items));
        }
        if marked {
            return Err(ToJsonError::new(
                "a table marked as an array (llmproxy.array_mt) has keys that are not 1..n",
            ));
        }
        let mut map = Map::with_capacity(entries.len());
        for (k, v) in &entries {
            let key = match k {
                Value::String(s) => s
                    .to_str()
                    .map_err(|_| ToJsonError::new("an object key is not valid UTF-8"))?
                    .to_owned(),
                Value::Integer(i) => i.to_string(),
                Value::Number(n) if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER => {
                    format!("{}", *n as i64)
                }
                Value::Number(n) if n.is_finite() => n.to_string(),
                other => {
                    return Err(ToJsonError::new(format!(
                        "a table key of type {} cannot be a JSON object key",
                        other.type_name()
                    )))
                }
            };
            let value = self.value(v, depth + 1).map_err(|e| e.at(format!(".{key}")))?;
            map.insert(key, value);
        }
        Ok(Json::Object(map))
    }
}

/// Whether `k` is an integer key in `1..=len`.
fn index_in(k: &Value, len: usize) -> bool {
    match k {
        Value::Integer(i) => *i >= 1 && usize::try_from(*i).is_ok_and(|i| i <= len),
        Value::Number(n) => n.fract() == 0.0 && *n >= 1.0 && *n <= len as f64,
        _ => false,
    }
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
