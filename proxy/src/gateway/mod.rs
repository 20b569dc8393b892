//! The standalone gateway.
//!
//! - [`server`]: accepting connections and dispatching endpoints.
//! - [`workers`]: the threads (one single-threaded runtime each) that serve
//!   client connections.
//! - [`exchange`]: one proxied request, attempts and retries included.
//! - [`relay`]: SSE streams, relayed event by event.
//! - [`pipeline`]: the hook stages, one function each.
//! - [`hook_pool`]: the threads hook calls run on.
//! - [`admission`]: the auth and rate limit stages, and the ticket every
//!   admitted request carries (its concurrency slot and usage record).
//! - [`keyset`], [`limiter`], [`state`], [`resp`]: API keys, the standard
//!   limiter, where counters live (this process or Redis), the Redis client.
//! - [`ledger`]: the SQLite usage ledger.
//! - [`live`], [`reload`]: the reloadable snapshot and hot reload.
//! - [`exposure`]: which listener exposes the admin endpoints, and the
//!   admin token policy for it.
//! - [`throttle`]: throttling of clients that fail key or token checks.
//! - [`backend`], [`balancer`], [`health`], [`upstream`]: backends.
//! - [`conn`]: the connection cap and the client write timeout.
//! - [`sse`], [`headers`], [`body`], [`errors`], [`metrics`],
//!   [`request_id`]: helpers with one job each.

pub mod admission;
pub mod backend;
pub mod balancer;
pub mod body;
pub mod conn;
pub mod errors;
pub mod exchange;
pub mod exposure;
pub mod headers;
pub mod health;
pub mod hook_pool;
pub mod keyset;
pub use llmproxy_ledger as ledger;
pub mod batched;
pub mod limiter;
pub mod live;
pub mod metrics;
pub mod pipeline;
pub mod redis_conn;
pub mod relay;
pub mod reload;
pub mod request_id;
pub mod server;
pub mod state;
pub mod throttle;
pub mod unparsed;
pub mod upstream;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use llmproxy_core::config::{GatewayConfig, StateBackend};
use llmproxy_core::Config;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use backend::Backend;
use balancer::Balancer;
use hook_pool::HookPool;
use ledger::Ledger;
use live::Live;
use metrics::{AccountGauges, Metrics};
use state::State;

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
    /// The record to store as JSON text, every object's keys sorted (what
    /// the ledger stores): the script's table, or `raw` when the hook is
    /// off, returned nil or failed.
    pub record_json: String,
    /// The status the client got (499: the client went away first).
    pub status: u16,
    /// The fingerprint of the client's API key.
    pub key_fingerprint: Option<String>,
    /// The key's user.
    pub user_id: Option<String>,
    /// The `model` the client asked for.
    pub model: Option<String>,
    /// Tokens charged to the key's quota (`billable_tokens`, else
    /// `total_tokens`, rounded).
    pub billable_tokens: u64,
    /// Time from request to completion, in milliseconds.
    pub latency_ms: f64,
    /// The tokens were estimated by the gateway: the backend's usage never
    /// came (a stream whose client left first); `raw` has `"estimated": true`.
    pub estimated: bool,
}

impl UsageEntry {
    /// The record as a JSON value (parsed from `record_json`).
    pub fn record(&self) -> Value {
        serde_json::from_str(&self.record_json).unwrap_or(Value::Null)
    }
}

/// Where usage records go besides the ledger (`ledger:`): one record per
/// admitted request. By default, without a ledger, records are logged
/// (`llmproxy::usage`); they are always counted in metrics.
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
            status = e.status,
            key = e.key_fingerprint.as_deref().unwrap_or("-"),
            usage = %e.record_json,
            "usage recorded"
        );
    }
}

/// Options of a gateway beyond its config.
#[derive(Clone, Default)]
pub struct GatewayOptions {
    /// Where usage records go besides the ledger (default: [`LogUsageSink`]
    /// without a ledger, nothing with one).
    pub usage_sink: Option<Arc<dyn UsageSink>>,
    /// The node name in ledger records (default: the host name and pid).
    pub node: Option<String>,
}

