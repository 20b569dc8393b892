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
use std::ops::Range;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::policy::errors::GatewayError;
use crate::small_object;

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
    match small_object::field(obj, "model") {
        None | Some(Value::String(_)) => {}
        Some(v) => return Err(err("model", "a string", v)),
    }
    match small_object::field(obj, "stream") {
        None | Some(Value::Bool(_) | Value::Null) => {}
        Some(v) => return Err(err("stream", "a boolean", v)),
    }
    match small_object::field(obj, "stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(opts)) => match small_object::field(opts, "include_usage") {
            None | Some(Value::Bool(_) | Value::Null) => {}
            Some(v) => return Err(err("stream_options.include_usage", "a boolean", v)),
        },
        Some(v) => return Err(err("stream_options", "an object", v)),
    }
    Ok(())
}

/// Parse a client's request body to an API endpoint, as every host does
/// before any hook runs: JSON nested at most one level deeper than the
/// config's `max_depth` (the body sits one level below `request`), an
/// object, its OpenAI fields of their types ([`check`]). The error is the
/// 400 the host answers.
pub fn parse_body(text: &[u8], config: &crate::Config) -> Result<Value, GatewayError> {
    let limits = crate::convert::Limits {
        max_depth: config.defaults.max_depth + 1,
        max_bytes: usize::MAX,
    };
    match crate::convert::parse_json(text, limits) {
        Ok(v @ Value::Object(_)) => match check(&v) {
            Ok(()) => Ok(v),
            Err(e) => Err(GatewayError::invalid_field(e)),
        },
        Ok(_) => Err(GatewayError::invalid_body()),
        Err(e) => Err(GatewayError::invalid_json(e)),
    }
}

/// The body of a request as hooks see it: an API call's is parsed by
/// [`parse_body`] (its refusal is the 400 the host answers); any other
/// request's is its JSON when it is JSON, else `null` (it is relayed as
/// is, whatever it holds).
pub fn parse_request_body(
    api: Option<crate::http::api::Api>,
    text: &[u8],
    config: &crate::Config,
) -> Result<Value, GatewayError> {
    match api {
        Some(_) => parse_body(text, config),
        None => Ok(serde_json::from_slice(text).unwrap_or(Value::Null)),
    }
}

/// A request body as JSON text (a transform's new body, encoded straight
/// from Lua), with the fields a host acts on checked as [`check`] checks a
/// parsed body, and read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextBody {
    /// The JSON text.
    pub text: Vec<u8>,
    /// `"stream": true`.
    pub stream: bool,
    /// `"stream_options": {"include_usage": true}`.
    pub include_usage: bool,
}

/// The fields of a body object [`TextBody`] reads, left as JSON text; a
/// present `null` is `Some("null")`.
#[derive(Deserialize)]
struct Top<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    model: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Options<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    include_usage: Option<&'a RawValue>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A body as JSON text, written by the core's encoder, which also noted
/// where the values of the fields [`TextBody`] reads are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BodyText {
    /// The JSON text.
    pub text: Vec<u8>,
    /// Where the top-level object's fields are; `None` when the text is not
    /// an object or the writer did not note them.
    pub top: Option<TopFields>,
}

impl From<Vec<u8>> for BodyText {
    fn from(text: Vec<u8>) -> BodyText {
        BodyText { text, top: None }
    }
}

/// Where the values of some fields of a JSON object are in its text
/// (byte ranges of each field present), noted by the writer of the text:
/// with them a reader reads a few short slices instead of scanning text
/// that may be megabytes long. A body's `model`, `stream` and
/// `stream_options` ([`TopFields::BODY`], for [`TextBody`]), a usage
/// record's billing fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopFields {
    names: &'static [&'static str],
    spans: [Option<Range<usize>>; TopFields::MAX],
}

impl Default for TopFields {
    fn default() -> TopFields {
        TopFields::of(&TopFields::BODY)
    }
}

impl TopFields {
    /// The fields [`TextBody`] reads.
    pub const BODY: [&'static str; 3] = ["model", "stream", "stream_options"];
    /// The most fields noted.
    pub const MAX: usize = 5;

    /// Nothing noted yet of the fields `names` (at most [`TopFields::MAX`]).
    pub const fn of(names: &'static [&'static str]) -> TopFields {
        TopFields {
            names,
            spans: [const { None }; TopFields::MAX],
        }
    }

    /// Which field `key` is, `None` for a field not noted.
    pub fn index(&self, key: &str) -> Option<usize> {
        self.names
            .iter()
            .position(|name| *name == key)
            .filter(|i| *i < Self::MAX)
    }

