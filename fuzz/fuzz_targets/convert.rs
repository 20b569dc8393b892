//! JSON <-> Lua conversion (`llmproxy_core::convert`) through the engine, as
//! every host uses it.
//!
//! The input is JSON text (any bytes). `convert::parse_json` must accept it
//! or say why, with a class (`invalid JSON: ...`, size, nesting; never a
//! panic), and agree with serde_json: what serde_json refuses it refuses,
//! and what serde_json takes it takes as the same value, or refuses only
//! for a duplicate key, a number beyond a double, or nesting past 64.
//! A value it accepts goes in as `request.body` of three request_transform
//! scripts that return it:
//!
//! - `lazy`: returns the body untouched: an object comes back exactly
//!   (types, number texts and all: the documented lossless path);
//! - `walked`: iterates every table of the body first (materialising each
//!   lazy view: objects inside a body are views too, ADR 059), so every
//!   value is converted to Lua and back: numbers come back with the
//!   text `llmproxy_fuzz::json` derives from the README's rules (their
//!   double's text, or their own when a double does not hold them);
//! - `decoded`: `json.decode` of the same text in the sandbox, encoded and
//!   decoded again: the same value by the same rules.
//!
//! A body object whose OpenAI fields have the wrong type (`"stream": 1`)
//! must make `lazy` and `walked` fail with `bad_output` naming the field.
//! Any other hook that fails must fail with a classified error: bad input, bad
//! output (past a limit) or a limit (timeout, memory); never `internal` or
//! a script error.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llmproxy_core::config::ScriptLimits;
use llmproxy_core::convert::{self, Limits};
use llmproxy_core::http::fields;
use llmproxy_core::{Config, Engine, ErrorKind, HookError, HookName};
use llmproxy_fuzz::json::{first_difference, NumberRule};
use serde_json::{json, Value};

const LAZY: &str = "return {body = request.body}";
const WALKED: &str = r#"
local function walk(t)
  for _, v in pairs(t) do
    if type(v) == "table" then walk(v) end
  end
end
local b = request.body
if type(b) == "table" then walk(b) end
return {body = b}
"#;
const DECODED: &str = r#"
local ok, v = pcall(json.decode, request.text)
if not ok then return {body = {ok = false}} end
return {body = {ok = true, v = v, again = json.decode(json.encode(v))}}
"#;

/// Below this nesting every hook must succeed (the hook limit is 64).
const SURELY_WITHIN: usize = 48;

struct Engines {
    lazy: Engine,
    walked: Engine,
    decoded: Engine,
}

fn engine(name: &str, source: &str) -> Engine {
    // Generous time: a loaded CI machine must not turn into a finding.
    let limits = ScriptLimits {
        timeout_ms: 5_000,
        ..ScriptLimits::default()
    };
    match Engine::new(Config::single_hook(HookName::RequestTransform, name, source, limits)) {
        Ok(e) => e,
        Err(e) => panic!("fuzz harness: script {name} does not compile: {e}"),
    }
}

fn engines() -> &'static Engines {
    static ENGINES: OnceLock<Engines> = OnceLock::new();
    ENGINES.get_or_init(|| Engines {
        lazy: engine("lazy", LAZY),
        walked: engine("walked", WALKED),
        decoded: engine("decoded", DECODED),
    })
}

/// The `body` of a request_transform result, or the classified error.
fn run(engine: &Engine, input: &Value) -> Result<Value, HookError> {
    let out = engine.run_json(HookName::RequestTransform, input)?;
    Ok(out.get("body").cloned().unwrap_or(Value::Null))
}

fn check_error(which: &str, depth: usize, e: &HookError) {
    let classified = matches!(
        e.kind,
        ErrorKind::BadInput | ErrorKind::BadOutput | ErrorKind::Timeout | ErrorKind::Memory
    );
    assert!(classified, "{which}: unclassified failure ({:?}): {e}", e.kind);
    assert!(
        depth >= SURELY_WITHIN || matches!(e.kind, ErrorKind::Timeout | ErrorKind::Memory),
        "{which}: a value {depth} levels deep was refused: {e}"
    );
}

