//! The LuaJIT module: `local llmproxy = require "llmproxy"`.
//!
//! ```lua
//! local llmproxy = require "llmproxy"
//! local engine, err = llmproxy.new(config)   -- YAML text or a file path
//! local res, err = engine:run("routing", { request = req, backends = bs })
//! local list = engine:backends()             -- the config's backends
//! -- res: the script's result as a Lua value; nil, nil when it returned nil;
//! -- nil, err on failure, err = { kind = ..., message = ..., hook = ...,
//! -- script = ..., line = ... } with a __tostring.
//!
//! -- Several hooks on one request: parse it (and its body) once.
//! local r, err = llmproxy.request({ id = id, headers = h, body_raw = body })
//! engine:run("routing", { request = r, backends = bs })
//! engine:run("usage", { request = r, usage = u })
//! -- Globals that change rarely (the backend set): parse them once too.
//! local g, err = llmproxy.globals({ backends = bs })
//! local res, err = engine:run_prepared("routing", r, g)  -- r, g: or nil
//!
//! -- A request handle with more fields, the body shared (not re-parsed).
//! local routed = r:with({ backend_url = "http://10.0.0.2:8000" })
//! r:body_get("/stream")                     -- one body field, by JSON pointer
//! r:check_fields()    -- nil, or why `stream` & co. do not have their OpenAI types
//! r:body_json({ stream_options = { include_usage = true } })  -- merge patch
//! local body, stream, strip_usage = r:upstream_body(new_text, true) -- what goes upstream
//! -- A response body as JSON text, parsed in Rust like request.body_raw.
//! engine:run("response_transform", { request = r,
//!     response = { status_code = 200, headers = {}, body_raw = text } })
//! -- `body` of a result as JSON text (serialized in Rust), for a host that
//! -- sends it on: request_transform, response_transform, error_handler.
//! local res = engine:run_prepared("request_transform", routed, nil, { body_json = true })
//! -- A proxied API request's whole life in the core (handle.rs): route,
//! -- upstream body, answer or stream events, charge.
//! local h, err = engine:handle({ path = "/v1/chat/completions", id = id }, body_text)
//! engine:gateway()      -- the config's `gateway:` settings
//! engine:on_error("auth")  -- "deny" | "standard": the hook's failure policy
//! engine:pool_stats()   -- the VM pool's counters
//! engine:models_body()  -- `GET /v1/models`' JSON text, as the gateway's
//! engine:ledger_flush(5) -- wait (at most 5 s) for the ledger's commits
//! -- A call whose script logged (`log.*`, `print`) returns its lines third:
//! -- res, err, lines = engine:run(...); lines = { {level = "warn",
//! -- message = ..., request_id = ..., hook = ..., script = ...}, ... }
//! ```
//!
//! Exports: `new`, `request`, `globals`, `version`, `null` (`json.null`, a
//! NULL light userdata, equal to `cjson.null`), `empty_array`, `array_mt`,
//! `healthz_body` (`GET /healthz`' body), `installed([true])` (a
//! process-wide mark that a host installed an engine), and host rules from
//! core: `usage`, `hop_by_hop`, `api_key`, `request_id`, `failure_step`
//! (which hook shapes a failed request's response next, docs/adr/042),
//! `sse_parser`, `sse_with_data`, `sse_data_event` (a backend's event
//! stream, as the gateway's relay reads it).
//!
//! The module runs in the host's Lua state (mlua `module` mode: LuaJIT comes
//! from the host); scripts run in the engine's own sandbox states, never in
//! the host's. `input.request.body_raw` may hold the request body as JSON
//! text, so the body is parsed in Rust rather than converted from a Lua
//! table; `llmproxy.request` goes one step further and parses the whole
//! request once, for every hook that runs on it, and `llmproxy.globals` a
//! hook's other globals once per change (immutable userdata, usable with
//! any engine; see `crate::input` for how limits apply).

mod balancer;
pub mod convert;
mod handle;
mod hop_headers;
mod keys;
mod ledger;
mod limiter;
mod policy;
mod protect;
mod request_table;
mod script_log;
mod sse;

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::rc::Rc;

use llmproxy_core::config::OnError;
use llmproxy_core::{Config, Engine, HookName};
use mlua::{AnyUserData, Lua, MetaMethod, MultiValue, Table, UserData, UserDataMethods, Value};
use serde_json::{Map, Value as Json};

use crate::capi::boundary::from_panic;
use crate::capi::error::Failure;
use crate::input::{self, Globals, Request};
use convert::{GlobalsError, ToJson, EMPTY_ARRAY};

/// Tables the module's functions share.
#[derive(Clone)]
struct Shared {
    /// `llmproxy.array_mt`: marks arrays (results carry it; inputs may).
    array_mt: Table,
    /// Metatable of error tables (`__tostring`).
    err_mt: Table,
    /// The field names of a charge table.
    charge_keys: Rc<ChargeKeys>,
}

/// The keys of the table [`charge_table`] builds, made once: a name
/// pushed as text is hashed and looked up in the host's string table on
/// every request, which was most of the table's cost under nginx.
struct ChargeKeys {
    billable_tokens: mlua::LuaString,
    limit_tokens: mlua::LuaString,
    prompt_tokens: mlua::LuaString,
    completion_tokens: mlua::LuaString,
    total_tokens: mlua::LuaString,
    cost: mlua::LuaString,
    metrics: mlua::LuaString,
    record_json: mlua::LuaString,
    /// The keys of `metrics`: core's usage metric kinds.
    kinds: Vec<(&'static str, mlua::LuaString)>,
}

impl ChargeKeys {
    fn new(lua: &Lua) -> mlua::Result<ChargeKeys> {
        use llmproxy_core::policy::usage::{BILLABLE_KIND, METRIC_KINDS};
        let key = |name: &str| lua.create_string(name);
        Ok(ChargeKeys {
            billable_tokens: key("billable_tokens")?,
            limit_tokens: key("limit_tokens")?,
            prompt_tokens: key("prompt_tokens")?,
            completion_tokens: key("completion_tokens")?,
            total_tokens: key("total_tokens")?,
            cost: key("cost")?,
            metrics: key("metrics")?,
            record_json: key("record_json")?,
            kinds: METRIC_KINDS
                .iter()
                .chain(&[BILLABLE_KIND])
                .map(|k| Ok((*k, key(k)?)))
                .collect::<mlua::Result<_>>()?,
        })
    }

    /// The key made for a metric `kind` (`None` for a kind core does not
    /// list, which a charge never holds).
    fn kind(&self, kind: &str) -> Option<&mlua::LuaString> {
        self.kinds.iter().find(|(k, _)| *k == kind).map(|(_, s)| s)
    }
}

impl Shared {
    /// `nil, err` with err a `{kind, message, hook?, script?, line?}` table.
    fn fail(&self, lua: &Lua, f: Failure) -> mlua::Result<MultiValue> {
        Ok(MultiValue::from_vec(vec![
            Value::Nil,
            Value::Table(self.error(lua, f)?),
        ]))
    }

