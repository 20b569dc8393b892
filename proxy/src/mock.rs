//! `llmproxy mock-backend`: an OpenAI-compatible fake backend for the demo,
//! the tests and the benchmarks.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (with
//! and without `stream`, `usage`, `stream_options.include_usage`),
//! `POST /v1/embeddings` (float or base64), `GET /v1/models`,
//! `GET /healthz`. Tests steer single requests with headers:
//! `x-mock-status: N` answers N with an OpenAI-style error,
//! `x-mock-delay-ms`, `x-mock-chunks` and `x-mock-chunk-delay-ms` override
//! the options. Hostile streams (for the relay's bounds): `x-mock-sse:
//! forever` sends content events until the reader leaves, `endless` one
//! event and then an event that never ends (64 KiB of data at a time, no
//! blank line), `trickle` one byte of an event every `x-mock-chunk-delay-ms`
//! (never finishing it); and `burst` sends a whole stream in one write, as a
//! backend that answers from a buffer does. [`MockServer::open_streams`]
//! counts the streams still being written. Every `x-*` request header is
//! echoed back as `x-echo-<name>` so tests can see what reached the
//! backend, and `x-mock-path` gives the path and query the backend was
//! asked for. `x-mock-connection: V` makes the answer carry
//! `Connection: V` (for tests of headers a `Connection` header names), and
//! each `x-mock-set-cookie: V` a `Set-Cookie: V` line of its own (for tests
//! of a header the backend sends more than once); `x-mock-content-type: V`
//! labels the answer `Content-Type: V` whatever it holds (a backend that
//! mislabels its JSON).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::gateway::body::GatewayBody;

/// How the mock behaves.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Name reported in `x-mock-backend` and in the answers.
    pub name: String,
    /// Delay before the response head (and before the first event).
    pub latency_ms: u64,
    /// Content chunks of a completion (and events of a stream).
    pub chunks: usize,
    /// Delay between two stream events.
    pub chunk_delay_ms: u64,
    /// Fraction of requests (0..=1) answered with a 500.
    pub fail_rate: f64,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            name: String::from("mock"),
            latency_ms: 0,
            chunks: 8,
            chunk_delay_ms: 0,
            fail_rate: 0.0,
        }
    }
}

