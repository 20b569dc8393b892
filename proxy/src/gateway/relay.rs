//! SSE streams: relayed event by event, never buffered whole.
//!
//! The response head goes to the client when the backend's first event has
//! arrived (until then a failure can still be retried on another backend;
//! after it, never), with that event alone: events that came in the same
//! read are transformed after it is on its way. Each event runs
//! `response_transform` with `response.is_stream = true` and the event's
//! JSON as `response.body`; `[DONE]` and non-JSON events pass through
//! untouched. The usage chunk is captured for the usage stage, and removed
//! when only the gateway asked for it (core's `policy::sse`, the rule nginx
//! follows too).

use llmproxy_core::policy::errors::{HOOK_ERROR, HOOK_FAILED};
use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use llmproxy_core::hooks::{HeaderChange, RequestInfo, ResponseInfo};
use llmproxy_core::http::script_headers::Message;
use llmproxy_core::policy::sse as sse_policy;
use llmproxy_core::HookName;
use serde_json::Value;
use tokio::sync::mpsc;

use super::admission::{Completion, Ticket};
use super::backend::Backend;
use super::body::GatewayBody;
use super::errors::error_body;
use super::exchange::Exchange;
use super::health::InFlight;
use super::live::Live;
use super::pipeline::{Denied, Timings};
use super::upstream::{self, UpstreamError};
use super::{headers, request_id, Shared};
use llmproxy_core::http::sse::{self, SseParser};

/// Frames buffered between the relay task and the client connection.
const CHANNEL_FRAMES: usize = 16;

/// What the attempt hands over to the relay.
pub(crate) struct StreamStart {
    pub backend: Arc<Backend>,
    pub sent: Instant,
    pub strip_usage: bool,
    pub transform: bool,
    pub inflight: InFlight,
}

/// Status and header changes asked for by the first event's transform.
type HeadRewrite = (Option<u16>, Vec<(String, HeaderChange)>);

/// Per-stream state used while processing events.
#[derive(Clone)]
struct Events {
    shared: Arc<Shared>,
    live: Arc<Live>,
    info: Arc<RequestInfo>,
    backend_url: String,
    status: u16,
    script_headers: Vec<(String, String)>,
    sent: Instant,
    strip_usage: bool,
    transform: bool,
    usage: Option<Value>,
    usage_body: Option<Arc<Value>>,
    head: Option<HeadRewrite>,
    denied: Option<Denied>,
    timings: Timings,
    /// Data events relayed (not `[DONE]`): the completion tokens charged
    /// when the usage chunk never comes.
    relayed: u64,
}

impl Events {
    /// Process a batch of complete events into the bytes to send.
    fn process(&mut self, events: Vec<Bytes>) -> Bytes {
        let mut out = BytesMut::new();
        for ev in events {
            if self.denied.is_some() {
                break;
            }
            if let Some(b) = self.one(ev) {
                out.extend_from_slice(&b);
            }
        }
        out.freeze()
    }