    /// The `{kind, message, hook?, script?, line?}` table of `f`.
    fn error(&self, lua: &Lua, f: Failure) -> mlua::Result<Table> {
        let t = lua.create_table_with_capacity(0, 5)?;
        t.raw_set("kind", f.code.kind().to_str().unwrap_or("internal"))?;
        t.raw_set("message", f.message)?;
        if let Some(h) = f.hook {
            t.raw_set("hook", h.as_str())?;
        }
        if let Some(s) = f.script {
            t.raw_set("script", s)?;
        }
        if let Some(l) = f.line {
            t.raw_set("line", l)?;
        }
        t.set_metatable(Some(self.err_mt.clone()))?;
        Ok(t)
    }
}

/// An engine as a Lua userdata (`engine:run(hook, input)`).
struct LuaEngine {
    engine: Engine,
    shared: Shared,
    keys: keys::KeyStore,
    /// What admission runs, and the zone of `current_time`.
    admission: keys::Admission,
    /// The usage ledger's writer (`ledger:` in the config).
    ledger: Option<std::sync::Arc<llmproxy_ledger::Ledger>>,
}

impl UserData for LuaEngine {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("run", |lua, this, (hook, input, opts): (Value, Value, Value)| {
            let (outcome, lines) = run_captured(lua, this, &hook, &input, &opts);
            respond(lua, this, outcome, lines)
        });
        // engine:run_step(hook, input, opts) -> result, denied, lines,
        // fell_back: engine:run with the hook's failure policy applied by
        // the core (`request_handle::denies`, as the request handle and the
        // gateway apply it): a failure under `on_error: deny` is `denied`;
        // under `standard` the result is nil and the failure `fell_back`.
        // `lines`: what the script logged, or nil.
        methods.add_method("run_step", |lua, this, (hook, input, opts): (Value, Value, Value)| {
            let (outcome, lines) = run_captured(lua, this, &hook, &input, &opts);
            let lines = log_lines(lua, lines)?;
            Ok(match outcome {
                Ok(json) => {
                    let v = match json {
                        Json::Null => Value::Nil,
                        json => convert::to_lua(lua, &json, &this.shared.array_mt)?,
                    };
                    MultiValue::from_vec(vec![v, Value::Nil, lines, Value::Nil])
                }
                Err(f) => {
                    let named = hook_name(&hook).ok().and_then(|h| h.parse::<HookName>().ok());
                    let denies = named.is_none_or(|h| llmproxy_core::request_handle::denies(&this.engine, h));
                    let err = Value::Table(this.shared.error(lua, f)?);
                    if denies {
                        MultiValue::from_vec(vec![Value::Nil, err, lines, Value::Nil])
                    } else {
                        MultiValue::from_vec(vec![Value::Nil, Value::Nil, lines, err])
                    }
                }
            })
        });
        // engine:handle(request, body, method?) -> a request handle
        // (handle.rs), or nil, err for a request to answer 400:
        // `err.status`, `err.type` and `err.code` name the refusal when the
        // body is refused. Without `method`, `request.path` must be an API
        // endpoint's; with it, any request has a handle (API calls: a POST
        // to an API path; the rest are relayed as is).
        methods.add_function(
            "handle",
            |lua, (ud, request, body, method): (AnyUserData, Value, mlua::LuaString, Option<mlua::LuaString>)| {
                let (built, shared) = {
                    let this = ud.borrow::<LuaEngine>()?;
                    let built = panic::catch_unwind(AssertUnwindSafe(|| {
                        let fields = self::request(lua, &request, &this.shared.array_mt)?;
                        let method = method.as_ref().map(|m| m.to_string_lossy());
                        let sizes = (fields.depth(), body.as_bytes().len());
                        let h = input::request_handle(&this.engine, fields, &body.as_bytes(), method.as_deref())?;
                        Ok((h, sizes))
                    }))
                    .unwrap_or_else(|payload| Err(input::Refused::Fields(from_panic(payload))));
                    (built, this.shared.clone())
                };
                match built {
                    Ok((h, sizes)) => {
                        let h = lua.create_userdata(handle::LuaHandle::new(ud, h, sizes, shared))?;
                        Ok(MultiValue::from_vec(vec![Value::UserData(h)]))
                    }
                    Err(input::Refused::Fields(f)) => shared.fail(lua, f),
                    Err(input::Refused::Body(e)) => {
                        let t = shared.error(lua, Failure::invalid(e.message))?;
                        t.raw_set("status", e.status)?;
                        t.raw_set("type", e.kind.as_str())?;
                        t.raw_set("code", e.code)?;
                        Ok(MultiValue::from_vec(vec![Value::Nil, Value::Table(t)]))
                    }
                }
            },
        );
        methods.add_method(
            "run_prepared",
            |lua, this, (hook, request, globals, opts): (Value, Value, Value, Value)| {
                let (outcome, lines) = script_log::capture(|| {
                    panic::catch_unwind(AssertUnwindSafe(|| {
                        let opts = RunOptions::from_lua(&opts)?;
                        run_prepared(this, &hook, &request, &globals).map(|r| opts.apply(r))
                    }))
                    .unwrap_or_else(|payload| Err(from_panic(payload)))
                });
                respond(lua, this, outcome, lines)
            },
        );
        // engine:models_body() -> the JSON text of `GET /v1/models`, as the
        // gateway answers it (core's rule: gateway.models, else the
        // backend names).
        methods.add_method("models_body", |_, this, ()| {
            Ok(llmproxy_core::models::models_body(this.engine.config()))
        });
        methods.add_method("backends", |lua, this, ()| backends(lua, this));
        methods.add_method("gateway", |lua, this, ()| gateway(lua, this));
        methods.add_method("pool_stats", |lua, this, ()| {
            let s = this.engine.pool_stats();
            let t = lua.create_table_with_capacity(0, 6)?;
            t.raw_set("capacity", s.capacity)?;
            t.raw_set("alive", s.alive)?;
            t.raw_set("idle", s.idle)?;
            t.raw_set("created", s.created)?;
            t.raw_set("discarded", s.discarded)?;
            t.raw_set("recycled", s.recycled)?;
            Ok(t)
        });
        // engine:ignored_fields() -> {hook = count}: result fields scripts
        // returned that their hook does not use (ignored, logged once).
        methods.add_method("ignored_fields", |lua, this, ()| {
            let t = lua.create_table_with_capacity(0, HookName::ALL.len())?;
            for hook in HookName::ALL {
                t.raw_set(hook.as_str(), this.engine.ignored_fields(hook))?;
            }
            Ok(t)
        });
        // engine:ignored_fields_total() -> count: the sum of the above, one
        // integer: the log phase compares it to refresh the metric only
        // when a request added to it.
        methods.add_method("ignored_fields_total", |_, this, ()| {
            Ok(HookName::ALL
                .iter()
                .map(|&h| this.engine.ignored_fields(h))
                .sum::<u64>())
        });
        methods.add_method("enabled", |_, this, hook: String| {
            Ok(hook.parse::<HookName>().is_ok_and(|h| this.engine.is_enabled(h)))
        });
        // engine:on_error(hook) -> "standard" | "deny" (nil: not enabled):
        // the failure policy a host applies when the hook fails.
        methods.add_method("on_error", |_, this, hook: String| {
            let cfg = hook.parse::<HookName>().ok().and_then(|h| this.engine.config().hook(h));
            Ok(cfg.map(|c| match c.on_error {
                OnError::Standard => "standard",
                OnError::Deny => "deny",
            }))
        });
        // engine:key(api_key) -> key_info table (the record's fields), its
        // fingerprint; nil when the key is not configured.
        methods.add_method("key", |lua, this, key: Option<mlua::LuaString>| {
            let Some(key) = key else {
                return Ok(MultiValue::new());
            };
            let Some(e) = key.to_str().ok().and_then(|k| this.keys.get(&k)) else {
                return Ok(MultiValue::new());
            };
            let info = convert::to_lua(lua, &e.info, &this.shared.array_mt)?;
            Ok(MultiValue::from_vec(vec![
                info,
                Value::String(lua.create_string(&e.fingerprint)?),
            ]))
        });
        // engine:caller_identified(api_key, client_ip) -> boolean: the key
        // is known, active, unexpired and allowed from the address; with
        // auth on, only such a caller's failures go through error_handler
        // (core's `policy::failure`, docs/adr/042).
        methods.add_method(
            "caller_identified",
            |_, this, (key, ip): (Option<mlua::LuaString>, Option<mlua::LuaString>)| {
                let key = key.as_ref().and_then(|k| k.to_str().ok().map(|s| s.to_owned()));
                let ip = ip.as_ref().and_then(|k| k.to_str().ok().map(|s| s.to_owned()));
                Ok(keys::identified(&this.keys, key.as_deref(), ip.as_deref()))
            },
        );
        // engine:key_fingerprint(api_key) -> "sha256:..." (core's), for
        // any presented key, configured or not.
        methods.add_method("key_fingerprint", |_, _, key: mlua::LuaString| {
            Ok(llmproxy_core::keys::key_fingerprint(&key.to_string_lossy()))
        });
        // engine:admission() -> {auth, limits, keys,
        // global_rpm, key_rpm, key_tpm, key_concurrency, ledger?}
        methods.add_method("admission", |lua, this, ()| {
            let config = this.engine.config();
            let a = this.admission;
            let t = lua.create_table()?;
            t.raw_set("auth", a.auth_on)?;
            t.raw_set("limits", a.limit_on)?;
            t.raw_set("keys", this.keys.len())?;
            let l = &config.limits;
            t.raw_set("global_rpm", l.global_rpm)?;
            t.raw_set("key_rpm", l.key_rpm)?;
            t.raw_set("key_tpm", l.key_tpm)?;
            t.raw_set("key_concurrency", l.key_concurrency)?;
            if let Some(ledger) = &config.ledger {
                t.raw_set("ledger", ledger.path.to_string_lossy().into_owned())?;
            }
            Ok(t)
        });
        // engine:state() -> where counters live (`state:`): `{backend,
        // on_error, mode, timeout_ms, connections, prefix, host, port, username, password,
        // db, instance_ttl_ms, heartbeat_ms, scripts = {name = source}}`;
        // the Redis layout and scripts are the core's (`shared_state`), the
        // gateway's too.
        methods.add_method("state", |lua, this, ()| {
            use llmproxy_core::config::{StateBackend, StateMode, StateOnError};
            use llmproxy_core::redis_url::RedisUrl;
            use llmproxy_core::shared_state as ss;
            let cfg = &this.engine.config().state;
            let t = lua.create_table_with_capacity(0, 12)?;
            t.raw_set(
                "backend",
                match cfg.backend {
                    StateBackend::Local => "local",
                    StateBackend::Redis => "redis",
                },
            )?;
            t.raw_set(
                "on_error",
                match cfg.on_error {
                    StateOnError::Deny => "deny",
                    StateOnError::Allow => "allow",
                },
            )?;
            // nginx runs the exact scripts whatever `state.mode` says
            // (docs/adr/051); the mode is shown for `llmproxy check`-like
            // tooling.
            t.raw_set(
                "mode",
                match cfg.mode {
                    StateMode::Batched => "batched",
                    StateMode::Exact => "exact",
                },
            )?;
            t.raw_set("timeout_ms", cfg.timeout_ms)?;
            t.raw_set("connections", cfg.connections)?;
            t.raw_set("prefix", cfg.prefix.as_str())?;
            t.raw_set("instance_ttl_ms", ss::INSTANCE_TTL_MS)?;
            t.raw_set("heartbeat_ms", ss::HEARTBEAT_MS)?;
            if cfg.backend == StateBackend::Redis {
                let url = RedisUrl::parse(cfg.url.as_deref().unwrap_or("redis://127.0.0.1:6379"))
                    .and_then(|u| u.for_nginx().map(|()| u))
                    .map_err(|e| mlua::Error::runtime(format!("state.url: {e}")))?;
                // A cosocket connects to an IPv6 address in brackets.
                let host = url.host();
                if host.contains(':') {
                    t.raw_set("host", format!("[{host}]"))?;
                } else {
                    t.raw_set("host", host)?;
                }
                t.raw_set("port", url.port())?;
                t.raw_set("db", url.db)?;
                t.raw_set("username", url.username.as_deref())?;
                t.raw_set("password", url.password.as_deref())?;
            }
            let scripts = lua.create_table_with_capacity(0, ss::SCRIPTS.len())?;
            for (name, src) in ss::SCRIPTS {
                scripts.raw_set(name, src)?;
            }
            t.raw_set("scripts", scripts)?;
            Ok(t)
        });
        // engine:state_keys(id) -> the Redis keys of a caller (nil: no key):
        // global rpm, key rpm, key tpm, key slots, key quota, and the
        // instance announcements' prefix.
        methods.add_method("state_keys", |_, this, id: Option<mlua::BorrowedStr>| {
            let l = llmproxy_core::shared_state::Layout::new(&this.engine.config().state.prefix);
            let id = id.as_deref().unwrap_or("-");
            Ok((
                l.global_rpm(),
                l.key_rpm(id),
                l.key_tpm(id),
                l.key_slots(id),
                l.quota(id),
                l.instance(""),
            ))
        });
        // engine:limiter() -> the core's limiter rule for the config's
        // `limits:` (see `limiter.rs`).
        methods.add_method("limiter", |_, this, ()| {
            Ok(limiter::LuaLimiter(this.engine.config().limits.clone()))
        });
        // engine:auth_throttle() -> the core's auth throttle for the config's
        // `gateway.auth_throttle` (see `limiter.rs`).
        methods.add_method("auth_throttle", |_, this, ()| {
            let cfg = &this.engine.config().gateway.auth_throttle;
            Ok(limiter::LuaThrottle(llmproxy_core::policy::throttle::Throttle::new(
                cfg,
            )))
        });
        // engine:ledger_flush(seconds) -> whether everything queued so far
        // was committed within `seconds` (nil without a ledger). Blocks the
        // caller: for a worker that is exiting, never on a request's path.
        methods.add_method("ledger_flush", |_, this, seconds: Option<f64>| {
            let Some(w) = &this.ledger else {
                return Ok(None);
            };
            let secs = seconds.filter(|s| s.is_finite() && *s >= 0.0).unwrap_or(5.0).min(60.0);
            Ok(Some(w.flush_within(std::time::Duration::from_secs_f64(secs))))
        });
        // engine:ledger_stats() -> {written, batches, failed, dropped, pending} or nil.
        methods.add_method("ledger_stats", |lua, this, ()| {
            let Some(w) = &this.ledger else {
                return Ok(None);
            };
            let s = &w.stats;
            let t = lua.create_table()?;
            t.raw_set("written", s.written.load(std::sync::atomic::Ordering::Relaxed))?;
            t.raw_set("batches", s.batches.load(std::sync::atomic::Ordering::Relaxed))?;
            t.raw_set("failed", s.failed.load(std::sync::atomic::Ordering::Relaxed))?;
            t.raw_set("dropped", s.dropped.load(std::sync::atomic::Ordering::Relaxed))?;
            t.raw_set("pending", s.pending.load(std::sync::atomic::Ordering::Relaxed))?;
            Ok(Some(t))
        });
        // engine:key_quotas() -> {fingerprint = configured used_quota}.
        methods.add_method("key_quotas", |lua, this, ()| {
            let t = lua.create_table()?;
            for (fp, used) in this.keys.quota_keys() {
                t.raw_set(fp, used)?;
            }
            Ok(t)
        });
        // engine:ledger_sync() -> {fingerprint = used} for every configured
        // key: where each key's quota usage starts (nil, err on failure; nil
        // without a ledger).
        methods.add_method("ledger_sync", |lua, this, ()| {
            let Some(w) = &this.ledger else {
                return Ok(MultiValue::new());
            };
            let keys = this.keys.quota_keys();
            match ledger::sync_keys(w, &keys) {
                Ok(rows) => {
                    let t = lua.create_table()?;
                    for (fp, used) in rows {
                        t.raw_set(fp, used)?;
                    }
                    Ok(MultiValue::from_vec(vec![Value::Table(t)]))
                }
                Err(e) => Ok(MultiValue::from_vec(vec![
                    Value::Nil,
                    Value::String(lua.create_string(e)?),
                ])),
            }
        });
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("llmproxy.engine"));
    }
}

