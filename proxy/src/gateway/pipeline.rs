//! The hook stages of a request, one function per stage, in the order a
//! request meets them:
//!
//! [`Stages::auth`] (over the standard key checks) -> [`Stages::rate_limit`]
//! (over the standard limiter) -> [`Stages::route`] -> [`Stages::transform_request`]
//! -> upstream -> [`Stages::transform_response`] (per event on streams) ->
//! [`Stages::usage`] -> on failure [`Stages::handle_error`].
//!
//! Every function here is synchronous and may block for a script's
//! `timeout_ms`: call them through [`super::hook_pool::HookPool::call`]
//! (inline under a short budget, else on a hook thread), never bare on a
//! tokio worker. Each applies the hook's failure policy (`on_error`, read by
//! the core's [`Step::of`], as the request handle reads it): `standard`
//! acts as if the script returned nil, `deny` fails the request with a 503
//! ([`Denied`]). Failures are logged by the core and counted here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmproxy_core::hooks::{
    AuthInput, AuthVerdict, BackendStatus, CurrentTime, ErrorInfo, ErrorInput, ErrorResponse, KeyInfo, RateLimitInput,
    RateLimitStatus, RateVerdict, RequestInfo, RequestRewrite, RequestTransformInput, ResponseInfo, ResponseRewrite,
    ResponseTransformInput, RouteDecision, RoutingInput, StandardChecks, UsageInput, UsageMetadata, UsageRecord,
};
use llmproxy_core::request_handle::Step;
use llmproxy_core::{Engine, ErrorKind, HookError, HookName};

use super::metrics::Metrics;

/// A hook failed and its policy is `deny`: the request fails with a 503.
#[derive(Debug, Clone)]
pub struct Denied {
    /// The hook that failed.
    pub hook: HookName,
    /// How it failed.
    pub error: HookError,
}

/// The result of a stage.
pub type StageResult<T> = Result<T, Denied>;

/// Time spent in each hook by one request, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings(pub [u64; 7]);

impl Timings {
    fn add(&mut self, hook: HookName, d: Duration) {
        self.0[hook.index()] += u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    }

    /// Add another request part's timings.
    pub fn merge(&mut self, other: Timings) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// Time spent in `hook`, in microseconds.
    pub fn get(&self, hook: HookName) -> u64 {
        self.0[hook.index()]
    }
}

/// The engine plus what the stages report to.
#[derive(Debug, Clone)]
pub struct Stages {
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
}