impl std::fmt::Debug for GatewayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayOptions").finish_non_exhaustive()
    }
}

/// State shared by every connection and request.
pub struct Shared {
    live: ArcSwap<Live>,
    /// Backends, in config order (fixed at start).
    pub backends: Arc<[Arc<Backend>]>,
    /// The default balancer and the backends' health.
    pub balancer: Arc<Balancer>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Threads for hook calls.
    pub hooks: HookPool,
    /// The threads serving the public listener's connections.
    pub workers: workers::Workers,
    /// Gateway settings (fixed at start).
    pub config: GatewayConfig,
    /// Usage sinks besides the ledger.
    pub usage_sinks: Vec<Arc<dyn UsageSink>>,
    /// Rate-limit counters, concurrency slots, quota usage.
    pub state: Arc<State>,
    /// The usage ledger.
    pub ledger: Option<Arc<Ledger>>,
    /// This gateway's name in the ledger.
    pub node: String,
    /// The body of `GET /v1/models`.
    pub models_body: Bytes,
    /// Hot reload bookkeeping.
    pub reloader: reload::Reloader,
    /// A listener serving the admin endpoints off loopback (set by
    /// [`Gateway::start`]): reloads are held to the admin token policy.
    pub admin_exposed: Option<SocketAddr>,
    /// Failed API key and admin token checks per client address.
    pub throttles: throttle::Throttles,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("backends", &self.backends.len())
            .finish_non_exhaustive()
    }
}

fn default_node() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| String::from("llmproxy"));
    format!("{host}-{}", std::process::id())
}

