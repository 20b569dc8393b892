//! The real `llmproxy serve` process: no usage record is lost on SIGTERM,
//! kill -9 loses at most the last 250 ms, reloads under load fail no
//! request, and `llmproxy keys` edits reach a running gateway.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Send one request and read the whole body: (status, body).
async fn call(
    c: &HttpClient,
    url: &str,
    key: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> Result<(u16, Bytes), String> {
    let mut b = hyper::Request::post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let resp = c
        .request(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

fn ledger(db: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(db).unwrap()
}

fn count(c: &rusqlite::Connection, sql: &str) -> i64 {
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_loses_no_usage_record() {
    const N: u64 = 10_000;
    let m = mock("m", |o| o.chunks = 3).await;
    let dir = tempdir("noloss");
    let db = dir.join("usage.db");
    let usage = conformance_script("050-seed-usage-viplevel-3.json");
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "backends:\n{}gateway: {{retry: {{max_retries: 0}}}}\n\
             keys:\n  - {{key: sk-1, user_id: u1, used_quota: 7}}\n  - {{key: sk-2, user_id: u2}}\n\
             ledger: {{path: usage.db}}\nscripts:\n  usage:\n    script: |\n{}",
            backend("m", &m.url()),
            script(&usage)
        ),
    )
    .unwrap();
    let mut gw = Serve::start(&config, dir.join("serve.log")).await;
    let next = Arc::new(AtomicU64::new(0));
    let failed_upstream = Arc::new(AtomicU64::new(0));
    let streams = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let (next, failed, streams, url) = (next.clone(), failed_upstream.clone(), streams.clone(), gw.url());
        tasks.push(tokio::spawn(async move {
            let c = http();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= N {
                    break;
                }
                let key = if i % 2 == 0 { "sk-1" } else { "sk-2" };
                let stream = i % 4 == 1;
                let fail = i % 10 == 3;
                let body = chat("gpt-4", json!({"stream": stream, "viplevel": i % 4}));
                let extra: &[(&str, &str)] = if fail { &[("x-mock-status", "500")] } else { &[] };
                let (status, _) = call(&c, &url, key, &body, extra).await.expect("request");
                assert_eq!(status, if fail { 500 } else { 200 }, "request {i}");
                if fail {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                if stream && !fail {
                    streams.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    // Every response is in; the last usage records are still in flight.
    gw.signal("-TERM");
    let status = gw.wait_exit().await;
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(&gw.log).unwrap()
    );
    let c = ledger(&db);
    assert_eq!(
        count(&c, "SELECT COUNT(*) FROM usage") as u64,
        N,
        "exactly one record per request"
    );
    assert_eq!(
        count(&c, "SELECT COUNT(DISTINCT request_id) FROM usage") as u64,
        N,
        "no duplicates"
    );
    assert_eq!(
        count(&c, "SELECT COUNT(*) FROM usage WHERE status = 500") as u64,
        failed_upstream.load(Ordering::Relaxed)
    );
    assert_eq!(
        count(&c, "SELECT COUNT(*) FROM usage WHERE is_stream = 1 AND status = 200") as u64,
        streams.load(Ordering::Relaxed)
    );
    // The quotas are the sums of what the ledger charged.
    for (key, start) in [("sk-1", 7), ("sk-2", 0)] {
        let fp = llmproxy_core::keys::key_fingerprint(key);
        let charged: i64 = c
            .query_row("SELECT SUM(billable_tokens) FROM usage WHERE key_fp = ?1", [&fp], |r| {
                r.get(0)
            })
            .unwrap();
        let used: i64 = c
            .query_row("SELECT used FROM key_usage WHERE key_fp = ?1", [&fp], |r| r.get(0))
            .unwrap();
        assert!(charged > 0);
        assert_eq!(used, start + charged, "{key}");
    }
    // The seed usage script's discount is what was charged.
    let vip3: i64 = count(
        &c,
        "SELECT COUNT(*) FROM usage WHERE status = 200 AND json_extract(record, '$.discount') = 0.5 \
         AND billable_tokens = total_tokens / 2",
    );
    assert!(vip3 > 1000, "{vip3}");
    eprintln!("{N} requests in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_at_most_the_last_250_ms() {
    let m = mock("m", |o| o.chunks = 2).await;
    let dir = tempdir("kill9");
    let db = dir.join("usage.db");
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "backends:\n{}keys:\n  - {{key: sk-1, user_id: u1}}\nledger: {{path: usage.db, flush_ms: 100}}\n",
            backend("m", &m.url())
        ),
    )
    .unwrap();
    let mut gw = Serve::start(&config, dir.join("serve.log")).await;
    let (done, killed_at) = kill_9_under_load(&mut gw, "sk-1", Duration::from_millis(1500)).await;
    let before = done
        .iter()
        .filter(|t| **t + Duration::from_millis(250) <= killed_at)
        .count() as i64;
    let rows = count(&ledger(&db), "SELECT COUNT(*) FROM usage");
    assert!(before > 100, "{before} requests before the kill");
    assert!(
        rows >= before && rows <= done.len() as i64,
        "{rows} records; {before} requests completed more than 250 ms before kill -9, {} in all",
        done.len()
    );
}

fn reload_config(dir: &Path, backends: &str, target: &str, broken: bool, poll: bool) {
    let routing = if broken {
        String::from("return (\n")
    } else {
        format!("return \"{target}\"\n")
    };
    std::fs::write(dir.join("routing.lua"), routing).unwrap();
    let text = format!(
        "backends:\n{backends}keys_file: keys.yaml\nledger: {{path: usage.db}}\nlimits: {{key_concurrency: 64}}\nadmin: {{token: \"adm-{target}\"}}\n\
         reload: {{watch: {poll}, poll_ms: 200}}\nscripts:\n  routing:\n    script_file: routing.lua\n"
    );
    std::fs::write(dir.join("gateway.yaml"), text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request() {
    let a = mock("a", |o| {
        o.chunks = 5;
        o.chunk_delay_ms = 20;
    })
    .await;
    let b = mock("b", |o| {
        o.chunks = 5;
        o.chunk_delay_ms = 20;
    })
    .await;
    let dir = tempdir("reload");
    std::fs::write(dir.join("keys.yaml"), "- {key: sk-1, user_id: u1}\n").unwrap();
    let backends = format!("{}{}", backend("a", &a.url()), backend("b", &b.url()));
    reload_config(&dir, &backends, "a", false, false);
    let gw = Serve::start(&dir.join("gateway.yaml"), dir.join("serve.log")).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::new())));
    let mut tasks = Vec::new();
    for w in 0..6 {
        let (stop, ok, bad, url) = (stop.clone(), ok.clone(), bad.clone(), gw.url());
        tasks.push(tokio::spawn(async move {
            let c = http();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let stream = (w + i).is_multiple_of(3);
                match call(&c, &url, "sk-1", &chat("gpt-4", json!({"stream": stream})), &[]).await {
                    Ok((200, body)) if !stream || String::from_utf8_lossy(&body).contains("[DONE]") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => bad.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }));
    }
    let admin = format!("http://127.0.0.1:{}/admin/reload", gw.admin_port);
    let c = http();
    let mut token = String::from("adm-a");
    let mut applied = 0;
    for round in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let broken = round % 2 == 1;
        let target = if round % 4 == 0 { "b" } else { "a" };
        reload_config(&dir, &backends, target, broken, false);
        if round % 5 == 4 {
            gw.signal("-HUP");
            tokio::time::sleep(Duration::from_millis(300)).await;
        } else {
            let req = hyper::Request::post(&admin)
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = c.request(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: Value = serde_json::from_slice(&body).unwrap();
            if broken {
                assert_eq!(status, 422, "{v}");
                assert!(v["problems"][0].as_str().unwrap().contains("routing.lua"), "{v}");
            } else {
                assert_eq!(status, 200, "{v}");
                assert_eq!(v["status"], "reloaded");
            }
        }
        if !broken {
            applied += 1;
            token = format!("adm-{target}");
            // The new script decides the next requests.
            let r = post(
                &gw.url(),
                &chat("gpt-4", json!({})),
                &[("authorization", "Bearer sk-1")],
            )
            .await;
            assert_eq!(r.status, 200);
            assert_eq!(r.backend(), Some(target), "round {round}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "{} failed requests: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "{} requests",
        ok.load(Ordering::Relaxed)
    );
    let text = String::from_utf8(
        get(&format!("http://127.0.0.1:{}/metrics", gw.admin_port))
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .map_or(-1.0, |v| v.trim().parse().unwrap())
    };
    assert_eq!(sample("llmproxy_reloads_total{result=\"ok\"}"), f64::from(applied));
    assert_eq!(sample("llmproxy_reloads_total{result=\"failed\"}"), 10.0);
    assert_eq!(sample("llmproxy_config_generation"), f64::from(applied + 1));
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(log.contains("configuration rejected"), "{log}");
}

/// Run `llmproxy keys ARGS --config CONFIG` as an operator would, asserting
/// success; its standard output.
fn keys_cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .arg("keys")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_edits_reach_a_running_gateway() {
    let m = mock("m", |_| {}).await;
    let dir = tempdir("keyscli");
    std::fs::write(dir.join("keys.yaml"), "# keys\n- {key: sk-1, user_id: u1}\n").unwrap();
    reload_config(&dir, &backend("a", &m.url()), "a", false, true);
    let config = dir.join("gateway.yaml");
    let gw = Serve::start(&config, dir.join("serve.log")).await;
    let c = http();
    let cli = |args: &[&str]| keys_cli(&config, args);
    let status = |key: String| {
        let (c, url) = (c.clone(), gw.url());
        async move { call(&c, &url, &key, &chat("gpt-4", json!({})), &[]).await.unwrap().0 }
    };
    let eventually = |key: &str, want: u16| {
        let key = key.to_owned();
        async move {
            let mut last = 0;
            for _ in 0..60 {
                last = status(key.clone()).await;
                if last == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{key}: {last}, expected {want}");
        }
    };
    let new_key = cli(&["add", "--user", "u2", "--name", "second", "--total-quota", "15"])
        .trim()
        .to_owned();
    assert!(new_key.starts_with("sk-") && new_key.len() > 20, "{new_key}");
    // The file keeps the key's SHA-256 only; the old clear record stays.
    let file = std::fs::read_to_string(dir.join("keys.yaml")).unwrap();
    assert!(!file.contains(&new_key), "{file}");
    assert!(
        file.contains(&llmproxy_core::keys::key_sha256_hex(&new_key)) && file.contains("key: sk-1"),
        "{file}"
    );
    eventually(&new_key, 200).await;
    cli(&["disable", "sk-1"]);
    eventually("sk-1", 403).await;
    cli(&["enable", &llmproxy_core::keys::key_fingerprint("sk-1")]);
    eventually("sk-1", 200).await;
    // The new key used 10 of 15; lowering its quota to 10 exhausts it.
    cli(&["set-quota", &new_key, "--total", "10"]);
    eventually(&new_key, 429).await;
    let list: Value = serde_json::from_str(&cli(&["list", "--format", "json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[1]["user_id"], "u2");
    assert_eq!(list[1]["total_quota"], 10);
    assert!(!list.to_string().contains(&new_key), "keys are masked");
    let table = cli(&["list"]);
    assert!(table.contains("FINGERPRINT") && table.contains("u2"), "{table}");
    // --used resets the count: the key works again.
    cli(&["set-quota", &new_key, "--used", "0"]);
    eventually(&new_key, 200).await;
}

/// Issue 14, point 7: `keys set-quota --used N` right after traffic (the
/// records of the last requests still queued for the ledger, their usage
/// jobs still running: a slow usage script) resets the count to N, in the
/// store and in what the gateway enforces; five times in a row. Both state
/// backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_quota_used_right_after_traffic_resets_the_count() {
    reset_right_after_traffic("resetrace-local", "").await;
}

/// ... with `state: {backend: redis}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_quota_used_right_after_traffic_resets_the_count_in_redis() {
    let Some(redis) = Redis::start("resetrace") else {
        return;
    };
    let state = format!("state: {{backend: redis, url: \"{}\", prefix: \"rr:\"}}\n", redis.url());
    reset_right_after_traffic("resetrace-redis", &state).await;
}

/// A usage script that keeps its hook thread busy for 250 ms of CPU: the
/// charge of a request lands well after its answer.
const SLOW_USAGE: &str = "local t = os.clock()\nwhile os.clock() - t < 0.25 do end\nreturn nil\n";

async fn reset_right_after_traffic(name: &str, state: &str) {
    let m = mock("m", |_| {}).await;
    let dir = tempdir(name);
    std::fs::write(
        dir.join("keys.yaml"),
        "- {key: sk-reset, user_id: u1, total_quota: 100, used_quota: 60}\n",
    )
    .unwrap();
    std::fs::write(dir.join("usage.lua"), SLOW_USAGE).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "backends:\n{}keys_file: keys.yaml\nledger: {{path: usage.db, flush_ms: 100}}\n{state}\
             reload: {{watch: true, poll_ms: 100}}\n\
             scripts:\n  usage: {{script_file: usage.lua, timeout_ms: 5000}}\n",
            backend("m", &m.url())
        ),
    )
    .unwrap();
    let gw = Serve::start(&config, dir.join("serve.log")).await;
    let c = http();
    let cli = |args: &[&str]| keys_cli(&config, args);
    let generation = || {
        let url = format!("http://127.0.0.1:{}/metrics", gw.admin_port);
        async move {
            let text = String::from_utf8(get(&url).await.body.to_vec()).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("llmproxy_config_generation "))
                .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
        }
    };
    let first = generation().await;
    for round in 1..=5u64 {
        // The gateway's count is 60 + round - 1 (each request costs 10 of
        // 100): three requests fit only if the last reset was applied.
        for i in 0..3 {
            let (status, body) = call(&c, &gw.url(), "sk-reset", &chat("gpt-4", json!({})), &[])
                .await
                .unwrap();
            assert_eq!(
                status,
                200,
                "round {round}, request {i}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let n = 60 + round;
        cli(&["set-quota", "sk-reset", "--used", &n.to_string()]);
        let want = first + round as f64;
        for _ in 0..200 {
            if generation().await >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(generation().await >= want, "round {round}: the reset was not reloaded");
        // Past any ledger flush still under way (flush_ms: 100).
        tokio::time::sleep(Duration::from_millis(400)).await;
        let list: Value = serde_json::from_str(&cli(&["list", "--format", "json"])).unwrap();
        assert_eq!(list[0]["used_quota"], n, "round {round}: the ledger's count");
    }
    // What the gateway enforces is the last reset: from 65, four requests
    // of 10 start below 100 (the last at 95), the fifth finds 105.
    for i in 0..4 {
        let (status, _) = call(&c, &gw.url(), "sk-reset", &chat("gpt-4", json!({})), &[])
            .await
            .unwrap();
        assert_eq!(status, 200, "after the last reset, request {i}");
    }
    // Their charges land after the slow usage script: 105 in the end.
    let mut used = Value::Null;
    for _ in 0..100 {
        let list: Value = serde_json::from_str(&cli(&["list", "--format", "json"])).unwrap();
        used = list[0]["used_quota"].clone();
        if used == 105 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(used, 105, "65 + 4 * 10");
    let (status, _) = call(&c, &gw.url(), "sk-reset", &chat("gpt-4", json!({})), &[])
        .await
        .unwrap();
    assert_eq!(status, 429, "105 of 100 used");
}
