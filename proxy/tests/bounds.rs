//! Bounds on everything a client or an upstream controls in size or time
//! (docs/adr/036, 037): the hook queue, error_handler's reach, body read
//! and write timeouts, the connection cap, auth before the body, the SSE
//! event cap and the first-event deadline, and usage estimated for streams
//! whose usage never came. Real sockets on 127.0.0.1, the real mock.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A Lua script that keeps its hook thread busy for about 90 ms.
const BUSY_90MS: &str = "local t0 = time.now()\nwhile time.now() - t0 < 0.09 do end\nreturn nil";

fn config(url: &str, rest: &str) -> String {
    format!("backends:\n{}{rest}", backend("m", url))
}

/// Send raw bytes on a fresh connection and read until the peer closes or
/// `wait` passes; returns what arrived and whether the peer closed.
async fn raw(addr: &str, bytes: &[u8], wait: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    read_for(&mut s, wait).await
}

/// Read until the peer closes or `wait` passes.
async fn read_for(s: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// Read one whole response (head and a Content-Length body) from a
/// keep-alive connection.
async fn read_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if out.len() >= head_end + 4 + len {
                return text;
            }
        }
    }
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a response: {response:?}"))
}

fn body_of(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {response}"))
}

// ---- point 10: the hook queue -------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_behind_a_slow_script_gets_fast_503s() {
    let m = mock("m", |_| {}).await;
    for (queue, reason) in [(1024, "deadline"), (4, "queue_full")] {
        let gw = TestGateway::start(&config(
            &m.url(),
            &format!(
                "gateway:\n  hook_queue: {queue}\nscripts:\n  pool:\n    size: 1\n    checkout_timeout_ms: 200\n  request_transform:\n    timeout_ms: 1000\n    script: |\n{}",
                script(BUSY_90MS)
            ),
        ))
        .await;
        let url = format!("{}/v1/chat/completions", gw.base);
        let started = Instant::now();
        // 60 requests x 90 ms on one thread: 5.4 s for the last one without
        // the bound; with it, nobody waits much past the 200 ms deadline.
        let replies = futures_join(
            (0..60)
                .map(|_| {
                    let url = url.clone();
                    tokio::spawn(async move {
                        let t = Instant::now();
                        (post(&url, &chat("m", json!({})), &[]).await, t.elapsed())
                    })
                })
                .collect(),
        )
        .await;
        let slowest = replies.iter().map(|(_, d)| *d).max().unwrap();
        assert!(slowest < Duration::from_millis(3000), "{reason}: {slowest:?}");
        let refused: Vec<&Reply> = replies.iter().map(|(r, _)| r).filter(|r| r.status == 503).collect();
        let served = replies.iter().filter(|(r, _)| r.status == 200).count();
        assert!(!refused.is_empty() && served > 0, "{reason}: {} refused", refused.len());
        assert_eq!(refused.len() + served, 60);
        for r in &refused {
            let v = r.json();
            assert_eq!(v["error"]["code"], "hooks_overloaded", "{v}");
            assert_eq!(r.header("retry-after"), Some("1"));
        }
        let counted = gw
            .metric(&format!("llmproxy_hook_jobs_rejected_total{{reason=\"{reason}\"}}"))
            .await;
        assert!(counted >= 1.0, "{reason}: {counted}");
        assert!(started.elapsed() < Duration::from_secs(20));
        // It recovers.
        assert_eq!(post(&url, &chat("m", json!({})), &[]).await.status, 200);
    }
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

