//! A fleet of gateways on one Redis in the default `batched` mode
//! (docs/adr/051): each node admits from its own view and settles with
//! Redis every few milliseconds. The tests check the documented bound on
//! how far a fleet can overshoot a limit, that every admitted request is
//! counted exactly once (also across a Redis outage and a shutdown), and
//! the outage policy (`on_error: fail_open` / `fail_closed`).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use llmproxy_server::gateway::redis_conn::RedisClient;
use serde_json::json;

fn config(mock: &str, redis: &str, prefix: &str, state: &str, limits: &str) -> String {
    format!(
        "backends:\n{}keys:\n  - {{key: sk-f, user_id: uf}}\n\
         state: {{backend: redis, url: \"{redis}\", prefix: \"{prefix}:\"{state}}}\nlimits: {limits}\n",
        backend("m", mock)
    )
}

/// The key's quota usage in Redis (what the fleet has settled).
async fn redis_used(redis: &Redis, prefix: &str) -> i64 {
    let client = RedisClient::new(&redis.url(), 1, Duration::from_secs(1)).unwrap();
    let q = format!("{prefix}:q:{}", llmproxy_core::keys::key_fingerprint("sk-f"));
    client
        .cmd(&[b"HGET", q.as_bytes(), b"used"])
        .await
        .ok()
        .and_then(|r| r.as_i64())
        .unwrap_or(0)
}

/// Wait until Redis shows `want` tokens used by the key.
async fn wait_used(redis: &Redis, prefix: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = 0;
    while Instant::now() < deadline {
        got = redis_used(redis, prefix).await;
        if got == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("redis has {got} tokens used, expected {want}");
}

/// Send chats with `sk-f` from `conns` tasks, spread over `bases`, until
/// `stop`; count answers by status.
fn load(bases: Vec<String>, conns: usize, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    (0..conns)
        .map(|i| {
            let bases = bases.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                let mut j = i;
                while !stop.load(Ordering::Relaxed) {
                    let base = &bases[j % bases.len()];
                    j += 1;
                    let r = post(
                        &format!("{base}/v1/chat/completions"),
                        &chat("gpt-4", json!({})),
                        &[("authorization", "Bearer sk-f")],
                    )
                    .await;
                    statuses.push(r.status);
                }
                statuses
            })
        })
        .collect()
}

