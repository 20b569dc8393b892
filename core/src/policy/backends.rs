//! The default balancer and backend health, the same in every host: which
//! backend a request goes to when routing names none (or on a retry), and
//! when a backend is taken out of and put back into rotation.
//!
//! - **Health** is passive: failures in a row (connect errors, timeouts,
//!   5xx answers, failed active probes where a host runs them) mark a
//!   backend unhealthy; successes in a row mark it healthy again. An
//!   unhealthy backend gets trial requests once `cooldown_ms` has passed
//!   since its last failure.
//! - **Latency** is an exponentially weighted moving average of the time to
//!   the answer's head ([`EWMA_ALPHA`]).
//! - **Picking**: among the backends the host allows for this try (not yet
//!   tried, reachable), the eligible ones (healthy, or cooled down); when
//!   none is eligible, any allowed one, since trying beats failing
//!   outright. Then smooth weighted round robin (as nginx does it), fewest
//!   requests in flight per unit of weight, or the lowest latency.
//!
//! A host keeps one [`BackendSet`] per process (the gateway) or per worker
//! (nginx), feeds it what happened and reads its decisions; the clock is
//! the host's (milliseconds, any epoch, never going back).

use crate::config::{BalancerKind, HealthConfig};

/// Weight of a new observation in the latency EWMA.
pub const EWMA_ALPHA: f64 = 0.3;

/// A change of a backend's health, for the host to log and to refresh what
/// it shows of the backends (routing's `backends` global).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthChange {
    /// Marked unhealthy after `failures` failures in a row.
    Unhealthy {
        /// The failures in a row that marked it.
        failures: u32,
    },
    /// Healthy again after `successes_to_healthy` successes in a row.
    Healthy,
}

/// What a host shows of one backend (routing's `backends` global, the
/// `llmproxy_backend_*` metrics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackendView {
    /// Whether it is considered healthy.
    pub healthy: bool,
    /// Latency EWMA in milliseconds (0 until the first observation).
    pub latency_ms: f64,
    /// Requests in flight to it.
    pub active: u64,
}

/// One backend's balancing state.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    weight: u32,
    healthy: bool,
    failures: u32,
    successes: u32,
    last_failure_ms: f64,
    latency_ms: f64,
    active: u64,
    /// Smooth weighted round robin's current weight.
    current: i64,
}

/// The balancing state of one host's backends, in config order.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSet {
    kind: BalancerKind,
    failures_to_unhealthy: u32,
    successes_to_healthy: u32,
    cooldown_ms: f64,
    slots: Vec<Slot>,
}

impl BackendSet {
    /// Backends of the given weights (config order), all healthy, with
    /// `kind` as the default balancer and `health` as the health rules.
    pub fn new(kind: BalancerKind, health: &HealthConfig, weights: impl IntoIterator<Item = u32>) -> BackendSet {
        BackendSet {
            kind,
            failures_to_unhealthy: health.failures_to_unhealthy.max(1),
            successes_to_healthy: health.successes_to_healthy.max(1),
            cooldown_ms: health.cooldown_ms as f64,
            slots: weights
                .into_iter()
                .map(|weight| Slot {
                    weight,
                    healthy: true,
                    failures: 0,
                    successes: 0,
                    last_failure_ms: 0.0,
                    latency_ms: 0.0,
                    active: 0,
                    current: 0,
                })
                .collect(),
        }
    }

    /// What the host shows of backend `i` (`None`: no such backend).
    pub fn view(&self, i: usize) -> Option<BackendView> {
        self.slots.get(i).map(|s| BackendView {
            healthy: s.healthy,
            latency_ms: s.latency_ms,
            active: s.active,
        })
    }

    /// Whether the balancer may send backend `i` traffic at `now_ms`:
    /// healthy, or unhealthy for at least the cool-down (a trial request).
    pub fn eligible(&self, i: usize, now_ms: f64) -> bool {
        self.slots
            .get(i)
            .is_some_and(|s| s.healthy || now_ms - s.last_failure_ms >= self.cooldown_ms)
    }