// ---- point 10: which failures error_handler sees -------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_handler_runs_only_for_identified_callers_on_real_endpoints() {
    let m = mock("m", |_| {}).await;
    let handler = "return {status_code = error.status_code, body = {shaped = error.type}}";
    let gw = TestGateway::start(&config(
        &m.url(),
        &format!(
            "keys:\n  - {{key: sk-good, user_id: g}}\n  - {{key: sk-off, user_id: o, status: disabled}}\n  - {{key: sk-spent, user_id: s, total_quota: 10, used_quota: 10}}\ngateway:\n  retry:\n    max_retries: 0\nscripts:\n  error_handler:\n    script: |\n{}",
            script(handler)
        ),
    ))
    .await;
    let chat_url = format!("{}/v1/chat/completions", gw.base);
    let good = "Bearer sk-good";
    let cases: Vec<(&str, Reply, u16, bool)> = vec![
        ("no key", post(&chat_url, &chat("m", json!({})), &[]).await, 401, false),
        (
            "unknown key",
            post(&chat_url, &chat("m", json!({})), &[("authorization", "Bearer sk-x")]).await,
            401,
            false,
        ),
        (
            "disabled key",
            post(&chat_url, &chat("m", json!({})), &[("authorization", "Bearer sk-off")]).await,
            403,
            false,
        ),
        (
            "unknown endpoint",
            send(
                hyper::Method::GET,
                &format!("{}/nope", gw.base),
                &[("authorization", good)],
                "".into(),
            )
            .await,
            404,
            false,
        ),
        (
            "unknown endpoint, no key",
            send(hyper::Method::GET, &format!("{}/nope", gw.base), &[], "".into()).await,
            404,
            false,
        ),
        (
            "quota exhausted",
            post(
                &chat_url,
                &chat("m", json!({})),
                &[("authorization", "Bearer sk-spent")],
            )
            .await,
            429,
            true,
        ),
        (
            "invalid json",
            send(
                hyper::Method::POST,
                &chat_url,
                &[("authorization", good)],
                "{nope".into(),
            )
            .await,
            400,
            true,
        ),
        (
            "backend error",
            post(
                &chat_url,
                &chat("m", json!({})),
                &[("authorization", good), ("x-mock-status", "500")],
            )
            .await,
            500,
            true,
        ),
    ];
    for (name, r, status, shaped) in cases {
        assert_eq!(r.status, status, "{name}: {}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v.get("shaped").is_some(), shaped, "{name}: {v}");
        if !shaped {
            assert!(v["error"]["code"].is_string(), "{name}: the default body: {v}");
        }
    }
}

/// With an auth script the body is read before admission, yet who may
/// shape a failure is settled by the headers: an unknown key's bad body
/// gets the gateway's 400, an identified caller's is shaped; a script's
/// denial is shaped for an identified caller only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_handler_follows_the_callers_identity_not_where_the_request_failed() {
    let m = mock("m", |_| {}).await;
    let handler = "return {status_code = error.status_code, body = {shaped = error.type}}";
    let auth = "if request.body.model == 'deny' then return {allow = false, reason = 'not you'} end\nreturn nil";
    let gw = TestGateway::start(&config(
        &m.url(),
        &format!(
            "keys:\n  - {{key: sk-good, user_id: g}}\n  - {{key: sk-off, user_id: o, status: disabled}}\nscripts:\n  auth:\n    script: |\n{}\n  error_handler:\n    script: |\n{}",
            script(auth),
            script(handler)
        ),
    ))
    .await;
    let url = format!("{}/v1/chat/completions", gw.base);
    // (case, key, body, status, shaped)
    let cases = [
        ("unknown key, bad body", "Bearer sk-x", "{nope", 400, false),
        ("disabled key, bad body", "Bearer sk-off", "{nope", 400, false),
        (
            "disabled key, script denies",
            "Bearer sk-off",
            r#"{"model":"deny"}"#,
            403,
            false,
        ),
        (
            "unknown key, script denies",
            "Bearer sk-x",
            r#"{"model":"deny"}"#,
            403,
            false,
        ),
        ("good key, bad body", "Bearer sk-good", "{nope", 400, true),
        (
            "good key, script denies",
            "Bearer sk-good",
            r#"{"model":"deny"}"#,
            403,
            true,
        ),
    ];
    for (name, key, body, status, shaped) in cases {
        let r = send(hyper::Method::POST, &url, &[("authorization", key)], body.into()).await;
        assert_eq!(r.status, status, "{name}: {}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v.get("shaped").is_some(), shaped, "{name}: {v}");
    }
}

