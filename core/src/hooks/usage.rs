//! `usage`: compute the usage record (billing) of a request.

use mlua::{Lua, Table};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{expect_object, optional_non_negative, HookInput, HookName, RequestInfo, ResponseInfo, ResultForm};
use crate::convert::{self, Global, Scalar};
use crate::error::HookError;
use crate::http::fields::BodyText;
use crate::policy::usage::RecordFields;

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
    const RESULT_FORM: ResultForm = ResultForm::SortedText;

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
    Custom(CustomRecord),
}

/// The fields of a record a charge reads and [`UsageRecord::check`] checks.
pub(crate) const BILLING_FIELDS: [&str; 5] = [
    "billable_tokens",
    "cost",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
];

/// A usage script's table: the JSON text hosts log and the ledger stores
/// ([`crate::policy::usage::record_json`]: every object's keys sorted),
/// with the fields a charge reads taken out of it.
///
/// The sandbox writes the table as that text where the script returned it;
/// no JSON value of the whole record is built (a usage call spent a third
/// of its time building one, only to write it out again).
#[derive(Debug, Clone, PartialEq)]
pub struct CustomRecord {
    json: String,
    /// The record's [`BILLING_FIELDS`], in that order, as
    /// [`RecordFields::number`] gives them: checked, so each is absent,
    /// null or a number >= 0.
    billing: [Option<Option<f64>>; BILLING_FIELDS.len()],
}

impl CustomRecord {
    /// The record as JSON text, every object's keys sorted.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The record's own text, taken.
    pub fn into_json(self) -> String {
        self.json
    }

    /// The whole record as a JSON value (parsed from its text).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.json).unwrap_or(Value::Null)
    }
}

/// A script's record is read by a charge through the fields it kept: those
/// are all a charge reads.
impl RecordFields for CustomRecord {
    fn number(&self, key: &str) -> Option<Option<f64>> {
        let i = BILLING_FIELDS.iter().position(|k| *k == key)?;
        self.billing[i]
    }
}

impl UsageRecord {
    /// Check a script result against the hook's contract.
    pub fn check(value: &Value) -> Result<(), HookError> {
        if value.is_null() {
            return Ok(());
        }
        let obj = expect_object(value, WHAT)?;
        for key in BILLING_FIELDS {
            optional_non_negative(crate::small_object::field(obj, key), key, WHAT)?;
        }
        Ok(())
    }

    /// A script result, checked ([`UsageRecord::check`]).
    pub fn from_result(value: Value) -> Result<Self, HookError> {
        Self::check(&value)?;
        Ok(match value {
            Value::Object(map) => UsageRecord::Custom(CustomRecord {
                billing: BILLING_FIELDS.map(|k| map.get(k).map(Value::as_f64)),
                json: crate::policy::usage::record_json(&Value::Object(map)),
            }),
            _ => UsageRecord::Raw,
        })
    }

    /// A script's table written as JSON text with sorted keys (the
    /// sandbox's [`crate::hooks::ResultForm::SortedText`]), checked as
    /// [`UsageRecord::check`] checks its value, with the same errors. The
    /// billing fields are read where the writer noted them.
    pub(crate) fn from_text(written: BodyText) -> Result<Self, HookError> {
        let BodyText { text, top } = written;
        let (Some(top), Some(b'{')) = (top, text.first()) else {
            // Not an object (an array): the value's check says why.
            let value: Value =
                serde_json::from_slice(&text).map_err(|e| HookError::bad_output(format!("{WHAT}: {e}")))?;
            return Self::from_result(value);
        };
        let mut billing = [None; BILLING_FIELDS.len()];
        for (i, (key, slot)) in BILLING_FIELDS.iter().zip(&mut billing).enumerate() {
            if let Some(field) = top.span(i).and_then(|span| text.get(span)) {
                *slot = Some(billing_field(key, field)?);
            }
        }
        let json = String::from_utf8(text).map_err(|e| HookError::bad_output(format!("{WHAT}: {e}")))?;
        Ok(UsageRecord::Custom(CustomRecord { json, billing }))
    }
}

/// What a record's errors are prefixed with.
const WHAT: &str = "usage";

/// A billing field `key` from its JSON text as the sandbox wrote it,
/// checked as [`UsageRecord::check`] checks its value (`null`: as absent;
/// a number >= 0). A finite number >= 0 or `null` is read off the text;
/// anything else is parsed and refused by that check, with its words.
fn billing_field(key: &str, text: &[u8]) -> Result<Option<f64>, HookError> {
    if text == b"null" {
        return Ok(None);
    }
    let number = std::str::from_utf8(text)
        .ok()
        .filter(|n| n.starts_with(|c: char| c == '-' || c.is_ascii_digit()))
        .and_then(|n| n.parse::<f64>().ok());
    if let Some(x) = number.filter(|x| x.is_finite() && *x >= 0.0) {
        return Ok(Some(x));
    }
    let value: Value = serde_json::from_slice(text).map_err(|e| HookError::bad_output(format!("{WHAT}: {e}")))?;
    optional_non_negative(Some(&value), key, WHAT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ScriptLimits};
    use crate::Engine;

    /// A record table leaves its call as sorted text with its billing
    /// fields noted (the path `tests/usage_record_text.rs` compares with
    /// the value path), not as a value.
    #[test]
    fn a_record_table_leaves_its_call_as_text() {
        let script = "return { total_tokens = usage.total_tokens, b = { 2, 1 }, a = 'x', cost = 0.5 }";
        let engine = Engine::new(Config::single_hook(
            HookName::Usage,
            "u",
            script,
            ScriptLimits::default(),
        ))
        .expect("engine");
        let request = RequestInfo::default();
        let usage = serde_json::json!({"total_tokens": 28});
        let input = UsageInput {
            request: &request,
            usage: &usage,
            response: &ResponseInfo::default(),
            metadata: &UsageMetadata {
                backend_url: String::new(),
                latency_ms: 0.0,
                is_stream: false,
            },
        };
        let out = engine.run(&input).expect("ran").expect("enabled");
        assert_eq!(out.value, Value::Null);
        let text = out.text.expect("written as text");
        assert_eq!(text.text, br#"{"a":"x","b":[2,1],"cost":0.5,"total_tokens":28}"#);
        match UsageRecord::from_text(*text).expect("a record") {
            UsageRecord::Custom(c) => {
                assert_eq!(c.number("total_tokens"), Some(Some(28.0)));
                assert_eq!(c.number("cost"), Some(Some(0.5)));
                assert_eq!(c.number("billable_tokens"), None);
                assert_eq!(c.number("a"), None, "not a billing field");
            }
            UsageRecord::Raw => panic!("a table is a record"),
        }
    }
}
