//! The circuit breaker in front of the shared state (Redis), the same in
//! every host: after [`TRIP_AFTER`] failed calls in a row the circuit
//! opens, and for [`OPEN_MS`] the host does not call Redis at all: a
//! request gets its `state.on_error` answer at once instead of waiting for
//! a connect or a timeout. Then one call goes through as a probe; its
//! success closes the circuit (recovery without a restart), its failure
//! opens it again. A probe that never reports (its caller went away) is
//! replaced by another after [`OPEN_MS`].

/// Failed calls in a row that open the circuit.
pub const TRIP_AFTER: u32 = 5;

/// How long an open circuit stays open before a probe (ms).
pub const OPEN_MS: f64 = 2_000.0;

/// One host's (one process's, one nginx worker's) view of the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Breaker {
    failures: u32,
    /// While open: when the next probe may go (ms).
    open_until_ms: Option<f64>,
    /// A probe is out since (ms).
    probe_since_ms: Option<f64>,
}

impl Breaker {
    /// A closed circuit.
    pub fn new() -> Breaker {
        Breaker::default()
    }

    /// May a call go to the backend now? `false`: answer as if it failed,
    /// without calling.
    pub fn allow(&mut self, now_ms: f64) -> bool {
        let Some(until) = self.open_until_ms else {
            return true;
        };
        if now_ms < until {
            return false;
        }
        match self.probe_since_ms {
            Some(since) if now_ms - since < OPEN_MS => false,
            _ => {
                self.probe_since_ms = Some(now_ms);
                true
            }
        }
    }

    /// A call succeeded: the circuit closes.
    pub fn success(&mut self) {
        *self = Breaker::default();
    }

    /// A call failed.
    pub fn failure(&mut self, now_ms: f64) {
        self.failures = self.failures.saturating_add(1);
        if self.probe_since_ms.is_some() || self.failures >= TRIP_AFTER {
            self.open_until_ms = Some(now_ms + OPEN_MS);
            self.probe_since_ms = None;
        }
    }

    /// Whether calls are being skipped.
    pub fn is_open(&self) -> bool {
        self.open_until_ms.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_and_closes_on_a_good_probe() {
        let mut b = Breaker::new();
        for i in 0..TRIP_AFTER {
            assert!(b.allow(0.0), "call {i}");
            b.failure(0.0);
        }
        assert!(b.is_open());
        assert!(!b.allow(1.0), "open: no call");
        assert!(!b.allow(OPEN_MS - 1.0));
        // The probe, and only one at a time.
        assert!(b.allow(OPEN_MS));
        assert!(!b.allow(OPEN_MS + 1.0));
        b.success();
        assert!(!b.is_open());
        assert!(b.allow(OPEN_MS + 2.0));
    }

    #[test]
    fn a_failed_probe_opens_it_again_and_a_lost_probe_is_replaced() {
        let mut b = Breaker::new();
        for _ in 0..TRIP_AFTER {
            b.failure(0.0);
        }
        assert!(b.allow(OPEN_MS));
        b.failure(OPEN_MS);
        assert!(!b.allow(OPEN_MS + 1.0), "open again");
        assert!(b.allow(2.0 * OPEN_MS), "the next probe");
        // That probe never reports: another goes after OPEN_MS.
        assert!(!b.allow(2.5 * OPEN_MS));
        assert!(b.allow(3.0 * OPEN_MS));
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let mut b = Breaker::new();
        for _ in 0..TRIP_AFTER - 1 {
            b.failure(0.0);
        }
        b.success();
        b.failure(0.0);
        assert!(!b.is_open());
    }
}
