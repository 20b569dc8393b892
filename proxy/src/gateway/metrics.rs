//! Prometheus metrics, written in the text exposition format by hand
//! (docs/adr/012-metrics-text-format.md).
//!
//! Hot-path updates are relaxed atomics; label sets that are only known at
//! run time (backend x status) live in a small mutex-protected map.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use llmproxy_core::policy::metrics as catalog;
use llmproxy_core::policy::metrics::{AUTH_REASONS, HOOK_BUCKETS, RATE_REASONS, UPSTREAM_BUCKETS};
use llmproxy_core::pool::PoolStats;
use llmproxy_core::{ErrorKind, HookName};

/// A histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let le = catalog::le(*b);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Per-hook counters.
#[derive(Debug)]
struct HookMetrics {
    calls: AtomicU64,
    errors: [AtomicU64; 6],
    latency: Histogram,
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    backends: Vec<String>,
    /// Per backend index (the last slot: no backend), status -> count.
    requests: Vec<Mutex<BTreeMap<u16, u64>>>,
    upstream_latency: Vec<Histogram>,
    hooks: Vec<HookMetrics>,
    retries: AtomicU64,
    active_streams: AtomicI64,
    /// Per backend index, per [`USAGE_KINDS`]: an f64 sum as bits.
    usage_tokens: Vec<[AtomicU64; USAGE_KINDS.len()]>,
    auth_denied: [AtomicU64; AUTH_REASONS.len()],
    rate_limited: [AtomicU64; RATE_REASONS.len()],
    reloads: [AtomicU64; 2],
    generation: AtomicU64,
    /// Bounds on what clients and upstreams control.
    pub bounds: Bounds,
}

/// Counters of the bounds on sizes and times that clients and upstreams
/// control (docs/adr/036-bounds-before-the-body.md).
#[derive(Debug, Default)]
pub struct Bounds {
    /// Client connections open now.
    pub connections_open: AtomicI64,
    /// Connections refused over `gateway.max_connections`.
    pub connections_refused: AtomicU64,
    /// Request bodies that did not arrive within `gateway.body_read_timeout_ms`.
    pub body_timeouts: AtomicU64,
    /// Client connections dropped after a write blocked longer than
    /// `gateway.write_timeout_ms`.
    pub write_timeouts: AtomicU64,
    /// Upstream SSE events over `gateway.max_event_bytes`.
    pub events_too_large: AtomicU64,
    /// Usage records whose tokens were estimated (no usage from the backend).
    pub usage_estimated: AtomicU64,
}

/// The hook queue as `/metrics` shows it: jobs queued now, refused because
/// the queue was full, cancelled because they did not start in time.
#[derive(Debug, Clone, Copy, Default)]
pub struct HookQueueGauges {
    /// Jobs queued now.
    pub queued: usize,
    /// Jobs refused (queue full).
    pub queue_full: u64,
    /// Jobs cancelled (deadline).
    pub expired: u64,
    /// Jobs tried inline that went to a hook thread, by reason
    /// (`llmproxy_core::inline::Overrun::ALL` order).
    pub offloaded: [u64; 3],
}

/// Account-path gauges read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccountGauges {
    /// Ledger records committed, transactions, failures, producer waits,
    /// records queued; `None` without a ledger.
    pub ledger: Option<[u64; 5]>,
    /// Failed calls to the state backend.
    pub state_errors: u64,
    /// Calls to the state backend the breaker skipped.
    pub state_skipped: u64,
    /// With Redis state: settlement rounds answered, failed, and requests
    /// admitted on this node's limits alone while Redis was unreachable.
    pub state_settlements: Option<[u64; 3]>,
}

/// The kinds of `llmproxy_usage_total`.
pub const USAGE_KINDS: [&str; 5] = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "billable_tokens",
    "cost",
];

/// The `# HELP` and `# TYPE` lines of the catalog's family `name`
/// (core's `policy::metrics`, which nginx prints from too).
pub(crate) fn head(out: &mut String, name: &str) {
    if let Some(family) = catalog::find(name) {
        out.push_str(&catalog::header(family));
    }
}

/// Label used when no backend was involved.
pub const NO_BACKEND: &str = "none";

