//! The [`Engine`]: compiled hooks plus a VM pool, built once from a config.
//!
//! An engine is immutable and `Send + Sync`; share it in an `Arc`. A reload
//! builds a new engine (compiling every script first) and swaps it in; calls
//! in flight finish on the engine they started with.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mlua::{Lua, Table};
use serde_json::Value;

use crate::config::{Config, HookConfig};
use crate::convert::{self, Global, Limits, ResultHeaders};
use crate::error::{ConfigError, ErrorKind, HookError};
use crate::hooks::{
    AuthInput, AuthVerdict, ErrorInput, ErrorResponse, HookInput, HookName, RateLimitInput, RateVerdict, RequestInfo,
    RequestRewrite, RequestTransformInput, ResponseInfo, ResponseRewrite, ResponseTransformInput, ResultForm,
    RouteDecision, RoutingInput, UsageInput, UsageRecord,
};
use crate::http::fields::BodyText;
use crate::inline::{self, Overrun, SlowHooks};
use crate::pool::{Pool, PoolStats};
use crate::vm::{CallSpec, Output};

/// How a transform's result is checked: its value, with the body and the
/// headers the call took apart (`RequestRewrite::from_result`, ...).
type TransformCheck<T> = fn(&Value, Option<BodyText>, Option<ResultHeaders>) -> Result<Option<T>, HookError>;

/// Compiled hooks and the VMs that run them.
pub struct Engine {
    config: Arc<Config>,
    pool: Pool,
    /// Unknown result fields ignored, per hook ([`HookName::index`]).
    ignored_fields: [AtomicU64; 7],
    /// `(hook, field)` pairs already warned about: one warning per script
    /// and field for the engine's life, not one per call.
    warned_fields: Mutex<HashSet<(HookName, String)>>,
    /// Hooks that overran an inline budget lately (`crate::inline`).
    slow: SlowHooks,
}

/// Most distinct `(hook, field)` warnings one engine remembers; past it,
/// further unknown fields are still counted but no longer logged.
const MAX_WARNED_FIELDS: usize = 256;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("pool", &self.pool.stats())
            .finish_non_exhaustive()
    }
}

// Hosts share one engine between threads (C, Go, the gateway): keep it so in
// every link mode (`vendored` and `module`).
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
};

impl Engine {
    /// Build an engine, compiling every enabled script. Every compile error
    /// is reported (`script:line: message`), not just the first.
    pub fn new(config: Config) -> Result<Engine, ConfigError> {
        let pool = Pool::new(config.pool);
        let mut problems = Vec::new();
        {
            let mut vm = pool.checkout().map_err(|e| ConfigError::one(e.message))?;
            for hook in config.hooks.iter().flatten() {
                if let Err(e) = vm.vm().compile(&hook.script) {
                    problems.push(format!("{} hook: {}", hook.hook, e.message));
                }
            }
            vm.finish();
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Engine {
            config: Arc::new(config),
            pool,
            ignored_fields: Default::default(),
            warned_fields: Mutex::new(HashSet::new()),
            slow: SlowHooks::default(),
        })
    }

    /// The configuration this engine was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether `hook` has an enabled script.
    pub fn is_enabled(&self, hook: HookName) -> bool {
        self.config.hook(hook).is_some()
    }

    /// Unknown fields ignored in `hook`'s results so far (a counter for
    /// the hosts' metrics).
    pub fn ignored_fields(&self, hook: HookName) -> u64 {
        self.ignored_fields[hook.index()].load(Ordering::Relaxed)
    }

    /// VM pool counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Run `hook` with globals built by `set_globals`. `Ok(None)` when the
    /// hook is not enabled.
    fn run_raw(
        &self,
        hook: HookName,
        request_id: Option<&str>,
        result_form: ResultForm,
        set_globals: impl FnOnce(&Lua, &Table) -> mlua::Result<()>,
    ) -> Result<Option<Output>, HookError> {
        let Some(cfg) = self.config.hook(hook) else {
            return Ok(None);
        };
        let budget = inline::budget();
        let over_budget = |reason: Overrun| {
            inline::mark_overrun(hook, reason);
            Err(HookError::new(ErrorKind::Timeout, "over its inline budget").at(hook, &cfg.script.name))
        };
        if inline::overrun() {
            return over_budget(Overrun::Budget);
        }
        if budget.is_some() && self.slow.is_slow(hook) {
            return over_budget(Overrun::SlowHook);
        }
        let spec = CallSpec {
            hook,
            script: &cfg.script,
            limits: &cfg.limits,
            request_id,
            budget,
            result_form,
        };
        let mut vm = match budget {
            // An inline call must not wait for a VM.
            Some(_) => match self.pool.try_checkout() {
                Some(vm) => vm,
                None => return over_budget(Overrun::NoIdleVm),
            },
            None => self.pool.checkout().map_err(|e| e.at(hook, &cfg.script.name))?,
        };
        // A blocking call of a hook that overran an inline budget lately
        // tells whether the script is slow or its worker was preempted: by
        // the CPU time it spends, which preemption does not add to.
        let timed = (budget.is_none() && self.slow.is_suspect(hook))
            .then(inline::ThreadCpu::now)
            .flatten();
        let result = vm.vm().call(&spec, set_globals);
        let overran = vm.vm().over_budget();
        vm.finish();
        drop(vm);
        if let Some(started) = timed {
            self.slow.ran(hook, started.elapsed());
        }
        if let (true, Some(budget)) = (overran, budget) {
            self.slow.overran(hook, budget);
            return over_budget(Overrun::Budget);
        }
        match result {
            Ok(mut out) => {
                self.ignore_unknown_fields(hook, &cfg.script.name, request_id, &mut out.value);
                Ok(Some(out))
            }
            Err(e) => Err(self.report(e.at(hook, &cfg.script.name), request_id)),
        }
    }

