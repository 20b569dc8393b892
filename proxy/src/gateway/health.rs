//! Backend health as one backend sees it: a handle onto the [`Balancer`]'s
//! state (core's rules: failures and successes in a row of real requests
//! and of the optional periodic `GET` probe, the latency EWMA, requests in
//! flight), plus the probe task.

use std::sync::Arc;
use std::time::Duration;

use llmproxy_core::config::HealthConfig;
use llmproxy_core::policy::backends::{BackendView, HealthChange};

use super::backend::Backend;
use super::balancer::Balancer;

/// One backend's health, read and written through the shared balancer.
#[derive(Debug)]
pub struct Health {
    balancer: Arc<Balancer>,
    index: usize,
    /// The backend's name, for the log lines of health changes.
    name: String,
}

impl Health {
    /// Backend `index` (named `name`) of `balancer`.
    pub fn new(balancer: Arc<Balancer>, index: usize, name: &str) -> Self {
        Health {
            balancer,
            index,
            name: name.to_owned(),
        }
    }

    /// Health, latency EWMA and requests in flight, read at once.
    pub fn view(&self) -> BackendView {
        self.balancer.lock().view(self.index).unwrap_or(BackendView {
            healthy: false,
            latency_ms: 0.0,
            active: 0,
        })
    }

    /// Count one request in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.balancer.lock().begin(self.index);
        InFlight(Arc::clone(self))
    }

    /// A successful exchange whose answer's head came after `latency`
    /// (`None`: a probe).
    pub fn success(&self, latency: Option<Duration>) {
        let ms = latency.map(|l| l.as_secs_f64() * 1e3);
        let change = self.balancer.lock().success(self.index, ms);
        self.log(change);
    }

    /// A failed exchange (connect error, timeout, retryable status).
    pub fn failure(&self) {
        let now = self.balancer.now_ms();
        let change = self.balancer.lock().failure(self.index, now);
        self.log(change);
    }

    fn log(&self, change: Option<HealthChange>) {
        match change {
            Some(HealthChange::Unhealthy { failures }) => {
                tracing::warn!(target: "llmproxy::health", backend = %self.name, failures, "backend marked unhealthy");
            }
            Some(HealthChange::Healthy) => {
                tracing::info!(target: "llmproxy::health", backend = %self.name, "backend healthy again");
            }
            None => {}
        }
    }
}

/// A request in flight; ends it when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Health>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.balancer.lock().end(self.0.index);
    }
}

/// Probe every backend every `probe_interval_ms` until the task is aborted.
pub async fn probe_loop(backends: Arc<[Arc<Backend>]>, cfg: HealthConfig) {
    let period = Duration::from_millis(cfg.probe_interval_ms);
    let timeout = Duration::from_millis(cfg.probe_timeout_ms);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for b in backends.iter() {
            let ok = b.probe(&cfg.probe_path, timeout).await;
            if ok {
                b.health.success(None);
            } else {
                b.health.failure();
            }
        }
    }
}