/// `res, nil` (`nil, nil` for a nil result) or `nil, err`; then, when the
/// script logged, a third value: its lines, `{ {level, message,
/// request_id, hook, script}, ... }`, for the host to write.
fn respond(
    lua: &Lua,
    this: &LuaEngine,
    outcome: Result<Json, Failure>,
    lines: Vec<script_log::Line>,
) -> mlua::Result<MultiValue> {
    let outcome = match outcome {
        Ok(Json::Null) => Ok(Value::Nil),
        Ok(json) => Ok(convert::to_lua(lua, &json, &this.shared.array_mt)?),
        Err(f) => Err(f),
    };
    reply(lua, &this.shared, outcome, lines)
}

/// `value, nil` or `nil, err`, then the lines the call's scripts logged
/// (when there are any).
fn reply(
    lua: &Lua,
    shared: &Shared,
    outcome: Result<Value, Failure>,
    lines: Vec<script_log::Line>,
) -> mlua::Result<MultiValue> {
    let mut out = outcome_values(lua, shared, outcome)?;
    if !lines.is_empty() {
        out.push_back(log_lines(lua, lines)?);
    }
    Ok(out)
}

/// `value, nil` or `nil, err`.
fn outcome_values(lua: &Lua, shared: &Shared, outcome: Result<Value, Failure>) -> mlua::Result<MultiValue> {
    match outcome {
        Ok(value) => Ok(MultiValue::from_vec(vec![value, Value::Nil])),
        Err(f) => shared.fail(lua, f),
    }
}

