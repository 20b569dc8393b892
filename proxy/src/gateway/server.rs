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
use super::exchange::{self, Endpoint};
use super::{request_id, Shared};

/// Accept connections until `stop` fires, then wait for open connections
/// to finish their requests.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let graceful = GracefulShutdown::new();
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
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                let service = service_fn(move |req| {
                    let shared = Arc::clone(&shared);
                    async move { Ok::<_, Infallible>(handle(shared, req, peer).await) }
                });
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = conn.await;
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
        (&Method::POST, "/v1/chat/completions") => Endpoint::ChatCompletions,
        (&Method::POST, "/v1/completions") => Endpoint::Completions,
        (&Method::POST, "/v1/embeddings") => Endpoint::Embeddings,
        (_, p) if p.starts_with("/v1/") => Endpoint::Passthrough,
        _ => Endpoint::NotFound,
    };
    exchange::proxy(shared, req, peer, endpoint).await
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