impl Metrics {
    /// Metrics for the given backend names (index = backend index).
    pub fn new(backends: Vec<String>) -> Self {
        let backends_len = backends.len();
        Metrics {
            upstream_latency: backends.iter().map(|_| Histogram::new(&UPSTREAM_BUCKETS)).collect(),
            requests: (0..=backends.len()).map(|_| Mutex::new(BTreeMap::new())).collect(),
            backends,
            hooks: (0..7)
                .map(|_| HookMetrics {
                    calls: AtomicU64::new(0),
                    errors: Default::default(),
                    latency: Histogram::new(&HOOK_BUCKETS),
                })
                .collect(),
            retries: AtomicU64::new(0),
            active_streams: AtomicI64::new(0),
            usage_tokens: (0..=backends_len).map(|_| Default::default()).collect(),
            auth_denied: Default::default(),
            rate_limited: Default::default(),
            reloads: Default::default(),
            generation: AtomicU64::new(1),
            bounds: Bounds::default(),
        }
    }

    /// Append the bounds counters and the hook queue.
    pub fn render_bounds(&self, out: &mut String, q: HookQueueGauges) {
        let b = &self.bounds;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut one = |name: &str, v: String| {
            head(out, name);
            let _ = writeln!(out, "{name} {v}");
        };
        one(
            "llmproxy_connections_open",
            b.connections_open.load(Ordering::Relaxed).to_string(),
        );
        one(
            "llmproxy_connections_refused_total",
            r(&b.connections_refused).to_string(),
        );
        one("llmproxy_body_timeouts_total", r(&b.body_timeouts).to_string());
        one("llmproxy_write_timeouts_total", r(&b.write_timeouts).to_string());
        one(
            "llmproxy_sse_events_too_large_total",
            r(&b.events_too_large).to_string(),
        );
        one("llmproxy_usage_estimated_total", r(&b.usage_estimated).to_string());
        one("llmproxy_hook_queue_depth", q.queued.to_string());
        head(out, "llmproxy_hook_jobs_rejected_total");
        let _ = writeln!(
            out,
            "llmproxy_hook_jobs_rejected_total{{reason=\"queue_full\"}} {}\n\
             llmproxy_hook_jobs_rejected_total{{reason=\"deadline\"}} {}",
            q.queue_full, q.expired
        );
        head(out, "llmproxy_hook_jobs_offloaded_total");
        for (reason, n) in llmproxy_core::inline::Overrun::ALL.iter().zip(q.offloaded) {
            let _ = writeln!(
                out,
                "llmproxy_hook_jobs_offloaded_total{{reason=\"{}\"}} {n}",
                reason.as_str()
            );
        }
    }

