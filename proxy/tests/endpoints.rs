//! Local endpoints, passthrough, request ids, the demo binary, and hook
//! isolation (a slow script does not stall other requests).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_healthz_metrics_and_passthrough() {
    let m = mock("m", |_| {}).await;
    let y = format!(
        "backends:\n{}gateway:\n  models: [gpt-4, gpt-3.5]\nscripts:\n  routing:\n    script: return nil\n",
        backend("m", &m.url())
    );
    let gw = TestGateway::start(&y).await;
    let r = get(&format!("{}/v1/models", gw.base)).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4", "gpt-3.5"]);
    let r = get(&format!("{}/healthz", gw.base)).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));

    // Another /v1/ path is passed through (here: the mock's 404, as is).
    let r = post(&format!("{}/v1/files?purpose=x", gw.base), &json!({"a": 1}), &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.backend(), Some("m"));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("/v1/files"));

    post(&format!("{}/v1/chat/completions", gw.base), &chat("x", json!({})), &[]).await;
    let text = gw.metrics().await;
    for name in [
        "llmproxy_requests_total{backend=\"m\",status=\"200\"} 1",
        "llmproxy_requests_total{backend=\"m\",status=\"404\"} 1",
        "llmproxy_upstream_latency_seconds_count{backend=\"m\"} 2",
        "llmproxy_hook_calls_total{hook=\"routing\"} 2",
        "llmproxy_hook_errors_total{hook=\"routing\",kind=\"timeout\"} 0",
        "llmproxy_hook_duration_seconds_count{hook=\"routing\"} 2",
        "llmproxy_retries_total 0",
        "llmproxy_active_streams 0",
        "llmproxy_vm_pool{stat=\"capacity\"}",
        "llmproxy_backend_healthy{backend=\"m\"} 1",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    // Every family is the catalog's (core's `policy::metrics`).
    let problems = llmproxy_core::policy::metrics::check_exposition(&text);
    assert!(problems.is_empty(), "{problems:#?}");
    // Every sample line is `name{labels} value` with a numeric value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_accepted_or_generated() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&format!("backends:\n{}", backend("m", &m.url()))).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let r = post(&url, &chat("x", json!({})), &[("x-request-id", "abc-123")]).await;
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    assert_eq!(r.header("x-echo-x-request-id"), Some("abc-123"));
    let r = post(&url, &chat("x", json!({})), &[("x-request-id", "bad id with spaces")]).await;
    let id = r.header("x-request-id").unwrap();
    assert!(id.starts_with("req_"), "{id}");
    let a = post(&url, &chat("x", json!({})), &[]).await;
    let b = post(&url, &chat("x", json!({})), &[]).await;
    assert_ne!(a.header("x-request-id"), b.header("x-request-id"));
}

/// The measurement behind the "a slow script must not stall other
/// requests" target: one request whose routing script burns 90 ms while
/// 100 concurrent fast requests run. The bound here is loose (debug build,
/// shared CI cores); `make bench-http` reports the release number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_script_does_not_stall_other_requests() {
    let m = mock("m", |_| {}).await;
    let y = format!(
        "backends:\n{}scripts:\n  routing:\n    timeout_ms: 500\n    script: |\n{}",
        backend("m", &m.url()),
        script("if request.body.burn then\n  local t0 = time.now()\n  while time.now() - t0 < 0.09 do end\nend\nreturn nil")
    );
    let gw = TestGateway::start(&y).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let fast = chat("x", json!({}));
    // Warm up connections and VMs.
    for _ in 0..20 {
        post(&url, &fast, &[]).await;
    }
    let p99 = |mut v: Vec<Duration>| {
        v.sort();
        v[(v.len() * 99 / 100).min(v.len() - 1)]
    };
    let burst = |url: String| async move {
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let url = url.clone();
                let body = chat("x", json!({}));
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = post(&url, &body, &[]).await;
                    assert_eq!(r.status, 200);
                    t.elapsed()
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    };
    let baseline = p99(burst(url.clone()).await);
    let slow_url = url.clone();
    let slow = tokio::spawn(async move {
        let t = Instant::now();
        let r = post(&slow_url, &chat("x", json!({"burn": true})), &[]).await;
        assert_eq!(r.status, 200);
        t.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let with_slow = p99(burst(url).await);
    let slow = slow.await.unwrap();
    assert!(slow >= Duration::from_millis(90), "the slow script ran {slow:?}");
    let added = with_slow.saturating_sub(baseline);
    eprintln!("p99 fast: baseline {baseline:?}, with a 90 ms script running {with_slow:?} (added {added:?})");
    // A fast request that waited for the slow one would add >= 90 ms.
    assert!(added < Duration::from_millis(80), "added p99 {added:?}");
}

/// A hook job runs inline on the async worker when it is fast; one that
/// passes `gateway.inline_budget_ms` is stopped there and runs again on a
/// hook thread (docs/adr/049): the client sees one answer, the metrics one
/// call and no failure, and the hook stays on the threads for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_past_the_inline_budget_runs_again_on_a_hook_thread() {
    let m = mock("m", |_| {}).await;
    let scripts = format!(
        "scripts:\n  routing:\n    timeout_ms: 3000\n    script: |\n{}",
        script("if request.body.burn then\n  local t0 = time.now()\n  while time.now() - t0 < 0.4 do end\nend\nreturn \"m\"")
    );
    let offloaded = |reason: &str| format!("llmproxy_hook_jobs_offloaded_total{{reason=\"{reason}\"}}");
    let calls = "llmproxy_hook_calls_total{hook=\"routing\"}";
    let timeouts = "llmproxy_hook_errors_total{hook=\"routing\",kind=\"timeout\"}";
    // A budget well above a fast call's cost, so that a loaded machine
    // (CI runs the suites in parallel on two cores) does not push a fast
    // call past it; the slow call spins for 400 ms of wall time, so that
    // its CPU time passes the budget even on a tenth of a core.
    for budget in [20, 0] {
        let y = format!(
            "backends:\n{}gateway:\n  inline_budget_ms: {budget}\n{scripts}",
            backend("m", &m.url())
        );
        let gw = TestGateway::start(&y).await;
        let url = format!("{}/v1/chat/completions", gw.base);
        // (body, offloaded over_budget, slow_hook after it)
        let steps = [
            (json!({}), 0.0, 0.0),
            (json!({"burn": true}), 1.0, 0.0),
            (json!({}), 1.0, 1.0),
        ];
        for (i, (extra, over, slow)) in steps.into_iter().enumerate() {
            let r = post(&url, &chat("x", extra), &[]).await;
            assert_eq!((r.status, r.backend()), (200, Some("m")), "budget {budget} step {i}");
            let want = if budget == 0 { (0.0, 0.0) } else { (over, slow) };
            let got = (
                gw.metric(&offloaded("over_budget")).await,
                gw.metric(&offloaded("slow_hook")).await,
            );
            assert_eq!(got, want, "budget {budget} step {i}");
            assert_eq!(gw.metric(calls).await, (i + 1) as f64, "one call per request");
            assert_eq!(gw.metric(timeouts).await, 0.0, "an overrun is not a failure");
        }
        assert_eq!(gw.metric(&offloaded("no_idle_vm")).await, 0.0);
    }
}