impl Stages {
    /// Stages over `engine`, counting into `metrics`.
    pub fn new(engine: Arc<Engine>, metrics: Arc<Metrics>) -> Self {
        Stages { engine, metrics }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether `hook` has a script.
    pub fn enabled(&self, hook: HookName) -> bool {
        self.engine.is_enabled(hook)
    }

    /// Whether any hook has a script.
    pub fn any_enabled(&self) -> bool {
        HookName::ALL.iter().any(|h| self.engine.is_enabled(*h))
    }

    /// Run one hook with its failure policy; `fallback` is the nil result.
    fn call<T>(
        &self,
        hook: HookName,
        timings: &mut Timings,
        fallback: impl FnOnce() -> T,
        f: impl FnOnce(&Engine) -> Result<T, HookError>,
    ) -> StageResult<T> {
        if self.engine.config().hook(hook).is_none() {
            return Ok(fallback());
        }
        let started = Instant::now();
        let result = f(&self.engine);
        if llmproxy_core::inline::overrun() {
            // An inline attempt passed its budget: this job is thrown away
            // and runs again on a hook thread, where it is counted.
            return Ok(fallback());
        }
        let elapsed = started.elapsed();
        self.metrics
            .hook_call(hook, elapsed, result.as_ref().err().map(|e| e.kind));
        timings.add(hook, elapsed);
        Step::of(&self.engine, hook, result, fallback)
            .into_result()
            .map_err(|error| Denied { hook, error })
    }

    /// Count a hook call whose job never came back (a panic on the hook
    /// thread); the policy then applies as for any failure.
    pub fn lost(&self, hook: HookName) -> Option<Denied> {
        self.engine.config().hook(hook)?;
        self.metrics.hook_call(hook, Duration::ZERO, Some(ErrorKind::Internal));
        let lost = Err(HookError::new(ErrorKind::Internal, "the hook call was lost"));
        match Step::of(&self.engine, hook, lost, || ()) {
            Step::Denied(error) => Some(Denied { hook, error }),
            _ => None,
        }
    }

    /// `routing`: a backend name, or `None` for the default balancer.
    pub fn route(
        &self,
        request: &RequestInfo,
        backends: &[BackendStatus],
        timings: &mut Timings,
    ) -> StageResult<Option<String>> {
        self.call(
            HookName::Routing,
            timings,
            || None,
            |e| {
                e.route(&RoutingInput { request, backends }).map(|d| match d {
                    RouteDecision::Default => None,
                    RouteDecision::Backend(name) => Some(name),
                })
            },
        )
    }

    /// `request_transform` (`request.backend_url` set): changes, or `None`.
    pub fn transform_request(
        &self,
        request: &RequestInfo,
        timings: &mut Timings,
    ) -> StageResult<Option<RequestRewrite>> {
        self.call(
            HookName::RequestTransform,
            timings,
            || None,
            |e| e.transform_request(&RequestTransformInput { request }),
        )
    }

    /// `response_transform`: changes, or `None`. Runs once per event on
    /// streams (`response.is_stream`).
    pub fn transform_response(
        &self,
        request: &RequestInfo,
        response: &ResponseInfo,
        backend_url: &str,
        latency_ms: f64,
        timings: &mut Timings,
    ) -> StageResult<Option<ResponseRewrite>> {
        self.call(
            HookName::ResponseTransform,
            timings,
            || None,
            |e| {
                e.transform_response(&ResponseTransformInput {
                    request,
                    response,
                    backend_url,
                    latency_ms,
                })
            },
        )
    }

    /// `usage`: the record to store. Runs after the response was sent, so
    /// `deny` cannot fail the request any more: it records raw usage, like
    /// `standard`, and the failure is logged and counted.
    pub fn usage(
        &self,
        request: &RequestInfo,
        usage: &serde_json::Value,
        response: &ResponseInfo,
        metadata: &UsageMetadata,
        timings: &mut Timings,
    ) -> UsageRecord {
        self.call(
            HookName::Usage,
            timings,
            || UsageRecord::Raw,
            |e| {
                e.usage(&UsageInput {
                    request,
                    usage,
                    response,
                    metadata,
                })
            },
        )
        .unwrap_or(UsageRecord::Raw)
    }

    /// `error_handler`: the response for a failed request.
    pub fn handle_error(
        &self,
        request: &RequestInfo,
        error: &ErrorInfo,
        timings: &mut Timings,
    ) -> StageResult<ErrorResponse> {
        self.call(
            HookName::ErrorHandler,
            timings,
            || ErrorResponse::Default,
            |e| e.handle_error(&ErrorInput { request, error }),
        )
    }

    /// `auth`: the script's verdict over the standard key checks
    /// (`key_info` is none for an unknown key). A failing script denies
    /// (503) unless `on_error: standard`, which keeps the standard verdict.
    pub fn auth(
        &self,
        request: &RequestInfo,
        key_info: KeyInfo<'_>,
        standard_checks: StandardChecks,
        timings: &mut Timings,
    ) -> StageResult<AuthVerdict> {
        self.call(
            HookName::Auth,
            timings,
            || AuthVerdict::Standard,
            |e| {
                e.auth(&AuthInput {
                    request,
                    key_info,
                    standard_checks,
                })
            },
        )
    }

    /// `rate_limit`: the script's verdict over the standard limiter.
    pub fn rate_limit(
        &self,
        request: &RequestInfo,
        key_info: KeyInfo<'_>,
        rate_limit_status: RateLimitStatus,
        current_time: CurrentTime,
        timings: &mut Timings,
    ) -> StageResult<RateVerdict> {
        self.call(
            HookName::RateLimit,
            timings,
            || RateVerdict::Standard,
            |e| {
                e.rate_limit(&RateLimitInput {
                    request,
                    key_info,
                    rate_limit_status,
                    current_time,
                })
            },
        )
    }
}