/// The lines a call's scripts logged as
/// `{ {level, message, request_id, hook, script}, ... }`, or nil for none.
fn log_lines(lua: &Lua, lines: Vec<script_log::Line>) -> mlua::Result<Value> {
    if lines.is_empty() {
        return Ok(Value::Nil);
    }
    let t = lua.create_table_with_capacity(lines.len(), 0)?;
    for (i, l) in lines.into_iter().enumerate() {
        let e = lua.create_table_with_capacity(0, 5)?;
        e.raw_set("level", l.level)?;
        e.raw_set("message", l.message)?;
        e.raw_set("request_id", l.request_id)?;
        e.raw_set("hook", l.hook)?;
        e.raw_set("script", l.script)?;
        t.raw_set(i + 1, e)?;
    }
    Ok(Value::Table(t))
}

/// A charge as `{ billable_tokens, limit_tokens, prompt_tokens,
/// completion_tokens, total_tokens, cost, metrics = {kind = value} }`, with
/// `record_json` when given.
fn charge_table(
    lua: &Lua,
    keys: &ChargeKeys,
    c: &llmproxy_core::policy::usage::Charge,
    record_json: Option<&str>,
) -> mlua::Result<Table> {
    let out = lua.create_table_with_capacity(0, 8)?;
    out.raw_set(&keys.billable_tokens, c.billable_tokens)?;
    out.raw_set(&keys.limit_tokens, c.limit_tokens)?;
    out.raw_set(&keys.prompt_tokens, c.prompt_tokens)?;
    out.raw_set(&keys.completion_tokens, c.completion_tokens)?;
    out.raw_set(&keys.total_tokens, c.total_tokens)?;
    out.raw_set(&keys.cost, c.cost)?;
    let metrics = lua.create_table_with_capacity(0, c.metrics.len())?;
    for (kind, v) in &c.metrics {
        match keys.kind(kind) {
            Some(key) => metrics.raw_set(key, *v)?,
            None => metrics.raw_set(*kind, *v)?,
        }
    }
    out.raw_set(&keys.metrics, metrics)?;
    if let Some(text) = record_json {
        out.raw_set(&keys.record_json, lua.create_string(text)?)?;
    }
    Ok(out)
}

/// `engine:backends()`: the config's backends, in config order, as
/// `{ {name=, url=, weight=, headers={...}}, ... }` (an array).
fn backends(lua: &Lua, this: &LuaEngine) -> mlua::Result<Table> {
    let list = &this.engine.config().backends;
    let t = lua.create_table_with_capacity(list.len(), 0)?;
    for (i, b) in list.iter().enumerate() {
        let item = lua.create_table_with_capacity(0, 4)?;
        item.raw_set("name", b.name.as_str())?;
        item.raw_set("url", b.url.as_str())?;
        item.raw_set("weight", b.weight)?;
        let headers = lua.create_table_with_capacity(0, b.headers.len())?;
        for (k, v) in &b.headers {
            headers.raw_set(k.as_str(), v.as_str())?;
        }
        item.raw_set("headers", headers)?;
        // The backend's timeouts, its overrides over `gateway.timeouts`.
        let d = &this.engine.config().gateway.timeouts;
        let o = &b.timeouts;
        let timeouts = lua.create_table_with_capacity(0, 3)?;
        timeouts.raw_set("connect_ms", o.connect_ms.unwrap_or(d.connect_ms))?;
        timeouts.raw_set("first_byte_ms", o.first_byte_ms.unwrap_or(d.first_byte_ms))?;
        timeouts.raw_set("idle_ms", o.idle_ms.unwrap_or(d.idle_ms))?;
        item.raw_set("timeouts", timeouts)?;
        t.raw_set(i + 1, item)?;
    }
    t.set_metatable(Some(this.shared.array_mt.clone()))?;
    Ok(t)
}

/// `engine:gateway()`: the config's `gateway:` section (defaults filled
/// in), for hosts that proxy: body and response size limits, the default
/// balancer, retries, timeouts and health checking.
fn gateway(lua: &Lua, this: &LuaEngine) -> mlua::Result<Table> {
    let g = &this.engine.config().gateway;
    let t = lua.create_table_with_capacity(0, 7)?;
    t.raw_set("max_body_bytes", g.max_body_bytes)?;
    t.raw_set("max_response_bytes", g.max_response_bytes)?;
    t.raw_set("max_event_bytes", g.max_event_bytes)?;
    t.raw_set("balancer", g.balancer.as_str())?;
    let retry = lua.create_table_with_capacity(0, 4)?;
    retry.raw_set("max_retries", g.retry.max_retries)?;
    let on_status = lua.create_table_with_capacity(g.retry.on_status.len(), 0)?;
    for (i, s) in g.retry.on_status.iter().enumerate() {
        on_status.raw_set(i + 1, *s)?;
    }
    on_status.set_metatable(Some(this.shared.array_mt.clone()))?;
    retry.raw_set("on_status", on_status)?;
    retry.raw_set("on_connect_error", g.retry.on_connect_error)?;
    retry.raw_set("on_timeout", g.retry.on_timeout)?;
    let (directive, unsupported) = next_upstream(&g.retry);
    let default = next_upstream(&llmproxy_core::config::RetryConfig::default()).0;
    retry.raw_set("next_upstream_is_default", directive == default)?;
    retry.raw_set("next_upstream", directive)?;
    let unsupported = lua.create_sequence_from(unsupported)?;
    unsupported.set_metatable(Some(this.shared.array_mt.clone()))?;
    retry.raw_set("next_upstream_unsupported", unsupported)?;
    t.raw_set("retry", retry)?;
    let timeouts = lua.create_table_with_capacity(0, 3)?;
    timeouts.raw_set("connect_ms", g.timeouts.connect_ms)?;
    timeouts.raw_set("first_byte_ms", g.timeouts.first_byte_ms)?;
    timeouts.raw_set("idle_ms", g.timeouts.idle_ms)?;
    t.raw_set("timeouts", timeouts)?;
    let h = &g.health;
    let health = lua.create_table_with_capacity(0, 6)?;
    health.raw_set("failures_to_unhealthy", h.failures_to_unhealthy)?;
    health.raw_set("successes_to_healthy", h.successes_to_healthy)?;
    health.raw_set("cooldown_ms", h.cooldown_ms)?;
    health.raw_set("probe_interval_ms", h.probe_interval_ms)?;
    health.raw_set("probe_path", h.probe_path.as_str())?;
    health.raw_set("probe_timeout_ms", h.probe_timeout_ms)?;
    t.raw_set("health", health)?;
    Ok(t)
}

/// Statuses nginx's `proxy_next_upstream` can name (`http_NNN`).
const NGINX_RETRY_STATUSES: [u16; 7] = [403, 404, 429, 500, 502, 503, 504];

/// The `proxy_next_upstream` value under which nginx retries what
/// `gateway.retry` says the gateway retries (a POST is retried too:
/// `non_idempotent`), and the statuses it lists that nginx cannot name.
/// nginx decides whether a failure is retried before the module's balancer
/// runs, so the policy reaches it only through this directive.
fn next_upstream(retry: &llmproxy_core::config::RetryConfig) -> (String, Vec<u16>) {
    if retry.max_retries == 0 {
        return ("off".into(), Vec::new());
    }
    let mut parts: Vec<String> = Vec::new();
    if retry.on_connect_error {
        parts.push("error".into());
    }
    if retry.on_timeout {
        parts.push("timeout".into());
    }
    let mut statuses = retry.on_status.clone();
    statuses.sort_unstable();
    statuses.dedup();
    let (named, unsupported): (Vec<u16>, Vec<u16>) =
        statuses.into_iter().partition(|s| NGINX_RETRY_STATUSES.contains(s));
    parts.extend(named.iter().map(|s| format!("http_{s}")));
    if parts.is_empty() {
        return ("off".into(), unsupported);
    }
    parts.push("non_idempotent".into());
    (parts.join(" "), unsupported)
}

/// Options of `engine:run` and `engine:run_prepared` (an optional last
/// argument, a table).
#[derive(Debug, Default, Clone, Copy)]
struct RunOptions {
    /// `body_json = true`: a result's `body` comes back as JSON text,
    /// serialized in Rust (key order kept, `[]`/`{}`/null exact), for a
    /// host that sends it on without looking inside.
    body_json: bool,
}

