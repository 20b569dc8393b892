//! One API request's life in the core, driven by a host that only does
//! I/O: the body is parsed once, every data-path hook of the request reads
//! that one parse (and the response's, parsed once too), and each step
//! returns a typed decision with the hook's failure policy already applied.
//!
//! ```text
//! RequestHandle::new(request, api)   api: None for a request relayed as is
//!   -> route(backends)            which backend (or the host's balancer)
//!   -> upstream(backend_url)      request_transform; the body to send
//!   -> respond(status, headers, body)   response_transform; the client's body
//!      or stream(status, headers) then event(data) per server-sent event
//!   -> usage()                    the usage hook; what the request is charged
//! ```
//!
//! Before it is routed, a request is admitted: `auth(key_info, checks)`
//! and `rate_limit(key_info, status, now)` run their scripts on the same
//! parse, and the host turns their verdicts into an answer with the
//! admission policy ([`crate::admission::decide_step`],
//! [`crate::policy::rate_stage`]). A host may call `route` and `upstream`
//! again for a retry on another backend; a failed request's answer comes
//! from [`crate::policy::failure`].
//!
//! Failure policy (`on_error` of each hook): `standard` acts as if the
//! script returned nil and the step says so ([`Step::FellBack`], for the
//! host's metrics; the core has logged it); `deny` stops the request
//! ([`Step::Denied`]: the host answers 503). The usage step never denies:
//! it runs after the answer was sent, so a failing script records the
//! backend's usage.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;

use crate::config::OnError;
use crate::hooks::{
    AuthInput, AuthVerdict, BackendStatus, CurrentTime, HeaderChange, KeyInfo, RateLimitInput, RateLimitStatus,
    RateVerdict, RequestInfo, RequestTransformInput, ResponseBody, ResponseInfo, ResponseTransformInput, RouteDecision,
    RoutingInput, StandardChecks, UsageInput, UsageMetadata, UsageRecord,
};
use crate::http::api::Api;
use crate::http::usage_probe;
use crate::policy::upstream::{self, UpstreamBody};
use crate::policy::{sse, usage};
use crate::{Engine, HookError, HookName};

/// What one step of a request decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Step<T> {
    /// The hook ran (or has no script) and this is its decision.
    Ran(T),
    /// The hook failed and its policy is `standard`: this is the decision
    /// for nil. The error is for the host's metrics; the core logged it.
    FellBack(T, HookError),
    /// The hook failed and its policy is `deny`: the request fails (503).
    Denied(HookError),
}

impl<T> Step<T> {
    /// The step of `hook` whose call gave `result`, by the hook's failure
    /// policy (`on_error`); `fallback` is the decision for nil. The one
    /// place that policy is read: a host that calls hooks itself (the
    /// gateway's stages) goes through here too.
    pub fn of(engine: &Engine, hook: HookName, result: Result<T, HookError>, fallback: impl FnOnce() -> T) -> Step<T> {
        match result {
            Ok(v) => Step::Ran(v),
            Err(e) if denies(engine, hook) => Step::Denied(e),
            Err(e) => Step::FellBack(fallback(), e),
        }
    }

    /// The decision, or the error that denied the request.
    pub fn into_result(self) -> Result<T, HookError> {
        match self {
            Step::Ran(v) | Step::FellBack(v, _) => Ok(v),
            Step::Denied(e) => Err(e),
        }
    }

    /// The hook's failure, whether it fell back or denied.
    pub fn failure(&self) -> Option<&HookError> {
        match self {
            Step::Ran(_) => None,
            Step::FellBack(_, e) | Step::Denied(e) => Some(e),
        }
    }

    /// The same step with its decision mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        match self {
            Step::Ran(v) => Step::Ran(f(v)),
            Step::FellBack(v, e) => Step::FellBack(f(v), e),
            Step::Denied(e) => Step::Denied(e),
        }
    }
}