    fn one(&mut self, ev: Bytes) -> Option<Bytes> {
        let Some(data) = sse::data(&ev) else {
            return Some(ev);
        };
        if !sse::is_content(&data) {
            return Some(ev);
        }
        self.relayed += 1;
        let transform = self.transform && self.live.stages.enabled(HookName::ResponseTransform);
        let event = sse_policy::event(&data, self.strip_usage, transform);
        if event.usage.is_some() {
            self.usage_body = event.usage_body(&data).map(Arc::new);
        }
        let sse_policy::Event {
            data: relay,
            usage,
            parsed,
        } = event;
        if usage.is_some() {
            self.usage = usage;
        }
        let rewritten = match relay? {
            Cow::Owned(d) => Some(d),
            Cow::Borrowed(_) => None,
        };
        let relay = |ev: Bytes| match &rewritten {
            Some(d) => Bytes::from(sse::with_data(&ev, d)),
            None => ev,
        };
        let Some(value) = parsed.filter(|_| transform) else {
            return Some(relay(ev));
        };
        let value = Arc::new(value);
        let response = ResponseInfo {
            status_code: self.status,
            body: Arc::clone(&value).into(),
            headers: self.script_headers.clone(),
            is_stream: true,
        };
        let latency_ms = self.sent.elapsed().as_secs_f64() * 1e3;
        let result = self.live.stages.transform_response(
            &self.info,
            &response,
            &self.backend_url,
            latency_ms,
            &mut self.timings,
        );
        match result {
            Ok(None) => {
                self.head.get_or_insert((None, Vec::new()));
                Some(relay(ev))
            }
            Ok(Some(rw)) => {
                if self.head.is_none() {
                    self.head = Some((rw.status_code, rw.headers));
                }
                match rw.body {
                    Some(body) => Some(Bytes::from(sse::with_data(&ev, &body))),
                    None => Some(relay(ev)),
                }
            }
            Err(d) => {
                let msg = format!("the stream was stopped: the {} hook failed", d.hook);
                self.denied = Some(d);
                Some(Bytes::from(sse::data_event(&error_body(&msg, HOOK_ERROR, HOOK_FAILED))))
            }
        }
    }
}

/// Events as the relay sends them (the parser's own buffers, not copied).
fn frames(events: Vec<Vec<u8>>) -> Vec<Bytes> {
    events.into_iter().map(Bytes::from).collect()
}

/// Run `process` where it may: with a response_transform script, inline
/// when it is fast (on a copy of the relay's state, so that an attempt
/// that overruns is dropped whole, docs/adr/049), else on a hook thread;
/// without one, here. `None` when the hook job was lost.
async fn process(mut ev: Events, batch: Vec<Bytes>) -> Option<(Events, Bytes)> {
    if !(ev.transform && ev.live.stages.enabled(HookName::ResponseTransform)) {
        let out = ev.process(batch);
        return Some((ev, out));
    }
    let shared = Arc::clone(&ev.shared);
    let live = Arc::clone(&ev.live);
    let inline = shared.hooks.try_inline(&|| {
        let mut copy = ev.clone();
        let out = copy.process(batch.clone());
        (copy, out)
    });
    let result = match inline {
        Some(r) => r,
        None => {
            shared
                .hooks
                .run(move || {
                    let out = ev.process(batch);
                    (ev, out)
                })
                .await
        }
    };
    match result {
        Ok(r) => Some(r),
        Err(_) => {
            live.stages.lost(HookName::ResponseTransform);
            None
        }
    }
}

