//! What "the same JSON value" means after a trip through Lua.
//!
//! Lua numbers are doubles: a number comes back as the double nearest to
//! it (`1.0` may come back as `1`, `-0` as `0`, `2^64` as `1.8446744073709552e19`).
//! Everything else comes back exactly. Object key order is not compared
//! (objects are maps; the encoder sorts keys).

use serde_json::Value;

/// Whether `got` is `sent` after a conversion that may round numbers to
/// the nearest double. Exact numbers are accepted too, so a converter that
/// keeps more than a double holds does not fail this check.
pub fn same_modulo_doubles(sent: &Value, got: &Value) -> bool {
    match (sent, got) {
        (Value::Number(a), Value::Number(b)) => {
            a == b || matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if x == y)
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_modulo_doubles(x, y))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, x)| b.get(k).is_some_and(|y| same_modulo_doubles(x, y)))
        }
        (a, b) => a == b,
    }
}

/// The first place where `got` differs from `sent` (for a crash message).
pub fn first_difference(sent: &Value, got: &Value, at: &str) -> Option<String> {
    match (sent, got) {
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{at}[{i}]"))),
        (Value::Object(a), Value::Object(b)) if a.len() == b.len() => a.iter().find_map(|(k, x)| match b.get(k) {
            Some(y) => first_difference(x, y, &format!("{at}.{k}")),
            None => Some(format!("{at}.{k}: missing in the result")),
        }),
        _ if same_modulo_doubles(sent, got) => None,
        _ => Some(format!("{at}: sent {sent}, got {got}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_may_round_to_doubles() {
        let cases = [
            (json!(1.0), json!(1), true),
            (json!(5), json!(5), true),
            (json!(u64::MAX), json!(1.8446744073709552e19), true),
            (json!(1), json!(2), false),
            (json!({"a": [1, {"b": null}]}), json!({"a": [1.0, {"b": null}]}), true),
            (json!({"a": 1}), json!({"a": 1, "b": 2}), false),
            (json!([]), json!({}), false),
        ];
        for (sent, got, same) in cases {
            assert_eq!(same_modulo_doubles(&sent, &got), same, "{sent} vs {got}");
            assert_eq!(first_difference(&sent, &got, "$").is_none(), same, "{sent} vs {got}");
        }
    }
}
