//! A request's life through `RequestHandle`: the seed's data-path scripts
//! over one parse of each body, streams, and each hook's failure policy.

use std::path::Path;
use std::sync::Arc;

use llmproxy_core::hooks::{BackendStatus, HeaderChange, RequestInfo, RouteDecision};
use llmproxy_core::http::api::Api;
use llmproxy_core::request_handle::{Relay, RequestHandle, Step};
use llmproxy_core::{Config, Engine, ErrorKind};
use serde_json::{json, Value};

/// An engine with `hooks`: (hook, `script_file` under examples/scripts or
/// inline `script`, on_error).
fn engine(hooks: &[(&str, &str, &str)]) -> Engine {
    let mut yaml = String::from("scripts:\n");
    for (hook, script, on_error) in hooks {
        yaml.push_str(&format!("  {hook}:\n    on_error: {on_error}\n"));
        if script.ends_with(".lua") {
            yaml.push_str(&format!("    script_file: ../examples/scripts/{script}\n"));
        } else {
            yaml.push_str(&format!(
                "    script: {}\n",
                serde_json::to_string(script).expect("text")
            ));
        }
    }
    let base = Path::new(env!("CARGO_MANIFEST_DIR"));
    Engine::new(Config::from_yaml(&yaml, base).expect("config")).expect("engine")
}

fn seed_engine() -> Engine {
    engine(&[
        ("routing", "routing.lua", "standard"),
        ("request_transform", "request_transform.lua", "standard"),
        ("response_transform", "response_transform.lua", "standard"),
        ("usage", "usage.lua", "standard"),
    ])
}

fn backends() -> Vec<BackendStatus> {
    ["standard", "high-performance", "ultra"]
        .iter()
        .enumerate()
        .map(|(i, name)| BackendStatus {
            name: (*name).to_owned(),
            url: format!("http://127.0.0.1:900{}", i + 1),
            healthy: true,
            weight: 1,
            latency_ms: 0.0,
            active_connections: 0,
        })
        .collect()
}

fn handle(body: Value) -> RequestHandle {
    let request = RequestInfo {
        id: "r-1".into(),
        body: Arc::new(body),
        user_id: Some("user_001".into()),
        path: Some("/v1/chat/completions".into()),
        ..RequestInfo::default()
    };
    RequestHandle::new(request, Some(Api::ChatCompletions))
}

fn ran<T: std::fmt::Debug>(step: Step<T>) -> T {
    match step {
        Step::Ran(v) => v,
        other => panic!("expected the hook to run, got {other:?}"),
    }
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("JSON")
}

const COMPLETION: &str = r#"{"id":"c-1","object":"chat.completion","model":"llama-3-70b-instruct","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":15,"completion_tokens":42,"total_tokens":57}}"#;

#[test]
fn the_seed_scripts_decide_every_step_of_one_request() {
    let engine = seed_engine();
    let mut h = handle(json!({"model": "gpt-4", "viplevel": 3, "messages": [{"role": "user", "content": "hi"}]}));

    let route = ran(h.route(&engine, &backends()));
    assert_eq!(route, RouteDecision::Backend("ultra".into()));

    let up = ran(h.upstream(&engine, "http://127.0.0.1:9003"));
    let sent = json_of(up.body.as_deref().expect("a new body"));
    assert_eq!(
        sent,
        json!({"model": "llama-3-70b-instruct", "viplevel": 3, "messages": [{"role": "user", "content": "hi"}]})
    );
    assert_eq!(
        up.headers,
        vec![
            ("X-Original-Model".to_owned(), HeaderChange::Set("gpt-4".into())),
            ("X-User-ID".to_owned(), HeaderChange::Set("user_001".into())),
        ]
    );
    assert!(!up.stream);
    assert_eq!(h.request().backend_url.as_deref(), Some("http://127.0.0.1:9003"));

    let headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    let answer = ran(h.respond(&engine, 200, headers, COMPLETION.as_bytes(), 12.0));
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.headers,
        Vec::new(),
        "the seed echoes the backend's headers: nothing to apply"
    );
    let client = json_of(answer.body.as_deref().expect("a new body"));
    assert_eq!(client["model"], "gpt-4");
    assert_eq!(client["choices"][0]["message"]["content"], "hi");

    let billing = ran(h.usage(&engine));
    assert_eq!(
        billing.usage,
        json!({"prompt_tokens": 15, "completion_tokens": 42, "total_tokens": 57})
    );
    let record = billing.record().expect("the script's record");
    assert_eq!(
        (record["billable_tokens"].clone(), record["discount"].clone()),
        (json!(28), json!(0.5))
    );
    assert_eq!((billing.charge.billable_tokens, billing.charge.limit_tokens), (28, 57));
}

