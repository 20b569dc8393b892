//! Where rate-limit counters, concurrency slots and quota usage live:
//! this process (`state: {backend: local}`, quotas persisted through the
//! ledger) or Redis (`state: {backend: redis}`, shared by every gateway that
//! uses the same Redis and prefix; docs/adr/033).
//!
//! Both backends answer the same questions: a key's quota usage, "may this
//! request pass the limits, and if so take its tokens and slot" (atomic),
//! give back, release a slot, and charge a finished request's tokens.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llmproxy_core::config::{LimitsConfig, StateConfig, StateMode, StateOnError};
use llmproxy_core::hooks::RateLimitStatus;

use super::batched::Batched;
use super::keyset::KeySet;
use super::ledger::{self, KeyUsage, Ledger, LedgerRecord};
use super::limiter::{AcquireArgs, Acquired, LimitDenial, LimitKind, LocalLimiter, UNLIMITED};
use super::redis_conn::{self, RedisClient, RedisError, Reply, Script};
use llmproxy_core::policy::breaker::{self, Breaker};
use llmproxy_core::policy::fleet::MAX_KEYS_PER_SETTLEMENT;
use llmproxy_core::shared_state::{self, Layout, INSTANCE_TTL_MS};

/// The state backend of a gateway.
#[derive(Debug)]
pub enum State {
    /// Counters in this process.
    Local(LocalState),
    /// Counters in Redis.
    Redis(RedisState),
}

/// Failures of the state backend (Redis unreachable, bad reply).
pub type StateError = RedisError;

/// This state backend's identity in Redis: the process's id and a number
/// per backend created in it (tests run several gateways in one process;
/// each must own its slots and settlement numbers).
fn state_instance() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", redis_conn::instance_id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A concurrency slot; dropping it frees the slot, on every path.
#[derive(Debug)]
pub struct Permit {
    state: Arc<State>,
    key: Arc<str>,
}

