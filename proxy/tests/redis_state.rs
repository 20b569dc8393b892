//! Several gateways, one Redis: one limit, one quota, one set of
//! concurrency slots (docs/adr/033), counted exactly (`mode: exact`; the
//! batched mode's bound and outages are in `redis_fleet.rs`). Each test
//! starts its own `redis-server` on a free loopback port in a temp dir.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A gateway on Redis in `exact` mode (a Redis call per limiter step: every
/// gateway sees every other's counts at once).
fn exact(mock: &str, redis: &str, prefix: &str, rest: &str) -> String {
    config(mock, redis, prefix, rest).replace("\"}\n", "\", mode: exact}\n")
}

/// A gateway on Redis in the default mode (`batched`).
fn config(mock: &str, redis: &str, prefix: &str, rest: &str) -> String {
    format!(
        "backends:\n{}keys:\n  - {{key: sk-a, user_id: ua, total_quota: 45}}\n  - {{key: sk-b, user_id: ub}}\n\
         state: {{backend: redis, url: \"{redis}\", prefix: \"{prefix}:\"}}\n{rest}",
        backend("m", mock)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_enforce_one_shared_request_limit() {
    let Some(redis) = Redis::start("rpm") else { return };
    let m = mock("m", |_| {}).await;
    let yaml = exact(&m.url(), &redis.url(), "rpm", "limits: {global_rpm: 100}\n");
    let a = TestGateway::start(&yaml).await;
    let b = TestGateway::start(&yaml).await;
    // 160 requests, alternately on each gateway, 16 at a time.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let urls = [a.base.clone(), b.base.clone()];
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u32;
            let mut limited = 0u32;
            for j in 0..10 {
                let base = &urls[(i + j) % 2];
                let r = post(
                    &format!("{base}/v1/chat/completions"),
                    &chat("gpt-4", json!({})),
                    &[("authorization", "Bearer sk-b")],
                )
                .await;
                match r.status {
                    200 => ok += 1,
                    429 => limited += 1,
                    s => panic!("status {s}"),
                }
            }
            (ok, limited)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l) = t.await.unwrap();
        ok += o;
        limited += l;
    }
    let secs = started.elapsed().as_secs_f64();
    // 100 per minute in total (a token bucket gains 100/60 per second).
    let refill = (secs * 100.0 / 60.0).ceil() as u32;
    assert!(
        ok >= 100 && ok <= 100 + refill,
        "ok {ok}, limited {limited} in {secs:.2}s: one shared limit, not 200"
    );
    assert_eq!(ok + limited, 160);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_and_concurrency_are_shared_and_slots_come_back() {
    let Some(redis) = Redis::start("quota") else { return };
    let m = mock("m", |o| {
        o.chunks = 40;
        o.chunk_delay_ms = 50;
    })
    .await;
    let yaml = exact(
        &m.url(),
        &redis.url(),
        "quota",
        "limits: {key_concurrency: 2}\nscripts:\n  usage:\n    script: |\n      return nil\n",
    );
    let a = TestGateway::start(&yaml).await;
    let b = TestGateway::start(&yaml).await;
    // Quota 45, 10 tokens a chat (8 chunks? here 40 chunks + 2 prompt = 42):
    // one request on A uses 42, the next on B still fits (42 < 45), then
    // nothing fits anywhere.
    assert_eq!(a.chat(Some("sk-a"), json!({})).await.status, 200);
    a.wait_records(1).await;
    wait_redis_charge(&redis, "quota", "sk-a", 42).await;
    assert_eq!(b.chat(Some("sk-a"), json!({})).await.status, 200);
    b.wait_records(1).await;
    let mut last = 0;
    for _ in 0..50 {
        last = a.chat(Some("sk-a"), json!({})).await.status;
        if last == 429 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(last, 429, "84 of 45 used");
    let r = b.chat(Some("sk-a"), json!({})).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "quota_exhausted");

    // Concurrency 2 across both gateways: a stream on each holds them.
    let url_a = format!("{}/v1/chat/completions", a.base);
    let url_b = format!("{}/v1/chat/completions", b.base);
    let mut holders = Vec::new();
    for u in [url_a.clone(), url_b.clone()] {
        holders.push(tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
            let req = hyper::Request::post(u)
                .header("authorization", "Bearer sk-b")
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    chat("gpt-4", json!({"stream": true})).to_string(),
                )))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            use http_body_util::BodyExt;
            let _ = body.frame().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(body);
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = a.chat(Some("sk-b"), json!({})).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "key_concurrency_limit");
    for h in holders {
        h.abort();
    }
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if b.chat(Some("sk-b"), json!({})).await.status == 200 {
            ok = true;
            break;
        }
    }
    assert!(ok, "slots released in Redis after the clients disconnected");
}

