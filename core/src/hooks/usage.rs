//! `usage`: compute the usage record (billing) of a request.

use mlua::{Lua, Table};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{expect_object, optional_non_negative, HookInput, HookName, RequestInfo, ResponseInfo};
use crate::convert::{self, Global, Scalar};
use crate::error::HookError;

/// Facts about the upstream exchange, shown as `metadata`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageMetadata {
    /// The backend that answered.
    pub backend_url: String,
    /// Upstream latency in milliseconds.
    pub latency_ms: f64,
    /// Whether the response was streamed.
    pub is_stream: bool,
}

/// Input of the `usage` hook.
#[derive(Debug, Clone, Copy)]
pub struct UsageInput<'a> {
    /// The client's request.
    pub request: &'a RequestInfo,
    /// Raw usage as the backend reported it (`prompt_tokens`, ...).
    pub usage: &'a Value,
    /// The response (for streams: status and final usage event).
    pub response: &'a ResponseInfo,
    /// Upstream facts.
    pub metadata: &'a UsageMetadata,
}

impl HookInput for UsageInput<'_> {
    const HOOK: HookName = HookName::Usage;

    fn request_id(&self) -> Option<&str> {
        Some(&self.request.id)
    }

    fn set_globals(&self, lua: &Lua, _env: &Table) -> mlua::Result<()> {
        // SAFETY: the input outlives the call: `set_globals` runs inside
        // `Vm::call` (the `HookInput` contract).
        unsafe { self.request.defer(lua)? };
        // SAFETY: as for `request`.
        unsafe { self.response.defer(lua)? };
        let m = self.metadata;
        // Sorted by name, as the view keeps them.
        let metadata = [
            ("backend_url", Scalar::Str(&m.backend_url)),
            ("is_stream", Scalar::Bool(m.is_stream)),
            ("latency_ms", Scalar::Num(m.latency_ms)),
        ];
        let globals = [("usage", self.usage.into()), ("metadata", Global::Fields(&metadata))];
        // SAFETY: `usage` and the backend URL are the input's, which
        // outlives the call; the lists are copied.
        unsafe { convert::stage_globals(lua, &globals) }
    }
}

/// What the usage script decided.
#[derive(Debug, Clone, PartialEq)]
pub enum UsageRecord {
    /// `nil`: record the raw usage.
    Raw,
    /// A table of usage fields; `billable_tokens` and `cost`, when present,
    /// are numbers >= 0.
    Custom(Map<String, Value>),
}

impl UsageRecord {
    /// Check a script result against the hook's contract.
    pub fn check(value: &Value) -> Result<(), HookError> {
        if value.is_null() {
            return Ok(());
        }
        let what = "usage";
        let obj = expect_object(value, what)?;
        for key in [
            "billable_tokens",
            "cost",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
        ] {
            optional_non_negative(obj, key, what)?;
        }
        Ok(())
    }

    /// A script result, checked ([`UsageRecord::check`]).
    pub fn from_result(value: Value) -> Result<Self, HookError> {
        Self::check(&value)?;
        Ok(match value {
            Value::Object(map) => UsageRecord::Custom(map),
            _ => UsageRecord::Raw,
        })
    }

    /// Tokens to charge against the key's quota: `billable_tokens` when the
    /// script gave it, else `total_tokens` of `raw`.
    pub fn billable_tokens(&self, raw: &Value) -> f64 {
        let from = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
        match self {
            UsageRecord::Custom(m) => m
                .get("billable_tokens")
                .and_then(Value::as_f64)
                .or_else(|| from(raw, "total_tokens"))
                .unwrap_or(0.0),
            UsageRecord::Raw => from(raw, "total_tokens").unwrap_or(0.0),
        }
    }
}
