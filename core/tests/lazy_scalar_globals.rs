//! The flat globals of scalars (`standard_checks`, `rate_limit_status`,
//! `current_time`, `metadata`, `error`) are lazy tables: a script reads, iterates,
//! encodes and changes them as plain tables, numbers keep their JSON form,
//! and nothing a call does to them is seen by the next call.

mod common;

use common::{engine, reason_of, returning};

use llmproxy_core::hooks::{
    AuthInput, AuthVerdict, CurrentTime, ErrorInfo, ErrorInput, ErrorResponse, KeyInfo, RateLimitInput,
    RateLimitStatus, RateVerdict, RequestInfo, ResponseInfo, StandardChecks, UsageInput, UsageMetadata, UsageRecord,
};
use llmproxy_core::Engine;
use serde_json::{json, Value};

fn auth_says(engine: &Engine, checks: StandardChecks) -> String {
    let request = RequestInfo::default();
    match engine.auth(&AuthInput {
        request: &request,
        key_info: KeyInfo::none(),
        standard_checks: checks,
    }) {
        Ok(AuthVerdict::Deny { reason, .. }) => reason.unwrap_or_default(),
        other => panic!("expected a deny with a reason, got {other:?}"),
    }
}

const STATUS: RateLimitStatus = RateLimitStatus {
    global_remaining: 900,
    key_remaining: 7,
    concurrent_count: 2,
};

fn rate_limit_says(engine: &Engine) -> String {
    rate_limit_says_with(engine, STATUS)
}

fn rate_limit_says_with(engine: &Engine, status: RateLimitStatus) -> String {
    let request = RequestInfo::default();
    let verdict = engine.rate_limit(&RateLimitInput {
        request: &request,
        key_info: KeyInfo::none(),
        rate_limit_status: status,
        current_time: CurrentTime {
            hour: 15,
            weekday: 3,
            timestamp: 1_796_400_000,
        },
    });
    match verdict {
        Ok(RateVerdict::Deny { reason, .. }) => reason.unwrap_or_default(),
        other => panic!("expected a deny with a reason, got {other:?}"),
    }
}

const CHECKS: StandardChecks = StandardChecks {
    key_valid: true,
    status_active: false,
    not_expired: true,
    ip_allowed: true,
    quota_available: false,
};

