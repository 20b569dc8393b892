//! The seed suite in the gateway: the seed design's unified config
//! (`examples/seed/config.yaml`) with each of its example scripts
//! unchanged (`examples/scripts/`), its keys (`examples/seed/keys.yaml`),
//! real mock backends, real sockets; every outcome the seed documents is
//! asserted, and the auth example (which ends with `return {allow = true}`)
//! cannot let a disabled or expired key in (docs/adr/040). The same suite
//! runs in nginx: `t/015-seed-suite.t`.

mod common;

use std::path::PathBuf;

use chrono::Timelike;
use common::*;
use llmproxy_core::hooks::{AuthInput, KeyInfo, RateLimitInput, RateLimitStatus, RequestInfo, StandardChecks};
use llmproxy_core::{Config, Engine};
use serde_json::json;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A fixed offset where it is 12:00 now: a peak hour for the seed's rule.
fn noon_zone() -> String {
    let offset = (12 - chrono::Utc::now().hour() as i32 + 24) % 24;
    let offset = if offset > 12 { offset - 24 } else { offset };
    format!("{}{:02}:00", if offset < 0 { "-" } else { "+" }, offset.abs())
}

/// The seed config as shipped, with the backends on `urls` (the seed's
/// `standard`, `high-performance`, `ultra`) and, when given, `time_zone`.
fn seed_config(urls: &[String], time_zone: Option<String>) -> Config {
    let mut config = Config::from_file(repo("examples/seed/config.yaml")).expect("examples/seed/config.yaml");
    assert_eq!(config.backends.len(), urls.len());
    for (b, url) in config.backends.iter_mut().zip(urls) {
        b.url = url.clone();
    }
    if let Some(tz) = time_zone {
        config.limits.time_zone = tz;
    }
    config
}

async fn mocks() -> (Vec<llmproxy_server::mock::MockServer>, Vec<String>) {
    let mut m = Vec::new();
    for name in ["standard", "high-performance", "ultra"] {
        m.push(mock(name, |_| {}).await);
    }
    let urls = m.iter().map(|m| m.url()).collect();
    (m, urls)
}