impl Permit {
    /// A permit for a slot taken for `key`.
    pub fn new(state: &Arc<State>, key: Arc<str>) -> Permit {
        Permit {
            state: Arc::clone(state),
            key,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.state.release(&self.key);
    }
}

/// Counters of the state backend, for metrics.
#[derive(Debug, Default)]
pub struct StateStats {
    /// Failed calls.
    pub errors: AtomicU64,
    /// Calls not made: the circuit breaker was open.
    pub skipped: AtomicU64,
    /// Settlement rounds of a batched node: answered, failed.
    pub settlements: [AtomicU64; 2],
    /// Requests a batched node admitted on its own limits while Redis was
    /// unreachable (`on_error: allow`).
    pub fail_open: AtomicU64,
}

impl State {
    /// The backend of `cfg`. A Redis backend connects lazily; `handle`
    /// runs its background calls (slot releases, charges).
    pub fn new(
        cfg: &StateConfig,
        ledger: Option<Arc<Ledger>>,
        handle: tokio::runtime::Handle,
    ) -> Result<State, String> {
        match cfg.backend {
            llmproxy_core::config::StateBackend::Local => Ok(State::Local(LocalState::new(ledger))),
            llmproxy_core::config::StateBackend::Redis => {
                let url = cfg.url.as_deref().unwrap_or("redis://127.0.0.1:6379");
                let ca = match &cfg.tls_ca_file {
                    Some(f) => Some(std::fs::read(f).map_err(|e| format!("state.tls_ca_file: {}: {e}", f.display()))?),
                    None => None,
                };
                let timeout = Duration::from_millis(cfg.timeout_ms);
                let client = RedisClient::with_tls(url, cfg.connections, timeout, ca.as_deref())
                    .map_err(|e| format!("state.url: {e}"))?;
                Ok(State::Redis(RedisState {
                    client: Arc::new(client),
                    layout: Layout::new(&cfg.prefix),
                    instance: state_instance(),
                    on_error: cfg.on_error,
                    handle,
                    pending: Arc::new(AtomicUsize::new(0)),
                    stats: Arc::new(StateStats::default()),
                    breaker: Mutex::new(Breaker::new()),
                    origin: std::time::Instant::now(),
                    batched: (cfg.mode == StateMode::Batched).then(|| Box::new(Batched::new(cfg))),
                }))
            }
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> llmproxy_core::config::StateBackend {
        match self {
            State::Local(_) => llmproxy_core::config::StateBackend::Local,
            State::Redis(_) => llmproxy_core::config::StateBackend::Redis,
        }
    }

    /// The local backend, when this is one.
    pub fn local(&self) -> Option<&LocalState> {
        match self {
            State::Local(l) => Some(l),
            State::Redis(_) => None,
        }
    }

    /// The counters of the state backend (`None` for the local one).
    pub fn stats(&self) -> Option<&StateStats> {
        match self {
            State::Local(_) => None,
            State::Redis(r) => Some(&r.stats),
        }
    }

    /// Free a concurrency slot of `key`.
    pub fn release(&self, key: &str) {
        match self {
            State::Local(l) => l.limiter.release(key),
            State::Redis(r) => r.release(key),
        }
    }

    /// Charge a finished request: `billable` to the key's quota (unless
    /// the key was reset after the request was answered, docs/adr/043),
    /// `tokens` to its tokens-per-minute bucket; with a ledger, queue the
    /// record (with the local backend in the same ledger transaction as the
    /// quota change).
    pub fn charge(&self, c: Charge<'_>, limits: &LimitsConfig, record: Option<LedgerRecord>, ledger: Option<&Ledger>) {
        match self {
            State::Local(l) => l.charge(c, limits, record, ledger),
            State::Redis(r) => {
                if let Some(k) = c.key {
                    r.charge(k, &c, limits);
                }
                if let (Some(rec), Some(ledger)) = (record, ledger) {
                    ledger.record(rec);
                }
            }
        }
    }

    /// Bring the usage counters in line with a (new) key set: a key the
    /// backend has never seen starts at its configured `used_quota`, and a
    /// key whose configured `used_quota` changed since it was last applied
    /// is reset to it (that is how operators reset or correct a quota).
    pub async fn sync_keys(&self, keys: &KeySet) -> Result<(), StateError> {
        match self {
            State::Local(l) => {
                l.sync_keys(keys);
                Ok(())
            }
            State::Redis(r) => r.sync_keys(keys).await,
        }
    }

    /// Wait (at most `limit`) for background calls to finish (shutdown).
    pub async fn drain(&self, limit: Duration) {
        if let State::Redis(r) = self {
            let deadline = tokio::time::Instant::now() + limit;
            if let Some(b) = &r.batched {
                // What this node took and charged since the last round.
                while b.has_work() && tokio::time::Instant::now() < deadline {
                    if !r.settle_round().await {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                if b.has_work() {
                    tracing::warn!(
                        target: "llmproxy::state",
                        "shutting down with counts not settled (Redis did not answer within the grace period): \
                         the fleet does not see this node's last requests"
                    );
                }
            }
            while r.pending.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = r.client.cmd(&[b"DEL", r.instance_key().as_bytes()]).await;
        }
    }
}

/// What a finished request charges ([`State::charge`]).
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    /// The caller's key fingerprint, if any.
    pub key: Option<&'a str>,
    /// Tokens charged to the key's quota.
    pub billable: u64,
    /// Tokens charged to the key's tokens-per-minute bucket.
    pub tokens: u64,
    /// When the request was answered (Unix ms): a reset after it wins.
    pub answered_ms: i64,
}

/// How long a reload that applies a quota reset waits for the ledger to
/// commit what is queued (normally at most `ledger.flush_ms`, <= 100 ms).
const RESET_FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Counters in this process.
#[derive(Debug)]
pub struct LocalState {
    /// Token buckets and concurrency.
    pub limiter: LocalLimiter,
    usage: Mutex<HashMap<Arc<str>, KeyUsage>>,
    ledger: Option<Arc<Ledger>>,
}

impl LocalState {
    fn new(ledger: Option<Arc<Ledger>>) -> LocalState {
        // Start from what the ledger has persisted.
        let mut usage = HashMap::new();
        if let Some(l) = &ledger {
            match ledger::open_ro(l.path()).and_then(|c| ledger::read_key_usage(&c).map_err(|e| e.to_string())) {
                Ok(rows) => {
                    usage.extend(rows.into_iter().map(|(k, v)| (Arc::from(k.as_str()), v)));
                }
                Err(e) => tracing::warn!(target: "llmproxy::ledger", "cannot read key usage: {e}"),
            }
        }
        LocalState {
            limiter: LocalLimiter::new(),
            usage: Mutex::new(usage),
            ledger,
        }
    }

    /// The key's quota usage.
    pub fn used(&self, key: &str) -> u64 {
        self.usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map_or(0, |u| u.used)
    }

    /// The ledger's `key_usage` rows (empty without a ledger or on error).
    fn stored_usage(&self) -> HashMap<String, KeyUsage> {
        self.ledger
            .as_ref()
            .and_then(|l| ledger::open_ro(l.path()).ok())
            .and_then(|c| ledger::read_key_usage(&c).ok())
            .unwrap_or_default()
    }

    fn sync_keys(&self, keys: &KeySet) {
        // Resets made by `llmproxy keys set-quota --used` while we ran.
        let mut stored = self.stored_usage();
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let reset_outside = stored
            .iter()
            .any(|(fp, s)| s.reset_ms > usage.get(fp.as_str()).map_or(0, |u| u.reset_ms));
        if let (true, Some(l)) = (reset_outside, &self.ledger) {
            // Records charged before the reset may still be queued: commit
            // them (the ledger does not add those answered before the
            // reset to the new count, and does add those answered after
            // it), then read the rows again. Charges wait on the lock, so
            // none falls between this read and the memory count. A writer
            // stuck on its disk does not hold them long: after
            // RESET_FLUSH_WAIT the rows are taken as they are.
            if !l.flush_within(RESET_FLUSH_WAIT) {
                tracing::warn!(
                    target: "llmproxy::ledger",
                    "the ledger did not commit within {} ms of a quota reset; usage counts may be off until the next reload",
                    RESET_FLUSH_WAIT.as_millis()
                );
            }
            stored = self.stored_usage();
        }
        for e in keys.iter() {
            let configured = e.record.used_quota;
            let fp: &str = &e.fingerprint;
            let external = stored
                .get(fp)
                .filter(|s| s.reset_ms > usage.get(fp).map_or(0, |u| u.reset_ms));
            if let Some(s) = external {
                usage.insert(Arc::clone(&e.fingerprint), *s);
                continue;
            }
            let reset = match usage.get(fp) {
                Some(u) => u.config_used != configured,
                None => true,
            };
            if reset {
                let reset_ms = usage.get(fp).map_or(0, |u| u.reset_ms);
                usage.insert(
                    Arc::clone(&e.fingerprint),
                    KeyUsage {
                        used: configured,
                        config_used: configured,
                        reset_ms,
                    },
                );
                if let Some(l) = &self.ledger {
                    l.set_used(fp, configured, configured);
                }
            }
        }
    }

    fn charge(&self, c: Charge<'_>, limits: &LimitsConfig, record: Option<LedgerRecord>, ledger: Option<&Ledger>) {
        let Charge {
            key,
            billable,
            tokens,
            answered_ms,
        } = c;
        if let Some(k) = key {
            self.limiter.charge_tokens(k, tokens, limits);
        }
        match key {
            Some(k) if billable > 0 => {
                // The memory count and the ledger's queue change together, so
                // a reset (sync_keys) never falls between the two.
                let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
                // A request answered before the key's last reset belongs to
                // the count the reset replaced (as in the ledger).
                match usage.get_mut(k) {
                    Some(u) if answered_ms < u.reset_ms => {}
                    Some(u) => u.used = u.used.saturating_add(billable),
                    None => {
                        usage.insert(
                            Arc::from(k),
                            KeyUsage {
                                used: billable,
                                config_used: 0,
                                reset_ms: 0,
                            },
                        );
                    }
                }
                if let (Some(r), Some(l)) = (record, ledger) {
                    l.record(r);
                }
            }
            _ => {
                if let (Some(r), Some(l)) = (record, ledger) {
                    l.record(r);
                }
            }
        }
    }
}

/// Counters in Redis.
#[derive(Debug)]
pub struct RedisState {
    client: Arc<RedisClient>,
    layout: Layout,
    instance: String,
    on_error: StateOnError,
    handle: tokio::runtime::Handle,
    pending: Arc<AtomicUsize>,
    stats: Arc<StateStats>,
    /// The core's breaker over the calls a request waits for (quota,
    /// acquire, refund); background calls (releases, charges) always go.
    breaker: Mutex<Breaker>,
    /// Where the breaker's clock starts.
    origin: std::time::Instant,
    /// The view of a batched node (`state.mode: batched`).
    pub batched: Option<Box<Batched>>,
}

static SETTLE: Script = Script::new(shared_state::SETTLE);
static ACQUIRE: Script = Script::new(shared_state::ACQUIRE);
static REFUND: Script = Script::new(shared_state::REFUND);
static RELEASE: Script = Script::new(shared_state::RELEASE);
static CHARGE: Script = Script::new(shared_state::CHARGE);
static SYNC_KEY: Script = Script::new(shared_state::SYNC_KEY);

fn num(r: Option<&Reply>) -> f64 {
    r.and_then(Reply::as_text)
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(0.0)
}

impl RedisState {
    fn instance_key(&self) -> String {
        self.layout.instance(&self.instance)
    }

    fn failed(&self, e: &RedisError, op: &str) {
        if *e == RedisError::CircuitOpen {
            // Counted in `skipped`; the failures that opened it were logged.
            return;
        }
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "llmproxy::state", op, "state backend call failed: {e}");
    }

    fn now_ms(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1000.0
    }

    /// Run a call a request waits for behind the breaker: skipped at once
    /// while it is open. Redis answering with an error is Redis being up.
    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        let breaker = || self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        if !breaker().allow(self.now_ms()) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return Err(RedisError::CircuitOpen);
        }
        let r = call.await;
        match &r {
            Ok(_) | Err(RedisError::Command(_)) => breaker().success(),
            Err(_) => {
                let was_open = breaker().is_open();
                breaker().failure(self.now_ms());
                if !was_open && breaker().is_open() {
                    tracing::warn!(
                        target: "llmproxy::state",
                        "state backend: {} calls in a row failed; not calling it for {} ms (state.on_error applies)",
                        breaker::TRIP_AFTER,
                        breaker::OPEN_MS
                    );
                }
            }
        }
        r
    }

