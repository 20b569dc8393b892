//! Typed inputs and outputs of the seven hooks (`docs/architecture.md`, "Hooks").
//!
//! Every hook input knows how to become the script's globals
//! ([`HookInput::set_globals`]); every output is parsed from the JSON form of
//! what the script returned and validated against the hook's contract, so a
//! wrong type or an out-of-range value is a `bad_output` error naming the
//! field. `nil` always means "use the standard behaviour".

mod auth;
mod error_handler;
mod key_info;
mod name;
mod rate_limit;
mod request;
mod routing;
mod transform;
mod usage;

pub use auth::{AuthInput, AuthVerdict, StandardChecks};
pub use error_handler::{ErrorInfo, ErrorInput, ErrorResponse};
pub use key_info::KeyInfo;
pub use name::HookName;
pub use rate_limit::{CurrentTime, RateLimitInput, RateLimitStatus, RateVerdict};
pub use request::RequestInfo;
pub use routing::{BackendStatus, RouteDecision, RoutingInput};
pub use transform::{
    HeaderChange, RequestRewrite, RequestTransformInput, ResponseBody, ResponseInfo, ResponseRewrite,
    ResponseTransformInput,
};
pub use usage::{CustomRecord, UsageInput, UsageMetadata, UsageRecord};

pub(crate) use transform::drop_unsettable;
pub(crate) use usage::BILLING_FIELDS;

use mlua::{Lua, Table};
use serde_json::{Map, Value};

use crate::error::HookError;
use crate::small_object;

/// The input of one hook call: which hook, and how to build its globals.
pub trait HookInput {
    /// The hook this input is for.
    const HOOK: HookName;

    /// How the result leaves the call ([`ResultForm`]).
    const RESULT_FORM: ResultForm = ResultForm::Value;

    /// The request id, for log lines written by the script.
    fn request_id(&self) -> Option<&str>;

    /// Set the hook's globals in the (empty) environment `env`.
    ///
    /// Runs only inside the VM's call (`Vm::call`), while `self` is
    /// borrowed: large inputs (`request`, `response`, `backends`) are
    /// registered as lazy views of `self` (`convert::defer`), which the
    /// call drops before it returns.
    fn set_globals(&self, lua: &Lua, env: &Table) -> mlua::Result<()>;
}

/// How a hook's result table is encoded where the script returned it,
/// straight from the Lua stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultForm {
    /// A `serde_json::Value`.
    Value,
    /// A transform's: its `body` as JSON text (the new body, which a host
    /// sends as is) without a `serde_json::Value` in between, its `headers`
    /// read off the stack as they are when they are a table of strings and
    /// booleans (`convert/headers.rs`), the rest a value.
    BodyText,
    /// The whole table as JSON text with every object's keys sorted: the
    /// usage record, which hosts log and the ledger stores as that text.
    SortedText,
}

/// The JSON of a headers table no script read: keys sorted, as the encoder
/// writes a table's, and the last of two headers with one name wins.
fn headers_json(headers: &[(String, String)]) -> Value {
    let mut sorted: Vec<&(String, String)> = headers.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut map = Map::with_capacity(sorted.len());
    for (k, v) in sorted {
        map.insert(k.clone(), Value::String(v.clone()));
    }
    Value::Object(map)
}

/// The object a table-returning hook gave back, or a `bad_output` error.
fn expect_object<'a>(value: &'a Value, what: &str) -> Result<&'a Map<String, Value>, HookError> {
    value
        .as_object()
        .ok_or_else(|| HookError::bad_output(format!("{what} must return a table or nil, got {}", json_type(value))))
}

/// The fields a hook's result table has, for hooks whose result is a table
/// with fixed fields (`usage` returns free-form fields, `routing` a name).
pub(crate) fn result_fields(hook: HookName) -> Option<&'static [&'static str]> {
    match hook {
        HookName::Auth => Some(&["allow", "reason", "status_code"]),
        HookName::RateLimit => Some(&["allow", "reason", "retry_after"]),
        HookName::RequestTransform => Some(&["body", "headers"]),
        HookName::ResponseTransform | HookName::ErrorHandler => Some(&["status_code", "body", "headers"]),
        HookName::Routing | HookName::Usage => None,
    }
}

/// Remove the fields of a result table that `hook`'s contract does not
/// have, and return their names. Unknown fields are ignored rather than
/// refused: a ported script returning `{allow = false, retry_after = 5}`
/// from auth must not fail closed for everyone. A known field of the wrong
/// type is still `bad_output`, and a typo of a required field (`alow`)
/// still fails as a missing field.
pub(crate) fn drop_unknown_fields(hook: HookName, value: &mut Value) -> Vec<String> {
    let (Some(allowed), Some(obj)) = (result_fields(hook), value.as_object_mut()) else {
        return Vec::new();
    };
    let unknown: Vec<String> = obj.keys().filter(|k| !allowed.contains(&k.as_str())).cloned().collect();
    for k in &unknown {
        obj.shift_remove(k);
    }
    unknown
}

/// A field that must be a boolean.
fn required_bool(obj: &Map<String, Value>, key: &str, what: &str) -> Result<bool, HookError> {
    match small_object::field(obj, key) {
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(HookError::bad_output(format!(
            "{what}: '{key}' must be a boolean, got {}",
            json_type(other)
        ))),
        None => Err(HookError::bad_output(format!("{what}: '{key}' is required"))),
    }
}

/// An optional string field (`json.null` counts as absent).
fn optional_string(obj: &Map<String, Value>, key: &str, what: &str) -> Result<Option<String>, HookError> {
    match small_object::field(obj, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(HookError::bad_output(format!(
            "{what}: '{key}' must be a string, got {}",
            json_type(other)
        ))),
    }
}

/// An optional HTTP status code for a final response: an integer in
/// 200..=599. 1xx codes are interim responses (a 101 switches protocols and
/// hands the connection over), never a final answer a script can give.
fn optional_status(obj: &Map<String, Value>, key: &str, what: &str) -> Result<Option<u16>, HookError> {
    match small_object::field(obj, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(code @ 200..=599) => Ok(Some(code as u16)),
            _ => Err(HookError::bad_output(format!(
                "{what}: '{key}' must be an HTTP status code (200-599), got {n}"
            ))),
        },
        Some(other) => Err(HookError::bad_output(format!(
            "{what}: '{key}' must be a number, got {}",
            json_type(other)
        ))),
    }
}

/// An optional non-negative number.
fn optional_non_negative(value: Option<&Value>, key: &str, what: &str) -> Result<Option<f64>, HookError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x >= 0.0 => Ok(Some(x)),
            _ => Err(HookError::bad_output(format!(
                "{what}: '{key}' must be a number >= 0, got {n}"
            ))),
        },
        Some(other) => Err(HookError::bad_output(format!(
            "{what}: '{key}' must be a number, got {}",
            json_type(other)
        ))),
    }
}

/// The JSON type name of a value, as a script author would call it.
pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "nil",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "table",
    }
}
