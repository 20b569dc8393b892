//! `engine:limiter()` (the config's `limits:`) and `llmproxy.limiter(t)`:
//! the core's token-bucket rule (`llmproxy_core::policy::limits`) for a
//! host whose store is on the Lua side, as nginx's shared dict is. The host
//! loads the buckets (text values, `nil` when absent), calls, and saves
//! what comes back with its time to live; the arithmetic is the core's, the
//! same the gateway runs.
//!
//! ```lua
//! local v = limiter:acquire(now_ms, has_key, force, g, r, t, in_flight)
//! -- v.took, v.status (rate_limit_status), v.denial ({kind, code,
//! -- message, retry_after} or nil), v.g / v.r / v.t (new values or nil
//! -- when that limit is off) and v.g_ttl / v.r_ttl / v.t_ttl (seconds)
//! local b = limiter:refund(has_key, g, r)   -- b.g, b.g_ttl, b.r, b.r_ttl
//! local t, ttl = limiter:charge(now_ms, t, tokens)
//! local code, message = limiter:describe("key_rpm")  -- a refusal's words
//! ```

use llmproxy_core::config::LimitsConfig;
use llmproxy_core::policy::limits::{self, Bucket, Counters};
use llmproxy_core::policy::throttle::{client_key, message, Check, Throttle};
use mlua::{Lua, Table, UserData, UserDataMethods, Value};

/// The limits a limiter applies.
pub(crate) struct LuaLimiter(pub(crate) LimitsConfig);

/// A stored value as a bucket (`None`: absent or not one of ours).
fn load(v: &Value) -> Option<Bucket> {
    match v {
        Value::String(s) => Bucket::decode(&s.to_str().ok()?),
        _ => None,
    }
}

/// Set `name` and `name_ttl` in `out` for a bucket kept for a set limit.
fn save(out: &Table, name: &str, b: Option<Bucket>, limit: u64) -> mlua::Result<()> {
    if let Some(b) = b.filter(|_| limit > 0) {
        out.raw_set(name, b.encode())?;
        // A full bucket may go at once; 0 would mean "never" to nginx.
        out.raw_set(format!("{name}_ttl"), b.idle_ttl_s().max(0.001))?;
    }
    Ok(())
}

impl UserData for LuaLimiter {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method(
            "acquire",
            |lua, this, (now_ms, has_key, force, g, r, t, in_flight): (f64, bool, bool, Value, Value, Value, Option<i64>)| {
                let lim = &this.0;
                let mut c = Counters {
                    global: load(&g),
                    rpm: load(&r),
                    tpm: load(&t),
                    // A counter below zero (a slot given back after the dict
                    // evicted it) counts as none.
                    in_flight: u64::try_from(in_flight.unwrap_or(0)).unwrap_or(0),
                };
                let v = limits::acquire(lim, &mut c, has_key, now_ms, force);
                let out = lua.create_table_with_capacity(0, 10)?;
                out.raw_set("took", v.took)?;
                let status = lua.create_table_with_capacity(0, 3)?;
                status.raw_set("global_remaining", v.status.global_remaining)?;
                status.raw_set("key_remaining", v.status.key_remaining)?;
                status.raw_set("concurrent_count", v.status.concurrent_count)?;
                out.raw_set("status", status)?;
                if let Some(d) = v.denial {
                    let denial = lua.create_table_with_capacity(0, 4)?;
                    denial.raw_set("kind", d.kind.as_str())?;
                    denial.raw_set("code", d.kind.code())?;
                    denial.raw_set("message", d.kind.message())?;
                    denial.raw_set("retry_after", d.retry_after)?;
                    out.raw_set("denial", denial)?;
                }
                save(&out, "g", c.global, lim.global_rpm)?;
                if has_key {
                    save(&out, "r", c.rpm, lim.key_rpm)?;
                    save(&out, "t", c.tpm, lim.key_tpm)?;
                }
                Ok(out)
            },
        );
        methods.add_method("refund", |lua, this, (has_key, g, r): (bool, Value, Value)| {
            let lim = &this.0;
            let mut c = Counters {
                global: load(&g),
                rpm: load(&r),
                ..Counters::default()
            };
            limits::refund(lim, &mut c, has_key);
            let out = lua.create_table_with_capacity(0, 4)?;
            save(&out, "g", c.global, lim.global_rpm)?;
            if has_key {
                save(&out, "r", c.rpm, lim.key_rpm)?;
            }
            Ok(out)
        });
        methods.add_method("describe", |_, _, kind: mlua::BorrowedStr| {
            let k = limits::LimitKind::parse(&kind);
            Ok((k.map(|k| k.code()), k.map(|k| k.message())))
        });
        methods.add_method("charge", |_, this, (now_ms, t, tokens): (f64, Value, u64)| {
            let lim = &this.0;
            let mut tpm = load(&t);
            limits::charge(lim, &mut tpm, tokens, now_ms);
            Ok(match tpm.filter(|_| lim.key_tpm > 0) {
                Some(b) => (Some(b.encode()), Some(b.idle_ttl_s().max(0.001))),
                None => (None, None),
            })
        });
    }
}

/// `llmproxy.limiter(t)`: a limiter for the limits in `t` (`global_rpm`,
/// `key_rpm`, `key_tpm`, `key_concurrency`; absent: 0, no limit).
pub(crate) fn from_table(_: &Lua, t: Table) -> mlua::Result<LuaLimiter> {
    let n = |name: &str| -> mlua::Result<u64> { Ok(t.raw_get::<Option<u64>>(name)?.unwrap_or(0)) };
    Ok(LuaLimiter(LimitsConfig {
        global_rpm: n("global_rpm")?,
        key_rpm: n("key_rpm")?,
        key_tpm: n("key_tpm")?,
        key_concurrency: n("key_concurrency")?,
        ..LimitsConfig::default()
    }))
}

/// `engine:auth_throttle()`: the core's auth throttle for the config's
/// `gateway.auth_throttle` (`llmproxy_core::policy::throttle`), for a host
/// that keeps the buckets (text, as the limiter's) on the Lua side.
///
/// ```lua
/// local key = throttle:client_key(ngx.var.remote_addr)  -- nil: not an address
/// local wait, recovered, message = throttle:check(now_ms, dict:get("a:" .. key))
/// local value, ttl = throttle:failed(now_ms, dict:get("a:" .. key))
/// ```
pub(crate) struct LuaThrottle(pub(crate) Throttle);

impl UserData for LuaThrottle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("enabled", |_, this, ()| Ok(this.0.enabled()));
        methods.add_method("client_key", |_, _, ip: mlua::BorrowedStr| {
            Ok(ip.parse::<std::net::IpAddr>().ok().map(|ip| client_key(ip).to_string()))
        });
        methods.add_method("check", |_, this, (now_ms, stored): (f64, Value)| {
            let mut b = load(&stored);
            Ok(match this.0.check(b.as_mut(), now_ms) {
                Check::Pass => (None, false, None),
                Check::Recovered => (None, true, None),
                Check::Wait(s) => (Some(s), false, Some(message("API key", s))),
            })
        });
        methods.add_method("failed", |_, this, (now_ms, stored): (f64, Value)| {
            let b = this.0.failed(load(&stored), now_ms);
            Ok((b.encode(), this.0.idle_ttl_s(&b).max(0.001)))
        });
    }
}