/// Wait until Redis shows the key's usage charged (charges are background
/// calls, made right after the usage record).
async fn wait_redis_charge(redis: &Redis, prefix: &str, key: &str, want: i64) {
    let client =
        llmproxy_server::gateway::redis_conn::RedisClient::new(&redis.url(), 1, Duration::from_secs(1)).unwrap();
    let q = format!("{prefix}:q:{}", llmproxy_core::keys::key_fingerprint(key));
    for _ in 0..200 {
        let r = client.cmd(&[b"HGET", q.as_bytes(), b"used"]).await.unwrap();
        if r.as_i64() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key}: usage never reached {want} in redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_see_shared_counters_and_redis_failures_follow_on_error() {
    let Some(redis) = Redis::start("scripts") else { return };
    let m = mock("m", |_| {}).await;
    let scripts = "scripts:\n  auth:\n    may_override: [unknown]\n    script: |\n      if request.body.mode == 'allow' then return {allow = true} end\n      return nil\n\
                   \x20 rate_limit:\n    script: |\n      if request.body.mode == 'status' then return {allow = false, reason = json.encode(rate_limit_status)} end\n      return nil\n";
    let yaml = exact(
        &m.url(),
        &redis.url(),
        "scripts",
        &format!("limits: {{key_rpm: 5, global_rpm: 50}}\n{scripts}"),
    );
    let a = TestGateway::start(&yaml).await;
    let b = TestGateway::start(&yaml).await;
    assert_eq!(a.chat(Some("sk-b"), json!({})).await.status, 200);
    assert_eq!(b.chat(Some("sk-b"), json!({})).await.status, 200);
    let r = a.chat(Some("sk-b"), json!({"mode": "status"})).await;
    assert_eq!(r.status, 429);
    let s: serde_json::Value = serde_json::from_str(r.json()["error"]["message"].as_str().unwrap()).unwrap();
    assert_eq!(s["key_remaining"], 2, "5 - 3 across both gateways: {s}");
    assert_eq!(s["global_remaining"], 47);
    assert_eq!(s["concurrent_count"], 1);
    // The script's denial was given back.
    for _ in 0..3 {
        assert_eq!(b.chat(Some("sk-b"), json!({})).await.status, 200);
    }
    assert_eq!(a.chat(Some("sk-b"), json!({})).await.status, 429);
    assert_eq!(a.chat(Some("sk-nope"), json!({})).await.status, 401);
    // may_override: [unknown] lets the script's allow admit an unknown key.
    assert_eq!(a.chat(Some("sk-nope"), json!({"mode": "allow"})).await.status, 200);

    // Redis goes away: deny (default) answers 503, allow lets requests in.
    drop(redis);
    let r = a.chat(Some("sk-a"), json!({})).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "state_unavailable");
    let open = TestGateway::start(&yaml.replace(
        "prefix: \"scripts:\", mode: exact}",
        "prefix: \"scripts:\", mode: exact, on_error: allow, timeout_ms: 100}",
    ))
    .await;
    assert_eq!(open.chat(Some("sk-b"), json!({})).await.status, 200);
    assert!(open.metric("llmproxy_state_errors_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_keys_are_throttled_with_the_redis_backend_too() {
    let Some(redis) = Redis::start("throttle") else { return };
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&config(
        &m.url(),
        &redis.url(),
        "throttle",
        "gateway: {auth_throttle: {max_failures: 2, window_s: 60}}\n",
    ))
    .await;
    for _ in 0..2 {
        assert_eq!(gw.chat(Some("sk-guess"), json!({})).await.status, 401);
    }
    let r = gw.chat(Some("sk-b"), json!({})).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "too_many_auth_failures");
    assert!(r.header("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_is_skipped_until_it_comes_back() {
    let Some(mut redis) = Redis::start("breaker") else {
        return;
    };
    let m = mock("m", |_| {}).await;
    let yaml = exact(&m.url(), &redis.url(), "brk", "limits: {key_rpm: 1000}\n");
    let gw = TestGateway::start(&yaml).await;
    assert_eq!(gw.chat(Some("sk-b"), json!({})).await.status, 200);
    redis.stop();
    // state.on_error is deny: 503 state_unavailable, first after failed
    // calls (5 in a row open the circuit), then without calling Redis.
    for _ in 0..8 {
        let r = gw.chat(Some("sk-b"), json!({})).await;
        assert_eq!(
            (r.status, r.json()["error"]["code"].clone()),
            (503, json!("state_unavailable"))
        );
    }
    assert!(gw.metric("llmproxy_state_errors_total").await >= 5.0);
    let skipped = gw.metric("llmproxy_state_skipped_total").await;
    assert!(skipped >= 3.0, "skipped {skipped}");
    // While it is open, no request calls Redis: each is a skipped call.
    for _ in 0..5 {
        assert_eq!(gw.chat(Some("sk-b"), json!({})).await.status, 503);
    }
    assert_eq!(gw.metric("llmproxy_state_skipped_total").await, skipped + 5.0);
    // Back, and no restart: a probe after the open period closes it.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.chat(Some("sk-b"), json!({})).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {} after Redis came back", r.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_are_charged_to_the_bucket_in_redis() {
    let Some(redis) = Redis::start("tpm") else { return };
    let m = mock("m", |_| {}).await;
    let yaml = config(&m.url(), &redis.url(), "tpm", "limits: {key_tpm: 10}\n");
    let gw = TestGateway::start(&yaml).await;
    // The mock's answer uses 1 prompt + 8 completion tokens: 10 -> 1 left,
    // then 1 -> -8 (debt), then refused until it refills.
    assert_eq!(gw.chat(Some("sk-b"), json!({"messages": []})).await.status, 200);
    wait_redis_charge(&redis, "tpm", "sk-b", 9).await;
    assert_eq!(gw.chat(Some("sk-b"), json!({"messages": []})).await.status, 200);
    wait_redis_charge(&redis, "tpm", "sk-b", 18).await;
    let r = gw.chat(Some("sk-b"), json!({"messages": []})).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (429, json!("key_token_limit"))
    );
    // The bucket, as the core's rule keeps it: in debt, for this limit.
    let client =
        llmproxy_server::gateway::redis_conn::RedisClient::new(&redis.url(), 1, Duration::from_secs(1)).unwrap();
    let key = format!("tpm:k:{}:tpm", llmproxy_core::keys::key_fingerprint("sk-b"));
    let t = client.cmd(&[b"HGET", key.as_bytes(), b"t"]).await.unwrap();
    let tokens: f64 = t.as_text().and_then(|s| s.parse().ok()).expect("tokens");
    assert!((-8.5..-7.0).contains(&tokens), "tokens {tokens}");
    let c = client.cmd(&[b"HGET", key.as_bytes(), b"c"]).await.unwrap();
    assert_eq!(c.as_i64(), Some(10));
}