    /// Pick a backend among those `allowed` admits (the host's filter for
    /// this try: not yet tried, reachable): the eligible ones first; when
    /// none is, any allowed one. `None` when nothing is allowed.
    pub fn pick(&mut self, now_ms: f64, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.slots.len();
        let any_eligible = (0..n).any(|i| allowed(i) && self.eligible(i, now_ms));
        let candidate = |set: &BackendSet, i: usize| allowed(i) && (!any_eligible || set.eligible(i, now_ms));
        let mut best: Option<usize> = None;
        match self.kind {
            BalancerKind::WeightedRoundRobin => {
                let mut total = 0i64;
                for i in 0..n {
                    if !candidate(self, i) {
                        continue;
                    }
                    let slot = &mut self.slots[i];
                    let w = i64::from(slot.weight.max(1));
                    slot.current += w;
                    total += w;
                    if best.is_none_or(|b| self.slots[i].current > self.slots[b].current) {
                        best = Some(i);
                    }
                }
                let best = best?;
                self.slots[best].current -= total;
                Some(best)
            }
            BalancerKind::LeastConnections | BalancerKind::LowestLatency => {
                let key = |s: &Slot| match self.kind {
                    BalancerKind::LowestLatency => s.latency_ms,
                    _ => s.active as f64 / f64::from(s.weight.max(1)),
                };
                for i in 0..n {
                    if candidate(self, i) && best.is_none_or(|b| key(&self.slots[i]) < key(&self.slots[b])) {
                        best = Some(i);
                    }
                }
                best
            }
        }
    }

    /// A request was sent to backend `i`: one more in flight.
    pub fn begin(&mut self, i: usize) {
        if let Some(s) = self.slots.get_mut(i) {
            s.active += 1;
        }
    }

    /// A request sent to backend `i` ended, whatever its outcome.
    pub fn end(&mut self, i: usize) {
        if let Some(s) = self.slots.get_mut(i) {
            s.active = s.active.saturating_sub(1);
        }
    }

    /// A successful exchange with backend `i` (or active probe), its head
    /// `latency_ms` after the request (`None`: a probe, or not measured).
    pub fn success(&mut self, i: usize, latency_ms: Option<f64>) -> Option<HealthChange> {
        let to_healthy = self.successes_to_healthy;
        let s = self.slots.get_mut(i)?;
        if let Some(ms) = latency_ms.filter(|ms| ms.is_finite() && *ms >= 0.0) {
            s.latency_ms = if s.latency_ms == 0.0 {
                ms
            } else {
                EWMA_ALPHA * ms + (1.0 - EWMA_ALPHA) * s.latency_ms
            };
        }
        s.failures = 0;
        if s.healthy {
            return None;
        }
        s.successes += 1;
        if s.successes < to_healthy {
            return None;
        }
        s.healthy = true;
        s.successes = 0;
        Some(HealthChange::Healthy)
    }

