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

use llmproxy_core::pool::PoolStats;
use llmproxy_core::{ErrorKind, HookName};

/// Upper bounds (seconds) of the upstream latency histogram.
const UPSTREAM_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds (seconds) of the hook latency histogram.
const HOOK_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1,
];

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
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
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
    usage_tokens: Mutex<BTreeMap<(String, &'static str), f64>>,
}

/// Label used when no backend was involved.
pub const NO_BACKEND: &str = "none";

impl Metrics {
    /// Metrics for the given backend names (index = backend index).
    pub fn new(backends: Vec<String>) -> Self {
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
            usage_tokens: Mutex::new(BTreeMap::new()),
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

    /// Tokens (and cost) recorded by the usage stage.
    pub fn usage(&self, backend: &str, kind: &'static str, amount: f64) {
        let mut map = self.usage_tokens.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((backend.to_owned(), kind)).or_insert(0.0) += amount;
    }

    /// Errors of `hook` of the given kind so far.
    pub fn hook_errors(&self, hook: HookName, kind: ErrorKind) -> u64 {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.hooks[hook.index()].errors[i].load(Ordering::Relaxed)
    }

    /// The exposition text.
    pub fn render(&self, pool: PoolStats, backends: &[(String, bool, f64, u64)]) -> String {
        let mut out = String::with_capacity(16 << 10);
        out.push_str("# HELP llmproxy_requests_total Requests answered, by backend and status.\n");
        out.push_str("# TYPE llmproxy_requests_total counter\n");
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
        out.push_str("# HELP llmproxy_upstream_latency_seconds Upstream latency per attempt (to the whole body; to the first event for streams).\n");
        out.push_str("# TYPE llmproxy_upstream_latency_seconds histogram\n");
        for (name, h) in self.backends.iter().zip(&self.upstream_latency) {
            h.write(
                &mut out,
                "llmproxy_upstream_latency_seconds",
                &format!("backend=\"{}\"", escape(name)),
            );
        }
        out.push_str("# HELP llmproxy_hook_calls_total Hook calls.\n");
        out.push_str("# TYPE llmproxy_hook_calls_total counter\n");
        for hook in HookName::ALL {
            let m = &self.hooks[hook.index()];
            let _ = writeln!(
                out,
                "llmproxy_hook_calls_total{{hook=\"{hook}\"}} {}",
                m.calls.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP llmproxy_hook_errors_total Failed hook calls, by kind.\n");
        out.push_str("# TYPE llmproxy_hook_errors_total counter\n");
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
        out.push_str("# HELP llmproxy_hook_duration_seconds Hook call latency, queueing included.\n");
        out.push_str("# TYPE llmproxy_hook_duration_seconds histogram\n");
        for hook in HookName::ALL {
            self.hooks[hook.index()].latency.write(
                &mut out,
                "llmproxy_hook_duration_seconds",
                &format!("hook=\"{hook}\""),
            );
        }
        out.push_str("# HELP llmproxy_retries_total Attempts retried on another backend.\n");
        out.push_str("# TYPE llmproxy_retries_total counter\n");
        let _ = writeln!(out, "llmproxy_retries_total {}", self.retries.load(Ordering::Relaxed));
        out.push_str("# HELP llmproxy_active_streams Streams being relayed.\n");
        out.push_str("# TYPE llmproxy_active_streams gauge\n");
        let _ = writeln!(out, "llmproxy_active_streams {}", self.active_streams());
        out.push_str("# HELP llmproxy_usage_total Usage recorded after the usage hook (tokens, cost).\n");
        out.push_str("# TYPE llmproxy_usage_total counter\n");
        for ((backend, kind), v) in self.usage_tokens.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "llmproxy_usage_total{{backend=\"{}\",kind=\"{kind}\"}} {v}",
                escape(backend)
            );
        }
        out.push_str("# HELP llmproxy_backend_healthy Whether the backend is considered healthy.\n");
        out.push_str("# TYPE llmproxy_backend_healthy gauge\n");
        for (name, healthy, _, _) in backends {
            let _ = writeln!(
                out,
                "llmproxy_backend_healthy{{backend=\"{}\"}} {}",
                escape(name),
                u8::from(*healthy)
            );
        }
        out.push_str("# HELP llmproxy_backend_latency_ewma_ms Latency EWMA the balancer and routing scripts see.\n");
        out.push_str("# TYPE llmproxy_backend_latency_ewma_ms gauge\n");
        for (name, _, latency, _) in backends {
            let _ = writeln!(
                out,
                "llmproxy_backend_latency_ewma_ms{{backend=\"{}\"}} {latency}",
                escape(name)
            );
        }
        out.push_str("# HELP llmproxy_backend_active_connections Requests in flight per backend.\n");
        out.push_str("# TYPE llmproxy_backend_active_connections gauge\n");
        for (name, _, _, active) in backends {
            let _ = writeln!(
                out,
                "llmproxy_backend_active_connections{{backend=\"{}\"}} {active}",
                escape(name)
            );
        }
        out.push_str("# HELP llmproxy_vm_pool VM pool counters of the engine.\n");
        out.push_str("# TYPE llmproxy_vm_pool gauge\n");
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
