//! The OpenAI request fields a host acts on, checked against their OpenAI
//! types before any hook runs.
//!
//! A host decides from these fields whether a request is a stream (and so
//! whether it asks for and parses the final usage chunk, and how it runs
//! response_transform). If the host read `"stream": "true"` as "not a
//! stream" while an upstream that coerces types (pydantic) read it as a
//! stream, the response would skip transforms and billing; so a field of
//! the wrong type is refused (400) instead of being read one way here and
//! another way upstream.
//!
//! | field | type |
//! |---|---|
//! | `model` | string |
//! | `stream` | boolean or null |
//! | `stream_options` | object or null |
//! | `stream_options.include_usage` | boolean or null |
//!
//! Absent fields are fine (the upstream decides whether they are required).

use std::fmt;

use serde_json::Value;

/// A request field with the wrong type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field, as a dotted path (`stream_options.include_usage`).
    pub field: &'static str,
    /// The type the field must have.
    pub expected: &'static str,
    /// The JSON type it had.
    pub got: &'static str,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' must be {}, got {}", self.field, self.expected, self.got)
    }
}

impl std::error::Error for FieldError {}

/// Check the fields of a request body (a JSON object; other values are
/// not checked: the host refuses them on its own terms).
pub fn check(body: &Value) -> Result<(), FieldError> {
    let Value::Object(obj) = body else {
        return Ok(());
    };
    let err = |field, expected, v: &Value| FieldError {
        field,
        expected,
        got: json_type(v),
    };
    match obj.get("model") {
        None | Some(Value::String(_)) => {}
        Some(v) => return Err(err("model", "a string", v)),
    }
    match obj.get("stream") {
        None | Some(Value::Bool(_) | Value::Null) => {}
        Some(v) => return Err(err("stream", "a boolean", v)),
    }
    match obj.get("stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(opts)) => match opts.get("include_usage") {
            None | Some(Value::Bool(_) | Value::Null) => {}
            Some(v) => return Err(err("stream_options.include_usage", "a boolean", v)),
        },
        Some(v) => return Err(err("stream_options", "an object", v)),
    }
    Ok(())
}

/// The JSON type name of a value, as the OpenAI API docs name it.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_types() {
        let ok = [
            json!({}),
            json!({"model": "gpt-4", "stream": true}),
            json!({"stream": false, "stream_options": {"include_usage": true}}),
            json!({"stream": null, "stream_options": null}),
            json!({"stream_options": {"include_usage": null, "other": 1}}),
            json!([1, 2]),
            json!("not an object"),
        ];
        for body in &ok {
            assert_eq!(check(body), Ok(()), "{body}");
        }
        let bad = [
            (json!({"stream": "true"}), "'stream' must be a boolean, got string"),
            (json!({"stream": 1}), "'stream' must be a boolean, got number"),
            (json!({"stream": [true]}), "'stream' must be a boolean, got array"),
            (json!({"stream": {}}), "'stream' must be a boolean, got object"),
            (json!({"model": 4}), "'model' must be a string, got number"),
            (json!({"model": null}), "'model' must be a string, got null"),
            (
                json!({"stream_options": true}),
                "'stream_options' must be an object, got boolean",
            ),
            (
                json!({"stream_options": []}),
                "'stream_options' must be an object, got array",
            ),
            (
                json!({"stream": true, "stream_options": {"include_usage": "yes"}}),
                "'stream_options.include_usage' must be a boolean, got string",
            ),
            (
                json!({"stream_options": {"include_usage": 0}}),
                "'stream_options.include_usage' must be a boolean, got number",
            ),
        ];
        for (body, message) in &bad {
            let e = check(body).expect_err("must be refused");
            assert_eq!(e.to_string(), *message, "{body}");
        }
    }
}
