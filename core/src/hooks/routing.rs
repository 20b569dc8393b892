//! `routing`: pick a backend by name, or `nil` for the default balancer.

use std::borrow::Cow;
use std::ffi::c_int;

use mlua::ffi;
use mlua::{Lua, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{json_type, HookInput, HookName, RequestInfo};
use crate::convert::{self, push_str, Field, PushTable};
use crate::error::HookError;

/// One backend as the routing script sees it (`backends[name]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// The backend's name (the key in `backends`).
    pub name: String,
    /// The backend's base URL.
    pub url: String,
    /// Whether health checks currently consider it up.
    #[serde(default = "yes")]
    pub healthy: bool,
    /// Balancer weight.
    #[serde(default = "one")]
    pub weight: u32,
    /// Latency estimate (EWMA) in milliseconds.
    #[serde(default)]
    pub latency_ms: f64,
    /// Requests in flight to this backend.
    #[serde(default)]
    pub active_connections: u64,
}

impl BackendStatus {
    /// The backend set a host gives scripts as JSON (`{"name": {"url":
    /// ..., "healthy": ..., ...}}`, the `backends` global), typed.
    pub fn list_from_json(backends: &Value) -> Result<Vec<BackendStatus>, String> {
        let Some(map) = backends.as_object() else {
            return Err(format!(
                "backends must be an object of backends by name, got {}",
                json_type(backends)
            ));
        };
        map.iter()
            .map(|(name, b)| {
                let Some(fields) = b.as_object() else {
                    return Err(format!("backends.{name} must be an object, got {}", json_type(b)));
                };
                let mut fields = fields.clone();
                fields.insert("name".into(), Value::String(name.clone()));
                serde_json::from_value(Value::Object(fields)).map_err(|e| format!("backends.{name}: {e}"))
            })
            .collect()
    }
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

/// Input of the `routing` hook.
#[derive(Debug, Clone, Copy)]
pub struct RoutingInput<'a> {
    /// The client's request.
    pub request: &'a RequestInfo,
    /// The live backend set the host sees; the script may only name these.
    pub backends: &'a [BackendStatus],
}

impl HookInput for RoutingInput<'_> {
    const HOOK: HookName = HookName::Routing;

    fn request_id(&self) -> Option<&str> {
        Some(&self.request.id)
    }

    fn set_globals(&self, lua: &Lua, _env: &Table) -> mlua::Result<()> {
        // SAFETY: the input outlives the call: `set_globals` runs inside
        // `Vm::call` (the `HookInput` contract).
        unsafe {
            self.request.defer(lua)?;
            convert::defer(lua, "backends", self)
        }
    }
}

/// `backends` as a lazy table: a backend's table is built when a script
/// first reads it (the routing seed reads none). The last of two backends
/// with the same name wins, as in a table built by assignment.
impl convert::Fields for RoutingInput<'_> {
    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.backends.iter().map(|b| b.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    fn field(&self, name: &str) -> Field<'_> {
        self.backend(name).map_or(Field::Nil, |b| Field::Table(b))
    }

    fn json(&self, name: &str) -> Option<Cow<'_, Value>> {
        // As the encoder writes the numbers of the Lua table.
        let n = |x: f64| convert::number(x).map_or(Value::Null, Value::Number);
        self.backend(name).map(|b| {
            // Keys sorted, as the encoder writes a plain table's.
            Cow::Owned(serde_json::json!({
                "active_connections": n(b.active_connections as f64),
                "healthy": b.healthy,
                "latency_ms": n(b.latency_ms),
                "url": b.url,
                "weight": n(f64::from(b.weight)),
            }))
        })
    }
}

impl RoutingInput<'_> {
    fn backend(&self, name: &str) -> Option<&BackendStatus> {
        self.backends.iter().rev().find(|b| b.name == name)
    }
}

/// One backend's table, built on the raw stack: through mlua each field
/// was its own API call.
impl PushTable for BackendStatus {
    unsafe fn push(&self, state: *mut ffi::lua_State) {
        // SAFETY: the trait's contract: room for the table and a key and
        // value above it; nothing here needs dropping.
        unsafe {
            ffi::lua_createtable(state, 0, 5);
            push_str(state, "url");
            push_str(state, &self.url);
            ffi::lua_rawset(state, -3);
            push_str(state, "healthy");
            ffi::lua_pushboolean(state, c_int::from(self.healthy));
            ffi::lua_rawset(state, -3);
            for (key, n) in [
                ("weight", f64::from(self.weight)),
                ("latency_ms", self.latency_ms),
                // As a Lua number, as mlua converted it: exact below 2^53.
                ("active_connections", self.active_connections as f64),
            ] {
                push_str(state, key);
                ffi::lua_pushnumber(state, n);
                ffi::lua_rawset(state, -3);
            }
        }
    }
}

/// What the routing script decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteDecision {
    /// `nil`: let the default balancer choose.
    Default,
    /// A backend by name; always one of the backends passed in.
    Backend(String),
}

impl RouteDecision {
    /// Validate a script result against the backend names the host passed in.
    pub fn from_result<'n>(value: Value, mut names: impl Iterator<Item = &'n str>) -> Result<Self, HookError> {
        match value {
            Value::Null => Ok(RouteDecision::Default),
            Value::String(name) if names.any(|n| n == name) => Ok(RouteDecision::Backend(name)),
            Value::String(name) => Err(HookError::bad_output(format!(
                "routing returned unknown backend '{name}'"
            ))),
            other => Err(HookError::bad_output(format!(
                "routing must return a backend name (string) or nil, got {}",
                json_type(&other)
            ))),
        }
    }
}