    /// Is the breaker open (Redis taken as down)?
    pub fn breaker_open(&self) -> bool {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner()).is_open()
    }

    /// What a request gets when Redis fails.
    pub fn on_error(&self) -> StateOnError {
        self.on_error
    }

    /// Settle a batched node's view with Redis: the settlement left
    /// unanswered, else what is pending (in rounds of at most
    /// [`MAX_KEYS_PER_SETTLEMENT`] keys). With nothing to send while the
    /// breaker is open, a probe (so that Redis coming back is noticed).
    /// `false` when a round failed.
    pub async fn settle_round(&self) -> bool {
        let Some(b) = &self.batched else { return true };
        loop {
            let Some(s) = b.settlement() else {
                if self.breaker_open() {
                    return self.guarded(self.client.cmd(&[b"PING"])).await.is_ok();
                }
                return true;
            };
            let (keys, args) = shared_state::settle_call(&self.layout, &self.instance, &s);
            let kb: Vec<&[u8]> = keys.iter().map(|s| s.as_bytes()).collect();
            let ab: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
            let reply = self.guarded(self.client.eval(&SETTLE, &kb, &ab)).await.and_then(|r| {
                let Reply::Array(items) = r else {
                    return Err(RedisError::Protocol(String::from("settle: not an array")));
                };
                let items: Vec<String> = items.iter().map(|i| i.as_text().unwrap_or_default()).collect();
                shared_state::parse_settle_reply(&items, s.keys.len()).map_err(RedisError::Protocol)
            });
            match reply {
                Ok(reply) => {
                    self.stats.settlements[0].fetch_add(1, Ordering::Relaxed);
                    b.finish_round(Some((s.seq, &reply)));
                    if s.keys.len() < MAX_KEYS_PER_SETTLEMENT {
                        return true;
                    }
                }
                Err(e) => {
                    self.failed(&e, "settle");
                    self.stats.settlements[1].fetch_add(1, Ordering::Relaxed);
                    b.finish_round(None);
                    return false;
                }
            }
        }
    }