#[test]
fn a_response_transform_changes_only_the_headers_it_changes() {
    let backend = || {
        vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("X-A".to_owned(), "1".to_owned()),
        ]
    };
    let set = |name: &str, v: &str| (name.to_owned(), HeaderChange::Set(v.into()));
    let cases: &[(&str, Vec<(String, HeaderChange)>)] = &[
        ("return {headers = response.headers}", vec![]),
        ("return {headers = {['X-A'] = '2'}}", vec![set("X-A", "2")]),
        (
            "return {headers = {['x-a'] = '1', ['X-New'] = '1'}}",
            vec![set("X-New", "1")],
        ),
        ("return {headers = {['X-B'] = false}}", vec![]),
        (
            "return {headers = {['X-A'] = false}}",
            vec![("X-A".to_owned(), HeaderChange::Remove)],
        ),
    ];
    for (script, want) in cases {
        let engine = engine(&[("response_transform", script, "deny")]);
        let mut h = handle(json!({"model": "m"}));
        ran(h.upstream(&engine, "http://127.0.0.1:9001"));
        let answer = ran(h.respond(&engine, 200, backend(), COMPLETION.as_bytes(), 1.0));
        assert_eq!(&answer.headers, want, "{script}");
    }
}

#[test]
fn without_scripts_the_client_and_backend_bytes_go_through() {
    let engine = engine(&[]);
    let mut h = handle(json!({"model": "gpt-4"}));
    assert_eq!(ran(h.route(&engine, &backends())), RouteDecision::Default);
    let up = ran(h.upstream(&engine, "http://b"));
    assert_eq!((up.body, up.headers, up.stream), (None, Vec::new(), false));
    let answer = ran(h.respond(&engine, 201, Vec::new(), COMPLETION.as_bytes(), 1.0));
    assert_eq!((answer.status, answer.body, answer.headers), (201, None, Vec::new()));
    // The usage is read from the answer without a script.
    let billing = ran(h.usage(&engine));
    assert_eq!((billing.record(), billing.charge.billable_tokens), (None, 57));
}

