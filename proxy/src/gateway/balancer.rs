//! The default balancer and backend health: core's
//! [`llmproxy_core::policy::backends::BackendSet`] (the rules every host
//! follows) behind one lock, shared by every request and the probe task.
//! Used when routing returns nil (or fails) and for retries.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use llmproxy_core::config::{BalancerKind, HealthConfig};
use llmproxy_core::policy::backends::BackendSet;

/// The gateway's backends as the balancer sees them.
#[derive(Debug)]
pub struct Balancer {
    set: Mutex<BackendSet>,
    /// The clock's zero: core's rules take milliseconds on the host's clock.
    epoch: Instant,
}

impl Balancer {
    /// Backends of the given weights (config order), all healthy.
    pub fn new(kind: BalancerKind, health: &HealthConfig, weights: impl IntoIterator<Item = u32>) -> Arc<Balancer> {
        Arc::new(Balancer {
            set: Mutex::new(BackendSet::new(kind, health, weights)),
            epoch: Instant::now(),
        })
    }

    /// Pick a backend index, skipping `exclude` (backends already tried).
    pub fn pick(&self, exclude: &[usize]) -> Option<usize> {
        let now = self.now_ms();
        self.lock().pick(now, |i| !exclude.contains(&i))
    }

    /// The state, for one step (a poisoned lock still holds a usable state:
    /// every step leaves it consistent).
    pub(super) fn lock(&self) -> MutexGuard<'_, BackendSet> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Milliseconds since the balancer was built.
    pub(super) fn now_ms(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64() * 1e3
    }
}