impl RunOptions {
    fn from_lua(v: &Value) -> Result<RunOptions, Failure> {
        match v {
            Value::Nil => Ok(RunOptions::default()),
            Value::Table(t) => {
                let mut opts = RunOptions::default();
                for pair in t.pairs::<Value, Value>() {
                    let (k, v) = pair.map_err(|e| Failure::invalid(format!("opts: {e}")))?;
                    match (&k, &v) {
                        (Value::String(k), Value::Boolean(b)) if *k == "body_json" => opts.body_json = *b,
                        (Value::String(k), Value::Nil) if *k == "body_json" => {}
                        _ => {
                            return Err(Failure::invalid(format!(
                                "opts: unknown option {} (known: body_json = boolean)",
                                describe_key(&k)
                            )))
                        }
                    }
                }
                Ok(opts)
            }
            other => Err(Failure::invalid(format!(
                "opts must be a table or nil, got {}",
                other.type_name()
            ))),
        }
    }

    fn apply(self, result: Json) -> Json {
        match result {
            Json::Object(mut map) if self.body_json => {
                if let Some(body) = map.get_mut("body") {
                    *body = Json::String(body.to_string());
                }
                Json::Object(map)
            }
            other => other,
        }
    }
}

fn describe_key(k: &Value) -> String {
    match k {
        Value::String(s) => format!("'{}'", s.to_string_lossy()),
        other => format!("of type {}", other.type_name()),
    }
}

/// `response.body_raw` (JSON text) -> `response.body`, parsed here, as
/// `request.body_raw` is. Returns the text's size (it counts against the
/// hook's `max_input_bytes`).
fn splice_response_raw(globals: &mut Json) -> Result<usize, Failure> {
    let Some(Json::Object(response)) = globals.get_mut("response") else {
        return Ok(0);
    };
    let Some(raw) = response.remove("body_raw") else {
        return Ok(0);
    };
    let Json::String(text) = raw else {
        return Err(Failure::invalid("response.body_raw must be a string of JSON text"));
    };
    if response.contains_key("body") {
        return Err(Failure::invalid("response: give body or body_raw, not both"));
    }
    let limits = llmproxy_core::convert::Limits {
        max_depth: input::MAX_DEPTH,
        max_bytes: input::MAX_BYTES,
    };
    let body = llmproxy_core::convert::parse_json(text.as_bytes(), limits)
        .map_err(|e| Failure::invalid(format!("response.body_raw: {e}")))?;
    response.insert(String::from("body"), body);
    Ok(text.len())
}

/// The hook argument's text.
fn hook_name(hook: &Value) -> Result<mlua::BorrowedStr, Failure> {
    let Value::String(hook) = hook else {
        return Err(Failure::invalid(format!(
            "hook must be a string, got {}",
            hook.type_name()
        )));
    };
    hook.to_str().map_err(|_| Failure::invalid("hook is not valid UTF-8"))
}

/// `engine:run(hook, input, opts)`: the result (panics caught) and the
/// lines its script logged.
fn run_captured(
    lua: &Lua,
    this: &LuaEngine,
    hook: &Value,
    input: &Value,
    opts: &Value,
) -> (Result<Json, Failure>, Vec<script_log::Line>) {
    script_log::capture(|| {
        panic::catch_unwind(AssertUnwindSafe(|| {
            let opts = RunOptions::from_lua(opts)?;
            run(lua, this, hook, input).map(|r| opts.apply(r))
        }))
        .unwrap_or_else(|payload| Err(from_panic(payload)))
    })
}

/// `engine:run` without the Lua plumbing: input to JSON, run, result.
fn run(lua: &Lua, this: &LuaEngine, hook: &Value, input: &Value) -> Result<Json, Failure> {
    let hook = hook_name(hook)?;
    let (hook, cfg) = input::enabled(&this.engine, &hook)?;
    let max_depth = cfg.limits.max_depth.saturating_add(1);
    let value = match input {
        // JSON text: parsed once, in Rust.
        Value::String(s) => {
            let limits = llmproxy_core::convert::Limits {
                max_depth,
                max_bytes: cfg.limits.max_input_bytes,
            };
            llmproxy_core::convert::parse_json(&s.as_bytes(), limits)
                .map_err(|e| Failure::invalid(format!("input: {e}")))?
        }
        Value::Table(t) => {
            // A request parsed by llmproxy.request: convert only the rest.
            if let Ok(Value::UserData(ud)) = t.raw_get::<Value>("request") {
                if let Ok(request) = ud.borrow::<LuaRequest>() {
                    let globals = table_globals(lua, t, &this.shared.array_mt, max_depth, true)?;
                    return input::run(&this.engine, hook.as_str(), Some(&request.request), Some(&globals));
                }
            }
            let mut value = ToJson {
                lua,
                array_mt: &this.shared.array_mt,
                max_depth,
            }
            .convert(input)
            .map_err(|e| Failure::invalid(e.describe("input")))?;
            splice_response_raw(&mut value)?;
            value
        }
        other => {
            return Err(Failure::invalid(format!(
                "input must be a table of the hook's globals (or JSON text), got {}",
                other.type_name()
            )))
        }
    };
    Ok(this.engine.run_json(hook, &value)?)
}

/// `engine:run_prepared(hook, request, globals)`: both handles or nil.
fn run_prepared(this: &LuaEngine, hook: &Value, request: &Value, globals: &Value) -> Result<Json, Failure> {
    let hook = hook_name(hook)?;
    let request = match request {
        Value::Nil => None,
        Value::UserData(ud) => Some(
            ud.borrow::<LuaRequest>()
                .map_err(|_| Failure::invalid("request must be an llmproxy.request or nil"))?,
        ),
        other => {
            return Err(Failure::invalid(format!(
                "request must be an llmproxy.request or nil, got {}",
                other.type_name()
            )))
        }
    };
    let globals = match globals {
        Value::Nil => None,
        Value::UserData(ud) => Some(
            ud.borrow::<LuaGlobals>()
                .map_err(|_| Failure::invalid("globals must be an llmproxy.globals or nil"))?,
        ),
        other => {
            return Err(Failure::invalid(format!(
                "globals must be an llmproxy.globals or nil, got {}",
                other.type_name()
            )))
        }
    };
    input::run(
        &this.engine,
        &hook,
        request.as_ref().map(|r| &r.request),
        globals.as_ref().map(|g| &g.globals),
    )
}

/// The globals in `t` as JSON (members are at depth 2). With
/// `skip_request`, `request` is left out (it is a handle); without, it is
/// an error.
fn table_globals(
    lua: &Lua,
    t: &Table,
    array_mt: &Table,
    max_depth: usize,
    skip_request: bool,
) -> Result<Globals, Failure> {
    let map = ToJson {
        lua,
        array_mt,
        max_depth,
    }
    .globals(t, skip_request)
    .map_err(|e| match e {
        GlobalsError::Key(kind) => Failure::invalid(format!("input: a {kind} key cannot name a global")),
        GlobalsError::KeyNotUtf8 => Failure::invalid("input: a key is not valid UTF-8"),
        GlobalsError::Request => {
            Failure::invalid("globals: 'request' is not a global here: pass it as an llmproxy.request")
        }
        GlobalsError::Value(key, e) => Failure::invalid(e.describe(&format!("input.{key}"))),
        GlobalsError::Lua(m) => Failure::invalid(format!("input: {m}")),
    })?;
    let mut value = Json::Object(map);
    let raw_bytes = splice_response_raw(&mut value)?;
    let Json::Object(map) = value else {
        unreachable!("an object stays an object");
    };
    Globals::from_map(map, raw_bytes)
}

/// A hook's other globals parsed once (`llmproxy.globals`), for
/// `engine:run_prepared`.
struct LuaGlobals {
    globals: Globals,
}

impl UserData for LuaGlobals {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("llmproxy.globals"));
    }
}

/// `llmproxy.globals(tbl_or_json)` without the Lua plumbing.
fn globals(lua: &Lua, value: &Value, array_mt: &Table) -> Result<Globals, Failure> {
    match value {
        Value::String(s) => Globals::parse(&s.as_bytes()),
        Value::Table(t) => table_globals(lua, t, array_mt, input::MAX_DEPTH + 1, false),
        other => Err(Failure::invalid(format!(
            "globals must be a table or JSON text, got {}",
            other.type_name()
        ))),
    }
}

/// A request parsed once (`llmproxy.request`), usable as `input.request`.
struct LuaRequest {
    request: Request,
    shared: Shared,
}