// ---- point 7: body read timeout, connection cap, write timeout -----------

fn addr_of(gw: &TestGateway) -> String {
    gw.gateway.local_addr().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_body_gets_408_and_the_connection_closes() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(&m.url(), "gateway:\n  body_read_timeout_ms: 300\n")).await;
    let started = Instant::now();
    let (reply, closed) = raw(
        &addr_of(&gw),
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
        Duration::from_secs(20),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(status_of(&reply), 408, "{reply}");
    assert_eq!(body_of(&reply)["error"]["code"], "body_timeout");
    assert!(reply.to_ascii_lowercase().contains("connection: close"), "{reply}");
    assert!(closed, "the connection closes after the 408");
    assert_eq!(gw.metric("llmproxy_body_timeouts_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_does_not_name_its_host_as_http_requires_gets_400_and_the_connection_closes() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(&m.url(), "")).await;
    let body = r#"{"model":"gpt-4","messages":[]}"#;
    // (what, the head's lines between the request line and the length, status)
    let cases = [
        ("HTTP/1.1 without Host", "POST /v1/chat/completions HTTP/1.1\r\n", 400),
        (
            "two Host lines",
            "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nhost: b\r\n",
            400,
        ),
        ("HTTP/1.0 without Host", "POST /v1/chat/completions HTTP/1.0\r\n", 200),
    ];
    for (what, head, status) in cases {
        let request = format!("{head}content-length: {}\r\n\r\n{body}", body.len());
        let (reply, closed) = raw(&addr_of(&gw), request.as_bytes(), Duration::from_secs(10)).await;
        assert_eq!(status_of(&reply), status, "{what}: {reply}");
        if status == 400 {
            assert_eq!(body_of(&reply)["error"]["code"], "malformed_request", "{what}");
            assert!(closed, "{what}: the connection closes after the 400");
        }
    }
    let refused = gw
        .metric(r#"llmproxy_requests_total{backend="none",status="400"}"#)
        .await;
    assert_eq!(refused, 2.0, "both refusals counted, with no backend");
}

/// Heads hyper refuses before any request exists (docs/adr/074): the
/// client gets the gateway's JSON error and a request id, not hyper's
/// empty answer; each is counted as a request with no backend; the
/// connection closes, and the next one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_the_http_parser_refuses_get_json_errors() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(&m.url(), "")).await;
    let many_lines: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
    let long_target = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    // (what, the bytes sent, status, code)
    let cases = [
        (
            "a header line without a colon",
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nnot a header\r\n\r\n".to_owned(),
            400,
            "malformed_request",
        ),
        (
            "no request line",
            "GARBAGE\r\n\r\n".to_owned(),
            400,
            "malformed_request",
        ),
        (
            "an HTTP version that is not 1.x",
            "GET / HTTP/3.0\r\nhost: x\r\n\r\n".to_owned(),
            400,
            "malformed_request",
        ),
        (
            "more than 100 header lines",
            format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many_lines}\r\n"),
            431,
            "headers_too_large",
        ),
        ("a target over 64 KiB", long_target, 414, "uri_too_long"),
    ];
    for (what, bytes, status, code) in &cases {
        let (reply, closed) = raw(&addr_of(&gw), bytes.as_bytes(), Duration::from_secs(10)).await;
        assert_eq!(status_of(&reply), *status, "{what}: {reply}");
        assert_eq!(body_of(&reply)["error"]["code"], *code, "{what}: {reply}");
        assert_eq!(body_of(&reply)["error"]["type"], "bad_request", "{what}");
        let head = reply.to_ascii_lowercase();
        assert!(head.contains("content-type: application/json"), "{what}: {reply}");
        assert!(head.contains("x-request-id: req_"), "{what}: {reply}");
        assert!(closed, "{what}: the connection closes");
    }
    for (status, n) in [(400, 3.0), (431, 1.0), (414, 1.0)] {
        let counted = gw
            .metric(&format!(
                r#"llmproxy_requests_total{{backend="none",status="{status}"}}"#
            ))
            .await;
        assert_eq!(counted, n, "{status} counted with no backend");
    }
    let (reply, _) = raw(
        &addr_of(&gw),
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status_of(&reply), 200, "the gateway still serves: {reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_and_the_cap_recovers() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(&m.url(), "gateway:\n  max_connections: 2\n")).await;
    let addr = addr_of(&gw);
    let healthz = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(healthz).await.unwrap();
        assert_eq!(status_of(&read_response(&mut c).await), 200);
        held.push(c);
    }
    // The third connection is refused, clearly and at once.
    let (reply, closed) = raw(&addr, healthz, Duration::from_secs(10)).await;
    assert_eq!(status_of(&reply), 503, "{reply}");
    assert_eq!(body_of(&reply)["error"]["code"], "too_many_connections");
    assert!(reply.to_ascii_lowercase().contains("connection: close"));
    assert!(closed);
    // Open connections keep working.
    held[0].write_all(healthz).await.unwrap();
    assert_eq!(status_of(&read_response(&mut held[0]).await), 200);
    // When one closes, a new connection gets in.
    drop(held.pop());
    let mut recovered = false;
    for _ in 0..100 {
        let (reply, _) = raw(&addr, healthz, Duration::from_secs(5)).await;
        if status_of(&reply) == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "a slot came back after a client closed");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(gw.metric("llmproxy_connections_refused_total").await >= 1.0);
}

/// Wait until the mock has no stream open (the gateway dropped its
/// upstream), at most `wait`.
async fn upstream_released(m: &llmproxy_server::mock::MockServer, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if m.open_streams() == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn stream_request(headers: &str) -> Vec<u8> {
    let body = chat("m", json!({"stream": true})).to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_releases_the_upstream() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(&m.url(), "gateway:\n  write_timeout_ms: 300\n")).await;
    let mut c = TcpStream::connect(addr_of(&gw)).await.unwrap();
    c.write_all(&stream_request("x-mock-sse: forever\r\n")).await.unwrap();
    let mut head = [0u8; 64];
    let n = c.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(m.open_streams(), 1);
    // The client holds the connection open and never reads again.
    assert!(
        upstream_released(&m, Duration::from_secs(30)).await,
        "the upstream stream is still open"
    );
    assert!(gw.metric("llmproxy_write_timeouts_total").await >= 1.0);
    drop(c);
}

/// A client that shuts down its sending side after a whole request is
/// taken as gone (docs/gateway.md, "Bounds"): no response, the connection
/// closes, and the gateway keeps serving. Answering half-closed clients
/// would keep abandoned requests running until their upstream answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_is_a_client_that_left() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(&m.url(), "")).await;
    let body = chat("m", json!({})).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         x-mock-delay-ms: 3000\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut c = TcpStream::connect(addr_of(&gw)).await.unwrap();
    c.write_all(request.as_bytes()).await.unwrap();
    c.shutdown().await.unwrap();
    let (reply, closed) = read_for(&mut c, Duration::from_secs(30)).await;
    assert!(closed, "the connection stays open: {reply}");
    assert_eq!(reply, "", "a half-closed client got an answer");
    let (reply, _) = raw(
        &addr_of(&gw),
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(status_of(&reply), 200, "{reply}");
}

// ---- point 8: the key before the body --------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_body_is_refused_before_it_is_read() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(
        &m.url(),
        "keys:\n  - {key: sk-good, user_id: g}\ngateway:\n  body_read_timeout_ms: 20000\n",
    ))
    .await;
    // Announce 10 MB and send a few bytes that are not even JSON: without a
    // valid key the answer is 401 at once, not 400, not a wait for the body.
    for auth in ["", "authorization: Bearer sk-nope\r\n"] {
        let started = Instant::now();
        let (reply, _) = raw(
            &addr_of(&gw),
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{auth}content-length: 10000000\r\n\r\n{{not json"
            )
            .as_bytes(),
            Duration::from_secs(15),
        )
        .await;
        assert_eq!(status_of(&reply), 401, "{reply}");
        assert_eq!(body_of(&reply)["error"]["code"], "invalid_api_key");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
    // With the right key the same bytes are read, and found wanting.
    let r = send(
        hyper::Method::POST,
        &format!("{}/v1/chat/completions", gw.base),
        &[("authorization", "Bearer sk-good")],
        "{not json".into(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        gw.metric("llmproxy_auth_denied_total{reason=\"invalid_key\"}").await,
        2.0
    );
}

// ---- point 9: the SSE relay -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_byte_ms_is_a_deadline_for_the_first_event_despite_trickling_bytes() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(
        &m.url(),
        "gateway:\n  retry:\n    max_retries: 0\n  timeouts:\n    first_byte_ms: 500\n",
    ))
    .await;
    let started = Instant::now();
    let r = post_stream(
        &format!("{}/v1/chat/completions", gw.base),
        &chat("m", json!({"stream": true})),
        &[("x-mock-sse", "trickle"), ("x-mock-chunk-delay-ms", "20")],
    )
    .await;
    assert_eq!(r.status, 504);
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    assert!(upstream_released(&m, Duration::from_secs(10)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_event_ends_the_stream_and_releases_the_upstream() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(&m.url(), "gateway:\n  max_event_bytes: 200000\n")).await;
    let r = post_stream(
        &format!("{}/v1/chat/completions", gw.base),
        &chat("m", json!({"stream": true})),
        &[("x-mock-sse", "endless"), ("x-mock-chunk-delay-ms", "50")],
    )
    .await;
    assert_eq!(r.status, 200);
    let events = r.events();
    assert_eq!(events[0]["choices"][0]["delta"]["content"], "Hello", "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "event_too_large", "{last}");
    assert!(upstream_released(&m, Duration::from_secs(10)).await);
    assert_eq!(gw.metric("llmproxy_sse_events_too_large_total").await, 1.0);
}

// ---- points 9 and 11: a client that leaves mid-stream -----------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_stops_the_upstream_and_is_charged_an_estimate() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(&m.url(), "keys:\n  - {key: sk-good, user_id: g}\n")).await;
    let mut c = TcpStream::connect(addr_of(&gw)).await.unwrap();
    c.write_all(&stream_request(
        "authorization: Bearer sk-good\r\nx-request-id: rid-leaves\r\nx-mock-sse: forever\r\nx-mock-chunk-delay-ms: 20\r\n",
    ))
    .await
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data: ").count() < 4 {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("events in time")
            .unwrap();
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(c);
    assert!(
        upstream_released(&m, Duration::from_secs(10)).await,
        "work stops when the client leaves"
    );
    let rec = gw.usage.wait_for("rid-leaves").await;
    assert_eq!(rec.status, 499);
    assert!(rec.estimated);
    assert_eq!(rec.raw["estimated"], true, "{}", rec.raw);
    assert_eq!(rec.record()["estimated"], true, "{}", rec.record_json);
    // "你好 there": 12 bytes of prompt text -> 3 tokens; one per event relayed.
    assert_eq!(rec.raw["prompt_tokens"], 3, "{}", rec.raw);
    assert!(rec.raw["completion_tokens"].as_u64().unwrap() >= 4, "{}", rec.raw);
    assert!(rec.billable_tokens >= 7);
    assert_eq!(gw.metric("llmproxy_usage_estimated_total").await, 1.0);

    // A stream that ends with its usage chunk is charged what the backend said.
    let r = post_stream(
        &format!("{}/v1/chat/completions", gw.base),
        &chat("m", json!({"stream": true})),
        &[("authorization", "Bearer sk-good"), ("x-request-id", "rid-whole")],
    )
    .await;
    assert_eq!(r.status, 200);
    let rec = gw.usage.wait_for("rid-whole").await;
    assert!(!rec.estimated);
    assert_eq!(rec.raw.get("estimated"), None);
}
