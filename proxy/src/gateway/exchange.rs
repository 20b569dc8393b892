//! One proxied request: read and parse the body once, admission (auth and
//! rate limit, see [`super::admission`]), then attempts (routing -> balancer
//! -> request_transform -> upstream) with retries on another backend, then
//! the response (response_transform, usage) or the failure (error_handler).
//! Admission decides on counters in this process (the local backend, or a
//! batched Redis node's view) or, with `state.mode: exact`, in Redis.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use llmproxy_core::hooks::{ErrorInfo, ErrorResponse, HeaderChange, RequestInfo, ResponseInfo};
use llmproxy_core::http::api::{answer_is_stream, Api};
use llmproxy_core::http::fields::{self, TextBody};
use llmproxy_core::http::head::HeadRefusal;
use llmproxy_core::http::script_headers::Message;
use llmproxy_core::http::{path::PathError, usage_probe};
use llmproxy_core::policy::errors::{self, upstream_message, GatewayError};
use llmproxy_core::policy::failure::{self, Handled};
use llmproxy_core::policy::upstream as upstream_policy;
use llmproxy_core::{keys, HookName};
use serde_json::Value;

use super::admission::{self, Admitted, Caller, Completion, Refusal, Ticket};
use super::backend::Backend;
use super::body::GatewayBody;
use super::errors::{error_body, ErrorType, Failure, UpstreamReply, OVERLOADED};
use super::keyset;
use super::live::Live;
use super::pipeline::{Denied, StageResult, Timings};
use super::state::State;
use super::upstream::{self, UpstreamError};
use super::{headers, relay, request_id, Shared};

/// Which endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST` to an API endpoint (core's [`Api`]): JSON bodies,
    /// transforms and usage apply.
    Api(Api),
    /// Any other `/v1/*`: routed and relayed as is, no transforms.
    Passthrough,
    /// Not an endpoint of the gateway (404 through `error_handler`).
    NotFound,
    /// The path has no canonical form (400 through `error_handler`).
    BadPath(PathError),
    /// The request's head is over core's bounds, or its header lines or
    /// method are not what HTTP allows (`http::head`): 414, 431 or 400,
    /// through `error_handler` as core's failure policy says.
    BadHead(HeadRefusal),
}

impl Endpoint {
    /// JSON bodies, transforms and usage apply.
    fn is_api(self) -> bool {
        matches!(self, Endpoint::Api(_))
    }

    /// Streams of this endpoint can carry a final usage chunk.
    fn streams_usage(self) -> bool {
        matches!(self, Endpoint::Api(api) if api.streams_usage())
    }
}

/// Everything known about the request being proxied.
pub(crate) struct Exchange {
    pub shared: Arc<Shared>,
    pub live: Arc<Live>,
    pub caller: Caller,
    /// Set once admitted; completed (or dropped) exactly once.
    pub ticket: Option<Ticket>,
    pub info: Arc<RequestInfo>,
    pub endpoint: Endpoint,
    pub method: Method,
    pub path_and_query: String,
    pub client_headers: HeaderMap,
    pub body: Bytes,
    pub started: Instant,
    pub timings: Timings,
    pub retries: u32,
    /// Who the caller is has been established (auth is off, or the key
    /// passed the identity checks, or admission let the request in): only
    /// then does `error_handler` run.
    pub identified: bool,
}

/// One attempt's plan: the backend and what to send it.
struct Plan {
    backend: Arc<Backend>,
    body: Bytes,
    header_changes: Vec<(String, HeaderChange)>,
    stream: bool,
    strip_usage: bool,
}

enum Outcome {
    Done(Response<GatewayBody>),
    Retry(Failure),
    Fail(Failure),
}

/// Bodies up to this size are parsed on the tokio worker that read them;
/// larger ones on a blocking thread, so a big body cannot stall the worker.
const INLINE_PARSE_BYTES: usize = 64 << 10;

/// Why planning an attempt stopped the request.
enum Stop {
    Denied(Denied),
    Refused(Refusal),
}