async fn statuses(tasks: Vec<tokio::task::JoinHandle<Vec<u16>>>) -> Vec<u16> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// The billable tokens of one chat answered by the mock (its usage's
/// `total_tokens`).
const CHAT_TOKENS: i64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The figure as it is stated: three gateways, one Redis, a
/// per-key limit of N per minute, load for one whole minute.
async fn three_gateways_admit_a_shared_limit_within_the_documented_bound() {
    let Some(redis) = Redis::start("fleet-bound") else {
        return;
    };
    let m = mock("m", |_| {}).await;
    // 600 per minute: each node may admit 1% (6) unseen by the others.
    let yaml = config(&m.url(), &redis.url(), "bound", "", "{key_rpm: 600}");
    let gws = [
        TestGateway::start(&yaml).await,
        TestGateway::start(&yaml).await,
        TestGateway::start(&yaml).await,
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks = load(gws.iter().map(|g| g.base.clone()).collect(), 12, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    let all = statuses(tasks).await;
    let secs = started.elapsed().as_secs_f64();
    let ok = all.iter().filter(|s| **s == 200).count() as f64;
    let limited = all.iter().filter(|s| **s == 429).count();
    assert_eq!(ok as usize + limited, all.len(), "only 200 and 429");
    // One exact counter admits the bucket (600) plus its refill (600 in a
    // minute); the fleet may add nodes x room = 3 x 6. It must not admit
    // much less either: at most that, and a second of refill, below.
    let exact = 600.0 + (secs * 600.0 / 60.0).ceil();
    assert!(
        ok >= exact - 18.0 - 10.0 && ok <= exact + 18.0,
        "{ok} admitted in {secs:.2}s; one counter: {exact}, bound: {}",
        exact + 18.0
    );
    assert!(limited > 0, "the limit refused");
    eprintln!(
        "fleet bound: {ok} admitted of {} in {secs:.2}s; one counter {exact}, bound {}",
        all.len(),
        exact + 18.0
    );
    // Every admitted request reached the shared quota count once.
    wait_used(&redis, "bound", ok as i64 * CHAT_TOKENS).await;
    let mut settled = 0.0;
    for g in &gws {
        settled += g.metric("llmproxy_state_settlements_total{result=\"ok\"}").await;
    }
    assert!(settled >= 3.0, "settlements {settled}");
    let problems = llmproxy_core::policy::metrics::check_exposition(&gws[0].metrics().await);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fail_open_a_redis_outage_fails_no_request_and_settles_once_after() {
    let Some(mut redis) = Redis::start_persistent("fleet-open") else {
        return;
    };
    let m = mock("m", |_| {}).await;
    // A small room (batch 20), so the nodes run out of it during the
    // outage and admit on their own limits (what this test is about).
    let yaml = config(
        &m.url(),
        &redis.url(),
        "open",
        ", on_error: fail_open, timeout_ms: 100, batch: 20",
        "{key_rpm: 1000000}",
    );
    let a = TestGateway::start(&yaml).await;
    let b = TestGateway::start(&yaml).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(vec![a.base.clone(), b.base.clone()], 8, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let all = statuses(tasks).await;
    let failed: Vec<_> = all.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        all.len(),
        &failed[..failed.len().min(10)]
    );
    // The nodes admitted on their own limits while Redis was down...
    let mut open = 0.0;
    let mut failed_rounds = 0.0;
    for g in [&a, &b] {
        open += g.metric("llmproxy_state_fail_open_total").await;
        failed_rounds += g.metric("llmproxy_state_settlements_total{result=\"failed\"}").await;
    }
    assert!(
        open > 0.0 && failed_rounds > 0.0,
        "fail_open {open}, failed rounds {failed_rounds}"
    );
    // ...and every request is in the shared count exactly once: what was
    // settled before the outage, what a lost answer made them send again,
    // what waited out the outage.
    wait_used(&redis, "open", all.len() as i64 * CHAT_TOKENS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fail_closed_an_outage_answers_503_and_service_comes_back_without_a_restart() {
    let Some(mut redis) = Redis::start_persistent("fleet-closed") else {
        return;
    };
    let m = mock("m", |_| {}).await;
    let yaml = config(
        &m.url(),
        &redis.url(),
        "closed",
        ", on_error: fail_closed, timeout_ms: 100",
        "{key_rpm: 1000000}",
    );
    let gw = TestGateway::start(&yaml).await;
    assert_eq!(gw.chat(Some("sk-f"), json!({})).await.status, 200);
    redis.stop();
    // Within a few rounds every request is a 503 state_unavailable.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut in_a_row = 0;
    while in_a_row < 5 {
        assert!(Instant::now() < deadline, "still admitting with Redis down");
        let r = gw.chat(Some("sk-f"), json!({})).await;
        match r.status {
            503 => {
                assert_eq!(r.json()["error"]["code"], "state_unavailable");
                in_a_row += 1;
            }
            200 => in_a_row = 0,
            s => panic!("status {s}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.chat(Some("sk-f"), json!({})).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {} after Redis came back", r.status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_settles_what_the_node_counted_since_the_last_round() {
    let Some(redis) = Redis::start("fleet-drain") else {
        return;
    };
    let m = mock("m", |_| {}).await;
    // A long interval: nothing settles on its own during the test.
    let yaml = config(
        &m.url(),
        &redis.url(),
        "drain",
        ", settle_ms: 1000",
        "{key_rpm: 1000000}",
    );
    let gw = TestGateway::start(&yaml).await;
    for _ in 0..20 {
        assert_eq!(gw.chat(Some("sk-f"), json!({})).await.status, 200);
    }
    gw.wait_records(20).await;
    // The first request settled (a key the node had not seen); the rest
    // wait for the next round, a second away.
    assert!(redis_used(&redis, "drain").await < 20 * CHAT_TOKENS);
    gw.gateway.shutdown(Duration::from_secs(2)).await;
    assert_eq!(redis_used(&redis, "drain").await, 20 * CHAT_TOKENS);
}
