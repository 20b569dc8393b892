//! Backend health: passive (consecutive failures and successes of real
//! requests) and active (an optional periodic `GET` probe), plus the latency
//! EWMA and in-flight count the balancer and routing scripts see.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmproxy_core::config::HealthConfig;

use super::backend::Backend;

/// Weight of a new observation in the latency EWMA.
pub const EWMA_ALPHA: f64 = 0.3;

/// Live health state of one backend. Every field is an atomic: it is read
/// by every request and written by every response.
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    healthy: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
    last_failure_ms: AtomicU64,
    ewma_bits: AtomicU64,
    active: AtomicU64,
    failures_to_unhealthy: u32,
    successes_to_healthy: u32,
    cooldown_ms: u64,
}

impl Health {
    /// A healthy backend with no history.
    pub fn new(cfg: &HealthConfig) -> Self {
        Health {
            epoch: Instant::now(),
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            last_failure_ms: AtomicU64::new(0),
            ewma_bits: AtomicU64::new(0f64.to_bits()),
            active: AtomicU64::new(0),
            failures_to_unhealthy: cfg.failures_to_unhealthy,
            successes_to_healthy: cfg.successes_to_healthy,
            cooldown_ms: cfg.cooldown_ms,
        }
    }

    /// Whether the backend is considered healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether the balancer may send it traffic: healthy, or unhealthy for
    /// longer than the cool-down (a trial request).
    pub fn is_eligible(&self) -> bool {
        self.is_healthy()
            || self
                .now_ms()
                .saturating_sub(self.last_failure_ms.load(Ordering::Relaxed))
                >= self.cooldown_ms
    }

    /// Latency EWMA in milliseconds (0 until the first observation).
    pub fn latency_ms(&self) -> f64 {
        f64::from_bits(self.ewma_bits.load(Ordering::Relaxed))
    }

    /// Requests in flight.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Count one request in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// A successful exchange that took `latency`.
    pub fn success(&self, latency: Option<Duration>) {
        if let Some(latency) = latency {
            let ms = latency.as_secs_f64() * 1e3;
            let _ = self
                .ewma_bits
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                    let old = f64::from_bits(bits);
                    let new = if old == 0.0 {
                        ms
                    } else {
                        EWMA_ALPHA * ms + (1.0 - EWMA_ALPHA) * old
                    };
                    Some(new.to_bits())
                });
        }
        self.failures.store(0, Ordering::Relaxed);
        if !self.is_healthy() {
            let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= self.successes_to_healthy {
                self.healthy.store(true, Ordering::Relaxed);
                self.successes.store(0, Ordering::Relaxed);
                tracing::info!(target: "llmproxy::health", "backend healthy again");
            }
        }
    }

    /// A failed exchange (connect error, timeout, retryable status).
    pub fn failure(&self) {
        self.successes.store(0, Ordering::Relaxed);
        self.last_failure_ms.store(self.now_ms(), Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.failures_to_unhealthy && self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(target: "llmproxy::health", failures = n, "backend marked unhealthy");
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A request in flight; decrements the count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Health>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
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
