//! Every hook changes what the client sees as the seed design says, for
//! plain and streamed requests; scripts are the seed's own examples (the
//! conformance cases), run verbatim.

mod common;

use common::*;
use serde_json::{json, Value};

fn seed_config(urls: &[String], hooks: &[(&str, &str)]) -> String {
    let mut y = String::from("backends:\n");
    for (name, url) in ["standard", "high-performance", "ultra"].iter().zip(urls) {
        y.push_str(&backend(name, url));
    }
    y.push_str("scripts:\n");
    for (hook, file) in hooks {
        y.push_str(&format!(
            "  {hook}:\n    script: |\n{}",
            script(&conformance_script(file))
        ));
    }
    y
}

async fn three_mocks() -> (Vec<llmproxy_server::mock::MockServer>, Vec<String>) {
    let mut mocks = Vec::new();
    for name in ["standard", "high-performance", "ultra"] {
        mocks.push(mock(name, |o| o.chunks = 4).await);
    }
    let urls = mocks.iter().map(|m| m.url()).collect();
    (mocks, urls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_sends_viplevels_to_their_backends() {
    let (_mocks, urls) = three_mocks().await;
    let gw = TestGateway::start(&seed_config(&urls, &[("routing", "001-seed-routing-viplevel-3.json")])).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    for (vip, want) in [
        (Some(3), "ultra"),
        (Some(5), "ultra"),
        (Some(1), "high-performance"),
        (Some(0), "standard"),
        (None, "standard"),
    ] {
        let extra = vip.map_or(json!({}), |v| json!({"viplevel": v}));
        let r = post(&url, &chat("gpt-4", extra.clone()), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.backend(), Some(want), "viplevel {vip:?}");
        assert_eq!(r.header("x-mock-backend"), Some(want));
        assert!(r.header("x-request-id").is_some_and(|id| id.starts_with("req_")));
        // Streams are routed the same way.
        let s = post_stream(
            &url,
            &chat("gpt-4", json!({"stream": true}))
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    if let Value::Object(e) = &extra {
                        o.extend(e.clone());
                    }
                    Value::Object(o)
                })
                .unwrap(),
            &[],
        )
        .await;
        assert_eq!(s.header("x-llmproxy-backend"), Some(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_transform_maps_the_model_and_adds_headers() {
    let (_mocks, urls) = three_mocks().await;
    let gw = TestGateway::start(&seed_config(
        &urls,
        &[("request_transform", "020-seed-request-transform-model-map.json")],
    ))
    .await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let r = post(&url, &chat("gpt-4", json!({"temperature": 0.5})), &[]).await;
    assert_eq!(r.status, 200);
    // The mock answers with the model it received.
    assert_eq!(r.json()["model"], "llama-3-70b-instruct");
    assert_eq!(r.header("x-echo-x-original-model"), Some("gpt-4"));
    // Unmapped models pass unchanged.
    let r = post(&url, &chat("claude", json!({})), &[]).await;
    assert_eq!(r.json()["model"], "claude");
    // Streams too.
    let s = post_stream(&url, &chat("gpt-3.5", json!({"stream": true})), &[]).await;
    assert_eq!(s.status, 200);
    let events = s.events();
    assert!(events.len() > 1);
    assert!(events.iter().all(|e| e["model"] == "qwen-72b-chat"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_transform_maps_the_model_back_plain_and_streamed() {
    let (_mocks, urls) = three_mocks().await;
    let gw = TestGateway::start(&seed_config(
        &urls,
        &[
            ("request_transform", "020-seed-request-transform-model-map.json"),
            ("response_transform", "030-seed-response-transform-model-map.json"),
        ],
    ))
    .await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let r = post(&url, &chat("gpt-4", json!({})), &[]).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["model"], "gpt-4", "round trip through both transforms");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        r.header("content-length").map(|v| v.parse::<usize>().unwrap()),
        Some(r.body.len())
    );

    let s = post_stream(&url, &chat("gpt-3.5", json!({"stream": true})), &[]).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    let data = s.data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let events = s.events();
    assert_eq!(events.len(), 5, "4 content chunks + the final one: {data:?}");
    for e in &events {
        assert_eq!(e["model"], "gpt-3.5");
        assert_eq!(e["object"], "chat.completion.chunk");
        assert!(
            e.get("usage").is_none(),
            "the gateway's own usage request is invisible: {e}"
        );
    }
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello from the mock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_transform_can_change_status_and_headers() {
    let m = mock("m", |_| {}).await;
    let yaml = format!(
        "backends:\n{}scripts:\n  response_transform:\n    script: |\n{}",
        backend("m", &m.url()),
        script("return {status_code = 201, headers = {['X-Transformed'] = 'yes', ['X-Mock-Backend'] = false}, body = {ok = true, latency_known = latency_ms >= 0, backend = backend_url}}")
    );
    let gw = TestGateway::start(&yaml).await;
    let r = post(&format!("{}/v1/chat/completions", gw.base), &chat("x", json!({})), &[]).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("x-transformed"), Some("yes"));
    assert_eq!(r.header("x-mock-backend"), None, "removed by the script");
    assert_eq!(r.json(), json!({"ok": true, "latency_known": true, "backend": m.url()}));
    assert_eq!(r.header("content-length"), Some(r.body.len().to_string().as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_a_hook_does_not_use_are_ignored_and_counted() {
    let m = mock("m", |_| {}).await;
    // A ported script: auth has no retry_after, response_transform no `note`.
    // No keys: the script's allow admits only with may_override (ADR 040).
    let yaml = format!(
        "backends:\n{}scripts:\n  auth:\n    may_override: [unknown]\n    script: |\n{}  response_transform:\n    script: |\n{}",
        backend("m", &m.url()),
        script("if request.body.model == 'blocked' then return {allow = false, reason = 'no', retry_after = 5} end return {allow = true, note = 'x'}"),
        script("return {status_code = 201, note = 'ignored'}")
    );
    let gw = TestGateway::start(&yaml).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let r = post(&url, &chat("blocked", json!({})), &[]).await;
    assert_eq!(r.status, 403, "the denial stands: {}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["message"], "no");
    let r = post(&url, &chat("x", json!({})), &[]).await;
    assert_eq!(r.status, 201, "the rest of the result applies");
    assert_eq!(
        gw.metric("llmproxy_hook_ignored_fields_total{hook=\"auth\"}").await,
        2.0
    );
    assert_eq!(
        gw.metric("llmproxy_hook_ignored_fields_total{hook=\"response_transform\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_transform_sets_and_removes_headers_and_recomputes_length() {
    let m = mock("m", |_| {}).await;
    let yaml = format!(
        "backends:\n{}scripts:\n  request_transform:\n    script: |\n{}",
        backend("m", &m.url()),
        script(
            "local b = {}\nfor k, v in pairs(request.body) do b[k] = v end\n\
             b.padding = string.rep('x', 1000)\n\
             return {body = b, headers = {['X-Seen-Id'] = request.id, ['X-Backend-Url'] = request.backend_url, ['X-Remove-Me'] = false, ['X-Path'] = request.path}}"
        )
    );
    let gw = TestGateway::start(&yaml).await;
    let r = post(
        &format!("{}/v1/chat/completions", gw.base),
        &chat("m1", json!({})),
        &[("x-remove-me", "1"), ("x-request-id", "client-id-42")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-request-id"), Some("client-id-42"));
    assert_eq!(
        r.header("x-echo-x-seen-id"),
        Some("client-id-42"),
        "request.id is the client's X-Request-ID"
    );
    assert_eq!(r.header("x-echo-x-request-id"), Some("client-id-42"));
    assert_eq!(r.header("x-echo-x-backend-url"), Some(m.url().as_str()));
    assert_eq!(r.header("x-echo-x-path"), Some("/v1/chat/completions"));
    assert_eq!(r.header("x-echo-x-remove-me"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_hook_records_the_seed_discount_plain_and_streamed() {
    let (_mocks, urls) = three_mocks().await;
    let gw = TestGateway::start(&seed_config(&urls, &[("usage", "050-seed-usage-viplevel-3.json")])).await;
    let url = format!("{}/v1/chat/completions", gw.base);

    let r = post(&url, &chat("gpt-4", json!({"viplevel": 3})), &[]).await;
    assert_eq!(r.status, 200);
    let raw = r.json()["usage"].clone();
    let id = r.header("x-request-id").unwrap().to_owned();
    let e = gw.usage.wait_for(&id).await;
    let total = raw["total_tokens"].as_f64().unwrap();
    assert_eq!(e.raw, raw);
    assert!(!e.is_stream);
    assert_eq!(e.record()["discount"], 0.5);
    assert_eq!(e.record()["viplevel"], 3);
    assert_eq!(e.record()["billable_tokens"].as_f64(), Some((total * 0.5).floor()));

    // Stream without include_usage: the gateway asks for it, records it,
    // and the client never sees the usage chunk.
    let s = post_stream(&url, &chat("gpt-4", json!({"viplevel": 1, "stream": true})), &[]).await;
    let id = s.header("x-request-id").unwrap().to_owned();
    let events = s.events();
    assert!(
        events
            .iter()
            .all(|e| e.get("usage").is_none() && !e["choices"].as_array().unwrap().is_empty()),
        "{events:?}"
    );
    let e = gw.usage.wait_for(&id).await;
    assert!(e.is_stream);
    assert_eq!(e.record()["discount"], 0.8);
    assert_eq!(e.raw["completion_tokens"], 4);
    assert_eq!(
        e.record()["billable_tokens"].as_f64(),
        Some((e.raw["total_tokens"].as_f64().unwrap() * 0.8).floor())
    );

    // Stream with include_usage: the client gets its usage chunk.
    let s = post_stream(
        &url,
        &chat(
            "gpt-4",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
        &[],
    )
    .await;
    let events = s.events();
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 4);
    let id = s.header("x-request-id").unwrap().to_owned();
    assert_eq!(gw.usage.wait_for(&id).await.record()["discount"], 1.0);

    // The usage metrics count billable tokens.
    assert!(
        gw.metric("llmproxy_usage_total{backend=\"standard\",kind=\"billable_tokens\"}")
            .await
            > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_embeddings_go_through_the_hooks() {
    let (_mocks, urls) = three_mocks().await;
    let gw = TestGateway::start(&seed_config(
        &urls,
        &[
            ("routing", "001-seed-routing-viplevel-3.json"),
            ("request_transform", "020-seed-request-transform-model-map.json"),
            ("usage", "050-seed-usage-viplevel-3.json"),
        ],
    ))
    .await;
    let r = post(
        &format!("{}/v1/embeddings", gw.base),
        &json!({"model": "gpt-4", "input": ["a b", "c"], "viplevel": 3}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend(), Some("ultra"));
    let body = r.json();
    assert_eq!(body["model"], "llama-3-70b-instruct");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_eq!(gw.usage.wait_for(&id).await.record()["billable_tokens"], 1);

    let r = post(
        &format!("{}/v1/completions", gw.base),
        &json!({"model": "gpt-3.5", "prompt": "hi", "viplevel": 1}),
        &[],
    )
    .await;
    assert_eq!(r.backend(), Some("high-performance"));
    assert_eq!(r.json()["object"], "text_completion");
    let s = post_stream(
        &format!("{}/v1/completions", gw.base),
        &json!({"model": "gpt-3.5", "prompt": "hi", "stream": true}),
        &[],
    )
    .await;
    assert!(s.events().iter().all(|e| e["model"] == "qwen-72b-chat"));
}

/// A backend may send several events in one write: the head still comes
/// from the first data event's transform, and every event is transformed
/// once, in order, whether it arrived alone or with others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_arrive_together_are_transformed_in_order_with_the_head_from_the_first() {
    let m = mock("m", |o| o.chunks = 4).await;
    let yaml = format!(
        "backends:\n{}scripts:\n  response_transform:\n    script: |\n{}",
        backend("m", &m.url()),
        script(
            "local b = {}\nfor k, v in pairs(response.body) do b[k] = v end\n\
             b.transformed = true\n\
             local delta = response.body.choices[1] and response.body.choices[1].delta\n\
             return {body = b, headers = {['X-Head-From'] = delta and delta.role or 'a later event'}}"
        )
    );
    let gw = TestGateway::start(&yaml).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    for delivery in ["burst", "one event per write"] {
        let s = post_stream(&url, &chat("x", json!({"stream": true})), &[("x-mock-sse", delivery)]).await;
        assert_eq!(s.status, 200, "{delivery}");
        assert_eq!(s.header("x-head-from"), Some("assistant"), "{delivery}");
        assert_eq!(s.data().last().map(String::as_str), Some("[DONE]"), "{delivery}");
        let events = s.events();
        assert_eq!(events.len(), 5, "{delivery}: 4 content chunks + the final one");
        assert!(
            events.iter().all(|e| e["transformed"] == true),
            "{delivery}: {events:?}"
        );
        let text: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Hello from the mock", "{delivery}");
    }
    assert_eq!(
        gw.metric("llmproxy_hook_calls_total{hook=\"response_transform\"}")
            .await,
        10.0,
        "each event once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_arrive_incrementally() {
    let m = mock("slow", |o| {
        o.chunks = 5;
        o.chunk_delay_ms = 100;
    })
    .await;
    let yaml = format!(
        "backends:\n{}scripts:\n  response_transform:\n    script: |\n{}",
        backend("slow", &m.url()),
        script(&conformance_script("030-seed-response-transform-model-map.json"))
    );
    let gw = TestGateway::start(&yaml).await;
    let started = std::time::Instant::now();
    let s = post_stream(
        &format!("{}/v1/chat/completions", gw.base),
        &chat("qwen-72b-chat", json!({"stream": true})),
        &[],
    )
    .await;
    assert!(s.chunks.len() > 1, "{} chunks", s.chunks.len());
    let first = s.chunks.first().unwrap().0 - started;
    let last = s.chunks.last().unwrap().0 - started;
    // 6 events 100 ms apart: the first reached the client ~500 ms before
    // the backend produced the last one.
    assert!(first.as_millis() < 250, "first chunk after {first:?}");
    assert!(
        last - first >= std::time::Duration::from_millis(400),
        "first {first:?}, last {last:?}"
    );
    assert!(s.events().iter().all(|e| e["model"] == "gpt-3.5"));
}