    /// Nothing noted yet of the same fields.
    pub fn cleared(&self) -> TopFields {
        TopFields::of(self.names)
    }

    /// Note that field `index` (from [`TopFields::index`]) is at `span`.
    pub fn set(&mut self, index: usize, span: Range<usize>) {
        if let Some(slot) = self.spans.get_mut(index) {
            *slot = Some(span);
        }
    }

    /// Where field `index` is, when the object has it.
    pub fn span(&self, index: usize) -> Option<Range<usize>> {
        self.spans.get(index).cloned().flatten()
    }

    /// The fields [`TextBody::top`] would find in `text`, read from their
    /// spans; `None` when a span is not one JSON value of `text` (then the
    /// text is read whole).
    fn read<'a>(&self, text: &'a [u8]) -> Option<Top<'a>> {
        let raw = |i: usize| -> Option<Option<&'a RawValue>> {
            match &self.spans[i] {
                None => Some(None),
                Some(span) => serde_json::from_slice::<&RawValue>(text.get(span.clone())?)
                    .ok()
                    .map(Some),
            }
        };
        Some(Top {
            model: raw(0)?,
            stream: raw(1)?,
            stream_options: raw(2)?,
        })
    }
}

impl TextBody {
    /// Check and read `text`, valid JSON text. A body that is not an
    /// object is not checked (as [`check`]) and is not a stream.
    pub fn new(text: Vec<u8>) -> Result<TextBody, FieldError> {
        Self::from_encoded(text.into())
    }

    /// As [`TextBody::new`], reading only the fields' spans when the
    /// encoder noted them.
    pub(crate) fn from_encoded(body: BodyText) -> Result<TextBody, FieldError> {
        let top = match &body.top {
            Some(fields) => fields.read(&body.text).or_else(|| Self::top(&body.text)),
            None => Self::top(&body.text),
        };
        let (stream, include_usage) = top.map_or(Ok((false, false)), Self::read)?;
        Ok(TextBody {
            text: body.text,
            stream,
            include_usage,
        })
    }

    /// The fields read of a body object's text; `None` when it is not an
    /// object.
    fn top(text: &[u8]) -> Option<Top<'_>> {
        if first_byte(text) != Some(b'{') {
            return None;
        }
        serde_json::from_slice::<Top<'_>>(text).ok()
    }

    fn read(top: Top<'_>) -> Result<(bool, bool), FieldError> {
        let err = |field, expected, got| FieldError { field, expected, got };
        match top.model.map(raw_type) {
            None | Some("string") => {}
            Some(got) => return Err(err("model", "a string", got)),
        }
        let stream = match top.stream.map(|r| (raw_type(r), r.get())) {
            None | Some(("null", _)) => false,
            Some(("boolean", v)) => v == "true",
            Some((got, _)) => return Err(err("stream", "a boolean", got)),
        };
        let include_usage = match top.stream_options.map(|r| (raw_type(r), r)) {
            None | Some(("null", _)) => false,
            Some(("object", r)) => {
                let opts = serde_json::from_str::<Options<'_>>(r.get())
                    .map_err(|_| err("stream_options", "an object", "object"))?;
                match opts.include_usage.map(|r| (raw_type(r), r.get())) {
                    None | Some(("null", _)) => false,
                    Some(("boolean", v)) => v == "true",
                    Some((got, _)) => return Err(err("stream_options.include_usage", "a boolean", got)),
                }
            }
            Some((got, _)) => return Err(err("stream_options", "an object", got)),
        };
        Ok((stream, include_usage))
    }
}

fn first_byte(text: &[u8]) -> Option<u8> {
    text.iter().copied().find(|b| !b.is_ascii_whitespace())
}

/// The JSON type name of a value given as JSON text.
fn raw_type(raw: &RawValue) -> &'static str {
    match first_byte(raw.get().as_bytes()) {
        Some(b'"') => "string",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        Some(b'{') => "object",
        Some(b'[') => "array",
        _ => "number",
    }
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
            let text = TextBody::new(body.to_string().into_bytes()).expect("the same verdict as text");
            let stream = body.get("stream") == Some(&Value::Bool(true));
            let usage = body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
            assert_eq!((text.stream, text.include_usage), (stream, usage), "{body}");
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
            let e = TextBody::new(body.to_string().into_bytes()).expect_err("refused as text too");
            assert_eq!(e.to_string(), *message, "{body} as text");
        }
    }
}
