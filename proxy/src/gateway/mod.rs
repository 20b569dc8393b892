//! The standalone gateway.
//!
//! - [`server`]: accepting connections and dispatching endpoints.
//! - [`exchange`]: one proxied request, attempts and retries included.
//! - [`relay`]: SSE streams, relayed event by event.
//! - [`pipeline`]: the hook stages, one function each.
//! - [`hook_pool`]: the threads hook calls run on.
//! - [`backend`], [`balancer`], [`health`], [`upstream`]: backends.
//! - [`sse`], [`headers`], [`body`], [`errors`], [`metrics`],
//!   [`request_id`]: helpers with one job each.

pub mod backend;
pub mod balancer;
pub mod body;
pub mod errors;
pub mod exchange;
pub mod headers;
pub mod health;
pub mod hook_pool;
pub mod metrics;
pub mod pipeline;
pub mod relay;
pub mod request_id;
pub mod server;
pub mod sse;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use llmproxy_core::config::GatewayConfig;
use llmproxy_core::{Config, Engine};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use backend::Backend;
use balancer::Balancer;
use hook_pool::HookPool;
use metrics::Metrics;
use pipeline::Stages;

/// One usage record, after the `usage` hook.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEntry {
    /// The request id.
    pub request_id: String,
    /// The backend that answered.
    pub backend: String,
    /// Its URL.
    pub backend_url: String,
    /// The request path.
    pub path: String,
    /// Whether the response was streamed.
    pub is_stream: bool,
    /// Usage as the backend reported it.
    pub raw: Value,
    /// The record to store: the script's table, or `raw` when the hook is
    /// off, returned nil or failed.
    pub record: Value,
}

/// Where usage records go. The next issue's usage ledger implements this;
/// by default records are logged (`llmproxy::usage`) and counted in metrics.
pub trait UsageSink: Send + Sync {
    /// Store one record. Called on a hook thread; must not block for long.
    fn record(&self, entry: UsageEntry);
}

/// The default sink: one JSON log line per record.
#[derive(Debug, Default)]
pub struct LogUsageSink;

impl UsageSink for LogUsageSink {
    fn record(&self, e: UsageEntry) {
        tracing::info!(
            target: "llmproxy::usage",
            request_id = %e.request_id,
            backend = %e.backend,
            is_stream = e.is_stream,
            usage = %e.record,
            "usage recorded"
        );
    }
}

/// Options of a gateway beyond its config.
#[derive(Clone, Default)]
pub struct GatewayOptions {
    /// Where usage records go (default: [`LogUsageSink`]).
    pub usage_sink: Option<Arc<dyn UsageSink>>,
}

impl std::fmt::Debug for GatewayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayOptions").finish_non_exhaustive()
    }
}

/// State shared by every connection and request.
pub struct Shared {
    /// Hook stages over the engine.
    pub stages: Stages,
    /// Backends, in config order.
    pub backends: Arc<[Arc<Backend>]>,
    /// The default balancer.
    pub balancer: Balancer,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Threads for hook calls.
    pub hooks: HookPool,
    /// Gateway settings.
    pub config: GatewayConfig,
    /// Usage sink.
    pub usage_sink: Arc<dyn UsageSink>,
    /// The body of `GET /v1/models`.
    pub models_body: Bytes,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("backends", &self.backends.len())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Build the shared state from a config: compiles every script, starts
    /// the hook threads (as many as the engine has VMs).
    pub fn new(config: Config, options: GatewayOptions) -> Result<Shared, String> {
        let mut problems = Vec::new();
        let mut backends = Vec::new();
        for (i, b) in config.backends.iter().enumerate() {
            match Backend::from_config(i, b, &config.gateway) {
                Ok(b) => backends.push(Arc::new(b)),
                Err(e) => problems.push(e),
            }
        }
        if config.backends.is_empty() {
            problems.push(String::from("backends: at least one backend is needed to serve"));
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        let gateway = config.gateway.clone();
        let engine = Arc::new(Engine::new(config).map_err(|e| e.to_string())?);
        let metrics = Arc::new(Metrics::new(backends.iter().map(|b| b.name.clone()).collect()));
        let threads = engine.pool_stats().capacity;
        let hooks = HookPool::new(threads).map_err(|e| format!("cannot start hook threads: {e}"))?;
        let models: Vec<Value> = if gateway.models.is_empty() {
            backends.iter().map(|b| b.name.clone()).collect::<Vec<_>>()
        } else {
            gateway.models.clone()
        }
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "llmproxy"}))
        .collect();
        let models_body = Bytes::from(json!({"object": "list", "data": models}).to_string());
        Ok(Shared {
            stages: Stages::new(engine, Arc::clone(&metrics)),
            balancer: Balancer::new(gateway.balancer, backends.len()),
            backends: backends.into(),
            metrics,
            hooks,
            config: gateway,
            usage_sink: options.usage_sink.unwrap_or_else(|| Arc::new(LogUsageSink)),
            models_body,
        })
    }

    /// The Prometheus exposition text.
    pub fn render_metrics(&self) -> String {
        let backends: Vec<(String, bool, f64, u64)> = self
            .backends
            .iter()
            .map(|b| {
                (
                    b.name.clone(),
                    b.health.is_healthy(),
                    b.health.latency_ms(),
                    b.health.active(),
                )
            })
            .collect();
        self.metrics.render(self.stages.engine().pool_stats(), &backends)
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    probe: Option<JoinHandle<()>>,
}

impl Gateway {
    /// Build the gateway from `config` and start serving on `listen`
    /// (port 0 picks a free port; see [`Gateway::local_addr`]).
    pub async fn start(config: Config, listen: SocketAddr, options: GatewayOptions) -> Result<Gateway, String> {
        let shared = Arc::new(Shared::new(config, options)?);
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the listen address: {e}"))?;
        let probe = (shared.config.health.probe_interval_ms > 0).then(|| {
            tokio::spawn(health::probe_loop(
                Arc::clone(&shared.backends),
                shared.config.health.clone(),
            ))
        });
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(server::serve(listener, Arc::clone(&shared), stopped));
        Ok(Gateway {
            shared,
            addr,
            stop: Some(stop),
            server,
            probe,
        })
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state (metrics, backends), for tests and embedding hosts.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stop accepting, let requests in flight finish (at most `grace`),
    /// then return.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(p) = self.probe.take() {
            p.abort();
        }
        let _ = tokio::time::timeout(grace, &mut self.server).await;
        self.server.abort();
        self.shared.hooks.close();
    }

    /// Serve until the server task ends (it does not end on its own).
    pub async fn wait(mut self) {
        let _ = (&mut self.server).await;
    }
}
