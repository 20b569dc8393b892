//! Accepting connections (HTTP/1.1, keep-alive) and dispatching endpoints.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::body::GatewayBody;
use super::conn::{ConnectionCap, WriteTimeout};
use super::exchange::{self, Endpoint};
use super::{request_id, Shared};

/// Accept connections until `stop` fires, then wait for open connections
/// to finish their requests.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let graceful = GracefulShutdown::new();
    let cap = ConnectionCap::new(shared.config.max_connections, Arc::clone(&shared.metrics));
    let write_timeout = Duration::from_millis(shared.config.write_timeout_ms);
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(target: "llmproxy::gateway", "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some((stream, admitted)) = cap.admit(stream) else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let io = TokioIo::new(WriteTimeout::new(stream, write_timeout, Arc::clone(&shared.metrics)));
                let shared = Arc::clone(&shared);
                let service = service_fn(move |req| {
                    let shared = Arc::clone(&shared);
                    async move { Ok::<_, Infallible>(handle(shared, req, peer).await) }
                });
                let conn = graceful.watch(builder.serve_connection(io, service));
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(admitted);
                });
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Dispatch one request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Response<GatewayBody> {
    let path = req.uri().path();
    let endpoint = match (req.method(), path) {
        (&Method::GET, "/healthz") => {
            return local(&req, StatusCode::OK, "application/json", r#"{"status":"ok"}"#.into())
        }
        (&Method::GET, "/metrics") => {
            let text = shared.render_metrics();
            return local(&req, StatusCode::OK, "text/plain; version=0.0.4", text.into());
        }
        (&Method::GET, "/v1/models") => {
            let body = shared.models_body.clone();
            return local(&req, StatusCode::OK, "application/json", body);
        }
        (&Method::POST, "/admin/reload") => return admin_reload(&shared, &req).await,
        (&Method::POST, "/v1/chat/completions") => Endpoint::ChatCompletions,
        (&Method::POST, "/v1/completions") => Endpoint::Completions,
        (&Method::POST, "/v1/embeddings") => Endpoint::Embeddings,
        (_, p) if p.starts_with("/v1/") => Endpoint::Passthrough,
        _ => Endpoint::NotFound,
    };
    exchange::proxy(shared, req, peer, endpoint).await
}

/// `POST /admin/reload`: `Authorization: Bearer <admin.token>`; 404 when
/// no token is configured, 401 on a wrong token, 200 when the new config
/// serves, 422 with the problems when it was rejected.
async fn admin_reload<B>(shared: &Arc<Shared>, req: &Request<B>) -> Response<GatewayBody> {
    let json = "application/json";
    let live = shared.live();
    let Some(token) = live.admin_token() else {
        let body = super::errors::error_body("the admin endpoint is off (no admin.token)", "bad_request", "not_found");
        return local(req, StatusCode::NOT_FOUND, json, body);
    };
    let given = super::headers::bearer(req.headers()).unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        let body = super::errors::error_body("invalid admin token", "auth_error", "invalid_admin_token");
        return local(req, StatusCode::UNAUTHORIZED, json, body);
    }
    drop(live);
    match shared.reload(super::reload::Trigger::Admin).await {
        super::reload::Outcome::Applied {
            generation,
            needs_restart,
        } => {
            let body =
                serde_json::json!({"status": "reloaded", "generation": generation, "needs_restart": needs_restart});
            local(req, StatusCode::OK, json, body.to_string().into())
        }
        super::reload::Outcome::Rejected { problems } => {
            let body =
                serde_json::json!({"status": "rejected", "generation": shared.live().generation, "problems": problems});
            local(req, StatusCode::UNPROCESSABLE_ENTITY, json, body.to_string().into())
        }
    }
}

/// Compare secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn local<B>(
    req: &Request<B>,
    status: StatusCode,
    content_type: &'static str,
    body: bytes::Bytes,
) -> Response<GatewayBody> {
    let rid = request_id::accept_or_generate(req.headers().get(request_id::HEADER).map(HeaderValue::as_bytes));
    let mut resp = Response::new(GatewayBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&rid) {
        h.insert(request_id::HEADER, v);
    }
    resp
}
