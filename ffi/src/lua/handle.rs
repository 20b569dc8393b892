//! `engine:handle(request, body)`: a request handle in the LuaJIT module,
//! the core's `RequestHandle` as the C ABI's `llmp_handle` exposes it.
//!
//! ```lua
//! local h, err = engine:handle({ id = id, path = "/v1/chat/completions",
//!     headers_raw = ngx.req.get_headers(), user_id = uid }, body_text)  -- 400 on err
//!                                      -- (headers_raw: the core gives scripts
//!                                      -- its form; headers: that form, given)
//! local name, err = h:route(globals)   -- llmproxy.globals({ backends = ... });
//!                                      -- nil, nil: the host's balancer
//! local up, err = h:upstream(url)      -- { body = text|nil (the client's),
//!                                      --   headers = {name = value|false}|nil,
//!                                      --   stream = bool }
//! local a, err = h:respond(status, headers, body_text, latency_ms)
//!                                      -- headers: ngx.resp.get_headers()'s form
//!                                      -- { status =, body = text|nil, headers = }
//! h:answer_is_stream(status, ctype)    -- true: h:stream + h:event; false: h:respond
//! h:stream(status, headers)            -- a stream's answer begins, then per event:
//! local ev, err = h:event(data, latency_ms)  -- { data = text|nil (as it came),
//!                                      --   drop = bool, status =, headers = }
//! local b, err = h:usage(status?, relayed?)  -- status: the client's, when the
//!                                      -- handle saw no answer; relayed: a stream's
//!                                      -- content events relayed (its usage never
//!                                      -- came: the core estimates, estimated = true);
//!                                      -- { record_json = text
//!                                      --   (the usage hook's record, else the backend's usage),
//!                                      --   billable_tokens =, limit_tokens =, ..., metrics = {...} }
//!                                      -- (llmproxy.usage_charge's table)
//! h:ledger({ node =, key_fp =, backend =, status =, is_stream =, latency_ms = })
//!                                      -- the request's ledger row, queued: true,
//!                                      -- false (queue full), nil (no ledger)
//! local r, err = h:auth(used_quota)    -- nil: admitted; r: the refusal
//!                                      -- { status =, code =, message =, reason =, throttles = }
//! local r, err = h:rate_limit(used_quota, global_remaining, key_remaining,
//!     concurrent_count, took, denial_kind, denial_retry_after)
//!                                      -- nil: admitted; "force": admitted, take the
//!                                      -- request unchecked; r: the 429 { refund =,
//!                                      -- code =, message =, retry_after =, reason = }
//! h:verdict()                          -- the last admission script's verdict, for
//!                                      -- the log: "standard" | "allow" | "deny" | "failed"
//! local api = h:api()                 -- "chat_completions" | ... | nil
//! local req = h:request()             -- an llmproxy.request sharing the body,
//!                                      -- for error_handler
//! local e = h:fell_back()              -- the last step's failure under
//!                                      -- on_error: standard, or nil
//! ```
//!
//! Each step returns `nil, err` when its hook failed under `on_error: deny`
//! (the host answers 503); then, third, the lines its script logged (nil
//! for none), fourth whether its script ran (`h:called()`) and fifth its
//! failure under `on_error: standard` (`h:fell_back()`). The handle keeps
//! its engine alive.

use std::panic::{self, AssertUnwindSafe};

use llmproxy_core::admission::{self, Decision};
use llmproxy_core::hooks::{AuthVerdict, HeaderChange, KeyInfo, RateLimitStatus, RateVerdict, RouteDecision};
use llmproxy_core::http::script_headers::{Message, ScriptHeaders};
use llmproxy_core::policy::rate_stage::{self, RateStep};
use llmproxy_core::policy::usage::Charge;
use llmproxy_core::request_handle::{Relay, RequestHandle, Step};
use llmproxy_ledger::{Charged, LedgerRecord, Served};
use mlua::{AnyUserData, Lua, LuaString, MetaMethod, MultiValue, Table, UserData, UserDataMethods, Value};

use super::{
    charge_table, keys, log_lines, outcome_values, policy, script_log, LuaEngine, LuaGlobals, LuaRequest, Shared,
};
use crate::capi::boundary::from_panic;
use crate::capi::error::Failure;
use crate::input;