fn message(r: &Reply) -> String {
    r.json()["error"]["message"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_seed_script_gives_its_documented_outcome() {
    let (_m, urls) = mocks().await;
    // Off-peak for the rate_limit example: the zone where it is 03:00.
    let now = chrono::Utc::now().hour() as i32;
    let off = (3 - now + 24) % 24;
    let off = if off > 12 { off - 24 } else { off };
    let tz = format!("{}{:02}:00", if off < 0 { "-" } else { "+" }, off.abs());
    let gw = TestGateway::start_config(seed_config(&urls, Some(tz))).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let body = |model: &str, vip: Option<u64>| {
        let mut b = json!({"model": model, "messages": [{"role": "user", "content": "你好"}]});
        if let Some(v) = vip {
            b["viplevel"] = json!(v);
        }
        b
    };

    // (key, model, viplevel, status, backend, billable discount)
    let admitted = [
        ("sk-seed-vip", "gpt-4", Some(3), "ultra", 0.5),
        ("sk-seed-basic", "gpt-3.5", Some(1), "high-performance", 0.8),
        ("sk-seed-basic", "gpt-3.5", None, "standard", 1.0),
        ("sk-seed-unlimited", "gpt-4", Some(0), "standard", 1.0),
    ];
    for (key, model, vip, backend, discount) in admitted {
        let r = post(&url, &body(model, vip), &hdrs(&[bearer(key)])).await;
        assert_eq!(r.status, 200, "{key} {model}: {}", String::from_utf8_lossy(&r.body));
        // routing: viplevel >= 3 ultra, >= 1 high-performance, else standard.
        assert_eq!(r.backend(), Some(backend), "{key} viplevel {vip:?}");
        // request_transform: the model mapped on the way up, headers added.
        let upstream = match model {
            "gpt-4" => "llama-3-70b-instruct",
            _ => "qwen-72b-chat",
        };
        assert_eq!(r.header("x-echo-x-original-model"), Some(model));
        // response_transform: mapped back for the client.
        assert_eq!(r.json()["model"], model, "{key}: the client sees its own model name");
        let id = r.header("x-request-id").unwrap().to_owned();
        // usage: the VIP discount.
        let e = gw.usage.wait_for(&id).await;
        assert_eq!(e.record()["discount"], discount, "{key}: {}", e.record_json);
        let total = e.record()["total_tokens"].as_f64().unwrap();
        assert_eq!(e.billable_tokens, (total * discount).floor() as u64);
        assert_eq!(e.model.as_deref(), Some(model), "upstream got {upstream}");
    }

    // auth: the seed's own denial, and the standard denials its
    // `return {allow = true}` cannot overrule.
    // The key is a known one, so the seed's error_handler shapes the
    // denial: auth_error is not in its table, hence its "未知错误".
    let r = post(&url, &body("gpt-4", Some(0)), &hdrs(&[bearer("sk-seed-basic")])).await;
    assert_eq!(r.status, 403);
    assert_eq!(message(&r), "未知错误");
    assert_eq!(r.json()["error"]["type"], "auth_error");
    // (key, status, code)
    let refused = [
        ("sk-seed-disabled", 403, "key_disabled"),
        ("sk-seed-expired", 403, "key_expired"),
        ("sk-seed-nope", 401, "invalid_api_key"),
    ];
    for (key, status, code) in refused {
        let r = post(&url, &body("gpt-3.5", Some(3)), &hdrs(&[bearer(key)])).await;
        assert_eq!(r.status, status, "{key}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["error"]["code"], code, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peak_hour_rule_and_the_error_handler_shape_a_429() {
    let (_m, urls) = mocks().await;
    let gw = TestGateway::start_config(seed_config(&urls, Some(noon_zone()))).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let chat = json!({"model": "gpt-3.5", "messages": [{"role": "user", "content": "你好"}]});
    // key_rpm 12: after 3 requests 9 are left (< 10): the seed's rule
    // refuses ordinary keys at peak hours; error_handler then gives its
    // message for type rate_limit.
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(post(&url, &chat, &hdrs(&[bearer("sk-seed-basic")])).await);
    }
    let statuses: Vec<u16> = codes.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 429, 429], "key_remaining 11, 10, 9, ...");
    let v = codes[2].json();
    assert_eq!(v["error"]["message"], "请求过于频繁", "{v}");
    assert_eq!(v["error"]["type"], "rate_limit");
    assert!(v["error"]["request_id"].is_string(), "{v}");
    assert!(codes[2].header("retry-after").is_some());
    // VIP and unlimited keys are not throttled by the rule.
    for key in ["sk-seed-vip", "sk-seed-unlimited"] {
        for _ in 0..4 {
            assert_eq!(post(&url, &chat, &hdrs(&[bearer(key)])).await.status, 200, "{key}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failure_gets_the_seed_error_message() {
    // Every backend down (a refused connection is retried on another).
    let urls: Vec<String> = (0..3).map(|_| refused_url()).collect();
    let gw = TestGateway::start_config(seed_config(&urls, None)).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let chat = json!({"model": "gpt-3.5", "messages": [{"role": "user", "content": "你好"}]});
    let r = post(&url, &chat, &hdrs(&[bearer("sk-seed-basic")])).await;
    assert!(r.status >= 500, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["error"]["message"], "后端服务异常", "{v}");
    assert_eq!(v["error"]["type"], "backend_error");
}

/// docs/gateway.md, ADR 030 and examples/configs/accounts.yaml guard an
/// unknown key with `key_info == nil`: their scripts run without failing
/// when the key is unknown (issue 14, point 6).
#[test]
fn the_documented_unknown_key_guard_does_not_fail() {
    let engine = Engine::new(Config::from_file(repo("examples/configs/accounts.yaml")).unwrap()).unwrap();
    let request = RequestInfo::from_json(
        &json!({"id": "r1", "body": {"model": "gpt-4"}}),
        llmproxy_core::convert::Limits::default(),
    )
    .unwrap();
    let none = StandardChecks {
        key_valid: false,
        status_active: false,
        not_expired: false,
        ip_allowed: false,
        quota_available: false,
    };
    let auth = engine.auth(&AuthInput {
        request: &request,
        key_info: KeyInfo::none(),
        standard_checks: none,
    });
    assert!(auth.is_ok(), "{auth:?}");
    let status = RateLimitStatus {
        global_remaining: 5,
        key_remaining: 5,
        concurrent_count: 1,
    };
    for hour in [3, 12] {
        let r = engine.rate_limit(&RateLimitInput {
            request: &request,
            key_info: KeyInfo::none(),
            rate_limit_status: status,
            current_time: llmproxy_core::hooks::CurrentTime {
                hour,
                weekday: 3,
                timestamp: 0,
            },
        });
        assert!(r.is_ok(), "hour {hour}: {r:?}");
    }
}