/// Wait for the first event, send the head with it, and relay the rest
/// from a task. An error before the first event is returned (retryable).
pub(crate) async fn start(
    ex: &mut Exchange,
    start: StreamStart,
    resp: Response<Incoming>,
) -> Result<Response<GatewayBody>, UpstreamError> {
    let b = Arc::clone(&start.backend);
    let (parts, mut body) = resp.into_parts();
    let deadline = start.sent + b.timeouts.first_byte;
    let mut parser = SseParser::with_max(ex.shared.config.max_event_bytes);
    let mut first = Vec::new();
    let mut ended = false;
    while first.is_empty() {
        match upstream::next_chunk(&mut body, b.timeouts.idle, Some(deadline)).await? {
            Some(chunk) => {
                first = frames(parser.push(&chunk));
                if parser.overflowed() {
                    ex.shared
                        .metrics
                        .bounds
                        .events_too_large
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(UpstreamError::EventTooLarge);
                }
            }
            None => {
                ended = true;
                first.extend(std::mem::take(&mut parser).finish().map(Bytes::from));
                break;
            }
        }
    }
    let ttfb = start.sent.elapsed();
    ex.shared.metrics.upstream_latency(b.index, ttfb);
    b.health.success(Some(ttfb));

    let mut out_headers = headers::downstream(&parts.headers);
    let events = Events {
        shared: Arc::clone(&ex.shared),
        live: Arc::clone(&ex.live),
        info: Arc::clone(&ex.info),
        backend_url: b.url.clone(),
        status: parts.status.as_u16(),
        script_headers: headers::for_scripts(&out_headers, Message::Answer),
        sent: start.sent,
        strip_usage: start.strip_usage,
        transform: start.transform,
        usage: None,
        usage_body: None,
        head: None,
        denied: None,
        timings: Timings::default(),
        relayed: 0,
    };
    // The head goes out with the first data event; the events after it in
    // the same read are transformed by the relay task, so the client's
    // first event does not wait for them.
    let pending = first.split_off(head_events(&first));
    let Some((mut events, first_bytes)) = process(events, first).await else {
        return Err(UpstreamError::Io(String::from("the response_transform call was lost")));
    };
    let mut status = parts.status;
    if let Some((code, changes)) = events.head.take() {
        if let Some(s) = code.and_then(|c| StatusCode::from_u16(c).ok()) {
            status = s;
        }
        headers::apply(&mut out_headers, &changes, &ex.info.id);
    }
    out_headers.insert(
        "x-llmproxy-backend",
        HeaderValue::from_str(&b.name).unwrap_or(HeaderValue::from_static("-")),
    );
    if let Ok(v) = HeaderValue::from_str(&ex.info.id) {
        out_headers.insert(request_id::HEADER, v);
    }

    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    if !first_bytes.is_empty() {
        let _ = tx.try_send(first_bytes);
    }
    let log = StreamLog {
        shared: Arc::clone(&ex.shared),
        info: Arc::clone(&ex.info),
        method: ex.method.clone(),
        started: ex.started,
        retries: ex.retries,
        timings: ex.timings,
        status: status.as_u16(),
        // From here on the stream owns the request's slot and usage record.
        ticket: ex.ticket.take(),
    };
    ex.shared.metrics.streams(1);
    let rest = Rest {
        body,
        parser,
        pending,
        ended,
    };
    tokio::spawn(relay(rest, events, tx, start, log));
    let mut resp = Response::new(GatewayBody::Channel(rx));
    *resp.status_mut() = status;
    *resp.headers_mut() = out_headers;
    Ok(resp)
}

/// What the relay needs to log and count the request at its end.
struct StreamLog {
    shared: Arc<Shared>,
    info: Arc<RequestInfo>,
    method: hyper::Method,
    started: Instant,
    retries: u32,
    timings: Timings,
    status: u16,
    ticket: Option<Ticket>,
}

/// How many of the first read's events go out with the head: up to and
/// including the first data event (whose transform may change the head),
/// or all of them when none carries data.
fn head_events(first: &[Bytes]) -> usize {
    first
        .iter()
        .position(|ev| sse::data(ev).is_some())
        .map_or(first.len(), |i| i + 1)
}

/// The backend's side of a stream once its head is sent.
struct Rest {
    body: Incoming,
    parser: SseParser,
    /// Events of the first read not relayed yet.
    pending: Vec<Bytes>,
    /// The body has already ended.
    ended: bool,
}