    /// Announce this instance (its concurrency slots count while the
    /// announcement lives, 15 s), now and every 5 s from a task.
    pub async fn heartbeat_once(&self) -> Result<(), StateError> {
        let key = self.instance_key();
        self.client
            .cmd(&[
                b"SET",
                key.as_bytes(),
                b"1",
                b"PX",
                INSTANCE_TTL_MS.to_string().as_bytes(),
            ])
            .await
            .map(|_| ())
    }

    /// The key's quota usage.
    pub async fn used(&self, key: &str) -> Result<u64, StateError> {
        let q = self.layout.quota(key);
        let r = self.guarded(self.client.cmd(&[b"HGET", q.as_bytes(), b"used"])).await;
        match r {
            Ok(r) => Ok(r.as_i64().map_or(0, |v| u64::try_from(v).unwrap_or(0))),
            Err(e) => {
                self.failed(&e, "used");
                Err(e)
            }
        }
    }

    /// [`LocalLimiter::acquire`] in Redis, plus (with `quota_total` > 0)
    /// the quota check in the same atomic step.
    pub async fn acquire(&self, a: AcquireArgs<'_>, quota_total: u64) -> Result<Acquired, StateError> {
        let l = a.limits;
        let key = a.key.unwrap_or("-");
        let keys = [
            self.layout.global_rpm(),
            self.layout.key_rpm(key),
            self.layout.key_tpm(key),
            self.layout.key_slots(key),
            self.layout.quota(key),
        ];
        let inst_prefix = self.layout.instance("");
        let args = [
            l.global_rpm.to_string(),
            l.key_rpm.to_string(),
            l.key_tpm.to_string(),
            l.key_concurrency.to_string(),
            self.instance.clone(),
            inst_prefix,
            String::from(if a.key.is_some() { "1" } else { "0" }),
            quota_total.to_string(),
            String::from(if a.force { "1" } else { "0" }),
        ];
        let kb: Vec<&[u8]> = keys.iter().map(|s| s.as_bytes()).collect();
        let ab: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        let reply = match self.guarded(self.client.eval(&ACQUIRE, &kb, &ab)).await {
            Ok(r) => r,
            Err(e) => {
                self.failed(&e, "acquire");
                return Err(e);
            }
        };
        let Reply::Array(items) = reply else {
            let e = RedisError::Protocol(String::from("acquire: not an array"));
            self.failed(&e, "acquire");
            return Err(e);
        };
        let verdict = items.first().and_then(Reply::as_text).unwrap_or_default();
        let remaining = |v: f64| if v < 0.0 { UNLIMITED } else { v as i64 };
        let used = num(items.get(5)).max(0.0) as u64;
        if verdict == "quota" {
            return Ok(Acquired {
                status: RateLimitStatus {
                    global_remaining: UNLIMITED,
                    key_remaining: UNLIMITED,
                    concurrent_count: 0,
                },
                denial: None,
                used,
                quota_exhausted: true,
            });
        }
        let denial = LimitKind::parse(&verdict).map(|kind| LimitDenial {
            kind,
            retry_after: num(items.get(1)),
        });
        Ok(Acquired {
            status: RateLimitStatus {
                global_remaining: remaining(num(items.get(2))),
                key_remaining: if a.key.is_some() && l.key_rpm > 0 {
                    remaining(num(items.get(3)))
                } else {
                    UNLIMITED
                },
                concurrent_count: num(items.get(4)) as i64,
            },
            denial,
            used,
            quota_exhausted: false,
        })
    }