#[test]
fn a_stream_asks_for_usage_and_hides_it_from_the_client() {
    let engine = engine(&[
        ("response_transform", "response_transform.lua", "standard"),
        ("usage", "usage.lua", "standard"),
    ]);
    let mut h = handle(json!({"model": "gpt-4", "stream": true, "viplevel": 1}));
    let up = ran(h.upstream(&engine, "http://b"));
    assert!(up.stream);
    assert_eq!(
        json_of(&up.body.expect("forced usage"))["stream_options"],
        json!({"include_usage": true})
    );

    h.stream(200, vec![("Content-Type".into(), "text/event-stream".into())]);
    // (event data, what the client gets)
    let events: [(&str, Relay); 3] = [
        (
            r#"{"model":"qwen-72b-chat","choices":[{"delta":{"content":"a"}}],"usage":null}"#,
            Relay::Data(br#"{"choices":[{"delta":{"content":"a"}}],"model":"gpt-3.5"}"#.to_vec()),
        ),
        (
            r#"{"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":9,"total_tokens":10}}"#,
            Relay::Drop,
        ),
        ("[DONE]", Relay::Unchanged),
    ];
    for (data, want) in events {
        if data.starts_with('{') && want != Relay::Drop {
            // The seed transform returns the response's status and its
            // headers as they were: no header changes.
            let ev = ran(h.event(&engine, data.as_bytes(), 5.0));
            assert_eq!((ev.status, ev.headers), (Some(200), Vec::new()));
        }
        let got = ran(h.event(&engine, data.as_bytes(), 5.0)).relay;
        match (&got, &want) {
            (Relay::Data(a), Relay::Data(b)) => assert_eq!(json_of(a), json_of(b), "{data}"),
            _ => assert_eq!(got, want, "{data}"),
        }
    }
    let billing = ran(h.usage(&engine));
    assert_eq!(billing.charge.billable_tokens, 8, "viplevel 1: 10 tokens at 0.8");
}

#[test]
fn a_stream_whose_usage_never_comes_is_charged_an_estimate() {
    let engine = engine(&[]);
    // "你好 there": 12 bytes of prompt text -> 3 tokens.
    let body = json!({"model": "gpt-4", "stream": true, "messages": [{"role": "user", "content": "你好 there"}]});
    // (events the handle gets, events the host says it relayed, completion tokens)
    let cases: [(usize, Option<u64>, u64); 3] = [(2, None, 2), (1, Some(5), 5), (3, Some(1), 3)];
    for (given, told, completion) in cases {
        let mut h = handle(body.clone());
        ran(h.upstream(&engine, "http://b"));
        h.stream(200, Vec::new());
        for _ in 0..given {
            ran(h.event(&engine, br#"{"choices":[{"delta":{"content":"a"}}]}"#, 1.0));
        }
        ran(h.event(&engine, b"[DONE]", 1.0));
        if let Some(n) = told {
            h.relayed_events(n);
        }
        let billing = ran(h.usage(&engine));
        assert!(billing.estimated, "{given} {told:?}");
        assert_eq!(
            billing.usage,
            json!({"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": 3 + completion, "estimated": true}),
            "{given} {told:?}"
        );
    }
    // A stream whose usage came is charged what the backend said.
    let mut h = handle(body);
    ran(h.upstream(&engine, "http://b"));
    h.stream(200, Vec::new());
    ran(h.event(
        &engine,
        br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
        1.0,
    ));
    let billing = ran(h.usage(&engine));
    assert!(!billing.estimated);
    assert_eq!(billing.charge.total_tokens, 3);
    // A whole answer without usage is zeros, not an estimate.
    let mut h = handle(json!({"model": "gpt-4"}));
    ran(h.respond(&engine, 200, Vec::new(), br#"{"choices":[]}"#, 1.0));
    let billing = ran(h.usage(&engine));
    assert!(!billing.estimated);
    assert_eq!(billing.charge.total_tokens, 0);
}

#[test]
fn a_failing_hook_falls_back_or_denies_by_its_policy() {
    let failing = "error('boom')";
    let body = json!({"model": "gpt-4"});
    for (hook, on_error, fell_back) in [
        ("routing", "standard", true),
        ("routing", "deny", false),
        ("request_transform", "standard", true),
        ("request_transform", "deny", false),
        ("response_transform", "standard", true),
        ("response_transform", "deny", false),
        // The usage hook runs after the answer: it never denies.
        ("usage", "deny", true),
    ] {
        let engine = engine(&[(hook, failing, on_error)]);
        let mut h = handle(body.clone());
        let failure = match hook {
            "routing" => h
                .route(&engine, &backends())
                .map(|d| assert_eq!(d, RouteDecision::Default)),
            "request_transform" => h.upstream(&engine, "http://b").map(|u| assert_eq!(u.body, None)),
            "response_transform" => h
                .respond(&engine, 200, Vec::new(), COMPLETION.as_bytes(), 1.0)
                .map(|a| assert_eq!(a.body, None)),
            _ => {
                h.respond(&engine, 200, Vec::new(), COMPLETION.as_bytes(), 1.0);
                h.usage(&engine)
                    .map(|b| assert_eq!((b.record(), b.charge.billable_tokens), (None, 57)))
            }
        };
        let what = format!("{hook} with on_error: {on_error}");
        match failure {
            Step::FellBack((), e) if fell_back => assert_eq!(e.kind, ErrorKind::ScriptError, "{what}"),
            Step::Denied(e) if !fell_back => assert_eq!(e.kind, ErrorKind::ScriptError, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn the_usage_hook_sees_the_backends_status_when_the_answer_is_not_json() {
    let engine = engine(&[(
        "usage",
        "return {status = response.status_code, body = type(response.body)}",
        "standard",
    )]);
    let mut h = handle(json!({"model": "gpt-4"}));
    ran(h.upstream(&engine, "http://b"));
    ran(h.respond(&engine, 502, Vec::new(), b"upstream said no", 3.0));
    let billing = ran(h.usage(&engine));
    assert_eq!(billing.record(), Some(json!({"status": 502, "body": "userdata"})));
}

/// Without response_transform the answer reaches the usage script as
/// text: parsed only when the script reads `response.body`; its usage is
/// read either way.
#[test]
fn a_usage_script_parses_the_answer_only_when_it_reads_it() {
    let cases: [(&str, &[u8], Value, bool); 3] = [
        (
            "return {tokens = usage.total_tokens}",
            COMPLETION.as_bytes(),
            json!({"tokens": 57}),
            false,
        ),
        (
            "return {id = response.body.id, choices = #response.body.choices, tokens = usage.total_tokens}",
            COMPLETION.as_bytes(),
            json!({"id": "c-1", "choices": 1, "tokens": 57}),
            true,
        ),
        (
            "return {body = type(response.body)}",
            b"upstream said no",
            json!({"body": "userdata"}),
            false,
        ),
    ];
    for (script, answer, record, parsed) in cases {
        let engine = engine(&[("usage", script, "standard")]);
        let mut h = handle(json!({"model": "gpt-4"}));
        ran(h.upstream(&engine, "http://b"));
        let relayed = ran(h.respond(&engine, 200, Vec::new(), answer, 3.0));
        assert_eq!(relayed.body, None, "{script}");
        assert!(!h.answer_parsed(), "{script}: nothing parsed before the script ran");
        let billing = ran(h.usage(&engine));
        assert_eq!(billing.record(), Some(record), "{script}");
        assert_eq!(h.answer_parsed(), parsed, "{script}");
        if answer == COMPLETION.as_bytes() {
            assert_eq!(
                billing.usage["total_tokens"], 57,
                "{script}: usage read without the parse"
            );
        }
    }
}

#[test]
fn a_request_relayed_as_is_runs_no_transform_and_reads_no_usage() {
    let engine = seed_engine();
    let request = RequestInfo {
        id: "r-2".into(),
        body: Arc::new(json!({"model": "gpt-4", "stream": true})),
        path: Some("/v1/files".into()),
        ..RequestInfo::default()
    };
    let mut h = RequestHandle::new(request, None);
    assert_eq!(h.api(), None);
    ran(h.route(&engine, &backends()));
    assert!(h.called(), "routing decides every proxied request");
    let up = ran(h.upstream(&engine, "http://b"));
    assert_eq!((up.body, up.headers, up.stream), (None, Vec::new(), true));
    assert!(!h.called(), "no request_transform: the body is relayed as is");
    let answer = ran(h.respond(&engine, 200, Vec::new(), COMPLETION.as_bytes(), 1.0));
    assert_eq!(answer.body, None);
    assert!(!h.called() && !h.answer_parsed());
    let billing = ran(h.usage(&engine));
    assert_eq!(
        billing.charge.billable_tokens, 0,
        "no usage read from an answer relayed as is"
    );
}

#[test]
fn the_host_tells_the_usage_hook_the_status_of_an_answer_the_handle_never_saw() {
    let engine = engine(&[("usage", "return {status = response.status_code}", "standard")]);
    let mut h = handle(json!({"model": "gpt-4"}));
    h.answered(429);
    assert_eq!(ran(h.usage(&engine)).record(), Some(json!({"status": 429})));
    let mut h = handle(json!({"model": "gpt-4"}));
    ran(h.respond(&engine, 200, Vec::new(), b"{}", 1.0));
    h.answered(503);
    assert_eq!(
        ran(h.usage(&engine)).record(),
        Some(json!({"status": 200})),
        "the backend's status, which the handle saw, stays"
    );
}
