//! `llmproxy.failure_step(facts)`: core's rule for which hook shapes a
//! failed request's response next (`llmproxy_core::policy::failure`,
//! docs/adr/042), so nginx and the gateway run error_handler and
//! response_transform for the same failures, in the same order.
//!
//! ```lua
//! llmproxy.failure_step({ source = "upstream", json_body = true,
//!     error_handler = true, caller_identified = true,
//!     response_transform = true, handled = "kept" })
//! --> "response_transform"   -- or "error_handler", "send"
//! ```

use llmproxy_core::policy::failure::{next_step, Facts, Handled, Source};
use mlua::{Lua, Table};

/// The Lua function.
pub(crate) fn failure_step(_: &Lua, t: Table) -> mlua::Result<&'static str> {
    let flag = |name: &str| -> mlua::Result<bool> { Ok(t.raw_get::<Option<bool>>(name)?.unwrap_or(false)) };
    let source = match t.raw_get::<Option<String>>("source")?.as_deref() {
        Some("gateway") | None => Source::Gateway,
        Some("upstream") => Source::Upstream {
            json_body: flag("json_body")?,
        },
        Some(other) => {
            return Err(mlua::Error::runtime(format!(
                "failure_step: source must be 'gateway' or 'upstream', not '{other}'"
            )))
        }
    };
    let handled = match t.raw_get::<Option<String>>("handled")? {
        None => Handled::NotRun,
        Some(h) => Handled::parse(&h).ok_or_else(|| {
            mlua::Error::runtime(format!(
                "failure_step: handled must be not_run, kept, replaced or denied, not '{h}'"
            ))
        })?,
    };
    let facts = Facts {
        source,
        error_handler: flag("error_handler")?,
        caller_identified: flag("caller_identified")?,
        response_transform: flag("response_transform")?,
    };
    Ok(next_step(&facts, handled).as_str())
}

/// `llmproxy.gateway_error(name, arg?)` -> type, status, code, message:
/// one of the failures the core names (`policy::errors`), so nginx answers
/// what the gateway answers. `arg`: the bound of `body_too_large`, the
/// seconds to wait of `auth_throttled` (for an API key), the
/// detail of `invalid_json`, `invalid_field`, `invalid_path`, `body_unreadable`,
/// `backend_unreachable`, `backend_failed`, the phase of `backend_timeout`
/// (`no_backend`, `invalid_body`, `state_unavailable`,
/// `response_too_large`, `event_too_large`, `uri_too_long`,
/// `headers_too_large` and `malformed_request` take none); `hook_failed`
/// takes the hook and the error's kind.
pub(crate) fn gateway_error(
    _: &Lua,
    (name, arg, arg2): (mlua::BorrowedStr, Option<mlua::Value>, Option<String>),
) -> mlua::Result<(&'static str, u16, &'static str, String)> {
    use llmproxy_core::policy::errors::{hook_failed_message, GatewayError, HOOK_ERROR, HOOK_FAILED};
    let text = || -> String {
        match &arg {
            Some(mlua::Value::String(s)) => s.to_string_lossy(),
            Some(mlua::Value::Integer(n)) => n.to_string(),
            Some(mlua::Value::Number(n)) => n.to_string(),
            _ => String::new(),
        }
    };
    let number = || -> u64 {
        match &arg {
            Some(mlua::Value::Integer(n)) => u64::try_from(*n).unwrap_or(0),
            Some(mlua::Value::Number(n)) => *n as u64,
            _ => 0,
        }
    };
    let e = match &*name {
        "body_too_large" => GatewayError::body_too_large(number()),
        "invalid_json" => GatewayError::invalid_json(text()),
        "invalid_body" => GatewayError::invalid_body(),
        "invalid_path" => GatewayError::invalid_path(text()),
        "uri_too_long" => GatewayError::uri_too_long(),
        "headers_too_large" => GatewayError::headers_too_large(),
        "malformed_request" => GatewayError::malformed_request(),
        "invalid_field" => GatewayError::invalid_field(text()),
        "body_unreadable" => GatewayError::body_unreadable(text()),
        "no_backend" => GatewayError::no_backend(),
        "backend_unreachable" => GatewayError::backend_unreachable(text()),
        "backend_timeout" => GatewayError::backend_timeout(text()),
        "backend_failed" => GatewayError::backend_failed(text()),
        "response_too_large" => GatewayError::response_too_large(),
        "event_too_large" => GatewayError::event_too_large(),
        "state_unavailable" => GatewayError::state_unavailable(),
        "auth_throttled" => GatewayError::auth_throttled("API key", number()),
        "hook_failed" => {
            let kind = arg2.unwrap_or_else(|| String::from("internal"));
            return Ok((HOOK_ERROR, 503, HOOK_FAILED, hook_failed_message(&text(), &kind)));
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "gateway_error: no failure named '{other}'"
            )))
        }
    };
    Ok((e.kind.as_str(), e.status, e.code, e.message))
}