/// Whether a failure of `hook` fails the request (`on_error: deny`)
/// rather than falling back to the decision for nil (`standard`): the
/// rule [`Step::of`] applies.
pub fn denies(engine: &Engine, hook: HookName) -> bool {
    engine.config().hook(hook).map(|c| c.on_error) == Some(OnError::Deny)
}

/// What to send the chosen backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// The body; `None` sends the client's bytes unchanged.
    pub body: Option<Vec<u8>>,
    /// Header changes from `request_transform`, name-sorted.
    pub headers: Vec<(String, HeaderChange)>,
    /// The request is a stream (answer with [`RequestHandle::stream`] and
    /// [`RequestHandle::event`]).
    pub stream: bool,
}

/// What the client gets for a backend's (non-stream) answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The status to send.
    pub status: u16,
    /// The body; `None` sends the backend's bytes unchanged.
    pub body: Option<Vec<u8>>,
    /// Header changes from `response_transform`, name-sorted.
    pub headers: Vec<(String, HeaderChange)>,
}

/// What to do with one event of a backend's stream, and the response head
/// changes its `response_transform` asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// The event's data.
    pub relay: Relay,
    /// The status the transform asked for.
    pub status: Option<u16>,
    /// Header changes the transform asked for, name-sorted.
    pub headers: Vec<(String, HeaderChange)>,
}

/// What becomes of one event's data.
#[derive(Debug, Clone, PartialEq)]
pub enum Relay {
    /// Send the event's data as it came.
    Unchanged,
    /// Send this data instead.
    Data(Vec<u8>),
    /// Send nothing (the usage chunk the gateway asked for itself).
    Drop,
}

/// What the request is charged.
#[derive(Debug, Clone, PartialEq)]
pub struct Billing {
    /// The backend's usage (zeros when it reported none).
    pub usage: Value,
    /// Whether the record is the usage hook's; not when the hook is off,
    /// returned nil or failed (the backend's usage is then the record).
    pub custom: bool,
    /// The charge: quota, tokens per minute, ledger columns, metrics.
    pub charge: usage::Charge,
    /// The record (the hook's, else `usage`) as every host logs it and the
    /// ledger stores it ([`usage::record_json`]).
    pub record_json: String,
    /// The tokens are the core's estimate: the stream's usage never came.
    pub estimated: bool,
}

impl Billing {
    /// The usage hook's record as a JSON value (parsed from
    /// `record_json`), or `None` when the backend's usage is the record.
    pub fn record(&self) -> Option<Value> {
        self.custom
            .then(|| serde_json::from_str(&self.record_json).unwrap_or(Value::Null))
    }
}

/// One API request, from its parsed body to its charge.
#[derive(Debug)]
pub struct RequestHandle {
    request: RequestInfo,
    /// `None`: not an API call (relayed as is: no transforms, no usage
    /// read from the answer).
    api: Option<Api>,
    /// The body sent upstream asks for a stream.
    stream: bool,
    strip_usage: bool,
    /// The backend's answer as scripts see it: the parsed body of a
    /// non-stream answer, or a stream's status and headers (and, once an
    /// event carried usage, that event).
    response: Option<ResponseInfo>,
    /// The backend's status (0 before it answered).
    status: u16,
    latency_ms: f64,
    usage: Option<Value>,
    /// A stream's content events relayed so far (each `data` but
    /// `[DONE]`): what an estimate charges when its usage never comes.
    relayed: u64,
    /// The last step called its hook's script.
    called: bool,
}

impl RequestHandle {
    /// A request to `api` (`None`: any other request, relayed as is) whose
    /// body the host parsed once into `request.body`
    /// ([`crate::http::fields::parse_request_body`]).
    pub fn new(request: RequestInfo, api: Option<Api>) -> RequestHandle {
        RequestHandle {
            request,
            api,
            stream: false,
            strip_usage: false,
            response: None,
            status: 0,
            latency_ms: 0.0,
            usage: None,
            relayed: 0,
            called: false,
        }
    }

