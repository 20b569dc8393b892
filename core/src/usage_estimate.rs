//! Usage estimated by the host when the backend's never came: a stream
//! whose client left (or whose backend ended) before the final usage chunk.
//! Every host that relays streams charges the same way (docs/gateway.md,
//! "Usage of streams"):
//!
//! - prompt tokens: the UTF-8 bytes of the request's text (`messages[].content`
//!   strings and `text` parts, `prompt`, `input`) divided by 4, rounded up;
//! - completion tokens: one per content event relayed to the client (an
//!   OpenAI-compatible backend streams about one token per event);
//! - the record carries `"estimated": true`.

use serde_json::{json, Value};

/// Tokens for `bytes` bytes of text: `ceil(bytes / 4)`.
pub fn tokens_from_bytes(bytes: usize) -> u64 {
    bytes.div_ceil(4) as u64
}

/// The bytes of prompt text in an OpenAI-style request body.
pub fn prompt_text_bytes(body: &Value) -> usize {
    fn text(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(text).sum(),
            // A content part: {"type": "text", "text": "..."}.
            Value::Object(o) => o.get("text").map_or(0, text),
            _ => 0,
        }
    }
    let messages: usize = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |ms| ms.iter().filter_map(|m| m.get("content")).map(text).sum());
    let prompt = body.get("prompt").map_or(0, text);
    let input = body.get("input").map_or(0, text);
    messages + prompt + input
}

/// The estimated usage object: `prompt_tokens`, `completion_tokens`,
/// `total_tokens` and `"estimated": true`.
pub fn estimated_usage(request_body: &Value, content_events: u64) -> Value {
    let prompt = tokens_from_bytes(prompt_text_bytes(request_body));
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": content_events,
        "total_tokens": prompt + content_events,
        "estimated": true,
    })
}

/// The usage a finished stream is charged: what the backend `reported`;
/// when it never came, for an API call, the estimate of its
/// `content_events` ([`estimated_usage`]); else none.
pub fn stream_usage(
    reported: Option<Value>,
    api_call: bool,
    request_body: &Value,
    content_events: u64,
) -> Option<Value> {
    reported.or_else(|| api_call.then(|| estimated_usage(request_body, content_events)))
}

/// Whether `usage` is an estimate ([`estimated_usage`] marks it).
pub fn is_estimated(usage: &Value) -> bool {
    crate::small_object::get(usage, "estimated") == Some(&Value::Bool(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_from_the_request_text_and_the_relayed_events() {
        let cases = [
            (
                json!({"messages": [{"role": "user", "content": "12345678"}]}),
                3,
                (2, 3),
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "123456789"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}),
                0,
                (3, 0),
            ),
            (json!({"prompt": ["ab", "cd"]}), 1, (1, 1)),
            (json!({"input": "a"}), 0, (1, 0)),
            (json!({}), 2, (0, 2)),
            (json!({"messages": "not a list", "prompt": 7}), 0, (0, 0)),
        ];
        for (body, events, (p, c)) in cases {
            let u = estimated_usage(&body, events);
            assert_eq!(u["prompt_tokens"], p, "{body}");
            assert_eq!(u["completion_tokens"], c, "{body}");
            assert_eq!(u["total_tokens"], p + c, "{body}");
            assert_eq!(u["estimated"], true);
        }
        assert_eq!(tokens_from_bytes(0), 0);
        assert_eq!(tokens_from_bytes(5), 2);
    }
}
