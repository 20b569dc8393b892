//! A view's field reads once LuaJIT has compiled them: where the JIT
//! compiler is on, numbers, booleans, short strings, absent fields and
//! objects are read through the FFI inside compiled traces, everything
//! else through the C loader (`convert/lazy/fast_field.rs`). Thousands of calls on one VM,
//! with the shape of the body changing from call to call, must read what
//! the first, interpreted calls read.

use std::path::Path;

use llmproxy_core::{Config, Engine, HookName};
use serde_json::{json, Value};

const SCRIPT: &str = r#"
local b = request.body
local o = b.o
return { body = {
  n = b.n * 2,
  flag = b.flag,
  ox = o and o.x or -1,
  deep = o and o.inner and o.inner.y or -1,
  s = b.s,
  big = b.big,
  kinds = type(b.n) .. "," .. type(b.flag) .. "," .. type(o) .. "," .. type(b.missing) .. "," .. type(b.list),
} }
"#;

/// The body of call `i`: four shapes in turn, values that change each call.
fn body(i: u64) -> Value {
    match i % 4 {
        0 => {
            json!({"n": i, "flag": true, "o": {"x": i + 1, "inner": {"y": 7}}, "s": "a", "big": 12345678901234567890u64, "list": [1]})
        }
        // Longer than the strings the FFI path copies itself.
        1 => json!({"n": i, "flag": false, "o": {"x": i + 1}, "s": "b".repeat(2000), "big": 1.5}),
        2 => json!({"n": i, "s": "c", "big": 7}),
        _ => json!({"n": i as f64 + 0.25, "flag": true, "o": {"inner": {"y": i}}, "s": "é", "big": 1e300, "list": []}),
    }
}

/// What the script returns for call `i`, worked out here.
fn expected(i: u64) -> Value {
    let b = body(i);
    let o = b.get("o");
    let kind = |v: Option<&Value>| match v {
        None => "nil",
        Some(Value::Bool(_)) => "boolean",
        Some(Value::Number(_)) => "number",
        Some(Value::Object(_) | Value::Array(_)) => "table",
        Some(_) => "string",
    };
    let kinds = [
        kind(b.get("n")),
        kind(b.get("flag")),
        kind(o),
        "nil",
        kind(b.get("list")),
    ]
    .join(",");
    let mut out = json!({
        "n": b["n"].as_f64().expect("number") * 2.0,
        "ox": o.and_then(|o| o.get("x")).cloned().unwrap_or(json!(-1)),
        "deep": o.and_then(|o| o.pointer("/inner/y")).cloned().unwrap_or(json!(-1)),
        "s": b["s"],
        "big": b["big"],
        "kinds": kinds,
    });
    if let Some(flag) = b.get("flag") {
        out["flag"] = flag.clone();
    }
    out
}

#[test]
fn field_reads_agree_before_and_after_compilation() {
    let yaml = format!("scripts:\n  request_transform:\n    script: {}\n", json!(SCRIPT));
    let engine = Engine::new(Config::from_yaml(&yaml, Path::new(".")).expect("config")).expect("engine");
    for i in 0..4000u64 {
        let input = json!({"request": {"id": format!("r{i}"), "body": body(i)}});
        let got = engine
            .run_json(HookName::RequestTransform, &input)
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        let want = expected(i);
        // Numbers compare as numbers (`2 * 3` is 6, not 6.0), the rest as JSON.
        for (key, want) in want.as_object().expect("object") {
            let have = &got["body"][key];
            let same = match (have.as_f64(), want.as_f64()) {
                (Some(a), Some(b)) if key != "big" => a == b,
                _ => have == want,
            };
            assert!(
                same,
                "call {i}, field {key}: got {have}, want {want} (whole result {got})"
            );
        }
        assert_eq!(
            got["body"].get("flag").is_some(),
            want.get("flag").is_some(),
            "call {i}: flag"
        );
    }
}