    /// Whether the last step called its hook's script (for the host's
    /// metrics: a step whose hook has no script, or had nothing to read,
    /// e.g. an answer that is not JSON, called none).
    pub fn called(&self) -> bool {
        self.called
    }

    /// The API endpoint the request calls; `None` when it is relayed as
    /// is.
    pub fn api(&self) -> Option<Api> {
        self.api
    }

    /// The request as hooks see it (`backend_url` set once
    /// [`RequestHandle::upstream`] ran).
    pub fn request(&self) -> &RequestInfo {
        &self.request
    }

    /// `auth`: the script's verdict over the standard checks of the key
    /// the client presented (`key_info`: its record and live usage).
    /// The host decides with [`crate::admission::decide_step`].
    pub fn auth(&mut self, engine: &Engine, key_info: KeyInfo<'_>, checks: StandardChecks) -> Step<AuthVerdict> {
        self.called = engine.is_enabled(HookName::Auth);
        let result = engine.auth(&AuthInput {
            request: &self.request,
            key_info,
            standard_checks: checks,
        });
        Step::of(engine, HookName::Auth, result, || AuthVerdict::Standard)
    }

    /// `rate_limit`: the script's verdict over the standard limiter's
    /// `status` at `now`. The host decides with
    /// [`crate::policy::rate_stage::decide`].
    pub fn rate_limit(
        &mut self,
        engine: &Engine,
        key_info: KeyInfo<'_>,
        status: RateLimitStatus,
        now: CurrentTime,
    ) -> Step<RateVerdict> {
        self.called = engine.is_enabled(HookName::RateLimit);
        let result = engine.rate_limit(&RateLimitInput {
            request: &self.request,
            key_info,
            rate_limit_status: status,
            current_time: now,
        });
        Step::of(engine, HookName::RateLimit, result, || RateVerdict::Standard)
    }

    /// `routing`: a backend from `backends`, or `Default` for the host's
    /// balancer.
    pub fn route(&mut self, engine: &Engine, backends: &[BackendStatus]) -> Step<RouteDecision> {
        self.called = engine.is_enabled(HookName::Routing);
        let result = engine.route(&RoutingInput {
            request: &self.request,
            backends,
        });
        Step::of(engine, HookName::Routing, result, || RouteDecision::Default)
    }

    /// `request_transform` for the backend at `backend_url` (API calls
    /// only), then the body to send ([`crate::policy::upstream`]).
    pub fn upstream(&mut self, engine: &Engine, backend_url: &str) -> Step<Upstream> {
        self.request.backend_url = Some(backend_url.to_owned());
        self.called = self.api.is_some() && engine.is_enabled(HookName::RequestTransform);
        let result = match self.api {
            Some(_) => engine.transform_request(&RequestTransformInput { request: &self.request }),
            None => Ok(None),
        };
        let step = Step::of(engine, HookName::RequestTransform, result, || None);
        step.map(|rewrite| {
            let (new_body, headers) = rewrite.map_or((None, Vec::new()), |rw| (rw.body, rw.headers));
            let UpstreamBody {
                body,
                stream,
                strip_usage,
            } = upstream::body(&self.request.body, new_body, self.api.is_some_and(Api::streams_usage));
            self.strip_usage = strip_usage;
            self.stream = stream;
            Upstream { body, headers, stream }
        })
    }

