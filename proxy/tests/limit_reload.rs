//! A limit changed by reload applies to existing buckets at once, with
//! both state backends (docs/adr/031, 041): raising `key_rpm` from 2 to 100
//! admits the next request, lowering it counts what was used. Real
//! sockets, a real mock backend, `POST /admin/reload`.

mod common;

use bytes::Bytes;
use common::*;
use hyper::Method;
use serde_json::json;

const TOKEN: &str = "adm-0123456789abcdef";

fn yaml(mock: &str, state: &str, key_rpm: u64) -> String {
    format!(
        "backends:\n{}keys:\n  - {{key: sk-a, user_id: ua}}\nlimits: {{key_rpm: {key_rpm}}}\n{state}admin: {{token: {TOKEN}}}\n",
        backend("m", mock)
    )
}

async fn reload(gw: &TestGateway) {
    let r = send(
        Method::POST,
        &format!("{}/admin/reload", gw.admin_base),
        &[("authorization", &format!("Bearer {TOKEN}"))],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

async fn statuses(gw: &TestGateway, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(gw.chat(Some("sk-a"), json!({})).await.status);
    }
    out
}

async fn raise_then_lower(name: &str, state: &str) {
    let m = mock("m", |_| {}).await;
    let dir = tempdir(&format!("limit-reload-{name}"));
    let path = dir.join("gw.yaml");
    std::fs::write(&path, yaml(&m.url(), state, 2)).unwrap();
    let gw = TestGateway::start_config(llmproxy_core::Config::from_file(&path).unwrap()).await;
    assert_eq!(statuses(&gw, 3).await, [200, 200, 429], "{name}: 2 per minute");
    // Raised to 100: 98 left at once, not after a minute of refill.
    std::fs::write(&path, yaml(&m.url(), state, 100)).unwrap();
    reload(&gw).await;
    assert_eq!(statuses(&gw, 3).await, [200, 200, 200], "{name}: raised to 100");
    // Lowered to 6 with 5 used: one left.
    std::fs::write(&path, yaml(&m.url(), state, 6)).unwrap();
    reload(&gw).await;
    assert_eq!(statuses(&gw, 2).await, [200, 429], "{name}: lowered to 6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_limit_admits_at_once_with_local_state() {
    raise_then_lower("local", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_limit_admits_at_once_with_redis_state() {
    let Some(redis) = Redis::start("limit-reload") else {
        return;
    };
    let state = format!("state: {{backend: redis, url: \"{}\", prefix: \"lr:\"}}\n", redis.url());
    raise_then_lower("redis", &state).await;
}