    /// A failed exchange with backend `i` at `now_ms` (connect error,
    /// timeout, 5xx answer, failed probe).
    pub fn failure(&mut self, i: usize, now_ms: f64) -> Option<HealthChange> {
        let to_unhealthy = self.failures_to_unhealthy;
        let s = self.slots.get_mut(i)?;
        s.successes = 0;
        s.last_failure_ms = now_ms;
        s.failures = s.failures.saturating_add(1);
        if s.failures < to_unhealthy || !s.healthy {
            return None;
        }
        s.healthy = false;
        Some(HealthChange::Unhealthy { failures: s.failures })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(kind: BalancerKind, weights: &[u32]) -> BackendSet {
        let health = HealthConfig {
            failures_to_unhealthy: 3,
            successes_to_healthy: 2,
            cooldown_ms: 5_000,
            ..HealthConfig::default()
        };
        BackendSet::new(kind, &health, weights.iter().copied())
    }

    fn picks(s: &mut BackendSet, n: usize, now_ms: f64, allowed: impl Fn(usize) -> bool + Copy) -> Vec<Option<usize>> {
        (0..n).map(|_| s.pick(now_ms, allowed)).collect()
    }

    #[test]
    fn failures_in_a_row_take_a_backend_out_and_successes_put_it_back() {
        use HealthChange::{Healthy, Unhealthy};
        // (event, expected change, healthy after): `f` a failure at t=1000,
        // `s` a success.
        let steps: &[(char, Option<HealthChange>, bool)] = &[
            ('f', None, true),
            ('f', None, true),
            ('s', None, true), // a success resets the count
            ('f', None, true),
            ('f', None, true),
            ('f', Some(Unhealthy { failures: 3 }), false),
            ('f', None, false), // already out: no second change
            ('s', None, false),
            ('f', None, false), // a failure resets the successes
            ('s', None, false),
            ('s', Some(Healthy), true),
            ('s', None, true),
        ];
        let mut s = set(BalancerKind::WeightedRoundRobin, &[1]);
        for (n, &(event, want, healthy)) in steps.iter().enumerate() {
            let got = match event {
                'f' => s.failure(0, 1_000.0),
                _ => s.success(0, None),
            };
            assert_eq!(got, want, "step {n} ({event})");
            assert_eq!(s.view(0).map(|v| v.healthy), Some(healthy), "step {n} ({event})");
        }
    }

    #[test]
    fn an_unhealthy_backend_is_eligible_again_after_the_cool_down() {
        let mut s = set(BalancerKind::WeightedRoundRobin, &[1]);
        for _ in 0..3 {
            s.failure(0, 1_000.0);
        }
        for (now_ms, eligible) in [(1_000.0, false), (5_999.0, false), (6_000.0, true), (9_000.0, true)] {
            assert_eq!(s.eligible(0, now_ms), eligible, "at {now_ms}");
        }
        assert!(!s.eligible(1, 9_000.0), "no such backend");
    }

    #[test]
    fn latency_is_a_moving_average_of_measured_answers() {
        let mut s = set(BalancerKind::LowestLatency, &[1]);
        let samples: &[(Option<f64>, f64)] = &[
            (None, 0.0),
            (Some(100.0), 100.0),
            (Some(200.0), 0.3 * 200.0 + 0.7 * 100.0),
            (Some(-1.0), 130.0),
            (Some(f64::NAN), 130.0),
            (None, 130.0),
        ];
        for &(sample, want) in samples {
            s.success(0, sample);
            let got = s.view(0).map_or(f64::NAN, |v| v.latency_ms);
            assert!((got - want).abs() < 1e-9, "after {sample:?}: {got} != {want}");
        }
    }

    #[test]
    fn weighted_round_robin_is_smooth() {
        // nginx's example: weights 5, 1, 1 give a a b a c a a.
        let mut s = set(BalancerKind::WeightedRoundRobin, &[5, 1, 1]);
        let got = picks(&mut s, 14, 0.0, |_| true);
        let want = [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0].map(Some);
        assert_eq!(got, want);
    }

    #[test]
    fn picks_skip_what_the_host_excludes_and_unhealthy_backends_while_others_are_eligible() {
        let mut s = set(BalancerKind::WeightedRoundRobin, &[1, 1, 1]);
        assert_eq!(picks(&mut s, 4, 0.0, |i| i != 1), [Some(0), Some(2), Some(0), Some(2)]);
        for _ in 0..3 {
            s.failure(0, 1_000.0);
        }
        assert_eq!(picks(&mut s, 3, 2_000.0, |_| true), [Some(1), Some(2), Some(1)]);
        // Only the unhealthy one is allowed: trying beats failing outright.
        assert_eq!(s.pick(2_000.0, |i| i == 0), Some(0));
        assert_eq!(s.pick(2_000.0, |_| false), None);
        assert_eq!(set(BalancerKind::LeastConnections, &[]).pick(0.0, |_| true), None);
    }

    #[test]
    fn least_connections_weighs_requests_in_flight_and_lowest_latency_the_average() {
        let mut s = set(BalancerKind::LeastConnections, &[1, 4, 1]);
        // In flight: 1, 3, 2; per unit of weight: 1, 0.75, 2.
        for (i, n) in [(0, 1), (1, 3), (2, 2)] {
            for _ in 0..n {
                s.begin(i);
            }
        }
        assert_eq!(s.pick(0.0, |_| true), Some(1));
        assert_eq!(s.pick(0.0, |i| i != 1), Some(0));
        s.end(1);
        s.end(1);
        s.end(1);
        s.end(1); // one more end than begins: stays at 0
        assert_eq!(s.view(1).map(|v| v.active), Some(0));

        let mut s = set(BalancerKind::LowestLatency, &[1, 1, 1]);
        for (i, ms) in [(0, 30.0), (1, 10.0), (2, 10.0)] {
            s.success(i, Some(ms));
        }
        assert_eq!(s.pick(0.0, |_| true), Some(1), "the first of equals");
        assert_eq!(s.pick(0.0, |i| i != 1), Some(2));
    }
}