    /// `response_transform` on a backend's non-stream answer to an API
    /// call, read once ([`usage_probe::answer`]: parsed for that script,
    /// else parsed only if the usage script reads it). Any other answer is
    /// relayed as is.
    pub fn respond(
        &mut self,
        engine: &Engine,
        status: u16,
        headers: Vec<(String, String)>,
        body: &[u8],
        latency_ms: f64,
    ) -> Step<Answer> {
        self.status = status;
        self.latency_ms = latency_ms;
        let transform = self.api.is_some() && engine.is_enabled(HookName::ResponseTransform);
        let usage_script = engine.is_enabled(HookName::Usage);
        let (body, usage) = match self.api {
            Some(_) => usage_probe::answer(body, transform, usage_script, || body.to_vec()),
            None => (None, None),
        };
        self.usage = usage;
        self.response = body.map(|body| ResponseInfo {
            status_code: status,
            body,
            headers,
            is_stream: false,
        });
        let unchanged = Answer {
            status,
            body: None,
            headers: Vec::new(),
        };
        let Some(response) = self.response.as_ref().filter(|_| transform) else {
            self.called = false;
            return Step::Ran(unchanged);
        };
        self.called = true;
        let result = engine.transform_response(&ResponseTransformInput {
            request: &self.request,
            response,
            backend_url: self.backend_url(),
            latency_ms,
        });
        Step::of(engine, HookName::ResponseTransform, result, || None).map(|rewrite| match rewrite {
            None => unchanged,
            Some(rw) => Answer {
                status: rw.status_code.unwrap_or(status),
                body: rw.body,
                headers: rw.headers,
            },
        })
    }

    /// Whether the backend's answer (`status`, `Content-Type`) is relayed
    /// as events ([`RequestHandle::stream`], [`RequestHandle::event`]) or
    /// read whole ([`RequestHandle::respond`]): core's rule,
    /// [`crate::http::api::answer_is_stream`], for the body
    /// [`RequestHandle::upstream`] sent.
    pub fn answer_is_stream(&self, status: u16, content_type: Option<&str>) -> bool {
        crate::http::api::answer_is_stream(self.stream, status, content_type)
    }

    /// Whether the backend's non-stream answer was parsed as JSON for the
    /// hooks (after [`RequestHandle::respond`]; a host may warn when a
    /// transform could not see it). An answer only a usage script could
    /// read counts once that script read it.
    pub fn answer_parsed(&self) -> bool {
        self.response
            .as_ref()
            .is_some_and(|r| !r.is_stream && r.body.is_parsed())
    }

    /// A stream's answer begins: its status and headers, as
    /// `response_transform` sees them with each event.
    pub fn stream(&mut self, status: u16, headers: Vec<(String, String)>) {
        self.status = status;
        self.response = Some(ResponseInfo {
            status_code: status,
            body: ResponseBody::default(),
            headers,
            is_stream: true,
        });
    }

    /// One event of the stream (its `data`): the usage it carries is kept
    /// for [`RequestHandle::usage`], what the forced `include_usage` added
    /// is removed ([`crate::policy::sse`]), and `response_transform` runs
    /// on the event. `latency_ms`: since the request went upstream. A
    /// host sends the response head with the first event it relays, with
    /// that event's status and header changes applied (later events' are
    /// too late to apply, as in the gateway).
    pub fn event(&mut self, engine: &Engine, data: &[u8], latency_ms: f64) -> Step<StreamEvent> {
        self.latency_ms = latency_ms;
        if crate::http::sse::is_content(data) {
            self.relayed += 1;
        }
        let transform = self.api.is_some() && engine.is_enabled(HookName::ResponseTransform);
        let event = sse::event(data, self.strip_usage, transform);
        let usage_body = event.usage_body(data);
        let sse::Event {
            data: relay,
            usage,
            parsed,
        } = event;
        let relay = match relay {
            None => Relay::Drop,
            Some(Cow::Borrowed(_)) => Relay::Unchanged,
            Some(Cow::Owned(d)) => Relay::Data(d),
        };
        let (status, headers) = match &self.response {
            Some(r) => (r.status_code, r.headers.clone()),
            None => (200, Vec::new()),
        };
        let parsed = parsed.map(Arc::new);
        if usage.is_some() {
            self.usage = usage;
            self.response = Some(ResponseInfo {
                status_code: status,
                body: usage_body.unwrap_or(Value::Null).into(),
                headers: headers.clone(),
                is_stream: true,
            });
        }
        let unchanged = |relay| StreamEvent {
            relay,
            status: None,
            headers: Vec::new(),
        };
        let Some(body) = parsed.filter(|_| transform && relay != Relay::Drop) else {
            self.called = false;
            return Step::Ran(unchanged(relay));
        };
        self.called = true;
        let response = ResponseInfo {
            status_code: status,
            body: body.into(),
            headers,
            is_stream: true,
        };
        let result = engine.transform_response(&ResponseTransformInput {
            request: &self.request,
            response: &response,
            backend_url: self.backend_url(),
            latency_ms,
        });
        Step::of(engine, HookName::ResponseTransform, result, || None).map(|rewrite| match rewrite {
            None => unchanged(relay),
            Some(rw) => StreamEvent {
                relay: rw.body.map_or(relay, Relay::Data),
                status: rw.status_code,
                headers: rw.headers,
            },
        })
    }

