//! `engine:limiter()` (the config's `limits:`) and `llmproxy.limiter(t)`:
//! the core's token-bucket rule (`llmproxy_core::policy::limits`) for a
//! host whose store is on the Lua side, as nginx's shared dict is. The host
//! loads the buckets (the core's byte form, `nil` when absent), calls, and saves
//! what comes back with its time to live; the arithmetic is the core's, the
//! same the gateway runs.
//!
//! Values are the core's 24-byte bucket form; results come back as
//! multiple values (no tables: this runs on every request).
//!
//! ```lua
//! local took, kind, retry_after, global_remaining, key_remaining, in_flight,
//!       g, g_ttl, r, r_ttl, t, t_ttl =
//!     limiter:acquire(now_ms, has_key, force, g, r, t, in_flight)
//! -- kind: the refusing limit or nil; g, r, t: new values, nil when that
//! -- limit is off; *_ttl: seconds the store may keep them
//! local g, g_ttl, r, r_ttl = limiter:refund(has_key, g, r)
//! local t, ttl = limiter:charge(now_ms, t, tokens)
//! local code, message = limiter:describe("key_rpm")  -- a refusal's words
//! ```

use llmproxy_core::config::LimitsConfig;
use llmproxy_core::policy::breaker::Breaker;
use llmproxy_core::policy::limits::{self, Bucket, Counters};
use llmproxy_core::policy::throttle::{client_key, Check, Throttle};
use mlua::{Lua, Table, UserData, UserDataMethods, Value};

/// The limits a limiter applies.
pub(crate) struct LuaLimiter(pub(crate) LimitsConfig);

/// A stored value as a bucket (`None`: absent or not one of ours).
fn load(v: &Value) -> Option<Bucket> {
    match v {
        Value::String(s) => Bucket::from_bytes(&s.as_bytes()),
        _ => None,
    }
}

/// A bucket kept for a set limit as a value and its time to live, else
/// `nil, nil`.
fn save(lua: &Lua, b: Option<Bucket>, limit: u64) -> mlua::Result<(Value, Value)> {
    match b.filter(|_| limit > 0) {
        Some(b) => Ok((
            Value::String(lua.create_string(b.to_bytes())?),
            // A full bucket may go at once; 0 would mean "never" to nginx.
            Value::Number(b.idle_ttl_s().max(0.001)),
        )),
        None => Ok((Value::Nil, Value::Nil)),
    }
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
                let (g, g_ttl) = save(lua, c.global, lim.global_rpm)?;
                let key = |b, limit| if has_key { save(lua, b, limit) } else { Ok((Value::Nil, Value::Nil)) };
                let (r, r_ttl) = key(c.rpm, lim.key_rpm)?;
                let (t, t_ttl) = key(c.tpm, lim.key_tpm)?;
                let kind = v.denial.map(|d| d.kind.as_str());
                let retry_after = v.denial.map(|d| d.retry_after);
                Ok(mlua::Variadic::from_iter([
                    Value::Boolean(v.took),
                    kind.map_or(Ok(Value::Nil), |k| lua.create_string(k).map(Value::String))?,
                    retry_after.map_or(Value::Nil, Value::Number),
                    Value::Integer(v.status.global_remaining),
                    Value::Integer(v.status.key_remaining),
                    Value::Integer(v.status.concurrent_count),
                    g,
                    g_ttl,
                    r,
                    r_ttl,
                    t,
                    t_ttl,
                ]))
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
            let (g, g_ttl) = save(lua, c.global, lim.global_rpm)?;
            let (r, r_ttl) = if has_key {
                save(lua, c.rpm, lim.key_rpm)?
            } else {
                (Value::Nil, Value::Nil)
            };
            Ok((g, g_ttl, r, r_ttl))
        });
        methods.add_method("describe", |_, _, kind: mlua::BorrowedStr| {
            let k = limits::LimitKind::parse(&kind);
            Ok((k.map(|k| k.code()), k.map(|k| k.message())))
        });
        methods.add_method("charge", |lua, this, (now_ms, t, tokens): (f64, Value, u64)| {
            let lim = &this.0;
            let mut tpm = load(&t);
            limits::charge(lim, &mut tpm, tokens, now_ms);
            save(lua, tpm, lim.key_tpm)
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
/// that keeps the buckets (bytes, as the limiter's) on the Lua side.
///
/// ```lua
/// local key = throttle:client_key(ngx.var.remote_addr)  -- nil: not an address
/// local wait, recovered = throttle:check(now_ms, dict:get("a:" .. key))
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
                Check::Pass => (None, false),
                Check::Recovered => (None, true),
                Check::Wait(s) => (Some(s), false),
            })
        });
        methods.add_method("failed", |lua, this, (now_ms, stored): (f64, Value)| {
            let b = this.0.failed(load(&stored), now_ms);
            Ok((lua.create_string(b.to_bytes())?, this.0.idle_ttl_s(&b).max(0.001)))
        });
    }
}

/// `llmproxy.breaker()`: the core's circuit breaker for the shared state
/// (`llmproxy_core::policy::breaker`), one per nginx worker.
///
/// ```lua
/// if breaker:allow(now_ms) then ... breaker:success() / breaker:failure(now_ms) end
/// ```
pub(crate) struct LuaBreaker(std::cell::Cell<Breaker>);

impl UserData for LuaBreaker {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("allow", |_, this, now_ms: f64| {
            let mut b = this.0.get();
            let ok = b.allow(now_ms);
            this.0.set(b);
            Ok(ok)
        });
        methods.add_method("success", |_, this, ()| {
            let mut b = this.0.get();
            b.success();
            this.0.set(b);
            Ok(())
        });
        // -> true when this failure opened the circuit
        methods.add_method("failure", |_, this, now_ms: f64| {
            let mut b = this.0.get();
            let was_open = b.is_open();
            b.failure(now_ms);
            this.0.set(b);
            Ok(!was_open && b.is_open())
        });
    }
}

/// `llmproxy.breaker()`: a closed breaker.
pub(crate) fn breaker(_: &Lua, (): ()) -> mlua::Result<LuaBreaker> {
    Ok(LuaBreaker(std::cell::Cell::new(Breaker::new())))
}
