//! The metric catalog: every Prometheus family a host exports, with its
//! type, help text and labels. The gateway (`proxy/src/gateway/metrics.rs`)
//! and the nginx module (`resty.llmproxy.metrics`, through
//! `llmproxy.metric_headers()`) write each family's `# HELP` and `# TYPE`
//! lines from here, so a dashboard built on one host reads the other; the
//! tests of both hosts check every family they print against [`FAMILIES`].
//!
//! Some families exist in one host only (the gateway's connection and
//! reload counters; nginx has no reloads of its own, and its ledger drops
//! a record where the gateway's waits) and are marked so.

/// A family's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// A value now.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

impl Kind {
    /// The word of a `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Which hosts export a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hosts {
    /// The gateway and nginx.
    Both,
    /// The standalone gateway only.
    Gateway,
    /// The nginx module only.
    Nginx,
}

/// One metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// The metric name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Label names of its samples (histograms add `le`).
    pub labels: &'static [&'static str],
    /// Who exports it.
    pub hosts: Hosts,
}

const fn family(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    labels: &'static [&'static str],
    hosts: Hosts,
) -> Family {
    Family {
        name,
        kind,
        help,
        labels,
        hosts,
    }
}

use Hosts::{Both, Gateway, Nginx};
use Kind::{Counter, Gauge, Histogram};