    /// Drop the fields a result has beyond its hook's contract: counted,
    /// and logged once per script and field (why: [`crate::hooks::drop_unknown_fields`]).
    fn ignore_unknown_fields(&self, hook: HookName, script: &str, request_id: Option<&str>, value: &mut Value) {
        let unknown = crate::hooks::drop_unknown_fields(hook, value);
        if unknown.is_empty() {
            return;
        }
        self.ignored_fields[hook.index()].fetch_add(unknown.len() as u64, Ordering::Relaxed);
        let Ok(mut warned) = self.warned_fields.lock() else {
            return;
        };
        for field in unknown {
            if warned.len() >= MAX_WARNED_FIELDS || warned.contains(&(hook, field.clone())) {
                continue;
            }
            tracing::warn!(
                target: "llmproxy::hook",
                request_id = request_id.unwrap_or("-"),
                hook = hook.as_str(),
                script = script,
                field = %field,
                "the script's result has a field its hook does not use; ignored (logged once per script and field)"
            );
            warned.insert((hook, field));
        }
    }

    pub(crate) fn run<I: HookInput>(&self, input: &I) -> Result<Option<Output>, HookError> {
        self.run_raw(I::HOOK, input.request_id(), I::RESULT_FORM, |lua, env| {
            input.set_globals(lua, env)
        })
    }

    /// Drop the headers a transform or error_handler result sets that no
    /// script may set, with one warning each (which and why:
    /// [`crate::hooks::drop_unsettable`]).
    fn drop_unsettable(
        &self,
        hook: HookName,
        request_id: Option<&str>,
        value: &mut Value,
        read: Option<&mut ResultHeaders>,
    ) {
        if !matches!(
            hook,
            HookName::RequestTransform | HookName::ResponseTransform | HookName::ErrorHandler
        ) {
            return;
        }
        let mut dropped = crate::hooks::drop_unsettable(value);
        if let Some(read) = read {
            read.retain(|(name, _)| {
                let may = crate::http::hop_by_hop::script_may_set(name);
                if !may {
                    dropped.push(name.clone());
                }
                may
            });
        }
        for header in dropped {
            tracing::warn!(
                target: "llmproxy::hook",
                request_id = request_id.unwrap_or("-"),
                hook = hook.as_str(),
                script = self.config.hook(hook).map_or("-", |c| &*c.script.name),
                header = %header,
                "a script may not set this header (hop-by-hop, Content-Length or Host); dropped"
            );
        }
    }

    /// Log a failed call once, with everything an operator needs.
    fn report(&self, e: HookError, request_id: Option<&str>) -> HookError {
        if inline::overrun() {
            // Thrown away with the attempt; the job runs again (crate::inline).
            return e;
        }
        tracing::warn!(
            target: "llmproxy::hook",
            request_id = request_id.unwrap_or("-"),
            hook = e.hook.map_or("-", HookName::as_str),
            script = %e.location(),
            kind = e.kind.as_str(),
            "hook failed: {}", e.message
        );
        e
    }

    fn checked<T>(&self, hook: HookName, rid: &str, r: Result<T, HookError>) -> Result<T, HookError> {
        r.map_err(|e| match self.config.hook(hook) {
            Some(cfg) => self.report(e.at(hook, &cfg.script.name), Some(rid)),
            None => e,
        })
    }

    /// `routing`: a backend from `input.backends`, or the default balancer.
    pub fn route(&self, input: &RoutingInput<'_>) -> Result<RouteDecision, HookError> {
        let Some(Output { value: v, .. }) = self.run(input)? else {
            return Ok(RouteDecision::Default);
        };
        let names = input.backends.iter().map(|b| b.name.as_str());
        self.checked(
            HookName::Routing,
            &input.request.id,
            RouteDecision::from_result(v, names),
        )
    }