/// `parse_json`'s answer compared with serde_json's on the same text.
fn check_parse(data: &[u8], ours: &Result<Value, String>) {
    let theirs = serde_json::from_slice::<Value>(data);
    match (ours, theirs) {
        (Ok(v), Ok(w)) => assert!(v == &w, "parse_json and serde_json differ: {v} vs {w}"),
        (Ok(v), Err(e)) => panic!("parse_json took what serde_json refuses ({e}): {v}"),
        (Err(m), Ok(_)) => assert!(
            m.contains("duplicate key") || m.contains("number out of range") || m.starts_with("JSON nesting is"),
            "parse_json refused JSON serde_json takes: {m}"
        ),
        (Err(_), Err(_)) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_depth: 64,
        max_bytes: 1 << 20,
    };
    let parsed = convert::parse_json(data, limits).map_err(|e| e.to_string());
    check_parse(data, &parsed);
    let value = match parsed {
        Ok(v) => v,
        Err(m) => {
            assert!(
                m.starts_with("invalid JSON:") || m.starts_with("JSON nesting is") || m.starts_with("JSON text is"),
                "parse_json error without a class: {m}"
            );
            return;
        }
    };
    let depth = convert::json_depth(&value);
    let rule = NumberRule::of(&value);
    let e = engines();
    let input = json!({"request": {"id": "fuzz", "body": value}});

    // A body whose OpenAI fields have the wrong type (`"stream": 1`) is not
    // a body a request_transform may return (README): bad_output, named.
    if let Err(field) = fields::check(&value) {
        for (which, engine) in [("lazy", &e.lazy), ("walked", &e.walked)] {
            match run(engine, &input) {
                Ok(got) => panic!("{which}: a body with {field} was returned: {got}"),
                Err(err) if matches!(err.kind, ErrorKind::Timeout | ErrorKind::Memory) => {}
                Err(err) => assert!(
                    err.kind == ErrorKind::BadOutput && err.message.contains(&field.to_string()),
                    "{which}: a body with {field} failed otherwise: {err}"
                ),
            }
        }
        return;
    }

    match run(&e.lazy, &input) {
        Ok(got) if value.is_object() => {
            assert!(got == value, "lazy: an untouched body changed: {value} -> {got}");
        }
        Ok(got) => {
            let diff = first_difference(&value, &got, &rule, "$");
            assert!(diff.is_none(), "lazy: {diff:?}");
        }
        Err(err) => check_error("lazy", depth, &err),
    }

    match run(&e.walked, &input) {
        Ok(got) => {
            let diff = first_difference(&value, &got, &rule, "$");
            assert!(diff.is_none(), "walked: {diff:?}");
        }
        Err(err) => check_error("walked", depth, &err),
    }

    // The sandbox's json.decode takes a Lua string; JSON input only carries
    // UTF-8, which any JSON text parse_json accepted is.
    if let Ok(text) = std::str::from_utf8(data) {
        let input = json!({"request": {"id": "fuzz", "text": text}});
        match run(&e.decoded, &input) {
            Ok(got) if got["ok"] == json!(true) => {
                let diff = first_difference(&value, &got["v"], &rule, "$");
                assert!(diff.is_none(), "json.decode: {diff:?}");
                let diff = first_difference(&value, &got["again"], &rule, "$");
                assert!(diff.is_none(), "json.decode(json.encode(v)): {diff:?}");
            }
            // json.decode refused text parse_json took: only past its
            // limits (the sandbox's memory allowance).
            Ok(_) => assert!(
                depth >= SURELY_WITHIN || data.len() > 64 << 10,
                "json.decode refused valid JSON"
            ),
            Err(err) => check_error("decoded", depth + 2, &err),
        }
    }
});
