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

use llmproxy_core::config::{LimitsConfig, StateConfig, StateOnError};
use llmproxy_core::hooks::RateLimitStatus;

use super::keyset::KeySet;
use super::ledger::{self, KeyUsage, Ledger, LedgerRecord};
use super::limiter::{AcquireArgs, Acquired, LimitDenial, LimitKind, LocalLimiter, UNLIMITED};
use super::resp::{self, RedisClient, RedisError, Reply, Script};

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
                let client = RedisClient::new(url, cfg.connections, Duration::from_millis(cfg.timeout_ms))
                    .map_err(|e| format!("state.url: {e}"))?;
                Ok(State::Redis(RedisState {
                    client: Arc::new(client),
                    prefix: cfg.prefix.clone(),
                    instance: resp::instance_id().to_owned(),
                    on_error: cfg.on_error,
                    handle,
                    pending: Arc::new(AtomicUsize::new(0)),
                    stats: Arc::new(StateStats::default()),
                }))
            }
        }
    }

    /// The local backend, when this is one.
    pub fn local(&self) -> Option<&LocalState> {
        match self {
            State::Local(l) => Some(l),
            State::Redis(_) => None,
        }
    }

    /// What a request gets when the backend fails.
    pub fn on_error(&self) -> StateOnError {
        match self {
            State::Local(_) => StateOnError::Deny,
            State::Redis(r) => r.on_error,
        }
    }

    /// Errors so far.
    pub fn errors(&self) -> u64 {
        match self {
            State::Local(_) => 0,
            State::Redis(r) => r.stats.errors.load(Ordering::Relaxed),
        }
    }

    /// Free a concurrency slot of `key`.
    pub fn release(&self, key: &str) {
        match self {
            State::Local(l) => l.limiter.release(key),
            State::Redis(r) => r.release(key),
        }
    }

    /// Charge a finished request: `billable` to the key's quota, `tokens`
    /// to its tokens-per-minute bucket; with a ledger, queue the record
    /// (with the local backend in the same ledger transaction as the
    /// quota change).
    pub fn charge(
        &self,
        key: Option<&str>,
        billable: u64,
        tokens: u64,
        limits: &LimitsConfig,
        record: Option<LedgerRecord>,
        ledger: Option<&Ledger>,
    ) {
        match self {
            State::Local(l) => l.charge(key, billable, tokens, limits, record, ledger),
            State::Redis(r) => {
                if let Some(k) = key {
                    r.charge(k, billable, tokens, limits.key_tpm);
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
            while r.pending.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = r.client.cmd(&[b"DEL", r.instance_key().as_bytes()]).await;
        }
    }
}

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

    fn sync_keys(&self, keys: &KeySet) {
        // Resets made by `llmproxy keys set-quota --used` while we ran.
        let stored = self
            .ledger
            .as_ref()
            .and_then(|l| ledger::open_ro(l.path()).ok())
            .and_then(|c| ledger::read_key_usage(&c).ok())
            .unwrap_or_default();
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
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

    fn charge(
        &self,
        key: Option<&str>,
        billable: u64,
        tokens: u64,
        limits: &LimitsConfig,
        record: Option<LedgerRecord>,
        ledger: Option<&Ledger>,
    ) {
        if let Some(k) = key {
            self.limiter.charge_tokens(k, tokens, limits);
        }
        match key {
            Some(k) if billable > 0 => {
                // The memory count and the ledger's queue change together, so
                // a reset (sync_keys) never falls between the two.
                let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
                match usage.get_mut(k) {
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
    prefix: String,
    instance: String,
    on_error: StateOnError,
    handle: tokio::runtime::Handle,
    pending: Arc<AtomicUsize>,
    stats: Arc<StateStats>,
}

/// Check the quota (when asked), the limits, and take a request.
/// KEYS: global rpm bucket, key rpm bucket, key tpm bucket, key slots,
/// key quota. ARGV: global_rpm, key_rpm, key_tpm, key_concurrency,
/// instance, instance key prefix, has_key, quota_total (0: no check), force.
static ACQUIRE: Script = Script::new(
    r#"
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local grpm, krpm, ktpm, kconc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local has_key = ARGV[7] == '1'
local quota_total = tonumber(ARGV[8])
local force = ARGV[9] == '1'
local used = 0
if has_key then used = tonumber(redis.call('HGET', KEYS[5], 'used') or '0') end
if quota_total > 0 and used >= quota_total then
  return {'quota', '0', '-1', '-1', '0', tostring(used)}
end
local function refill(key, limit)
  local v = redis.call('HMGET', key, 't', 'ts', 'c')
  local t, ts, c = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  if t == nil or ts == nil then return limit end
  -- Filled for another limit (a reload changed it): keep what was used
  -- of the old one, so a raised limit admits at once (ADR 041).
  if c and c ~= limit then
    t = t + (limit - c)
    if t > limit then t = limit end
  end
  local dt = now - ts
  if dt < 0 then dt = 0 end
  t = t + dt * limit / 60000
  if t > limit then t = limit end
  return t
end
local function save(key, t, limit)
  redis.call('HSET', key, 't', tostring(t), 'ts', tostring(now), 'c', tostring(limit))
  local ttl = 60000
  if t < limit then ttl = ttl + math.ceil((limit - t) * 60000 / limit) end
  redis.call('PEXPIRE', key, ttl)
end
local deny, retry = '', 0
local function refuse(kind, wait)
  if deny == '' then deny = kind; retry = wait end
end
local g, k, tp
if grpm > 0 then
  g = refill(KEYS[1], grpm)
  if g < 1 then refuse('global_rpm', (1 - g) * 60 / grpm) end
end
if has_key and krpm > 0 then
  k = refill(KEYS[2], krpm)
  if k < 1 then refuse('key_rpm', (1 - k) * 60 / krpm) end
end
if has_key and ktpm > 0 then
  tp = refill(KEYS[3], ktpm)
  if tp <= 0 then refuse('key_tpm', (1 - tp) * 60 / ktpm) end
end
local conc = 0
if has_key then
  local h = redis.call('HGETALL', KEYS[4])
  for i = 1, #h, 2 do
    if redis.call('EXISTS', ARGV[6] .. h[i]) == 1 then
      conc = conc + tonumber(h[i + 1])
    else
      redis.call('HDEL', KEYS[4], h[i])
    end
  end
  if kconc > 0 and conc >= kconc then refuse('key_concurrency', 1) end
end
if deny == '' or force then
  if g then g = g - 1 end
  if k then k = k - 1 end
  if has_key then
    redis.call('HINCRBY', KEYS[4], ARGV[5], 1)
    redis.call('PEXPIRE', KEYS[4], 86400000)
    conc = conc + 1
  end
  if force then deny = '' end
end
local grem, krem = -1, -1
if g then save(KEYS[1], g, grpm); grem = math.max(0, math.floor(g)) end
if k then save(KEYS[2], k, krpm); krem = math.max(0, math.floor(k)) end
if tp then save(KEYS[3], tp, ktpm) end
if deny == '' then deny = 'ok' end
return {deny, tostring(retry), tostring(grem), tostring(krem), tostring(conc), tostring(used)}
"#,
);

/// Give back one request. KEYS: global rpm, key rpm, key slots. ARGV:
/// global_rpm, key_rpm, instance, has_key.
static REFUND: Script = Script::new(
    r#"
local function give(key, limit)
  if limit > 0 then
    local t = tonumber(redis.call('HGET', key, 't'))
    if t then
      t = t + 1
      if t > limit then t = limit end
      redis.call('HSET', key, 't', tostring(t))
    end
  end
end
give(KEYS[1], tonumber(ARGV[1]))
if ARGV[4] == '1' then
  give(KEYS[2], tonumber(ARGV[2]))
  local n = redis.call('HINCRBY', KEYS[3], ARGV[3], -1)
  if n <= 0 then redis.call('HDEL', KEYS[3], ARGV[3]) end
end
return 1
"#,
);

/// Free a slot. KEYS: key slots. ARGV: instance.
static RELEASE: Script = Script::new(
    r#"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"#,
);

/// Charge a finished request. KEYS: key quota, key tpm bucket. ARGV:
/// billable, tokens, key_tpm.
static CHARGE: Script = Script::new(
    r#"
local used = redis.call('HINCRBY', KEYS[1], 'used', tonumber(ARGV[1]))
local ktpm, tokens = tonumber(ARGV[3]), tonumber(ARGV[2])
if ktpm > 0 and tokens > 0 then
  local tm = redis.call('TIME')
  local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
  local v = redis.call('HMGET', KEYS[2], 't', 'ts', 'c')
  local t, ts, c = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  if t == nil or ts == nil then t = ktpm; ts = now end
  if c and c ~= ktpm then
    t = t + (ktpm - c)
    if t > ktpm then t = ktpm end
  end
  local dt = now - ts
  if dt < 0 then dt = 0 end
  t = t + dt * ktpm / 60000
  if t > ktpm then t = ktpm end
  t = t - tokens
  redis.call('HSET', KEYS[2], 't', tostring(t), 'ts', tostring(now), 'c', tostring(ktpm))
  redis.call('PEXPIRE', KEYS[2], 60000 + math.ceil((ktpm - t) * 60000 / ktpm))
end
return used
"#,
);

/// Start or reset a key's usage. KEYS: key quota. ARGV: configured used.
static SYNC_KEY: Script = Script::new(
    r#"
local cfg = redis.call('HGET', KEYS[1], 'cfg')
if cfg ~= ARGV[1] then
  redis.call('HSET', KEYS[1], 'used', ARGV[1], 'cfg', ARGV[1])
  return tonumber(ARGV[1])
end
return tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
"#,
);

fn num(r: Option<&Reply>) -> f64 {
    r.and_then(Reply::as_text)
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(0.0)
}

impl RedisState {
    fn k(&self, parts: &[&str]) -> String {
        let mut s = self.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                s.push(':');
            }
            s.push_str(p);
        }
        s
    }

    fn instance_key(&self) -> String {
        self.k(&["inst", &self.instance])
    }

    fn failed(&self, e: &RedisError, op: &str) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: "llmproxy::state", op, "state backend call failed: {e}");
    }

    /// Announce this instance (its concurrency slots count while the
    /// announcement lives, 15 s), now and every 5 s from a task.
    pub async fn heartbeat_once(&self) -> Result<(), StateError> {
        let key = self.instance_key();
        self.client
            .cmd(&[b"SET", key.as_bytes(), b"1", b"PX", b"15000"])
            .await
            .map(|_| ())
    }

    /// The key's quota usage.
    pub async fn used(&self, key: &str) -> Result<u64, StateError> {
        let q = self.k(&["q", key]);
        let r = self.client.cmd(&[b"HGET", q.as_bytes(), b"used"]).await;
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
            self.k(&["g", "rpm"]),
            self.k(&["k", key, "rpm"]),
            self.k(&["k", key, "tpm"]),
            self.k(&["k", key, "slots"]),
            self.k(&["q", key]),
        ];
        let inst_prefix = self.k(&["inst", ""]);
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
        let reply = match self.client.eval(&ACQUIRE, &kb, &ab).await {
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
            self.k(&["g", "rpm"]),
            self.k(&["k", k, "rpm"]),
            self.k(&["k", k, "slots"]),
        ];
        let args = [
            limits.global_rpm.to_string(),
            limits.key_rpm.to_string(),
            self.instance.clone(),
            String::from(if key.is_some() { "1" } else { "0" }),
        ];
        let kb: Vec<&[u8]> = keys.iter().map(|s| s.as_bytes()).collect();
        let ab: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        if let Err(e) = self.client.eval(&REFUND, &kb, &ab).await {
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
        let slots = self.k(&["k", key, "slots"]);
        let inst = self.instance.clone();
        let me = self.clone_client();
        self.background("release", async move {
            me.eval(&RELEASE, &[slots.as_bytes()], &[inst.as_bytes()]).await
        });
    }

    fn charge(&self, key: &str, billable: u64, tokens: u64, key_tpm: u64) {
        if billable == 0 && (tokens == 0 || key_tpm == 0) {
            return;
        }
        let q = self.k(&["q", key]);
        let tpm = self.k(&["k", key, "tpm"]);
        let me = self.clone_client();
        let args = [billable.to_string(), tokens.to_string(), key_tpm.to_string()];
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
            let q = self.k(&["q", &e.fingerprint]);
            let cfg = e.record.used_quota.to_string();
            if let Err(err) = self.client.eval(&SYNC_KEY, &[q.as_bytes()], &[cfg.as_bytes()]).await {
                self.failed(&err, "sync_keys");
                return Err(err);
            }
        }
        Ok(())
    }
}