    /// Give back what [`RedisState::acquire`] took.
    pub async fn refund(&self, key: Option<&str>, limits: &LimitsConfig) {
        let k = key.unwrap_or("-");
        let keys = [
            self.layout.global_rpm(),
            self.layout.key_rpm(k),
            self.layout.key_slots(k),
        ];
        let args = [
            limits.global_rpm.to_string(),
            limits.key_rpm.to_string(),
            self.instance.clone(),
            String::from(if key.is_some() { "1" } else { "0" }),
        ];
        let kb: Vec<&[u8]> = keys.iter().map(|s| s.as_bytes()).collect();
        let ab: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        if let Err(e) = self.guarded(self.client.eval(&REFUND, &kb, &ab)).await {
            self.failed(&e, "refund");
        }
    }

    fn background<F>(&self, op: &'static str, f: F)
    where
        F: std::future::Future<Output = Result<Reply, RedisError>> + Send + 'static,
    {
        let pending = Arc::clone(&self.pending);
        let stats = Arc::clone(&self.stats);
        pending.fetch_add(1, Ordering::AcqRel);
        self.handle.spawn(async move {
            if let Err(e) = f.await {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "llmproxy::state", op, "state backend call failed: {e}");
            }
            pending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    fn release(&self, key: &str) {
        if let Some(b) = &self.batched {
            b.release(key);
            return;
        }
        let slots = self.layout.key_slots(key);
        let inst = self.instance.clone();
        let me = self.clone_client();
        self.background("release", async move {
            me.eval(&RELEASE, &[slots.as_bytes()], &[inst.as_bytes()]).await
        });
    }

    fn charge(&self, key: &str, c: &Charge<'_>, limits: &LimitsConfig) {
        let key_tpm = limits.key_tpm;
        if let Some(b) = &self.batched {
            b.charge(limits, key, c.tokens, c.billable, c.answered_ms);
            return;
        }
        if c.billable == 0 && (c.tokens == 0 || key_tpm == 0) {
            return;
        }
        let q = self.layout.quota(key);
        let tpm = self.layout.key_tpm(key);
        let me = self.clone_client();
        let args = [
            c.billable.to_string(),
            c.tokens.to_string(),
            key_tpm.to_string(),
            c.answered_ms.to_string(),
        ];
        self.background("charge", async move {
            let ab: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
            me.eval(&CHARGE, &[q.as_bytes(), tpm.as_bytes()], &ab).await
        });
    }

    fn clone_client(&self) -> Arc<RedisClient> {
        Arc::clone(&self.client)
    }

    async fn sync_keys(&self, keys: &KeySet) -> Result<(), StateError> {
        for e in keys.iter() {
            let q = self.layout.quota(&e.fingerprint);
            let cfg = e.record.used_quota.to_string();
            if let Err(err) = self.client.eval(&SYNC_KEY, &[q.as_bytes()], &[cfg.as_bytes()]).await {
                self.failed(&err, "sync_keys");
                return Err(err);
            }
        }
        Ok(())
    }
}
