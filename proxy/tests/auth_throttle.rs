//! Throttling of clients that keep failing API key and admin token checks
//! (`gateway.auth_throttle`, docs/adr/039): after `max_failures` failures
//! the address is answered 429 with `Retry-After` and an OpenAI-style
//! error, before its credentials are looked at; the metrics count it.

mod common;

use bytes::Bytes;
use common::*;
use hyper::Method;
use serde_json::json;

fn yaml(url: &str) -> String {
    format!(
        "backends:\n{}keys:\n  - {{key: sk-good, user_id: u1}}\n  - {{key: sk-off, user_id: u2, status: disabled}}\n\
         gateway:\n  auth_throttle: {{max_failures: 3, window_s: 60}}\n\
         admin: {{token: adm-0123456789abcdef, listen: '127.0.0.1:0'}}\n",
        backend("m", url)
    )
}

fn assert_throttled(r: &Reply) {
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json();
    assert_eq!(e["error"]["type"], "rate_limit", "{e}");
    assert_eq!(e["error"]["code"], "too_many_auth_failures", "{e}");
    assert!(e["error"]["message"].is_string(), "{e}");
    // 3 attempts per 60 s: one comes back every 20 s.
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_api_keys_are_throttled_per_address() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&yaml(&m.url())).await;
    // A known but disabled key is not a guess: 403, never throttled.
    for _ in 0..5 {
        assert_eq!(gw.chat(Some("sk-off"), json!({})).await.status, 403);
    }
    assert_eq!(gw.chat(Some("sk-good"), json!({})).await.status, 200);
    // Wrong or missing keys: three 401s, then 429 for every request that
    // needs a key, the right one included.
    for key in [Some("sk-guess-1"), None, Some("sk-guess-2")] {
        assert_eq!(gw.chat(key, json!({})).await.status, 401);
    }
    assert_throttled(&gw.chat(Some("sk-guess-3"), json!({})).await);
    assert_throttled(&gw.chat(Some("sk-good"), json!({})).await);
    // Local endpoints keep answering; the admin token is counted apart.
    assert_eq!(get(&format!("{}/healthz", gw.base)).await.status, 200);
    assert_eq!(get(&format!("{}/v1/models", gw.base)).await.status, 200);
    assert_eq!(gw.metric("llmproxy_auth_failures_total{kind=\"api_key\"}").await, 3.0);
    assert_eq!(gw.metric("llmproxy_auth_throttled_total{kind=\"api_key\"}").await, 2.0);
    assert_eq!(
        gw.metric("llmproxy_auth_throttled_total{kind=\"admin_token\"}").await,
        0.0
    );
    assert_eq!(gw.metric("llmproxy_auth_throttle_clients{kind=\"api_key\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_admin_tokens_are_throttled() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&yaml(&m.url())).await;
    let reload = |token: &'static str| {
        let url = format!("{}/admin/reload", gw.admin_base);
        async move {
            send(
                Method::POST,
                &url,
                &[("authorization", &format!("Bearer {token}"))],
                Bytes::new(),
            )
            .await
        }
    };
    for _ in 0..3 {
        assert_eq!(reload("adm-guess").await.status, 401);
    }
    assert_throttled(&reload("adm-guess").await);
    assert_throttled(&reload("adm-0123456789abcdef").await);
    // The API is not affected by admin failures.
    assert_eq!(gw.chat(Some("sk-good"), json!({})).await.status, 200);
    assert_eq!(
        gw.metric("llmproxy_auth_failures_total{kind=\"admin_token\"}").await,
        3.0
    );
    assert_eq!(
        gw.metric("llmproxy_auth_throttled_total{kind=\"admin_token\"}").await,
        2.0
    );
}