    /// `auth`: the script's verdict over the standard checks.
    pub fn auth(&self, input: &AuthInput<'_>) -> Result<AuthVerdict, HookError> {
        let Some(Output { value: v, .. }) = self.run(input)? else {
            return Ok(AuthVerdict::Standard);
        };
        self.checked(HookName::Auth, &input.request.id, AuthVerdict::from_result(&v))
    }

    /// `request_transform`: changes to the request, `None` for unchanged.
    pub fn transform_request(&self, input: &RequestTransformInput<'_>) -> Result<Option<RequestRewrite>, HookError> {
        let output = self.run(input)?;
        self.transformed(
            HookName::RequestTransform,
            &input.request.id,
            output,
            RequestRewrite::from_result,
        )
    }

    /// `response_transform`: changes to the response, `None` for unchanged.
    /// Header changes that leave a header as the backend sent it are
    /// dropped (the seed's script returns `headers = response.headers`).
    pub fn transform_response(&self, input: &ResponseTransformInput<'_>) -> Result<Option<ResponseRewrite>, HookError> {
        let output = self.run(input)?;
        let mut rewrite = self.transformed(
            HookName::ResponseTransform,
            &input.request.id,
            output,
            ResponseRewrite::from_result,
        )?;
        if let Some(r) = &mut rewrite {
            r.drop_unchanged_headers(&input.response.headers);
        }
        Ok(rewrite)
    }

    /// A transform's result (`None`: the script returned nil) checked by
    /// `check`, with its hop-by-hop headers dropped first.
    fn transformed<T>(
        &self,
        hook: HookName,
        request_id: &str,
        output: Option<Output>,
        check: TransformCheck<T>,
    ) -> Result<Option<T>, HookError> {
        let Some(Output {
            value: mut v,
            body,
            mut headers,
            ..
        }) = output
        else {
            return Ok(None);
        };
        self.drop_unsettable(hook, Some(request_id), &mut v, headers.as_mut());
        self.checked(hook, request_id, check(&v, body.map(|b| *b), headers))
    }

    /// `rate_limit`: the script's verdict over the standard limiter.
    pub fn rate_limit(&self, input: &RateLimitInput<'_>) -> Result<RateVerdict, HookError> {
        let Some(Output { value: v, .. }) = self.run(input)? else {
            return Ok(RateVerdict::Standard);
        };
        self.checked(HookName::RateLimit, &input.request.id, RateVerdict::from_result(&v))
    }

    /// `usage`: the usage record to store.
    pub fn usage(&self, input: &UsageInput<'_>) -> Result<UsageRecord, HookError> {
        let Some(Output { value, text, .. }) = self.run(input)? else {
            return Ok(UsageRecord::Raw);
        };
        let record = match text {
            Some(text) => UsageRecord::from_text(*text),
            None => UsageRecord::from_result(value),
        };
        self.checked(HookName::Usage, &input.request.id, record)
    }

    /// `error_handler`: the error response to send.
    pub fn handle_error(&self, input: &ErrorInput<'_>) -> Result<ErrorResponse, HookError> {
        let Some(Output {
            value: mut v,
            body,
            mut headers,
            ..
        }) = self.run(input)?
        else {
            return Ok(ErrorResponse::Default);
        };
        let rid = &input.request.id;
        self.drop_unsettable(HookName::ErrorHandler, Some(rid), &mut v, headers.as_mut());
        let fallback = input.error.status_code;
        let response = ErrorResponse::from_result(&v, body.map(|b| *b), headers, fallback);
        self.checked(HookName::ErrorHandler, rid, response)
    }

    /// Run `hook` on a JSON object holding its globals (the form the CLI
    /// and the C ABI take) and return the script's result as JSON (`null`
    /// for nil), validated against the hook's contract. `request.body` and
    /// `response.body` are lazy; `request.body_raw` (JSON text) is parsed
    /// here instead of by the caller.
    pub fn run_json(&self, hook: HookName, input: &Value) -> Result<Value, HookError> {
        let cfg = self.enabled(hook)?;
        let at = |e: HookError| e.at(hook, &cfg.script.name);
        let obj = input.as_object().ok_or_else(|| {
            at(HookError::bad_input(
                "hook input must be a JSON object of the hook's globals",
            ))
        })?;
        let depth = convert::json_depth(input);
        if depth > cfg.limits.max_depth + 1 {
            return Err(at(HookError::bad_input(format!(
                "input nesting is {depth} levels, deeper than the limit of {}",
                cfg.limits.max_depth
            ))));
        }
        let limits = Limits {
            max_depth: cfg.limits.max_depth,
            max_bytes: cfg.limits.max_input_bytes,
        };
        let request = match obj.get("request") {
            Some(r) => Some(RequestInfo::from_json(r, limits).map_err(|e| at(HookError::bad_input(e)))?),
            None => None,
        };
        let response = match obj.get("response") {
            Some(r) => Some(ResponseInfo::from_json(r).map_err(|e| at(HookError::bad_input(e)))?),
            None => None,
        };
        let globals = HookGlobals::new(obj.iter().map(|(name, value)| (name.clone(), value.clone())));
        self.run_parts(hook, request.as_ref(), response.as_ref(), &globals)
    }

