//! `key_info` reaches auth and rate_limit scripts as a lazy view (fields
//! converted when read) with a plain table's semantics, and nothing a call
//! does to it is seen by the next call. A host's live count reads as
//! `used_quota` in every way a script can see the record.

mod common;

use common::{engine, reason_of};

use llmproxy_core::hooks::{
    AuthInput, AuthVerdict, CurrentTime, KeyInfo, RateLimitInput, RateLimitStatus, RateVerdict, RequestInfo,
    StandardChecks,
};
use llmproxy_core::Engine;
use serde_json::{json, Value};

const CHECKS: StandardChecks = StandardChecks {
    key_valid: true,
    status_active: true,
    not_expired: true,
    ip_allowed: true,
    quota_available: true,
};

fn key_info() -> Value {
    json!({"key": "sk-1", "user_id": "u1", "name": "n", "total_quota": 100, "used_quota": 7,
           "allowed_ips": ["10.0.0.0/8", "127.0.0.1"], "expires_at": null})
}

/// What the auth script said, as the reason of a deny.
fn said(engine: &Engine, key_info: KeyInfo<'_>) -> String {
    let request = RequestInfo::default();
    match engine.auth(&AuthInput {
        request: &request,
        key_info,
        standard_checks: CHECKS,
    }) {
        Ok(AuthVerdict::Deny { reason, .. }) => reason.unwrap_or_default(),
        other => panic!("expected a deny with a reason, got {other:?}"),
    }
}

#[test]
fn an_auth_script_sees_key_info_as_a_plain_table() {
    let cases = [
        (
            "key_info.user_id .. ',' .. key_info.total_quota .. ',' .. #key_info.allowed_ips .. ',' .. tostring(key_info.expires_at == json.null)",
            "u1,100,2,true",
        ),
        ("local n = 0 for _ in pairs(key_info) do n = n + 1 end return n", "7"),
        ("json.encode(key_info.allowed_ips)", r#"["10.0.0.0/8","127.0.0.1"]"#),
        ("tostring(json.encode(key_info):find('\"used_quota\":7', 1, true) ~= nil)", "true"),
        ("tostring(rawget(key_info, 'name'))", "n"),
        ("tostring(key_info.nope)", "nil"),
    ];
    for (expr, want) in cases {
        let script = reason_of(expr);
        assert_eq!(
            said(&engine("auth", &script), KeyInfo::json(&key_info())),
            want,
            "{expr}"
        );
    }
}

#[test]
fn what_a_call_does_to_key_info_is_gone_at_the_next_call() {
    let e = engine(
        "auth",
        "local seen = tostring(key_info.extra) .. ',' .. key_info.user_id \
         key_info.extra = 1 key_info.user_id = 'changed' \
         return {allow = false, reason = seen}",
    );
    for _ in 0..3 {
        assert_eq!(said(&e, KeyInfo::json(&key_info())), "nil,u1");
    }
    // Untouched views are re-armed: a call that only reads sees the new record.
    let e = engine("auth", "return {allow = false, reason = key_info.user_id}");
    assert_eq!(said(&e, KeyInfo::json(&key_info())), "u1");
    assert_eq!(said(&e, KeyInfo::json(&json!({"user_id": "u2"}))), "u2");
}

#[test]
fn an_unknown_keys_key_info_is_nil() {
    let e = engine("auth", "return {allow = false, reason = tostring(key_info)}");
    assert_eq!(said(&e, KeyInfo::none()), "nil");
    assert_eq!(said(&e, KeyInfo::live(&Value::Null, 3)), "nil");
}

#[test]
fn a_rate_limit_script_reads_key_info_lazily_too() {
    let e = engine(
        "rate_limit",
        "if key_info.user_id == 'u1' and key_info.used_quota == 9 then return {allow = false, retry_after = 7} end",
    );
    let request = RequestInfo::default();
    let status = RateLimitStatus {
        global_remaining: 5,
        key_remaining: 5,
        concurrent_count: 1,
    };
    let info = key_info();
    let verdict = e
        .rate_limit(&RateLimitInput {
            request: &request,
            key_info: KeyInfo::live(&info, 9),
            rate_limit_status: status,
            current_time: CurrentTime {
                hour: 3,
                weekday: 1,
                timestamp: 0,
            },
        })
        .expect("verdict");
    assert!(
        matches!(verdict, RateVerdict::Deny { retry_after: Some(r), .. } if r == 7.0),
        "{verdict:?}"
    );
}

#[test]
fn the_hosts_live_count_is_the_used_quota_scripts_see() {
    let with = key_info();
    let mut without = key_info();
    if let Some(m) = without.as_object_mut() {
        m.remove("used_quota");
    }
    // (record, expression, what the script says)
    let cases = [
        (&with, "key_info.used_quota", "42"),
        (&with, "rawget(key_info, 'used_quota')", "42"),
        (
            &with,
            "local n = 0 for _ in pairs(key_info) do n = n + 1 end return n",
            "7",
        ),
        (
            &with,
            "local u for k, v in pairs(key_info) do if k == 'used_quota' then u = v end end return u",
            "42",
        ),
        (
            &with,
            "json.encode(key_info):find('\"used_quota\":42', 1, true) ~= nil",
            "true",
        ),
        (&with, "key_info.total_quota", "100"),
        (&without, "key_info.used_quota", "42"),
        (
            &without,
            "local n = 0 for _ in pairs(key_info) do n = n + 1 end return n",
            "7",
        ),
        (
            &without,
            "json.encode(key_info):find('\"used_quota\":42', 1, true) ~= nil",
            "true",
        ),
    ];
    for (record, expr, want) in cases {
        let script = reason_of(expr);
        assert_eq!(
            said(&engine("auth", &script), KeyInfo::live(record, 42)),
            want,
            "{expr}"
        );
    }
}