/// A request handle as a Lua userdata.
pub(super) struct LuaHandle {
    /// The `LuaEngine` userdata the handle was made by.
    engine: AnyUserData,
    handle: RequestHandle,
    /// Nesting of the request's fields and size of the client's body,
    /// for `h:request()` (a hook's input limits).
    depth: usize,
    body_bytes: usize,
    shared: Shared,
    /// The failure of the last step whose hook fell back.
    fell_back: Option<Failure>,
    /// The last admission script's verdict, as the host logs it.
    verdict: &'static str,
    /// What the usage step charged (for the ledger row).
    charged: Option<(Charge, String)>,
}

impl LuaHandle {
    /// A handle made by the engine `engine` (a `LuaEngine` userdata).
    pub(super) fn new(
        engine: AnyUserData,
        handle: RequestHandle,
        (depth, body_bytes): (usize, usize),
        shared: Shared,
    ) -> LuaHandle {
        LuaHandle {
            engine,
            handle,
            depth,
            body_bytes,
            shared,
            fell_back: None,
            verdict: "standard",
            charged: None,
        }
    }

    /// Run one step on the engine, catching panics and the lines its script
    /// logged; keep a fallen-back failure; `nil, err` for a denial.
    fn step<T>(
        &mut self,
        lua: &Lua,
        run: impl FnOnce(&mut RequestHandle, &llmproxy_core::Engine) -> Result<Step<T>, Failure>,
        to_lua: impl FnOnce(&Lua, &Shared, T) -> mlua::Result<Value>,
    ) -> mlua::Result<MultiValue> {
        let engine = self.engine.borrow::<LuaEngine>()?;
        let handle = &mut self.handle;
        let (outcome, lines) = script_log::capture(|| {
            panic::catch_unwind(AssertUnwindSafe(|| run(handle, &engine.engine)))
                .unwrap_or_else(|payload| Err(from_panic(payload)))
        });
        self.fell_back = None;
        let outcome = match outcome {
            Ok(Step::Ran(v)) => Ok(to_lua(lua, &self.shared, v)?),
            Ok(Step::FellBack(v, e)) => {
                self.fell_back = Some(Failure::from(e));
                Ok(to_lua(lua, &self.shared, v)?)
            }
            Ok(Step::Denied(e)) => Err(Failure::from(e)),
            Err(f) => Err(f),
        };
        // What h:called() and h:fell_back() would say, returned with the
        // step: the host reads both after every step whose script ran, and
        // each call into the module costs more than the value.
        let fell_back = self.fell_back_value(lua)?;
        let mut out = outcome_values(lua, &self.shared, outcome)?;
        out.push_back(log_lines(lua, lines)?);
        out.push_back(Value::Boolean(self.handle.called()));
        out.push_back(fell_back);
        Ok(out)
    }

    /// The last step's failure under `on_error: standard` as an error
    /// table, or nil.
    fn fell_back_value(&self, lua: &Lua) -> mlua::Result<Value> {
        Ok(match &self.fell_back {
            Some(f) => Value::Table(self.shared.error(lua, f.clone())?),
            None => Value::Nil,
        })
    }
}

