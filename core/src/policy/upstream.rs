//! The body a host sends a backend, from the client's body and the body a
//! `request_transform` script gave (if any):
//!
//! - nothing changed: the client's bytes, as they came (`body: None`);
//!   a script's `null` body (`json.null`) changes nothing either: a null
//!   request body is never what an API backend takes;
//! - the script gave a body: that body, encoded;
//! - a stream (`"stream": true` in the body that goes) of an endpoint whose
//!   streams can end with a usage chunk, whose body does not ask for
//!   `stream_options.include_usage`: the body with it set, and
//!   `strip_usage`, so the host removes that chunk before the client sees
//!   it ([`super::sse`]). Without it the backend reports no usage for a
//!   stream and the request could not be billed.

use serde_json::{Map, Value};

use crate::http::fields::TextBody;
use crate::small_object;

/// What to send upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamBody {
    /// The body to send; `None` sends the client's bytes unchanged.
    pub body: Option<Vec<u8>>,
    /// The request is a stream.
    pub stream: bool,
    /// `stream_options.include_usage` was added here: remove the usage
    /// chunk and the `"usage":null` members from the client's stream.
    pub strip_usage: bool,
}

/// The body to send for a client body `original` and a script's
/// `new_body`; `streams_usage` says whether the endpoint's streams can
/// carry a usage chunk (chat and text completions, not embeddings).
pub fn body(original: &Value, new_body: Option<TextBody>, streams_usage: bool) -> UpstreamBody {
    let new_body = new_body.filter(|b| b.text != b"null");
    let (stream, asks_usage) = match &new_body {
        Some(b) => (b.stream, b.include_usage),
        None => (
            small_object::get(original, "stream") == Some(&Value::Bool(true)),
            small_object::get(original, "stream_options").and_then(|o| small_object::get(o, "include_usage"))
                == Some(&Value::Bool(true)),
        ),
    };
    if stream && streams_usage && !asks_usage {
        let parsed = match &new_body {
            Some(b) => serde_json::from_slice::<Value>(&b.text).ok(),
            None => Some(original.clone()),
        };
        if let Some(Value::Object(mut obj)) = parsed {
            let opts = obj.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
            if !opts.is_object() {
                *opts = Value::Object(Map::new());
            }
            if let Value::Object(o) = opts {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            return UpstreamBody {
                body: Some(Value::Object(obj).to_string().into_bytes()),
                stream: true,
                strip_usage: true,
            };
        }
    }
    UpstreamBody {
        body: new_body.map(|b| b.text),
        stream,
        strip_usage: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_body_sent_follows_the_script_and_the_stream_rules() {
        // (client body, script body, streams_usage, sent body or None, stream, strip_usage)
        let cases = [
            (json!({"model": "m"}), None, true, None, false, false),
            (
                json!({"model": "m"}),
                Some(json!({"model": "n"})),
                true,
                Some(json!({"model": "n"})),
                false,
                false,
            ),
            (
                json!({"model": "m", "stream": true}),
                None,
                true,
                Some(json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}})),
                true,
                true,
            ),
            (
                json!({"stream": true, "stream_options": {"include_usage": true}}),
                None,
                true,
                None,
                true,
                false,
            ),
            (
                json!({"stream": true, "stream_options": 3}),
                None,
                true,
                Some(json!({"stream": true, "stream_options": {"include_usage": true}})),
                true,
                true,
            ),
            (json!({"stream": true}), None, false, None, true, false),
            (json!({"model": "m"}), Some(Value::Null), true, None, false, false),
            (
                json!({"model": "m"}),
                Some(json!({"model": "m", "stream": true})),
                true,
                Some(json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}})),
                true,
                true,
            ),
        ];
        for (i, (original, new_body, streams_usage, sent, stream, strip)) in cases.into_iter().enumerate() {
            let new_body = new_body.map(|b: Value| TextBody::new(b.to_string().into_bytes()).expect("fields"));
            let got = body(&original, new_body, streams_usage);
            let got_body = got.body.map(|b| serde_json::from_slice::<Value>(&b).expect("JSON"));
            assert_eq!(
                (got_body, got.stream, got.strip_usage),
                (sent, stream, strip),
                "case {i}"
            );
        }
    }
}