impl UserData for LuaRequest {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // req:with(fields) -> a new handle with these fields set; the body
        // is shared unless fields hold `body` or `body_raw`.
        methods.add_method("with", |lua, this, fields: Value| {
            let built = panic::catch_unwind(AssertUnwindSafe(|| with_fields(lua, this, &fields)))
                .unwrap_or_else(|payload| Err(from_panic(payload)));
            match built {
                Ok(request) => {
                    let ud = lua.create_userdata(LuaRequest {
                        request,
                        shared: this.shared.clone(),
                    })?;
                    Ok(MultiValue::from_vec(vec![Value::UserData(ud)]))
                }
                Err(f) => this.shared.fail(lua, f),
            }
        });
        // req:body_get(pointer) -> the body's value at a JSON pointer
        // (RFC 6901, "" = the whole body), converted alone; nil if absent.
        methods.add_method("body_get", |lua, this, pointer: Value| {
            let Value::String(p) = pointer else {
                return this.shared.fail(
                    lua,
                    Failure::invalid(format!("pointer must be a string, got {}", pointer.type_name())),
                );
            };
            let p = p.to_string_lossy();
            if !p.is_empty() && !p.starts_with('/') {
                return this.shared.fail(
                    lua,
                    Failure::invalid(format!("pointer '{p}' must be empty or start with '/'")),
                );
            }
            let value = match this.request.info().body.pointer(&p) {
                None => Value::Nil,
                Some(v) => convert::to_lua(lua, v, &this.shared.array_mt)?,
            };
            Ok(MultiValue::from_vec(vec![value]))
        });
        // req:check_fields() -> nil when the OpenAI fields a host decides on
        // (`model`, `stream`, `stream_options`, `stream_options.include_usage`)
        // have their OpenAI types, else a message naming the first that does
        // not (core's `llmproxy_core::http::fields`, as the gateway).
        methods.add_method(
            "check_fields",
            |lua, this, ()| match llmproxy_core::http::fields::check(&this.request.info().body) {
                Ok(()) => Ok(Value::Nil),
                Err(e) => Ok(Value::String(lua.create_string(e.to_string())?)),
            },
        );
        // req:body_json(patch?) -> the body as JSON text (key order kept),
        // with a JSON merge patch (RFC 7386) applied when given.
        methods.add_method("body_json", |lua, this, patch: Value| {
            let out = panic::catch_unwind(AssertUnwindSafe(|| body_json(lua, this, &patch)))
                .unwrap_or_else(|payload| Err(from_panic(payload)));
            match out {
                Ok(text) => Ok(MultiValue::from_vec(vec![Value::String(lua.create_string(text)?)])),
                Err(f) => this.shared.fail(lua, f),
            }
        });
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("llmproxy.request"));
    }
}

/// `req:with(fields)` without the Lua plumbing.
fn with_fields(lua: &Lua, this: &LuaRequest, fields: &Value) -> Result<Request, Failure> {
    let (json, bytes) = match fields {
        Value::String(s) => {
            let limits = llmproxy_core::convert::Limits {
                max_depth: input::MAX_DEPTH,
                max_bytes: input::MAX_BYTES,
            };
            let text = s.as_bytes();
            let v = llmproxy_core::convert::parse_json(&text, limits)
                .map_err(|e| Failure::invalid(format!("fields: {e}")))?;
            (v, text.len())
        }
        Value::Table(_) => {
            let v = ToJson {
                lua,
                array_mt: &this.shared.array_mt,
                max_depth: input::MAX_DEPTH,
            }
            .convert(fields)
            .map_err(|e| Failure::invalid(e.describe("fields")))?;
            (v, 0)
        }
        other => {
            return Err(Failure::invalid(format!(
                "fields must be a table or JSON text, got {}",
                other.type_name()
            )))
        }
    };
    if !json.is_object() {
        return Err(Failure::invalid("fields must be an object"));
    }
    this.request.with_fields(&json, bytes)
}

/// `req:body_json(patch)` without the Lua plumbing.
fn body_json(lua: &Lua, this: &LuaRequest, patch: &Value) -> Result<String, Failure> {
    let body = &this.request.info().body;
    if patch.is_nil() {
        return Ok(body.to_string());
    }
    let patch = ToJson {
        lua,
        array_mt: &this.shared.array_mt,
        max_depth: input::MAX_DEPTH,
    }
    .convert(patch)
    .map_err(|e| Failure::invalid(e.describe("patch")))?;
    let mut merged = (**body).clone();
    merge_patch(&mut merged, patch);
    Ok(merged.to_string())
}

/// RFC 7386: objects merge member by member, `null` removes a member,
/// anything else replaces.
fn merge_patch(target: &mut Json, patch: Json) {
    let Json::Object(members) = patch else {
        *target = patch;
        return;
    };
    if !target.is_object() {
        *target = Json::Object(Map::new());
    }
    let Json::Object(t) = target else {
        return;
    };
    for (k, v) in members {
        if v.is_null() {
            t.shift_remove(&k);
        } else {
            merge_patch(t.entry(k).or_insert(Json::Null), v);
        }
    }
}

/// `llmproxy.request(tbl_or_json)` without the Lua plumbing.
fn request(lua: &Lua, value: &Value, array_mt: &Table) -> Result<Request, Failure> {
    match value {
        Value::String(s) => Request::parse(&s.as_bytes()),
        Value::Table(t) => {
            if let Some(built) = request_table::read(lua, t, array_mt) {
                return Ok(built);
            }
            let json = ToJson {
                lua,
                array_mt,
                max_depth: input::MAX_DEPTH,
            }
            .convert(value)
            .map_err(|e| Failure::invalid(e.describe("request")))?;
            Request::from_value(&json, 0)
        }
        other => Err(Failure::invalid(format!(
            "request must be a table or JSON text, got {}",
            other.type_name()
        ))),
    }
}

/// A request header's value as `ngx.req.get_headers()` gives it (a string,
/// a table of the values of a header sent more than once, or nil) read
/// with core's `client::sole`: one text value, else none (a value that is
/// not UTF-8 is none too).
fn header_text(v: &Value) -> Option<String> {
    let values: Vec<String> = match v {
        Value::String(s) => vec![s.to_str().map(|t| t.to_owned()).unwrap_or_default()],
        Value::Table(t) => t.sequence_values::<String>().map(|s| s.unwrap_or_default()).collect(),
        _ => Vec::new(),
    };
    llmproxy_core::http::client::sole(values.iter().map(String::as_str)).map(str::to_owned)
}

/// Where a `llmproxy.new` argument says the config is.
enum Source {
    Yaml(String),
    File(String),
}

fn source(cfg: &Value) -> Result<Source, Failure> {
    let text = |v: &Value, what: &str| -> Result<String, Failure> {
        match v {
            Value::String(s) => s
                .to_str()
                .map(|s| s.to_owned())
                .map_err(|_| Failure::invalid(format!("{what} is not valid UTF-8"))),
            other => Err(Failure::invalid(format!(
                "{what} must be a string, got {}",
                other.type_name()
            ))),
        }
    };
    match cfg {
        Value::String(_) => {
            let s = text(cfg, "config")?;
            // One line without a ':' cannot be a useful YAML config: it is a
            // path. So is any one line that names an existing file.
            let one_line = !s.contains('\n');
            if one_line && (!s.contains(':') || Path::new(&s).is_file()) {
                Ok(Source::File(s))
            } else {
                Ok(Source::Yaml(s))
            }
        }
        Value::Table(t) => {
            let yaml: Value = t.raw_get("yaml").map_err(|e| Failure::invalid(e.to_string()))?;
            let file: Value = t.raw_get("file").map_err(|e| Failure::invalid(e.to_string()))?;
            match (yaml.is_nil(), file.is_nil()) {
                (false, true) => Ok(Source::Yaml(text(&yaml, "config.yaml")?)),
                (true, false) => Ok(Source::File(text(&file, "config.file")?)),
                _ => Err(Failure::invalid("config table needs exactly one of 'yaml' and 'file'")),
            }
        }
        other => Err(Failure::invalid(format!(
            "config must be YAML text, a file path or {{yaml=...}} / {{file=...}}, got {}",
            other.type_name()
        ))),
    }
}

fn build(cfg: &Value) -> Result<Engine, Failure> {
    let config = match source(cfg)? {
        Source::Yaml(text) => Config::from_yaml(&text, Path::new("."))?,
        Source::File(path) => Config::from_file(path)?,
    };
    Ok(Engine::new(config)?)
}