impl Shared {
    /// Build the shared state from a config: compiles every script, opens
    /// the ledger, starts the hook threads (as many as the engine has VMs)
    /// and the connection workers.
    /// Must run inside a tokio runtime (the Redis backend spawns on it).
    pub fn new(config: Config, options: GatewayOptions) -> Result<Shared, String> {
        let mut problems = Vec::new();
        let mut backends = Vec::new();
        let workers = workers::resolve(config.gateway.workers);
        let g = &config.gateway;
        let balancer = Balancer::new(g.balancer, &g.health, config.backends.iter().map(|b| b.weight));
        for (i, b) in config.backends.iter().enumerate() {
            match Backend::from_config(i, b, &config.gateway, workers, &balancer) {
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
        let handle = tokio::runtime::Handle::try_current().map_err(|e| format!("no tokio runtime: {e}"))?;
        let metrics = Arc::new(Metrics::new(backends.iter().map(|b| b.name.clone()).collect()));
        let ledger = match &config.ledger {
            Some(cfg) => {
                let flush = std::time::Duration::from_millis(cfg.flush_ms);
                Some(Arc::new(match &cfg.url {
                    Some(url) => Ledger::open_postgres(url, flush, cfg.batch_max, cfg.queue)?,
                    None => Ledger::open(&cfg.path, flush, cfg.batch_max, cfg.queue)?,
                }))
            }
            None => None,
        };
        let state = Arc::new(State::new(&config.state, ledger.clone(), handle)?);
        if config.state.backend == StateBackend::Local
            && ledger.is_none()
            && config.keys.iter().any(|k| k.quota_limit().is_some())
        {
            tracing::warn!(
                target: "llmproxy::gateway",
                "keys have quotas but there is no ledger: used_quota is counted in memory and lost on restart (add `ledger:`)"
            );
        }
        let models_body = Bytes::from(llmproxy_core::models::models_body(&config));
        let reloader = reload::Reloader::new(&config);
        let job_deadline = Duration::from_millis(config.pool.checkout_timeout_ms);
        let live = Live::build(config, Arc::clone(&metrics), 1)?;
        let threads = live.stages.engine().pool_stats().capacity;
        let inline_budget = Duration::from_millis(gateway.inline_budget_ms);
        let hooks = HookPool::new(threads, gateway.hook_queue, job_deadline, inline_budget)
            .map_err(|e| format!("cannot start hook threads: {e}"))?;
        let workers =
            workers::Workers::start(workers).map_err(|e| format!("cannot start the connection workers: {e}"))?;
        let mut usage_sinks: Vec<Arc<dyn UsageSink>> = Vec::new();
        match options.usage_sink {
            Some(s) => usage_sinks.push(s),
            None if ledger.is_none() => usage_sinks.push(Arc::new(LogUsageSink)),
            None => {}
        }
        let throttles = throttle::Throttles::new(&gateway.auth_throttle);
        Ok(Shared {
            live: ArcSwap::from_pointee(live),
            balancer,
            backends: backends.into(),
            metrics,
            hooks,
            workers,
            config: gateway,
            usage_sinks,
            state,
            ledger,
            node: options.node.unwrap_or_else(default_node),
            models_body,
            reloader,
            admin_exposed: None,
            throttles,
        })
    }

    /// The configuration generation serving new requests.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Replace the live generation (requests in flight keep theirs).
    pub(crate) fn swap_live(&self, live: Live) {
        self.live.store(Arc::new(live));
    }

    /// The Prometheus exposition text.
    pub fn render_metrics(&self) -> String {
        let backends: Vec<(String, bool, f64, u64)> = self
            .backends
            .iter()
            .map(|b| {
                let v = b.health.view();
                (b.name.clone(), v.healthy, v.latency_ms, v.active)
            })
            .collect();
        let mut out = self.metrics.render(self.live().stages.engine().pool_stats(), &backends);
        let r = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let ledger = self.ledger.as_ref().map(|l| {
            let s = &l.stats;
            [
                r(&s.written),
                r(&s.batches),
                r(&s.failed),
                r(&s.backpressure),
                r(&s.pending),
            ]
        });
        self.metrics.render_accounts(
            &mut out,
            AccountGauges {
                ledger,
                state_errors: self.state.stats().map_or(0, |s| r(&s.errors)),
                state_skipped: self.state.stats().map_or(0, |s| r(&s.skipped)),
                state_settlements: self
                    .state
                    .stats()
                    .map(|s| [r(&s.settlements[0]), r(&s.settlements[1]), r(&s.fail_open)]),
            },
        );
        throttle::render(&mut out, &self.throttles);
        self.workers.render(&mut out);
        let r = &self.hooks.rejections;
        self.metrics.render_bounds(
            &mut out,
            metrics::HookQueueGauges {
                queued: self.hooks.queued(),
                queue_full: r.queue_full.load(std::sync::atomic::Ordering::Relaxed),
                expired: r.expired.load(std::sync::atomic::Ordering::Relaxed),
                offloaded: r
                    .offloaded
                    .each_ref()
                    .map(|n| n.load(std::sync::atomic::Ordering::Relaxed)),
            },
        );
        metrics::render_ignored_fields(&mut out, self.live().stages.engine());
        out
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    admin: Option<AdminServer>,
    background: Vec<JoinHandle<()>>,
}

/// The admin listener's server task.
#[derive(Debug)]
struct AdminServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn bind(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr), String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("cannot read the {what} address: {e}"))?;
    Ok((listener, local))
}

impl Gateway {
    /// Build the gateway from `config` and start serving on `listen`
    /// (port 0 picks a free port; see [`Gateway::local_addr`]), and on
    /// `admin.listen` when set ([`Gateway::admin_addr`]). Refuses an
    /// example or short admin token on a listener off loopback.
    pub async fn start(config: Config, listen: SocketAddr, options: GatewayOptions) -> Result<Gateway, String> {
        let admin_listen = match config.admin.listen.as_deref() {
            Some(text) => Some(crate::listen::parse_listen(text).map_err(|e| format!("admin.listen: {e}"))?),
            None => None,
        };
        let exposed = exposure::exposed_admin(&config.admin, listen, admin_listen);
        exposure::check_token(&config.admin, exposed)?;
        let public_role = server::Role::Public {
            admin: config.admin.on_public_listener,
        };
        let mut shared = Shared::new(config, options)?;
        shared.admin_exposed = exposed;
        let shared = Arc::new(shared);
        let mut background = Vec::new();
        if let State::Redis(r) = &*shared.state {
            if let Err(e) = r.heartbeat_once().await {
                tracing::warn!(target: "llmproxy::state", "redis is not reachable yet: {e}");
            }
            let s = Arc::clone(&shared);
            background.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(llmproxy_core::shared_state::HEARTBEAT_MS)).await;
                    if let State::Redis(r) = &*s.state {
                        if let Err(e) = r.heartbeat_once().await {
                            tracing::warn!(target: "llmproxy::state", "redis heartbeat failed: {e}");
                        }
                    }
                }
            }));
        }
        if let State::Redis(r) = &*shared.state {
            if r.batched.is_some() {
                // The batched view's settlement rounds (docs/adr/051).
                let s = Arc::clone(&shared);
                background.push(tokio::spawn(async move {
                    let State::Redis(r) = &*s.state else { return };
                    let Some(b) = &r.batched else { return };
                    loop {
                        b.next_tick().await;
                        r.settle_round().await;
                    }
                }));
            }
        }
        if let Err(e) = shared.state.sync_keys(&shared.live().keys).await {
            tracing::warn!(target: "llmproxy::state", "cannot sync key usage with the state backend: {e}");
        }
        if let Some(w) = reload::spawn_watcher(&shared) {
            background.push(w);
        }
        let (listener, addr) = bind(listen, "listen").await?;
        let admin_listener = match admin_listen {
            Some(a) => Some(bind(a, "admin.listen").await?),
            None => None,
        };
        if shared.config.health.probe_interval_ms > 0 {
            background.push(tokio::spawn(health::probe_loop(
                Arc::clone(&shared.backends),
                shared.config.health.clone(),
            )));
        }
        let admin = admin_listener.map(|(l, addr)| {
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(server::serve(l, Arc::clone(&shared), server::Role::Admin, stopped));
            AdminServer {
                addr,
                stop: Some(stop),
                task,
            }
        });
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(server::serve(listener, Arc::clone(&shared), public_role, stopped));
        Ok(Gateway {
            shared,
            addr,
            stop: Some(stop),
            server,
            admin,
            background,
        })
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the admin listener (`admin.listen`), if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    /// The shared state (metrics, backends), for tests and embedding hosts.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stop accepting, let requests in flight finish (at most `grace`),
    /// then finish the usage work they left (hook jobs, Redis charges) and
    /// commit the ledger: nothing admitted before the call is lost.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(stop) = self.admin.as_mut().and_then(|a| a.stop.take()) {
            let _ = stop.send(());
        }
        for b in self.background.drain(..) {
            b.abort();
        }
        let _ = tokio::time::timeout(grace, &mut self.server).await;
        self.server.abort();
        let shared = Arc::clone(&self.shared);
        let _ = tokio::task::spawn_blocking(move || shared.workers.stop_and_join()).await;
        if let Some(mut a) = self.admin.take() {
            let _ = tokio::time::timeout(grace, &mut a.task).await;
            a.task.abort();
        }
        let shared = Arc::clone(&self.shared);
        let _ = tokio::task::spawn_blocking(move || shared.hooks.close_and_join()).await;
        self.shared.state.drain(grace).await;
        if let Some(l) = self.shared.ledger.clone() {
            let _ = tokio::task::spawn_blocking(move || l.close()).await;
        }
    }

    /// Serve until the server task ends (it does not end on its own).
    pub async fn wait(mut self) {
        let _ = (&mut self.server).await;
    }
}