    /// The status the client got when the answer never reached
    /// [`RequestHandle::respond`] or [`RequestHandle::stream`] (an error
    /// relayed as is, a refusal): what the usage hook sees as
    /// `response.status_code`. An answer the handle saw keeps its status.
    pub fn answered(&mut self, status: u16) {
        if self.status == 0 {
            self.status = status;
        }
    }

    /// How many content events of the stream the host relayed (each
    /// `data` but `[DONE]`), for a host that does not hand every event to
    /// [`RequestHandle::event`] (which counts those it gets): an estimate
    /// charges them when the stream's usage never came.
    pub fn relayed_events(&mut self, events: u64) {
        self.relayed = self.relayed.max(events);
    }

    /// The usage of the answer: the backend's; for an API stream whose
    /// usage never came (the client left first, or the backend sent none),
    /// the core's estimate ([`crate::usage_estimate`], `"estimated": true`);
    /// else zeros.
    fn answer_usage(&self) -> Value {
        let stream = self.response.as_ref().is_some_and(|r| r.is_stream);
        let usage = if stream {
            crate::usage_estimate::stream_usage(
                self.usage.clone(),
                self.api.is_some(),
                &self.request.body,
                self.relayed,
            )
        } else {
            self.usage.clone()
        };
        usage.unwrap_or_else(usage::zero_usage)
    }

    /// The `usage` hook on the answer's usage (the backend's; an estimate
    /// for a stream whose usage never came; zeros when it reported none),
    /// and the charge that follows. Never denies (see the module).
    pub fn usage(&mut self, engine: &Engine) -> Step<Billing> {
        self.called = engine.is_enabled(HookName::Usage);
        let raw = self.answer_usage();
        let null_response;
        let response = match &self.response {
            Some(r) => r,
            None => {
                // An answer no script read, or that was not JSON.
                null_response = ResponseInfo {
                    status_code: self.status,
                    body: ResponseBody::default(),
                    headers: Vec::new(),
                    is_stream: false,
                };
                &null_response
            }
        };
        let metadata = UsageMetadata {
            backend_url: self.backend_url().to_owned(),
            latency_ms: self.latency_ms,
            is_stream: response.is_stream,
        };
        let result = engine.usage(&UsageInput {
            request: &self.request,
            usage: &raw,
            response,
            metadata: &metadata,
        });
        let step = match result {
            Ok(record) => Step::Ran(record),
            Err(e) => Step::FellBack(UsageRecord::Raw, e),
        };
        step.map(|record| {
            let (charge, custom, record_json) = match record {
                UsageRecord::Raw => (usage::charge(&raw, None), false, usage::record_json(&raw)),
                UsageRecord::Custom(c) => (usage::charge(&raw, Some(&c)), true, c.into_json()),
            };
            let estimated = crate::usage_estimate::is_estimated(&raw);
            Billing {
                usage: raw,
                custom,
                charge,
                record_json,
                estimated,
            }
        })
    }

    fn backend_url(&self) -> &str {
        self.request.backend_url.as_deref().unwrap_or_default()
    }
}
