//! The default balancer, used when routing returns nil (or fails) and for
//! retries: weighted round robin (smooth, as nginx does it), least
//! connections, or lowest latency, over eligible backends.

use std::sync::Mutex;

use llmproxy_core::config::BalancerKind;

use super::backend::Backend;

/// Picks a backend.
#[derive(Debug)]
pub struct Balancer {
    kind: BalancerKind,
    /// Current weights of smooth weighted round robin, per backend.
    current: Mutex<Vec<i64>>,
}

impl Balancer {
    /// A balancer over `n` backends.
    pub fn new(kind: BalancerKind, n: usize) -> Self {
        Balancer {
            kind,
            current: Mutex::new(vec![0; n]),
        }
    }

    /// Pick a backend index, skipping `exclude` (backends already tried).
    /// Healthy (or cooled-down) backends first; when none is left, any
    /// backend not yet tried, since trying beats failing outright.
    pub fn pick(&self, backends: &[std::sync::Arc<Backend>], exclude: &[usize]) -> Option<usize> {
        let allowed = |i: usize| !exclude.contains(&i);
        let eligible: Vec<usize> = (0..backends.len())
            .filter(|&i| allowed(i) && backends[i].health.is_eligible())
            .collect();
        let candidates = if eligible.is_empty() {
            (0..backends.len()).filter(|&i| allowed(i)).collect()
        } else {
            eligible
        };
        match candidates.as_slice() {
            [] => None,
            [one] => Some(*one),
            _ => Some(match self.kind {
                BalancerKind::WeightedRoundRobin => self.smooth_wrr(backends, &candidates),
                BalancerKind::LeastConnections => min_by(&candidates, |i| {
                    backends[i].health.active() as f64 / f64::from(backends[i].weight.max(1))
                }),
                BalancerKind::LowestLatency => min_by(&candidates, |i| backends[i].health.latency_ms()),
            }),
        }
    }

    fn smooth_wrr(&self, backends: &[std::sync::Arc<Backend>], candidates: &[usize]) -> usize {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = 0i64;
        let mut best = candidates[0];
        for &i in candidates {
            let w = i64::from(backends[i].weight.max(1));
            current[i] += w;
            total += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        best
    }
}

fn min_by(candidates: &[usize], key: impl Fn(usize) -> f64) -> usize {
    let mut best = candidates[0];
    let mut best_key = key(best);
    for &i in &candidates[1..] {
        let k = key(i);
        if k < best_key {
            best = i;
            best_key = k;
        }
    }
    best
}