impl UserData for LuaHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, _, ()| Ok("llmproxy.handle"));
        methods.add_method_mut("auth", |lua, this, used: Option<f64>| {
            let (key_info, checks) = {
                let e = this.engine.borrow::<LuaEngine>()?;
                let r = this.handle.request();
                let used = keys::quota_units(used);
                keys::admission_input(&e.keys, r.api_key.as_deref(), r.client_ip.as_deref(), used)
            };
            let mut verdict = "standard";
            let out = this.step(
                lua,
                |h, engine| {
                    let step = h.auth(engine, KeyInfo::json(&key_info), checks);
                    verdict = auth_label(&step);
                    Ok(admission::decide_step(
                        &checks,
                        step,
                        &engine.config().auth_may_override,
                    ))
                },
                |lua, _, d| auth_refusal(lua, d),
            );
            this.verdict = verdict;
            out
        });
        methods.add_method_mut(
            "rate_limit",
            |lua,
             this,
             (used, global_remaining, key_remaining, concurrent_count, took, kind, retry_after): (
                Option<f64>,
                f64,
                f64,
                f64,
                bool,
                Option<mlua::BorrowedStr>,
                Option<f64>,
            )| {
                let denial = policy::limit_denial(kind.as_deref(), retry_after)?;
                let (key_info, now) = {
                    let e = this.engine.borrow::<LuaEngine>()?;
                    let key = this.handle.request().api_key.as_deref();
                    let now = llmproxy_core::clock::current_time(chrono::Utc::now(), e.admission.zone);
                    (keys::key_info(&e.keys, key, keys::quota_units(used)), now)
                };
                // Counts as the host's store gives them (Lua numbers).
                let status = RateLimitStatus {
                    global_remaining: global_remaining as i64,
                    key_remaining: key_remaining as i64,
                    concurrent_count: concurrent_count as i64,
                };
                let mut verdict = "standard";
                let out = this.step(
                    lua,
                    |h, engine| {
                        let step = h.rate_limit(engine, KeyInfo::json(&key_info), status, now);
                        verdict = rate_label(&step);
                        Ok(step.map(|v| rate_stage::decide(&v, took, denial.as_ref())))
                    },
                    |lua, _, d| rate_outcome(lua, d),
                );
                this.verdict = verdict;
                out
            },
        );
        methods.add_method("verdict", |_, this, ()| Ok(this.verdict));
        methods.add_method_mut("route", |lua, this, globals: AnyUserData| {
            let globals = globals.borrow::<LuaGlobals>()?;
            this.step(
                lua,
                |h, engine| Ok(h.route(engine, globals.globals.backends()?)),
                |lua, _, decision| match decision {
                    RouteDecision::Default => Ok(Value::Nil),
                    RouteDecision::Backend(name) => Ok(Value::String(lua.create_string(name)?)),
                },
            )
        });
        methods.add_method_mut("upstream", |lua, this, url: String| {
            this.step(
                lua,
                |h, engine| Ok(h.upstream(engine, &url)),
                |lua, _, up| {
                    let t = lua.create_table_with_capacity(0, 3)?;
                    if let Some(body) = up.body {
                        t.raw_set("body", lua.create_string(body)?)?;
                    }
                    t.raw_set("headers", header_changes(lua, &up.headers)?)?;
                    t.raw_set("stream", up.stream)?;
                    Ok(Value::Table(t))
                },
            )
        });
        methods.add_method_mut(
            "respond",
            |lua, this, (status, headers, body, latency_ms): (u16, Option<Table>, LuaString, Option<f64>)| {
                let headers = response_headers(headers)?;
                this.step(
                    lua,
                    |h, engine| Ok(h.respond(engine, status, headers, &body.as_bytes(), latency_ms.unwrap_or(0.0))),
                    |lua, _, a| {
                        let t = lua.create_table_with_capacity(0, 3)?;
                        t.raw_set("status", a.status)?;
                        if let Some(body) = a.body {
                            t.raw_set("body", lua.create_string(body)?)?;
                        }
                        t.raw_set("headers", header_changes(lua, &a.headers)?)?;
                        Ok(Value::Table(t))
                    },
                )
            },
        );
        methods.add_method_mut("stream", |_, this, (status, headers): (u16, Option<Table>)| {
            this.handle.stream(status, response_headers(headers)?);
            Ok(())
        });
        methods.add_method_mut("event", |lua, this, (data, latency_ms): (LuaString, Option<f64>)| {
            this.step(
                lua,
                |h, engine| Ok(h.event(engine, &data.as_bytes(), latency_ms.unwrap_or(0.0))),
                |lua, _, ev| {
                    let t = lua.create_table_with_capacity(0, 4)?;
                    t.raw_set("drop", ev.relay == Relay::Drop)?;
                    if let Relay::Data(d) = ev.relay {
                        t.raw_set("data", lua.create_string(d)?)?;
                    }
                    t.raw_set("status", ev.status)?;
                    t.raw_set("headers", header_changes(lua, &ev.headers)?)?;
                    Ok(Value::Table(t))
                },
            )
        });
        methods.add_method_mut("usage", |lua, this, (status, relayed): (Option<u16>, Option<u64>)| {
            if let Some(status) = status {
                this.handle.answered(status);
            }
            if let Some(n) = relayed {
                this.handle.relayed_events(n);
            }
            let mut charged = None;
            let out = this.step(
                lua,
                |h, engine| Ok(h.usage(engine)),
                |lua, shared, b| {
                    // With the record (the script's, else the backend's
                    // usage) as every host logs it and the ledger stores it.
                    let t = charge_table(lua, &shared.charge_keys, &b.charge, Some(&b.record_json))?;
                    if b.estimated {
                        t.raw_set("estimated", true)?;
                    }
                    charged = Some((b.charge, b.record_json));
                    Ok(Value::Table(t))
                },
            );
            this.charged = charged;
            out
        });
        // h:ledger(served) -> true (queued), false (the queue was full:
        // dropped and counted), nil (no ledger). The row is core's
        // (`LedgerRecord::of`: the request and what h:usage charged, zero
        // usage when it did not run; whether the row charges the key's quota
        // in the ledger is core's rule for the config's state backend);
        // `served` holds what only nginx knows: { node =, key_fp =,
        // backend =, status =, is_stream =, latency_ms = }. Never blocks.
        methods.add_method("ledger", |_, this, served: Table| {
            let engine = this.engine.borrow::<LuaEngine>()?;
            let Some(w) = &engine.ledger else {
                return Ok(None);
            };
            let text = |k: &str| -> mlua::Result<Option<String>> {
                Ok(match served.raw_get::<Value>(k)? {
                    Value::String(s) => Some(s.to_string_lossy()),
                    _ => None,
                })
            };
            let (node, key_fp, backend) = (text("node")?, text("key_fp")?, text("backend")?);
            let number = |k: &str| -> mlua::Result<Option<f64>> {
                Ok(match served.raw_get::<Value>(k)? {
                    Value::Integer(i) => Some(i as f64),
                    Value::Number(n) if n.is_finite() => Some(n),
                    _ => None,
                })
            };
            let charged = this
                .charged
                .as_ref()
                .map(|(charge, record_json)| Charged { charge, record_json });
            let row = LedgerRecord::of(
                this.handle.request(),
                charged,
                Served {
                    node: node.as_deref().unwrap_or_default(),
                    key_fp: key_fp.as_deref(),
                    backend: backend.as_deref(),
                    status: number("status")?.map_or(0, |n| n.clamp(0.0, 999.0) as u16),
                    is_stream: matches!(served.raw_get::<Value>("is_stream")?, Value::Boolean(true)),
                    answered_ms: llmproxy_ledger::now_ms(),
                    latency_ms: number("latency_ms")?.unwrap_or(0.0),
                    charge_quota: engine.engine.config().state.backend.ledger_holds_quota(),
                },
            );
            Ok(Some(w.try_record(row)))
        });
        // h:answer_is_stream(status, content_type) -> whether the backend's
        // answer goes through h:stream + h:event (else h:respond): core's
        // rule for the body h:upstream sent.
        methods.add_method(
            "answer_is_stream",
            |_, this, (status, content_type): (u16, Option<mlua::LuaString>)| {
                let ct = content_type.as_ref().and_then(|s| s.to_str().ok());
                Ok(this.handle.answer_is_stream(status, ct.as_deref()))
            },
        );
        // h:called() -> whether the last step called its hook's script (the
        // host counts the call).
        methods.add_method("called", |_, this, ()| Ok(this.handle.called()));
        // h:answer_parsed() -> whether the backend's answer (h:respond) was
        // parsed as JSON for the hooks (an answer only the usage script
        // could read counts once it read it).
        methods.add_method("answer_parsed", |_, this, ()| Ok(this.handle.answer_parsed()));
        // h:api() -> "chat_completions" | "completions" | "embeddings", or
        // nil for a request relayed as is.
        methods.add_method("api", |_, this, ()| Ok(this.handle.api().map(|a| a.as_str())));
        // h:request() -> the request as an `llmproxy.request` (its parsed
        // body shared), for the hooks outside the data path: auth,
        // rate_limit, error_handler (`engine:run_prepared`).
        methods.add_method("request", |lua, this, ()| {
            let info = this.handle.request().clone();
            let body_depth = llmproxy_core::convert::json_depth(&info.body);
            let request = input::Request::from_parts(info, this.depth, body_depth, this.body_bytes);
            lua.create_userdata(LuaRequest {
                request,
                shared: this.shared.clone(),
            })
        });
        methods.add_method("fell_back", |lua, this, ()| this.fell_back_value(lua));
    }
}