/// `llmproxy.error_type(status)` -> the type `error_handler` sees for a
/// backend's error status.
pub(crate) fn error_type(_: &Lua, status: u16) -> mlua::Result<&'static str> {
    Ok(llmproxy_core::policy::errors::ErrorType::of_upstream_status(status).as_str())
}

/// `llmproxy.rate_step(res, took, denial)`: core's rate limit stage
/// decision (`policy::rate_stage`) from the rate_limit script's result
/// (`nil`, or the validated `{allow, reason?, retry_after?}`), whether the
/// limiter took the request, and its refusal (`{kind, retry_after}` or
/// `nil`). Returns `true, force` (admit; `force`: take the request without a
/// check) or `false, refund, code, message, retry_after, reason` (429;
/// `refund`: give back what was taken; `reason`: the metric label).
pub(crate) fn rate_step(
    lua: &Lua,
    (res, took, denial): (Option<Table>, bool, Option<Table>),
) -> mlua::Result<mlua::MultiValue> {
    use llmproxy_core::hooks::RateVerdict;
    use llmproxy_core::policy::rate_stage::{decide, RateStep};
    use mlua::IntoLuaMulti;

    let script = match res {
        None => RateVerdict::Standard,
        Some(t) => {
            let mut obj = serde_json::Map::new();
            if let Some(allow) = t.raw_get::<Option<bool>>("allow")? {
                obj.insert("allow".into(), allow.into());
            }
            if let Some(reason) = t.raw_get::<Option<String>>("reason")? {
                obj.insert("reason".into(), reason.into());
            }
            if let Some(wait) = t.raw_get::<Option<f64>>("retry_after")? {
                obj.insert("retry_after".into(), wait.into());
            }
            RateVerdict::from_result(&serde_json::Value::Object(obj))
                .map_err(|e| mlua::Error::runtime(format!("rate_step: {}", e.message)))?
        }
    };
    let denial = match denial {
        None => None,
        Some(d) => limit_denial(Some(&d.raw_get::<String>("kind")?), d.raw_get("retry_after")?)?,
    };
    match decide(&script, took, denial.as_ref()) {
        RateStep::Admit { force } => (true, force).into_lua_multi(lua),
        RateStep::Refuse { refund, refusal } => (
            false,
            refund,
            refusal.code,
            refusal.message,
            refusal.retry_after,
            refusal.reason,
        )
            .into_lua_multi(lua),
    }
}

/// The limiter's refusal from the limits module's `{kind, retry_after}`
/// (`kind`: `global_rpm`, `key_rpm`, ...; `retry_after` defaults to 1 s).
pub(crate) fn limit_denial(
    kind: Option<&str>,
    retry_after: Option<f64>,
) -> mlua::Result<Option<llmproxy_core::policy::limits::LimitDenial>> {
    use llmproxy_core::policy::limits::{LimitDenial, LimitKind};
    let Some(kind) = kind else {
        return Ok(None);
    };
    Ok(Some(LimitDenial {
        kind: LimitKind::parse(kind).ok_or_else(|| mlua::Error::runtime(format!("no limit named '{kind}'")))?,
        retry_after: retry_after.unwrap_or(1.0),
    }))
}