/// Proxy one request to a backend. `path` is the request's canonical path
/// (see [`llmproxy_core::http::path`]): scripts see it, the upstream gets
/// it (with the client's query string); for [`Endpoint::BadPath`], the
/// path as sent, for the logs.
pub async fn proxy(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    client_ip: &str,
    endpoint: Endpoint,
    path: String,
) -> Response<GatewayBody> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let id = request_id::accept_or_generate(parts.headers.get(request_id::HEADER).map(HeaderValue::as_bytes));
    let live = shared.live();
    let api_key = keyset::presented_key(&parts.headers);
    let key = api_key.as_deref().and_then(|k| live.keys.get(k));
    let caller = Caller {
        key_id: match (&key, &api_key) {
            (Some(k), _) => Some(Arc::clone(&k.fingerprint)),
            (None, Some(k)) if live.admission_on() => Some(Arc::from(llmproxy_core::keys::key_fingerprint(k))),
            _ => None,
        },
        key: key.clone(),
    };
    let info = RequestInfo {
        id,
        // Scripts see the headers; without scripts nobody does.
        headers: if live.stages.any_enabled() {
            headers::for_scripts(&parts.headers, Message::Request)
        } else {
            Vec::new()
        },
        api_key,
        user_id: key.map(|k| k.record.user_id.clone()),
        client_ip: Some(client_ip.to_owned()),
        path: Some(path),
        ..RequestInfo::default()
    };
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{}?{q}", info.path.as_deref().unwrap_or("/")),
        None => info.path.clone().unwrap_or_else(|| String::from("/")),
    };
    let mut ex = Exchange {
        shared,
        live,
        caller,
        ticket: None,
        info: Arc::new(info),
        endpoint,
        method: parts.method,
        path_and_query,
        client_headers: parts.headers,
        body: Bytes::new(),
        started,
        timings: Timings::default(),
        retries: 0,
        identified: false,
    };
    // Who may shape this request's failures is settled by its headers, not
    // by where it fails (core's `policy::failure`, docs/adr/042).
    ex.identified = !ex.live.auth_on
        || keys::identifies_caller(
            ex.caller.key.as_ref().map(|k| &k.record),
            ex.info.client_ip.as_deref(),
            Utc::now(),
        );
    if endpoint == Endpoint::NotFound {
        let f = Failure::new(
            ErrorType::BadRequest,
            404,
            "not_found",
            format!(
                "{} {} is not an endpoint of this gateway",
                ex.method,
                ex.info.path.as_deref().unwrap_or("/")
            ),
        );
        return ex.fail(f).await;
    }
    match endpoint {
        Endpoint::BadPath(e) => return ex.fail(Failure::of(GatewayError::invalid_path(e))).await,
        Endpoint::BadHead(refusal) => {
            // A refused head identifies no caller: its headers are not
            // read (nginx, which refuses such heads itself, cannot).
            ex.identified = !ex.live.auth_on;
            let mut f = Failure::of(refusal.error());
            // A malformed request (its host, a header sent twice, its
            // method) ends its connection, as in nginx.
            f.close_connection = refusal == HeadRefusal::Malformed;
            return ex.fail(f).await;
        }
        _ => {}
    }
    // The key before the body: an unauthenticated body is never read.
    if ex.live.auth_on && !ex.live.stages.enabled(HookName::Auth) {
        match admission::precheck(&ex.shared, &ex.live, &ex.info, &ex.caller) {
            Ok(()) => {}
            Err(r) => return ex.refused(r).await,
        }
    }
    let max = ex.shared.config.max_body_bytes;
    let timeout = Duration::from_millis(ex.shared.config.body_read_timeout_ms);
    match read_body(body, &ex.client_headers, max, timeout).await {
        Ok(b) => ex.body = b,
        Err(f) => {
            if f.code == "body_timeout" {
                ex.shared.metrics.bounds.body_timeouts.fetch_add(1, Ordering::Relaxed);
            }
            return ex.fail(f).await;
        }
    }
    let parsed = match parse_body(endpoint, &ex.body, &ex.live).await {
        Ok(v) => v,
        Err(f) => return ex.fail(f).await,
    };
    if let Some(info) = Arc::get_mut(&mut ex.info) {
        info.body = Arc::new(parsed);
    }
    ex.run().await
}

/// Parse the body (core's rule, `fields::parse_request_body`: API
/// endpoints need a JSON object; passthrough scripts see the body when it
/// happens to be JSON). Big bodies are parsed on a blocking thread.
async fn parse_body(endpoint: Endpoint, body: &Bytes, live: &Arc<Live>) -> Result<Value, Failure> {
    let api = match endpoint {
        Endpoint::Api(api) => Some(api),
        _ => None,
    };
    let parse = move |body: &[u8], live: &Live| {
        fields::parse_request_body(api, body, live.stages.engine().config()).map_err(Failure::of)
    };
    if body.len() <= INLINE_PARSE_BYTES {
        return parse(body, live);
    }
    let (body, live) = (body.clone(), Arc::clone(live));
    tokio::task::spawn_blocking(move || parse(&body, &live))
        .await
        .unwrap_or_else(|e| Err(Failure::of(GatewayError::invalid_json(e))))
}