/// Relay the rest of a stream: the first read's pending events, then the
/// backend's body until it ends.
async fn relay(rest: Rest, mut events: Events, tx: mpsc::Sender<Bytes>, start: StreamStart, mut log: StreamLog) {
    let Rest {
        mut body,
        mut parser,
        pending,
        ended,
    } = rest;
    let b = Arc::clone(&start.backend);
    let mut upstream_error: Option<UpstreamError> = None;
    let mut client_gone = false;
    if !pending.is_empty() && events.denied.is_none() {
        let Some((ev, gone)) = forward(events, pending, &tx).await else {
            return finish_lost(log, &b);
        };
        events = ev;
        client_gone = gone;
    }
    if !(ended || client_gone || events.denied.is_some()) {
        loop {
            let chunk = tokio::select! {
                _ = tx.closed() => { client_gone = true; break; }
                r = upstream::next_chunk(&mut body, b.timeouts.idle, None) => r,
            };
            let batch = match chunk {
                Ok(Some(c)) => {
                    let batch = frames(parser.push(&c));
                    if parser.overflowed() {
                        // Relay what completed, then end the stream.
                        log.shared
                            .metrics
                            .bounds
                            .events_too_large
                            .fetch_add(1, Ordering::Relaxed);
                        upstream_error = Some(UpstreamError::EventTooLarge);
                    }
                    batch
                }
                Ok(None) => {
                    let rest: Vec<Bytes> = std::mem::take(&mut parser)
                        .finish()
                        .into_iter()
                        .map(Bytes::from)
                        .collect();
                    if !rest.is_empty() {
                        let Some((ev, _)) = forward(events, rest, &tx).await else {
                            return finish_lost(log, &b);
                        };
                        events = ev;
                    }
                    break;
                }
                Err(e) => {
                    upstream_error = Some(e);
                    break;
                }
            };
            if !batch.is_empty() {
                let Some((ev, gone)) = forward(events, batch, &tx).await else {
                    return finish_lost(log, &b);
                };
                events = ev;
                if gone {
                    client_gone = true;
                    break;
                }
            }
            if events.denied.is_some() || upstream_error.is_some() {
                break;
            }
        }
    }
    if let Some(e) = &upstream_error {
        b.health.failure();
        let code = match e {
            UpstreamError::EventTooLarge => "event_too_large",
            _ => "stream_interrupted",
        };
        let body = error_body(&e.message(), "backend_error", code);
        let _ = tx.send(Bytes::from(sse::data_event(&body))).await;
    }
    // Stop reading the backend now: dropping the body closes the upstream
    // connection (the client left, or the stream is over).
    drop(body);
    drop(tx);
    drop(start.inflight);
    let total = start.sent.elapsed();
    log.shared.metrics.streams(-1);
    log.shared.metrics.request(Some(b.index), log.status);
    let mut timings = log.timings;
    timings.merge(events.timings);
    tracing::info!(
        target: "llmproxy::access",
        request_id = %log.info.id,
        method = %log.method,
        path = log.info.path.as_deref().unwrap_or("/"),
        backend = %b.name,
        status = log.status,
        stream = true,
        retries = log.retries,
        latency_ms = log.started.elapsed().as_secs_f64() * 1e3,
        upstream_ms = total.as_secs_f64() * 1e3,
        client_gone,
        upstream_error = upstream_error.as_ref().map(UpstreamError::message),
        routing_us = timings.get(HookName::Routing),
        request_transform_us = timings.get(HookName::RequestTransform),
        response_transform_us = timings.get(HookName::ResponseTransform),
        "request"
    );
    if let Some(ticket) = log.ticket.take() {
        // The backend's usage; without its chunk (the client left first,
        // or the backend never sent one), an estimate of what was relayed.
        let usage = llmproxy_core::usage_estimate::stream_usage(
            events.usage.take(),
            start.transform,
            &log.info.body,
            events.relayed,
        );
        let response = ResponseInfo {
            status_code: events.status,
            body: events.usage_body.take().unwrap_or_default().into(),
            headers: Vec::new(),
            is_stream: true,
        };
        ticket.complete(Completion {
            backend: Some(Arc::clone(&b)),
            // A client that left mid-stream is recorded as 499, with the
            // usage captured so far (usually none: it comes last).
            status: if client_gone { 499 } else { log.status },
            usage,
            response: Some(response),
            latency_ms: total.as_secs_f64() * 1e3,
            is_stream: true,
        });
    }
}

/// Transform `batch` and send what comes out of it to the client: the
/// events' state and whether the client has left, or `None` when the hook
/// call was lost.
async fn forward(events: Events, batch: Vec<Bytes>, tx: &mpsc::Sender<Bytes>) -> Option<(Events, bool)> {
    let (events, out) = process(events, batch).await?;
    let gone = !out.is_empty() && tx.send(out).await.is_err();
    Some((events, gone))
}

fn finish_lost(log: StreamLog, b: &Backend) {
    log.shared.metrics.streams(-1);
    log.shared.metrics.request(Some(b.index), log.status);
    tracing::warn!(target: "llmproxy::access", request_id = %log.info.id, "stream stopped: a hook call was lost");
}