#[test]
fn standard_checks_read_as_a_plain_table() {
    let cases = [
        ("tostring(standard_checks.key_valid) .. ',' .. tostring(standard_checks.status_active)", "true,false"),
        ("local n = 0 for _ in pairs(standard_checks) do n = n + 1 end return n", "5"),
        (
            "local t = {} for k, v in pairs(standard_checks) do t[#t + 1] = k .. '=' .. tostring(v) end table.sort(t) return table.concat(t, ' ')",
            "ip_allowed=true key_valid=true not_expired=true quota_available=false status_active=false",
        ),
        ("json.encode(standard_checks)", r#"{"ip_allowed":true,"key_valid":true,"not_expired":true,"quota_available":false,"status_active":false}"#),
        ("rawget(standard_checks, 'not_expired')", "true"),
        ("standard_checks.nope", "nil"),
        ("type(standard_checks)", "table"),
    ];
    for (expr, want) in cases {
        assert_eq!(auth_says(&engine("auth", &reason_of(expr)), CHECKS), want, "{expr}");
    }
}

#[test]
fn rate_limit_globals_keep_their_integers() {
    let cases = [
        (
            "current_time.hour .. ',' .. current_time.weekday .. ',' .. current_time.timestamp",
            "15,3,1796400000",
        ),
        (
            "rate_limit_status.key_remaining + rate_limit_status.global_remaining",
            "907",
        ),
        (
            "json.encode(current_time)",
            r#"{"hour":15,"timestamp":1796400000,"weekday":3}"#,
        ),
        (
            "json.encode(rate_limit_status)",
            r#"{"concurrent_count":2,"global_remaining":900,"key_remaining":7}"#,
        ),
        (
            "local n = 0 for _ in pairs(rate_limit_status) do n = n + 1 end return n",
            "3",
        ),
        (
            "math.type and 'x' or tostring(current_time.timestamp == 1796400000)",
            "true",
        ),
    ];
    for (expr, want) in cases {
        assert_eq!(rate_limit_says(&engine("rate_limit", &reason_of(expr))), want, "{expr}");
    }
}

/// A count past 2^53 (a limit set that high) is no exact double: a script
/// reads the nearest one, and encoding the global writes the count itself.
#[test]
fn an_integer_past_2_53_encodes_as_itself() {
    let status = RateLimitStatus {
        global_remaining: (1 << 53) + 1,
        ..STATUS
    };
    let cases = [
        (
            "json.encode(rate_limit_status)",
            r#"{"concurrent_count":2,"global_remaining":9007199254740993,"key_remaining":7}"#,
        ),
        ("rate_limit_status.global_remaining == 2^53", "true"),
    ];
    for (expr, want) in cases {
        let engine = engine("rate_limit", &reason_of(expr));
        assert_eq!(rate_limit_says_with(&engine, status), want, "{expr}");
    }
}

#[test]
fn what_a_call_does_to_them_is_gone_at_the_next_call() {
    let e = engine(
        "rate_limit",
        &reason_of(
            "local seen = tostring(current_time.extra) .. ',' .. current_time.hour \
             current_time.extra = 1 current_time.hour = 99 rate_limit_status.key_remaining = nil \
             return seen",
        ),
    );
    for _ in 0..3 {
        assert_eq!(rate_limit_says(&e), "nil,15");
    }
    let e = engine(
        "auth",
        &reason_of("local s = tostring(standard_checks.key_valid) standard_checks.key_valid = 0 return s"),
    );
    for _ in 0..3 {
        assert_eq!(auth_says(&e, CHECKS), "true");
    }
}

/// What the usage script's record says of `metadata`, for `latency_ms`.
fn usage_metadata(latency_ms: f64) -> Value {
    let e = engine(
        "usage",
        "return {billable_tokens = 1, seen = json.encode(metadata), url = metadata.backend_url, \
         latency = metadata.latency_ms, stream = metadata.is_stream}",
    );
    let request = RequestInfo::default();
    let response = ResponseInfo::default();
    let out = e
        .usage(&UsageInput {
            request: &request,
            usage: &json!({"prompt_tokens": 1}),
            response: &response,
            metadata: &UsageMetadata {
                backend_url: "http://b:1".into(),
                latency_ms,
                is_stream: true,
            },
        })
        .expect("usage");
    match out {
        UsageRecord::Custom(c) => c.to_value(),
        other => panic!("expected a record, got {other:?}"),
    }
}

#[test]
fn metadata_reads_as_a_plain_table_and_a_number_that_is_not_finite_is_absent() {
    let r = usage_metadata(12.5);
    assert_eq!(r["url"], "http://b:1");
    assert_eq!(r["latency"], 12.5);
    assert_eq!(r["stream"], true);
    assert_eq!(
        r["seen"],
        r#"{"backend_url":"http://b:1","is_stream":true,"latency_ms":12.5}"#
    );
    let r = usage_metadata(3.0);
    assert_eq!(r["latency"], 3.0);
    assert_eq!(
        r["seen"],
        r#"{"backend_url":"http://b:1","is_stream":true,"latency_ms":3}"#
    );
    let r = usage_metadata(f64::NAN);
    assert!(r.get("latency").is_none(), "{r}");
    assert_eq!(r["seen"], r#"{"backend_url":"http://b:1","is_stream":true}"#);
}

/// What `expr` gives an error handler as a string, for a failure with or
/// without a backend.
fn error_handler_says(engine: &Engine, backend_url: Option<&str>) -> String {
    let request = RequestInfo::default();
    let error = ErrorInfo {
        kind: "backend_error".into(),
        message: "boom".into(),
        status_code: 502,
        backend_url: backend_url.map(str::to_owned),
        retry_count: 2,
    };
    match engine.handle_error(&ErrorInput {
        request: &request,
        error: &error,
    }) {
        Ok(ErrorResponse::Custom { body, .. }) => {
            let body: Value = serde_json::from_slice(&body).expect("a JSON body");
            body["said"].as_str().unwrap_or_default().to_owned()
        }
        other => panic!("expected a custom error, got {other:?}"),
    }
}

#[test]
fn the_error_reads_as_a_plain_table() {
    const URL: Option<&str> = Some("http://127.0.0.1:9000");
    // (expression, backend_url, what it gives)
    let cases = [
        ("error.type .. ' ' .. error.message", URL, "backend_error boom"),
        ("error.status_code + error.retry_count", URL, "504"),
        ("error.backend_url", URL, "http://127.0.0.1:9000"),
        ("error.backend_url", None, "nil"),
        ("local n = 0 for _ in pairs(error) do n = n + 1 end return n", URL, "5"),
        ("local n = 0 for _ in pairs(error) do n = n + 1 end return n", None, "4"),
        (
            "json.encode(error)",
            URL,
            r#"{"backend_url":"http://127.0.0.1:9000","message":"boom","retry_count":2,"status_code":502,"type":"backend_error"}"#,
        ),
        (
            "json.encode(error)",
            None,
            r#"{"message":"boom","retry_count":2,"status_code":502,"type":"backend_error"}"#,
        ),
    ];
    for (expr, url, want) in cases {
        let script = returning(expr, "{body = {said = tostring(v)}}");
        assert_eq!(
            error_handler_says(&engine("error_handler", &script), url),
            want,
            "{expr} ({url:?})"
        );
    }
}