/// Read the whole body: at most `max` bytes (413), within `timeout` of the
/// head (408, and the connection closes: the rest of the body is unread).
async fn read_body(body: Incoming, headers: &HeaderMap, max: usize, timeout: Duration) -> Result<Bytes, Failure> {
    let too_large = || Failure::of(GatewayError::body_too_large(max as u64));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let collected = match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Ok(r) => r,
        Err(_) => {
            let mut f = Failure::new(
                ErrorType::Timeout,
                408,
                "body_timeout",
                format!("the request body did not arrive within {} ms", timeout.as_millis()),
            );
            f.close_connection = true;
            return Err(f);
        }
    };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(Failure::of(GatewayError::body_unreadable(e))),
    }
}

impl Exchange {
    async fn run(mut self) -> Response<GatewayBody> {
        // Admission, unless neither auth nor limits apply.
        if !self.live.admission_on() {
            self.admitted(Admitted::default());
        } else {
            let shared = Arc::clone(&self.shared);
            let mut t = Timings::default();
            let r = match &*shared.state {
                State::Local(local) => {
                    let counting = admission::Counting::Local(local);
                    admission::admit_counted(&shared, &self.live, counting, &self.info, &self.caller, &mut t).await
                }
                State::Redis(redis) => match &redis.batched {
                    Some(b) => {
                        let counting = admission::Counting::Fleet(redis, b);
                        admission::admit_counted(&shared, &self.live, counting, &self.info, &self.caller, &mut t).await
                    }
                    None => admission::admit_redis(&shared, &self.live, redis, &self.info, &self.caller, &mut t).await,
                },
            };
            self.timings.merge(t);
            match r {
                Ok(a) => self.admitted(a),
                Err(r) => return self.refused(r).await,
            }
        }
        let max_retries = self.shared.config.retry.max_retries;
        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<Failure> = None;
        for attempt in 0..=max_retries {
            let plan = match self.plan(attempt == 0, &tried).await {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(Stop::Denied(denied)) => return self.denied(denied),
                Err(Stop::Refused(r)) => return self.refused(r).await,
            };
            tried.push(plan.backend.index);
            if attempt > 0 {
                self.retries += 1;
                self.shared.metrics.retry();
            }
            match self.attempt(plan, attempt < max_retries).await {
                Outcome::Done(resp) => return resp,
                Outcome::Retry(f) => {
                    tracing::info!(
                        target: "llmproxy::gateway",
                        request_id = %self.info.id,
                        backend = f.backend.as_ref().map_or("-", |b| b.name.as_str()),
                        "attempt failed, retrying: {}", f.message
                    );
                    last = Some(f);
                }
                Outcome::Fail(f) => return self.fail(f).await,
            }
        }
        let mut f = last.unwrap_or_else(|| Failure::of(GatewayError::no_backend()));
        f.retry_count = self.retries;
        self.fail(f).await
    }

    /// The request was admitted: it now owns a ticket.
    fn admitted(&mut self, a: Admitted) {
        self.identified = true;
        self.ticket = Some(Ticket::new(
            &self.shared,
            &self.live,
            &self.info,
            &self.caller,
            a,
            self.started,
        ));
    }

    /// Admission refused the request.
    async fn refused(&mut self, r: Refusal) -> Response<GatewayBody> {
        match r {
            Refusal::Fail(f) => self.fail(*f).await,
            Refusal::Deny(d) => self.denied(d),
        }
    }