    /// The auth stage refused a request (`reason` from [`AUTH_REASONS`]).
    pub fn auth_denied(&self, reason: &str) {
        if let Some(i) = AUTH_REASONS.iter().position(|r| *r == reason) {
            self.auth_denied[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The rate limit stage refused a request (`reason` from [`RATE_REASONS`]).
    pub fn rate_limited(&self, reason: &str) {
        if let Some(i) = RATE_REASONS.iter().position(|r| *r == reason) {
            self.rate_limited[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A reload was applied (`ok`) or rejected; `generation` is the one
    /// serving now.
    pub fn reload(&self, ok: bool, generation: u64) {
        self.reloads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Relaxed);
    }

    /// Reloads applied and rejected so far.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads[0].load(Ordering::Relaxed),
            self.reloads[1].load(Ordering::Relaxed),
        )
    }

    /// The exposition text of the account path (appended to [`Metrics::render`]).
    pub fn render_accounts(&self, out: &mut String, g: AccountGauges) {
        head(out, "llmproxy_auth_denied_total");
        for (r, n) in AUTH_REASONS.iter().zip(&self.auth_denied) {
            let _ = writeln!(
                out,
                "llmproxy_auth_denied_total{{reason=\"{r}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        head(out, "llmproxy_rate_limited_total");
        for (r, n) in RATE_REASONS.iter().zip(&self.rate_limited) {
            let _ = writeln!(
                out,
                "llmproxy_rate_limited_total{{reason=\"{r}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        head(out, "llmproxy_reloads_total");
        let (ok, failed) = self.reloads();
        let _ = writeln!(out, "llmproxy_reloads_total{{result=\"ok\"}} {ok}");
        let _ = writeln!(out, "llmproxy_reloads_total{{result=\"failed\"}} {failed}");
        head(out, "llmproxy_config_generation");
        let _ = writeln!(
            out,
            "llmproxy_config_generation {}",
            self.generation.load(Ordering::Relaxed)
        );
        if let Some([written, batches, failed, waits, pending]) = g.ledger {
            head(out, "llmproxy_ledger_records_total");
            let _ = writeln!(out, "llmproxy_ledger_records_total {written}");
            head(out, "llmproxy_ledger_batches_total");
            let _ = writeln!(out, "llmproxy_ledger_batches_total {batches}");
            head(out, "llmproxy_ledger_failed_total");
            let _ = writeln!(out, "llmproxy_ledger_failed_total {failed}");
            head(out, "llmproxy_ledger_backpressure_total");
            let _ = writeln!(out, "llmproxy_ledger_backpressure_total {waits}");
            head(out, "llmproxy_ledger_pending");
            let _ = writeln!(out, "llmproxy_ledger_pending {pending}");
        }
        head(out, "llmproxy_state_errors_total");
        let _ = writeln!(out, "llmproxy_state_errors_total {}", g.state_errors);
        head(out, "llmproxy_state_skipped_total");
        let _ = writeln!(out, "llmproxy_state_skipped_total {}", g.state_skipped);
        if let Some([ok, failed, fail_open]) = g.state_settlements {
            head(out, "llmproxy_state_settlements_total");
            let _ = writeln!(out, "llmproxy_state_settlements_total{{result=\"ok\"}} {ok}");
            let _ = writeln!(out, "llmproxy_state_settlements_total{{result=\"failed\"}} {failed}");
            head(out, "llmproxy_state_fail_open_total");
            let _ = writeln!(out, "llmproxy_state_fail_open_total {fail_open}");
        }
    }

    /// One finished request, by backend index (`None`: no backend).
    pub fn request(&self, backend: Option<usize>, status: u16) {
        let slot = backend
            .filter(|i| *i < self.backends.len())
            .unwrap_or(self.backends.len());
        let mut map = self.requests[slot].lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(status).or_insert(0) += 1;
    }

    /// Upstream latency of one attempt on backend `index`.
    pub fn upstream_latency(&self, index: usize, d: Duration) {
        if let Some(h) = self.upstream_latency.get(index) {
            h.observe(d);
        }
    }

    /// One hook call and how it ended.
    pub fn hook_call(&self, hook: HookName, d: Duration, error: Option<ErrorKind>) {
        let m = &self.hooks[hook.index()];
        m.calls.fetch_add(1, Ordering::Relaxed);
        m.latency.observe(d);
        if let Some(kind) = error {
            if let Some(i) = ErrorKind::ALL.iter().position(|k| *k == kind) {
                m.errors[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// One retry on another backend.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A stream started (`+1`) or ended (`-1`).
    pub fn streams(&self, delta: i64) {
        self.active_streams.fetch_add(delta, Ordering::Relaxed);
    }

    /// Streams being relayed now.
    pub fn active_streams(&self) -> i64 {
        self.active_streams.load(Ordering::Relaxed)
    }

    /// Tokens (and cost) recorded by the usage stage, by backend index and
    /// kind (one of [`USAGE_KINDS`]); lock-free.
    pub fn usage(&self, backend: usize, kind: &'static str, amount: f64) {
        let (Some(slots), Some(k)) = (
            self.usage_tokens.get(backend),
            USAGE_KINDS.iter().position(|x| *x == kind),
        ) else {
            return;
        };
        let cell = &slots[k];
        let mut cur = cell.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + amount).to_bits();
            match cell.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(v) => cur = v,
            }
        }
    }

    /// Errors of `hook` of the given kind so far.
    pub fn hook_errors(&self, hook: HookName, kind: ErrorKind) -> u64 {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.hooks[hook.index()].errors[i].load(Ordering::Relaxed)
    }

    /// The exposition text.
    pub fn render(&self, pool: PoolStats, backends: &[(String, bool, f64, u64)]) -> String {
        let mut out = String::with_capacity(16 << 10);
        head(&mut out, "llmproxy_requests_total");
        for (slot, map) in self.requests.iter().enumerate() {
            let backend = self.backends.get(slot).map_or(NO_BACKEND, String::as_str);
            for (status, n) in map.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = writeln!(
                    out,
                    "llmproxy_requests_total{{backend=\"{}\",status=\"{status}\"}} {n}",
                    escape(backend)
                );
            }
        }
        head(&mut out, "llmproxy_upstream_latency_seconds");
        for (name, h) in self.backends.iter().zip(&self.upstream_latency) {
            h.write(
                &mut out,
                "llmproxy_upstream_latency_seconds",
                &format!("backend=\"{}\"", escape(name)),
            );
        }
        head(&mut out, "llmproxy_hook_calls_total");
        for hook in HookName::ALL {
            let m = &self.hooks[hook.index()];
            let _ = writeln!(
                out,
                "llmproxy_hook_calls_total{{hook=\"{hook}\"}} {}",
                m.calls.load(Ordering::Relaxed)
            );
        }
        head(&mut out, "llmproxy_hook_errors_total");
        for hook in HookName::ALL {
            let m = &self.hooks[hook.index()];
            for (kind, n) in ErrorKind::ALL.iter().zip(&m.errors) {
                let _ = writeln!(
                    out,
                    "llmproxy_hook_errors_total{{hook=\"{hook}\",kind=\"{kind}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        head(&mut out, "llmproxy_hook_duration_seconds");
        for hook in HookName::ALL {
            self.hooks[hook.index()].latency.write(
                &mut out,
                "llmproxy_hook_duration_seconds",
                &format!("hook=\"{hook}\""),
            );
        }
        head(&mut out, "llmproxy_retries_total");
        let _ = writeln!(out, "llmproxy_retries_total {}", self.retries.load(Ordering::Relaxed));
        head(&mut out, "llmproxy_active_streams");
        let _ = writeln!(out, "llmproxy_active_streams {}", self.active_streams());
        head(&mut out, "llmproxy_usage_total");
        for (i, slots) in self.usage_tokens.iter().enumerate() {
            let backend = self.backends.get(i).map_or(NO_BACKEND, String::as_str);
            for (kind, cell) in USAGE_KINDS.iter().zip(slots) {
                let v = f64::from_bits(cell.load(Ordering::Relaxed));
                if v != 0.0 {
                    let _ = writeln!(
                        out,
                        "llmproxy_usage_total{{backend=\"{}\",kind=\"{kind}\"}} {v}",
                        escape(backend)
                    );
                }
            }
        }
        head(&mut out, "llmproxy_backend_healthy");
        for (name, healthy, _, _) in backends {
            let _ = writeln!(
                out,
                "llmproxy_backend_healthy{{backend=\"{}\"}} {}",
                escape(name),
                u8::from(*healthy)
            );
        }
        head(&mut out, "llmproxy_backend_latency_ewma_ms");
        for (name, _, latency, _) in backends {
            let _ = writeln!(
                out,
                "llmproxy_backend_latency_ewma_ms{{backend=\"{}\"}} {latency}",
                escape(name)
            );
        }
        head(&mut out, "llmproxy_backend_active_connections");
        for (name, _, _, active) in backends {
            let _ = writeln!(
                out,
                "llmproxy_backend_active_connections{{backend=\"{}\"}} {active}",
                escape(name)
            );
        }
        head(&mut out, "llmproxy_vm_pool");
        for (what, v) in [
            ("capacity", pool.capacity as u64),
            ("alive", pool.alive as u64),
            ("idle", pool.idle as u64),
            ("created", pool.created),
            ("discarded", pool.discarded),
            ("recycled", pool.recycled),
        ] {
            let _ = writeln!(out, "llmproxy_vm_pool{{stat=\"{what}\"}} {v}");
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `llmproxy_hook_ignored_fields_total{hook}`: fields scripts returned that
/// their hook does not use (ignored, logged once per script and field). The
/// count is the serving engine's, so it starts again after a reload.
pub fn render_ignored_fields(out: &mut String, engine: &llmproxy_core::Engine) {
    head(out, "llmproxy_hook_ignored_fields_total");
    for hook in HookName::ALL {
        let _ = writeln!(
            out,
            "llmproxy_hook_ignored_fields_total{{hook=\"{hook}\"}} {}",
            engine.ignored_fields(hook)
        );
    }
}
