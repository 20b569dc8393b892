//! The batched mode of the Redis state (`state.mode: batched`, the
//! default; docs/adr/051): requests are decided on this node's view of the
//! fleet's counters (the core's `policy::fleet`) under one lock, and a task
//! settles the view with Redis every `state.settle_ms` in one script call.
//! A request with no room left under a limit (or of a key this node has not
//! settled yet) wakes the task and waits for its round.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use llmproxy_core::config::{LimitsConfig, StateConfig};
use llmproxy_core::policy::fleet::{Fleet, Room, SettleReply, Settlement};
use llmproxy_core::policy::limits::Verdict;
use tokio::sync::{watch, Notify};

/// The outcome of the last settlement round (`n` counts rounds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Round {
    n: u64,
    ok: bool,
}

/// A batched node's view and its settling.
#[derive(Debug)]
pub struct Batched {
    view: Mutex<Fleet>,
    origin: Instant,
    kick: Notify,
    rounds: watch::Sender<Round>,
    /// How often the task settles.
    pub every: Duration,
    /// Longest a request waits for a round.
    wait_limit: Duration,
}

/// Why a request could not be decided on the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsettled;

impl Batched {
    /// The view of a node started now.
    pub fn new(cfg: &StateConfig) -> Batched {
        // Settlement numbers start above any this node's identity could
        // have used: the instance id is new per process, and the clock
        // only makes a reused one safe too.
        let first_seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .saturating_mul(1_000);
        Batched {
            view: Mutex::new(Fleet::new(cfg.batch, first_seq)),
            origin: Instant::now(),
            kick: Notify::new(),
            rounds: watch::Sender::new(Round::default()),
            every: Duration::from_millis(cfg.settle_ms),
            wait_limit: Duration::from_millis(cfg.timeout_ms + cfg.settle_ms),
        }
    }

    fn now_ms(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1000.0
    }

    fn view(&self) -> std::sync::MutexGuard<'_, Fleet> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `attempt` on the view until it succeeds; between tries, wake
    /// the settle task and wait for its round (at most `timeout_ms +
    /// settle_ms`). When Redis is unreachable or a round fails, give up:
    /// the caller applies `state.on_error`.
    async fn with_settled<T>(
        &self,
        mut attempt: impl FnMut(&mut Fleet, f64) -> Option<T>,
        reachable: impl Fn() -> bool,
    ) -> Result<T, Unsettled> {
        let mut rounds = self.rounds.subscribe();
        loop {
            let now = self.now_ms();
            if let Some(t) = attempt(&mut self.view(), now) {
                return Ok(t);
            }
            if !reachable() {
                return Err(Unsettled);
            }
            rounds.mark_unchanged();
            self.kick.notify_one();
            match tokio::time::timeout(self.wait_limit, rounds.changed()).await {
                Ok(Ok(())) if rounds.borrow().ok => {}
                _ => return Err(Unsettled),
            }
        }
    }

    /// Decide a request on the view, after a settlement when it has no
    /// room ([`Fleet::room`]).
    pub async fn acquire(
        &self,
        limits: &LimitsConfig,
        key: Option<&str>,
        force: bool,
        reachable: impl Fn() -> bool,
    ) -> Result<Verdict, Unsettled> {
        self.with_settled(
            |v, now| match v.room(limits, key, now) {
                Room::Free => Some(v.acquire(limits, key, force, now)),
                Room::Low => {
                    self.kick.notify_one();
                    Some(v.acquire(limits, key, force, now))
                }
                Room::Settle => None,
            },
            reachable,
        )
        .await
    }

    /// Make sure the view knows `key` (its quota usage) before a request
    /// is checked against it.
    pub async fn know(&self, key: &str, reachable: impl Fn() -> bool) -> Result<(), Unsettled> {
        self.with_settled(|v, now| v.knows(key, now).then_some(()), reachable)
            .await
    }

    /// Decide on the view with no room check: Redis is unreachable and
    /// `state.on_error` is `allow` (this node's limits alone; the deltas
    /// settle after recovery).
    pub fn acquire_unchecked(&self, limits: &LimitsConfig, key: Option<&str>, force: bool) -> Verdict {
        let now = self.now_ms();
        self.view().acquire(limits, key, force, now)
    }

    /// Give back what an acquire took.
    pub fn refund(&self, limits: &LimitsConfig, key: Option<&str>) {
        let now = self.now_ms();
        self.view().refund(limits, key, now);
    }

    /// Free a slot of `key`.
    pub fn release(&self, key: &str) {
        self.view().release(key);
    }

    /// Charge a finished request.
    pub fn charge(&self, limits: &LimitsConfig, key: &str, tokens: u64, billable: u64, answered_ms: i64) {
        let now = self.now_ms();
        self.view().charge(limits, key, tokens, billable, answered_ms, now);
    }

    /// The key's quota usage as this node knows it.
    pub fn used(&self, key: &str) -> u64 {
        self.view().used(key)
    }

    /// Is anything left to settle?
    pub fn has_work(&self) -> bool {
        self.view().has_work()
    }

    /// The settlement to send now, if any.
    pub(crate) fn settlement(&self) -> Option<Settlement> {
        self.view().settlement()
    }

    /// A round ended: with Redis' answer to `seq`, or failed.
    pub(crate) fn finish_round(&self, answered: Option<(u64, &SettleReply)>) {
        if let Some((seq, reply)) = answered {
            let now = self.now_ms();
            self.view().settled(seq, reply, now);
        }
        let ok = answered.is_some();
        self.rounds.send_modify(|r| {
            r.n += 1;
            r.ok = ok;
        });
    }

    /// Wait until the next tick or a request's wake-up.
    pub(crate) async fn next_tick(&self) {
        tokio::select! {
            _ = tokio::time::sleep(self.every) => {}
            _ = self.kick.notified() => {}
        }
    }
}