    /// Routing (first attempt only), the balancer, and request_transform,
    /// as one hook job when a script is involved: inline when fast, else
    /// on a hook thread (docs/adr/049). An overloaded hook pool fails the
    /// request with a 503.
    async fn plan(&mut self, use_routing: bool, tried: &[usize]) -> Result<Option<Plan>, Stop> {
        let shared = Arc::clone(&self.shared);
        let live = Arc::clone(&self.live);
        let info = Arc::clone(&self.info);
        let raw = self.body.clone();
        let endpoint = self.endpoint;
        let tried = tried.to_vec();
        let stages = &self.live.stages;
        let scripted = (use_routing && stages.enabled(HookName::Routing))
            || (endpoint.is_api() && stages.enabled(HookName::RequestTransform));
        // Run twice when an inline attempt overruns: the balancer's pick is
        // then made twice (a round-robin turn skipped), nothing else.
        let job = move || {
            let mut t = Timings::default();
            let r = plan_sync(
                &shared,
                &live,
                &info,
                raw.clone(),
                endpoint,
                use_routing,
                &tried,
                &mut t,
            );
            (r, t)
        };
        let (result, t) = if scripted {
            match self.shared.hooks.call(job).await {
                Ok(r) => r,
                Err(e) if e.is_overload() => {
                    return Err(Stop::Refused(Refusal::Fail(Box::new(Failure::overloaded()))));
                }
                Err(_) => {
                    return match self.live.stages.lost(HookName::Routing) {
                        Some(d) => Err(Stop::Denied(d)),
                        None => Ok(None),
                    };
                }
            }
        } else {
            job()
        };
        self.timings.merge(t);
        result.map_err(Stop::Denied)
    }

    async fn attempt(&mut self, plan: Plan, can_retry: bool) -> Outcome {
        let b = Arc::clone(&plan.backend);
        let req = match self.upstream_request(&plan) {
            Ok(r) => r,
            Err(msg) => {
                return Outcome::Fail(self.failure_at(&b, ErrorType::BadRequest, 400, "bad_upstream_request", msg))
            }
        };
        let inflight = b.health.begin();
        let sent = Instant::now();
        let resp = match upstream::send(&b, req).await {
            Ok(r) => r,
            Err(e) => return self.upstream_error(&b, e, can_retry),
        };
        let status = resp.status().as_u16();
        let retry_cfg = &self.shared.config.retry;
        if can_retry && retry_cfg.on_status.contains(&status) {
            b.health.failure();
            // Keep the backend's answer: it is what the client gets when no
            // other backend is left to try.
            let (parts, mut body) = resp.into_parts();
            let max = self.shared.config.max_response_bytes;
            let bytes = upstream::read_all(&mut body, b.timeouts.idle, max)
                .await
                .unwrap_or_default();
            self.shared.metrics.upstream_latency(b.index, sent.elapsed());
            let message = upstream_message(status, &bytes);
            let mut f = self.failure_at(
                &b,
                ErrorType::of_upstream_status(status),
                status,
                "backend_status",
                message,
            );
            f.upstream = Some(Box::new(UpstreamReply {
                status,
                headers: headers::downstream(&parts.headers),
                body: bytes,
            }));
            return Outcome::Retry(f);
        }
        if answer_is_stream(plan.stream, status, headers::content_type(resp.headers())) {
            let ctx = relay::StreamStart {
                backend: Arc::clone(&b),
                sent,
                strip_usage: plan.strip_usage,
                transform: self.endpoint.is_api(),
                inflight,
            };
            return match relay::start(self, ctx, resp).await {
                Ok(r) => Outcome::Done(r),
                Err(e) => self.upstream_error(&b, e, can_retry),
            };
        }
        let (parts, mut body) = resp.into_parts();
        let max = self.shared.config.max_response_bytes;
        let bytes = match upstream::read_all(&mut body, b.timeouts.idle, max).await {
            Ok(bytes) => bytes,
            Err(e) => return self.upstream_error(&b, e, can_retry),
        };
        drop(inflight);
        let latency = sent.elapsed();
        self.shared.metrics.upstream_latency(b.index, latency);
        if status >= 500 {
            b.health.failure();
        } else {
            b.health.success(Some(latency));
        }
        if status >= 400 {
            let message = upstream_message(status, &bytes);
            let mut f = self.failure_at(
                &b,
                ErrorType::of_upstream_status(status),
                status,
                "backend_status",
                message,
            );
            f.upstream = Some(Box::new(UpstreamReply {
                status,
                headers: headers::downstream(&parts.headers),
                body: bytes,
            }));
            return Outcome::Fail(f);
        }
        Outcome::Done(self.respond(&b, parts, bytes, latency).await)
    }

