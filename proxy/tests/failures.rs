//! Retries, fallbacks, every error type through `error_handler`, broken
//! scripts, and request limits.

mod common;

use common::*;
use serde_json::{json, Value};

const ECHO_ERROR: &str = "return {status_code = 599 - 97, body = {type = error.type, retry_count = error.retry_count, status = error.status_code, backend_url = error.backend_url or json.null, message = error.message}}";

fn yaml(backends: &[(&str, String)], extra: &str) -> String {
    let mut y = String::from("backends:\n");
    for (n, u) in backends {
        y.push_str(&backend(n, u));
    }
    y.push_str(extra);
    y
}

fn hook(name: &str, source: &str, settings: &str) -> String {
    format!("  {name}:\n{settings}    script: |\n{}", script(source))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_move_past_refusing_and_failing_backends() {
    let bad = mock("bad", |o| o.fail_rate = 1.0).await;
    let good = mock("good", |_| {}).await;
    let y = yaml(
        &[("dead", refused_url()), ("bad", bad.url()), ("good", good.url())],
        &format!("scripts:\n{}", hook("routing", "return 'dead'", "")),
    );
    let gw = TestGateway::start(&y).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    for _ in 0..4 {
        let r = post(&url, &chat("m", json!({})), &[]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.backend(), Some("good"));
    }
    assert!(gw.metric("llmproxy_retries_total").await >= 4.0);
    // Three consecutive failures: `dead` is now unhealthy.
    assert_eq!(gw.metric("llmproxy_backend_healthy{backend=\"dead\"}").await, 0.0);
    assert_eq!(gw.metric("llmproxy_backend_healthy{backend=\"good\"}").await, 1.0);
    // Streams are retried too, before their first byte.
    let s = post_stream(&url, &chat("m", json!({"stream": true})), &[]).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("x-llmproxy-backend"), Some("good"));
    assert_eq!(s.data().last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_balancer_skips_unhealthy_backends() {
    let good = mock("good", |_| {}).await;
    let y = yaml(
        &[("dead", refused_url()), ("good", good.url())],
        "gateway:\n  retry:\n    max_retries: 1\n  health:\n    failures_to_unhealthy: 1\n    cooldown_ms: 60000\n",
    );
    let gw = TestGateway::start(&y).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    for _ in 0..6 {
        assert_eq!(post(&url, &chat("m", json!({})), &[]).await.backend(), Some("good"));
    }
    // After its first failure `dead` is out of rotation: at most one retry.
    assert_eq!(gw.metric("llmproxy_retries_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_probes_mark_backends_without_traffic() {
    let good = mock("good", |_| {}).await;
    let y = yaml(
        &[("dead", refused_url()), ("good", good.url())],
        "gateway:\n  health:\n    probe_interval_ms: 30\n    failures_to_unhealthy: 2\n    probe_timeout_ms: 200\n",
    );
    let gw = TestGateway::start(&y).await;
    let mut healthy = 1.0;
    for _ in 0..100 {
        healthy = gw.metric("llmproxy_backend_healthy{backend=\"dead\"}").await;
        if healthy == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(healthy, 0.0, "the probe marks `dead` down with no request sent");
    assert_eq!(gw.metric("llmproxy_backend_healthy{backend=\"good\"}").await, 1.0);
    assert_eq!(
        gw.metric("llmproxy_requests_total{backend=\"good\",status=\"200\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_fails_error_handler_sees_the_retries() {
    let bad = mock("bad", |o| o.fail_rate = 1.0).await;
    let y = yaml(
        &[("dead1", refused_url()), ("dead2", refused_url()), ("bad", bad.url())],
        &format!("scripts:\n{}", hook("error_handler", ECHO_ERROR, "")),
    );
    let gw = TestGateway::start(&y).await;
    let r = post(&format!("{}/v1/chat/completions", gw.base), &chat("m", json!({})), &[]).await;
    assert_eq!(r.status, 502);
    let b = r.json();
    assert_eq!(b["type"], "backend_error");
    assert_eq!(b["retry_count"], 2);
    assert!(b["backend_url"].as_str().unwrap().starts_with("http://127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_error_handler_shapes_every_error_type() {
    let m = mock("m", |_| {}).await;
    let y = yaml(
        &[("m", m.url())],
        &format!(
            "gateway:\n  max_body_bytes: 2048\n  retry:\n    max_retries: 0\n  timeouts:\n    first_byte_ms: 300\nscripts:\n{}",
            hook("error_handler", &conformance_script("060-seed-error-handler-backend-error.json"), "")
        ),
    );
    let gw = TestGateway::start(&y).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let body = chat("m", json!({}));
    let cases: Vec<(&str, Reply, u16, &str)> = vec![
        (
            "timeout",
            post(&url, &body, &[("x-mock-delay-ms", "2000")]).await,
            504,
            "请求超时",
        ),
        (
            "auth_error",
            post(&url, &body, &[("x-mock-status", "401")]).await,
            401,
            "未知错误",
        ),
        (
            "rate_limit",
            post(&url, &body, &[("x-mock-status", "429")]).await,
            429,
            "请求过于频繁",
        ),
        (
            "backend_error",
            post(&url, &body, &[("x-mock-status", "500")]).await,
            500,
            "后端服务异常",
        ),
        (
            "bad_request",
            send(
                hyper::Method::POST,
                &url,
                &[("x-request-id", "rid-1")],
                "{not json".into(),
            )
            .await,
            400,
            "未知错误",
        ),
        (
            "bad_request",
            send(hyper::Method::POST, &url, &[], vec![b' '; 4096].into()).await,
            413,
            "未知错误",
        ),
    ];
    for (kind, r, status, message) in cases {
        assert_eq!(r.status, status, "{kind}: {}", String::from_utf8_lossy(&r.body));
        let b = r.json();
        assert_eq!(b["error"]["type"], kind);
        assert_eq!(b["error"]["message"], message);
        assert_eq!(b["error"]["request_id"].as_str(), r.header("x-request-id"), "{kind}");
    }
    // A backend that refuses connections is a backend_error too.
    let y = yaml(
        &[("dead", refused_url())],
        &format!(
            "scripts:\n{}",
            hook(
                "error_handler",
                &conformance_script("060-seed-error-handler-backend-error.json"),
                ""
            )
        ),
    );
    let gw = TestGateway::start(&y).await;
    let r = post(&format!("{}/v1/chat/completions", gw.base), &body, &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["message"], "后端服务异常");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_errors_are_openai_style() {
    let m = mock("m", |_| {}).await;
    let y = yaml(
        &[("m", m.url()), ("dead", refused_url())],
        "gateway:\n  max_body_bytes: 1024\n  retry:\n    max_retries: 0\n  balancer: lowest_latency\n",
    );
    let gw = TestGateway::start(&y).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let check = |r: &Reply, status: u16, kind: &str, code: &str| {
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
        let b = r.json();
        assert_eq!(b["error"]["type"], kind);
        assert_eq!(b["error"]["code"], code);
        assert!(b["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(r.header("x-request-id").is_some());
    };
    check(
        &send(hyper::Method::POST, &url, &[], "[1,".into()).await,
        400,
        "bad_request",
        "invalid_json",
    );
    check(
        &send(hyper::Method::POST, &url, &[], "[1]".into()).await,
        400,
        "bad_request",
        "invalid_body",
    );
    check(
        &send(hyper::Method::POST, &url, &[], vec![b'x'; 5000].into()).await,
        413,
        "bad_request",
        "body_too_large",
    );
    check(
        &get(&format!("{}/nope", gw.base)).await,
        404,
        "bad_request",
        "not_found",
    );
    // An upstream error body passes through when no script reshapes it.
    let r = post(&url, &chat("m", json!({})), &[("x-mock-status", "429")]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    // A refused connection with no retries left.
    let mut saw_refused = false;
    for _ in 0..4 {
        let r = post(&url, &chat("m", json!({})), &[]).await;
        if r.status == 502 {
            check(&r, 502, "backend_error", "backend_unreachable");
            saw_refused = true;
        }
    }
    assert!(saw_refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_scripts_never_take_the_gateway_down() {
    let m = mock("m", |_| {}).await;
    // (hook, script, settings, error kind it produces)
    let cases = [
        ("routing", "error('boom')", "", "script_error"),
        ("routing", "while true do end", "    timeout_ms: 30\n", "timeout"),
        ("routing", "return 42", "", "bad_output"),
        ("routing", "return 'no-such-backend'", "", "bad_output"),
        (
            "routing",
            "local t = {} for i = 1, 1e8 do t[i] = i end",
            "    memory_mb: 2\n",
            "memory",
        ),
        (
            "request_transform",
            "return {headers = 5, bogus = true}",
            "",
            "bad_output",
        ),
        ("request_transform", "local x = nil; return x.y", "", "script_error"),
        ("response_transform", "return 'garbage'", "", "bad_output"),
        (
            "response_transform",
            "while true do end",
            "    timeout_ms: 20\n",
            "timeout",
        ),
        ("usage", "error('usage broke')", "", "script_error"),
        ("error_handler", "return {status_code = 'x'}", "", "bad_output"),
    ];
    for (hook_name, source, settings, kind) in cases {
        let y = yaml(
            &[("m", m.url())],
            &format!("scripts:\n{}", hook(hook_name, source, settings)),
        );
        let gw = TestGateway::start(&y).await;
        let url = format!("{}/v1/chat/completions", gw.base);
        let what = format!("{hook_name}: {source}");
        if hook_name == "error_handler" {
            let r = post(&url, &chat("m", json!({})), &[("x-mock-status", "500")]).await;
            assert_eq!(r.status, 500, "{what}");
            assert_eq!(
                r.json()["error"]["message"],
                "mock error 500",
                "default: upstream body, {what}"
            );
        } else {
            for _ in 0..2 {
                let r = post(&url, &chat("m", json!({})), &[]).await;
                assert_eq!(r.status, 200, "{what}: {}", String::from_utf8_lossy(&r.body));
                assert_eq!(r.json()["object"], "chat.completion", "{what}");
                let s = post_stream(&url, &chat("m", json!({"stream": true})), &[]).await;
                assert_eq!(s.status, 200, "{what}");
                assert_eq!(s.data().last().map(String::as_str), Some("[DONE]"), "{what}");
            }
        }
        let sample = format!("llmproxy_hook_errors_total{{hook=\"{hook_name}\",kind=\"{kind}\"}}");
        let mut n = 0.0;
        for _ in 0..50 {
            n = gw.metric(&sample).await;
            if n > 0.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(n >= 1.0, "{what}: {sample} = {n}");
        assert_eq!(get(&format!("{}/healthz", gw.base)).await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_policy_fails_the_request_with_503() {
    let m = mock("m", |_| {}).await;
    let y = yaml(
        &[("m", m.url())],
        &format!("scripts:\n{}", hook("routing", "error('boom')", "    on_error: deny\n")),
    );
    let gw = TestGateway::start(&y).await;
    let r = post(&format!("{}/v1/chat/completions", gw.base), &chat("m", json!({})), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["type"], "hook_error");
    assert_eq!(r.json()["error"]["code"], "hook_failed");

    // On a stream, a denying response_transform ends the stream with an
    // error event.
    let y = yaml(
        &[("m", m.url())],
        &format!(
            "scripts:\n{}",
            hook("response_transform", "error('boom')", "    on_error: deny\n")
        ),
    );
    let gw = TestGateway::start(&y).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    assert_eq!(post(&url, &chat("m", json!({})), &[]).await.status, 503);
    let s = post_stream(&url, &chat("m", json!({"stream": true})), &[]).await;
    let events = s.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["error"]["type"], "hook_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_first_byte_is_retried_but_a_started_stream_is_not() {
    let slow = mock("slow", |o| o.latency_ms = 1500).await;
    let fast = mock("fast", |o| {
        o.chunks = 3;
        o.chunk_delay_ms = 400;
    })
    .await;
    let y = yaml(
        &[("slow", slow.url()), ("fast", fast.url())],
        &format!(
            "gateway:\n  timeouts:\n    first_byte_ms: 300\n    idle_ms: 150\nscripts:\n{}",
            hook("routing", "return request.body.target", "")
        ),
    );
    let gw = TestGateway::start(&y).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    // `slow` misses the first-byte deadline: retried on `fast`, whose first
    // event comes at once; then `fast` goes idle for 400 ms > 150 ms, and
    // the stream ends with an error event instead of a retry.
    let s = post_stream(&url, &chat("m", json!({"stream": true, "target": "slow"})), &[]).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("x-llmproxy-backend"), Some("fast"));
    let events = s.events();
    assert_eq!(events[0]["choices"][0]["delta"]["content"], "Hello");
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{events:?}");
    assert_eq!(gw.metric("llmproxy_retries_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_backend_headers_reach_the_backend() {
    let m = mock("m", |_| {}).await;
    let y = format!(
        "backends:\n  - name: m\n    url: \"{}\"\n    headers:\n      X-Api-Key: upstream-secret\n",
        m.url()
    );
    let gw = TestGateway::start(&y).await;
    let r = post(
        &format!("{}/v1/chat/completions", gw.base),
        &chat("m", json!({})),
        &[("x-api-key", "client-key")],
    )
    .await;
    assert_eq!(r.header("x-echo-x-api-key"), Some("upstream-secret"));
    let _ = Value::Null;
}
