//! A configured backend: where it is, how to talk to it, and its health.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llmproxy_core::config::{BackendConfig, GatewayConfig};
use llmproxy_core::hooks::BackendStatus;

use super::balancer::Balancer;
use super::health::Health;

/// The pooled HTTP/1.1 client of one backend.
pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// Upstream timeouts of one backend.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connect timeout.
    pub connect: Duration,
    /// Request sent -> response head (and first event of a stream).
    pub first_byte: Duration,
    /// Longest gap between two body chunks.
    pub idle: Duration,
}

/// One backend.
#[derive(Debug)]
pub struct Backend {
    /// Position in the config's backend list.
    pub index: usize,
    /// Name from the config (what routing scripts return).
    pub name: String,
    /// Base URL from the config, without a trailing `/`.
    pub url: String,
    /// Balancer weight.
    pub weight: u32,
    /// The `Host` header of a request to this backend, which the HTTP
    /// client would otherwise format anew for every request.
    pub host: HeaderValue,
    /// Headers added to every upstream request (e.g. an upstream API key).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Pooled keep-alive clients: one per connection worker (its upstream
    /// connections stay on its thread), then one for every other thread
    /// (health probes). See [`Backend::client`].
    clients: Box<[UpstreamClient]>,
    /// Live health state.
    pub health: Arc<Health>,
}

impl Backend {
    /// Build from the config, with upstream pools for `workers` connection
    /// workers and its health kept by `balancer`; errors name the config
    /// key.
    pub fn from_config(
        index: usize,
        cfg: &BackendConfig,
        gateway: &GatewayConfig,
        workers: usize,
        balancer: &Arc<Balancer>,
    ) -> Result<Backend, String> {
        let key = format!("backends[{index}]");
        if cfg.url.starts_with("https://") {
            return Err(format!(
                "{key}.url: https backends are not supported by the standalone gateway yet"
            ));
        }
        let url = cfg.url.trim_end_matches('/').to_owned();
        let parsed = url
            .parse::<Uri>()
            .map_err(|e| format!("{key}.url: '{}' is not a valid URL: {e}", cfg.url))?;
        let host = host_header(&parsed).ok_or_else(|| format!("{key}.url: '{}' has no host", cfg.url))?;
        let mut headers = Vec::with_capacity(cfg.headers.len());
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("{key}.headers: '{k}' is not a valid header name"))?;
            let value = HeaderValue::from_str(v).map_err(|_| format!("{key}.headers.{k}: not a valid header value"))?;
            headers.push((name, value));
        }
        let t = &gateway.timeouts;
        let o = &cfg.timeouts;
        let ms = Duration::from_millis;
        let timeouts = Timeouts {
            connect: ms(o.connect_ms.unwrap_or(t.connect_ms)),
            first_byte: ms(o.first_byte_ms.unwrap_or(t.first_byte_ms)),
            idle: ms(o.idle_ms.unwrap_or(t.idle_ms)),
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeouts.connect));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let clients = (0..=workers)
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .pool_max_idle_per_host(4096)
                    .build(connector.clone())
            })
            .collect();
        Ok(Backend {
            index,
            name: cfg.name.clone(),
            url,
            weight: cfg.weight,
            host,
            headers,
            timeouts,
            clients,
            health: Arc::new(Health::new(Arc::clone(balancer), index, &cfg.name)),
        })
    }

    /// The upstream client for this thread: the worker's own pool on a
    /// connection worker, the shared one elsewhere.
    pub fn client(&self) -> &UpstreamClient {
        let last = self.clients.len() - 1;
        let i = super::workers::current().map_or(last, |w| w.min(last));
        &self.clients[i]
    }

    /// The upstream URI for a client's path and query.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, String> {
        format!("{}{path_and_query}", self.url)
            .parse()
            .map_err(|e| format!("bad upstream URI: {e}"))
    }

    /// What routing scripts see of this backend.
    pub fn status(&self) -> BackendStatus {
        let v = self.health.view();
        BackendStatus {
            name: self.name.clone(),
            url: self.url.clone(),
            healthy: v.healthy,
            weight: self.weight,
            latency_ms: v.latency_ms,
            active_connections: v.active,
        }
    }

    /// One active health probe: `GET path` answered 2xx within `timeout`.
    pub async fn probe(&self, path: &str, timeout: Duration) -> bool {
        let Ok(uri) = self.uri(path) else {
            return false;
        };
        let mut req = hyper::Request::get(uri);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let Ok(req) = req.body(Full::new(Bytes::new())) else {
            return false;
        };
        let fut = async {
            let resp = self.client().request(req).await.ok()?;
            let ok = resp.status().is_success();
            // Drain so the connection goes back to the pool.
            let _ = resp.into_body().collect().await;
            Some(ok)
        };
        matches!(tokio::time::timeout(timeout, fut).await, Ok(Some(true)))
    }
}

/// An empty request body, for probes and passthrough GETs.
pub fn empty_body() -> Empty<Bytes> {
    Empty::new()
}

/// The `Host` header for requests to `uri`: its host, and its port unless
/// it is the scheme's default (as the HTTP client writes it).
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let text = match uri.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_is_what_the_client_would_write() {
        let cases = [
            ("http://127.0.0.1:19001", "127.0.0.1:19001"),
            ("http://example.com", "example.com"),
            ("http://example.com:80/v1", "example.com"),
            ("http://[::1]:8080/prefix", "[::1]:8080"),
            ("https://api.example.com:443", "api.example.com"),
            ("https://api.example.com:8443", "api.example.com:8443"),
        ];
        for (url, want) in cases {
            let uri: Uri = url.parse().expect("a URI");
            assert_eq!(host_header(&uri), Some(HeaderValue::from_static(want)), "{url}");
        }
    }
}