    fn upstream_error(&self, b: &Backend, e: UpstreamError, can_retry: bool) -> Outcome {
        b.health.failure();
        let retry = &self.shared.config.retry;
        // The failures every host has are the core's; the rest are bounds
        // only this gateway enforces.
        let (e, retryable) = match &e {
            UpstreamError::Connect(m) => (GatewayError::backend_unreachable(m), retry.on_connect_error),
            UpstreamError::Timeout(phase) => (GatewayError::backend_timeout(phase), retry.on_timeout),
            UpstreamError::Io(m) => (GatewayError::backend_failed(m), retry.on_connect_error),
            UpstreamError::TooLarge => (GatewayError::response_too_large(), false),
            UpstreamError::InterimStatus(_) => (bound(&e, "backend_bad_status"), retry.on_connect_error),
            UpstreamError::EventTooLarge => (GatewayError::event_too_large(), false),
        };
        let f = self.failure_at(b, e.kind, e.status, e.code, e.message);
        if can_retry && retryable {
            Outcome::Retry(f)
        } else {
            Outcome::Fail(f)
        }
    }

    fn failure_at(&self, b: &Backend, kind: ErrorType, status: u16, code: &'static str, message: String) -> Failure {
        let mut f = Failure::new(kind, status, code, message);
        f.backend = self.shared.backends.get(b.index).cloned();
        f.retry_count = self.retries;
        f
    }

