//! A field of a small JSON object, found without hashing its name.
//!
//! `serde_json`'s map (an `IndexMap` here, for key order) hashes the name
//! with SipHash on every lookup: more than a hundred instructions for a
//! short key. The objects read on every request (a usage record, the
//! request's top-level fields, `stream_options`) hold a handful of fields,
//! and comparing the name with each of them costs a fraction of that.

use serde_json::{Map, Value};

/// Objects with at most this many fields are scanned, larger ones hashed.
const SCAN_UP_TO: usize = 16;

/// Field `name` of `value` when it is an object (`None` otherwise, as
/// `Value::get` with a string index).
pub fn get<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    value.as_object().and_then(|object| field(object, name))
}

/// Field `name` of `object`.
pub fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if object.len() > SCAN_UP_TO {
        return object.get(name);
    }
    object.iter().find_map(|(k, v)| (k == name).then_some(v))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn finds_what_value_get_finds() {
        let big: Map<String, Value> = (0..40).map(|i| (format!("k{i}"), json!(i))).collect();
        let big = Value::Object(big);
        let small = json!({"prompt_tokens": 3, "total_tokens": 5, "": 0, "stream_options": {"include_usage": true}});
        let not_objects = [json!(null), json!([1, 2]), json!("total_tokens"), json!(7)];
        let mut cases: Vec<(&Value, &str)> = Vec::new();
        for name in [
            "prompt_tokens",
            "total_tokens",
            "",
            "missing",
            "stream_options",
            "Total_tokens",
        ] {
            cases.push((&small, name));
        }
        for name in ["k0", "k39", "k40", "missing"] {
            cases.push((&big, name));
        }
        for v in &not_objects {
            cases.push((v, "total_tokens"));
        }
        for (value, name) in cases {
            assert_eq!(get(value, name), value.get(name), "{name} in {value}");
        }
    }
}
