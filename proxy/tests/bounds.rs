//! Bounds on everything a client or an upstream controls in size or time
//! (docs/adr/036, 037): the hook queue, error_handler's reach, body read
//! and write timeouts, the connection cap, auth before the body, the SSE
//! event cap and the first-event deadline, and usage estimated for streams
//! whose usage never came. Real sockets on 127.0.0.1, the real mock.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A Lua script that keeps its hook thread busy for about 90 ms.
const BUSY_90MS: &str = "local t0 = time.now()\nwhile time.now() - t0 < 0.09 do end\nreturn nil";

fn config(url: &str, rest: &str) -> String {
    format!("backends:\n{}{rest}", backend("m", url))
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