    fn upstream_request(&self, plan: &Plan) -> Result<Request<Full<Bytes>>, String> {
        let b = &plan.backend;
        let uri = b.uri(&self.path_and_query)?;
        let mut h = headers::upstream(&self.client_headers, self.endpoint.is_api());
        // The backend's host, unless the backend's config names one below
        // (no script may set it: the engine drops it from a result; the
        // HTTP client only fills in a missing one).
        h.insert(header::HOST, b.host.clone());
        if self.live.auth_on {
            // The client's key is the gateway's, never the backend's.
            h.remove(header::AUTHORIZATION);
            h.remove("x-api-key");
        }
        headers::apply(&mut h, &plan.header_changes, &self.info.id);
        for (k, v) in &b.headers {
            h.insert(k.clone(), v.clone());
        }
        if let Ok(v) = HeaderValue::from_str(&self.info.id) {
            h.insert(request_id::HEADER, v);
        }
        if !plan.body.is_empty() || self.method == Method::POST {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(plan.body.len()));
        }
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(uri)
            .body(Full::new(plan.body.clone()))
            .map_err(|e| format!("cannot build the upstream request: {e}"))?;
        *req.headers_mut() = h;
        Ok(req)
    }

    /// A successful non-streamed response: response_transform, then the
    /// usage stage (after the response is on its way).
    async fn respond(
        &mut self,
        b: &Arc<Backend>,
        parts: hyper::http::response::Parts,
        bytes: Bytes,
        latency: Duration,
    ) -> Response<GatewayBody> {
        let mut status = parts.status.as_u16();
        let mut out_headers = headers::downstream(&parts.headers);
        let mut out_body = bytes.clone();
        let transform = self.live.stages.enabled(HookName::ResponseTransform);
        let usage_script = self.live.stages.enabled(HookName::Usage);
        let (body, usage) = if self.endpoint.is_api() {
            usage_probe::answer(&bytes, transform, usage_script, || bytes.clone())
        } else {
            (None, None)
        };
        let latency_ms = latency.as_secs_f64() * 1e3;
        let completion = Completion {
            backend: Some(Arc::clone(b)),
            status,
            usage,
            response: body.clone().map(|body| ResponseInfo {
                status_code: status,
                body,
                headers: Vec::new(),
                is_stream: false,
            }),
            latency_ms,
            is_stream: false,
        };
        // The usage stage runs after the response is on its way: on the
        // hook thread right after response_transform when that ran there,
        // else on its own. (A transform may change the status the client gets;
        // the ledger records the backend's.)
        let usage_job = self.ticket.take().and_then(|t| t.job(completion));
        match body.filter(|_| transform) {
            Some(body) => {
                let live = Arc::clone(&self.live);
                let info = Arc::clone(&self.info);
                let response = ResponseInfo {
                    status_code: status,
                    body,
                    headers: headers::for_scripts(&out_headers, Message::Answer),
                    is_stream: false,
                };
                let url = b.url.clone();
                let job = move || {
                    let mut t = Timings::default();
                    let r = live
                        .stages
                        .transform_response(&info, &response, &url, latency_ms, &mut t);
                    (r, t)
                };
                // Inline when fast; else on a hook thread, with the usage
                // job right after it there (no second trip).
                let ran = match self.shared.hooks.try_inline(&job) {
                    Some(r) => {
                        if let Some(u) = usage_job {
                            admission::run_usage(&self.shared, &self.live, u);
                        }
                        r
                    }
                    None => {
                        let then = move || {
                            if let Some(u) = usage_job {
                                u.run();
                            }
                        };
                        self.shared.hooks.run_then(job, then).await
                    }
                };
                let result = match ran {
                    Ok((r, t)) => {
                        self.timings.merge(t);
                        r
                    }
                    Err(e) if e.is_overload() => return self.fail(Failure::overloaded()).await,
                    Err(_) => match self.live.stages.lost(HookName::ResponseTransform) {
                        Some(d) => Err(d),
                        None => Ok(None),
                    },
                };
                match result {
                    Ok(Some(rw)) => {
                        if let Some(s) = rw.status_code {
                            status = s;
                        }
                        if let Some(body) = rw.body {
                            out_body = Bytes::from(body);
                        }
                        headers::apply(&mut out_headers, &rw.headers, &self.info.id);
                    }
                    Ok(None) => {}
                    Err(denied) => return self.denied(denied),
                }
            }
            None => {
                if let Some(u) = usage_job {
                    admission::run_usage(&self.shared, &self.live, u);
                }
            }
        }
        let mut resp = Response::new(GatewayBody::full(out_body));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        *resp.headers_mut() = out_headers;
        self.finish(resp, Some(b), Some(latency))
    }

    /// Add the gateway's headers, log the request, count it.
    pub(crate) fn finish(
        &self,
        mut resp: Response<GatewayBody>,
        backend: Option<&Backend>,
        upstream: Option<Duration>,
    ) -> Response<GatewayBody> {
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.info.id) {
            h.insert(request_id::HEADER, v);
        }
        if let Some(b) = backend {
            if let Ok(v) = HeaderValue::from_str(&b.name) {
                h.insert("x-llmproxy-backend", v);
            }
        }
        let status = resp.status().as_u16();
        let name = backend.map_or(super::metrics::NO_BACKEND, |b| b.name.as_str());
        self.shared.metrics.request(backend.map(|b| b.index), status);
        access_log(self, name, status, upstream, false);
        resp
    }

    /// Whether `error_handler` may shape this failure at all: never for an
    /// unknown endpoint (404), nor when the hook threads are overloaded.
    /// Whether the caller is identified is the other half of core's rule
    /// (docs/gateway.md, "Errors").
    fn handler_applies(&self, f: &Failure) -> bool {
        self.live.stages.enabled(HookName::ErrorHandler) && self.endpoint != Endpoint::NotFound && f.code != OVERLOADED
    }

    /// A request failed. Which hooks shape the response, in what order, is
    /// core's rule (`llmproxy_core::policy::failure`, docs/adr/042):
    /// error_handler first (see [`Exchange::handler_applies`]); when it
    /// keeps the default and the backend answered with a JSON error,
    /// response_transform runs on that answer as on any other; the
    /// default is the backend's own answer, else the gateway's error body.
    pub(crate) async fn fail(&mut self, f: Failure) -> Response<GatewayBody> {
        let upstream_json: Option<Arc<Value>> = f
            .upstream
            .as_ref()
            .and_then(|u| serde_json::from_slice::<Value>(&u.body).ok())
            .map(Arc::new);
        let facts = failure::Facts {
            source: match &f.upstream {
                Some(_) => failure::Source::Upstream {
                    json_body: upstream_json.is_some(),
                },
                None => failure::Source::Gateway,
            },
            error_handler: self.handler_applies(&f),
            caller_identified: self.identified,
            response_transform: self.endpoint.is_api() && self.live.stages.enabled(HookName::ResponseTransform),
        };
        let (decision, handled) = match failure::next_step(&facts, Handled::NotRun) {
            failure::Step::ErrorHandler => {
                let d = self.run_error_handler(&f).await;
                let handled = match &d {
                    Err(_) => Handled::Denied,
                    Ok(ErrorResponse::Default) => Handled::Kept,
                    Ok(ErrorResponse::Custom { .. }) => Handled::Replaced,
                };
                (d, handled)
            }
            _ => (Ok(ErrorResponse::Default), Handled::NotRun),
        };
        let transform = failure::next_step(&facts, handled) == failure::Step::ResponseTransform;
        let backend = f.backend.clone();
        let upstream_usage = upstream_json
            .as_ref()
            .and_then(|v| v.get("usage").filter(|u| u.is_object()).cloned());
        let retry_after = f.retry_after;
        let close = f.close_connection;
        let resp = match decision {
            Err(denied) => return self.denied(denied),
            Ok(ErrorResponse::Default) => match f.upstream {
                Some(up) => {
                    let mut r = Response::new(GatewayBody::full(up.body));
                    *r.status_mut() = StatusCode::from_u16(up.status).unwrap_or(StatusCode::BAD_GATEWAY);
                    *r.headers_mut() = up.headers;
                    match (transform, upstream_json, &backend) {
                        (true, Some(json), Some(b)) => match self.transform_error_answer(r, json, &b.url).await {
                            Ok(r) => r,
                            Err(denied) => return self.denied(denied),
                        },
                        _ => r,
                    }
                }
                None => json_response(f.status, f.default_body()),
            },
            Ok(ErrorResponse::Custom {
                status_code,
                body,
                headers: changes,
            }) => {
                let mut r = json_response(status_code, Bytes::from(body));
                headers::apply(r.headers_mut(), &changes, &self.info.id);
                r
            }
        };
        let mut resp = resp;
        if close {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = retry_after {
            if !resp.headers().contains_key(header::RETRY_AFTER) {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
        }
        tracing::debug!(target: "llmproxy::gateway", request_id = %self.info.id, kind = f.kind.as_str(), "request failed: {}", f.message);
        if let Some(t) = self.ticket.take() {
            t.complete(Completion {
                backend: backend.clone(),
                status: resp.status().as_u16(),
                usage: upstream_usage,
                response: None,
                latency_ms: self.started.elapsed().as_secs_f64() * 1e3,
                is_stream: false,
            });
        }
        self.finish(resp, backend.as_deref(), None)
    }

    /// Run error_handler on failure `f` (a hook job: inline when fast, else on a hook thread).
    async fn run_error_handler(&mut self, f: &Failure) -> Result<ErrorResponse, Denied> {
        let live = Arc::clone(&self.live);
        let info = Arc::clone(&self.info);
        let error = ErrorInfo {
            kind: f.kind.as_str().to_owned(),
            message: f.message.clone(),
            status_code: f.status,
            backend_url: f.backend.as_ref().map(|b| b.url.clone()),
            retry_count: f.retry_count,
        };
        let job = move || {
            let mut t = Timings::default();
            let r = live.stages.handle_error(&info, &error, &mut t);
            (r, t)
        };
        match self.shared.hooks.call(job).await {
            Ok((r, t)) => {
                self.timings.merge(t);
                r
            }
            Err(e) if e.is_overload() => Ok(ErrorResponse::Default),
            Err(_) => match self.live.stages.lost(HookName::ErrorHandler) {
                Some(d) => Err(d),
                None => Ok(ErrorResponse::Default),
            },
        }
    }

    /// response_transform on a backend's error answer `r` (its body parsed
    /// as `json`), as on any other answer: the script sees the backend's
    /// status and may change status, body and headers.
    async fn transform_error_answer(
        &mut self,
        mut r: Response<GatewayBody>,
        json: Arc<Value>,
        backend_url: &str,
    ) -> Result<Response<GatewayBody>, Denied> {
        let live = Arc::clone(&self.live);
        let info = Arc::clone(&self.info);
        let response = ResponseInfo {
            status_code: r.status().as_u16(),
            body: json.into(),
            headers: headers::for_scripts(r.headers(), Message::Answer),
            is_stream: false,
        };
        let url = backend_url.to_owned();
        let latency_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let job = move || {
            let mut t = Timings::default();
            let r = live
                .stages
                .transform_response(&info, &response, &url, latency_ms, &mut t);
            (r, t)
        };
        let result = match self.shared.hooks.call(job).await {
            Ok((r, t)) => {
                self.timings.merge(t);
                r
            }
            Err(e) if e.is_overload() => {
                // The answer goes out untransformed rather than as a
                // second failure.
                tracing::warn!(target: "llmproxy::gateway", request_id = %self.info.id, "hook threads overloaded: the backend's error answer is not transformed");
                Ok(None)
            }
            Err(_) => match self.live.stages.lost(HookName::ResponseTransform) {
                Some(d) => Err(d),
                None => Ok(None),
            },
        };
        if let Some(rw) = result? {
            if let Some(s) = rw.status_code.and_then(|s| StatusCode::from_u16(s).ok()) {
                *r.status_mut() = s;
            }
            if let Some(body) = rw.body {
                let bytes = Bytes::from(body);
                r.headers_mut().remove(header::CONTENT_LENGTH);
                *r.body_mut() = GatewayBody::full(bytes);
            }
            headers::apply(r.headers_mut(), &rw.headers, &self.info.id);
        }
        Ok(r)
    }

    /// A hook failed under `on_error: deny`: 503, not shaped by scripts.
    pub(crate) fn denied(&mut self, d: Denied) -> Response<GatewayBody> {
        if let Some(t) = self.ticket.take() {
            t.complete(Completion {
                status: 503,
                ..Completion::default()
            });
        }
        let body = error_body(
            &errors::hook_failed_message(d.hook.as_str(), d.error.kind.as_str()),
            errors::HOOK_ERROR,
            errors::HOOK_FAILED,
        );
        self.finish(json_response(503, body), None, None)
    }
}

/// A 502 for a bound of this gateway's that the backend's answer broke.
fn bound(e: &UpstreamError, code: &'static str) -> GatewayError {
    GatewayError {
        kind: ErrorType::BackendError,
        status: 502,
        code,
        message: e.message(),
    }
}

#[allow(clippy::too_many_arguments)]
fn plan_sync(
    shared: &Shared,
    live: &Live,
    info: &RequestInfo,
    raw: Bytes,
    endpoint: Endpoint,
    use_routing: bool,
    tried: &[usize],
    t: &mut Timings,
) -> StageResult<Option<Plan>> {
    let stages = &live.stages;
    let backends = &shared.backends;
    let chosen = if use_routing && stages.enabled(HookName::Routing) {
        let statuses: Vec<_> = backends.iter().map(|b| b.status()).collect();
        stages.route(info, &statuses, t)?
    } else {
        None
    };
    let index = match chosen.and_then(|name| backends.iter().position(|b| b.name == name)) {
        Some(i) => Some(i),
        None => shared.balancer.pick(tried),
    };
    let Some(index) = index else {
        return Ok(None);
    };
    let backend = Arc::clone(&backends[index]);
    let rewrite = if endpoint.is_api() && stages.enabled(HookName::RequestTransform) {
        let mut req = info.clone();
        req.backend_url = Some(backend.url.clone());
        stages.transform_request(&req, t)?
    } else {
        None
    };
    let (new_body, header_changes) = match rewrite {
        Some(rw) => (rw.body, rw.headers),
        None => (None, Vec::new()),
    };
    let (body, stream, strip_usage) = upstream_body(endpoint, &info.body, raw, new_body);
    Ok(Some(Plan {
        backend,
        body,
        header_changes,
        stream,
        strip_usage,
    }))
}

/// The body to send upstream (the core's rule,
/// [`llmproxy_core::policy::upstream`]): the client's bytes when nothing
/// changed.
fn upstream_body(endpoint: Endpoint, original: &Value, raw: Bytes, new_body: Option<TextBody>) -> (Bytes, bool, bool) {
    let sent = upstream_policy::body(original, new_body, endpoint.streams_usage());
    let body = sent.body.map_or(raw, Bytes::from);
    (body, sent.stream, sent.strip_usage)
}

/// A JSON response with the given status.
pub(crate) fn json_response(status: u16, body: Bytes) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// One JSON log line per request.
pub(crate) fn access_log(ex: &Exchange, backend: &str, status: u16, upstream: Option<Duration>, stream: bool) {
    let t = &ex.timings;
    tracing::info!(
        target: "llmproxy::access",
        request_id = %ex.info.id,
        method = %ex.method,
        path = ex.info.path.as_deref().unwrap_or("/"),
        backend,
        status,
        stream,
        retries = ex.retries,
        latency_ms = ex.started.elapsed().as_secs_f64() * 1e3,
        upstream_ms = upstream.map(|d| d.as_secs_f64() * 1e3),
        auth_us = t.get(HookName::Auth),
        rate_limit_us = t.get(HookName::RateLimit),
        routing_us = t.get(HookName::Routing),
        request_transform_us = t.get(HookName::RequestTransform),
        response_transform_us = t.get(HookName::ResponseTransform),
        error_handler_us = t.get(HookName::ErrorHandler),
        "request"
    );
}