/// Whether a host module installed an engine in this process
/// (`llmproxy.installed`).
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The module table (`luaopen_llmproxy`).
///
/// `skip_memory_check`: the host's state is not ours (nginx's or a LuaJIT
/// program's), so by default mlua wraps every string, table and field it
/// creates there in a protected call, in case the host's allocator fails;
/// that wrapping was a fifth of nginx's CPU per request. Off, as in every C
/// module of OpenResty: an allocation failure of the host's LuaJIT raises
/// in it unprotected and ends the process, which is where an nginx worker
/// whose Lua heap cannot grow ends anyway (docs/adr/035-openresty-hot-path.md).
#[mlua::lua_module(name = "llmproxy", skip_memory_check)]
fn llmproxy(lua: &Lua) -> mlua::Result<Table> {
    script_log::install();
    let array_mt = lua.create_table()?;
    array_mt.raw_set("__name", "llmproxy.array")?;
    let err_mt = lua.create_table()?;
    err_mt.raw_set(
        "__tostring",
        lua.create_function(|_, e: Table| {
            let kind: String = e.raw_get("kind")?;
            let message: String = e.raw_get("message")?;
            Ok(format!("{kind}: {message}"))
        })?,
    )?;
    let shared = Shared {
        array_mt: array_mt.clone(),
        err_mt,
        charge_keys: Rc::new(ChargeKeys::new(lua)?),
    };

    let exports = lua.create_table()?;
    // What the sandbox VMs compile: "sandbox" on a host's LuaJIT (scripts
    // interpreted), unless LLMPROXY_SANDBOX_JIT lowers it to "off".
    exports.raw_set("sandbox_jit", llmproxy_core::sandbox::jit::mode().name())?;
    exports.raw_set("version", llmproxy_core::VERSION)?;
    // llmproxy.error_body(message, type, code) -> the JSON text of an error
    // the host answers itself (core's `policy::errors::error_body`, the
    // gateway's too). Bytes that are not UTF-8 become U+FFFD.
    exports.raw_set(
        "error_body",
        lua.create_function(
            |_, (message, kind, code): (mlua::LuaString, mlua::LuaString, mlua::LuaString)| {
                let text = |s: &mlua::LuaString| String::from_utf8_lossy(&s.as_bytes()).into_owned();
                Ok(llmproxy_core::policy::errors::error_body(
                    &text(&message),
                    &text(&kind),
                    &text(&code),
                ))
            },
        )?,
    )?;
    // llmproxy.upstream_message(status, body) -> what error_handler sees as
    // `error.message` for a backend's error answer (core's
    // `policy::errors::upstream_message`, the gateway's too).
    exports.raw_set(
        "upstream_message",
        lua.create_function(|_, (status, body): (u16, mlua::LuaString)| {
            Ok(llmproxy_core::policy::errors::upstream_message(
                status,
                &body.as_bytes(),
            ))
        })?,
    )?;
    // llmproxy.UNLIMITED: `rate_limit_status`'s remaining count where no
    // limit applies (core's `policy::limits::UNLIMITED`, the gateway's too).
    exports.raw_set("UNLIMITED", llmproxy_core::policy::limits::UNLIMITED)?;
    // llmproxy.shown_path(path) -> the start of a refused request's path
    // that error_handler sees (core's `http::head::shown_path`, the
    // gateway's too: cut at a character boundary). Bytes that are not
    // UTF-8 become U+FFFD, as a script's strings must be text.
    exports.raw_set(
        "shown_path",
        lua.create_function(|_, path: mlua::LuaString| {
            let bytes = path.as_bytes();
            Ok(llmproxy_core::http::head::shown_path(&String::from_utf8_lossy(&bytes)).to_owned())
        })?,
    )?;
    // Where the library's Rust allocations go: "mimalloc", or "system"
    // (the host's malloc: a build without mimalloc, or LLMPROXY_ALLOCATOR=system).
    #[cfg(feature = "mimalloc")]
    exports.raw_set("allocator", crate::allocator::name())?;
    #[cfg(not(feature = "mimalloc"))]
    exports.raw_set("allocator", "system")?;
    exports.raw_set("null", Value::NULL)?;
    exports.raw_set("empty_array", Value::LightUserData(EMPTY_ARRAY))?;
    exports.raw_set("array_mt", array_mt)?;
    // `GET /healthz`' body, as the gateway answers it.
    exports.raw_set("healthz_body", llmproxy_core::models::HEALTHZ_BODY)?;
    // llmproxy.installed([true]) -> whether a host module installed an
    // engine in this process: process-wide, so it outlives the Lua state
    // that did it (nginx with `lua_code_cache off` runs every request in
    // a fresh Lua VM, without the worker's engine, and says why).
    exports.raw_set(
        "installed",
        lua.create_function(|_, mark: Option<bool>| {
            if mark == Some(true) {
                INSTALLED.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(INSTALLED.load(std::sync::atomic::Ordering::Relaxed))
        })?,
    )?;
    let shared_globals = shared.clone();
    exports.raw_set(
        "globals",
        lua.create_function(move |lua, value: Value| {
            let shared = &shared_globals;
            let built = panic::catch_unwind(AssertUnwindSafe(|| globals(lua, &value, &shared.array_mt)))
                .unwrap_or_else(|payload| Err(from_panic(payload)));
            match built {
                Ok(globals) => {
                    let ud = lua.create_userdata(LuaGlobals { globals })?;
                    Ok(MultiValue::from_vec(vec![Value::UserData(ud)]))
                }
                Err(f) => shared.fail(lua, f),
            }
        })?,
    )?;
    // llmproxy.usage(text) -> usage (a table, llmproxy.null, or nil when
    // absent or `text` is not a JSON object), has_choices (a non-empty
    // `choices` array).
    let shared_usage = shared.clone();
    exports.raw_set(
        "usage",
        lua.create_function(move |lua, text: mlua::LuaString| {
            let Some(p) = llmproxy_core::http::usage_probe::probe(&text.as_bytes()) else {
                return Ok((Value::Nil, false));
            };
            let value = match p.usage {
                None => Value::Nil,
                Some(u) => convert::to_lua(lua, &u, &shared_usage.array_mt)?,
            };
            Ok((value, p.has_choices))
        })?,
    )?;
    // llmproxy.sse_event(data, strip_usage) -> data (the same string when
    // untouched, a new one when the forced usage was removed, nil to drop
    // the event), usage (a table or nil): core's rule for one event of a
    // backend's stream (`policy::sse`), the gateway's too.
    let shared_sse = shared.clone();
    exports.raw_set(
        "sse_event",
        lua.create_function(move |lua, (text, strip_usage): (mlua::LuaString, bool)| {
            let bytes = text.as_bytes();
            let out = llmproxy_core::policy::sse::event(&bytes, strip_usage, false);
            let data = match out.data {
                None => Value::Nil,
                Some(std::borrow::Cow::Borrowed(_)) => Value::String(text.clone()),
                Some(std::borrow::Cow::Owned(d)) => Value::String(lua.create_string(d)?),
            };
            let usage = match out.usage {
                None => Value::Nil,
                Some(u) => convert::to_lua(lua, &u, &shared_sse.array_mt)?,
            };
            Ok((data, usage))
        })?,
    )?;
    // llmproxy.usage_charge(raw, record) -> { billable_tokens, limit_tokens,
    // prompt_tokens, completion_tokens, total_tokens, cost, metrics = {kind
    // = value, ...} }: what a finished request is charged (core's
    // `policy::usage`, the gateway's rule); `record` nil when the usage hook
    // did not give one.
    let shared_charge = shared.clone();
    exports.raw_set(
        "usage_charge",
        lua.create_function(move |lua, (raw, record): (Value, Value)| {
            let to_json = ToJson {
                lua,
                array_mt: &shared_charge.array_mt,
                max_depth: 16,
            };
            let json = |v: &Value, what: &str| {
                to_json
                    .convert(v)
                    .map_err(|e| mlua::Error::runtime(format!("usage_charge: {}", e.describe(what))))
            };
            let raw = json(&raw, "raw")?;
            let record = match record {
                Value::Nil => None,
                other => Some(json(&other, "record")?),
            };
            let record = record
                .as_ref()
                .map(|r| r as &dyn llmproxy_core::policy::usage::RecordFields);
            let charge = llmproxy_core::policy::usage::charge(&raw, record);
            charge_table(lua, &shared_charge.charge_keys, &charge, None)
        })?,
    )?;
    // llmproxy.metric_headers() -> { [name] = "# HELP ...\n# TYPE ..." }:
    // core's metric catalog (`policy::metrics`), the gateway's too.
    exports.raw_set(
        "metric_headers",
        lua.create_function(|lua, ()| {
            use llmproxy_core::policy::metrics::{header, FAMILIES};
            let t = lua.create_table_with_capacity(0, FAMILIES.len())?;
            for family in FAMILIES {
                t.raw_set(family.name, header(family).trim_end())?;
            }
            Ok(t)
        })?,
    )?;
    // llmproxy.metric_values() -> { upstream_buckets, upstream_le,
    // hook_buckets, hook_le, hooks, kinds, auth_reasons, rate_reasons }:
    // the catalog's bucket bounds (with their `le` labels) and label values,
    // the gateway's too.
    exports.raw_set(
        "metric_values",
        lua.create_function(|lua, ()| {
            use llmproxy_core::policy::metrics as catalog;
            let t = lua.create_table_with_capacity(0, 8)?;
            let le = |bounds: &[f64]| bounds.iter().map(|b| catalog::le(*b)).collect::<Vec<_>>();
            t.raw_set("upstream_buckets", lua.create_sequence_from(catalog::UPSTREAM_BUCKETS)?)?;
            t.raw_set("upstream_le", lua.create_sequence_from(le(&catalog::UPSTREAM_BUCKETS))?)?;
            t.raw_set("hook_buckets", lua.create_sequence_from(catalog::HOOK_BUCKETS)?)?;
            t.raw_set("hook_le", lua.create_sequence_from(le(&catalog::HOOK_BUCKETS))?)?;
            // By `HookName::index` (the seed's table, as the gateway's
            // per-hook metrics and log lines list them).
            let mut hooks = HookName::ALL;
            hooks.sort_by_key(|h| h.index());
            t.raw_set("hooks", lua.create_sequence_from(hooks.map(HookName::as_str))?)?;
            let kinds = llmproxy_core::ErrorKind::ALL.map(llmproxy_core::ErrorKind::as_str);
            t.raw_set("kinds", lua.create_sequence_from(kinds)?)?;
            t.raw_set("auth_reasons", lua.create_sequence_from(catalog::AUTH_REASONS)?)?;
            t.raw_set("rate_reasons", lua.create_sequence_from(catalog::RATE_REASONS)?)?;
            Ok(t)
        })?,
    )?;
    // llmproxy.metric_problems(text) -> { "problem", ... }: where an
    // exposition text departs from the catalog (empty: it follows it).
    exports.raw_set(
        "metric_problems",
        lua.create_function(|lua, text: mlua::LuaString| {
            let text = text.to_str()?;
            lua.create_sequence_from(llmproxy_core::policy::metrics::check_exposition(&text))
        })?,
    )?;
    // llmproxy.limiter(limits) -> the core's limiter rule for `limits`
    // (`engine:limiter()` gives the config's).
    exports.raw_set("limiter", lua.create_function(limiter::from_table)?)?;
    // llmproxy.breaker() -> the core's circuit breaker for the shared state.
    exports.raw_set("breaker", lua.create_function(limiter::breaker)?)?;
    // llmproxy.balancer{kind, health, backends} -> the core's default
    // balancer and backend health, for one worker (see `balancer.rs`).
    exports.raw_set("balancer", lua.create_function(balancer::from_table)?)?;
    // llmproxy.failure_step(facts) -> "error_handler" | "response_transform"
    // | "send": core's order of the hooks on a failed request (ADR 042).
    exports.raw_set("failure_step", lua.create_function(policy::failure_step)?)?;
    // llmproxy.rate_step(res, took, denial): the rate limit stage's
    // decision (core's `policy::rate_stage`, the gateway's too).
    exports.raw_set("rate_step", lua.create_function(policy::rate_step)?)?;
    // llmproxy.gateway_error(name, arg?) -> type, status, code, message: the
    // failures the core names (`policy::errors`), the gateway's words.
    exports.raw_set("gateway_error", lua.create_function(policy::gateway_error)?)?;
    // llmproxy.api_key(authorization, x_api_key) -> the API key a client
    // presents (`Authorization: Bearer`, else `x-api-key`), or nil: core's
    // rule (`http::client`), the gateway's. Each header as
    // `ngx.req.get_headers()` gives it: a string, or a table when it was
    // sent more than once, which presents nothing (`client::sole`).
    exports.raw_set(
        "api_key",
        lua.create_function(|lua, (auth, key): (Value, Value)| {
            let (auth, key) = (header_text(&auth), header_text(&key));
            match llmproxy_core::http::client::api_key(auth.as_deref(), key.as_deref()) {
                Some(k) => Ok(Value::String(lua.create_string(k)?)),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    // llmproxy.request_id(client_id?) -> the request's id: the client's
    // X-Request-ID when acceptable, else a new `req_` id (core's rule and
    // generator, the gateway's).
    exports.raw_set(
        "request_id",
        lua.create_function(|_, id: Option<mlua::LuaString>| {
            Ok(llmproxy_core::http::client::request_id(
                id.as_ref().map(|s| s.as_bytes()).as_deref(),
            ))
        })?,
    )?;
    // llmproxy.canonical_path(path) -> the canonical form of a request's
    // path (no query), or nil and why there is none (core's
    // `http::path::canonical`, the gateway's: endpoints match on it, and it
    // is what goes upstream).
    exports.raw_set(
        "canonical_path",
        lua.create_function(|_, path: mlua::LuaString| {
            use llmproxy_core::http::path::{canonical, PathError};
            let bytes = path.as_bytes();
            let canonical = std::str::from_utf8(&bytes)
                .map_err(|_| PathError::Unencoded)
                .and_then(canonical);
            Ok(match canonical {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e.to_string())),
            })
        })?,
    )?;
    // llmproxy.error_type(status) -> the error type of a backend's status.
    exports.raw_set("error_type", lua.create_function(policy::error_type)?)?;
    // llmproxy.hop_by_hop(headers) -> the names of `headers` (a table as
    // `ngx.req.get_headers()` gives it) that describe the client's
    // connection and must not go upstream, or nil when there are none: the
    // core's rule, so nginx and the gateway drop the same names.
    exports.raw_set("hop_by_hop", lua.create_function(hop_headers::names)?)?;
    // llmproxy.sse_parser(max_event_bytes), llmproxy.sse_with_data(event,
    // data), llmproxy.sse_data_event(data): the core's server-sent events
    // rules (`http::sse`, the gateway's relay's), see `sse.rs`.
    exports.raw_set("sse_parser", lua.create_function(sse::new)?)?;
    exports.raw_set("sse_with_data", lua.create_function(sse::with_data)?)?;
    exports.raw_set("sse_data_event", lua.create_function(sse::data_event)?)?;
    let shared_request = shared.clone();
    exports.raw_set(
        "request",
        lua.create_function(move |lua, value: Value| {
            let shared = &shared_request;
            let built = panic::catch_unwind(AssertUnwindSafe(|| request(lua, &value, &shared.array_mt)))
                .unwrap_or_else(|payload| Err(from_panic(payload)));
            match built {
                Ok(request) => {
                    let ud = lua.create_userdata(LuaRequest {
                        request,
                        shared: shared.clone(),
                    })?;
                    Ok(MultiValue::from_vec(vec![Value::UserData(ud)]))
                }
                Err(f) => shared.fail(lua, f),
            }
        })?,
    )?;
    exports.raw_set(
        "new",
        lua.create_function(move |lua, cfg: Value| {
            let built = panic::catch_unwind(AssertUnwindSafe(|| build(&cfg)))
                .unwrap_or_else(|payload| Err(from_panic(payload)));
            match built {
                Ok(engine) => {
                    let keys = keys::KeyStore::new(engine.config());
                    let ledger = match engine.config().ledger.as_ref().map(ledger::writer) {
                        None => None,
                        Some(Ok(w)) => Some(w),
                        Some(Err(e)) => return shared.fail(lua, Failure::invalid(e)),
                    };
                    let admission = keys::admission(engine.config(), |h| engine.is_enabled(h));
                    let ud = lua.create_userdata(LuaEngine {
                        engine,
                        shared: shared.clone(),
                        keys,
                        admission,
                        ledger,
                    })?;
                    Ok(MultiValue::from_vec(vec![Value::UserData(ud)]))
                }
                Err(f) => shared.fail(lua, f),
            }
        })?,
    )?;
    Ok(exports)
}