/// A running mock backend.
#[derive(Debug)]
pub struct MockServer {
    addr: SocketAddr,
    streams: Arc<AtomicI64>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl MockServer {
    /// Listen on `listen` (port 0 picks a free port) and serve.
    pub async fn start(listen: SocketAddr, options: MockOptions) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = oneshot::channel::<()>();
        let streams = Arc::new(AtomicI64::new(0));
        let state = Arc::new(State {
            streams: Arc::clone(&streams),
            options,
            counter: AtomicU64::new(0),
            rng: AtomicU64::new(0x853c_49e6_748f_ea9b ^ u64::from(addr.port())),
        });
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let state = Arc::clone(&state);
                        tokio::spawn(async move {
                            let service = service_fn(move |req| {
                                let state = Arc::clone(&state);
                                async move { Ok::<_, Infallible>(handle(state, req).await) }
                            });
                            let _ = http1::Builder::new()
                                .keep_alive(true)
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    _ = &mut stopped => break,
                }
            }
        });
        Ok(MockServer {
            addr,
            streams,
            stop: Some(stop),
            task,
        })
    }

    /// Streams being written now (a stream ends when its reader leaves).
    pub fn open_streams(&self) -> i64 {
        self.streams.load(Ordering::Relaxed)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting connections (open connections finish on their own).
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Serve until the task ends (it does not end on its own).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct State {
    streams: Arc<AtomicI64>,
    options: MockOptions,
    counter: AtomicU64,
    rng: AtomicU64,
}

impl State {
    fn random(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Per-request settings (options overridden by `x-mock-*` headers).
struct Knobs {
    latency: Duration,
    chunks: usize,
    chunk_delay: Duration,
    hostile: Option<Hostile>,
    /// Every event of a stream in one body frame (`x-mock-sse: burst`).
    burst: bool,
}

/// A hostile stream (`x-mock-sse`).
#[derive(Debug, Clone, Copy)]
enum Hostile {
    Forever,
    Endless,
    Trickle,
}

/// Counts a stream as open while it lives.
struct OpenStream(Arc<AtomicI64>);

impl OpenStream {
    fn new(c: &Arc<AtomicI64>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        OpenStream(Arc::clone(c))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

async fn handle(state: Arc<State>, req: Request<hyper::body::Incoming>) -> Response<GatewayBody> {
    let o = &state.options;
    let h = req.headers().clone();
    let sse = h.get("x-mock-sse").map(HeaderValue::as_bytes);
    let knobs = Knobs {
        latency: Duration::from_millis(header_u64(&h, "x-mock-delay-ms").unwrap_or(o.latency_ms)),
        chunks: header_u64(&h, "x-mock-chunks").map_or(o.chunks, |n| n as usize).max(1),
        chunk_delay: Duration::from_millis(header_u64(&h, "x-mock-chunk-delay-ms").unwrap_or(o.chunk_delay_ms)),
        hostile: match sse {
            Some(b"forever") => Some(Hostile::Forever),
            Some(b"endless") => Some(Hostile::Endless),
            Some(b"trickle") => Some(Hostile::Trickle),
            _ => None,
        },
        burst: sse == Some(b"burst"),
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let path_and_query = req.uri().path_and_query().map(|p| p.as_str().to_owned());
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(400, "cannot read body"),
    };
    let mut resp = route(&state, &method, &path, &h, &body, &knobs).await;
    let rh = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&o.name) {
        rh.insert("x-mock-backend", v);
    }
    if let Some(v) = path_and_query.and_then(|p| HeaderValue::from_str(&p).ok()) {
        rh.insert("x-mock-path", v);
    }
    if let Some(v) = h.get("x-mock-connection") {
        rh.insert(header::CONNECTION, v.clone());
    }
    if let Some(v) = h.get("x-mock-content-type") {
        rh.insert(header::CONTENT_TYPE, v.clone());
    }
    for v in h.get_all("x-mock-set-cookie") {
        rh.append(header::SET_COOKIE, v.clone());
    }
    for (name, value) in &h {
        if name.as_str().starts_with("x-") && !name.as_str().starts_with("x-mock-") {
            if let Ok(n) = HeaderName::from_bytes(format!("x-echo-{}", name.as_str()).as_bytes()) {
                rh.insert(n, value.clone());
            }
        }
    }
    resp
}

async fn route(
    state: &State,
    method: &Method,
    path: &str,
    h: &HeaderMap,
    body: &Bytes,
    knobs: &Knobs,
) -> Response<GatewayBody> {
    if let Some(status) = header_u64(h, "x-mock-status") {
        tokio::time::sleep(knobs.latency).await;
        let status = u16::try_from(status).unwrap_or(500);
        return error(status, &format!("mock error {status}"));
    }
    match (method, path) {
        (&Method::GET, "/healthz") => json_response(200, &json!({"status": "ok"})),
        (&Method::GET, "/v1/models") => json_response(
            200,
            &json!({"object": "list", "data": [
                {"id": "mock-model", "object": "model", "created": 0, "owned_by": state.options.name},
            ]}),
        ),
        (&Method::POST, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings") => {
            if state.options.fail_rate > 0.0 && state.random() < state.options.fail_rate {
                tokio::time::sleep(knobs.latency).await;
                return error(500, "mock backend failure (fail-rate)");
            }
            let req: Value = match serde_json::from_slice(body) {
                Ok(v @ Value::Object(_)) => v,
                _ => return error(400, "the body must be a JSON object"),
            };
            if path == "/v1/embeddings" {
                tokio::time::sleep(knobs.latency).await;
                return embeddings(&req);
            }
            completion(state, path == "/v1/chat/completions", &req, knobs).await
        }
        _ => error(404, &format!("no route for {method} {path}")),
    }
}

const WORDS: [&str; 8] = ["Hello", " from", " the", " mock", " backend", ",", " friend", "."];

fn prompt_tokens(req: &Value) -> u64 {
    let count = |s: &str| s.split_whitespace().count() as u64;
    let from_messages = req.get("messages").and_then(Value::as_array).map(|ms| {
        ms.iter()
            .filter_map(|m| m.get("content").and_then(Value::as_str))
            .map(count)
            .sum::<u64>()
    });
    let from_prompt = req.get("prompt").and_then(Value::as_str).map(count);
    from_messages.or(from_prompt).unwrap_or(0).max(1)
}

async fn completion(state: &State, chat: bool, req: &Value, k: &Knobs) -> Response<GatewayBody> {
    let n = state.counter.fetch_add(1, Ordering::Relaxed);
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let id = if chat {
        format!("chatcmpl-mock-{n}")
    } else {
        format!("cmpl-mock-{n}")
    };
    let prompt = prompt_tokens(req);
    let completion_tokens = k.chunks as u64;
    let usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    });
    let words: Vec<&str> = (0..k.chunks).map(|i| WORDS[i % WORDS.len()]).collect();
    let stream = req.get("stream") == Some(&Value::Bool(true));
    if !stream {
        tokio::time::sleep(k.latency).await;
        let text: String = words.concat();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": "stop"})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"})
        };
        let object = if chat { "chat.completion" } else { "text_completion" };
        return json_response(
            200,
            &json!({"id": id, "object": object, "created": created, "model": model,
                    "choices": [choice], "usage": usage}),
        );
    }
    let include_usage = req.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let event = |choice: Value| -> Bytes {
        let mut v = json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
        if include_usage {
            v["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {v}\n\n"))
    };
    let mut events: Vec<Bytes> = Vec::with_capacity(k.chunks + 3);
    for (i, w) in words.iter().enumerate() {
        let choice = if chat {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": w})
            } else {
                json!({"content": w})
            };
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null})
        } else {
            json!({"index": 0, "text": w, "logprobs": null, "finish_reason": null})
        };
        events.push(event(choice));
    }
    let last = if chat {
        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"})
    } else {
        json!({"index": 0, "text": "", "logprobs": null, "finish_reason": "stop"})
    };
    events.push(event(last));
    if include_usage {
        let v = json!({"id": id, "object": object, "created": created, "model": model,
                       "choices": [], "usage": usage});
        events.push(Bytes::from(format!("data: {v}\n\n")));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    if k.burst {
        events = vec![Bytes::from(events.concat())];
    }

    tokio::time::sleep(k.latency).await;
    let (tx, rx) = mpsc::channel(4);
    let delay = k.chunk_delay;
    let open = OpenStream::new(&state.streams);
    if let Some(hostile) = k.hostile {
        let first = events.first().cloned().unwrap_or_default();
        tokio::spawn(hostile_stream(hostile, first, delay, tx, open));
        return event_stream(rx);
    }
    tokio::spawn(async move {
        let _open = open;
        for (i, ev) in events.into_iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    event_stream(rx)
}

fn event_stream(rx: mpsc::Receiver<Bytes>) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::Channel(rx));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Write a hostile stream until the reader leaves.
async fn hostile_stream(kind: Hostile, first: Bytes, delay: Duration, tx: mpsc::Sender<Bytes>, _open: OpenStream) {
    let pause = || async {
        if delay.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(delay).await;
        }
    };
    match kind {
        Hostile::Forever => loop {
            if tx.send(first.clone()).await.is_err() {
                return;
            }
            pause().await;
        },
        Hostile::Endless => {
            if tx.send(first).await.is_err() {
                return;
            }
            pause().await;
            if tx.send(Bytes::from_static(b"data: ")).await.is_err() {
                return;
            }
            let filler = Bytes::from(vec![b'x'; 64 << 10]);
            while tx.send(filler.clone()).await.is_ok() {
                pause().await;
            }
        }
        Hostile::Trickle => {
            for b in first.iter().take(first.len().saturating_sub(2)).cycle() {
                if tx.send(Bytes::copy_from_slice(&[*b])).await.is_err() {
                    return;
                }
                pause().await;
            }
        }
    }
}

fn embeddings(req: &Value) -> Response<GatewayBody> {
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect(),
        _ => return error(400, "'input' is required"),
    };
    let base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock-embedding");
    let mut tokens = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            tokens += text.split_whitespace().count().max(1) as u64;
            let v = vector(text);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json_response(
        200,
        &json!({"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

/// A deterministic unit-ish vector of 8 dimensions for a text.
fn vector(text: &str) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..8)
        .map(|i| {
            let x = h.rotate_left(i * 8) & 0xffff;
            (x as f32 / 65535.0) * 2.0 - 1.0
        })
        .collect()
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

fn json_response(status: u16, v: &Value) -> Response<GatewayBody> {
    let mut r = Response::new(GatewayBody::full(v.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: u16, message: &str) -> Response<GatewayBody> {
    let kind = match status {
        401 | 403 => "authentication_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "code": status.to_string()}}),
    )
}

#[cfg(test)]
mod tests {
    use super::base64_encode;

    #[test]
    fn base64() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }
}
