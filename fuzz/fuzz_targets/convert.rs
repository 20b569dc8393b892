//! JSON <-> Lua conversion (`llmproxy_core::convert`) through the engine, as
//! every host uses it.
//!
//! The input is JSON text (any bytes). `convert::parse_json` must accept it
//! or say why (an "invalid JSON"/size/nesting error, never a panic). A
//! value it accepts goes in as `request.body` of three request_transform
//! scripts that return it:
//!
//! - `lazy`: returns the body untouched: an object comes back exactly
//!   (types, big integers and all: the documented lossless path);
//! - `walked`: iterates the body first (materialising the lazy table), so
//!   every value is converted to Lua and back: the same value, numbers
//!   rounded at most to the nearest double;
//! - `decoded`: `json.decode` of the same text in the sandbox, encoded and
//!   decoded again: the same value again.
//!
//! A hook that fails must fail with a classified error: bad input, bad
//! output (past a limit) or a limit (timeout, memory); never `internal` or
//! a script error.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llmproxy_core::config::ScriptLimits;
use llmproxy_core::convert::{self, Limits};
use llmproxy_core::{Config, Engine, ErrorKind, HookError, HookName};
use llmproxy_fuzz::json::{first_difference, same_modulo_doubles};
use serde_json::{json, Value};

const LAZY: &str = "return {body = request.body}";
const WALKED: &str = r#"
local b = request.body
if type(b) == "table" then for _ in pairs(b) do end end
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

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_depth: 64,
        max_bytes: 1 << 20,
    };
    let value = match convert::parse_json(data, limits) {
        Ok(v) => v,
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.starts_with("invalid JSON:") || m.starts_with("JSON nesting is") || m.starts_with("JSON text is"),
                "parse_json error without a class: {m}"
            );
            return;
        }
    };
    let depth = convert::json_depth(&value);
    let e = engines();
    let input = json!({"request": {"id": "fuzz", "body": value}});

    match run(&e.lazy, &input) {
        Ok(got) if value.is_object() => {
            assert!(
                got == value,
                "lazy: an untouched body changed: {:?}",
                first_difference(&value, &got, "$")
            );
        }
        Ok(got) => assert!(
            same_modulo_doubles(&value, &got),
            "lazy: {:?}",
            first_difference(&value, &got, "$")
        ),
        Err(err) => check_error("lazy", depth, &err),
    }

    match run(&e.walked, &input) {
        Ok(got) => assert!(
            same_modulo_doubles(&value, &got),
            "walked: {:?}",
            first_difference(&value, &got, "$")
        ),
        Err(err) => check_error("walked", depth, &err),
    }

    // The sandbox's json.decode takes a Lua string; JSON input only carries
    // UTF-8, which any JSON text parse_json accepted is.
    if let Ok(text) = std::str::from_utf8(data) {
        let input = json!({"request": {"id": "fuzz", "text": text}});
        match run(&e.decoded, &input) {
            Ok(got) if got["ok"] == json!(true) => {
                let v = &got["v"];
                let again = &got["again"];
                assert!(
                    same_modulo_doubles(&value, v),
                    "json.decode: {:?}",
                    first_difference(&value, v, "$")
                );
                assert!(
                    same_modulo_doubles(v, again),
                    "json.decode(json.encode(v)): {:?}",
                    first_difference(v, again, "$")
                );
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
