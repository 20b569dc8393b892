//! A usage script's table leaves the sandbox as the JSON text hosts log and
//! the ledger stores (`ResultForm::SortedText`), its billing fields read
//! where the writer noted them. The reference is the value path
//! (`Engine::run_parts`, which encodes the table as a `serde_json::Value`):
//! for every result below both give the same record text, the same charge
//! and the same error.

use std::path::Path;
use std::sync::Arc;

use llmproxy_core::engine::HookGlobals;
use llmproxy_core::hooks::{RequestInfo, ResponseInfo, UsageInput, UsageMetadata, UsageRecord};
use llmproxy_core::policy::usage::{charge, record_json, RecordFields};
use llmproxy_core::{Config, Engine, HookName};
use serde_json::{json, Value};

/// Scripts returning every shape a record takes: scalars of each kind,
/// nested and sorted objects, views no script read (their keys sorted
/// too), views read in part, numbers that came from the input as text,
/// strings that need escapes, and each kind of bad billing field.
const SCRIPTS: &[&str] = &[
    "return nil",
    include_str!("../../examples/scripts/usage.lua"),
    r#"return { z = 1, a = { y = 2, x = { "b", "a" } }, m = "é \"q\"\n\t", t = true, f = false }"#,
    "return { body = request.body }",
    "return { msgs = request.body.messages, role = request.body.messages[1].role, model = request.body.model }",
    "return { total_tokens = usage.total_tokens, prompt_tokens = usage.prompt_tokens, cost = 0.1 + 0.2 }",
    "return { billable_tokens = usage.total_tokens * 3, big = usage.big, meta = metadata }",
    "return { billable_tokens = json.null, cost = json.null, note = json.null }",
    "return { h = request.headers, r = response, id = request.id }",
    "local h = request.headers; return { h = h, ua = h['user-agent'] }",
    "return { completion_tokens = 0, total_tokens = -0.0, cost = 1e300 }",
    "return { billable_tokens = 2^53 + 1, empty = {} }",
    "local t = { total_tokens = 9 } for i = 1, 100 do t['k' .. i] = { i, tostring(i) } end return t",
    "return { inner = (function() local t = {} for i = 1, 70 do t['f' .. i] = i end return t end)(), cost = 1 }",
    "return setmetatable({ total_tokens = 3, cost = 0.25 }, { __index = function() return 1 end })",
    "return { m = setmetatable({ b = 1, a = 2 }, { __tostring = function() return 'x' end }) }",
    "return {}",
    "return { 1, 2, 3 }",
    "return 'text'",
    "return { billable_tokens = -1 }",
    "return { cost = 'free' }",
    "return { prompt_tokens = {} }",
    "return { total_tokens = true }",
    "return { completion_tokens = { 1 } }",
    "return { billable_tokens = 1 / 0 }",
    "return { cost = 2, billable_tokens = -5, total_tokens = 'x' }",
];

fn engine(script: &str) -> Engine {
    let yaml = format!(
        "scripts:\n  usage:\n    script: {}\n",
        serde_json::to_string(script).expect("text")
    );
    Engine::new(Config::from_yaml(&yaml, Path::new(".")).expect("config")).expect("engine")
}

fn request() -> RequestInfo {
    RequestInfo {
        id: "req-1".into(),
        body: Arc::new(json!({
            "model": "gpt-4",
            "viplevel": 3,
            "messages": [{"role": "user", "content": "hi", "name": "n"}, {"role": "system", "content": "be brief"}],
            "temperature": 0.7
        })),
        headers: vec![
            ("X-Trace".into(), "t1".into()),
            ("Content-Type".into(), "application/json".into()),
            ("User-Agent".into(), "curl/8".into()),
        ],
        ..RequestInfo::default()
    }
}

#[test]
fn the_written_record_is_the_value_paths_record() {
    let raw: Value = serde_json::from_str(
        r#"{"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28, "big": 123456789012345678901234567890}"#,
    )
    .expect("usage");
    let metadata = UsageMetadata {
        backend_url: "http://127.0.0.1:9000".into(),
        latency_ms: 12.5,
        is_stream: false,
    };
    let request = request();
    let response = ResponseInfo {
        status_code: 200,
        body: serde_json::from_str::<Value>(r#"{"id":"c1","usage":{"total_tokens":28},"choices":[]}"#)
            .expect("answer")
            .into(),
        headers: vec![
            ("Server".into(), "mock".into()),
            ("Content-Type".into(), "application/json".into()),
        ],
        is_stream: false,
    };
    for script in SCRIPTS {
        let e = engine(script);
        let text = e.usage(&UsageInput {
            request: &request,
            usage: &raw,
            response: &response,
            metadata: &metadata,
        });
        let globals = HookGlobals::new([
            ("usage".to_owned(), raw.clone()),
            (
                "metadata".to_owned(),
                serde_json::to_value(&metadata).expect("metadata"),
            ),
        ]);
        let value = e.run_parts(HookName::Usage, Some(&request), Some(&response), &globals);
        match (text, value) {
            (Ok(UsageRecord::Raw), Ok(Value::Null)) => {}
            (Ok(UsageRecord::Custom(c)), Ok(v)) => {
                assert_eq!(c.json(), record_json(&v), "{script}");
                assert_eq!(c.to_value(), v, "{script}");
                assert_eq!(
                    charge(&raw, Some(&c)),
                    charge(&raw, Some(&v as &dyn RecordFields)),
                    "{script}"
                );
            }
            (Err(a), Err(b)) => assert_eq!((a.kind, a.message), (b.kind, b.message), "{script}"),
            (a, b) => panic!("{script}: the paths differ: {a:?} against {b:?}"),
        }
    }
}