/// A stream's per-event transform runs inline on a copy of the relay's
/// state: when one event of a batch passes the budget, the whole batch
/// runs again on a hook thread, and the client still gets every event
/// once, transformed, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_event_past_the_inline_budget_is_transformed_once() {
    let m = mock("m", |o| o.chunks = 4).await;
    let transform = r#"if not response.is_stream then return nil end
local d = response.body.choices and response.body.choices[1] and response.body.choices[1].delta
if d and d.content == " the" then
  local t0 = time.now()
  while time.now() - t0 < 0.4 do end
end
local copy = json.decode(json.encode(response.body))
copy.mark = "t"
return {body = copy}"#;
    // The budget is well above a fast event's cost (see above). The slow
    // event spins for 400 ms of wall time: the budget counts the worker's
    // CPU time, which reaches 20 ms even when the tests running beside
    // this one leave it a tenth of a core.
    let y = format!(
        "backends:\n{}gateway:\n  inline_budget_ms: 20\nscripts:\n  response_transform:\n    timeout_ms: 3000\n    script: |\n{}",
        backend("m", &m.url()),
        script(transform)
    );
    let gw = TestGateway::start(&y).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let s = post_stream(&url, &chat("x", json!({"stream": true})), &[]).await;
    assert_eq!(s.status, 200);
    let events = s.events();
    let contents: Vec<&str> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(contents, ["Hello", " from", " the", " mock"]);
    assert!(events.iter().all(|e| e["mark"] == "t"), "{events:?}");
    assert_eq!(s.data().last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        gw.metric("llmproxy_hook_jobs_offloaded_total{reason=\"over_budget\"}")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("llmproxy_hook_calls_total{hook=\"response_transform\"}")
            .await,
        events.len() as f64,
        "one call per event"
    );
}

/// Client connections are handed to the connection workers in turn
/// (`gateway.workers`), each serving its requests to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_over_the_workers() {
    let m = mock("m", |_| {}).await;
    let y = format!("backends:\n{}gateway:\n  workers: 3\n", backend("m", &m.url()));
    let gw = TestGateway::start(&y).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    for i in 0..6 {
        // A new connection each time.
        let r = post(&url, &chat("x", json!({"stream": i % 2 == 0})), &[]).await;
        assert_eq!(r.status, 200, "request {i}");
    }
    for w in 0..3 {
        let sample = format!("llmproxy_worker_connections_total{{worker=\"{w}\"}}");
        assert_eq!(gw.metric(&sample).await, 2.0, "worker {w}");
    }
}

#[test]
fn the_binary_serves_the_demo_without_a_config() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn llmproxy");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut addr = None;
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["fields"]["message"] == "listening" {
            addr = v["fields"]["addr"].as_str().map(str::to_owned);
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let addr = addr.expect("listening line");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let url = format!("http://{addr}/v1/chat/completions");
        let mut seen = Vec::new();
        for vip in [3, 1, 0] {
            let r = post(
                &url,
                &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "viplevel": vip}),
                &[],
            )
            .await;
            assert_eq!(r.status, 200);
            assert!(r.header("x-request-id").is_some());
            seen.push(r.backend().unwrap_or("-").to_owned());
        }
        let s = post_stream(
            &url,
            &json!({"model": "gpt-4", "messages": [], "stream": true, "viplevel": 3}),
            &[],
        )
        .await;
        assert_eq!(s.data().last().map(String::as_str), Some("[DONE]"));
        let models = get(&format!("http://{addr}/v1/models")).await.json();
        (seen, models)
    });
    let _ = child.kill();
    let _ = child.wait();
    let (seen, models) = result;
    assert_eq!(seen, ["ultra", "high-performance", "standard"]);
    assert_eq!(models["data"][0]["id"], "gpt-4");
}