/// How the host logs an auth script's verdict.
fn auth_label(step: &Step<AuthVerdict>) -> &'static str {
    match step {
        Step::Ran(AuthVerdict::Standard) => "standard",
        Step::Ran(AuthVerdict::Allow) => "allow",
        Step::Ran(AuthVerdict::Deny { .. }) => "deny",
        Step::FellBack(..) | Step::Denied(_) => "failed",
    }
}

/// How the host logs a rate_limit script's verdict.
fn rate_label(step: &Step<RateVerdict>) -> &'static str {
    match step {
        Step::Ran(RateVerdict::Standard) => "standard",
        Step::Ran(RateVerdict::Allow) => "allow",
        Step::Ran(RateVerdict::Deny { .. }) => "deny",
        Step::FellBack(..) | Step::Denied(_) => "failed",
    }
}

/// The auth stage's refusal as `{status, code, message, reason,
/// throttles}`; nil when admitted.
fn auth_refusal(lua: &Lua, d: Decision) -> mlua::Result<Value> {
    let Some(r) = d.refusal() else {
        return Ok(Value::Nil);
    };
    let t = lua.create_table_with_capacity(0, 5)?;
    t.raw_set("status", r.status)?;
    t.raw_set("code", r.code)?;
    t.raw_set("message", r.message)?;
    t.raw_set("reason", r.reason)?;
    t.raw_set("throttles", r.throttles)?;
    Ok(Value::Table(t))
}