/// Every family, in the order hosts print them.
pub const FAMILIES: &[Family] = &[
    family(
        "llmproxy_requests_total",
        Counter,
        "Requests answered, by backend and status.",
        &["backend", "status"],
        Both,
    ),
    family(
        "llmproxy_upstream_latency_seconds",
        Histogram,
        "Upstream latency per attempt (to the whole body; to the first event for streams).",
        &["backend"],
        Both,
    ),
    family("llmproxy_hook_calls_total", Counter, "Hook calls.", &["hook"], Both),
    family(
        "llmproxy_hook_errors_total",
        Counter,
        "Failed hook calls, by kind.",
        &["hook", "kind"],
        Both,
    ),
    family(
        "llmproxy_hook_duration_seconds",
        Histogram,
        "Hook call latency, queueing included.",
        &["hook"],
        Both,
    ),
    family(
        "llmproxy_retries_total",
        Counter,
        "Attempts retried on another backend.",
        &[],
        Both,
    ),
    family("llmproxy_active_streams", Gauge, "Streams being relayed.", &[], Both),
    family(
        "llmproxy_usage_total",
        Counter,
        "Usage recorded after the usage hook (tokens, cost).",
        &["backend", "kind"],
        Both,
    ),
    family(
        "llmproxy_backend_healthy",
        Gauge,
        "Whether the backend is considered healthy.",
        &["backend"],
        Both,
    ),
    family(
        "llmproxy_backend_latency_ewma_ms",
        Gauge,
        "Latency EWMA the balancer and routing scripts see.",
        &["backend"],
        Both,
    ),
    family(
        "llmproxy_backend_active_connections",
        Gauge,
        "Requests in flight per backend.",
        &["backend"],
        Both,
    ),
    family(
        "llmproxy_vm_pool",
        Gauge,
        "VM pool counters of the engine.",
        &["stat"],
        Both,
    ),
    family(
        "llmproxy_hook_ignored_fields_total",
        Counter,
        "Result fields a hook does not use, ignored (per engine: restarts on reload).",
        &["hook"],
        Both,
    ),
    family(
        "llmproxy_auth_denied_total",
        Counter,
        "Requests refused by the auth stage, by reason.",
        &["reason"],
        Both,
    ),
    family(
        "llmproxy_rate_limited_total",
        Counter,
        "Requests refused by the rate limit stage, by reason.",
        &["reason"],
        Both,
    ),
    family(
        "llmproxy_reloads_total",
        Counter,
        "Configuration reloads, applied or rejected.",
        &["result"],
        Gateway,
    ),
    family(
        "llmproxy_config_generation",
        Gauge,
        "The configuration generation serving requests.",
        &[],
        Gateway,
    ),
    family(
        "llmproxy_ledger_records_total",
        Counter,
        "Usage records committed to the ledger.",
        &[],
        Both,
    ),
    family(
        "llmproxy_ledger_batches_total",
        Counter,
        "Ledger transactions committed.",
        &[],
        Both,
    ),
    family(
        "llmproxy_ledger_failed_total",
        Counter,
        "Usage records the ledger could not write.",
        &[],
        Both,
    ),
    family(
        "llmproxy_ledger_backpressure_total",
        Counter,
        "Times a producer waited for a full ledger queue.",
        &[],
        Gateway,
    ),
    family(
        "llmproxy_ledger_dropped_total",
        Counter,
        "Usage records dropped because the ledger queue was full (log() never waits).",
        &[],
        Nginx,
    ),
    family(
        "llmproxy_ledger_pending",
        Gauge,
        "Usage records queued, not yet committed.",
        &[],
        Both,
    ),
    family(
        "llmproxy_state_errors_total",
        Counter,
        "Failed calls to the state backend.",
        &[],
        Both,
    ),
    family(
        "llmproxy_state_skipped_total",
        Counter,
        "Calls to the state backend not made: its circuit breaker was open.",
        &[],
        Both,
    ),
    family(
        "llmproxy_state_settlements_total",
        Counter,
        "Settlement rounds of a batched node with Redis (state.mode: batched), by result.",
        &["result"],
        Gateway,
    ),
    family(
        "llmproxy_state_fail_open_total",
        Counter,
        "Requests a batched node admitted on its own limits while Redis was unreachable (state.on_error: allow).",
        &[],
        Gateway,
    ),
    family(
        "llmproxy_connections_open",
        Gauge,
        "Client connections open now.",
        &[],
        Gateway,
    ),
    family(
        "llmproxy_connections_refused_total",
        Counter,
        "Client connections refused over gateway.max_connections.",
        &[],
        Gateway,
    ),
    family(
        "llmproxy_body_timeouts_total",
        Counter,
        "Request bodies not received within gateway.body_read_timeout_ms (408).",
        &[],
        Gateway,
    ),
    family(
        "llmproxy_write_timeouts_total",
        Counter,
        "Client connections dropped after a write blocked over gateway.write_timeout_ms.",
        &[],
        Gateway,
    ),
    family(
        "llmproxy_sse_events_too_large_total",
        Counter,
        "Upstream SSE events over gateway.max_event_bytes (the stream was ended).",
        &[],
        Both,
    ),
    family(
        "llmproxy_usage_estimated_total",
        Counter,
        "Usage records with estimated tokens (the backend's usage never came).",
        &[],
        Both,
    ),
    family(
        "llmproxy_hook_queue_depth",
        Gauge,
        "Hook jobs waiting for a hook thread.",
        &[],
        Gateway,
    ),
    family(
        "llmproxy_worker_connections_total",
        Counter,
        "Client connections handed to each connection worker (gateway.workers).",
        &["worker"],
        Gateway,
    ),
    family(
        "llmproxy_hook_jobs_offloaded_total",
        Counter,
        "Hook jobs tried inline that ran on a hook thread: over_budget (stopped at gateway.inline_budget_ms), slow_hook (its hook overran lately), no_idle_vm.",
        &["reason"],
        Gateway,
    ),
    family(
        "llmproxy_auth_failures_total",
        Counter,
        "Failed API key and admin token checks.",
        &["kind"],
        Both,
    ),
    family(
        "llmproxy_auth_throttled_total",
        Counter,
        "Requests answered 429 because their address failed too many checks.",
        &["kind"],
        Both,
    ),
    family(
        "llmproxy_auth_throttle_clients",
        Gauge,
        "Client addresses with recent failed checks.",
        &["kind"],
        Gateway,
    ),
    family(
        "llmproxy_hook_jobs_rejected_total",
        Counter,
        "Hook jobs refused with 503 hooks_overloaded, by reason.",
        &["reason"],
        Gateway,
    ),
];

/// The family called `name`.
pub fn find(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// Upper bounds (seconds) of `llmproxy_upstream_latency_seconds`.
pub const UPSTREAM_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds (seconds) of `llmproxy_hook_duration_seconds`.
pub const HOOK_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1,
];

/// The `le` label of a bucket's upper bound, as every host writes it.
pub fn le(bound: f64) -> String {
    bound.to_string()
}

/// Why the auth stage refused a request: the `reason` values of
/// `llmproxy_auth_denied_total` (a standard check's
/// [`crate::admission::Denial`] reason, the script's, a failed hook's).
pub const AUTH_REASONS: [&str; 7] = [
    "invalid_key",
    "disabled",
    "expired",
    "ip_not_allowed",
    "quota_exhausted",
    "script",
    "hook_failed",
];

/// Why the rate limit stage refused a request: the `reason` values of
/// `llmproxy_rate_limited_total` (a limit's
/// [`crate::policy::limits::LimitKind`], the script's, the shared state
/// out of reach).
pub const RATE_REASONS: [&str; 6] = [
    "global_rpm",
    "key_rpm",
    "key_tpm",
    "key_concurrency",
    "script",
    "state_unavailable",
];

