//! Accepting connections (HTTP/1.1, keep-alive) and dispatching endpoints.
//!
//! A gateway has a public listener (the API, `/healthz`, `/v1/models`) and,
//! when `admin.listen` is set, an admin listener (`/admin/reload`,
//! `/metrics`, `/healthz`); the public listener serves the admin endpoints
//! only with `admin.on_public_listener: true` (docs/adr/038).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use llmproxy_core::http::api::Api;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::body::GatewayBody;
use super::conn::{ConnectionCap, WriteTimeout};
use super::exchange::{self, Endpoint};
use super::{request_id, Shared};

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The API; with `admin: true`, `/admin/*` and `/metrics` as well.
    Public {
        /// Whether the admin endpoints are served here too.
        admin: bool,
    },
    /// `/admin/*`, `/metrics` and `/healthz` only.
    Admin,
}

/// Accept connections until `stop` fires, then wait for open connections
/// to finish their requests. The public listener's connections are served
/// on the connection workers ([`super::workers`]), the admin listener's on
/// this runtime.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, role: Role, mut stop: oneshot::Receiver<()>) {
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
                let connection = {
                    let shared = Arc::clone(&shared);
                    let watcher = graceful.watcher();
                    let builder = builder.clone();
                    move |stream: TcpStream| async move {
                        let _ = stream.set_nodelay(true);
                        let peer = Peer {
                            addr: peer,
                            ip: Arc::from(peer.ip().to_string()),
                        };
                        let metrics = Arc::clone(&shared.metrics);
                        let io = TokioIo::new(WriteTimeout::new(stream, write_timeout, metrics));
                        let service = service_fn(move |req| {
                            let shared = Arc::clone(&shared);
                            let peer = peer.clone();
                            async move { Ok::<_, Infallible>(handle(shared, req, peer, role).await) }
                        });
                        let _ = watcher.watch(builder.serve_connection(io, service)).await;
                        drop(admitted);
                    }
                };
                if role == Role::Admin {
                    tokio::spawn(connection(stream));
                    continue;
                }
                // The socket moves to the worker's own reactor.
                match stream.into_std() {
                    Ok(std) => shared.workers.spawn(async move {
                        match TcpStream::from_std(std) {
                            Ok(stream) => connection(stream).await,
                            Err(e) => tracing::warn!(target: "llmproxy::gateway", "cannot hand a connection to a worker: {e}"),
                        }
                    }),
                    Err(e) => tracing::warn!(target: "llmproxy::gateway", "cannot hand a connection to a worker: {e}"),
                }
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection's client: its address, and its IP as text (formatted once
/// per connection, not for each of its requests).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// `addr`'s IP, as scripts and logs see it.
    pub ip: Arc<str>,
}

/// Dispatch one request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
    peer: Peer,
    role: Role,
) -> Response<GatewayBody> {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let lines = req.headers().iter().map(|(n, v)| (n.as_str().len(), v.len()));
    let names = req.headers().iter().map(|(n, _)| n.as_str());
    let http11 = req.version() == hyper::Version::HTTP_11;
    let head = llmproxy_core::http::head::check(target, lines)
        .and_then(|()| llmproxy_core::http::head::lines(http11, names))
        .and_then(|()| llmproxy_core::http::head::method(req.method().as_str()));
    if let Err(e) = head {
        let shown = llmproxy_core::http::head::shown_path(req.uri().path()).to_owned();
        return exchange::proxy(shared, req, &peer.ip, Endpoint::BadHead(e), shown).await;
    }
    // Endpoints match on the canonical path, and it is what goes upstream.
    let path = match llmproxy_core::http::path::canonical(req.uri().path()) {
        Ok(p) => p,
        Err(e) => {
            let raw = req.uri().path().to_owned();
            return exchange::proxy(shared, req, &peer.ip, Endpoint::BadPath(e), raw).await;
        }
    };
    if let Some(resp) = handle_admin(&shared, &req, &path, role, peer.addr).await {
        return resp;
    }
    if role == Role::Admin {
        let body = super::errors::error_body(
            &format!("{} {path} is not an endpoint of the admin listener", req.method()),
            "bad_request",
            "not_found",
        );
        return local(&req, StatusCode::NOT_FOUND, "application/json", body);
    }
    let api = Api::of_request(req.method().as_str(), &path);
    let endpoint = match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => {
            return local(
                &req,
                StatusCode::OK,
                "application/json",
                llmproxy_core::models::HEALTHZ_BODY.into(),
            )
        }
        (&Method::GET, "/v1/models") => {
            let body = shared.models_body.clone();
            return local(&req, StatusCode::OK, "application/json", body);
        }
        _ if let Some(api) = api => Endpoint::Api(api),
        (_, p) if p.starts_with("/v1/") => Endpoint::Passthrough,
        _ => Endpoint::NotFound,
    };
    if let Some(wait) = shared.throttles.api.check(peer.addr.ip(), Instant::now()) {
        return throttled(&req, wait, "API key");
    }
    exchange::proxy(shared, req, &peer.ip, endpoint, path).await
}

/// The admin endpoints, on the listeners that serve them; `None` for
/// every other request.
async fn handle_admin<B>(
    shared: &Arc<Shared>,
    req: &Request<B>,
    path: &str,
    role: Role,
    peer: SocketAddr,
) -> Option<Response<GatewayBody>> {
    if role == (Role::Public { admin: false }) {
        return None;
    }
    match (req.method(), path) {
        (&Method::GET, "/healthz") => Some(local(
            req,
            StatusCode::OK,
            "application/json",
            llmproxy_core::models::HEALTHZ_BODY.into(),
        )),
        (&Method::GET, "/metrics") => {
            let text = shared.render_metrics();
            Some(local(req, StatusCode::OK, "text/plain; version=0.0.4", text.into()))
        }
        (&Method::POST, "/admin/reload") => Some(admin_reload(shared, req, peer).await),
        _ => None,
    }
}

/// `POST /admin/reload`: `Authorization: Bearer <admin.token>`; 404 when
/// no token is configured, 401 on a wrong token, 200 when the new config
/// serves, 422 with the problems when it was rejected.
async fn admin_reload<B>(shared: &Arc<Shared>, req: &Request<B>, peer: SocketAddr) -> Response<GatewayBody> {
    let json = "application/json";
    let live = shared.live();
    let Some(token) = live.admin_token() else {
        let body = super::errors::error_body("the admin endpoint is off (no admin.token)", "bad_request", "not_found");
        return local(req, StatusCode::NOT_FOUND, json, body);
    };
    if let Some(wait) = shared.throttles.admin.check(peer.ip(), Instant::now()) {
        return throttled(req, wait, "admin token");
    }
    let given = super::headers::bearer(req.headers()).unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        shared.throttles.admin.failed(peer.ip(), Instant::now());
        tracing::warn!(target: "llmproxy::gateway", client_ip = %peer.ip(), "refused: invalid admin token");
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

/// 429 for a client that failed too many `what` checks (docs/adr/039):
/// answered before its credentials are looked at.
fn throttled<B>(req: &Request<B>, wait: u64, what: &str) -> Response<GatewayBody> {
    tracing::warn!(
        target: "llmproxy::gateway",
        path = req.uri().path(),
        retry_after = wait,
        "refused: too many failed {what} checks from this address"
    );
    let e = llmproxy_core::policy::errors::GatewayError::auth_throttled(what, wait);
    let body = super::errors::error_body(&e.message, e.kind.as_str(), e.code);
    let mut resp = local(req, StatusCode::TOO_MANY_REQUESTS, "application/json", body);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
    resp
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
