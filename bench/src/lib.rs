//! Shared inputs for the benchmarks: the seed's routing script and request
//! bodies of a given size, built the way a gateway would receive them.

use serde_json::{json, Value};

/// The seed design's routing example, verbatim.
pub const SEED_ROUTING: &str = include_str!("../../examples/scripts/routing.lua");

/// A chat-completion body of roughly `bytes` bytes: a conversation of
/// 1 KB messages plus the fields the seed's scripts read.
pub fn chat_body(bytes: usize) -> Value {
    let message_text = "lorem ipsum dolor sit amet ".repeat(37); // ~1 KB
    let count = (bytes / (message_text.len() + 40)).max(1);
    let messages: Vec<Value> = (0..count)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": message_text}))
        .collect();
    json!({
        "model": "gpt-4",
        "messages": messages,
        "viplevel": 3,
        "temperature": 0.7,
        "user": {"profile": {"viplevel": 3, "region": "cn-north"}}
    })
}