    /// [`Engine::run_json`] with the request and response already built, so
    /// a host that runs several hooks on one request parses its body once.
    /// `globals` holds the hook's other globals (`backends`, `key_info`,
    /// ...), built once for any number of calls.
    pub fn run_parts(
        &self,
        hook: HookName,
        request: Option<&RequestInfo>,
        response: Option<&ResponseInfo>,
        globals: &HookGlobals,
    ) -> Result<Value, HookError> {
        let cfg = self.enabled(hook)?;
        let request_id = request.map(|r| r.id.as_str());
        let set_globals = |lua: &Lua, _env: &Table| -> mlua::Result<()> {
            // A global given as `null` is absent (`nil`), as for the typed
            // entry points.
            let shared: Vec<(&str, Global<'_>)> = globals
                .values
                .iter()
                .map(|(name, value)| (name.as_str(), Global::Shared(value)))
                .collect();
            // SAFETY: `globals`, `request` and `response` are borrowed for
            // this whole function, which outlasts the call. `request` and
            // `response` are lazy first: the others are lazy where the call
            // has room left.
            unsafe {
                if let Some(r) = request {
                    r.defer(lua)?;
                }
                if let Some(r) = response {
                    r.defer(lua)?;
                }
                convert::stage_globals(lua, &shared)?;
            }
            Ok(())
        };
        let Some(Output { mut value, .. }) = self.run_raw(hook, request_id, ResultForm::Value, set_globals)? else {
            return Err(HookError::new(ErrorKind::Internal, "hook disappeared").at(hook, &cfg.script.name));
        };
        self.drop_unsettable(hook, request_id, &mut value, None);
        let validated = match hook {
            HookName::Routing => {
                let names = globals.get("backends").and_then(Value::as_object);
                let names = names.into_iter().flat_map(|m| m.keys().map(String::as_str));
                RouteDecision::from_result(value.clone(), names).map(|_| ())
            }
            HookName::Auth => AuthVerdict::from_result(&value).map(|_| ()),
            HookName::RequestTransform => RequestRewrite::validate(&value),
            HookName::ResponseTransform => ResponseRewrite::validate(&value),
            HookName::RateLimit => RateVerdict::from_result(&value).map(|_| ()),
            HookName::Usage => UsageRecord::check(&value),
            HookName::ErrorHandler => {
                let fallback = globals
                    .get("error")
                    .and_then(|e| e.get("status_code"))
                    .and_then(Value::as_u64)
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(500);
                ErrorResponse::from_result(&value, None, None, fallback).map(|_| ())
            }
        };
        self.checked(hook, request_id.unwrap_or("-"), validated)?;
        Ok(value)
    }

    /// The config of an enabled hook, or a `bad_input` error.
    fn enabled(&self, hook: HookName) -> Result<&HookConfig, HookError> {
        self.config
            .hook(hook)
            .ok_or_else(|| HookError::bad_input(format!("the {hook} hook is not enabled in this engine")))
    }
}

/// A hook's globals other than `request` and `response` (`backends`,
/// `key_info`, `usage`, `error`, ...), built once for any number of
/// [`Engine::run_parts`] calls. A JSON object among them reaches scripts
/// as a lazy table over it, whose fields convert when first read, as
/// `request.body`'s do: a routing script that reads no backend converts
/// none. Every object's keys are sorted here, once: `json.encode` writes a
/// lazy table's fields in their stored order and a plain table's sorted,
/// so the two agree, whether a script encodes the global as given or
/// after `pairs` made a plain table of it.
#[derive(Debug, Clone, Default)]
pub struct HookGlobals {
    values: Vec<(String, Arc<Value>)>,
}

impl HookGlobals {
    /// The globals `entries` (name, value); `request` and `response` do not
    /// belong here (see [`Engine::run_parts`]) and are dropped.
    pub fn new(entries: impl IntoIterator<Item = (String, Value)>) -> HookGlobals {
        let values = entries
            .into_iter()
            .filter(|(name, _)| name != "request" && name != "response")
            .map(|(name, mut value)| {
                sort_keys(&mut value);
                (name, Arc::new(value))
            })
            .collect();
        HookGlobals { values }
    }

    /// The global `name`, if given (its objects' keys sorted).
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| &**v)
    }
}

/// Sort the keys of every object in `value`, nested ones too.
fn sort_keys(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_keys);
        }
        Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}