/// The `# HELP` and `# TYPE` lines of `family`, each ending in a newline.
pub fn header(family: &Family) -> String {
    format!(
        "# HELP {name} {help}\n# TYPE {name} {kind}\n",
        name = family.name,
        help = family.help,
        kind = family.kind.as_str()
    )
}

/// Check an exposition text against the catalog: every `# HELP` / `# TYPE`
/// line must be the catalog's, and every sample must belong to a family of
/// the catalog with the catalog's label names. The problems found, one per
/// line (empty: the text follows the catalog).
pub fn check_exposition(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            match find(name) {
                Some(f) if f.help == help => {}
                Some(f) => problems.push(format!("{name}: help {help:?}, the catalog says {:?}", f.help)),
                None => problems.push(format!("{name}: not in the catalog")),
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            match find(name) {
                Some(f) if f.kind.as_str() == kind => {}
                Some(f) => problems.push(format!("{name}: type {kind}, the catalog says {}", f.kind.as_str())),
                None => problems.push(format!("{name}: not in the catalog")),
            }
        } else if !line.is_empty() && !line.starts_with('#') {
            let series = line.split_once(' ').map_or(line, |(s, _)| s);
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let (base, extra) = match find(name) {
                Some(f) => (Some(f), None),
                None => {
                    let hist = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s).and_then(find).map(|f| (f, *s)));
                    match hist {
                        Some((f, "_bucket")) if f.kind == Histogram => (Some(f), Some("le")),
                        Some((f, _)) if f.kind == Histogram => (Some(f), None),
                        _ => (None, None),
                    }
                }
            };
            let Some(f) = base else {
                problems.push(format!("{name}: a sample of no family in the catalog"));
                continue;
            };
            for pair in split_labels(labels) {
                let key = pair.split_once('=').map_or(pair, |(k, _)| k);
                if !f.labels.contains(&key) && extra != Some(key) {
                    problems.push(format!("{name}: label {key} is not one of {:?}", f.labels));
                }
            }
        }
    }
    problems
}

/// `a="x",b="y,z"` split at the commas between pairs.
fn split_labels(labels: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        out.push(&labels[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_a_stage_gives_is_a_label_value() {
        for check in crate::admission::Check::ALL {
            let reason = check.denial().reason;
            assert!(AUTH_REASONS.contains(&reason), "{reason}");
        }
        for kind in crate::policy::limits::LimitKind::ALL {
            assert!(RATE_REASONS.contains(&kind.as_str()), "{}", kind.as_str());
        }
    }

    #[test]
    fn bucket_labels_are_plain_decimals_in_increasing_order() {
        for bounds in [&UPSTREAM_BUCKETS[..], &HOOK_BUCKETS[..]] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        }
        let labels: Vec<String> = HOOK_BUCKETS.iter().map(|b| le(*b)).collect();
        assert_eq!(labels[0], "0.00001");
        assert_eq!(le(1.0), "1");
        assert_eq!(le(2.5), "2.5");
    }

    #[test]
    fn names_are_unique_and_prometheus_shaped() {
        for (i, f) in FAMILIES.iter().enumerate() {
            assert!(f.name.starts_with("llmproxy_"), "{}", f.name);
            assert!(
                f.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                f.name
            );
            assert_eq!(f.kind == Counter, f.name.ends_with("_total"), "{}", f.name);
            assert!(!f.help.contains('\n') && f.help.ends_with('.'), "{}", f.name);
            assert!(FAMILIES[..i].iter().all(|g| g.name != f.name), "{} twice", f.name);
        }
    }

    #[test]
    fn the_checker_finds_drift() {
        let good = format!(
            "{}llmproxy_requests_total{{backend=\"a,b\",status=\"200\"}} 3\n{}llmproxy_hook_duration_seconds_bucket{{hook=\"routing\",le=\"0.001\"}} 1\nllmproxy_hook_duration_seconds_sum{{hook=\"routing\"}} 0.1\n",
            header(find("llmproxy_requests_total").expect("family")),
            header(find("llmproxy_hook_duration_seconds").expect("family")),
        );
        assert_eq!(check_exposition(&good), Vec::<String>::new());
        let bad = "# HELP llmproxy_requests_total Requests.\n# TYPE llmproxy_retries_total gauge\nllmproxy_nope 1\nllmproxy_usage_total{backend=\"a\",unit=\"x\"} 1\n";
        assert_eq!(check_exposition(bad).len(), 4, "{:?}", check_exposition(bad));
    }
}
