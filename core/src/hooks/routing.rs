//! `routing`: pick a backend by name, or `nil` for the default balancer.

use mlua::{Lua, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{json_type, HookInput, HookName, RequestInfo};
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

    fn set_globals(&self, lua: &Lua, env: &Table) -> mlua::Result<()> {
        env.raw_set("request", self.request.to_lua(lua)?)?;
        let backends = lua.create_table_with_capacity(0, self.backends.len())?;
        for b in self.backends {
            let t = lua.create_table_with_capacity(0, 5)?;
            t.raw_set("url", b.url.as_str())?;
            t.raw_set("healthy", b.healthy)?;
            t.raw_set("weight", b.weight)?;
            t.raw_set("latency_ms", b.latency_ms)?;
            t.raw_set("active_connections", b.active_connections)?;
            backends.raw_set(b.name.as_str(), t)?;
        }
        env.raw_set("backends", backends)
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
    pub fn from_result<'n>(value: &Value, mut names: impl Iterator<Item = &'n str>) -> Result<Self, HookError> {
        match value {
            Value::Null => Ok(RouteDecision::Default),
            Value::String(name) if names.any(|n| n == name) => Ok(RouteDecision::Backend(name.clone())),
            Value::String(name) => Err(HookError::bad_output(format!(
                "routing returned unknown backend '{name}'"
            ))),
            other => Err(HookError::bad_output(format!(
                "routing must return a backend name (string) or nil, got {}",
                json_type(other)
            ))),
        }
    }
}
