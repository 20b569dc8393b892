//! Keys, auth, rate limits and quotas over real sockets, with the local
//! state backend: every standard check and every script verdict reaches the
//! client as specified (docs/adr/030, 031).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const KEYS: &str = r#"keys:
  - {key: sk-good, user_id: u-good, name: "测试用户", total_quota: 0}
  - {key: sk-off, user_id: u-off, status: disabled}
  - {key: sk-old, user_id: u-old, expires_at: "2020-01-01T00:00:00Z"}
  - {key: sk-far, user_id: u-far, allowed_ips: ["10.0.0.0/8", "2001:db8::/32"]}
  - {key: sk-near, user_id: u-near, allowed_ips: ["127.0.0.0/8"]}
  - {key: sk-spent, user_id: u-spent, total_quota: 100, used_quota: 100}
  - {key: sk-vip, user_id: u-vip, total_quota: 2000000}
  - {key: sk-std, user_id: u-std, total_quota: 100000}
  - {key: sk-free, user_id: u-free, total_quota: unlimited}
"#;

fn yaml(url: &str, rest: &str) -> String {
    format!("backends:\n{}{KEYS}{rest}", backend("m", url))
}

fn err(r: &Reply) -> (u16, String, String) {
    let v = r.json();
    (
        r.status,
        v["error"]["type"].as_str().unwrap_or("").to_owned(),
        v["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_standard_check_reaches_the_client() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&yaml(&m.url(), "")).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let body = chat("gpt-4", json!({}));

    // Missing and unknown keys: 401.
    let r = post(&url, &body, &[]).await;
    assert_eq!(err(&r), (401, "auth_error".into(), "invalid_api_key".into()));
    let r = gw.chat(Some("sk-nope"), json!({})).await;
    assert_eq!(err(&r), (401, "auth_error".into(), "invalid_api_key".into()));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid or missing API key"));

    // A good key, by either header; the key never reaches the backend.
    let r = gw.chat(Some("sk-good"), json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo-authorization"), None);
    let r = post(&url, &body, &[("x-api-key", "sk-good")]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-echo-x-api-key"), None, "the gateway's key is not forwarded");

    // 403s and the quota's 429.
    for (key, want) in [
        ("sk-off", (403, "key_disabled")),
        ("sk-old", (403, "key_expired")),
        ("sk-far", (403, "ip_not_allowed")),
        ("sk-spent", (429, "quota_exhausted")),
    ] {
        let r = gw.chat(Some(key), json!({})).await;
        assert_eq!(err(&r), (want.0, "auth_error".into(), want.1.into()), "{key}");
    }
    assert_eq!(
        gw.chat(Some("sk-near"), json!({})).await.status,
        200,
        "127.0.0.1 is in 127.0.0.0/8"
    );

    // Refused requests are not admitted: no usage records for them.
    gw.wait_records(3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(gw.records(), 3);
    let rec = gw.usage.0.lock().unwrap()[0].clone();
    assert_eq!(rec.user_id.as_deref(), Some("u-good"));
    assert!(rec.key_fingerprint.as_deref().is_some_and(|f| f.starts_with("sha256:")));
    assert!(gw.metric("llmproxy_auth_denied_total{reason=\"invalid_key\"}").await >= 2.0);
    assert_eq!(
        gw.metric("llmproxy_auth_denied_total{reason=\"quota_exhausted\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_denials_skip_error_handler_but_the_quota_goes_through_it() {
    let m = mock("m", |_| {}).await;
    let eh = conformance_script("063-seed-error-handler-auth-error.json");
    let gw = TestGateway::start(&yaml(
        &m.url(),
        &format!("scripts:\n  error_handler:\n    script: |\n{}", script(&eh)),
    ))
    .await;
    // An unidentified caller never makes a script run (docs/gateway.md).
    let r = gw.chat(Some("sk-off"), json!({})).await;
    assert_eq!(err(&r), (403, "auth_error".into(), "key_disabled".into()));
    // A known key out of quota is identified: the handler shapes it.
    let r = gw.chat(Some("sk-spent"), json!({})).await;
    assert_eq!(r.status, 429);
    let v = r.json();
    assert_eq!(v["error"]["type"], "auth_error", "{v}");
    assert!(
        v["error"]["request_id"].as_str().is_some(),
        "the seed handler shaped it: {v}"
    );
}

const AUTH_SCRIPT: &str = r#"local mode = request.body.mode
if mode == "allow" then return {allow = true} end
if mode == "deny" then return {allow = false, reason = "no " .. tostring(request.user_id), status_code = 402} end
if mode == "deny_default" then return {allow = false} end
if mode == "boom" then error("boom") end
if mode == "echo" then
  return {allow = false, reason = json.encode({k = key_info, s = standard_checks, u = request.user_id})}
end
return nil
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_script_verdict_reaches_the_client() {
    let m = mock("m", |_| {}).await;
    for on_error in ["deny", "standard"] {
        let gw = TestGateway::start(&yaml(
            &m.url(),
            &format!(
                "scripts:\n  auth:\n    on_error: {on_error}\n    script: |\n{}",
                script(AUTH_SCRIPT)
            ),
        ))
        .await;
        // An allow does not overrule a failed standard check (no
        // may_override here: docs/adr/040); a deny keeps a good key out.
        assert_eq!(gw.chat(Some("sk-nope"), json!({"mode": "allow"})).await.status, 401);
        assert_eq!(gw.chat(None, json!({"mode": "allow"})).await.status, 401);
        assert_eq!(gw.chat(Some("sk-good"), json!({"mode": "allow"})).await.status, 200);
        let r = gw.chat(Some("sk-good"), json!({"mode": "deny"})).await;
        assert_eq!(err(&r), (402, "auth_error".into(), "denied_by_script".into()));
        assert_eq!(r.json()["error"]["message"], "no u-good");
        assert_eq!(
            gw.chat(Some("sk-good"), json!({"mode": "deny_default"})).await.status,
            403
        );
        // nil: the standard verdict stands.
        assert_eq!(gw.chat(Some("sk-good"), json!({})).await.status, 200);
        assert_eq!(gw.chat(Some("sk-off"), json!({})).await.status, 403);
        assert_eq!(gw.chat(Some("sk-nope"), json!({})).await.status, 401);
        // A failing script: 503 under deny (the default) — unless the
        // standard checks deny too, then their precise status (still closed);
        // the standard verdict under `on_error: standard`.
        let good = gw.chat(Some("sk-good"), json!({"mode": "boom"})).await;
        let bad = gw.chat(Some("sk-nope"), json!({"mode": "boom"})).await;
        if on_error == "deny" {
            assert_eq!(err(&good), (503, "hook_error".into(), "hook_failed".into()));
            assert_eq!(bad.status, 401);
        } else {
            assert_eq!(good.status, 200);
            assert_eq!(bad.status, 401);
        }
        // The script sees key_info (seed fields, live usage) and the checks.
        let r = gw.chat(Some("sk-spent"), json!({"mode": "echo"})).await;
        let seen: Value = serde_json::from_str(r.json()["error"]["message"].as_str().unwrap()).unwrap();
        assert_eq!(seen["u"], "u-spent");
        assert_eq!(seen["k"]["user_id"], "u-spent");
        assert_eq!(seen["k"]["key"], "sk-spent");
        assert_eq!(seen["k"]["used_quota"], 100);
        assert_eq!(seen["k"]["status"], "active");
        assert_eq!(
            seen["s"],
            json!({"key_valid": true, "status_active": true, "not_expired": true, "ip_allowed": true, "quota_available": false})
        );
        let r = gw.chat(Some("sk-nope"), json!({"mode": "echo"})).await;
        let seen: Value = serde_json::from_str(r.json()["error"]["message"].as_str().unwrap()).unwrap();
        assert_eq!(
            seen["k"],
            Value::Null,
            "key_info is json.null for an unknown key: {seen}"
        );
        assert_eq!(seen["s"]["key_valid"], false);
    }
}

/// A script's `allow = true` against each failed standard check, without
/// and with `scripts.auth.may_override` (docs/adr/040): the seed's auth
/// example ends with `return {allow = true}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_allow_overrules_a_failed_check_only_where_the_config_opts_in() {
    let m = mock("m", |_| {}).await;
    // (may_override, key, status with `allow = true`)
    let cases: &[(&str, Option<&str>, u16)] = &[
        ("[]", Some("sk-nope"), 401),
        ("[]", None, 401),
        ("[]", Some("sk-off"), 403),
        ("[]", Some("sk-old"), 403),
        ("[]", Some("sk-far"), 403),
        ("[]", Some("sk-spent"), 429),
        ("[]", Some("sk-good"), 200),
        ("[unknown]", Some("sk-nope"), 200),
        ("[unknown]", Some("sk-off"), 403),
        ("[disabled, expired]", Some("sk-off"), 200),
        ("[disabled, expired]", Some("sk-old"), 200),
        ("[disabled, expired]", Some("sk-far"), 403),
        ("[ip_not_allowed, quota_exhausted]", Some("sk-far"), 200),
        ("[ip_not_allowed, quota_exhausted]", Some("sk-spent"), 200),
    ];
    let mut current: Option<(&str, TestGateway)> = None;
    for (may, key, want) in cases {
        if current.as_ref().map(|c| c.0) != Some(*may) {
            let gw = TestGateway::start(&yaml(
                &m.url(),
                &format!("scripts:\n  auth:\n    may_override: {may}\n    script: \"return {{allow = true}}\"\n"),
            ))
            .await;
            current = Some((may, gw));
        }
        let Some((_, gw)) = &current else { unreachable!() };
        let r = gw.chat(*key, json!({})).await;
        assert_eq!(
            r.status,
            *want,
            "may_override {may}, key {key:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // The seed form takes it too; other hooks refuse it.
    let gw = TestGateway::start(&yaml(
        &m.url(),
        "auth:\n  may_override: [disabled]\n  script: \"return {allow = true}\"\n",
    ))
    .await;
    assert_eq!(gw.chat(Some("sk-off"), json!({})).await.status, 200);
    assert_eq!(gw.chat(Some("sk-old"), json!({})).await.status, 403);
    let bad = llmproxy_core::Config::from_yaml(
        "scripts:\n  routing:\n    may_override: [unknown]\n    script: return nil\n",
        std::path::Path::new("."),
    )
    .unwrap_err();
    assert!(
        bad.problems
            .iter()
            .any(|p| p == "scripts.routing.may_override: only the auth hook has may_override"),
        "{bad:?}"
    );
    assert!(llmproxy_core::Config::from_yaml(
        "scripts:\n  auth:\n    may_override: [ip]\n    script: return nil\n",
        std::path::Path::new(".")
    )
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_auth_script_runs_verbatim() {
    let m = mock("m", |_| {}).await;
    let seed = conformance_script("010-seed-auth-gpt4-denied.json");
    let gw = TestGateway::start(&yaml(
        &m.url(),
        &format!("auth:\n  script: |\n{}", script(&seed).replacen("      ", "    ", 0)),
    ))
    .await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let good = bearer("sk-good");
    let std = bearer("sk-std");
    let r = post(&url, &chat("gpt-4", json!({})), &hdrs(std::slice::from_ref(&std))).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["message"], "您的账户等级不支持 GPT-4 模型");
    let r = post(&url, &chat("gpt-3.5", json!({})), &hdrs(&[good])).await;
    assert_eq!(r.status, 200);
    let r = post(&url, &chat("gpt-4", json!({})), &hdrs(&[bearer("sk-vip")])).await;
    assert_eq!(r.status, 200, "total_quota >= 1000000 may use gpt-4");
    // Unlimited keys are the top tier (docs/adr/041): `unlimited`, the old
    // `0`, or no total_quota at all; a 100k key is not.
    for (key, want) in [("sk-free", 200), ("sk-good", 200), ("sk-near", 200), ("sk-std", 403)] {
        let r = post(&url, &chat("gpt-4", json!({})), &hdrs(&[bearer(key)])).await;
        assert_eq!(r.status, want, "{key}: {}", String::from_utf8_lossy(&r.body));
    }
    // The script ends with `return {allow = true}`, and still cannot let a
    // disabled, expired or unknown key in (docs/adr/040).
    for (key, want) in [
        ("sk-off", (403, "key_disabled")),
        ("sk-old", (403, "key_expired")),
        ("sk-nope", (401, "invalid_api_key")),
        ("sk-far", (403, "ip_not_allowed")),
        ("sk-spent", (429, "quota_exhausted")),
    ] {
        let r = post(&url, &chat("gpt-3.5", json!({})), &hdrs(&[bearer(key)])).await;
        assert_eq!(err(&r), (want.0, "auth_error".into(), want.1.into()), "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_and_per_key_request_limits_answer_429_with_retry_after() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&yaml(&m.url(), "limits: {global_rpm: 5, key_rpm: 3}\n")).await;
    for i in 0..3 {
        assert_eq!(gw.chat(Some("sk-good"), json!({})).await.status, 200, "request {i}");
    }
    let r = gw.chat(Some("sk-good"), json!({})).await;
    assert_eq!(err(&r), (429, "rate_limit".into(), "key_rate_limit".into()));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "3 per minute refill one every 20 s: {retry}");
    // Another key has its own bucket, but the global one has 2 left.
    assert_eq!(gw.chat(Some("sk-near"), json!({})).await.status, 200);
    assert_eq!(gw.chat(Some("sk-near"), json!({})).await.status, 200);
    let r = gw.chat(Some("sk-near"), json!({})).await;
    assert_eq!(err(&r), (429, "rate_limit".into(), "global_rate_limit".into()));
    assert!(r.header("retry-after").is_some());
    assert_eq!(gw.metric("llmproxy_rate_limited_total{reason=\"key_rpm\"}").await, 1.0);
    assert_eq!(
        gw.metric("llmproxy_rate_limited_total{reason=\"global_rpm\"}").await,
        1.0
    );
}

const RATE_SCRIPT: &str = r#"local mode = request.body.mode
if mode == "status" then
  return {allow = false, retry_after = 7,
          reason = json.encode({s = rate_limit_status, t = current_time, u = key_info.user_id})}
end
if mode == "deny" then return {allow = false, reason = "not now"} end
if mode == "allow" then return {allow = true} end
if mode == "slow" then
  local t0 = time.now()
  while time.now() - t0 < 0.02 do end
end
return nil
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rate_limit_script_verdict_reaches_the_client() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&yaml(
        &m.url(),
        &format!(
            "limits: {{key_rpm: 2, time_zone: \"+08:00\"}}\nscripts:\n  rate_limit:\n    script: |\n{}",
            script(RATE_SCRIPT)
        ),
    ))
    .await;
    // What the script sees: the counters after this request and the time
    // in +08:00.
    let before = chrono::Utc::now();
    let r = gw.chat(Some("sk-good"), json!({"mode": "status"})).await;
    assert_eq!(err(&r), (429, "rate_limit".into(), "rate_limited_by_script".into()));
    assert_eq!(r.header("retry-after"), Some("7"));
    let seen: Value = serde_json::from_str(r.json()["error"]["message"].as_str().unwrap()).unwrap();
    assert_eq!(seen["u"], "u-good");
    assert_eq!(seen["s"]["key_remaining"], 1);
    assert_eq!(seen["s"]["concurrent_count"], 1);
    assert_eq!(seen["s"]["global_remaining"], i64::from(i32::MAX), "no global limit");
    let local = before.with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap());
    use chrono::{Datelike, Timelike};
    let ts = seen["t"]["timestamp"].as_i64().unwrap();
    assert!((ts - before.timestamp()).abs() <= 2);
    if local.minute() < 59 {
        assert_eq!(seen["t"]["hour"], local.hour());
    }
    assert_eq!(seen["t"]["weekday"], local.weekday().number_from_monday());
    // A script denial gave its tokens back: two requests still pass.
    assert_eq!(gw.chat(Some("sk-good"), json!({})).await.status, 200);
    assert_eq!(gw.chat(Some("sk-good"), json!({})).await.status, 200);
    // nil: the standard verdict (the bucket is empty) stands.
    let r = gw.chat(Some("sk-good"), json!({})).await;
    assert_eq!(err(&r).2, "key_rate_limit");
    // allow overrules the standard limiter.
    assert_eq!(gw.chat(Some("sk-good"), json!({"mode": "allow"})).await.status, 200);
    // deny without retry_after: Retry-After from the standard limiter when
    // it refused too, else one window.
    let r = gw.chat(Some("sk-near"), json!({"mode": "deny"})).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("60"));
    assert_eq!(r.json()["error"]["message"], "not now");
}

/// A rate_limit script past the inline budget runs again on a hook thread
/// (docs/adr/049); the limiter's tokens are taken outside the script's job,
/// so once per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_rate_limit_script_takes_each_token_once() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&yaml(
        &m.url(),
        &format!(
            "limits: {{key_rpm: 2}}\nscripts:\n  rate_limit:\n    timeout_ms: 500\n    script: |\n{}",
            script(RATE_SCRIPT)
        ),
    ))
    .await;
    assert_eq!(gw.chat(Some("sk-good"), json!({"mode": "slow"})).await.status, 200);
    assert_eq!(
        gw.metric("llmproxy_hook_jobs_offloaded_total{reason=\"over_budget\"}")
            .await,
        1.0
    );
    assert_eq!(gw.chat(Some("sk-good"), json!({})).await.status, 200);
    let r = gw.chat(Some("sk-good"), json!({})).await;
    assert_eq!(err(&r).2, "key_rate_limit");
    assert_eq!(gw.metric("llmproxy_hook_calls_total{hook=\"rate_limit\"}").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_rate_limit_script_runs_verbatim() {
    let m = mock("m", |_| {}).await;
    let seed = conformance_script("040-seed-rate-limit-peak-hour-few-requests-left.json");
    // Make every hour a peak hour for the script: pick the zone where it is
    // 12:00 now.
    let now = chrono::Utc::now();
    use chrono::Timelike;
    let offset = (12 - now.hour() as i32 + 24) % 24;
    let offset = if offset > 12 { offset - 24 } else { offset };
    let tz = format!("{}{:02}:00", if offset < 0 { "-" } else { "+" }, offset.abs());
    let gw = TestGateway::start(&yaml(
        &m.url(),
        &format!(
            "limits: {{key_rpm: 12, time_zone: \"{tz}\"}}\nrate_limit:\n  script: |\n{}",
            script(&seed)
        ),
    ))
    .await;
    // 12 per minute: after 3 requests 9 are left (< 10): the seed script
    // refuses ordinary keys at peak hours, but not VIP quotas.
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(gw.chat(Some("sk-std"), json!({})).await.status);
    }
    assert_eq!(codes, [200, 200, 429, 429], "key_remaining 11, 10, 9, ...");
    assert_eq!(gw.chat(Some("sk-vip"), json!({})).await.status, 200);
    // Unlimited keys (the old 0 here) are the top tier too (docs/adr/041).
    let codes: Vec<u16> = {
        let mut c = Vec::new();
        for _ in 0..4 {
            c.push(gw.chat(Some("sk-good"), json!({})).await.status);
        }
        c
    };
    assert_eq!(codes, [200, 200, 200, 200], "an unlimited key is not an ordinary one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_are_charged_after_each_response() {
    let m = mock("m", |_| {}).await;
    let gw = TestGateway::start(&yaml(&m.url(), "limits: {key_tpm: 25}\n")).await;
    // Each chat costs 10 tokens (2 prompt words + 8 completion chunks).
    let mut statuses = Vec::new();
    for i in 0..4 {
        let r = gw.chat(Some("sk-good"), json!({})).await;
        statuses.push(r.status);
        if r.status == 200 {
            gw.wait_records(i + 1).await;
        } else {
            assert_eq!(err(&r).2, "key_token_limit");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429], "25 - 30 < 0 after three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_slots_come_back_after_clients_disconnect() {
    let m = mock("m", |o| {
        o.chunks = 40;
        o.chunk_delay_ms = 50;
    })
    .await;
    let gw = TestGateway::start(&yaml(&m.url(), "limits: {key_concurrency: 2}\n")).await;
    let url = format!("{}/v1/chat/completions", gw.base);
    let stream_body = chat("gpt-4", json!({"stream": true}));
    // Two streams hold both slots; the clients read one chunk and vanish.
    let mut open = Vec::new();
    for _ in 0..2 {
        let u = url.clone();
        let b = stream_body.clone();
        open.push(tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
            let req = hyper::Request::post(u)
                .header("authorization", "Bearer sk-good")
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(b.to_string())))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            use http_body_util::BodyExt;
            let _ = body.frame().await;
            // Hold the stream until aborted.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(body);
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = gw.chat(Some("sk-good"), json!({})).await;
    assert_eq!(err(&r), (429, "rate_limit".into(), "key_concurrency_limit".into()));
    // A non-streamed request whose client gives up also frees its slot.
    for t in open {
        t.abort();
    }
    let mut passed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = gw.chat(Some("sk-good"), json!({"stream": true})).await;
        if r.status == 200 {
            passed = true;
            break;
        }
    }
    assert!(passed, "the slots came back after the clients went away");
    let plain = chat("gpt-4", json!({}));
    let slow_headers = [("authorization", "Bearer sk-good"), ("x-mock-delay-ms", "5000")];
    for _ in 0..2 {
        let slow = post(&url, &plain, &slow_headers);
        let _ = tokio::time::timeout(Duration::from_millis(200), slow).await;
    }
    let mut passed = false;
    for _ in 0..100 {
        let r = gw.chat(Some("sk-good"), json!({})).await;
        if r.status == 200 {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(passed, "slots of abandoned non-streamed requests came back");
    // Every admitted request got exactly one record; abandoned ones say 499.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let recs = gw.usage.0.lock().unwrap().clone();
    assert!(
        recs.iter().filter(|r| r.status == 499).count() >= 4,
        "{:?}",
        recs.iter().map(|r| r.status).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exhausts_at_the_right_request() {
    let m = mock("m", |_| {}).await;
    let usage = conformance_script("050-seed-usage-viplevel-3.json");
    let gw = TestGateway::start(&format!(
        "backends:\n{}keys:\n  - {{key: sk-q, user_id: uq, total_quota: 25}}\n  - {{key: sk-b, user_id: ub, total_quota: 12}}\n\
         scripts:\n  usage:\n    script: |\n{}",
        backend("m", &m.url()),
        script(&usage)
    ))
    .await;
    // Without a discount every chat charges total_tokens = 10: 0, 10, 20 are
    // below 25, 30 is not.
    let mut n = 0;
    let mut codes = Vec::new();
    for _ in 0..4 {
        let r = gw.chat(Some("sk-q"), json!({})).await;
        codes.push(r.status);
        if r.status == 200 {
            n += 1;
            gw.wait_records(n).await;
        }
    }
    assert_eq!(codes, [200, 200, 200, 429]);
    // With the seed's VIP discount (viplevel 3: half), billable_tokens = 5:
    // 0, 5, 10 are below 12, 15 is not.
    let mut codes = Vec::new();
    for _ in 0..4 {
        let r = gw.chat(Some("sk-b"), json!({"viplevel": 3})).await;
        codes.push(r.status);
        if r.status == 200 {
            n += 1;
            gw.wait_records(n).await;
        }
    }
    assert_eq!(codes, [200, 200, 200, 429]);
    let recs = gw.usage.0.lock().unwrap().clone();
    assert_eq!(recs.last().unwrap().billable_tokens, 5);
    assert_eq!(recs.last().unwrap().record()["billable_tokens"], 5);
}

fn ledger_counts(path: &std::path::Path) -> (i64, i64, Vec<(String, i64)>) {
    let c = rusqlite::Connection::open(path).unwrap();
    let n: i64 = c.query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0)).unwrap();
    let b: i64 = c
        .query_row("SELECT COALESCE(SUM(billable_tokens), 0) FROM usage", [], |r| r.get(0))
        .unwrap();
    let mut st = c.prepare("SELECT key_fp, used FROM key_usage ORDER BY key_fp").unwrap();
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (n, b, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_used_quota_and_the_ledger_records_everything() {
    let m = mock("m", |_| {}).await;
    let dir = tempdir("restart");
    let db = dir.join("usage.db");
    let config = |used: u64| {
        format!(
            "backends:\n{}keys:\n  - {{key: sk-r, user_id: ur, total_quota: 25, used_quota: {used}}}\n\
             ledger: {{path: \"{}\", flush_ms: 20}}\n",
            backend("m", &m.url()),
            db.display()
        )
    };
    let gw = TestGateway::start(&config(0)).await;
    for i in 0..2 {
        assert_eq!(gw.chat(Some("sk-r"), json!({})).await.status, 200);
        gw.wait_records(i + 1).await;
    }
    // An upstream error is recorded too (no tokens).
    let r = post(
        &format!("{}/v1/chat/completions", gw.base),
        &chat("gpt-4", json!({})),
        &[("authorization", "Bearer sk-r"), ("x-mock-status", "400")],
    )
    .await;
    assert_eq!(r.status, 400);
    gw.wait_records(3).await;
    // Every family, the account and ledger ones included, is the catalog's
    // (core's `policy::metrics`, which nginx prints from too).
    let text = gw.metrics().await;
    assert!(text.contains("llmproxy_ledger_records_total"), "{text}");
    let problems = llmproxy_core::policy::metrics::check_exposition(&text);
    assert!(problems.is_empty(), "{problems:#?}");
    // The ledger and its WAL files are the gateway's alone (0600).
    #[cfg(unix)]
    for file in ["usage.db", "usage.db-wal", "usage.db-shm"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    gw.gateway.shutdown(Duration::from_secs(5)).await;
    let (n, billable, usage) = ledger_counts(&db);
    assert_eq!((n, billable), (3, 20));
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].1, 20);

    // Same config after a restart: 20 used, one more request fits (30),
    // the next does not.
    let gw = TestGateway::start(&config(0)).await;
    let r = gw.chat(Some("sk-r"), json!({})).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    gw.wait_records(1).await;
    assert_eq!(gw.chat(Some("sk-r"), json!({})).await.status, 429, "used 30 of 25");
    gw.gateway.shutdown(Duration::from_secs(5)).await;
    assert_eq!(ledger_counts(&db).2[0].1, 30);

    // An operator who changes used_quota in the config resets the count.
    let gw = TestGateway::start(&config(5)).await;
    assert_eq!(gw.chat(Some("sk-r"), json!({})).await.status, 200);
    gw.wait_records(1).await;
    gw.gateway.shutdown(Duration::from_secs(5)).await;
    let (n, billable, usage) = ledger_counts(&db);
    assert_eq!((n, billable, usage[0].1), (5, 40, 15));

    // The report sees the same numbers.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args([
            "usage",
            "--db",
            db.to_str().unwrap(),
            "--key",
            "sk-r",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["requests"], 5);
    assert_eq!(v[0]["errors"], 1);
    assert_eq!(v[0]["billable_tokens"], 40);
    assert_eq!(v[0]["user_id"], "ur");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmproxy"))
        .args([
            "usage",
            "--db",
            db.to_str().unwrap(),
            "--records",
            "--format",
            "csv",
            "--since",
            "1h",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 6, "header + 5 records:\n{text}");
    assert!(text.lines().next().unwrap().contains("request_id"));
    assert!(!text.contains("sk-r"), "keys never appear in the ledger");
}
