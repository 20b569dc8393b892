//! The canonical request model through real sockets: paths are matched and
//! forwarded in their canonical form, the OpenAI fields the gateway decides
//! on have their OpenAI types, headers a `Connection` header names stay on
//! their hop, and a 1xx never reaches the client as a final answer
//! (issue 10, points 4, 5, 6, 12).

mod common;

use bytes::Bytes;
use common::*;
use hyper::Method;
use serde_json::{json, Value};

/// One mock behind a gateway with both transforms: request_transform adds
/// `X-Transformed` (echoed back by the mock as `x-echo-x-transformed`),
/// response_transform adds `X-Response-Transformed`.
async fn transforming_gateway() -> (llmproxy_server::mock::MockServer, TestGateway) {
    let m = mock("m", |o| o.chunks = 3).await;
    let yaml = format!(
        "backends:\n{}scripts:\n  request_transform:\n    script: |\n{}  response_transform:\n    script: |\n{}",
        backend("m", &m.url()),
        script("return {headers = {['X-Transformed'] = '1'}}"),
        script("return {headers = {['X-Response-Transformed'] = '1'}}"),
    );
    let gw = TestGateway::start(&yaml).await;
    (m, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_paths_are_the_endpoint_they_decode_to() {
    let (_m, gw) = transforming_gateway().await;
    for path in [
        "/v1/chat/completions",
        "/v1/chat/%63ompletions",
        "/v1/chat/%63%6F%6D%70letions",
        "/v1//chat/./completions",
        "/v1/x/../chat/completions",
        "//v1/chat/%2e/completions",
    ] {
        let id = format!("req-path-{}", path.len());
        let r = post(
            &format!("{}{path}", gw.base),
            &chat("gpt-4", json!({})),
            &[("x-request-id", id.as_str())],
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-mock-path"), Some("/v1/chat/completions"), "{path}");
        assert_eq!(
            r.header("x-echo-x-transformed"),
            Some("1"),
            "{path}: request_transform ran"
        );
        assert_eq!(
            r.header("x-response-transformed"),
            Some("1"),
            "{path}: response_transform ran"
        );
        let e = gw.usage.wait_for(&id).await;
        assert_eq!(e.path, "/v1/chat/completions", "{path}");
        assert!(
            e.raw["total_tokens"].as_u64().is_some_and(|t| t > 0),
            "{path}: billed {}",
            e.raw
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_never_go_upstream_and_bad_paths_are_refused() {
    let (_m, gw) = transforming_gateway().await;
    let upstream_calls = "llmproxy_upstream_latency_seconds_count{backend=\"m\"}";
    // (method, path as sent, status, error code or the path the backend saw)
    let cases: &[(Method, &str, u16, &str)] = &[
        (Method::POST, "/v1/../x", 404, "not_found"),
        (Method::POST, "/v1/%2e%2E/x", 404, "not_found"),
        (Method::POST, "/v1/../../x", 400, "invalid_path"),
        (Method::POST, "/v1/%2E%2E/%2E%2E/etc/passwd", 400, "invalid_path"),
        (Method::POST, "/v1/chat%2Fcompletions", 400, "invalid_path"),
        (Method::POST, "/v1/chat%5Ccompletions", 400, "invalid_path"),
        (Method::POST, "/v1/x%00", 400, "invalid_path"),
        (Method::POST, "/v1/x%zz", 400, "invalid_path"),
        (Method::GET, "/%76%31/../healthz/./", 404, "not_found"),
    ];
    for (method, path, status, code) in cases {
        let r = send(method.clone(), &format!("{}{path}", gw.base), &[], Bytes::from("{}")).await;
        assert_eq!(r.status, *status, "{path}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["error"]["code"], *code, "{path}");
        assert_eq!(r.header("x-mock-backend"), None, "{path} reached the backend");
    }
    assert_eq!(gw.metric(upstream_calls).await, 0.0, "nothing went upstream");
    // Passthrough paths go upstream canonical, the query string as sent.
    let r = send(
        Method::POST,
        &format!("{}/v1/a/./b/../%63?q=%2F..%2F&x=/../y", gw.base),
        &[],
        Bytes::from("{}"),
    )
    .await;
    assert_eq!(r.header("x-mock-path"), Some("/v1/a/c?q=%2F..%2F&x=/../y"));
    // Local endpoints match on the canonical form too.
    let r = get(&format!("{}/v1/%6Dodels", gw.base)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "list");
    let r = get(&format!("{}/x/../healthz", gw.base)).await;
    assert_eq!((r.status, r.json()["status"].clone()), (200, json!("ok")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_and_its_options_must_have_their_openai_types() {
    let (_m, gw) = transforming_gateway().await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let upstream_calls = "llmproxy_upstream_latency_seconds_count{backend=\"m\"}";
    let bad: &[(Value, &str)] = &[
        (json!({"stream": "true"}), "'stream' must be a boolean, got string"),
        (json!({"stream": 1}), "'stream' must be a boolean, got number"),
        (json!({"stream": "false"}), "'stream' must be a boolean, got string"),
        (
            json!({"stream": true, "stream_options": "x"}),
            "'stream_options' must be an object",
        ),
        (
            json!({"stream": true, "stream_options": {"include_usage": 1}}),
            "'stream_options.include_usage' must be a boolean",
        ),
        (json!({"model": 4}), "'model' must be a string"),
    ];
    for (extra, message) in bad {
        let r = post(&url, &chat("gpt-4", extra.clone()), &[]).await;
        assert_eq!(r.status, 400, "{extra}");
        let err = &r.json()["error"];
        assert_eq!(
            (err["type"].as_str(), err["code"].as_str()),
            (Some("bad_request"), Some("invalid_field"))
        );
        assert!(
            err["message"].as_str().is_some_and(|m| m.contains(message)),
            "{extra}: {err}"
        );
        assert_eq!(r.header("x-mock-backend"), None, "{extra} reached the backend");
    }
    assert_eq!(gw.metric(upstream_calls).await, 0.0, "nothing went upstream");
    // The OpenAI types still pass: a real stream, and null as "not set".
    let s = post_stream(&url, &chat("gpt-4", json!({"stream": true})), &[]).await;
    assert_eq!(s.status, 200);
    assert!(s
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    for extra in [
        json!({"stream": false}),
        json!({"stream": null, "stream_options": null}),
    ] {
        let r = post(&url, &chat("gpt-4", extra.clone()), &[]).await;
        assert_eq!(r.status, 200, "{extra}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_named_by_connection_stay_on_their_hop() {
    let (_m, gw) = transforming_gateway().await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let r = post(
        &url,
        &chat("gpt-4", json!({})),
        &[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "client-hop-only"),
            ("x-kept", "k"),
            // The backend answers `Connection: X-Echo-X-Hidden` and the
            // echo of `x-hidden` as `x-echo-x-hidden`.
            ("x-mock-connection", "X-Echo-X-Hidden"),
            ("x-hidden", "backend-hop-only"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo-x-kept"), Some("k"), "other headers reach the backend");
    assert_eq!(
        r.header("x-echo-x-secret"),
        None,
        "a header the client's Connection names went upstream"
    );
    assert_eq!(
        r.header("x-echo-x-hidden"),
        None,
        "a header the backend's Connection names reached the client"
    );
    assert_eq!(r.header("connection"), None);
    // Passthrough requests follow the same rule.
    let r = send(
        Method::GET,
        &format!("{}/v1/unknown", gw.base),
        &[("connection", "X-Secret"), ("x-secret", "s"), ("x-kept", "k")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.header("x-echo-x-kept"), Some("k"));
    assert_eq!(r.header("x-echo-x-secret"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_101_is_a_502_and_a_script_101_never_reaches_the_client() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&format!("backends:\n{}", backend("m", &m.url()))).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    for extra in [json!({}), json!({"stream": true})] {
        let r = post(&url, &chat("gpt-4", extra.clone()), &[("x-mock-status", "101")]).await;
        assert_eq!(r.status, 502, "{extra}: {}", String::from_utf8_lossy(&r.body));
        let err = &r.json()["error"];
        assert_eq!(
            (err["type"].as_str(), err["code"].as_str()),
            (Some("backend_error"), Some("backend_bad_status"))
        );
        assert_eq!(r.header("upgrade"), None);
    }
    let r = gw.chat(None, json!({})).await;
    assert_eq!(r.status, 200, "the gateway keeps serving");

    // A response_transform answering 101 is bad_output: the backend's
    // response goes out unchanged (the hook's default on_error).
    let yaml = format!(
        "backends:\n{}scripts:\n  response_transform:\n    script: |\n{}",
        backend("m", &m.url()),
        script("return {status_code = 101, headers = {Upgrade = 'websocket'}}"),
    );
    let gw = TestGateway::start(&yaml).await;
    let r = gw.chat(None, json!({})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["object"], "chat.completion");
    assert_eq!(r.header("upgrade"), None);

    // Hop-by-hop headers a script sets are dropped; its other changes apply.
    let yaml = format!(
        "backends:\n{}scripts:\n  response_transform:\n    script: |\n{}",
        backend("m", &m.url()),
        script("return {headers = {Upgrade = 'websocket', Connection = 'Upgrade', ['X-A'] = '1'}}"),
    );
    let gw = TestGateway::start(&yaml).await;
    let r = gw.chat(None, json!({})).await;
    assert_eq!((r.status, r.header("x-a")), (200, Some("1")));
    assert_eq!(r.header("upgrade"), None);
}