/// The rate limit stage's decision: nil (admitted), `"force"` (admitted
/// past a limit: take the request unchecked), or the 429 as `{refund,
/// code, message, retry_after, reason}`.
fn rate_outcome(lua: &Lua, d: RateStep) -> mlua::Result<Value> {
    match d {
        RateStep::Admit { force: false } => Ok(Value::Nil),
        RateStep::Admit { force: true } => Ok(Value::String(lua.create_string("force")?)),
        RateStep::Refuse { refund, refusal } => {
            let t = lua.create_table_with_capacity(0, 5)?;
            t.raw_set("refund", refund)?;
            t.raw_set("code", refusal.code)?;
            t.raw_set("message", refusal.message)?;
            t.raw_set("retry_after", refusal.retry_after)?;
            t.raw_set("reason", refusal.reason)?;
            Ok(Value::Table(t))
        }
    }
}

/// Header changes as `{name = value}`, `false` for a removal; `nil` for none.
fn header_changes(lua: &Lua, changes: &[(String, HeaderChange)]) -> mlua::Result<Value> {
    if changes.is_empty() {
        return Ok(Value::Nil);
    }
    let t = lua.create_table_with_capacity(0, changes.len())?;
    for (name, change) in changes {
        match change {
            HeaderChange::Set(v) => t.raw_set(name.as_str(), v.as_str())?,
            HeaderChange::Remove => t.raw_set(name.as_str(), false)?,
        }
    }
    Ok(Value::Table(t))
}

/// An answer's headers as the server gives them (`ngx.resp.get_headers()`:
/// `{name = value}`, a value a string, a number, or a sequence of strings
/// for a header sent more than once), in the form scripts see (core's
/// [`ScriptHeaders`]: without `Content-Length` and hop-by-hop headers).
fn response_headers(headers: Option<Table>) -> mlua::Result<Vec<(String, String)>> {
    let Some(t) = headers else {
        return Ok(Vec::new());
    };
    let mut out = ScriptHeaders::new(Message::Answer, 0);
    for pair in t.pairs::<String, Value>() {
        let (name, value) = pair?;
        match value {
            Value::String(s) => out.add(&name, &s.as_bytes()),
            Value::Integer(i) => out.add(&name, i.to_string().as_bytes()),
            Value::Number(n) => out.add(&name, n.to_string().as_bytes()),
            Value::Table(values) => {
                for v in values.sequence_values::<LuaString>() {
                    out.add(&name, &v?.as_bytes());
                }
            }
            other => {
                return Err(mlua::Error::runtime(format!(
                    "header {name} must be a string, got {}",
                    other.type_name()
                )))
            }
        }
    }
    Ok(out.into_pairs())
}
